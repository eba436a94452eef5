"""The per-device latency table of a CNN: measured in-model milliseconds of every residual
block of one model as a function of its kept width(s), the cost of a removed block, and the
fixed rest (stem, head, everything between the blocks).

A CNN's blocks differ from stage to stage (their input size, their dense widths, a downsample
shortcut), so unlike a ViT's table (:mod:`pyengine.cost.latency_table`, one set of grids per
model shape) this one is per model: per (device, dtype, model name, dense geometry, input
size, batch). :mod:`pyengine.measure.cnn_latency` measures it by timing every block in place
(forward hooks) inside compact models built at a few uniform kept fractions of every block's
width, once, on first use.

One block's grid (:class:`BlockGrid`): ``axes`` are the kept channel counts measured on each of
its prunable slots (ResNet: ``conv1`` of a BasicBlock, ``conv1`` and ``conv2`` of a Bottleneck:
a 2-D grid; ConvNeXt, EfficientNet / MobileNetV3, RegNet: their one slot; none for a block
with nothing to prune), ``ms`` the block's in-model time at those widths (C order),
``removed_ms`` what a removed block costs (its shortcut: a downsample conv, or nothing; None
where the block cannot be removed). The ms of a block at other widths:

* the measured medians are first made non-decreasing along every axis (the mean of the running
  maximum from below and the running minimum from above; a no-op where the timings already
  grow with the width), so that keeping more channels never predicts less time: ``ms`` holds
  these values, ``measured_ms`` the raw medians;
* every axis whose first point is above 1 gets a point at width 1 on its first segment's line
  (floored at 0): below the narrowest measured width the time falls linearly toward it;
* between points: multilinear (linear in 1-D, bilinear in 2-D), computed as ``lo + t * (hi -
  lo)`` kept between ``lo`` and ``hi`` (so a wider block is never cheaper, not even by a
  rounding error); on a point its value exactly; beyond the widest point the last value holds
  (no block is wider than its dense width).

A structure's prediction is ``fixed + sum over blocks (ms at its kept widths, or removed_ms)``:
so the dense model and every uniform structure of the grid are predicted exactly as measured.

The cache: ``<cache>/latency/cnn-<device key>-<dtype>.json`` beside the ViT tables (same
directory, same ``PYENGINE_LATENCY=off`` switch that never measures)::

    {"format": "pyengine.cnn-latency/1", "device": "cpu-...-2t", "dtype": "float32",
     "env": {...pyengine.measure.timing.environment()},
     "models": {"<key>": {"model": "resnet18", "img_size": 224, "dense": {...geometry...},
                          "batches": {"1": {"fixed_ms": 1.2, "seconds": 9.1, "created": "...",
                                            "repeats": 7, "blocks": [
                                              {"slots": ["conv1"], "axes": [[8, 16, 32, 48, 64]],
                                               "ms": [...], "measured_ms": [...],
                                               "removed_ms": 0.001}, ...]}}}}}

A table made under another torch version is stale and is measured again.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from pyengine.cost.dtypes import as_dtype, dtype_name
from pyengine.cost.latency_table import (LatencyTableError, cache_dir, check_header, device_key,
                                         load_cached, measuring_enabled, read_json)

__all__ = ["FORMAT", "BlockGrid", "CnnEntry", "CnnLatencyTable", "cnn_table_path", "cnn_key",
           "block_slots", "block_removable", "block_widths", "get_cnn_table", "monotone"]

FORMAT = "pyengine.cnn-latency/1"


# --------------------------------------------------------------------------------------
# What a CNN's blocks are, family-free (ResNet CnnGeometry or a BlockGeometry)
# --------------------------------------------------------------------------------------

def block_slots(g) -> list[list[tuple[str, int, int]]]:
    """Per block its prunable slots as ``(name, dense channels, channels per unit)``."""
    if hasattr(g, "inner"):  # ResNet: every inner conv, channel by channel
        return [[(sl, int(c), 1) for sl, c in zip(g.slots, inner)] for inner in g.inner]
    return [[(b.slot, int(b.channels), int(b.group))] if b.slot else [] for b in g.blocks]


def block_removable(g) -> list[bool]:
    """Per block whether its residual branch can be removed (every ResNet block can)."""
    if hasattr(g, "inner"):
        return [True] * len(g.inner)
    return [bool(b.removable) for b in g.blocks]


def block_widths(spec_block, slots: Sequence[tuple[str, int, int]]) -> list[int]:
    """The kept channels of each of a block's prunable ``slots`` (:func:`block_slots`) in its
    spec ``spec_block``."""
    return [len(spec_block.kept(name)) for name, _, _ in slots]


def cnn_key(g, model: str) -> str:
    """The table key of a dense CNN: its timm name, input size and a digest of its geometry
    (blocks, widths, classes, timm kwargs): another input size or geometry measures anew."""
    if not model:
        raise LatencyTableError("the CNN latency table is per model: the spec needs its "
                                "'model' name (pyengine.spec(model) fills it)")
    d = json.dumps(g.to_dict(), sort_keys=True, default=str)
    digest = hashlib.sha1(f"{type(g).__name__}:{d}".encode()).hexdigest()[:10]
    return f"{model}-{int(g.img_size)}px-{digest}"


def cnn_table_path(device: str | torch.device | None = None, dtype=torch.float32) -> Path:
    """``<cache>/latency/cnn-<device key>-<dtype>.json`` (beside the ViT tables)."""
    return cache_dir() / f"cnn-{device_key(device)}-{dtype_name(as_dtype(dtype))}.json"


# --------------------------------------------------------------------------------------
# One block's grid
# --------------------------------------------------------------------------------------

def monotone(values: torch.Tensor) -> torch.Tensor:
    """``values`` (float64, one axis per dimension) made non-decreasing along every axis: per
    axis the mean of the running maximum from below and the running minimum from above (both
    non-decreasing, and order-preserving between neighbouring lines, so later axes keep what
    earlier ones made monotone). Values already non-decreasing come back unchanged."""
    v = values.clone()
    for d in range(v.dim()):
        up = torch.cummax(v, d).values
        down = torch.flip(torch.cummin(torch.flip(v, (d,)), d).values, (d,))
        v = (up + down) / 2
    return v


def _extend(axes: list[list[float]], v: torch.Tensor) -> tuple[list[list[float]], torch.Tensor]:
    """Every axis whose first point is above 1 extended down to width 1 by its first segment
    (floored at 0; the new line made non-decreasing along the other axes by a running
    maximum, which keeps it at or below the first line)."""
    axes = [list(a) for a in axes]
    for d, pts in enumerate(axes):
        if pts[0] <= 1 or len(pts) < 2:
            continue
        v0, v1 = v.select(d, 0), v.select(d, 1)
        slope = (v1 - v0) / (pts[1] - pts[0])
        new = (v0 - (pts[0] - 1) * slope).clamp_min(0.0)
        for e in range(new.dim()):
            new = torch.cummax(new, e).values
        v = torch.cat([new.unsqueeze(d), v], d)
        axes[d] = [1.0] + pts
    return axes, v


@dataclass
class BlockGrid:
    """One block's in-model ms by kept width of each slot (see the module docstring)."""

    slots: list[str]
    axes: list[list[float]]          # per slot: increasing kept channel counts
    ms: list[float]                  # non-decreasing, C order over the axes (1 value: no slot)
    measured_ms: list[float] | None = None  # the raw medians the ms came from
    removed_ms: float | None = None  # the block removed (None: it cannot be)
    _ext: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if len(self.slots) != len(self.axes):
            raise LatencyTableError(f"block grid: {len(self.slots)} slots but {len(self.axes)} "
                                    "axes")
        n = 1
        for pts in self.axes:
            if not pts or any(b <= a for a, b in zip(pts, pts[1:])) or pts[0] < 1:
                raise LatencyTableError(f"block grid axis: widths must be >= 1 and increase, "
                                        f"got {pts}")
            n *= len(pts)
        vals = list(self.ms) + ([self.removed_ms] if self.removed_ms is not None else [])
        if len(self.ms) != n or not all(isinstance(x, (int, float)) and math.isfinite(x)
                                        and x >= 0 for x in vals):
            raise LatencyTableError(f"block grid over {len(self.axes)} axes needs {n} finite "
                                    f"values >= 0, got {len(self.ms)}")
        shape = [len(p) for p in self.axes]
        v = torch.tensor(self.ms, dtype=torch.float64).reshape(shape)
        if not torch.equal(monotone(v), v):
            raise LatencyTableError("block grid: ms must not decrease with the width")
        axes, ext = _extend([[float(x) for x in p] for p in self.axes], v)
        strides, step = [], 1
        for pts in reversed(axes):
            strides.insert(0, step)
            step *= len(pts)
        self._ext = (axes, ext.flatten().tolist(), strides)

    def __call__(self, widths: Sequence[int]) -> float:
        """ms of the block kept at ``widths`` (one kept channel count per slot)."""
        if len(widths) != len(self.axes):
            raise LatencyTableError(f"block grid over slots {self.slots} evaluated at "
                                    f"{len(widths)} widths")
        axes, v, strides = self._ext
        spans = []
        for x, pts in zip(widths, axes):
            x = float(x)
            if x <= pts[0]:
                spans.append((0, 0, 0.0))
            elif x >= pts[-1]:
                spans.append((len(pts) - 1, len(pts) - 1, 0.0))
            else:
                i = next(j for j in range(1, len(pts)) if x <= pts[j])
                if x == pts[i]:  # on a point: its value, exactly
                    spans.append((i, i, 0.0))
                else:
                    spans.append((i - 1, i, (x - pts[i - 1]) / (pts[i] - pts[i - 1])))

        def at(d: int, offset: int) -> float:
            """Linear along axis d of the values at ``offset`` (``lo + t * (hi - lo)``, kept
            between the two: non-decreasing in the width, even in floating point)."""
            if d == len(spans):
                return v[offset]
            lo_i, hi_i, t = spans[d]
            lo = at(d + 1, offset + lo_i * strides[d])
            if hi_i == lo_i:
                return lo
            hi = at(d + 1, offset + hi_i * strides[d])
            return min(max(lo + t * (hi - lo), min(lo, hi)), max(lo, hi))

        return at(0, 0)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"slots": list(self.slots),
                             "axes": [[int(x) for x in p] for p in self.axes],
                             "ms": list(self.ms), "removed_ms": self.removed_ms}
        if self.measured_ms is not None:
            d["measured_ms"] = list(self.measured_ms)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "block") -> "BlockGrid":
        try:
            return cls([str(s) for s in d["slots"]], [[float(x) for x in p] for p in d["axes"]],
                       [float(x) for x in d["ms"]],
                       [float(x) for x in d["measured_ms"]] if d.get("measured_ms") else None,
                       None if d.get("removed_ms") is None else float(d["removed_ms"]))
        except LatencyTableError as e:
            raise LatencyTableError(f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LatencyTableError(f"{where}: expected {{'slots', 'axes', 'ms', 'removed_ms'}} "
                                    f"({type(e).__name__}: {e})") from None


@dataclass
class CnnEntry:
    """The measured blocks of one model at one batch: ``fixed_ms`` (whole-model time less the
    blocks: stem, head, everything between) and one :class:`BlockGrid` per block (spec order);
    ``info``: how it was measured."""

    fixed_ms: float
    blocks: list[BlockGrid]
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.info, "fixed_ms": self.fixed_ms, "blocks": [b.to_dict()
                                                                  for b in self.blocks]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> "CnnEntry":
        if not isinstance(d, Mapping) or "fixed_ms" not in d or "blocks" not in d:
            raise LatencyTableError(f"{where}: expected {{'fixed_ms', 'blocks', ...}}")
        fixed = d["fixed_ms"]
        if not isinstance(fixed, (int, float)) or not math.isfinite(fixed) or fixed < 0:
            raise LatencyTableError(f"{where}.fixed_ms: expected a finite number >= 0, got "
                                    f"{fixed!r}")
        blocks = [BlockGrid.from_dict(b, f"{where}.blocks[{i}]")
                  for i, b in enumerate(d["blocks"])]
        return cls(float(fixed), blocks, {k: v for k, v in d.items()
                                          if k not in ("fixed_ms", "blocks")})


# --------------------------------------------------------------------------------------
# The table of one device and dtype
# --------------------------------------------------------------------------------------

class CnnLatencyTable:
    """Measured CNN blocks of one device and dtype, per model key and batch."""

    def __init__(self, device: str, dtype: str, env: Mapping[str, Any] | None = None,
                 models: Mapping[str, Any] | None = None):
        self.device = device
        self.dtype = dtype_name(as_dtype(dtype))
        self.env = dict(env or {})
        # key -> {"model", "img_size", "dense": {...}, "batches": {batch: CnnEntry}}
        self.models: dict[str, dict[str, Any]] = dict(models or {})

    def entry(self, g, model: str, batch: int) -> CnnEntry | None:
        m = self.models.get(cnn_key(g, model))
        return None if m is None else m["batches"].get(int(batch))

    def add(self, g, model: str, batch: int, entry: CnnEntry) -> None:
        if len(entry.blocks) != len(block_slots(g)):
            raise LatencyTableError(f"{len(entry.blocks)} measured blocks for a model of "
                                    f"{len(block_slots(g))}")
        m = self.models.setdefault(cnn_key(g, model), {
            "model": model, "img_size": int(g.img_size), "dense": g.to_dict(), "batches": {}})
        m["batches"][int(batch)] = entry

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "device": self.device, "dtype": self.dtype, "env": self.env,
                "models": {k: {**{n: v for n, v in m.items() if n != "batches"},
                               "batches": {str(b): e.to_dict()
                                           for b, e in sorted(m["batches"].items())}}
                           for k, m in self.models.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "CNN latency table"
                  ) -> "CnnLatencyTable":
        check_header(d, where, FORMAT, "models")
        models = {}
        for key, m in d["models"].items():
            w = f"{where}: models[{key!r}]"
            if not isinstance(m, Mapping) or "batches" not in m:
                raise LatencyTableError(f"{w}: expected {{'model', 'dense', 'batches'}}")
            batches = {}
            for b, e in m["batches"].items():
                try:
                    bi = int(b)
                except ValueError:
                    raise LatencyTableError(f"{w}: batch {b!r} is not an integer") from None
                batches[bi] = CnnEntry.from_dict(e, f"{w}.batches[{b!r}]")
            models[key] = {**{n: v for n, v in m.items() if n != "batches"}, "batches": batches}
        return cls(str(d["device"]), str(d["dtype"]), d.get("env") or {}, models)

    def save(self, path: str | os.PathLike) -> Path:
        from pyengine.io.atomic import write_text
        return write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CnnLatencyTable":
        return cls.from_dict(read_json(path), str(path))


def get_cnn_table(g, model: str, device: str | torch.device | None = None, dtype=torch.float32,
                  batch: int = 1, *, path: str | os.PathLike | None = None,
                  measure: bool | None = None, progress: bool = True,
                  log: Callable[[str], None] | None = None,
                  **measure_options) -> CnnLatencyTable | None:
    """The CNN table of ``device``/``dtype`` holding model ``model`` of dense geometry ``g``
    at ``batch``: read from the cache, measured (once; a progress bar; saved back) when it is
    missing. None when it is missing and measuring is off (``measure=False`` or
    ``PYENGINE_LATENCY=off``)."""
    from pyengine.measure import cnn_latency

    if not g.img_size or int(g.img_size) <= 0:
        raise LatencyTableError(_NO_SIZE)
    dev = torch.device("cpu" if device is None else device)
    dt = as_dtype(dtype)
    key = device_key(dev)
    p = Path(path) if path is not None else cnn_table_path(dev, dt)

    def stale(t) -> str | None:
        tv = t.env.get("torch")
        return (f"measured with torch {tv}, this is {torch.__version__}"
                if tv is not None and tv != torch.__version__ else None)

    table = load_cached(CnnLatencyTable, p, key, dtype_name(dt), stale, log,
                        what="CNN latency table")
    if table is not None and table.entry(g, model, batch) is not None:
        return table
    if measure is None:
        measure = measuring_enabled()
    if not measure:
        return None
    if table is None:
        from pyengine.measure.timing import environment
        table = CnnLatencyTable(key, dtype_name(dt), environment(dev))
    if log:
        log(f"measuring the {key} {dtype_name(dt)} latency table of {model} at "
            f"{g.img_size}px, batch {batch} (once; cached in {p})")
    t0 = time.perf_counter()
    entry = cnn_latency.measure_blocks(g, model, int(batch), dev, dt, progress=progress,
                                       **measure_options)
    entry.info.update(seconds=round(time.perf_counter() - t0, 1),
                      created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    table.add(g, model, batch, entry)
    table.save(p)
    return table


_NO_SIZE = ("the latency of a CNN depends on its input size, and the spec's dense geometry has "
            "img_size 0: create the model with pyengine.create_model(name, img_size=N) "
            "(--img-size N on the command line)")
