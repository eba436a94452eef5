"""Latency model accuracy (issue 15): N random heterogeneous structures of a ViT
(pyengine.structure.synthetic), each compiled as pyengine.compile does (layout "auto"), its
latency predicted by pyengine.latency from the device's latency table and measured with the
one timing harness (all structures and the dense model interleaved in one set, sample by
sample), at each batch size. Reports per batch
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
import sys
import time
from pathlib import Path

import torch

import pyengine
from pyengine.cost.dtypes import as_dtype, dtype_name
from pyengine.cost.latency import table_for
from pyengine.io.atomic import write_json, write_text
from pyengine.measure.latency_report import prediction_summary
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
    p.add_argument("--rounds", type=int, default=20,
                   help="round-robin passes (default: one sample of each model per pass)")
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
    say(f"latency table {table.device} {table.dtype}, batches {table.batches(g)}, "
        f"calibrated in whole models: {table.calibrated(g)}")
    rng = random.Random(a.seed)
    rows = []
    models, targets = {}, {}
    for i in range(a.structures):
        targets[i] = rng.uniform(lo, hi)
        spec = heterogeneous_spec(g, targets[i], seed=a.seed * 1000 + i, model=a.model)
        gated = pyengine.gate(copy.deepcopy(dense))
        pyengine.apply(gated, spec)
        models[i] = pyengine.compile(gated, device="cpu", batch=batches, dtype=dt).eval()
    dense_macs = pyengine.cost(dense).macs
    for b in batches:
        x = torch.randn(b, g.in_chans, *_img(dense), dtype=dt)
        # every structure and the dense model in one interleaved set: each sample pass runs
        # them all in turn, so a slow or fast spell of the machine (seconds long on a shared
        # VM) falls on all of them alike instead of on the one being measured
        fns = {"dense": lambda: dense(x)}
        fns.update({f"s{i}": (lambda m=m: m(x)) for i, m in models.items()})
        st = measure(fns, warmup=a.warmup, repeats=a.repeats, device="cpu",
                     rounds=a.rounds).stats()
        pred_dense = pyengine.latency(dense, batch=b, dtype=dt, table=table)
        err_dense = pred_dense.ms / st["dense"]["median_ms"] - 1.0
        say(f"batch {b:3d}: dense predicted {pred_dense.ms:.3f} ms, measured "
            f"{st['dense']['median_ms']:.3f} ms (IQR {st['dense']['iqr_ms']:.3f}), error "
            f"{err_dense:+.1%}")
        for i, compact in models.items():
            pred = pyengine.latency(compact, batch=b, dtype=dt, table=table)
            m = st[f"s{i}"]
            err = pred.ms / m["median_ms"] - 1.0
            err_min = pred.ms / m["min_ms"] - 1.0
            rows.append({"structure": i, "target": targets[i], "batch": b,
                         "macs_ratio": pyengine.cost(compact).macs / dense_macs,
                         "layout": [r.detail for r in pred.rows if r.kind == "attention"],
                         "predicted_ms": pred.ms, "measured": m, "rel_error": err,
                         "rel_error_vs_min": err_min,
                         "dense_predicted_ms": pred_dense.ms, "dense_measured": st["dense"],
                         "dense_rel_error": err_dense})
            say(f"structure {i:2d} target {targets[i]:.2f} batch {b:3d}: predicted "
                f"{pred.ms:9.3f} ms, measured {m['median_ms']:9.3f} ms "
                f"(IQR {m['iqr_ms']:.3f}), error {err:+.1%}")
    summary = prediction_summary(rows, batches, say, time.perf_counter() - t0)
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
