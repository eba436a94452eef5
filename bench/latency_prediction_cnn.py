"""CNN latency model accuracy (issue 15): N random structures of a CNN (random kept fraction of
every block's slots, some removable blocks removed), each compiled with pyengine.compile, its
latency predicted by pyengine.latency from the model's CNN latency table
(pyengine/cost/cnn_latency_table.py: every block timed in place in compact models at a grid of
uniform kept fractions) and measured with the one timing harness (all structures and the dense
model interleaved in one set, sample by sample), at each batch size. Reports per batch the
median and max |predicted - measured| / measured.

    python bench/latency_prediction_cnn.py --model resnet50 --img-size 224 --structures 20 \\
        --batches 1,8 --threads 2 --out bench/results/cpu/latency_prediction_resnet50

writes OUT.json (env, table, rows, summary) and OUT.log (what it printed). The table is
measured first where the cache lacks it (once per device, dtype, model, input size and batch).
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
from pyengine.cost.cnn_latency import CnnLatencyModel
from pyengine.cost.cnn_latency_table import block_removable, block_slots, cnn_key, get_cnn_table
from pyengine.cost.dtypes import as_dtype, dtype_name
from pyengine.io.atomic import write_json, write_text
from pyengine.measure.latency_report import prediction_summary
from pyengine.measure.timing import environment, measure
from pyengine.structure.spec import make_conv_block


def random_structure(g, model: str, rng: random.Random, lo: float, hi: float,
                     p_remove: float, round_to: int = 1):
    """Per block: removed with probability ``p_remove`` (where it can be), else each slot keeps
    a random fraction in [lo, hi] of its units (random units, at least one), rounded to a
    multiple of ``round_to`` channels."""
    from pyengine.models import adapter_for_geometry
    slots, rm, it = block_slots(g), block_removable(g), iter(range(len(block_slots(g))))
    stages = []
    for n in g.layers:
        st = []
        for _ in range(n):
            i = next(it)
            if rm[i] and rng.random() < p_remove:
                st.append(make_conv_block(False))
                continue
            ch = {}
            for name, c, grp in slots[i]:
                u = c // grp
                k = min(u, max(1, round(rng.uniform(lo, hi) * u)))
                # kept channels in multiples of round_to, as a pruner rounds them for the CPU
                # and GPU kernels (unaligned counts run slower than their MACs say)
                step = round_to // grp if round_to % grp == 0 and round_to > grp else 1
                k = min(u, max(step, step * round(k / step)))
                ch[name] = [x * grp + j for x in sorted(rng.sample(range(u), k))
                            for j in range(grp)]
            st.append(make_conv_block(True, **ch))
        stages.append(tuple(st))
    return adapter_for_geometry(g).spec_type(tuple(stages), model=model, dense=g)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--model-kwargs", type=json.loads, default={})
    p.add_argument("--structures", type=int, default=20)
    p.add_argument("--widths", default="0.15,1.0",
                   help="kept fraction of each slot drawn uniformly in LO,HI")
    p.add_argument("--p-remove", type=float, default=0.2,
                   help="probability that a removable block is removed")
    p.add_argument("--round-to", type=int, default=8,
                   help="kept channels in multiples of this (1: any count)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rounds", type=int, default=20,
                   help="round-robin passes (default: one sample of each model per pass)")
    p.add_argument("--table-repeats", type=int, default=None,
                   help="rounds at least when measuring the table (default: the module's)")
    p.add_argument("--table-min-seconds", type=float, default=None,
                   help="the table's samples span at least this long (default: the module's)")
    p.add_argument("--out", required=True, help="path prefix: writes OUT.json and OUT.log")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    batches = [int(b) for b in a.batches.split(",")]
    lo, hi = (float(x) for x in a.widths.split(","))
    dt = as_dtype(a.dtype)
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    t0 = time.perf_counter()
    dense = pyengine.create_model(a.model, img_size=a.img_size, **a.model_kwargs).eval().to(dt)
    g = pyengine.geometry(dense)
    opts = {k: v for k, v in (("repeats", a.table_repeats),
                              ("min_seconds", a.table_min_seconds)) if v is not None}
    models: dict[int, CnnLatencyModel] = {}
    for b in batches:
        table = get_cnn_table(g, a.model, "cpu", dt, b, log=say, **opts)
        if table is None:
            raise SystemExit(f"no cached CNN latency table of {a.model} at {a.img_size}px, "
                             f"batch {b}, and PYENGINE_LATENCY=off: unset it to measure one")
        models[b] = CnnLatencyModel(table, g, a.model, b)
        e = models[b].entry
        say(f"CNN latency table {table.device} {table.dtype} {cnn_key(g, a.model)} batch {b}: "
            f"dense {models[b].dense:.3f} ms, fixed {e.fixed_ms:.3f} ms, measured in "
            f"{e.info.get('seconds', '?')} s ({e.info.get('repeats')} rounds)")
    rng = random.Random(a.seed)
    specs, compacts = {}, {}
    for i in range(a.structures):
        specs[i] = random_structure(g, a.model, rng, lo, hi, a.p_remove, a.round_to)
        gated = pyengine.gate(copy.deepcopy(dense))
        pyengine.apply(gated, specs[i])
        compacts[i] = pyengine.compile(gated).eval()
    dense_macs = pyengine.cost(dense).macs
    rows = []
    for b in batches:
        lm = models[b]
        x = torch.randn(b, g.in_chans, a.img_size, a.img_size, dtype=dt)
        # every structure and the dense model in one interleaved set: each sample pass runs
        # them all in turn, so a slow or fast spell of the machine falls on all of them alike
        fns = {"dense": lambda: dense(x)}
        fns.update({f"s{i}": (lambda m=m: m(x)) for i, m in compacts.items()})
        st = measure(fns, warmup=a.warmup, repeats=a.repeats, device="cpu",
                     rounds=a.rounds).stats()
        pred_dense = pyengine.latency(dense, batch=b, dtype=dt, table=lm.table)
        err_dense = pred_dense.ms / st["dense"]["median_ms"] - 1.0
        say(f"batch {b:3d}: dense predicted {pred_dense.ms:.3f} ms, measured "
            f"{st['dense']['median_ms']:.3f} ms (IQR {st['dense']['iqr_ms']:.3f}), error "
            f"{err_dense:+.1%}")
        for i, compact in compacts.items():
            pred = pyengine.latency(compact, batch=b, dtype=dt, table=lm.table)
            m = st[f"s{i}"]
            err = pred.ms / m["median_ms"] - 1.0
            macs = pyengine.cost(compact).macs / dense_macs
            rows.append({"structure": i, "batch": b, "macs_ratio": macs,
                         "removed_blocks": sum(not blk.keep for blk in specs[i].blocks),
                         "predicted_ms": pred.ms, "measured": m, "rel_error": err,
                         "rel_error_vs_min": pred.ms / m["min_ms"] - 1.0,
                         "dense_predicted_ms": pred_dense.ms, "dense_measured": st["dense"],
                         "dense_rel_error": err_dense})
            say(f"structure {i:2d} MACs {macs:.2f} batch {b:3d}: predicted {pred.ms:9.3f} ms, "
                f"measured {m['median_ms']:9.3f} ms (IQR {m['iqr_ms']:.3f}), error {err:+.1%}")
    summary = prediction_summary(rows, batches, say, time.perf_counter() - t0)
    tables = {str(b): {"device": lm.table.device, "dtype": lm.table.dtype,
                       "key": cnn_key(g, a.model), "fixed_ms": lm.fixed, "dense_ms": lm.dense,
                       **{k: v for k, v in lm.entry.info.items() if k != "structures"}}
              for b, lm in models.items()}
    doc = {"env": environment("cpu"), "config": {**vars(a), "dtype": dtype_name(dt)},
           "tables": tables, "rows": rows, "summary": summary, "argv": sys.argv}
    out = Path(a.out)
    write_json(doc, out.with_name(out.name + ".json"))
    write_text(out.with_name(out.name + ".log"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
