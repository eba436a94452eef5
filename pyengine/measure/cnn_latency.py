"""Measuring a CNN's latency table (:mod:`pyengine.cost.cnn_latency_table`): every residual
block timed in place, inside whole compact models.

A block's time depends on where it sits (its input size, its dense widths, whether its weights
are still in cache when it runs), so blocks are not timed alone: compact models of the dense
model are built at a small grid of uniform kept fractions of every block's width (each model
keeps the same fraction of every block: 1/8, 1/4, 1/2, 3/4 and all of a one-slot block; a
ResNet Bottleneck's two slots on the 2-D grid {1/4, 1/2, 3/4, 1}^2), plus one model with every
removable block removed (what is left of a removed block: a downsample shortcut, or nothing).
Each model is timed whole (no hooks) and, in a separate pass, with a forward pre-hook and a
forward hook on every block (:func:`pyengine.measure.timing.measure_in_place`, on the
harness's clock; so the hooks cost the whole-model timings nothing). The models are timed
interleaved, round by round, so that a slow spell of the machine falls on all of them alike;
small models get more rounds, so that the samples span at least ``min_seconds``.

Per block, the medians at each measured width (averaged where two fractions round to the same
kept count) form its grid; the removed model gives its ``removed_ms``; the fixed part is the
median over the models of (whole-model median - the sum of its blocks' medians): stem, head
and everything between the blocks.
"""
from __future__ import annotations

import copy
import itertools
import statistics
from typing import Sequence

import torch
from torch import nn

from pyengine.cost.cnn_latency_table import (BlockGrid, CnnEntry, block_removable, block_slots,
                                             monotone)
from pyengine.cost.latency_table import LatencyTableError
from pyengine.measure.timing import measure_in_place

__all__ = ["FRACTIONS", "FRACTIONS_2D", "measure_blocks", "uniform_spec", "removed_spec",
           "dense_model", "block_modules"]

FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0)   # kept fractions of a one-slot block's width
FRACTIONS_2D = (0.25, 0.5, 0.75, 1.0)       # per slot of a two-slot block (a 2-D grid)
REPEATS = 7           # rounds at least ...
MIN_SECONDS = 3.0     # ... and enough of them that the samples span this long ...
MAX_ROUNDS_FACTOR = 5  # ... in at most this many times ``repeats`` rounds


def _kept_units(units: int, fraction: float) -> int:
    return min(units, max(1, round(fraction * units)))


def _spec_type(g):
    from pyengine.models import adapter_for_geometry
    return adapter_for_geometry(g).spec_type


def uniform_spec(g, model: str, fractions: Sequence[float]):
    """The spec keeping ``fractions[j]`` of slot ``j`` of every block (the first channels, in
    whole units; at least one)."""
    from pyengine.structure.spec import make_conv_block
    slots, it, stages = block_slots(g), iter(range(len(block_slots(g)))), []
    for n in g.layers:
        st = []
        for _ in range(n):
            i = next(it)
            st.append(make_conv_block(True, **{
                name: range(_kept_units(c // grp, f) * grp)
                for (name, c, grp), f in zip(slots[i], fractions)}))
        stages.append(tuple(st))
    return _spec_type(g)(tuple(stages), model=model, dense=g)


def removed_spec(g, model: str):
    """The spec removing every block that can go (the others kept whole)."""
    from pyengine.structure.spec import make_conv_block
    full = _spec_type(g).full(g, model)
    rm, it = block_removable(g), iter(range(len(block_removable(g))))
    stages = tuple(tuple(make_conv_block(False) if rm[next(it)] else b for b in st)
                   for st in full.stages)
    return _spec_type(g)(stages, model=model, dense=g)


def dense_model(g, model: str) -> nn.Module:
    """The dense timm model ``model`` of geometry ``g`` (random weights, eval mode)."""
    import pyengine
    kw = dict(getattr(g, "kwargs", None) or {})
    m = pyengine.create_model(model, num_classes=g.num_classes, in_chans=g.in_chans,
                              img_size=int(g.img_size), **kw).eval()
    if pyengine.geometry(m) != g:
        raise LatencyTableError(f"timm's {model} does not have the spec's dense geometry (a "
                                "model created with other kwargs?)")
    return m


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The residual blocks of a (compact) CNN, in spec order (removed ones included)."""
    from pyengine.models import adapter_for
    family = getattr(adapter_for(model), "family", None)
    if family is not None:
        return [r.get() for _, r in family.refs(model)]
    from pyengine.models.resnet.blocks import stages
    return [blk for st in stages(model) for blk in st]


def _structures(g, fractions, fractions_2d) -> list[tuple[float, ...] | None]:
    """The grid's fraction tuples (one per slot), then None for the removed structure."""
    k = max((len(s) for s in block_slots(g)), default=0)
    if k == 0:
        points: list = [()]
    elif k == 1:
        points = [(f,) for f in fractions]
    else:
        points = list(itertools.product(fractions_2d, repeat=k))
    if any(block_removable(g)):
        points.append(None)
    return points


@torch.no_grad()
def measure_blocks(g, model: str, batch: int, device: torch.device | str, dtype: torch.dtype,
                   *, fractions: Sequence[float] = FRACTIONS,
                   fractions_2d: Sequence[float] = FRACTIONS_2D, repeats: int = REPEATS,
                   min_seconds: float = MIN_SECONDS, warmup: int = 2, seed: int = 0,
                   progress: bool = True) -> CnnEntry:
    """Time every block of ``model`` (dense geometry ``g``, input ``g.img_size``) at
    ``batch`` in compact models at the grid's fractions (see the module docstring)."""
    import pyengine

    if not fractions or not fractions_2d or not all(0 < f <= 1 for f in (*fractions,
                                                                          *fractions_2d)):
        raise ValueError("kept fractions must be in (0, 1]")
    dev = torch.device(device)
    torch.manual_seed(seed)
    dense = dense_model(g, model)
    points = _structures(g, fractions, fractions_2d)
    models = []
    for fr in points:
        s = removed_spec(g, model) if fr is None else uniform_spec(g, model, fr)
        gated = pyengine.gate(copy.deepcopy(dense))
        pyengine.apply(gated, s)
        compact = pyengine.compile(gated).to(device=dev, dtype=dtype).eval()
        models.append((compact, s, block_modules(compact)))
    del dense
    x = torch.randn(batch, g.in_chans, int(g.img_size), int(g.img_size), device=dev,
                    dtype=dtype)
    n_blocks = len(block_slots(g))
    totals, named, rounds = measure_in_place(
        [(m, dict(enumerate(blocks))) for m, _, blocks in models], x, repeats=repeats,
        min_seconds=min_seconds, max_rounds_factor=MAX_ROUNDS_FACTOR, warmup=warmup,
        device=dev, progress=progress, desc=f"CNN latency {model} b{batch}")
    parts = [[per[i] for i in range(n_blocks)] for per in named]
    return _entry(g, points, models, totals, parts, rounds)


def _entry(g, points, models, totals, parts, rounds) -> CnnEntry:
    """The table entry from the samples: per block its grid, its removed cost; the fixed rest."""
    slots = block_slots(g)
    med_total = [statistics.median(t) for t in totals]
    med = [[statistics.median(p) for p in per] for per in parts]
    rest = [tot - sum(bl) for tot, bl in zip(med_total, med)]
    fixed = max(statistics.median(rest), 0.0)
    blocks = []
    for i, sl in enumerate(slots):
        at: dict[tuple[int, ...], list[float]] = {}
        removed = None
        for (fr, (_, s, _)), ms in zip(zip(points, models), med):
            blk = s.blocks[i]
            if not blk.keep:
                removed = ms[i]
                continue
            w = tuple(len(blk.kept(name)) for name, _, _ in sl)
            at.setdefault(w, []).append(ms[i])
        axes = [sorted({w[j] for w in at}) for j in range(len(sl))]
        keys = list(itertools.product(*axes))
        raw = [statistics.fmean(at[k]) for k in keys]
        shape = [len(a) for a in axes]
        smooth = monotone(torch.tensor(raw, dtype=torch.float64).reshape(shape)).flatten()
        blocks.append(BlockGrid([name for name, _, _ in sl], [[float(w) for w in a] for a in axes],
                                [round(float(v), 6) for v in smooth],
                                [round(v, 6) for v in raw],
                                None if removed is None else round(removed, 6)))
    info = {"repeats": rounds,
            "structures": [{"fractions": None if fr is None else list(fr),
                            "total_ms": round(tot, 6), "blocks_ms": round(sum(bl), 6)}
                           for fr, tot, bl in zip(points, med_total, med)],
            "fixed_per_structure_ms": [round(r, 6) for r in rest]}
    return CnnEntry(round(fixed, 6), blocks, info)
