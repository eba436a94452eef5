"""``pyengine route``: hybrid routing between a pruned light expert and the dense heavy one.

    pyengine route --arch vit --light-method agf --light-target 0.5 --finetune 3 \\
        --out bench/results/cpu/route_digits.json

The heavy expert is the dense digits model (trained with pyengine.train's digits recipe, or
loaded from --cache-dir); the light expert is a one-shot pruned copy at --light-target (kept
fraction of MACs), optionally fine-tuned for --finetune epochs with distillation from the
heavy one. Every threshold of every prior (max-softmax, margin, negative entropy of the light
expert's own softmax) is swept on the validation split; the JSON reports accuracy, heavy usage
and cost (light MACs + usage * heavy MACs, relative to the heavy alone), the cheapest
threshold matching the heavy expert's accuracy (in-sample, and 2-fold cross-validated: chosen
on one half, measured on the other), and the Pareto front; a plot is written beside it.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

from pyengine.io.atomic import save_figure, write_json

HELP = "hybrid routing: pruned light expert + dense heavy expert, zero-cost confidence prior"
DESCRIPTION = __doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pyengine.structure.solver import MODES
    from pyengine.methods.criteria import CRITERIA
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--arch", default="vit", choices=["vit", "vit_lite", "resnet"])
    p.add_argument("--light-method", default="agf", choices=list(CRITERIA))
    p.add_argument("--light-target", type=float, default=0.5,
                   help="kept fraction of dense MACs of the light expert (default 0.5)")
    p.add_argument("--allocation", default="global", choices=list(MODES))
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--finetune", type=int, default=0,
                   help="epochs of fine-tuning the light expert (distilled from the heavy)")
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default="out/dense", help="trained dense models (safetensors)")
    p.add_argument("--out", default="bench/results/cpu/route_digits.json")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def run(args) -> int:
    import torch

    from pyengine import api
    from pyengine.cost import cost
    from pyengine.train.data import digits, loaders
    from pyengine.methods.oneshot import one_shot
    from pyengine.experiments.route import PRIORS, cross_validate, logits_of, pareto, pick, route_curve
    from pyengine.experiments.sweep import _full_spec, _geom_dict, calib_loader, trained_dense
    from pyengine.train.trainer import DIGITS_RECIPE, evaluate, fit
    from pyengine.measure.timing import environment

    if not 0 < args.light_target < 1:
        raise ValueError(f"--light-target must be in (0, 1), got {args.light_target}")
    t0 = time.time()
    out = Path(args.out)
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    heavy, meta = trained_dense(args.arch, args.cache_dir, seed=0, progress=args.progress)
    heavy = heavy.to(args.device).eval()
    val = torch.utils.data.DataLoader(digits("val", 32), batch_size=128)

    light = copy.deepcopy(heavy)
    torch.manual_seed(args.seed)
    light, spec = one_shot(light, args.light_method, args.light_target,
                           loader=calib_loader(digits("train", 32), 64, args.seed),
                           calib_batches=args.calib_batches, allocation=args.allocation,
                           seed=args.seed, device=args.device)
    light = api.compile(light.eval()).eval()
    heavy_macs = cost(_full_spec(heavy)).macs
    light_macs = cost(spec).macs
    light_top1_oneshot = evaluate(light, val, args.device)
    print(f"light ({args.light_method}, kept MACs {light_macs / heavy_macs:.3f}) one-shot top-1 "
          f"{light_top1_oneshot:.2f}%", flush=True)
    history = []
    if args.finetune > 0:
        train_loader, _, _ = loaders("digits", 32, DIGITS_RECIPE["batch_size"], seed=args.seed,
                                     augment=DIGITS_RECIPE["augment"])
        light.train()
        history = fit(light, train_loader, val, epochs=args.finetune, lr=args.finetune_lr,
                      weight_decay=DIGITS_RECIPE["weight_decay"], teacher=heavy, kd_alpha=0.5,
                      kd_temperature=4.0, seed=args.seed, device=args.device,
                      progress=args.progress, grad_clip=DIGITS_RECIPE["grad_clip"])
        light.eval()
    ll, y = logits_of(light, val, args.device)
    hl, y2 = logits_of(heavy, val, args.device)
    if not torch.equal(y, y2):
        raise RuntimeError("validation order changed between the two passes")
    heavy_top1 = float((hl.argmax(-1) == y).double().mean() * 100)
    light_top1 = float((ll.argmax(-1) == y).double().mean() * 100)
    print(f"heavy top-1 {heavy_top1:.2f}%, light top-1 {light_top1:.2f}% after "
          f"{args.finetune} fine-tuning epochs", flush=True)
    priors = {}
    for name in PRIORS:
        curve = route_curve(ll, hl, y, light_macs, heavy_macs, name)
        best = pick(curve, heavy_top1)
        cv = cross_validate(ll, hl, y, light_macs, heavy_macs, name, folds=2, seed=args.seed)
        priors[name] = {"matched_in_sample": best, "matched_cross_validated": cv,
                        "pareto": pareto(curve), "curve": curve}
        print(f"{name:>12}: in-sample match usage {best['usage']:.3f} cost {best['cost']:.3f} "
              f"top-1 {best['top1']:.2f}% | 2-fold CV usage {cv['usage']:.3f} cost "
              f"{cv['cost']:.3f} top-1 {cv['top1']:.2f}% (heavy {cv['heavy_top1']:.2f}%)",
              flush=True)
    result = {
        "format": "pyengine.route/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "pyengine route " + " ".join(sys.argv[2:]), "env": environment(args.device),
        "arch": args.arch, "dense": {k: meta[k] for k in meta if k != "history"},
        "light": {"method": args.light_method, "target": args.light_target,
                  "allocation": args.allocation, "calib_batches": args.calib_batches,
                  "macs": light_macs, "kept_macs": light_macs / heavy_macs,
                  "top1_one_shot": light_top1_oneshot, "finetune_epochs": args.finetune,
                  "finetune_lr": args.finetune_lr, "finetune_history": history,
                  "top1": light_top1, "spec_summary": spec.summary()
                  if hasattr(spec, "summary") else {}},
        "heavy": {"macs": heavy_macs, "top1": heavy_top1,
                  "geometry": _geom_dict(spec.dense)},
        "val_images": int(y.numel()), "priors": priors, "seconds": time.time() - t0,
    }
    write_json(result, out, indent=1)
    _plot(result, png)
    print(f"wrote {out} and {png}", flush=True)
    return 0


def _plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for name, d in r["priors"].items():
        c = d["curve"]
        line, = ax.plot([p["cost"] for p in c], [p["top1"] for p in c], lw=1, alpha=0.5)
        f = d["pareto"]
        ax.plot([p["cost"] for p in f], [p["top1"] for p in f], marker=".", ls="-",
                color=line.get_color(), label=f"{name} (Pareto)")
        b = d["matched_in_sample"]
        if b:
            ax.scatter([b["cost"]], [b["top1"]], marker="*", s=160, color=line.get_color(),
                       zorder=5, edgecolor="k")
    lm = r["light"]["kept_macs"]
    ax.scatter([lm], [r["light"]["top1"]], marker="s", color="k", label="light alone", zorder=6)
    ax.scatter([1.0], [r["heavy"]["top1"]], marker="D", color="k", label="heavy alone", zorder=6)
    ax.axhline(r["heavy"]["top1"], color="gray", ls=":", lw=1)
    ax.set_xlabel("overall cost (light MACs + usage x heavy MACs) / heavy MACs")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"digits {r['arch']}: light = {r['light']['method']} at {100 * lm:.0f}% MACs, "
                 f"{r['light']['finetune_epochs']} fine-tuning epochs\nstar = cheapest threshold "
                 "matching the heavy expert's top-1", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
