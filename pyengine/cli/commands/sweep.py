"""``pyengine sweep``: one-shot accuracy vs compression for every importance criterion.

    pyengine sweep --arch vit resnet --seeds 3 --removed 0 0.25 0.5 0.75 \\
        --out bench/results/cpu/sweep_digits.json

Trains (or loads from --cache-dir) the dense digits models with pyengine.train's digits
recipe, then for every allocation mode, seed, criterion and fraction of MACs removed prunes a
gated copy one-shot (no fine-tuning) and measures top-1 on the digits validation split.
Writes the JSON after every run (atomically) and a plot beside it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HELP = "accuracy vs compression for every one-shot criterion (JSON + plot)"
DESCRIPTION = __doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pyengine.structure.solver import MODES
    from pyengine.methods.criteria import CRITERIA
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--arch", nargs="+", default=["vit", "resnet"],
                   choices=["vit", "vit_lite", "resnet"],
                   help="digits models to sweep (pyengine.zoo.digits_vit / digits_resnet)")
    p.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=list(CRITERIA))
    p.add_argument("--removed", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75],
                   help="fractions of dense MACs removed")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (calibration batches, "
                   "random scores)")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--calib-batch-size", type=int, default=64)
    p.add_argument("--allocation", nargs="+", default=["global"], choices=list(MODES))
    p.add_argument("--granularity", default="dim", choices=["dim", "head", "block"],
                   help="ViT units (ResNets: dim = inner conv channels, block = residual blocks)")
    p.add_argument("--min-heads", type=int, default=1)
    p.add_argument("--round-to", type=int, default=1)
    p.add_argument("--cache-dir", default="out/dense", help="trained dense models (safetensors)")
    p.add_argument("--out", default="bench/results/cpu/sweep_digits.json")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def run(args) -> int:
    import torch

    from pyengine.train.data import digits
    from pyengine.io.atomic import write_json
    from pyengine.experiments.sweep import plot, sweep, trained_dense
    from pyengine.measure.timing import environment
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    out = Path(args.out)
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    result = {"format": "pyengine.sweep/1", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                      time.gmtime()),
              "command": "pyengine sweep " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else
              "pyengine sweep", "env": environment(args.device), "dense": {}, "runs": {}, "claim_75": {},
              "claims": {}}
    val = torch.utils.data.DataLoader(digits("val", 32), batch_size=128)
    calib_data = digits("train", 32)  # no augmentation
    for arch in args.arch:
        model, meta = trained_dense(arch, args.cache_dir, seed=0, progress=args.progress)
        result["dense"][arch] = {k: meta[k] for k in meta if k != "history"} | {
            "final_epoch": meta["history"][-1] if meta.get("history") else None}
        for alloc in args.allocation:
            name = f"{arch}/{alloc}"
            print(f"== {name}", flush=True)
            gran = args.granularity
            r = sweep(model, calib_data, val, args.criteria, tuple(args.removed),
                      tuple(range(args.seeds)), args.calib_batches, args.calib_batch_size,
                      alloc, gran, args.min_heads, args.round_to, args.device, args.progress,
                      log=lambda s: print(s, flush=True))
            result["runs"][name] = r
            result["claim_75"][name] = claim(r)
            result["claims"][name] = {f"{x:.2f}": claim(r, f"{x:.2f}") for x in args.removed
                                      if x > 0}
            write_json(result, out, indent=1)
            plot(result["runs"], png, title="digits, one-shot structured pruning (no "
                                            "fine-tuning); mean and min-max over seeds")
            print(f"wrote {out} and {png}", flush=True)
    return 0


def claim(r: dict, at: str = "0.75") -> dict:
    """The AGF paper's claim at ``at`` removed (a "%.2f" key; the paper's stress test is 75%):
    AGF above random while the static criteria (magnitude, Wanda, RIA) fall below it."""
    s = r["summary"]["top1"]
    if "random" not in s or at not in s["random"]:
        return {}
    rnd = s["random"][at]["mean"]
    means = {c: s[c][at]["mean"] for c in s if at in s[c]}
    static = [c for c in ("magnitude", "wanda", "ria") if c in means]
    return {"removed": float(at), "random_mean": rnd, "means": means,
            "agf_above_random": means.get("agf", float("nan")) > rnd,
            "static_below_random": {c: means[c] < rnd for c in static},
            "claim_holds": bool(means.get("agf", float("-inf")) > rnd
                                and all(means[c] < rnd for c in static))}
