"""MACs of a block-structured CNN as a function of its structure, for the structure solver
(:class:`SlotLedger`, :mod:`pyengine.structure.solver`), HiAP's differentiable expected MACs
(:func:`expected_macs`) and HiAP's final projection (:func:`project`).

Every block has at most one prunable slot, and a block's MACs are affine in its kept units
(channels, or groups of a grouped conv): each layer of the branch either makes, reads or
maps the slot's channels one by one (1x1 convs, depthwise / grouped convs, squeeze-excite),
and blocks do not interact (their input and output widths stay). So, per block,

    MACs = removed[b]                         if the residual branch is removed
         = base[b] + per_unit[b] * kept_units  otherwise

with ``removed`` the shortcut's MACs. :func:`mac_table` reads these numbers off the cost
model (three passes over made-up specs: all kept, one unit per block, branches removed) and
checks that they are integers, so every count here is exact.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from pyengine.models.cnn.spec import BlockGeometry, BlockSpec
from pyengine.structure.spec import make_conv_block

__all__ = ["MacTable", "mac_table", "SlotLedger", "expected_macs", "project"]


@dataclass(frozen=True)
class MacTable:
    fixed: int                   # everything outside the blocks (stem, stage downsamples, head)
    removed: tuple[int, ...]     # per block: MACs with its residual branch removed
    base: tuple[int, ...]        # per block: MACs of a kept block, less its kept units'
    per_unit: tuple[int, ...]    # per block: MACs of one kept unit
    units: tuple[int, ...]       # per block: units of its slot (0: no slot)
    dense: int

    def block(self, i: int, keep: bool, k: int) -> int:
        """MACs of block ``i`` kept with ``k`` units (a kept slot keeps at least one)."""
        if not keep:
            return self.removed[i]
        return self.base[i] + self.per_unit[i] * (max(k, 1) if self.units[i] else 0)


def _block_macs(spec: BlockSpec, paths: list[str]) -> tuple[list[int], int]:
    """Per block the MACs of its rows (its path and everything under it), and the total."""
    from pyengine.cost import cost
    c = cost(spec)
    per = [0] * len(paths)
    index = {p: i for i, p in enumerate(paths)}
    for r in c.layers:
        parts = r.name.removesuffix(".add").split(".")
        for n in range(len(parts), 0, -1):
            i = index.get(".".join(parts[:n]))
            if i is not None:
                per[i] += r.macs
                break
    return per, c.macs


def mac_table(adapter, g: BlockGeometry, model: str) -> MacTable:
    """The :class:`MacTable` of the dense model ``model`` of geometry ``g`` (cached)."""
    return _mac_table(adapter.name, model, g, g.img_size,
                      json.dumps(dict(g.kwargs), sort_keys=True, default=str))


@functools.lru_cache(maxsize=64)
def _mac_table(family: str, model: str, g: BlockGeometry, img_size: int, kwargs: str) -> MacTable:
    from pyengine.models.base import adapters
    from pyengine.models.cnn.cost import meta_dense
    adapter = next(a for a in adapters() if a.name == family)
    T = adapter.spec_type
    full = T.full(g, model)
    paths = adapter.block_paths(meta_dense(full))
    it = iter(g.blocks)
    one = T(tuple(tuple(make_conv_block(True, **({b.slot: range(b.group)} if b.slot else {}))
                        for b in (next(it) for _ in range(n))) for n in g.layers),
            model=model, dense=g)
    it = iter(g.blocks)
    gone = T(tuple(tuple(make_conv_block(False) if b.removable else blk
                         for b, blk in zip((next(it) for _ in range(len(st))), st))
                   for st in full.stages), model=model, dense=g)
    F, dense = _block_macs(full, paths)
    O, _ = _block_macs(one, paths)
    R, _ = _block_macs(gone, paths)
    base, per = [], []
    for i, b in enumerate(g.blocks):
        u = b.units
        if u > 1:
            step, rest = divmod(F[i] - O[i], u - 1)
            if rest:
                raise AssertionError(f"block {i}: MACs are not affine in its kept units "
                                     f"({F[i]} with {u}, {O[i]} with 1)")
            per.append(step)
            base.append(O[i] - step)
        else:
            per.append(F[i] if u == 1 else 0)
            base.append(0 if u == 1 else F[i])
    return MacTable(fixed=dense - sum(F), removed=tuple(R), base=tuple(base),
                    per_unit=tuple(per), units=tuple(b.units for b in g.blocks), dense=dense)


def _units_to_channels(units, group: int) -> list[int]:
    return [u * group + j for u in units for j in range(group)]


def unit_step(round_to: int | None, group: int) -> int:
    """Units per step so that kept channels (``group`` per unit) are multiples of
    ``round_to`` channels: a RegNet group of 8 channels is one step of ``round_to=8``."""
    r = int(round_to) if round_to else 1
    return r // math.gcd(r, group)


class SlotLedger:
    """The solver's ledger (see :mod:`pyengine.structure.solver`): kept units per block (None:
    the residual branch is removed). Granularity ``"channel"`` ranks the slots' units (a kept
    block keeps at least one chunk), ``"block"`` whole residual branches (global mode only).
    ``round_to`` counts channels: a block whose unit is a group of channels moves in as many
    whole groups as make a multiple of it."""

    granularities = ("channel", "block")
    min_heads = 0

    def __init__(self, adapter, g: BlockGeometry, model: str | None, **constraints):
        if not model:
            raise ValueError(f"allocating a {adapter.name} model needs model= (the timm name): "
                             "the cost model rebuilds the network to count its MACs")
        self.adapter, self.g, self.model = adapter, g, model
        self.t = mac_table(adapter, g, model)
        self.dense = self.t.dense
        self.n = len(g.blocks)
        self.kept: list[list[int] | None] = [list(range(b.units)) for b in g.blocks]

    def check_scores(self, scores: Sequence) -> None:
        if len(scores) != self.n:
            raise ValueError(f"{len(scores)} block scores for a model of {self.n} blocks")
        for i, (s, b) in enumerate(zip(scores, self.g.blocks)):
            if b.slot and (b.slot not in s.channels
                           or tuple(s.channels[b.slot].shape) != (b.units,)):
                raise ValueError(f"scores of block {i} slot {b.slot!r} do not have shape "
                                 f"({b.units},)")

    def meta(self) -> dict:
        return {}

    # ---- costs
    def block_macs(self, i: int) -> int:
        k = self.kept[i]
        return self.t.block(i, k is not None, len(k) if k else 0)

    def total(self) -> int:
        return self.t.fixed + sum(self.block_macs(i) for i in range(self.n))

    # ---- global ranking
    def chunks(self, scores, granularity: str, r: int, norm, order, chunks) -> list:
        out = []
        if granularity == "channel":
            slotted = [i for i, b in enumerate(self.g.blocks) if b.units > 1]
            for slot in sorted({self.g.blocks[i].slot for i in slotted}):
                ids = [i for i in slotted if self.g.blocks[i].slot == slot]
                for i, v in zip(ids, norm([scores[i].channels[slot] for i in ids])):
                    for c in chunks(order(v), unit_step(r, self.g.blocks[i].group)):
                        out.append((float(v[c].mean()), (i, c)))
        else:
            ids = [i for i, b in enumerate(self.g.blocks) if b.removable]
            if ids:
                vals = norm([torch.tensor([scores[i].block], dtype=torch.float64)
                             for i in ids])
                out += [(float(v), (i, None)) for i, v in zip(ids, vals)]
        return out

    def block_of(self, payload) -> int:
        return payload[0]

    def remove(self, payload) -> int | None:
        i, members = payload
        if self.kept[i] is None:
            return None
        if members is None:
            self.kept[i] = None
        else:
            gone = set(members)
            rest = [u for u in self.kept[i] if u not in gone]
            if not rest:
                return None  # a kept block keeps at least one chunk of its slot
            self.kept[i] = rest
        return i

    # ---- per-layer uniform
    def uniform(self, scores, granularity: str, r: int, order, keep):
        if granularity == "block":
            raise ValueError("uniform allocation keeps a fraction of every block; use "
                             "granularity 'channel' (whole blocks need mode 'global')")
        best = [order(scores[i].channels[b.slot])[::-1] if b.slot else []
                for i, b in enumerate(self.g.blocks)]

        def build(p: float) -> None:
            steps = [unit_step(r, b.group) for b in self.g.blocks]
            self.kept = [sorted(best[i][:keep(b.units, p, s, min(s, b.units))]) if b.slot
                         else [] for i, (b, s) in enumerate(zip(self.g.blocks, steps))]
        return build

    def spec(self, meta: dict) -> BlockSpec:
        return _spec(self.adapter.spec_type, self.g, self.model,
                     [(k is not None, k or []) for k in self.kept], meta)


def _spec(T, g: BlockGeometry, model: str | None, kept: list[tuple[bool, list[int]]],
          meta: dict | None = None) -> BlockSpec:
    """A spec from per-block ``(keep, kept units)``."""
    stages, it = [], iter(zip(g.blocks, kept))
    for n in g.layers:
        st = []
        for _ in range(n):
            b, (keep, units) = next(it)
            if not keep:
                st.append(make_conv_block(False))
            else:
                st.append(make_conv_block(True, **({b.slot: _units_to_channels(
                    sorted(units) or [0], b.group)} if b.slot else {})))
        stages.append(tuple(st))
    return T(tuple(stages), model=model, dense=g, meta=meta or {})


# ---- HiAP ------------------------------------------------------------------------------------
def gated_block_ids(adapter, model) -> list[int]:
    """For each gate set (in ``gate_sets`` order), the index of its block."""
    from pyengine.models.cnn.family import PrunableBlock
    return [i for i, (_, r) in enumerate(adapter.family.refs(model))
            if isinstance(r.get(), PrunableBlock) and r.get().gates is not None]


def expected_macs(adapter, model, probs: Sequence[Mapping[str, torch.Tensor]],
                  batch: int = 1) -> torch.Tensor:
    """Differentiable expected MACs (float64) of a gated model from the keep probabilities
    of its gate sets (``gate_sets`` order), with the hard semantics of the gates: a removable
    block is alive iff its ``block`` gate and at least one unit are on; a block without a
    residual keeps at least one unit. With independent Bernoulli gates, per block::

        removable:   R + (base - R) * p_block * (1 - prod(1 - p)) + per_unit * p_block * sum(p)
        otherwise:   base + per_unit * (sum(p) + prod(1 - p))

    exact expectations, multilinear in every probability, equal to the cost model's MACs when
    the probabilities are 0/1."""
    from pyengine.models import model_name
    g = adapter.geometry(model)
    t = mac_table(adapter, g, model_name(model))
    ids = gated_block_ids(adapter, model)
    if len(probs) != len(ids):
        raise ValueError(f"expected {len(ids)} gate sets of probabilities, got {len(probs)}")
    by_block = dict(zip(ids, probs))
    total = torch.zeros((), dtype=torch.float64)
    fixed = t.fixed
    for i, b in enumerate(g.blocks):
        p = by_block.get(i)
        if p is None:  # nothing gated: the whole block stays
            fixed += t.block(i, True, b.units)
            continue
        if b.slot:
            pu = p[b.slot].double()
            s, z = pu.sum(), torch.prod(1.0 - pu)
        if b.removable:
            pb = p["block"].double()
            e = (t.base[i] - t.removed[i]) * pb * ((1.0 - z) if b.slot else 1.0)
            if b.slot:
                e = e + t.per_unit[i] * pb * s
            total = total.to(e.device) + e
            fixed += t.removed[i]
        else:
            total = total.to(pu.device) + t.per_unit[i] * (s + z)
            fixed += t.base[i]
    return batch * (total + float(fixed))


class ProjectedBlock:
    """One block during HiAP's projection: kept or not, and a kept count per slot (a slot's
    units kept in logit order). ``cost(keep, counts)`` gives the block's MACs."""

    def __init__(self, removable: bool, block_logit, slots, cost, threshold: float = 0.0):
        self.removable, self.cost = removable, cost
        self.pb = float(torch.sigmoid(block_logit.detach().double())) if removable else 1.0
        self.keep = (not removable) or bool(block_logit > threshold)
        self.order, self.cum, self.k, self.allowed = [], [], [], []
        for logits, allowed in slots:  # (logits [units], allowed kept counts)
            u = logits.detach().double().cpu()
            self.order.append(torch.argsort(u, descending=True, stable=True).tolist())
            p = torch.sort(torch.sigmoid(u), descending=True).values * self.pb
            self.cum.append(torch.cat([torch.zeros(1, dtype=torch.float64),
                                       p.cumsum(0)]).tolist())
            k = int((u > threshold).sum())
            if k == 0 and removable:
                self.keep = False  # the hard gates' semantics: an empty slot removes the block
            self.k.append(min(allowed, key=lambda a: (abs(a - k), -a)))
            self.allowed.append(allowed)

    def macs(self) -> int:
        return self.cost(self.keep, self.k)

    def moves(self, remove: bool):
        """(score, MAC change, apply) of each single step: a slot's next allowed count (scored
        by the mean effective keep probability of the units it moves), or the whole block."""
        now = self.macs()
        if self.keep:
            for j, (k, allowed, cum) in enumerate(zip(self.k, self.allowed, self.cum)):
                i = allowed.index(k) + (-1 if remove else 1)
                if 0 <= i < len(allowed):
                    k2 = allowed[i]
                    lo, hi = sorted((k, k2))
                    ks = list(self.k)
                    ks[j] = k2
                    yield (cum[hi] - cum[lo]) / (hi - lo), self.cost(True, ks) - now, \
                        (lambda j=j, k2=k2: self.k.__setitem__(j, k2))
        if self.removable and self.keep == remove:
            yield self.pb, self.cost(not self.keep, self.k) - now, \
                (lambda v=not self.keep: setattr(self, "keep", v))

    def kept(self) -> tuple[bool, list[list[int]]]:
        return self.keep, [sorted(o[:k]) for o, k in zip(self.order, self.k)]


def project_blocks(blocks: Sequence[ProjectedBlock], fixed: int, dense: int, target: float,
                   tolerance: float) -> int:
    """Move ``blocks`` (in place) until ``fixed`` + their MACs are within ``target * dense *
    (1 +- tolerance)``: while outside, take the step with the lowest mean effective keep
    probability that does not leave the band on the far side (or, if none, the one landing
    closest to the goal), or add the highest one. Returns the MACs reached."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be a fraction of dense MACs in (0, 1], got {target!r}")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
    goal = target * dense
    lo, hi = goal * (1 - tolerance), goal * (1 + tolerance)
    per = [blk.macs() for blk in blocks]
    macs = fixed + sum(per)
    while not lo <= macs <= hi:
        remove = macs > hi
        pick = closest = None
        for n, blk in enumerate(blocks):
            for score, delta, do in blk.moves(remove):
                if (delta >= 0) if remove else (delta <= 0):
                    continue
                new = macs + delta
                key = score if remove else -score
                if (new >= lo if remove else new <= hi) and (pick is None or key < pick[0]):
                    pick = (key, n, do)
                if closest is None or abs(new - goal) < closest[0]:
                    closest = (abs(new - goal), n, do)
        if pick is None:
            if closest is None or closest[0] >= abs(macs - goal):
                break  # nothing brings it closer: the constraints do not allow the target
            pick = closest
        _, n, do = pick
        do()
        per[n] = blocks[n].macs()
        macs = fixed + sum(per)
    return macs


def project(adapter, model, scores: Sequence[Mapping[str, torch.Tensor]], target: float,
            tolerance: float = 0.03, round_to: int | None = None,
            threshold: float = 0.0) -> BlockSpec:
    """HiAP's final structure of a gated model from per-gate-set logit-like ``scores``
    (``gate_sets`` order; ``sigmoid(score)`` read as a keep probability), applied to ``model``.

    Start: units and blocks with score > ``threshold``, kept channels rounded to multiples of
    ``round_to`` (whole groups where a unit is a group; a slot's full width is always
    allowed), then :func:`project_blocks` (steps of one allowed count of a block's units, or
    a whole residual branch; effective keep probability ``p_block * p_unit``)."""
    from pyengine import api
    from pyengine.models import model_name
    from pyengine.structure.solver import allowed_counts
    g = adapter.geometry(model)
    name = model_name(model)
    t = mac_table(adapter, g, name)
    ids = gated_block_ids(adapter, model)
    if len(scores) != len(ids):
        raise ValueError(f"scores for {len(scores)} gate sets, the model has {len(ids)}")
    by_block = dict(zip(ids, scores))
    blocks: dict[int, ProjectedBlock] = {}
    for i, b in enumerate(g.blocks):
        if i in by_block:
            sc = by_block[i]
            slots = [(sc[b.slot], allowed_counts(b.units, unit_step(round_to, b.group), 1,
                                                 allow_zero=False))] if b.slot else []
            blocks[i] = ProjectedBlock(b.removable, sc.get("block"), slots,
                                       lambda keep, ks, i=i: t.block(i, keep, ks[0] if ks else 0),
                                       threshold)
    fixed = t.fixed + sum(t.block(i, True, b.units) for i, b in enumerate(g.blocks)
                          if i not in blocks)
    macs = project_blocks(list(blocks.values()), fixed, t.dense, target, tolerance)
    kept = []
    for i, b in enumerate(g.blocks):
        if i in blocks:
            keep, units = blocks[i].kept()
            kept.append((keep, units[0] if units else []))
        else:
            kept.append((True, list(range(b.units))))
    s = _spec(adapter.spec_type, g, name, kept,
              {"made_by": "hiap.project", "target": target, "tolerance": tolerance})
    from pyengine.cost import cost
    got = cost(s).macs
    assert got == macs, (got, macs)  # the table above and the cost model agree
    api.apply(model, s)
    return s
