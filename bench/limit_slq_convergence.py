"""How the predicted pruning limit of the digits MLP moves with the SLQ budget.

Trains digits_mlp as ``pyengine limit --model digits_mlp`` does (60 epochs, AdamW 2e-3, batch
128, seed 0), then runs SLQ with growing Lanczos steps and several probe seeds and prints the
predicted threshold (flat fraction fixed at the value measured once, 100 rows).

    OMP_NUM_THREADS=1 python bench/limit_slq_convergence.py > bench/results/cpu/limit_slq_convergence.log
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pyengine.train.data import loaders
from pyengine.measure.timing import environment
from pyengine.experiments.limit import (HessianOperator, cache_batches, digits_mlp, flat_fraction,
                            loss_spread, predict, prunable_parameters, slq)
from pyengine.train.trainer import evaluate, fit

ITERS = (8, 16, 32, 64, 128)
SEEDS = (0, 1, 2)
PROBES = 2


def main() -> int:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/cpu")
    train, val, n = loaders("digits", 8, 128, seed=0)
    model = digits_mlp(8, num_classes=n)
    fit(model, train, val, epochs=60, lr=2e-3, weight_decay=0.0, progress=False)
    model.eval()
    weights = [p for _, p in prunable_parameters(model)]
    base = evaluate(model, val)
    _, eps, _ = loss_spread(model, train)
    op = HessianOperator(model, cache_batches(train), weights)
    flat, _ = flat_fraction(op, weights, 100)
    ratios = [i / 100 for i in range(100)]
    print(f"digits_mlp: {op.dim} weights, val top-1 {base:.2f}%, eps {eps:.5f}, flat {flat:.2f}, "
          f"Hessian over {op.samples} samples", flush=True)
    print(f"{'iters':>5s} {'seed':>4s} {'probes':>6s} {'pred':>5s} {'pred_noflat':>11s} "
          f"{'mean|l|':>9s} {'max':>8s} {'neg_mass':>8s} {'mass|l|<1e-3':>12s} {'s':>6s}", flush=True)
    rows = []
    for iters in ITERS:
        for seed in SEEDS:
            t = time.time()
            sp = slq(op, iters=iters, probes=PROBES, seed=seed)
            p = predict(sp, weights, eps, ratios, flat)
            x, w = sp.flat()
            row = {"iters": iters, "seed": seed, "probes": PROBES, "predicted": p.ratio,
                   "predicted_no_flat": p.ratio_uncorrected, "abs_mean": sp.moment(1, True),
                   "max": float(x.max()), "negative_mass": float(w[x < 0].sum()),
                   "mass_abs_below_1e-3": float(w[np.abs(x) < 1e-3].sum()),
                   "seconds": time.time() - t}
            rows.append(row)
            print(f"{iters:5d} {seed:4d} {PROBES:6d} {p.ratio:5.2f} {p.ratio_uncorrected:11.2f} "
                  f"{row['abs_mean']:9.2e} {row['max']:8.3f} {row['negative_mass']:8.3f} "
                  f"{row['mass_abs_below_1e-3']:12.3f} {row['seconds']:6.1f}", flush=True)
    res = {"model": "digits_mlp", "weights": op.dim, "base_top1": base, "eps": eps, "flat": flat,
           "samples": op.samples, "rows": rows, "env": environment("cpu")}
    tmp = out / ".limit_slq_convergence.json.tmp"
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, out / "limit_slq_convergence.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
