"""Latency model accuracy (issue 15): N random heterogeneous structures of a ViT
(pyengine.structure.synthetic), each compiled as pyengine.compile does (layout "auto"), its
latency predicted by pyengine.latency from the device's latency table and measured with the
one timing harness (interleaved with the dense model), at each batch size. Reports per batch
the median and max |predicted - measured| / measured.

    python bench/latency_prediction.py --model deit_small_patch16_224 --structures 20 \\
        --batches 1,8 --threads 2 --out bench/results/cpu/latency_prediction_deit_small

writes OUT.json (env, table key, rows, summary) and OUT.log (what it printed). The latency
table is measured first if the cache lacks it (once per device, dtype and model shape).
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

import pyengine
from pyengine.cost.dtypes import as_dtype, dtype_name
from pyengine.cost.latency import table_for
from pyengine.io.atomic import write_json, write_text
from pyengine.measure.timing import environment, measure
from pyengine.structure.synthetic import heterogeneous_spec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--model-kwargs", type=json.loads, default={})
    p.add_argument("--structures", type=int, default=20)
    p.add_argument("--targets", default="0.3,0.9", help="MAC fractions drawn uniformly in LO,HI")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", required=True, help="path prefix: writes OUT.json and OUT.log")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    batches = [int(b) for b in a.batches.split(",")]
    lo, hi = (float(x) for x in a.targets.split(","))
    dt = as_dtype(a.dtype)
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    t0 = time.perf_counter()
    dense = pyengine.create_model(a.model, **a.model_kwargs).eval().to(dt)
    g = pyengine.geometry(dense)
    table = table_for(g, "cpu", dt, batches, log=say)
    say(f"latency table {table.device} {table.dtype}, batches {table.batches(g)}")
    rng = random.Random(a.seed)
    rows = []
    for i in range(a.structures):
        target = rng.uniform(lo, hi)
        spec = heterogeneous_spec(g, target, seed=a.seed * 1000 + i, model=a.model)
        gated = pyengine.gate(copy.deepcopy(dense))
        pyengine.apply(gated, spec)
        compact = pyengine.compile(gated, device="cpu", batch=batches, dtype=dt).eval()
        for b in batches:
            pred = pyengine.latency(compact, batch=b, dtype=dt, table=table)
            pred_dense = pyengine.latency(dense, batch=b, dtype=dt, table=table)
            x = torch.randn(b, g.in_chans, *_img(dense), dtype=dt)
            st = measure({"dense": lambda: dense(x), "compact": lambda: compact(x)},
                         warmup=a.warmup, repeats=a.repeats, device="cpu",
                         rounds=a.rounds).stats()
            err = pred.ms / st["compact"]["median_ms"] - 1.0
            err_dense = pred_dense.ms / st["dense"]["median_ms"] - 1.0
            rows.append({"structure": i, "target": target, "batch": b,
                         "macs_ratio": pyengine.cost(compact).macs / pyengine.cost(dense).macs,
                         "layout": [r.detail for r in pred.rows if r.kind == "attention"],
                         "predicted_ms": pred.ms, "measured": st["compact"], "rel_error": err,
                         "dense_predicted_ms": pred_dense.ms, "dense_measured": st["dense"],
                         "dense_rel_error": err_dense})
            say(f"structure {i:2d} target {target:.2f} batch {b:3d}: predicted "
                f"{pred.ms:9.3f} ms, measured {st['compact']['median_ms']:9.3f} ms "
                f"(IQR {st['compact']['iqr_ms']:.3f}), error {err:+.1%}; dense predicted "
                f"{pred_dense.ms:.3f}, measured {st['dense']['median_ms']:.3f}")
    summary = {}
    for b in batches:
        errs = [abs(r["rel_error"]) for r in rows if r["batch"] == b]
        summary[str(b)] = {"median_abs_rel_error": statistics.median(errs),
                           "max_abs_rel_error": max(errs), "n": len(errs)}
        say(f"batch {b}: median |error| {summary[str(b)]['median_abs_rel_error']:.1%}, max "
            f"{summary[str(b)]['max_abs_rel_error']:.1%} over {len(errs)} structures")
    errs = [abs(r["rel_error"]) for r in rows]
    summary["all"] = {"median_abs_rel_error": statistics.median(errs),
                      "max_abs_rel_error": max(errs), "n": len(errs)}
    say(f"all: median |error| {summary['all']['median_abs_rel_error']:.1%}, max "
        f"{summary['all']['max_abs_rel_error']:.1%}; {time.perf_counter() - t0:.0f} s")
    doc = {"env": environment("cpu"), "config": {**vars(a), "dtype": dtype_name(dt)},
           "table": {"device": table.device, "dtype": table.dtype, "batches": table.batches(g)},
           "rows": rows, "summary": summary, "argv": sys.argv}
    out = Path(a.out)
    write_json(doc, out.with_name(out.name + ".json"))
    write_text(out.with_name(out.name + ".log"), "\n".join(lines) + "\n")
    return 0


def _img(model) -> tuple[int, int]:
    return tuple(int(s) for s in model.patch_embed.img_size)


if __name__ == "__main__":
    raise SystemExit(main())
