"""One-shot pruning by an importance criterion: the ``pyengine prune`` plug-in of
agf / taylor / wanda / ria / magnitude / random.

    pyengine prune --model digits_vit --method agf --target 0.5 --calib-batches 8 \\
        --allocation global --granularity dim --out runs/agf50

``prune_structure`` gates the dense model, calibrates on ``--calib-batches`` training batches
(forward + backward hooks), scores every structure by the criterion, allocates a structure
at the MAC target (:mod:`pyengine.allocate`) and fixes it in the gates. Fine-tuning, if any,
is done by ``pyengine prune`` on the compact model.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from pyengine.structure.allocate import GRANULARITIES, MODES, allocate
from pyengine.methods.criteria import CRITERIA, calibrate, score

__all__ = ["add_arguments", "prune_structure", "one_shot"]

# criteria that read no data
_DATA_FREE = ("magnitude", "random")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("one-shot criteria (agf, taylor, wanda, ria, magnitude, random)")
    g.add_argument("--calib-batches", type=int, default=8,
                   help="training batches of forward/backward calibration (default 8)")
    g.add_argument("--allocation", default="global", choices=MODES,
                   help="global ranking (normalized per structure type) or per-layer uniform")
    g.add_argument("--granularity", default="dim", choices=GRANULARITIES,
                   help="what is removed: q/k + v dims and neurons (dim), whole heads and "
                        "neurons (head), whole attention/FFN branches (block)")


def one_shot(model: nn.Module, criterion: str, target: float, calib=None, *, loader=None,
             calib_batches: int = 8, allocation: str = "global", granularity: str = "dim",
             min_heads: int = 1, round_to: int = 1, min_dims: int = 1, min_neurons: int = 0,
             seed: int = 0, device="cpu"):
    """Gate ``model`` (in place, mask gates), score it by ``criterion`` and fix the structure
    allocated at ``target`` (kept fraction of dense MACs). Pass ``calib`` to reuse a
    calibration, or ``loader`` to run one. Returns ``(model, spec)``."""
    from pyengine import api
    from pyengine.experiments.sweep import _geometry as geometry
    from pyengine.models.vit.adapter import model_name

    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    api.gate(model, method="mask")
    if calib is None and criterion not in _DATA_FREE:
        if loader is None:
            raise ValueError(f"criterion {criterion!r} needs calibration data: pass loader= or "
                             "calib=")
        calib = calibrate(model, loader, batches=calib_batches, device=device)
    scores = score(model, criterion, calib, seed=seed)
    spec = allocate(scores, geometry(model), target, mode=allocation, granularity=granularity,
                    min_heads=min_heads, round_to=round_to, model=model_name(model),
                    min_dims=min_dims, min_neurons=min_neurons,
                    meta={"method": criterion, "seed": seed,
                          "calib_samples": calib.samples if calib is not None else 0})
    api.apply(model, spec)
    return model, spec


def prune_structure(model: nn.Module, teacher, train_loader, val_loader, args) -> nn.Module:
    """The plug-in contract of ``pyengine prune``: returns ``model`` gated with its one-shot
    structure fixed. ``teacher`` and ``val_loader`` are not used (one-shot, no training)."""
    from pyengine.models.resnet.blocks import is_resnet
    from pyengine.experiments.sweep import _geometry

    g = _geometry(model)
    frac = lambda name, n: int(round(float(getattr(args, name, 0.0) or 0.0) * n))  # noqa: E731
    if is_resnet(model):  # ResNets: channels per inner conv, no heads or FFN widths
        head_dim, hidden = 1, 1
    else:
        head_dim, hidden = g.head_dim, g.mlp_hidden
    was_training = model.training
    model, _ = one_shot(
        model, args.method, args.target, loader=train_loader,
        calib_batches=getattr(args, "calib_batches", 8),
        allocation=getattr(args, "allocation", "global"),
        granularity=getattr(args, "granularity", "dim"),
        min_heads=getattr(args, "min_heads", 1), round_to=getattr(args, "round_to", None) or 1,
        min_dims=max(1, frac("min_head_dims", head_dim)),
        min_neurons=frac("min_ffn", hidden), seed=getattr(args, "seed", 0),
        device=getattr(args, "device", None) or "cpu")
    model.train(was_training)
    return model
