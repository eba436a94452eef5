"""The ViT ledger of the structure solver (:mod:`pyengine.structure.solver`): the kept q/k
dims, v dims and neurons of every block, their exact MACs, the chunks a global ranking removes
and the structure a uniform fraction keeps.

Granularity (what is removed):

* ``"dim"``:   q/k dims and v dims of each head, FFN neurons. A head whose last v dim goes is
  dropped (its q/k dims with it); a kept head keeps at least ``min_dims`` q/k dims.
* ``"head"``:  whole heads and FFN neurons.
* ``"block"``: whole attention and FFN branches (global mode only).

``min_heads`` heads per layer always stay (0 lets a layer lose its whole attention branch,
but not every layer: a model with a class token keeps one attention branch);
``min_neurons`` neurons per FFN (0 lets a whole FFN go).
"""
from __future__ import annotations

from typing import Sequence

import torch

from pyengine.models.vit import cost as cost_model
from pyengine.structure.spec import Block, Geometry, Head, Spec

GRANULARITIES = ("dim", "head", "block")


class BlockState:
    """Mutable kept sets of one transformer block, and its exact MACs."""

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


class ViTLedger:
    granularities = GRANULARITIES

    def __init__(self, g: Geometry, model: str | None, min_heads: int = 1, min_dims: int = 1,
                 min_neurons: int = 0):
        if not isinstance(g, Geometry):
            raise TypeError(f"allocate needs the dense Geometry, got {type(g).__name__}")
        if not isinstance(min_heads, int) or not 0 <= min_heads <= g.num_heads:
            raise ValueError(f"min_heads must be an integer in [0, {g.num_heads}], got "
                             f"{min_heads!r}")
        for name, v, hi in (("min_dims", min_dims, g.head_dim),
                            ("min_neurons", min_neurons, g.mlp_hidden)):
            if not isinstance(v, int) or not 0 <= v <= hi:
                raise ValueError(f"{name} must be an integer in [0, {hi}], got {v!r}")
        self.g, self.model = g, model
        self.min_heads, self.min_dims, self.min_neurons = min_heads, max(1, min_dims), min_neurons
        full = Spec.full(g, model)
        self.dense = cost_model.total_macs(full)
        self.fixed = self.dense - sum(
            cost_model.block_macs(g, b.qk_dims, b.v_dims, len(b.mlp)) for b in full.blocks)
        self.layers = [BlockState(g) for _ in range(g.depth)]

    def check_scores(self, scores: Sequence) -> None:
        g = self.g
        if len(scores) != g.depth:
            raise ValueError(f"{len(scores)} block scores for a model of depth {g.depth}")
        for i, s in enumerate(scores):
            if tuple(s.qk.shape) != (g.num_heads, g.head_dim) or \
                    tuple(s.neuron.shape) != (g.mlp_hidden,):
                raise ValueError(f"scores of block {i} have shapes qk {tuple(s.qk.shape)}, "
                                 f"neuron {tuple(s.neuron.shape)}; the model has "
                                 f"({g.num_heads}, {g.head_dim}) and ({g.mlp_hidden},)")

    def meta(self) -> dict:
        return {"min_heads": self.min_heads, "min_dims": self.min_dims,
                "min_neurons": self.min_neurons}

    # ---- costs
    def block_macs(self, l: int) -> int:
        return self.layers[l].macs()

    def total(self) -> int:
        return self.fixed + sum(lay.macs() for lay in self.layers)

    # ---- global ranking: the chunks in push order, and removing one
    def chunks(self, scores, granularity: str, r: int, norm, order, chunks) -> list:
        g, L = self.g, len(scores)
        out = []
        if granularity == "dim":
            qk = norm([s.qk for s in scores])
            vv = norm([s.v for s in scores])
            for l in range(L):
                for h in range(g.num_heads):
                    for kind, t in (("qk", qk[l][h]), ("v", vv[l][h])):
                        for c in chunks(order(t), r):
                            out.append((float(t[c].mean()), (kind, l, h, c)))
        elif granularity == "head":
            hd = norm([s.head for s in scores])
            for l in range(L):
                for h in order(hd[l]):
                    out.append((float(hd[l][h]), ("head", l, h, None)))
        if granularity in ("dim", "head"):
            nn_ = norm([s.neuron for s in scores])
            for l in range(L):
                for c in chunks(order(nn_[l]), r):
                    out.append((float(nn_[l][c].mean()), ("neuron", l, None, c)))
        else:  # block
            at = norm([torch.tensor([s.attn]) for s in scores])
            ml = norm([torch.tensor([s.mlp]) for s in scores])
            for l in range(L):
                out.append((float(at[l]), ("attn", l, None, None)))
                out.append((float(ml[l]), ("mlp", l, None, None)))
        return out

    def block_of(self, payload) -> int:
        return payload[1]

    def remove(self, payload) -> int | None:
        """Apply one chunk; the block it changed, or None when a constraint forbids it."""
        kind, l, h, members = payload
        lay = self.layers[l]
        if kind == "qk":
            if not lay.v[h]:
                return None  # head already dropped
            rest = [d for d in lay.qk[h] if d not in members]
            if len(rest) < self.min_dims:
                return None  # a kept head keeps at least min_dims (one chunk at least)
            lay.qk[h] = rest
        elif kind == "v":
            rest = [d for d in lay.v[h] if d not in members]
            if len(rest) < self.min_dims:
                # the head goes whole (its remaining v and q/k dims), if min_heads allows
                if len(lay.heads()) - 1 < self.min_heads or self._last_attention(l):
                    return None
                lay.qk[h], rest = [], []
            lay.v[h] = rest
        elif kind == "head":
            if len(lay.heads()) - 1 < self.min_heads or self._last_attention(l):
                return None
            lay.qk[h], lay.v[h] = [], []
        elif kind == "neuron":
            rest = [j for j in lay.neurons if j not in members]
            if 0 < len(rest) < self.min_neurons or (not rest and self.min_neurons > 0):
                return None
            lay.neurons = rest
        elif kind == "attn":
            if self.min_heads > 0 or self._last_attention(l, whole=True):
                return None
            lay.qk = [[] for _ in lay.qk]
            lay.v = [[] for _ in lay.v]
        else:  # mlp
            if self.min_neurons > 0:
                return None
            lay.neurons = []
        return l

    def _last_attention(self, l: int, whole: bool = False) -> bool:
        """Would removing a head of layer ``l`` (``whole``: its attention branch) leave no
        attention in the model while it has prefix tokens? Then the class token never sees
        the image and the model's output is constant; the ranking alone does that under a
        latency budget (a branch's ms barely follows its width, so everything thins out)."""
        g = self.g
        if not (g.num_tokens and g.num_patches and g.num_tokens > g.num_patches):
            return False
        lay = self.layers[l]
        if not whole and len(lay.heads()) > 1:
            return False
        return not any(other.heads() for i, other in enumerate(self.layers) if i != l)

    # ---- per-layer uniform: the structure keeping fraction p of every layer
    def uniform(self, scores, granularity: str, r: int, order, keep):
        if granularity == "block":
            raise ValueError("uniform allocation keeps a fraction of every layer; use "
                             "granularity 'dim' or 'head' (whole blocks need mode 'global')")
        g = self.g
        orders = [dict(qk=[order(s.qk[h])[::-1] for h in range(g.num_heads)],  # best first
                       v=[order(s.v[h])[::-1] for h in range(g.num_heads)],
                       head=order(s.head)[::-1], neuron=order(s.neuron)[::-1])
                  for s in scores]

        def build(p: float) -> None:
            layers = []
            for o in orders:
                lay = BlockState(g)
                if granularity == "dim":
                    kd = keep(g.head_dim, p, r, max(min(r, g.head_dim), self.min_dims))
                    lay.qk = [sorted(o["qk"][h][:kd]) for h in range(g.num_heads)]
                    lay.v = [sorted(o["v"][h][:kd]) for h in range(g.num_heads)]
                else:
                    kh = keep(g.num_heads, p, 1, self.min_heads)
                    kept = set(o["head"][:kh])
                    lay.qk = [lay.qk[h] if h in kept else [] for h in range(g.num_heads)]
                    lay.v = [lay.v[h] if h in kept else [] for h in range(g.num_heads)]
                lay.neurons = sorted(o["neuron"][:keep(g.mlp_hidden, p, r, self.min_neurons)])
                layers.append(lay)
            self.layers = layers
        return build

    def spec(self, meta: dict) -> Spec:
        return Spec(tuple(lay.block() for lay in self.layers), model=self.model, dense=self.g,
                    meta=meta)
