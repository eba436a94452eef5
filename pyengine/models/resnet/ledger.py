"""The ResNet ledger of the structure solver (:mod:`pyengine.structure.solver`): the kept
channels of every inner conv of every residual block, the blocks kept, and their MACs.

Granularity: ``"channel"`` (inner conv channels; a kept block keeps at least one chunk of each
slot) or ``"block"`` (whole residual branches, global mode only). A branch conv's MACs scale
with its kept input and output channels, so the ledger costs a structure from each conv's
dense MACs (one cost-model pass over the dense spec) without rebuilding the network.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

from pyengine.structure.spec import CnnGeometry, CnnSpec, make_conv_block

GRANULARITIES = ("channel", "block")


def _coefficients(g: CnnGeometry, model: str):
    """MACs outside the residual branches, and per block the dense MACs of each branch conv."""
    from pyengine.cost import cost
    c = cost(CnnSpec.full(g, model))
    convs = {"basic": ("conv1", "conv2"), "bottleneck": ("conv1", "conv2", "conv3")}[g.block]
    names = [f"layer{si + 1}.{b}" for si, n in enumerate(g.layers) for b in range(n)]
    coef = [{cv: c.layer(f"{nm}.{cv}").macs for cv in convs} for nm in names]
    fixed = c.macs - sum(sum(d.values()) for d in coef)
    return fixed, coef, c.macs


class CnnLedger:
    granularities = GRANULARITIES
    min_heads = 0

    def __init__(self, g: CnnGeometry, model: str | None, **constraints):
        if not model:
            raise ValueError("allocating a ResNet needs model= (the timm name, e.g. "
                             "'resnet18'): the CNN cost model rebuilds the network to count its "
                             "MACs")
        self.g, self.model = g, model
        self.fixed, self.coef, self.dense = _coefficients(g, model)
        self.n = sum(g.layers)
        self.kept: list[list[list[int]] | None] = [[list(range(c)) for c in g.inner[i]]
                                                   for i in range(self.n)]

    def check_scores(self, scores: Sequence) -> None:
        if len(scores) != self.n:
            raise ValueError(f"{len(scores)} block scores for a ResNet of {self.n} residual "
                             "blocks")
        for i, s in enumerate(scores):
            for sl, c in zip(self.g.slots, self.g.inner[i]):
                if sl not in s.channels or tuple(s.channels[sl].shape) != (c,):
                    raise ValueError(f"scores of block {i} slot {sl!r} do not have shape ({c},)")

    def meta(self) -> dict:
        return {}

    # ---- costs
    def block_macs(self, i: int) -> float:
        k, g, coef, inner = self.kept[i], self.g, self.coef[i], self.g.inner[i]
        if k is None:
            return 0.0
        if g.block == "basic":
            return (coef["conv1"] + coef["conv2"]) * len(k[0]) / inner[0]
        k1, k2 = len(k[0]), len(k[1])
        return (coef["conv1"] * k1 / inner[0] + coef["conv2"] * k1 * k2 / (inner[0] * inner[1])
                + coef["conv3"] * k2 / inner[1])

    def total(self) -> float:
        return self.fixed + sum(self.block_macs(i) for i in range(self.n))

    # ---- global ranking
    def chunks(self, scores, granularity: str, r: int, norm, order, chunks) -> list:
        out = []
        if granularity == "channel":
            for j, sl in enumerate(self.g.slots):
                for i, v in enumerate(norm([s.channels[sl] for s in scores])):
                    for c in chunks(order(v), r):
                        out.append((float(v[c].mean()), (i, j, c)))
        else:
            vals = norm([torch.tensor([s.block], dtype=torch.float64) for s in scores])
            for i in range(self.n):
                out.append((float(vals[i]), (i, None, None)))
        return out

    def block_of(self, payload) -> int:
        return payload[0]

    def remove(self, payload) -> int | None:
        i, j, members = payload
        if self.kept[i] is None:
            return None
        if j is None:
            self.kept[i] = None
        else:
            rest = [c for c in self.kept[i][j] if c not in members]
            if not rest:
                return None  # a kept block keeps at least one chunk per slot
            self.kept[i][j] = rest
        return i

    # ---- per-layer uniform
    def uniform(self, scores, granularity: str, r: int, order, keep):
        if granularity == "block":
            raise ValueError("uniform allocation keeps a fraction of every block; use "
                             "granularity 'channel' (whole blocks need mode 'global')")
        best = [[order(s.channels[sl])[::-1] for sl in self.g.slots] for s in scores]

        def build(p: float) -> None:
            self.kept = [[sorted(best[i][j][:keep(c, p, r, min(r, c))])
                          for j, c in enumerate(self.g.inner[i])] for i in range(self.n)]
        return build

    def spec(self, meta: dict) -> CnnSpec:
        stages, it = [], iter(range(self.n))
        for n in self.g.layers:
            st = []
            for _ in range(n):
                i = next(it)
                st.append(make_conv_block(False) if self.kept[i] is None else make_conv_block(
                    True, **{sl: self.kept[i][j] for j, sl in enumerate(self.g.slots)}))
            stages.append(tuple(st))
        return CnnSpec(tuple(stages), model=self.model, dense=self.g, meta=meta)


@functools.lru_cache(maxsize=32)
def _cached_coefficients(g: CnnGeometry, model: str, img_size: int):
    return _coefficients(g, model)


def expected_macs(g: CnnGeometry, model: str, probs: Sequence, batch: int = 1) -> torch.Tensor:
    """Differentiable expected MACs (float64) of a gated ResNet whose gate sets (one per
    residual block: ``block``, ``conv1`` and, in a Bottleneck, ``conv2``) keep each unit
    independently with probabilities ``probs``. A block is alive iff its block gate and one
    unit of each slot are on; with S_j the sum and A_j = 1 - prod(1 - p_j) of slot j's
    probabilities, a BasicBlock's branch costs ``p_block * (c1 + c2) * S1 / C1`` and a
    Bottleneck's ``p_block * (c1 S1 A2 / C1 + c2 S1 S2 / (C1 C2) + c3 S2 A1 / C2)`` (c: the
    dense conv MACs): exact expectations, the ledger's MACs when the probabilities are 0/1."""
    fixed, coef, _ = _cached_coefficients(g, model, g.img_size)
    if len(probs) != len(coef):
        raise ValueError(f"expected {len(coef)} gate sets of probabilities, got {len(probs)}")
    total = torch.zeros((), dtype=torch.float64)
    for p, c, inner in zip(probs, coef, g.inner):
        pb = p["block"].double()
        p1 = p["conv1"].double()
        s1 = p1.sum()
        if g.block == "basic":
            e = pb * (c["conv1"] + c["conv2"]) * s1 / inner[0]
        else:
            p2 = p["conv2"].double()
            s2 = p2.sum()
            a1, a2 = 1.0 - torch.prod(1.0 - p1), 1.0 - torch.prod(1.0 - p2)
            e = pb * (c["conv1"] * s1 * a2 / inner[0] + c["conv2"] * s1 * s2 / (inner[0] * inner[1])
                      + c["conv3"] * s2 * a1 / inner[1])
        total = total.to(e.device) + e
    return batch * (total + float(fixed))
