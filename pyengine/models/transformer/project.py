"""HiAP's final structure for EVA / BEiT / Swin: ``structure.solver.project``'s search over
per-group counts, with blocks of different shapes (Swin's stages) and q/k units (rotary pairs).

Start from the units whose score says keep (score > ``threshold``), counts rounded to
multiples of ``round_to`` (dims; rotary pairs count two), at least ``min_heads`` heads per
block and ``min_head_dims`` / ``min_ffn`` of a kept head / FFN; then, while the MACs are outside
``target * dense * (1 +- tolerance)``, take the single step (one group's count one allowed
value down or up, or a head off or on) with the lowest mean effective keep probability
(sigmoid of block * head * unit scores) that does not overshoot, or the highest one to add.
Units inside a group are kept in score order.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from pyengine.models.transformer.cost import attn_macs, block_macs, mlp_macs
from pyengine.models.transformer.spec import BlockShape
from pyengine.structure.spec import Block, Head

__all__ = ["project"]


class _Counts:
    """Counts of one block during projection."""

    def __init__(self, sh: BlockShape, att: Mapping[str, torch.Tensor],
                 mlp: Mapping[str, torch.Tensor], threshold: float | None, opts: dict):
        from pyengine.structure.solver import _nearest
        self.sh = sh
        H, Dh, M = sh.heads, sh.head_dim, sh.hidden
        U = sh.head_dim // sh.qk_unit
        f = lambda t: t.detach().double().cpu()  # noqa: E731
        sa, sm = {k: f(v) for k, v in att.items()}, {k: f(v) for k, v in mlp.items()}
        want = {"head": (H,), "v": (H, Dh)}
        if not sh.qk_fixed:
            want["qk"] = (H, U)
        for name, shape in want.items():
            if tuple(sa[name].shape) != shape:
                raise ValueError(f"scores for {name} have shape {tuple(sa[name].shape)}, "
                                 f"expected {shape}")
        if tuple(sm["neuron"].shape) != (M,):
            raise ValueError(f"scores for neuron have shape {tuple(sm['neuron'].shape)}, "
                             f"expected {(M,)}")
        qk = sa["qk"] if not sh.qk_fixed else torch.full((H, U), 1e9, dtype=torch.float64)
        p = torch.sigmoid
        pb, pmb = float(p(sa["block"].reshape(()))), float(p(sm["block"].reshape(())))
        self.p_head = (pb * p(sa["head"])).tolist()
        self.qk_order = torch.argsort(qk, dim=-1, descending=True, stable=True).tolist()
        self.v_order = torch.argsort(sa["v"], dim=-1, descending=True, stable=True).tolist()
        self.n_order = torch.argsort(sm["neuron"], descending=True, stable=True).tolist()
        z = lambda t: torch.cat([torch.zeros(t.shape[:-1] + (1,), dtype=t.dtype),  # noqa: E731
                                 t.cumsum(-1)], -1)
        ph = torch.tensor(self.p_head, dtype=torch.float64)[:, None]
        self.cqk = (z(torch.sort(p(qk), dim=-1, descending=True).values) * ph).tolist()
        self.cv = (z(torch.sort(p(sa["v"]), dim=-1, descending=True).values) * ph).tolist()
        self.cn = (z(torch.sort(p(sm["neuron"]), descending=True).values) * pmb).tolist()
        self.qk_allowed = [U] if sh.qk_fixed else opts["qk_allowed"](sh)
        self.v_allowed, self.n_allowed = opts["v_allowed"](sh), opts["n_allowed"](sh)
        self.min_heads = opts["min_heads"]
        if threshold is None:
            self.on = [True] * H
            self.kq, self.kv, self.m = [U] * H, [Dh] * H, M
        else:
            kq = (qk > threshold).sum(-1).tolist()
            kv = (sa["v"] > threshold).sum(-1).tolist()
            battn = bool(sa["block"] > threshold)
            self.on = [battn and bool(sa["head"][h] > threshold) and kv[h] > 0 for h in range(H)]
            self.kq = [_nearest(self.qk_allowed, c) for c in kq]
            self.kv = [_nearest(self.v_allowed, c) for c in kv]
            m = int((sm["neuron"] > threshold).sum()) if bool(sm["block"] > threshold) else 0
            self.m = _nearest(self.n_allowed, m)
        need = self.min_heads - sum(self.on)
        for h in sorted(range(H), key=lambda h: -self.p_head[h]):
            if need <= 0:
                break
            if not self.on[h]:
                self.on[h], need = True, need - 1

    def spec_block(self) -> Block:
        sh = self.sh
        heads = tuple(Head(h, sh.dims_of_units(self.qk_order[h][:self.kq[h]]),
                           tuple(sorted(self.v_order[h][:self.kv[h]])))
                      for h in range(len(self.on)) if self.on[h])
        return Block(heads, tuple(sorted(self.n_order[:self.m])))

    def macs(self) -> int:
        hs = [h for h in range(len(self.on)) if self.on[h]]
        return (attn_macs(self.sh, [self.kq[h] * self.sh.qk_unit for h in hs],
                          [self.kv[h] for h in hs]) + mlp_macs(self.sh, self.m))

    def moves(self, remove: bool):
        """(score, apply, undo) of every single step."""
        def step(allowed, c, down):
            i = allowed.index(c)
            j = i - 1 if down else i + 1
            return allowed[j] if 0 <= j < len(allowed) else None

        def mean(cs, a, b):
            return (cs[b] - cs[a]) / (b - a) if b != a else 0.0

        m2 = step(self.n_allowed, self.m, remove)
        if m2 is not None:
            lo, hi = sorted((self.m, m2))
            old = self.m
            yield (mean(self.cn, lo, hi), lambda m2=m2: setattr(self, "m", m2),
                   lambda old=old: setattr(self, "m", old))
        n_on = sum(self.on)
        for h in range(len(self.on)):
            if self.on[h]:
                for counts, allowed, cum in ((self.kq, self.qk_allowed, self.cqk[h]),
                                             (self.kv, self.v_allowed, self.cv[h])):
                    c2 = step(allowed, counts[h], remove)
                    if c2 is not None:
                        lo, hi = sorted((counts[h], c2))
                        old = counts[h]

                        def do(counts=counts, h=h, c2=c2):
                            counts[h] = c2

                        def undo(counts=counts, h=h, old=old):
                            counts[h] = old
                        yield mean(cum, lo, hi), do, undo
            if self.on[h] == remove and (not remove or n_on > self.min_heads):
                def flip(h=h, v=not remove):
                    self.on[h] = v
                yield self.p_head[h], flip, (lambda h=h, v=remove: self.on.__setitem__(h, v))


def project(adapter, model: nn.Module, scores: Sequence[Mapping], target: float,
            tolerance: float = 0.03, min_heads: int = 1, min_head_dims: float = 0.0,
            min_ffn: float = 0.0, round_to: int | None = None, threshold: float | None = 0.0):
    """See the module docstring; ``scores`` are one dict per gate set (attention, FFN, ...,
    block by block, as ``adapter.gate_sets``). Returns the spec, applied to ``model``."""
    from pyengine import api
    from pyengine.models import model_name
    from pyengine.structure.solver import allowed_counts
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be a fraction of dense MACs in (0, 1], got {target!r}")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
    g = adapter.geometry(model)
    shapes = g.shapes()
    if len(scores) != 2 * len(shapes):
        raise ValueError(f"scores for {len(scores)} gate sets, the model has {2 * len(shapes)} "
                         "(attention and FFN of every block)")
    lo_heads = min(sh.heads for sh in shapes)
    if not 0 <= min_heads <= lo_heads:
        raise ValueError(f"min_heads must be in [0, {lo_heads}], got {min_heads!r}")
    for name, v in (("min_head_dims", min_head_dims), ("min_ffn", min_ffn)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} is a fraction in [0, 1], got {v!r}")
    r = int(round_to) if round_to else 1

    def dmin(sh):
        return max(1, math.ceil(min_head_dims * sh.head_dim - 1e-9))

    opts = {
        "qk_allowed": lambda sh: allowed_counts(
            sh.head_dim // sh.qk_unit, max(1, r // sh.qk_unit),
            math.ceil(dmin(sh) / sh.qk_unit) if min_head_dims > 0 else 0,
            allow_zero=min_head_dims == 0),
        "v_allowed": lambda sh: allowed_counts(sh.head_dim, r, dmin(sh), allow_zero=False),
        "n_allowed": lambda sh: allowed_counts(sh.hidden, r,
                                               math.ceil(min_ffn * sh.hidden - 1e-9),
                                               allow_zero=min_ffn == 0),
        "min_heads": int(min_heads)}
    layers = [_Counts(sh, scores[2 * i], scores[2 * i + 1], threshold, opts)
              for i, sh in enumerate(shapes)]
    name = model_name(model)
    full = adapter.spec_type.full(g, model=name)
    dense = adapter.dense_macs(g, name)
    fixed = dense - sum(block_macs(sh, b) for sh, b in zip(shapes, full.blocks))
    goal = target * dense
    lo, hi = goal * (1 - tolerance), goal * (1 + tolerance)
    per = [lay.macs() for lay in layers]
    macs = fixed + sum(per)

    def layer_moves(i: int, remove: bool) -> list:
        lay, out = layers[i], []
        for score, do, undo in lay.moves(remove):
            do()
            delta = lay.macs() - per[i]
            undo()
            if (delta < 0) if remove else (delta > 0):
                out.append((score, delta, do))
        return out

    cache: dict[tuple[int, bool], list] = {}
    while not lo <= macs <= hi:
        remove = macs > hi
        pick = closest = None
        for i in range(len(layers)):
            if (i, remove) not in cache:
                cache[(i, remove)] = layer_moves(i, remove)
            for score, delta, do in cache[(i, remove)]:
                new = macs + delta
                key = score if remove else -score
                if (new >= lo if remove else new <= hi) and (pick is None or key < pick[0]):
                    pick = (key, i, do)
                if closest is None or abs(new - goal) < closest[0]:
                    closest = (abs(new - goal), i, do)
        if pick is None:
            if closest is None or closest[0] >= abs(macs - goal):
                break  # the constraints do not allow the target
            pick = closest
        _, i, do = pick
        do()
        per[i] = layers[i].macs()
        macs = fixed + sum(per)
        cache.pop((i, True), None)
        cache.pop((i, False), None)
    s = adapter.spec_type(tuple(lay.spec_block() for lay in layers), model=name, dense=g)
    assert fixed + sum(block_macs(sh, b) for sh, b in zip(shapes, s.blocks)) == macs
    api.apply(model, s)
    return s
