"""Predicted pruning limit from the exact Hessian spectrum vs from SLQ, on a digits MLP small
enough for a dense Hessian; separates the SLQ error from the theory's gap to the measurement.

Trains DigitsMLP(8x8, hidden 32-32) as ``pyengine limit`` would (AdamW 2e-3, batch 128,
60 epochs, seed 0), builds the dense Hessian of the mean loss over 512 training samples by
Hessian-vector products, takes eigvalsh, and predicts the threshold with the exact spectrum
and with SLQ at several budgets; measures the one-shot threshold on the validation split.

    OMP_NUM_THREADS=1 python bench/limit_exact_spectrum.py > bench/results/cpu/limit_exact_spectrum.log
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
from pyengine.experiments.limit import (HessianOperator, cache_batches, full_hessian, loss_spread, measure,
                            predict, prunable_parameters, slq)
from pyengine.experiments.limit.models import DigitsMLP
from pyengine.experiments.limit.slq import Spectrum
from pyengine.experiments.limit.threshold import gaussian_width, solve

HIDDEN = (32, 32)
SAMPLES = 512
ITERS = (16, 32, 64, 128)
SEEDS = (0, 1)


def main() -> int:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/cpu")
    from pyengine.train.trainer import fit
    train, val, n = loaders("digits", 8, 128, seed=0)
    model = DigitsMLP(8, HIDDEN, n)
    fit(model, train, val, epochs=60, lr=2e-3, weight_decay=0.0, progress=False)
    model = model.double().eval()
    val64 = [(x.double(), y) for x, y in val]
    weights = [p for _, p in prunable_parameters(model)]
    _, eps, _ = loss_spread(model, train)
    op = HessianOperator(model, cache_batches(train, SAMPLES, dtype=torch.float64), weights)
    ratios = [i / 100 for i in range(100)]
    meas = measure(model, val64, ratios, 0.0, weights)
    print(f"DigitsMLP hidden {HIDDEN}: {op.dim} weights, val top-1 {meas.base:.2f}%, eps {eps:.5f}, "
          f"Hessian over {op.samples} samples (float64)", flush=True)
    print(f"measured threshold: {meas.threshold:.2f} (largest matching), "
          f"{meas.meta['contiguous_threshold']:.2f} (before first drop)", flush=True)
    t = time.time()
    H = full_hessian(op)
    ev = torch.linalg.eigvalsh(H).numpy()
    row_l1 = H.abs().sum(1).numpy()
    flat = float((row_l1 < 1e-7).mean())
    print(f"dense Hessian {time.time() - t:.0f}s: eigenvalues [{ev.min():.3g}, {ev.max():.3g}], "
          f"negative {np.mean(ev < 0):.3f}, |l|<1e-6 {np.mean(np.abs(ev) < 1e-6):.3f}, "
          f"|l|<1e-4 {np.mean(np.abs(ev) < 1e-4):.3f}, exactly flat rows {flat:.3f}", flush=True)
    exact = Spectrum([ev], [np.full(len(ev), 1.0 / len(ev))], op.dim, 0)
    p_exact = predict(exact, weights, eps, ratios)
    print(f"predicted (exact spectrum): {p_exact.ratio:.2f}", flush=True)
    sens = {f"eps_x{f:g}": solve(ratios, gaussian_width(ev, np.ones_like(ev), p_exact.R, eps * f))
            for f in (0.25, 0.5, 2, 4)}
    print("exact-spectrum prediction with eps scaled: " +
          ", ".join(f"{k} {v:.2f}" for k, v in sens.items()), flush=True)
    rows = []
    for iters in ITERS:
        for seed in SEEDS:
            t = time.time()
            sp = slq(op, iters=iters, probes=2, seed=seed)
            p = predict(sp, weights, eps, ratios)
            rows.append({"iters": iters, "seed": seed, "probes": 2, "predicted": p.ratio,
                         "moments_rel_err": [sp.moment(k) / np.mean(ev ** k) - 1 for k in (1, 2)],
                         "seconds": time.time() - t})
            print(f"SLQ {iters:3d} steps x 2 probes (seed {seed}): predicted {p.ratio:.2f}; "
                  f"moment 1/2 rel. err {rows[-1]['moments_rel_err'][0]:+.3f}/"
                  f"{rows[-1]['moments_rel_err'][1]:+.3f} ({rows[-1]['seconds']:.0f}s)", flush=True)
    res = {"hidden": list(HIDDEN), "weights": op.dim, "samples": op.samples, "eps": eps,
           "base_top1": meas.base, "measured": meas.to_dict(), "eigenvalues": ev.tolist(),
           "flat_rows": flat, "predicted_exact": p_exact.to_dict(), "eps_sensitivity": sens,
           "slq": rows, "env": environment("cpu")}
    tmp = out / ".limit_exact_spectrum.json.tmp"
    tmp.write_text(json.dumps(res) + "\n")
    os.replace(tmp, out / "limit_exact_spectrum.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
