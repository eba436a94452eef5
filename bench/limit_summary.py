"""Summarise the committed ``pyengine limit`` results (bench/results/cpu/limit_*.json).

Everything here is recomputed from the stored raw data (accuracy curves, SLQ nodes/weights,
distances R, per-batch losses): measured thresholds at several accuracy tolerances, and how
the predicted threshold moves when eps is halved/doubled or the flat correction dropped.

    python bench/limit_summary.py [RESULT_DIR] > bench/results/cpu/limit_summary.log
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from pyengine.experiments.limit.measured import contiguous_matching, largest_matching
from pyengine.experiments.limit.threshold import gaussian_width, solve

TOLERANCES = (0.0, 0.5, 1.0, 2.0)  # accuracy points


def summarise(r: dict) -> dict:
    m, p = r["measured"], r["predicted"]
    nodes = np.concatenate([np.asarray(n) for n in r["spectrum"]["nodes"]])
    weights = np.concatenate([np.asarray(w) for w in r["spectrum"]["weights"]])
    ratios, R = np.asarray(p["ratios"]), np.asarray(p["R"])

    def pred(eps, flat):
        return solve(ratios, gaussian_width(nodes, weights, R, eps, flat))

    out = {
        "model": r["model"], "l1": r["args"]["l1"], "weights": r["prunable_weights"],
        "base_top1": m["base"], "eps": p["eps"], "flat": p["flat"],
        "lanczos": f"{r['spectrum']['iters']}x{r['spectrum']['probes']}",
        "predicted": p["ratio"], "predicted_no_flat": p["ratio_uncorrected"],
        "predicted_eps_x0.5": pred(p["eps"] / 2, p["flat"]),
        "predicted_eps_x2": pred(p["eps"] * 2, p["flat"]),
        "measured": {f"tol{t:g}": {"largest": largest_matching(m["ratios"], m["accuracy"], m["base"], t),
                                   "contiguous": contiguous_matching(m["ratios"], m["accuracy"], m["base"], t)}
                     for t in TOLERANCES},
    }
    out["gap_paper_rule"] = out["predicted"] - out["measured"]["tol0"]["largest"]
    s = r.get("structured")
    if s:
        sm = s["measured"]
        out["structured"] = {
            "predicted": s["predicted"]["ratio"],
            "measured": {f"tol{t:g}": largest_matching(sm["ratios"], sm["accuracy"], sm["base"], t)
                         for t in TOLERANCES}}
    return out


def main(argv: list[str]) -> int:
    d = Path(argv[1] if len(argv) > 1 else "bench/results/cpu")
    files = sorted(f for f in d.glob("limit_*.json") if f.name != "limit_summary.json")
    if not files:
        raise FileNotFoundError(f"no limit_*.json under {d}")
    rows = []
    for f in files:
        r = json.loads(f.read_text())
        if r.get("format") != "pyengine.limit/1":
            continue
        rows.append({"file": f.name, **summarise(r)})
    hdr = (f"{'result':38s} {'l1':>6s} {'top1':>6s} {'eps':>8s} {'flat':>5s} {'pred':>5s} {'p(eps/2)':>8s} "
           f"{'p(2eps)':>7s} | measured largest/contiguous at tol 0, 0.5, 1, 2 pts | gap")
    print(hdr)
    for row in rows:
        ms = "  ".join(f"{v['largest']:.2f}/{v['contiguous']:.2f}" for v in row["measured"].values())
        print(f"{row['file']:38s} {row['l1']:6.0e} {row['base_top1']:6.2f} {row['eps']:8.4f} {row['flat']:5.2f} "
              f"{row['predicted']:5.2f} {row['predicted_eps_x0.5']:8.2f} {row['predicted_eps_x2']:7.2f} | "
              f"{ms} | {row['gap_paper_rule']:+.2f}")
        if "structured" in row:
            s = row["structured"]
            print(f"{'  structured (extension)':38s} {'':6s} {'':6s} {'':8s} {'':5s} {s['predicted']:5.2f} "
                  f"{'':8s} {'':7s} | " + "  ".join(f"{v:.2f}" for v in s["measured"].values()))
    tmp = d / ".limit_summary.json.tmp"
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(tmp, d / "limit_summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
