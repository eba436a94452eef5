"""The structure solver's ledger (:mod:`pyengine.structure.solver`) for EVA, BEiT and Swin:
per block the kept q/k units (dims, or rotary pairs), value dims and FFN neurons, their exact
MACs (:mod:`.cost`), the chunks a global ranking removes and the structure a uniform fraction
keeps. Blocks may differ in shape (Swin's stages).

Granularity (what is removed):

* ``"dim"``:   q/k units and v dims of each head, FFN neurons. A head whose last v dim goes is
  dropped (its q/k units with it); a kept head keeps at least ``min_dims`` q/k dims (whole
  units) and v dims. q/k dims fixed by q/k norm are never removed on their own.
* ``"head"``:  whole heads and FFN neurons.
* ``"block"``: whole attention and FFN branches (global mode only).

``round_to=r`` removes r dims (r/2 rotary pairs) or r neurons at a time.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from pyengine.models.transformer.cost import attn_macs, block_macs, mlp_macs
from pyengine.models.transformer.spec import BlockShape
from pyengine.structure.spec import Block, Head

GRANULARITIES = ("dim", "head", "block")

__all__ = ["TransformerLedger", "BlockState", "GRANULARITIES"]


class BlockState:
    """Mutable kept sets of one block (q/k as unit indices), and its exact MACs."""

    def __init__(self, sh: BlockShape):
        self.sh = sh
        u = sh.head_dim // sh.qk_unit
        self.qk = [list(range(u)) for _ in range(sh.heads)]
        self.v = [list(range(sh.head_dim)) for _ in range(sh.heads)]
        self.neurons = list(range(sh.hidden))

    def heads(self) -> list[int]:
        return [h for h in range(self.sh.heads) if self.v[h]]

    def macs(self) -> int:
        hs = self.heads()
        return (attn_macs(self.sh, [len(self.qk[h]) * self.sh.qk_unit for h in hs],
                          [len(self.v[h]) for h in hs]) + mlp_macs(self.sh, len(self.neurons)))

    def drop_head(self, h: int) -> None:
        self.qk[h], self.v[h] = [], []

    def block(self) -> Block:
        return Block(tuple(Head(h, self.sh.dims_of_units(self.qk[h]), tuple(sorted(self.v[h])))
                           for h in self.heads()), tuple(sorted(self.neurons)))


class TransformerLedger:
    granularities = GRANULARITIES

    def __init__(self, g, model: str | None, adapter, min_heads: int = 1, min_dims: int = 1,
                 min_neurons: int = 0):
        shapes = g.shapes()
        lo_heads = min(sh.heads for sh in shapes)
        if not isinstance(min_heads, int) or not 0 <= min_heads <= lo_heads:
            raise ValueError(f"min_heads must be an integer in [0, {lo_heads}] (the fewest heads "
                             f"of a block), got {min_heads!r}")
        for name, v, hi in (("min_dims", min_dims, min(sh.head_dim for sh in shapes)),
                            ("min_neurons", min_neurons, min(sh.hidden for sh in shapes))):
            if not isinstance(v, int) or not 0 <= v <= hi:
                raise ValueError(f"{name} must be an integer in [0, {hi}], got {v!r}")
        self.g, self.model, self.adapter = g, model, adapter
        self.shapes = shapes
        self.min_heads, self.min_dims, self.min_neurons = min_heads, max(1, min_dims), min_neurons
        self.dense = adapter.dense_macs(g, model)
        full = adapter.spec_type.full(g, model)
        self.fixed = self.dense - sum(block_macs(sh, b) for sh, b in zip(shapes, full.blocks))
        self.layers = [BlockState(sh) for sh in shapes]

    def _min_units(self, sh: BlockShape) -> int:
        return math.ceil(self.min_dims / sh.qk_unit)

    def check_scores(self, scores: Sequence) -> None:
        if len(scores) != len(self.shapes):
            raise ValueError(f"{len(scores)} block scores for a model of {len(self.shapes)} blocks")
        for i, (s, sh) in enumerate(zip(scores, self.shapes)):
            want = {"head": (sh.heads,), "v": (sh.heads, sh.head_dim), "neuron": (sh.hidden,)}
            if not sh.qk_fixed:
                want["qk"] = (sh.heads, sh.qk_units)
            for k, shape in want.items():
                t = getattr(s, k, None)
                if t is None or tuple(t.shape) != shape:
                    raise ValueError(f"scores of block {i}: {k} has shape "
                                     f"{None if t is None else tuple(t.shape)}, the model has "
                                     f"{shape}")

    def meta(self) -> dict:
        return {"min_heads": self.min_heads, "min_dims": self.min_dims,
                "min_neurons": self.min_neurons}

    # ---- costs
    def block_macs(self, l: int) -> int:
        return self.layers[l].macs()

    def total(self) -> int:
        return self.fixed + sum(lay.macs() for lay in self.layers)

    # ---- global ranking
    def chunks(self, scores, granularity: str, r: int, norm, order, chunks) -> list:
        out = []
        if granularity == "dim":
            fixed = [i for i, sh in enumerate(self.shapes) if sh.qk_fixed]
            live = [i for i in range(len(scores)) if i not in fixed]
            qk = dict(zip(live, norm([scores[i].qk for i in live]))) if live else {}
            vv = norm([s.v for s in scores])
            for l, sh in enumerate(self.shapes):
                ru = max(1, r // sh.qk_unit)
                for h in range(sh.heads):
                    if l in qk:
                        for c in chunks(order(qk[l][h]), ru):
                            out.append((float(qk[l][h][c].mean()), ("qk", l, h, c)))
                    for c in chunks(order(vv[l][h]), r):
                        out.append((float(vv[l][h][c].mean()), ("v", l, h, c)))
        elif granularity == "head":
            hd = norm([s.head for s in scores])
            for l, sh in enumerate(self.shapes):
                for h in order(hd[l]):
                    out.append((float(hd[l][h]), ("head", l, h, None)))
        if granularity in ("dim", "head"):
            nn_ = norm([s.neuron for s in scores])
            for l in range(len(scores)):
                for c in chunks(order(nn_[l]), r):
                    out.append((float(nn_[l][c].mean()), ("neuron", l, None, c)))
        else:  # block
            at = norm([torch.tensor([s.attn]) for s in scores])
            ml = norm([torch.tensor([s.mlp]) for s in scores])
            for l in range(len(scores)):
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
                return None
            rest = [u for u in lay.qk[h] if u not in members]
            if len(rest) < self._min_units(lay.sh):
                return None
            lay.qk[h] = rest
        elif kind == "v":
            if not lay.v[h]:
                return None
            rest = [d for d in lay.v[h] if d not in members]
            if len(rest) < self.min_dims:
                if len(lay.heads()) - 1 < self.min_heads:
                    return None
                lay.drop_head(h)
            else:
                lay.v[h] = rest
        elif kind == "head":
            if not lay.v[h] or len(lay.heads()) - 1 < self.min_heads:
                return None
            lay.drop_head(h)
        elif kind == "neuron":
            rest = [j for j in lay.neurons if j not in members]
            if 0 < len(rest) < self.min_neurons or (not rest and self.min_neurons > 0):
                return None
            lay.neurons = rest
        elif kind == "attn":
            if self.min_heads > 0:
                return None
            for hh in range(lay.sh.heads):
                lay.drop_head(hh)
        else:  # mlp
            if self.min_neurons > 0:
                return None
            lay.neurons = []
        return l

    # ---- per-layer uniform
    def uniform(self, scores, granularity: str, r: int, order, keep):
        if granularity == "block":
            raise ValueError("uniform allocation keeps a fraction of every layer; use "
                             "granularity 'dim' or 'head' (whole blocks need mode 'global')")
        orders = []
        for s, sh in zip(scores, self.shapes):
            orders.append(dict(
                qk=[order(s.qk[h])[::-1] for h in range(sh.heads)] if not sh.qk_fixed else None,
                v=[order(s.v[h])[::-1] for h in range(sh.heads)],
                head=order(s.head)[::-1], neuron=order(s.neuron)[::-1]))

        def build(p: float) -> None:
            layers = []
            for o, sh in zip(orders, self.shapes):
                lay = BlockState(sh)
                if granularity == "dim":
                    kv = keep(sh.head_dim, p, r, max(min(r, sh.head_dim), self.min_dims))
                    lay.v = [sorted(o["v"][h][:kv]) for h in range(sh.heads)]
                    if o["qk"] is not None:
                        u = sh.head_dim // sh.qk_unit
                        ru = max(1, r // sh.qk_unit)
                        ku = keep(u, p, ru, max(min(ru, u), self._min_units(sh)))
                        lay.qk = [sorted(o["qk"][h][:ku]) for h in range(sh.heads)]
                else:
                    kept = set(o["head"][:keep(sh.heads, p, 1, self.min_heads)])
                    for h in range(sh.heads):
                        if h not in kept:
                            lay.drop_head(h)
                lay.neurons = sorted(o["neuron"][:keep(sh.hidden, p, r, self.min_neurons)])
                layers.append(lay)
            self.layers = layers
        return build

    def spec(self, meta: dict):
        return self.adapter.spec_type(tuple(lay.block() for lay in self.layers), model=self.model,
                                      dense=self.g, meta=meta)
