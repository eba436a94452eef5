"""``pyengine limit``: predicted (Hessian spectrum, Gaussian width) vs measured (one-shot global
magnitude pruning) pruning limit of a model on a dataset; JSON + plot."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pyengine.io.atomic import save_figure, write_json

HELP = "predicted vs measured pruning limit (Hessian spectrum by SLQ vs one-shot pruning)"
DESCRIPTION = (
    "Train (optionally with an L1 penalty) or load a model, estimate its Hessian spectrum by "
    "stochastic Lanczos quadrature, predict the largest one-shot global magnitude pruning "
    "ratio from the statistical dimension (Zhang et al., NeurIPS 2024), and measure the real "
    "one by pruning at many ratios. Prints both thresholds; writes JSON and a plot.")

BUILTIN = ("digits_mlp", "digits_vit_small", "digits_vit")
DEFAULT_IMG = {"digits_mlp": 8, "digits_vit_small": 16, "digits_vit": 32}
DEFAULT_EPOCHS = {"digits_mlp": 60, "digits_vit_small": 40, "digits_vit": 20}


def add_arguments(p) -> None:
    p.add_argument("--model", required=True,
                   help=f"{', '.join(BUILTIN)}, a pyengine.save directory or a timm model name")
    p.add_argument("--data", default="digits", help="'digits' or an ImageNet-layout folder")
    p.add_argument("--img-size", type=int, default=None, help="input size (default per model)")
    p.add_argument("--batch-size", type=int, default=128,
                   help="batch size for training and for the per-batch loss spread (eps)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs before the analysis (default: per built-in model; 0 "
                        "for a saved directory)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--l1", type=float, default=0.0,
                   help="L1 penalty on the conv/linear weights during training (the paper's "
                        "setting; 0 = plain training)")
    p.add_argument("--iters", type=int, default=64, help="Lanczos steps per probe")
    p.add_argument("--probes", type=int, default=2, help="SLQ probe vectors")
    p.add_argument("--hessian-samples", type=int, default=1024,
                   help="training samples the Hessian is taken over (0 = all)")
    p.add_argument("--flat-rows", type=int, default=100,
                   help="Hessian rows checked for flat directions (0 = no correction)")
    p.add_argument("--flat-tol", type=float, default=1e-7, help="row L1 norm counted as flat")
    p.add_argument("--steps", type=int, default=100,
                   help="pruning ratios 0, 1/steps, ..., (steps-1)/steps")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="accuracy points below the unpruned model still counted as matching")
    p.add_argument("--structured", action="store_true",
                   help="also the structured extension (heads + FFN neurons, or MLP neurons)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                   help="precision of the analysis (training is always float32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="limit-out", help="output directory")
    p.add_argument("--name", default=None, help="file stem (default limit_<model>)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_model(name: str, num_classes: int, img_size: int):
    """(model, fresh): a built-in or timm model to train here, or a saved one as it is."""
    from pyengine.experiments.limit import digits_mlp
    from pyengine.models import load_model
    if name == "digits_mlp":  # not a timm model: a plain MLP
        return digits_mlp(img_size, num_classes=num_classes), True
    if Path(name).is_dir():
        return load_model(name), False
    if Path(name).exists():
        raise ValueError(f"--model {name!r} is a file; expected a pyengine.save directory")
    return load_model(name, num_classes=num_classes, img_size=img_size), True


def default_img_size(name: str) -> int:
    """Built-ins have their own; a saved model is analysed at the size it was built for."""
    if name in DEFAULT_IMG:
        return DEFAULT_IMG[name]
    if Path(name).is_dir():
        from pyengine.models import load_model
        model = load_model(name)
        pe = getattr(model, "patch_embed", None)
        if pe is not None:
            return int(pe.img_size[0])
        dense = getattr(getattr(model, "pyengine_spec", None), "dense", None)
        if getattr(dense, "img_size", 0):
            return int(dense.img_size)
    return 32


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from pyengine.experiments.limit.slq import Spectrum
    sp = result["spectrum"]
    spec = Spectrum([np.asarray(n) for n in sp["nodes"]], [np.asarray(w) for w in sp["weights"]],
                    sp["dim"], sp["iters"])
    x, _ = spec.flat()
    lo, hi = float(x.min()), float(x.max())
    pad = 0.05 * max(hi - lo, 1e-12)
    grid = np.linspace(lo - pad, hi + pad, 2000)
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.4))
    ax[0].semilogy(grid, spec.density(grid) + 1e-7)
    ax[0].set_xlabel("Hessian eigenvalue")
    ax[0].set_ylabel("density (SLQ, Gaussian-smoothed)")
    ax[0].set_title(f"spectrum: {sp['dim']} weights, {sp['iters']} steps x {spec.probes} probes")
    m, pr = result["measured"], result["predicted"]
    ax[1].plot(m["ratios"], m["accuracy"], label="unstructured (global magnitude)", c="C0")
    ax[1].axhline(m["base"] - m["tolerance"], c="gray", lw=0.8, ls=":")
    ax[1].axvline(m["threshold"], c="C0", ls="--", label=f"measured {m['threshold']:.2f}")
    ax[1].axvline(pr["ratio"], c="C3", ls="-.", label=f"predicted {pr['ratio']:.2f}")
    st = result.get("structured")
    if st:
        ax[1].plot(st["measured"]["ratios"], st["measured"]["accuracy"], c="C2",
                   label="structured (extension)")
        ax[1].axvline(st["measured"]["threshold"], c="C2", ls="--",
                      label=f"structured measured {st['measured']['threshold']:.2f}")
        ax[1].axvline(st["predicted"]["ratio"], c="C2", ls="-.",
                      label=f"structured predicted {st['predicted']['ratio']:.2f}")
    ax[1].set_xlabel("pruning ratio")
    ax[1].set_ylabel("val top-1 (%)")
    ax[1].set_title(f"{result['model']}: accuracy vs ratio")
    ax[1].legend(fontsize=7, loc="lower left")
    ax[2].plot(pr["ratios"], pr["gw"], c="C3", label="gw(R(rho)) with flat corr.")
    ax[2].plot(pr["ratios"], pr["gw_uncorrected"], c="C3", ls=":", label="gw(R(rho)) uncorrected")
    if st:
        ax[2].plot(st["predicted"]["ratios"], st["predicted"]["gw"], c="C2",
                   label="gw, structured R")
    ax[2].plot([0, 1], [0, 1], c="k", lw=0.8, label="rho")
    ax[2].set_xlabel("pruning ratio rho")
    ax[2].set_ylabel("normalised squared Gaussian width")
    ax[2].set_title(f"eps = {pr['eps']:.3g}, flat fraction = {pr['flat']:.2f}")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    import numpy as np
    import torch

    import pyengine
    from pyengine.train.data import loaders
    from pyengine.experiments.limit import (HessianOperator, cache_batches, flat_fraction, loss_spread, measure,
                         measure_structured, predict, prunable_parameters, slq)
    from pyengine.measure.timing import environment
    from pyengine.train.trainer import evaluate, fit

    for name in ("iters", "probes", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.hessian_samples < 0 or args.flat_rows < 0 or args.l1 < 0 or args.tolerance < 0:
        raise ValueError("--hessian-samples, --flat-rows, --l1 and --tolerance must be >= 0")
    torch.manual_seed(args.seed)
    progress = not args.quiet
    t0 = time.time()
    img = args.img_size or default_img_size(args.model)
    train, val, ncls = loaders(args.data, img, args.batch_size, seed=args.seed)
    model, fresh = build_model(args.model, ncls, img)
    if args.structured:
        from pyengine.experiments.limit.measured import structured_units
        structured_units(model)  # fail now, not after the expensive part
    dtype = getattr(torch, args.dtype)
    dev = torch.device(args.device)
    model = model.to(dev)
    epochs = args.epochs if args.epochs is not None else (
        DEFAULT_EPOCHS.get(args.model, 20) if fresh else 0)

    def cast(loader):  # float64 analysis needs float64 inputs
        return [(x.to(dtype), y) for x, y in loader] if dtype != torch.float32 else loader

    timings = {}
    history = []
    weights = [p for _, p in prunable_parameters(model)]
    if epochs > 0:
        extra = None
        if args.l1 > 0:
            def extra(m, out, x, y, *_, _w=weights, _l=args.l1):
                return _l * sum(p.abs().sum() for p in _w)
        t = time.time()
        history = fit(model, train, val, epochs=epochs, lr=args.lr, device=dev,
                      weight_decay=args.weight_decay, extra_loss=extra, progress=progress)
        timings["train_s"] = time.time() - t
    model = model.to(dtype).eval()
    weights = [p for _, p in prunable_parameters(model)]
    base = evaluate(model, cast(val), dev)
    loss_mean, eps, per_batch = loss_spread(model, train, dev)
    print(f"model {args.model}: {sum(p.numel() for p in weights)} prunable weights, val top-1 "
          f"{base:.2f}%, train loss {loss_mean:.4f} +- {eps:.4f} over {len(per_batch)} batches")

    batches = cache_batches(train, args.hessian_samples or None, device=dev, dtype=dtype)
    op = HessianOperator(model, batches, weights)
    t = time.time()
    spectrum = slq(op, iters=args.iters, probes=args.probes, seed=args.seed, progress=progress)
    timings["slq_s"] = time.time() - t
    flat, rows = 0.0, []
    if args.flat_rows:
        t = time.time()
        flat, rows = flat_fraction(op, weights, args.flat_rows, args.flat_tol, progress)
        timings["flat_rows_s"] = time.time() - t
    ratios = [i / args.steps for i in range(args.steps)]
    pred = predict(spectrum, weights, eps, ratios, flat)
    t = time.time()
    meas = measure(model, cast(val), ratios, args.tolerance, weights, device=dev,
                   progress=progress)
    timings["measure_s"] = time.time() - t
    nodes, w = spectrum.flat()
    result = {
        "format": "pyengine.limit/1", "model": args.model, "data": args.data, "img_size": img,
        "argv": sys.argv, "args": {k: v for k, v in vars(args).items() if k != "func"},
        "prunable_weights": op.dim, "epochs": epochs, "history": history, "base_top1": base,
        "loss": {"mean": loss_mean, "eps_std": eps, "per_batch": per_batch,
                 "batch_size": args.batch_size},
        "hessian": {"samples": op.samples, "hvp_calls": op.calls, "dtype": args.dtype},
        "spectrum": {**spectrum.to_dict(), "moments": [spectrum.moment(k) for k in (1, 2)],
                     "abs_mean": spectrum.moment(1, absolute=True), "min": float(nodes.min()),
                     "max": float(nodes.max()), "negative_mass": float(w[nodes < 0].sum())},
        "flat": {"fraction": flat, "tol": args.flat_tol, "rows": rows},
        "predicted": pred.to_dict(), "measured": meas.to_dict(),
        "gap": pred.ratio - meas.threshold,
        "env": environment(dev),
    }
    if args.structured:
        t = time.time()
        sm = measure_structured(model, cast(val), ratios, args.tolerance, device=dev,
                                progress=progress)
        sp = predict(spectrum, weights, eps, ratios, flat, R=sm.R)
        result["structured"] = {"measured": sm.to_dict(), "predicted": sp.to_dict(),
                                "gap": sp.ratio - sm.threshold,
                                "note": "extension: the theory is for unstructured sparsity; "
                                        "R is the norm of the removed units' weights"}
        timings["structured_s"] = time.time() - t
    timings["total_s"] = time.time() - t0
    result["timings"] = timings

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"limit_{Path(args.model).name}"
    write_json(result, out / f"{stem}.json", indent=1)
    if not args.no_plot:
        plot(result, out / f"{stem}.png")
    print(f"spectrum: {op.dim} dims, {args.iters} Lanczos steps x {args.probes} probes, "
          f"eigenvalues in [{nodes.min():.4g}, {nodes.max():.4g}], negative mass "
          f"{result['spectrum']['negative_mass']:.3f}; eps {eps:.4g}; flat fraction {flat:.2f}")
    print(f"predicted threshold: {pred.ratio:.2f} (without flat correction "
          f"{pred.ratio_uncorrected:.2f})")
    print(f"measured threshold:  {meas.threshold:.2f} (largest ratio with val top-1 >= "
          f"{meas.base:.2f} - {args.tolerance:g})")
    print(f"gap (predicted - measured): {pred.ratio - meas.threshold:+.2f}")
    if args.structured:
        s = result["structured"]
        print(f"structured (extension): predicted {s['predicted']['ratio']:.2f}, measured "
              f"{s['measured']['threshold']:.2f}")
    print(f"wrote {out / (stem + '.json')}" + ("" if args.no_plot else f" and {stem}.png"))
    return 0
