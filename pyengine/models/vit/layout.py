"""Head layouts of compact attention layers, and the planner that picks them.

A compact attention layer runs its kept heads as *buckets*: a bucket is a set of heads run as
one shape, each head zero-padded to the bucket's q/k width and v width. Padding is exact: zero
q/k columns add nothing to the scores, zero v columns come out as zero outputs that meet zero
columns of proj (a head that kept no q/k dims attends uniformly either way). The varlen
attention op then sees one run per bucket.

* ``"exact"``: one bucket per distinct (q/k, v) shape, no padding (fewest MACs; one SDPA call
  per shape on the torch path);
* ``"padded"``: one bucket at the layer's largest widths (one call, the most MACs);
* ``"auto"``: per layer, the grouping (and attention backend) with the lowest latency
  predicted by the device's latency table (:mod:`pyengine.cost.latency_table`), averaged over
  batch sizes as ratios to the exact layout. A layer leaves the exact layout only for a
  predicted gain of more than ``min_gain`` (table noise should not buy MACs).

The layout is part of the compact model's spec: ``spec.meta["layout"]`` (format
:data:`FORMAT`), so ``pyengine.save``/``pyengine.load`` rebuild the same modules, and
:func:`pyengine.cost` counts what the model computes (:func:`computed_spec`)::

    {"format": "pyengine.layout/1", "mode": "auto", "device": "cpu-...-2t",
     "device_type": "cpu", "dtype": "float32", "batches": [1, 8],
     "blocks": [{"backend": "torch", "buckets": [{"heads": [0, 4], "qk": 32, "v": 64},
                                                  {"heads": [2], "qk": 64, "v": 48}]},
                null, ...],
     "predicted_ms": {"1": {"exact": 40.1, "layout": 36.2}, ...}}

``blocks[i]`` is null where the block has no attention. ``backend``: the varlen_attention
backend the planner picked for the layer on ``device_type`` ("auto": the op's own choice);
elsewhere the layer runs "auto".
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from pyengine.structure.spec import Block, Head, Spec, SpecError

__all__ = ["FORMAT", "MODES", "Bucket", "BlockLayout", "Layout", "exact_block", "padded_block",
           "layout_of", "with_layout", "strip_layout", "computed_spec", "layer_buckets",
           "plan", "plan_block"]

FORMAT = "pyengine.layout/1"
MODES = ("auto", "exact", "padded")
EXHAUSTIVE_SHAPES = 7  # up to this many distinct head shapes: every grouping is tried


@dataclass(frozen=True)
class Bucket:
    """Heads (dense indices, in packed order) run as one shape of ``qk`` x ``v`` width."""

    heads: tuple[int, ...]
    qk: int
    v: int

    def to_dict(self) -> dict[str, Any]:
        return {"heads": list(self.heads), "qk": self.qk, "v": self.v}


@dataclass(frozen=True)
class BlockLayout:
    """The buckets of one attention layer, in packed order, and its planned backend."""

    buckets: tuple[Bucket, ...]
    backend: str = "auto"

    @property
    def order(self) -> list[int]:
        """Dense head indices in packed order."""
        return [h for b in self.buckets for h in b.heads]

    @property
    def qk_dims(self) -> list[int]:
        return [b.qk for b in self.buckets for _ in b.heads]

    @property
    def v_dims(self) -> list[int]:
        return [b.v for b in self.buckets for _ in b.heads]

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        """``[(heads, qk, v)]`` per bucket: what the latency table prices."""
        return [(len(b.heads), b.qk, b.v) for b in self.buckets]

    def describe(self) -> str:
        return "+".join(f"{len(b.heads)}x{b.qk}/{b.v}" for b in self.buckets)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "buckets": [b.to_dict() for b in self.buckets]}


@dataclass(frozen=True)
class Layout:
    """The head layout of every block of a compact ViT (None: the block has no attention)."""

    mode: str
    blocks: tuple[BlockLayout | None, ...]
    device: str | None = None        # latency-table key the plan was made for
    device_type: str | None = None   # "cpu" / "cuda": where planned backends apply
    dtype: str | None = None
    batches: tuple[int, ...] = ()
    predicted_ms: Mapping[str, Any] = field(default_factory=dict, compare=False)
    note: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT, "mode": self.mode}
        for k in ("device", "device_type", "dtype"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.batches:
            d["batches"] = list(self.batches)
        d["blocks"] = [None if b is None else b.to_dict() for b in self.blocks]
        if self.predicted_ms:
            d["predicted_ms"] = dict(self.predicted_ms)
        if self.note:
            d["note"] = self.note
        return d

    @classmethod
    def from_dict(cls, d: Any, spec: Spec, where: str = "meta.layout") -> "Layout":
        """Validated against ``spec``: every block's buckets hold exactly its kept heads, at
        widths no smaller than what they keep and no larger than the dense head."""
        from pyengine.ops.dispatch import BACKENDS
        if not isinstance(d, Mapping):
            raise SpecError(f"{where}: expected an object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise SpecError(f"{where}: format {d.get('format')!r}, this pyengine reads {FORMAT!r}")
        mode = d.get("mode")
        if mode not in MODES:
            raise SpecError(f"{where}.mode: {mode!r} is not one of {', '.join(MODES)}")
        blocks_d = d.get("blocks")
        if not isinstance(blocks_d, list) or len(blocks_d) != len(spec.blocks):
            raise SpecError(f"{where}.blocks: expected a list of {len(spec.blocks)} entries (one "
                            "per block)")
        hd = spec.dense.head_dim if spec.dense is not None else None
        blocks: list[BlockLayout | None] = []
        for i, (bd, blk) in enumerate(zip(blocks_d, spec.blocks)):
            w = f"{where}.blocks[{i}]"
            if not blk.has_attn:
                if bd is not None:
                    raise SpecError(f"{w}: the block keeps no head, its layout must be null")
                blocks.append(None)
                continue
            if not isinstance(bd, Mapping) or not isinstance(bd.get("buckets"), list):
                raise SpecError(f"{w}: expected {{'backend': ..., 'buckets': [...]}}")
            backend = bd.get("backend", "auto")
            if backend not in BACKENDS:
                raise SpecError(f"{w}.backend: {backend!r} is not one of {', '.join(BACKENDS)}")
            kept = {h.index: h for h in blk.heads}
            seen: list[int] = []
            buckets = []
            for j, bk in enumerate(bd["buckets"]):
                wb = f"{w}.buckets[{j}]"
                try:
                    heads = tuple(int(h) for h in bk["heads"])
                    qk, v = bk["qk"], bk["v"]
                except (KeyError, TypeError, ValueError):
                    raise SpecError(f"{wb}: expected {{'heads': [...], 'qk': int, 'v': int}}") \
                        from None
                if not heads or not all(isinstance(x, int) and not isinstance(x, bool)
                                        for x in (qk, v)):
                    raise SpecError(f"{wb}: needs at least one head and integer widths")
                for h in heads:
                    if h not in kept:
                        raise SpecError(f"{wb}: head {h} is not a kept head of block {i} "
                                        f"({sorted(kept)})")
                if hd is not None and (qk > hd or v > hd):
                    raise SpecError(f"{wb}: widths {qk}/{v} exceed the head dim {hd}")
                need_qk = max(len(kept[h].qk) for h in heads)
                need_v = max(len(kept[h].v) for h in heads)
                if qk < need_qk or v < need_v or v < 1:
                    raise SpecError(f"{wb}: widths {qk}/{v} are smaller than its heads keep "
                                    f"({need_qk}/{need_v})")
                seen += heads
                buckets.append(Bucket(heads, qk, v))
            if sorted(seen) != sorted(kept):
                raise SpecError(f"{w}: buckets hold heads {sorted(seen)}, the block keeps "
                                f"{sorted(kept)} (each exactly once)")
            blocks.append(BlockLayout(tuple(buckets), backend))
        batches = d.get("batches") or []
        return cls(mode, tuple(blocks), d.get("device"), d.get("device_type"), d.get("dtype"),
                   tuple(int(b) for b in batches), dict(d.get("predicted_ms") or {}),
                   d.get("note"))


# --------------------------------------------------------------------------------------
# The fixed layouts
# --------------------------------------------------------------------------------------

def _shape(h: Head) -> tuple[int, int]:
    return (len(h.qk), len(h.v))


def exact_block(block: Block) -> BlockLayout | None:
    """One bucket per distinct (q/k, v) shape, sorted by shape; heads by dense index."""
    if not block.has_attn:
        return None
    groups: dict[tuple[int, int], list[int]] = {}
    for h in sorted(block.heads, key=lambda h: (_shape(h), h.index)):
        groups.setdefault(_shape(h), []).append(h.index)
    return BlockLayout(tuple(Bucket(tuple(ix), qk, v) for (qk, v), ix in groups.items()))


def padded_block(block: Block) -> BlockLayout | None:
    """One bucket at the layer's largest q/k and v widths (heads by dense index)."""
    if not block.has_attn:
        return None
    return BlockLayout((Bucket(tuple(h.index for h in block.heads), max(block.qk_dims),
                               max(block.v_dims)),))


# --------------------------------------------------------------------------------------
# Layouts on specs
# --------------------------------------------------------------------------------------

def layout_of(spec: Spec) -> Layout | None:
    """The layout recorded in ``spec.meta`` (validated), or None."""
    d = spec.meta.get("layout") if spec.meta else None
    return None if d is None else Layout.from_dict(d, spec)


def with_layout(spec: Spec, layout: Layout) -> Spec:
    """``spec`` with ``layout`` in its meta (validated against it)."""
    if len(layout.blocks) != len(spec.blocks):
        raise SpecError(f"layout has {len(layout.blocks)} blocks, the spec {len(spec.blocks)}")
    d = layout.to_dict()
    Layout.from_dict(d, spec)
    return Spec(spec.blocks, model=spec.model, dense=spec.dense,
                meta={**dict(spec.meta), "layout": d})


def strip_layout(spec: Spec) -> Spec:
    """``spec`` without a layout: the pruned structure alone."""
    if not spec.meta or "layout" not in spec.meta:
        return spec
    meta = {k: v for k, v in spec.meta.items() if k != "layout"}
    return Spec(spec.blocks, model=spec.model, dense=spec.dense, meta=meta)


def layer_buckets(spec: Spec, i: int, layout: Layout | None = None
                  ) -> tuple[list[tuple[int, int, int]], str | None]:
    """``([(heads, qk, v)] per bucket, planned backend)`` of block ``i`` (exact without a
    layout; ``([], None)`` without attention)."""
    bl = layout.blocks[i] if layout is not None else exact_block(spec.blocks[i])
    if bl is None:
        return [], None
    return bl.shapes, bl.backend


def computed_spec(spec: Spec) -> Spec:
    """What a compact model with ``spec``'s layout computes, as a plain spec: every head at its
    bucket's widths (dims ``0..w-1``); ``spec`` itself without a layout. Costs read this."""
    layout = layout_of(spec)
    if layout is None:
        return spec
    blocks = []
    for blk, bl in zip(spec.blocks, layout.blocks):
        if bl is None:
            blocks.append(blk)
            continue
        heads = tuple(sorted((Head(h, tuple(range(b.qk)), tuple(range(b.v)))
                              for b in bl.buckets for h in b.heads), key=lambda h: h.index))
        blocks.append(Block(heads, blk.mlp))
    return strip_layout(Spec(tuple(blocks), model=spec.model, dense=spec.dense,
                             meta=dict(spec.meta)))


# --------------------------------------------------------------------------------------
# The planner
# --------------------------------------------------------------------------------------

def _partitions(items: list) -> Iterator[list[list]]:
    """Every set partition of ``items`` (Bell(n) of them)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in _partitions(rest):
        yield [[first]] + p
        for i in range(len(p)):
            yield p[:i] + [[first] + p[i]] + p[i + 1:]


Shape = tuple[int, int, int]  # (heads, qk, v)


def _merge(groups: Sequence[tuple[int, int, int, tuple[int, ...]]]
           ) -> tuple[int, int, int, tuple[int, ...]]:
    """Groups of equal-shape heads ``(count, qk, v, indices)`` as one bucket."""
    return (sum(g[0] for g in groups), max(g[1] for g in groups), max(g[2] for g in groups),
            tuple(sorted(i for g in groups for i in g[3])))


def _canonical(buckets: list[tuple[int, int, int, tuple[int, ...]]]
               ) -> list[tuple[int, int, int, tuple[int, ...]]]:
    """Buckets of equal padded shape merged (the op would run them as one run anyway),
    sorted by shape."""
    by: dict[tuple[int, int], list] = {}
    for b in buckets:
        by.setdefault((b[1], b[2]), []).append(b)
    return sorted((_merge(v) for v in by.values()), key=lambda b: (b[1], b[2], b[3]))


def plan_block(block: Block, head_dim: int, objective: Callable[[tuple[Shape, ...], str], float],
               backends: Sequence[str], baseline: str, min_gain: float = 0.02,
               widths: Sequence[int] = (), grow: bool = True) -> tuple[BlockLayout, float]:
    """The layout of one attention layer with the lowest ``objective(shapes, backend)``.

    Every grouping of the distinct head shapes is tried (up to :data:`EXHAUSTIVE_SHAPES`
    shapes; beyond, pairs of buckets are merged greedily while that helps), for each backend;
    then (``grow``) each bucket's widths may grow, to equal q/k and v widths or to a point of
    ``widths`` (a grid axis), where the table says the wider run is faster. The exact layout on ``baseline`` is kept unless the best is
    ``min_gain`` (relative) better. Returns the layout and its objective.
    """
    groups_d: dict[tuple[int, int], list[int]] = {}
    for h in sorted(block.heads, key=lambda h: h.index):
        groups_d.setdefault(_shape(h), []).append(h.index)
    groups = [(len(ix), qk, v, tuple(ix)) for (qk, v), ix in sorted(groups_d.items())]

    def score(buckets, backend) -> float:
        return objective(tuple((b[0], b[1], b[2]) for b in buckets), backend)

    exact = _canonical(groups)
    base = score(exact, baseline)
    best = (base, exact, baseline)
    for be in backends:
        if len(groups) <= EXHAUSTIVE_SHAPES:
            cands = (_canonical([_merge(p) for p in part]) for part in _partitions(groups))
            for bk in cands:
                s = score(bk, be)
                if s < best[0] - 1e-12:
                    best = (s, bk, be)
        else:  # greedy: merge the pair that helps most, while one does
            cur = exact
            cur_s = score(cur, be)
            while len(cur) > 1:
                trials = []
                for i, j in itertools.combinations(range(len(cur)), 2):
                    bk = _canonical([b for k, b in enumerate(cur) if k not in (i, j)]
                                    + [_merge([cur[i], cur[j]])])
                    trials.append((score(bk, be), bk))
                s, bk = min(trials, key=lambda t: t[0])
                if s >= cur_s:
                    break
                cur, cur_s = bk, s
            one = [_merge(groups)]
            for s, bk in ((cur_s, cur), (score(one, be), one)):
                if s < best[0] - 1e-12:
                    best = (s, bk, be)
    # wider can be faster (vector widths): grow each bucket's widths to grid points
    s_best, bk_best, be_best = best
    grid = sorted({int(w) for w in widths if 0 < w <= head_dim})
    for key in [b[3] for b in bk_best] if grow else []:
        pos = next((k for k, b in enumerate(bk_best) if b[3] == key), None)
        if pos is None:  # merged into another bucket by an earlier step
            continue
        n, qk, v, ix = bk_best[pos]
        # wider runs on grid points, and equal q/k and v widths (fused SDPA kernels need them)
        qks = sorted({qk} | ({w for w in grid if w > qk} | ({v} if v > qk else set())
                             if qk > 0 else set()))
        vs = sorted({v} | {w for w in grid if w > v} | ({qk} if qk > v else set()))
        better = None
        for q2, v2 in itertools.product(qks, vs):
            if (q2, v2) == (qk, v):
                continue
            trial = list(bk_best)
            trial[pos] = (n, q2, v2, ix)
            trial = _canonical(trial)
            s = score(trial, be_best)
            if s < s_best - 1e-12:
                s_best, better = s, trial
        if better is not None:
            bk_best = better
    if s_best > base * (1.0 - min_gain):
        s_best, bk_best, be_best = base, exact, baseline
    layout = BlockLayout(tuple(Bucket(ix, qk, v) for _, qk, v, ix in bk_best), be_best)
    return layout, s_best


def plan(spec: Spec, mode: str = "auto", device=None, dtype=None,
         batches: Sequence[int] | None = None, table=None, min_gain: float = 0.02,
         log: Callable[[str], None] | None = None) -> Spec:
    """``spec`` with a head layout for every attention layer (see the module docstring).

    ``device``: what "auto" plans for (a torch device or its name; None: the CPU); ``dtype``
    (default float32) and ``batches`` (default 1 and 8, plus every batch the table already
    measured) select the table's entries; ``table``: a
    :class:`~pyengine.cost.latency_table.LatencyTable` to use instead of the cached one.
    Without a table and with measuring off (``PYENGINE_LATENCY=off``), "auto" is "exact".
    """
    import torch

    from pyengine.cost.dtypes import as_dtype, dtype_name

    if mode not in MODES:
        raise ValueError(f"layout must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "exact":
        return with_layout(spec, Layout("exact", tuple(exact_block(b) for b in spec.blocks)))
    if mode == "padded":
        return with_layout(spec, Layout("padded", tuple(padded_block(b) for b in spec.blocks)))
    if spec.dense is None:
        raise ValueError("layout='auto' needs the spec's dense geometry (pyengine.spec(model))")
    from pyengine.cost.latency_table import TableShape, get_table
    from pyengine.ops import priority

    dev = torch.device("cpu" if device is None else device)
    dt = as_dtype(dtype if dtype is not None else torch.float32)
    want = sorted({int(b) for b in (batches or (1, 8))})
    if any(b < 1 for b in want):
        raise ValueError(f"batch sizes must be positive, got {list(batches or ())}")
    exact = Layout("auto", tuple(exact_block(b) for b in spec.blocks))
    if table is None:
        table = get_table(spec.dense, dev, dt, want, log=log)
        if table is None:
            note = "no latency table for this device and measuring is off: exact layout"
            return with_layout(spec, Layout("auto", exact.blocks, note=note))
    shape = TableShape.of(spec.dense)
    if batches is None:
        want = sorted(set(want) | set(table.batches(shape)))
    missing = [b for b in want if b not in table.batches(shape)]
    if missing and not table.batches(shape):
        raise ValueError(f"the latency table ({table.device}, {table.dtype}) has no entry for "
                         f"shape {shape.key}")
    cands = table.candidates(shape) or ["torch"]
    baseline = next((b for b in priority.auto_order("varlen_attention", dev.type)
                     if b in cands), cands[0])
    g = spec.dense
    cache: dict[tuple, float] = {}
    ref: dict[int, float] = {}

    def attn_ms(shapes, backend, b) -> float:
        key = (shapes, backend, b)
        if key not in cache:
            cache[key] = table.attention_ms(shape, b, shapes, backend)
        return cache[key]

    blocks: list[BlockLayout | None] = []
    widths = table.axis(shape, f"attn_eq/{cands[0]}", "width")
    exact_ms = {b: 0.0 for b in want}
    chosen_ms = {b: 0.0 for b in want}
    for blk in spec.blocks:
        bl0 = exact_block(blk)
        if bl0 is None:
            blocks.append(None)
            continue
        e = tuple(bl0.shapes)
        ref = {b: max(attn_ms(e, baseline, b), 1e-9) for b in want}

        def objective(shapes, backend, ref=ref) -> float:
            return sum(attn_ms(shapes, backend, b) / ref[b] for b in want) / len(want)

        bl, _ = plan_block(blk, g.head_dim, objective, cands, baseline, min_gain, widths)
        blocks.append(bl)
        for b in want:
            exact_ms[b] += ref[b]
            chosen_ms[b] += attn_ms(tuple(bl.shapes), bl.backend, b)
    predicted = {str(b): {"exact": round(exact_ms[b], 4), "layout": round(chosen_ms[b], 4)}
                 for b in want}
    layout = Layout("auto", tuple(blocks), table.device, dev.type, dtype_name(dt), tuple(want),
                    {"attention_branches": predicted})
    return with_layout(spec, layout)
