"""Allocation: turn importance scores into a :class:`~pyengine.spec.Spec` at a MAC target.

    spec = allocate(scores, geometry, target=0.5, mode="global", granularity="dim",
                    min_heads=1, round_to=1, model="vit_tiny_patch16_224")

``target`` is the kept fraction of the dense model's total MACs (``cost_model.total_macs``,
patch embedding and classifier included); the result is at or under it.

Granularity (what is removed):

* ``"dim"``:   q/k dims and v dims of each head, FFN neurons. A head whose last v dim goes is
  dropped (its q/k dims with it); a kept head keeps at least one q/k chunk.
* ``"head"``:  whole heads and FFN neurons.
* ``"block"``: whole attention and FFN branches (global mode only).

Modes:

* ``"global"``: scores are normalized per structure type (divided by that type's mean over all
  layers, so q/k dims, v dims, heads and neurons compare), then the lowest-scored chunks are
  removed across all layers until the MACs reach the target.
* ``"uniform"``: every layer keeps the same fraction of each type (the highest-scored ones);
  the fraction is the largest one at or under the target (bisection).

``round_to=r`` keeps counts (q/k and v dims per head, neurons per layer) at multiples of r:
units are removed in chunks of r, lowest-scored first (the first chunk of a group takes the
remainder when the count is not a multiple of r). ``min_heads`` heads per layer always stay
(0 lets a layer lose its whole attention branch).
"""
from __future__ import annotations

import heapq
import math
from typing import Sequence

import torch

from pyengine.cost import model as cost_model
from pyengine.methods.criteria import BlockScores
from pyengine.structure.spec import Block, Geometry, Head, Spec

MODES = ("global", "uniform")
GRANULARITIES = ("dim", "head", "block")

__all__ = ["allocate", "allocate_cnn", "MODES", "GRANULARITIES", "CNN_GRANULARITIES"]
CNN_GRANULARITIES = ("channel", "block")


class _Layer:
    """Mutable kept sets of one block, and its exact MACs."""

    def __init__(self, g: Geometry):
        self.g = g
        self.qk = [list(range(g.head_dim)) for _ in range(g.num_heads)]
        self.v = [list(range(g.head_dim)) for _ in range(g.num_heads)]
        self.neurons = list(range(g.mlp_hidden))

    def heads(self) -> list[int]:
        return [h for h in range(self.g.num_heads) if self.v[h]]

    def macs(self) -> int:
        hs = self.heads()
        return cost_model.block_macs(self.g, [len(self.qk[h]) for h in hs],
                                     [len(self.v[h]) for h in hs], len(self.neurons))

    def block(self) -> Block:
        return Block(tuple(Head(h, tuple(sorted(self.qk[h])), tuple(sorted(self.v[h])))
                           for h in self.heads()), tuple(sorted(self.neurons)))


def _check_target_mode_rounding(target, mode, round_to) -> None:
    if not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ValueError(f"target must be the kept fraction of dense MACs in (0, 1], got {target!r}")
    if mode not in MODES:
        raise ValueError(f"unknown allocation mode {mode!r}; choose one of {', '.join(MODES)}")
    if not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")


def _check_args(scores, g, target, mode, granularity, min_heads, round_to):
    if not isinstance(g, Geometry):
        raise TypeError(f"allocate needs the dense Geometry, got {type(g).__name__}")
    if len(scores) != g.depth:
        raise ValueError(f"{len(scores)} block scores for a model of depth {g.depth}")
    _check_target_mode_rounding(target, mode, round_to)
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of "
                         f"{', '.join(GRANULARITIES)}")
    if not isinstance(min_heads, int) or not 0 <= min_heads <= g.num_heads:
        raise ValueError(f"min_heads must be an integer in [0, {g.num_heads}], got {min_heads!r}")
    for i, s in enumerate(scores):
        if tuple(s.qk.shape) != (g.num_heads, g.head_dim) or tuple(s.neuron.shape) != (g.mlp_hidden,):
            raise ValueError(f"scores of block {i} have shapes qk {tuple(s.qk.shape)}, neuron "
                             f"{tuple(s.neuron.shape)}; the model has ({g.num_heads}, "
                             f"{g.head_dim}) and ({g.mlp_hidden},)")


def _fixed_macs(g: Geometry, model: str | None) -> int:
    full = Spec.full(g, model)
    return cost_model.total_macs(full) - sum(
        cost_model.block_macs(g, b.qk_dims, b.v_dims, len(b.mlp)) for b in full.blocks)


def _order(values: torch.Tensor) -> list[int]:
    """Indices ascending by score (ties by index), deterministic."""
    v = values.double().tolist()
    return sorted(range(len(v)), key=lambda i: (v[i], i))


def _chunks(order: list[int], r: int) -> list[list[int]]:
    first = len(order) % r or r
    out = [order[:first]]
    out += [order[i:i + r] for i in range(first, len(order), r)]
    return [c for c in out if c]


def _spec(layers: list[_Layer], g: Geometry, model, meta) -> Spec:
    return Spec(tuple(l.block() for l in layers), model=model, dense=g, meta=meta)


def allocate(scores: Sequence[BlockScores], g: Geometry, target: float, mode: str = "global",
             granularity: str = "dim", min_heads: int = 1, round_to: int = 1,
             model: str | None = None, meta: dict | None = None, min_dims: int = 1,
             min_neurons: int = 0) -> Spec:
    """A Spec keeping at most ``target`` of the dense MACs, chosen by ``scores`` (higher =
    keep). See the module docstring for ``mode``, ``granularity``, ``min_heads``, ``round_to``;
    a ResNet's :class:`~pyengine.spec.CnnGeometry` dispatches to :func:`allocate_cnn`;
    ``min_dims`` q/k and v dims stay in every kept head, ``min_neurons`` in every FFN (0 lets a
    whole FFN go)."""
    from pyengine.structure.spec import CnnGeometry
    if isinstance(g, CnnGeometry):
        return allocate_cnn(scores, g, target, mode=mode,
                            granularity="channel" if granularity == "dim" else granularity,
                            round_to=round_to, model=model, meta=meta)
    _check_args(scores, g, target, mode, granularity, min_heads, round_to)
    for name, v, hi in (("min_dims", min_dims, g.head_dim), ("min_neurons", min_neurons,
                                                             g.mlp_hidden)):
        if not isinstance(v, int) or not 0 <= v <= hi:
            raise ValueError(f"{name} must be an integer in [0, {hi}], got {v!r}")
    min_dims = max(1, min_dims)
    fixed = _fixed_macs(g, model)
    dense = cost_model.total_macs(Spec.full(g, model))
    budget = target * dense
    meta = {**(meta or {}), "allocation": mode, "granularity": granularity, "target": target,
            "min_heads": min_heads, "round_to": round_to, "min_dims": min_dims,
            "min_neurons": min_neurons}
    if mode == "uniform":
        layers = _uniform(scores, g, fixed, budget, granularity, min_heads, round_to, min_dims,
                          min_neurons)
    else:
        layers = _global(scores, g, fixed, budget, granularity, min_heads, round_to, min_dims,
                         min_neurons)
    s = _spec(layers, g, model, meta)
    total = cost_model.total_macs(s)
    if total > budget + 1e-6:
        raise AssertionError(f"allocation bug: {total} MACs over the budget {budget}")
    return Spec(s.blocks, model=model, dense=g, meta={**meta, "macs": total, "dense_macs": dense,
                                                      "kept_macs": total / dense})


# ---- global ranking ------------------------------------------------------------------------
def _global(scores, g, fixed, budget, granularity, min_heads, r, min_dims, min_neurons
            ) -> list[_Layer]:
    L = len(scores)
    layers = [_Layer(g) for _ in range(L)]
    # normalize per structure type over all layers, so types with different scales compare
    def norm(vals: list[torch.Tensor]) -> list[torch.Tensor]:
        mean = torch.cat([v.double().flatten() for v in vals]).abs().mean()
        return [v.double() / mean if mean > 0 else v.double() for v in vals]

    heap: list = []  # (mean normalized score, tiebreak, kind, layer, head, members)
    tie = 0

    def push(score_val, kind, layer, head, members):
        nonlocal tie
        heap.append((score_val, tie, kind, layer, head, members))
        tie += 1

    if granularity == "dim":
        qk = norm([s.qk for s in scores])
        vv = norm([s.v for s in scores])
        for l in range(L):
            for h in range(g.num_heads):
                for kind, t in (("qk", qk[l][h]), ("v", vv[l][h])):
                    for c in _chunks(_order(t), r):
                        push(float(t[c].mean()), kind, l, h, c)
    elif granularity == "head":
        hd = norm([s.head for s in scores])
        for l in range(L):
            for h in _order(hd[l]):
                push(float(hd[l][h]), "head", l, h, None)
    if granularity in ("dim", "head"):
        nn_ = norm([s.neuron for s in scores])
        for l in range(L):
            for c in _chunks(_order(nn_[l]), r):
                push(float(nn_[l][c].mean()), "neuron", l, None, c)
    else:  # block
        at = norm([torch.tensor([s.attn]) for s in scores])
        ml = norm([torch.tensor([s.mlp]) for s in scores])
        for l in range(L):
            push(float(at[l]), "attn", l, None, None)
            push(float(ml[l]), "mlp", l, None, None)
    heapq.heapify(heap)

    block = [l.macs() for l in layers]
    total = fixed + sum(block)
    while total > budget:
        if not heap:
            raise ValueError(_infeasible(budget, fixed + sum(block), min_heads))
        _, _, kind, l, h, members = heapq.heappop(heap)
        lay = layers[l]
        if kind == "qk":
            if not lay.v[h]:
                continue  # head already dropped
            rest = [d for d in lay.qk[h] if d not in members]
            if len(rest) < min_dims:
                continue  # a kept head keeps at least min_dims (one chunk at least)
            lay.qk[h] = rest
        elif kind == "v":
            rest = [d for d in lay.v[h] if d not in members]
            if len(rest) < min_dims:
                # the head goes whole (its remaining v and q/k dims), if min_heads allows
                if len(lay.heads()) - 1 < min_heads:
                    continue
                lay.qk[h], rest = [], []
            lay.v[h] = rest
        elif kind == "head":
            if len(lay.heads()) - 1 < min_heads:
                continue
            lay.qk[h], lay.v[h] = [], []
        elif kind == "neuron":
            rest = [j for j in lay.neurons if j not in members]
            if 0 < len(rest) < min_neurons or (not rest and min_neurons > 0):
                continue
            lay.neurons = rest
        elif kind == "attn":
            if min_heads > 0:
                continue
            lay.qk = [[] for _ in lay.qk]
            lay.v = [[] for _ in lay.v]
        else:  # mlp
            if min_neurons > 0:
                continue
            lay.neurons = []
        total -= block[l]
        block[l] = lay.macs()
        total += block[l]
    return layers


def _infeasible(budget, reached, min_heads) -> str:
    return (f"cannot reach the MAC target: the smallest structure this allocation allows costs "
            f"{reached:.0f} MACs > budget {budget:.0f} (min_heads={min_heads}; lower min_heads, "
            f"use granularity 'dim', or raise the target)")


# ---- per-layer uniform -----------------------------------------------------------------------
def _keep(count: int, p: float, r: int, least: int) -> int:
    k = math.ceil(p * count / r - 1e-9) * r
    return min(count, max(least, k))


def _uniform(scores, g, fixed, budget, granularity, min_heads, r, min_dims, min_neurons
             ) -> list[_Layer]:
    if granularity == "block":
        raise ValueError("uniform allocation keeps a fraction of every layer; use granularity "
                         "'dim' or 'head' (whole blocks need mode 'global')")
    orders = []
    for s in scores:
        orders.append(dict(
            qk=[_order(s.qk[h])[::-1] for h in range(g.num_heads)],  # best first
            v=[_order(s.v[h])[::-1] for h in range(g.num_heads)],
            head=_order(s.head)[::-1], neuron=_order(s.neuron)[::-1]))

    def build(p: float) -> list[_Layer]:
        layers = []
        for o in orders:
            lay = _Layer(g)
            if granularity == "dim":
                kd = _keep(g.head_dim, p, r, max(min(r, g.head_dim), min_dims))
                lay.qk = [sorted(o["qk"][h][:kd]) for h in range(g.num_heads)]
                lay.v = [sorted(o["v"][h][:kd]) for h in range(g.num_heads)]
            else:
                kh = _keep(g.num_heads, p, 1, min_heads)
                keep = set(o["head"][:kh])
                lay.qk = [lay.qk[h] if h in keep else [] for h in range(g.num_heads)]
                lay.v = [lay.v[h] if h in keep else [] for h in range(g.num_heads)]
            lay.neurons = sorted(o["neuron"][:_keep(g.mlp_hidden, p, r, min_neurons)])
            layers.append(lay)
        return layers

    def macs(layers):
        return fixed + sum(l.macs() for l in layers)

    lo_layers = build(0.0)
    if macs(lo_layers) > budget:
        raise ValueError(_infeasible(budget, macs(lo_layers), min_heads))
    lo, hi = 0.0, 1.0
    if macs(build(1.0)) <= budget:
        return build(1.0)
    for _ in range(40):
        mid = (lo + hi) / 2
        if macs(build(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return build(lo)


# ---- ResNets ---------------------------------------------------------------------------------
def _cnn_coefficients(g, model):
    """MACs outside the residual branches, and per block the dense MACs of each branch conv
    (a branch conv's MACs scale with its kept input and output channels)."""
    from pyengine.cost.model import cost
    from pyengine.structure.spec import CnnSpec
    c = cost(CnnSpec.full(g, model))
    convs = {"basic": ("conv1", "conv2"), "bottleneck": ("conv1", "conv2", "conv3")}[g.block]
    names, i = [], 0
    for si, n in enumerate(g.layers):
        for b in range(n):
            names.append(f"layer{si + 1}.{b}")
            i += 1
    coef = [{cv: c.layer(f"{nm}.{cv}").macs for cv in convs} for nm in names]
    fixed = c.macs - sum(sum(d.values()) for d in coef)
    return fixed, coef, c.macs


def _branch_macs(g, coef: dict, inner: tuple[int, ...], kept: list[int] | None) -> float:
    if kept is None:
        return 0.0
    if g.block == "basic":
        return (coef["conv1"] + coef["conv2"]) * kept[0] / inner[0]
    k1, k2 = kept
    return (coef["conv1"] * k1 / inner[0] + coef["conv2"] * k1 * k2 / (inner[0] * inner[1])
            + coef["conv3"] * k2 / inner[1])


def allocate_cnn(scores, g, target: float, mode: str = "global", granularity: str = "channel",
                 round_to: int = 1, model: str | None = None, meta: dict | None = None):
    """A :class:`~pyengine.spec.CnnSpec` keeping at most ``target`` of the dense MACs.

    ``granularity="channel"``: inner conv channels (a kept block keeps at least one chunk of
    each slot); ``"block"``: whole residual branches (global mode only). Global mode normalizes
    channel scores per slot type (conv1, conv2) over all blocks, uniform keeps the same
    fraction of every slot."""
    from pyengine.structure.spec import CnnSpec, make_conv_block
    _check_target_mode_rounding(target, mode, round_to)
    if granularity not in CNN_GRANULARITIES:
        raise ValueError(f"unknown ResNet granularity {granularity!r}; choose one of "
                         f"{', '.join(CNN_GRANULARITIES)}")
    if not model:
        raise ValueError("allocate_cnn needs model= (the timm name, e.g. 'resnet18'): the CNN "
                         "cost model rebuilds the network to count its MACs")
    nblk = sum(g.layers)
    if len(scores) != nblk:
        raise ValueError(f"{len(scores)} block scores for a ResNet of {nblk} residual blocks")
    slots = g.slots
    for i, s in enumerate(scores):
        for sl, c in zip(slots, g.inner[i]):
            if sl not in s.channels or tuple(s.channels[sl].shape) != (c,):
                raise ValueError(f"scores of block {i} slot {sl!r} do not have shape ({c},)")
    fixed, coef, dense = _cnn_coefficients(g, model)
    budget = target * dense
    kept: list[list[list[int]] | None] = [[list(range(c)) for c in g.inner[i]] for i in range(nblk)]

    def branch(i):
        k = kept[i]
        return _branch_macs(g, coef[i], g.inner[i], None if k is None else [len(x) for x in k])

    def total():
        return fixed + sum(branch(i) for i in range(nblk))

    r = round_to
    if mode == "uniform":
        if granularity == "block":
            raise ValueError("uniform allocation keeps a fraction of every block; use "
                             "granularity 'channel' (whole blocks need mode 'global')")
        best = [[_order(s.channels[sl])[::-1] for sl in slots] for s in scores]

        def build(p):
            return [[sorted(best[i][j][:_keep(c, p, r, min(r, c))]) for j, c in enumerate(g.inner[i])]
                    for i in range(nblk)]
        kept = build(0.0)
        if total() > budget:
            raise ValueError(_infeasible(budget, total(), 0))
        lo, hi = 0.0, 1.0
        kept = build(1.0)
        if total() > budget:
            for _ in range(40):
                mid = (lo + hi) / 2
                kept = build(mid)
                if total() <= budget:
                    lo = mid
                else:
                    hi = mid
            kept = build(lo)
    else:
        heap = []
        if granularity == "channel":
            for j, sl in enumerate(slots):
                vals = [s.channels[sl].double() for s in scores]
                mean = torch.cat(vals).abs().mean()
                for i, v in enumerate(vals):
                    v = v / mean if mean > 0 else v
                    for c in _chunks(_order(v), r):
                        heap.append((float(v[c].mean()), len(heap), i, j, c))
        else:
            vals = torch.tensor([s.block for s in scores], dtype=torch.float64)
            mean = vals.abs().mean()
            for i in range(nblk):
                heap.append((float(vals[i] / mean if mean > 0 else vals[i]), len(heap), i, None, None))
        heapq.heapify(heap)
        cur = total()
        while cur > budget:
            if not heap:
                raise ValueError(_infeasible(budget, cur, 0))
            _, _, i, j, members = heapq.heappop(heap)
            if kept[i] is None:
                continue
            before = branch(i)
            if j is None:
                kept[i] = None
            else:
                rest = [c for c in kept[i][j] if c not in members]
                if not rest:
                    continue  # a kept block keeps at least one chunk per slot
                kept[i][j] = rest
            cur += branch(i) - before
    stages, it = [], iter(range(nblk))
    for n in g.layers:
        st = []
        for _ in range(n):
            i = next(it)
            st.append(make_conv_block(False) if kept[i] is None else
                      make_conv_block(True, **{sl: kept[i][j] for j, sl in enumerate(slots)}))
        stages.append(tuple(st))
    meta = {**(meta or {}), "allocation": mode, "granularity": granularity, "target": target,
            "round_to": round_to}
    spec = CnnSpec(tuple(stages), model=model, dense=g, meta=meta)
    from pyengine.cost.model import cost
    macs = cost(spec).macs
    if macs > budget * (1 + 1e-9):
        raise AssertionError(f"allocation bug: {macs} MACs over the budget {budget}")
    return CnnSpec(spec.stages, model=model, dense=g,
                   meta={**meta, "macs": macs, "dense_macs": dense, "kept_macs": macs / dense})
