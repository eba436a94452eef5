"""Accuracy vs compression for every one-shot criterion (the AGF paper's stress test).

    result = sweep(model, train_loader, val_loader, criteria, removed=(0, .25, .5, .75), seeds=3)

For each criterion, seed and fraction of MACs removed: calibrate on a seeded subset of the
training data, allocate a structure at the MAC target, apply it to a fresh gated copy of the
trained dense model and measure top-1 on the validation split (one-shot: no fine-tuning).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from pyengine.io.atomic import save_figure
from pyengine.models import geometry


# a half-width digits ViT over 8x8-pixel patches (17 tokens), pinned in full so it does not
# drift with zoo defaults: ~1/20 of digits_vit's MACs, for sweeps on a CPU shared by many jobs
VIT_LITE = dict(img_size=32, embed_dim=96, patch_size=8, depth=4, num_heads=3, num_classes=10,
                global_pool="avg")
ARCHS = ("vit", "vit_lite", "resnet")


def build_dense(arch: str) -> nn.Module:
    from pyengine.models import zoo
    if arch == "vit":
        return zoo.digits_vit()
    if arch == "vit_lite":
        return zoo.digits_vit(**VIT_LITE)
    if arch == "resnet":
        m = zoo.digits_resnet()
        m.pyengine_img_size = 32  # the cost model's input side (digits are 32x32)
        return m
    raise ValueError(f"unknown digits architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def trained_dense(arch: str, cache_dir="out/dense", seed: int = 0, progress: bool = True
                  ) -> tuple[nn.Module, dict]:
    """A dense digits model trained with ``pyengine.train.DIGITS_RECIPE`` (cached as
    safetensors in ``cache_dir``: the weights, with the recipe and history in its metadata)."""
    from pyengine.train import trainer as train
    from pyengine.train.cache import load_trained, save_trained
    if arch not in ARCHS:
        raise ValueError(f"unknown digits architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    path = Path(cache_dir) / f"digits_{arch}_seed{seed}.safetensors"
    model = build_dense(arch)
    meta = load_trained(model, path)
    if meta is not None:
        return model.eval(), meta
    recipe = {**train.DIGITS_RECIPE, "seed": seed}
    t0 = time.time()
    model, hist = train.train_digits(model, recipe, progress=progress)
    meta = {"arch": arch, "seed": seed, "recipe": recipe,
            "model_overrides": VIT_LITE if arch == "vit_lite" else {},
            "trainer": "pyengine.train.train_digits", "history": hist,
            "train_seconds": time.time() - t0}
    save_trained(model, path, meta)
    return model.eval(), meta


def _full_spec(model: nn.Module):
    from pyengine.models import adapter_for, model_name
    a = adapter_for(model)
    return a.full_spec(a.geometry(model), model_name(model))


def _macs(spec) -> int:
    from pyengine.cost import cost
    return int(cost(spec).macs)


def calib_loader(dataset, batch_size: int, seed: int):
    """A seeded shuffle of ``dataset``: calibration batches differ per seed."""
    from torch.utils.data import DataLoader
    return DataLoader(dataset, batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def sweep(model: nn.Module, calib_data, val_loader, criteria=None,
          removed=(0.0, 0.25, 0.5, 0.75), seeds=(0, 1, 2), calib_batches: int = 8,
          batch_size: int = 64, allocation: str = "global", granularity: str = "dim",
          min_heads: int = 1, round_to: int = 1, device="cpu", progress: bool = True,
          log=print) -> dict:
    """One-shot accuracy at every (criterion, seed, fraction of MACs removed). ``model`` is a
    trained dense model (left untouched: a gated copy is pruned); ``calib_data`` a dataset the
    calibration batches are drawn from (a seeded shuffle per seed). Returns rows + summary."""
    import copy

    from tqdm import tqdm

    from pyengine import api
    from pyengine.structure.solver import allocate
    from pyengine.methods.criteria import CRITERIA, calibrate, score
    from pyengine.train.trainer import evaluate

    criteria = tuple(criteria or CRITERIA)
    for c in criteria:
        if c not in CRITERIA:
            raise ValueError(f"unknown criterion {c!r}; choose from {', '.join(CRITERIA)}")
    for r in removed:
        if not 0.0 <= r < 1.0:
            raise ValueError(f"fractions of MACs removed must be in [0, 1), got {r!r}")
    net = copy.deepcopy(model).to(device).eval()
    api.gate(net, method="mask")
    full = _full_spec(net)
    g = geometry(net)
    dense_macs = _macs(full)
    api.apply(net, full)
    dense_top1 = evaluate(net, val_loader, device)
    log(f"dense top-1 {dense_top1:.2f}%  MACs {dense_macs / 1e6:.2f}M")
    rows = []
    jobs = len(seeds) * len(criteria) * sum(r > 0 for r in removed)
    bar = tqdm(total=jobs, desc="sweep", disable=not progress)
    t0 = time.time()
    for seed in seeds:
        api.apply(net, full)  # calibrate the dense model
        calib = calibrate(net, calib_loader(calib_data, batch_size, seed), calib_batches,
                          device=device)
        for crit in criteria:
            sc = score(net, crit, calib, seed=seed)
            for r in removed:
                if r == 0:
                    rows.append(dict(criterion=crit, seed=seed, removed=0.0, target=1.0,
                                     macs=dense_macs, kept_macs=1.0, top1=dense_top1))
                    continue
                spec = allocate(sc, g, 1.0 - r, mode=allocation, granularity=granularity,
                                min_heads=min_heads, round_to=round_to,
                                model=full.model)
                api.apply(net, spec)
                top1 = evaluate(net, val_loader, device)
                macs = _macs(spec)
                rows.append(dict(criterion=crit, seed=seed, removed=r, target=1.0 - r,
                                 macs=macs, kept_macs=macs / dense_macs, top1=top1,
                                 structure=_summary(spec)))
                bar.update(1)
                log(f"seed {seed} {crit:>9} removed {r:.2f}: top-1 {top1:6.2f}%  kept MACs "
                    f"{macs / dense_macs:.4f}")
    bar.close()
    api.apply(net, full)
    return {"dense_top1": dense_top1, "dense_macs": dense_macs, "geometry": _geom_dict(g),
            "rows": rows,
            "summary": summarize(rows), "settings": dict(
                criteria=list(criteria), removed=list(removed), seeds=list(seeds),
                calib_batches=calib_batches, calib_batch_size=batch_size,
                calib_samples_per_seed=calib.samples, allocation=allocation,
                granularity=granularity, min_heads=min_heads, round_to=round_to,
                val_images=len(val_loader.dataset), finetune=0),
            "sweep_seconds": time.time() - t0}


def _geom_dict(g) -> dict:
    return g.to_dict() if hasattr(g, "to_dict") else dict(g.__dict__)


def _summary(spec) -> dict:
    return spec.summary() if hasattr(spec, "summary") else {}


def summarize(rows: list[dict]) -> dict:
    """Mean / std / min / max top-1 over seeds per (criterion, removed), and at each fraction
    which criteria are below random's mean."""
    import statistics as st
    out: dict = {}
    for row in rows:
        out.setdefault(row["criterion"], {}).setdefault(f"{row['removed']:.2f}", []).append(row["top1"])
    summary = {c: {r: {"mean": st.mean(v), "std": st.pstdev(v) if len(v) > 1 else 0.0,
                       "min": min(v), "max": max(v), "n": len(v)}
                   for r, v in d.items()} for c, d in out.items()}
    below = {}
    if "random" in summary:
        for r, ref in summary["random"].items():
            below[r] = sorted(c for c in summary if c != "random" and r in summary[c]
                              and summary[c][r]["mean"] < ref["mean"])
    return {"top1": summary, "below_random": below}


def plot(results: dict, path, title: str = "") -> None:
    """Top-1 vs % MACs removed, one line per criterion (mean, min-max band over seeds);
    ``results`` maps a panel name (e.g. "vit") to a :func:`sweep` result."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(results)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, name in zip(axes[0], panels):
        s = results[name]["summary"]["top1"]
        for crit, d in s.items():
            xs = sorted(d, key=float)
            x = [100 * float(r) for r in xs]
            m = [d[r]["mean"] for r in xs]
            line, = ax.plot(x, m, marker="o", label=crit,
                            lw=2.2 if crit in ("agf", "random") else 1.4,
                            ls="--" if crit == "random" else "-")
            ax.fill_between(x, [d[r]["min"] for r in xs], [d[r]["max"] for r in xs], alpha=0.12,
                            color=line.get_color())
        ax.set_xlabel("MACs removed (%)")
        ax.set_ylabel("val top-1 (%), one-shot")
        ax.set_title(f"{name}: dense {results[name]['dense_top1']:.1f}%")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
