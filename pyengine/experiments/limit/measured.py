"""The measured pruning threshold: one-shot global magnitude pruning at many ratios, the
largest ratio whose accuracy still matches the unpruned model.

Unstructured (the paper): one magnitude threshold over all conv/linear weights. Structured
(our extension): the units of a Spec (attention heads, FFN neurons) of a timm ViT, or the
hidden neurons of an MLP, ranked globally by mean squared weight and removed lowest first;
the ratio is the fraction of unit weights removed.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pyengine.train.trainer import evaluate
from pyengine.experiments.limit.hessian import prunable_parameters
from pyengine.experiments.limit.threshold import count, magnitude_order, pruned_distance


@dataclass
class Curve:
    kind: str
    ratios: list[float]
    accuracy: list[float]
    base: float
    tolerance: float
    threshold: float
    R: list[float]
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def largest_matching(ratios: Sequence[float], accuracy: Sequence[float], base: float,
                     tolerance: float = 0.0) -> float:
    """The largest ratio whose accuracy is >= ``base - tolerance`` (0.0 if none is)."""
    ok = [r for r, a in zip(ratios, accuracy) if a >= base - tolerance - 1e-9]
    return float(max(ok)) if ok else 0.0


def contiguous_matching(ratios: Sequence[float], accuracy: Sequence[float], base: float,
                        tolerance: float = 0.0) -> float:
    """The largest ratio before the first one (in increasing order) that loses accuracy: a
    noise-robust companion of :func:`largest_matching`."""
    last = 0.0
    for r, a in sorted(zip(ratios, accuracy)):
        if a < base - tolerance - 1e-9:
            break
        last = r
    return float(last)


def _check_ratios(ratios: Sequence[float]) -> list[float]:
    ratios = [float(r) for r in ratios]
    if not ratios:
        raise ValueError("no pruning ratios given")
    bad = [r for r in ratios if not 0.0 <= r <= 1.0]
    if bad:
        raise ValueError(f"pruning ratios must be in [0, 1], got {bad}")
    return ratios


@torch.no_grad()
def measure(model: nn.Module, loader, ratios: Sequence[float], tolerance: float = 0.0,
            params: Sequence[torch.Tensor] | None = None, device: str | torch.device = "cpu",
            progress: bool = False) -> Curve:
    """Accuracy after one-shot global magnitude pruning at each ratio (weights restored)."""
    ratios = _check_ratios(ratios)
    params = list(params) if params is not None else [p for _, p in prunable_parameters(model)]
    order = magnitude_order(params)
    n = order.numel()
    saved = [p.detach().clone() for p in params]
    sizes = [p.numel() for p in params]
    base = evaluate(model, loader, device)
    acc = []
    try:
        for r in tqdm(ratios, desc="unstructured", disable=not progress, leave=False):
            flat = torch.cat([s.reshape(-1) for s in saved])
            flat[order[:count(r, n)]] = 0
            for p, c in zip(params, torch.split(flat, sizes)):
                p.copy_(c.view_as(p))
            acc.append(evaluate(model, loader, device))
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)
    return Curve("unstructured", ratios, acc, base, tolerance,
                 largest_matching(ratios, acc, base, tolerance),
                 pruned_distance(params, ratios).tolist(),
                 {"weights": n, "contiguous_threshold": contiguous_matching(ratios, acc, base, tolerance)})


# ---- structured: units ------------------------------------------------------------------

@dataclass
class Unit:
    kind: str      # "head" | "neuron"
    block: int     # transformer block (ViT) or hidden layer (MLP)
    index: int
    size: int      # weights it owns
    sqnorm: float  # sum of their squares

    @property
    def score(self) -> float:
        return self.sqnorm / self.size


def _vit_units(model: nn.Module) -> list[Unit]:
    units = []
    for b, blk in enumerate(model.blocks):
        attn, mlp = blk.attn, blk.mlp
        H, Dh = attn.num_heads, attn.head_dim
        qkv = attn.qkv.weight.detach().reshape(3, H, Dh, -1)
        proj = attn.proj.weight.detach().reshape(-1, H, Dh)
        for h in range(H):
            sq = float(qkv[:, h].double().pow(2).sum() + proj[:, h].double().pow(2).sum())
            units.append(Unit("head", b, h, qkv[:, h].numel() + proj[:, h].numel(), sq))
        fc1, fc2 = mlp.fc1.weight.detach().double(), mlp.fc2.weight.detach().double()
        sq = fc1.pow(2).sum(1) + fc2.pow(2).sum(0)
        for j in range(fc1.shape[0]):
            units.append(Unit("neuron", b, j, fc1.shape[1] + fc2.shape[0], float(sq[j])))
    return units


def _mlp_units(model: nn.Module) -> list[Unit]:
    units = []
    layers = model.layers
    for l in range(len(layers) - 1):
        w_in, w_out = layers[l].weight.detach().double(), layers[l + 1].weight.detach().double()
        sq = w_in.pow(2).sum(1) + w_out.pow(2).sum(0)
        for j in range(w_in.shape[0]):
            units.append(Unit("neuron", l, j, w_in.shape[1] + w_out.shape[0], float(sq[j])))
    return units


def structured_units(model: nn.Module) -> list[Unit]:
    """The structured units of ``model``: Spec units of a (dense or gated) timm ViT, or the
    hidden neurons of a :class:`DigitsMLP`."""
    from timm.models.vision_transformer import VisionTransformer

    from pyengine.experiments.limit.models import DigitsMLP
    if isinstance(model, VisionTransformer):
        from pyengine.api import is_compact
        if is_compact(model):
            raise ValueError("structured pruning limit needs the dense model, not a compact one")
        return _vit_units(model)
    if isinstance(model, DigitsMLP):
        return _mlp_units(model)
    raise ValueError(f"structured limit supports timm ViTs and DigitsMLP, not "
                     f"{type(model).__name__}")


def removal_order(units: Sequence[Unit]) -> list[int]:
    return sorted(range(len(units)), key=lambda i: (units[i].score, i))


def removed_prefix(units: Sequence[Unit], order: Sequence[int], ratio: float) -> int:
    """How many units (in ``order``) a ratio removes: the longest prefix whose weights are at
    most ``ratio`` of all unit weights."""
    sizes = np.cumsum([units[i].size for i in order])
    return int(np.searchsorted(sizes, ratio * sizes[-1] + 1e-9, side="right"))


def _vit_spec(model: nn.Module, units: Sequence[Unit], removed: set[int]):
    from pyengine.structure.spec import Block, Head, Spec
    from pyengine.models.vit.adapter import geometry
    from pyengine.models.factory import model_name
    g = geometry(model)
    dims = tuple(range(g.head_dim))
    heads = [[] for _ in range(g.depth)]
    mlp = [[] for _ in range(g.depth)]
    for i, u in enumerate(units):
        if i in removed:
            continue
        if u.kind == "head":
            heads[u.block].append(Head(u.index, dims, dims))
        else:
            mlp[u.block].append(u.index)
    blocks = tuple(Block(tuple(h), tuple(m)) for h, m in zip(heads, mlp))
    return Spec(blocks, model=model_name(model), dense=g)


@torch.no_grad()
def measure_structured(model: nn.Module, loader, ratios: Sequence[float],
                       tolerance: float = 0.0, device: str | torch.device = "cpu",
                       progress: bool = False) -> Curve:
    """Accuracy after removing the lowest-magnitude structured units at each ratio. A ViT is
    pruned through ``pyengine.gate(copy, "mask")`` + ``pyengine.apply(copy, spec)``, so what is
    measured is exactly what ``pyengine.compile`` would export."""
    from timm.models.vision_transformer import VisionTransformer
    ratios = _check_ratios(ratios)
    units = structured_units(model)
    order = removal_order(units)
    total = sum(u.size for u in units)
    base = evaluate(model, loader, device)
    acc, R, removed_units = [], [], []
    if isinstance(model, VisionTransformer):
        from pyengine.api import apply, gate, is_gated
        work = copy.deepcopy(model)
        if not is_gated(work):
            gate(work, "mask")
        for r in tqdm(ratios, desc="structured", disable=not progress, leave=False):
            k = removed_prefix(units, order, r)
            apply(work, _vit_spec(work, units, set(order[:k])))
            acc.append(evaluate(work, loader, device))
            R.append(float(np.sqrt(sum(units[i].sqnorm for i in order[:k]))))
            removed_units.append(k)
    else:
        layers = model.layers
        saved = [(l.weight.detach().clone(), l.bias.detach().clone()) for l in layers]
        try:
            for r in tqdm(ratios, desc="structured", disable=not progress, leave=False):
                k = removed_prefix(units, order, r)
                for l, (w, b) in zip(layers, saved):
                    l.weight.copy_(w)
                    l.bias.copy_(b)
                for i in order[:k]:
                    u = units[i]
                    layers[u.block].weight[u.index] = 0
                    layers[u.block].bias[u.index] = 0
                    layers[u.block + 1].weight[:, u.index] = 0
                acc.append(evaluate(model, loader, device))
                R.append(float(np.sqrt(sum(units[i].sqnorm for i in order[:k]))))
                removed_units.append(k)
        finally:
            for l, (w, b) in zip(layers, saved):
                l.weight.copy_(w)
                l.bias.copy_(b)
    removed_weights = [int(sum(units[i].size for i in order[:k])) for k in removed_units]
    return Curve("structured", ratios, acc, base, tolerance,
                 largest_matching(ratios, acc, base, tolerance), R,
                 {"contiguous_threshold": contiguous_matching(ratios, acc, base, tolerance),
                  "units": len(units), "unit_weights": total, "removed_units": removed_units,
                  "removed_fraction": [w / total for w in removed_weights],
                  "unit_kinds": sorted({u.kind for u in units})})
