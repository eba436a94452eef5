"""The per-device latency table: measured milliseconds of the layers a ViT is made of, by width.

The layout planner of :func:`pyengine.compile` and the latency model of a Spec read it. A table
belongs to one device (its :func:`device_key`) and one dtype, and holds, per model shape
(:class:`TableShape`: tokens N, embed dim D, head count and width, FFN width, stem,
classifier and depth) and per batch size, these grids of medians
(:mod:`pyengine.measure.latency_grid` measures them with the one timing harness):

=================  ==============  ============================================================
grid               axes            what one timed call runs
=================  ==============  ============================================================
attn_eq/<backend>  heads, width    ``pyengine.ops.varlen_attention`` with that backend: ``heads``
                                   heads whose q/k and v are both ``width`` wide (q, k, v are
                                   slices of one packed projection, as in a compact layer)
attn_ne/<backend>  heads, qk, v    the same with q/k width ``qk`` != v width ``v``: measured on v
                                   points between the qk points, so no point has equal widths
                                   (SDPA's fused kernels need equal widths: off the diagonal
                                   torch falls back to a slower path, a different function)
attn0/<backend>    heads, v        ``qk = 0`` (uniform attention: a mean of V)
runs/<backend>     runs            what splitting one call into ``runs`` runs of different
                                   shapes adds to the sum of the runs timed one call each
                                   (negative: one op call instead of several; 0 at 1 run)
qkv                width           ``Linear(D, width)`` on ``[B, N, D]``
proj               width           ``Linear(width, D)`` on ``[B, N, width]``
mlp                width           timm ``Mlp(D, width)``: fc1, GELU, fc2
branch             (none)          ``LayerNorm(D)`` and the residual add of one block branch
stem               (none)          patch-embedding conv, prefix tokens, position embedding
head               (none)          final LayerNorm, token pooling, classifier
calib_attn         (none)          in-model ms per grid ms of attention modules (qkv, op, proj)
calib_mlp          (none)          the same for FFN modules
attn_ctx           (none)          ms of a kept attention branch in a model beside its grids
mlp_ctx            (none)          the same for a kept FFN branch
forward_ctx        (none)          ms per forward in a model beside stem, head and branches
=================  ==============  ============================================================

The last five come from whole compact models of the shape timed with their modules timed in
place (:mod:`pyengine.measure.latency_calibration`); a calibrated table prices a kept branch as
``<kind>_ctx + calib_<kind> * (its grids)`` and counts ``forward_ctx`` with the head; an
uncalibrated one prices a branch as ``branch + (its grids)``.

A run of ``h`` heads of widths ``(qk, v)`` costs ``attn0(h, v)`` if ``qk == 0``,
``attn_eq(h, qk)`` if ``qk == v``, else ``attn_ne(h, qk, v)``.

Between grid points values are interpolated linearly along each axis (multilinear); below an
axis' first point the first value holds, above its last point the last segment extends. Across
batch sizes: linear between measured batches, proportional to the batch above the largest (the
throughput-bound regime) and the smallest batch's value below it.

Predictions (all in ms, for one batch of ``batch`` images):

    t = get_table(geometry, device="cpu", dtype=torch.float32)   # cached; measured if missing
    t.core_ms(g, batch, [(heads, qk, v), ...], backend="torch")  # the attention op of a layer
    t.attention_ms(g, batch, buckets, backend)   # branch + qkv + core + proj
    t.mlp_ms(g, batch, width)                    # branch + Mlp
    t.stem_ms(g, batch), t.head_ms(g, batch)     # fixed costs outside the blocks
    t.spec_ms(spec, batch)                       # a whole model (the spec's layout if it has one)

A bucket ``(heads, qk, v)`` is ``heads`` heads run as one shape; the buckets of a layer are its
runs (exact layout: one per distinct head shape; padded: one).

The cache: ``<cache>/latency/<device key>-<dtype>.json`` where ``<cache>`` is ``$PYENGINE_CACHE``
or ``~/.cache/pyengine``. The file (format :data:`FORMAT`)::

    {"format": "pyengine.latency/1", "device": "cpu-amd-epyc-7b13-2t", "dtype": "float32",
     "env": {...pyengine.measure.timing.environment(), "extension_id": ...},
     "shapes": {"<shape key>": {"shape": {...TableShape...},
                                "batches": {"1": {"candidates": ["torch", "cpu"],
                                                  "seconds": 12.3, "created": "...",
                                                  "grids": {"attn_eq/torch": {"axes": {
                                                            "heads": [..], "width": [..]},
                                                            "ms": [.. C order ..],
                                                            "iqr_ms": [..]}, ...}}}}}}

A table made under another torch version or another build of pyengine._C is stale and is
measured again. ``PYENGINE_LATENCY=off`` never measures: without a cached table, layout "auto"
falls back to "exact" (the test suite sets it).
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from pyengine.cost.dtypes import as_dtype, dtype_name

__all__ = ["FORMAT", "Grid", "TableShape", "LatencyTable", "LatencyTableError", "cache_dir",
           "device_key", "table_path", "load_table", "get_table", "measuring_enabled",
           "interpolate_batch"]

FORMAT = "pyengine.latency/1"

# the grids a table holds per batch (backend-specific ones carry "/<backend>")
BACKEND_GRIDS = ("attn_eq", "attn_ne", "attn0", "runs")
PLAIN_GRIDS = ("qkv", "proj", "mlp", "branch", "stem", "head")
# scalars timed inside whole models (pyengine.measure.latency_calibration)
CALIBRATION_GRIDS = ("calib_attn", "calib_mlp", "attn_ctx", "mlp_ctx", "forward_ctx")


class LatencyTableError(ValueError):
    """A latency table that is malformed, stale or lacks what a prediction needs."""


# --------------------------------------------------------------------------------------
# Where tables live, and for which device
# --------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """``$PYENGINE_CACHE/latency`` (default ``~/.cache/pyengine/latency``)."""
    root = os.environ.get("PYENGINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                            "pyengine")
    return Path(root) / "latency"


def measuring_enabled() -> bool:
    """False when ``PYENGINE_LATENCY=off``: tables are read from the cache, never measured."""
    return os.environ.get("PYENGINE_LATENCY", "").strip().lower() not in ("off", "0", "no")


def _slug(text: str) -> str:
    s = re.sub(r"\(r\)|\(tm\)|cpu @.*$|processor", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-")[:60] or "unknown"


def device_key_for(kind: str, name: str, threads: int | None = None) -> str:
    """The key of a device: ``cpu-<cpu model>-<threads>t`` or ``cuda-<gpu name>`` (lower case,
    dashes). Latency on a CPU depends on the threads torch uses, so they are part of the key."""
    if kind == "cpu":
        if not threads or threads < 1:
            raise ValueError(f"a CPU device key needs the thread count, got {threads!r}")
        return f"cpu-{_slug(name)}-{int(threads)}t"
    if kind == "cuda":
        return f"cuda-{_slug(name)}"
    raise ValueError(f"latency tables are per cpu or cuda device, got device type {kind!r}")


def device_key(device: str | torch.device | None = None) -> str:
    """The key of ``device`` on this machine (None: the CPU)."""
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cpu":
        from pyengine.measure.timing import _cpu_model
        return device_key_for("cpu", _cpu_model(), torch.get_num_threads())
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LatencyTableError(f"device {str(dev)!r}: torch sees no CUDA GPU here")
        return device_key_for("cuda", torch.cuda.get_device_name(dev))
    raise LatencyTableError(f"latency tables are per cpu or cuda device, got {str(dev)!r}")


def table_path(device: str | torch.device | None = None, dtype=torch.float32) -> Path:
    """``<cache>/latency/<device key>-<dtype>.json``."""
    return cache_dir() / f"{device_key(device)}-{dtype_name(as_dtype(dtype))}.json"


def _extension_id() -> str | None:
    """Which build of pyengine._C is loaded (its file's size and time): a rebuilt kernel makes
    a table stale."""
    from pyengine.ops import _ext
    mod = _ext.extension()
    path = getattr(mod, "__file__", None) if mod is not None else None
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size}-{int(st.st_mtime)}"


# --------------------------------------------------------------------------------------
# One measured function on a grid
# --------------------------------------------------------------------------------------

@dataclass
class Grid:
    """Medians on a rectilinear grid: ``axes`` (ordered name -> increasing points) and ``ms``
    in C order over the axes (one value when there are no axes)."""

    axes: dict[str, list[float]]
    ms: list[float]
    iqr_ms: list[float] | None = None

    def __post_init__(self):
        n = 1
        for name, pts in self.axes.items():
            if not pts or any(b <= a for a, b in zip(pts, pts[1:])):
                raise LatencyTableError(f"grid axis {name!r}: points must increase, got {pts}")
            n *= len(pts)
        if len(self.ms) != n or not all(isinstance(v, (int, float)) and math.isfinite(v)
                                        for v in self.ms):
            raise LatencyTableError(f"grid over {list(self.axes)} needs {n} finite values, got "
                                    f"{len(self.ms)}")

    def __call__(self, **coords: float) -> float:
        if set(coords) != set(self.axes):
            raise LatencyTableError(f"grid over {list(self.axes)} evaluated at {sorted(coords)}")
        # per axis: the two neighbouring points and the weight of the upper one
        spans = []
        for name, pts in self.axes.items():
            x = float(coords[name])
            if len(pts) == 1 or x <= pts[0]:
                spans.append(((0, 1.0),))
                continue
            i = min(next((j for j in range(1, len(pts)) if x <= pts[j]), len(pts) - 1),
                    len(pts) - 1)
            t = (x - pts[i - 1]) / (pts[i] - pts[i - 1])  # > 1 above the last point
            spans.append(((i - 1, 1.0 - t), (i, t)))
        strides = []
        s = 1
        for pts in reversed(list(self.axes.values())):
            strides.append(s)
            s *= len(pts)
        strides.reverse()
        total = 0.0

        def walk(d: int, offset: int, w: float) -> None:
            nonlocal total
            if d == len(spans):
                total += w * self.ms[offset]
                return
            for idx, wt in spans[d]:
                if wt != 0.0:
                    walk(d + 1, offset + idx * strides[d], w * wt)

        walk(0, 0, 1.0)
        return total

    def to_dict(self) -> dict[str, Any]:
        # 0.1 microsecond is below any timer's resolution here
        d: dict[str, Any] = {"axes": {k: list(v) for k, v in self.axes.items()},
                             "ms": [round(v, 5) for v in self.ms]}
        if self.iqr_ms is not None:
            d["iqr_ms"] = [round(v, 5) for v in self.iqr_ms]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "grid") -> "Grid":
        try:
            axes = {str(k): [float(x) for x in v] for k, v in d["axes"].items()}
            return cls(axes, [float(x) for x in d["ms"]],
                       [float(x) for x in d["iqr_ms"]] if d.get("iqr_ms") is not None else None)
        except LatencyTableError as e:
            raise LatencyTableError(f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LatencyTableError(f"{where}: expected {{'axes': {{...}}, 'ms': [...]}} "
                                    f"({type(e).__name__}: {e})") from None


def interpolate_batch(values: Mapping[int, float], batch: int) -> float:
    """A value at ``batch`` from values at measured batch sizes: linear between them,
    proportional to the batch above the largest, the smallest batch's value below it."""
    if not values:
        raise LatencyTableError("no measured batch sizes")
    bs = sorted(values)
    if batch <= bs[0]:
        return values[bs[0]]
    if batch >= bs[-1]:
        return values[bs[-1]] * batch / bs[-1]
    for lo, hi in zip(bs, bs[1:]):
        if batch <= hi:
            t = (batch - lo) / (hi - lo)
            return values[lo] * (1 - t) + values[hi] * t
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------
# The model shape a part of the table belongs to
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TableShape:
    """What the measured layers' sizes depend on: a ViT's tokens, widths, stem and classifier.
    :meth:`of` takes a :class:`~pyengine.structure.spec.Geometry` (or a Spec with one)."""

    tokens: int
    embed_dim: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    num_patches: int
    in_chans: int = 3
    patch_size: tuple[int, int] = (16, 16)
    num_classes: int = 0
    depth: int = 12  # blocks: the grids do not depend on it, the whole-model calibration does

    @classmethod
    def of(cls, x: Any) -> "TableShape":
        if isinstance(x, TableShape):
            return x
        g = getattr(x, "dense", x)
        need = ("num_tokens", "embed_dim", "num_heads", "head_dim", "mlp_hidden", "num_patches")
        if g is None or not all(hasattr(g, n) for n in need):
            raise LatencyTableError(f"a latency table needs a ViT geometry (pyengine.geometry("
                                    f"model), or a spec with 'dense'), got {type(x).__name__}")
        if g.num_tokens <= 0 or g.num_patches <= 0:
            raise LatencyTableError("the geometry has no token count (num_tokens / num_patches);"
                                    " take it from a model: pyengine.geometry(model)")
        return cls(g.num_tokens, g.embed_dim, g.num_heads, g.head_dim, g.mlp_hidden,
                   g.num_patches, g.in_chans, tuple(g.patch_size), g.num_classes, g.depth)

    @property
    def key(self) -> str:
        ph, pw = self.patch_size
        return (f"n{self.tokens}-d{self.embed_dim}-h{self.num_heads}x{self.head_dim}"
                f"-m{self.mlp_hidden}-p{self.num_patches}x{self.in_chans}x{ph}x{pw}"
                f"-c{self.num_classes}-L{self.depth}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TableShape":
        try:
            kw = dict(d)
            kw["patch_size"] = tuple(int(p) for p in kw.get("patch_size", (16, 16)))
            return cls(**kw)
        except TypeError as e:
            raise LatencyTableError(f"shape: {e}") from None


Bucket = tuple[int, int, int]  # (heads, qk width, v width) run as one shape


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------

class LatencyTable:
    """Measured grids of one device and dtype, per model shape and batch size (see the module
    docstring); lookups interpolate, predictions add grids up."""

    def __init__(self, device: str, dtype: str, env: Mapping[str, Any] | None = None,
                 shapes: Mapping[str, Any] | None = None):
        self.device = device
        self.dtype = dtype_name(as_dtype(dtype))
        self.env = dict(env or {})
        # shape key -> {"shape": TableShape, "batches": {batch: {"grids": {name: Grid}, ...}}}
        self.shapes: dict[str, dict[str, Any]] = dict(shapes or {})

    # ---- file --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        shapes = {}
        for key, entry in self.shapes.items():
            batches = {}
            for b, part in sorted(entry["batches"].items()):
                p = {k: v for k, v in part.items() if k != "grids"}
                p["grids"] = {n: g.to_dict() for n, g in part["grids"].items()}
                batches[str(b)] = p
            shapes[key] = {"shape": entry["shape"].to_dict(), "batches": batches}
        return {"format": FORMAT, "device": self.device, "dtype": self.dtype, "env": self.env,
                "shapes": shapes}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "latency table") -> "LatencyTable":
        check_header(d, where, FORMAT, "shapes")
        shapes: dict[str, dict[str, Any]] = {}
        for key, entry in d["shapes"].items():
            w = f"{where}: shapes[{key!r}]"
            if not isinstance(entry, Mapping) or "shape" not in entry or "batches" not in entry:
                raise LatencyTableError(f"{w}: expected {{'shape': ..., 'batches': ...}}")
            shape = TableShape.from_dict(entry["shape"])
            if shape.key != key:
                raise LatencyTableError(f"{w}: key does not match its shape ({shape.key})")
            batches = {}
            for b, part in entry["batches"].items():
                try:
                    bi = int(b)
                except ValueError:
                    raise LatencyTableError(f"{w}: batch {b!r} is not an integer") from None
                if bi < 1 or not isinstance(part, Mapping) or "grids" not in part:
                    raise LatencyTableError(f"{w}.batches[{b!r}]: expected a batch >= 1 with "
                                            "'grids'")
                p = {k: v for k, v in part.items() if k != "grids"}
                p["grids"] = {n: Grid.from_dict(g, f"{w}.batches[{b!r}].grids[{n!r}]")
                              for n, g in part["grids"].items()}
                batches[bi] = p
            shapes[key] = {"shape": shape, "batches": batches}
        return cls(str(d["device"]), str(d["dtype"]), d.get("env") or {}, shapes)

    def to_json(self) -> str:
        """Readable JSON: one line per grid."""
        d = self.to_dict()
        grids: dict[str, str] = {}

        def mark(obj):  # grids become placeholders, dumped on one line each below
            for entry in obj["shapes"].values():
                for part in entry["batches"].values():
                    for name, g in part["grids"].items():
                        token = f"@@grid{len(grids)}@@"
                        grids[token] = json.dumps(g)
                        part["grids"][name] = token
            return obj

        text = json.dumps(mark(d), indent=1)
        for token, g in grids.items():
            text = text.replace(json.dumps(token), g)
        return text + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        from pyengine.io.atomic import write_text
        return write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        return cls.from_dict(read_json(path), str(path))

    # ---- contents ----------------------------------------------------------------------
    def add(self, shape: Any, batch: int, grids: Mapping[str, Grid],
            candidates: Sequence[str], **info) -> None:
        """Record the grids measured for ``shape`` at ``batch`` (replacing earlier ones)."""
        s = TableShape.of(shape)
        entry = self.shapes.setdefault(s.key, {"shape": s, "batches": {}})
        entry["batches"][int(batch)] = {"candidates": list(candidates), **info,
                                        "grids": dict(grids)}

    def batches(self, shape: Any) -> list[int]:
        entry = self.shapes.get(TableShape.of(shape).key)
        return sorted(entry["batches"]) if entry else []

    def candidates(self, shape: Any) -> list[str]:
        """Attention backends measured at every batch of ``shape``."""
        entry = self.shapes.get(TableShape.of(shape).key)
        if not entry or not entry["batches"]:
            return []
        sets = [set(p.get("candidates", [])) for p in entry["batches"].values()]
        first = entry["batches"][min(entry["batches"])].get("candidates", [])
        return [c for c in first if all(c in s for s in sets)]

    def has(self, shape: Any, batches: Iterable[int], candidates: Iterable[str] = ()) -> bool:
        entry = self.shapes.get(TableShape.of(shape).key)
        if not entry:
            return False
        for b in batches:
            part = entry["batches"].get(int(b))
            if part is None or not set(candidates) <= set(part.get("candidates", [])):
                return False
        return True

    def axis(self, shape: Any, grid: str, axis: str) -> list[float]:
        """The points of ``axis`` of ``grid`` (at the smallest measured batch)."""
        entry = self._entry(shape)
        part = entry["batches"][min(entry["batches"])]
        g = part["grids"].get(grid)
        if g is None or axis not in g.axes:
            raise LatencyTableError(f"{self.device}/{self.dtype}: no grid {grid!r} with axis "
                                    f"{axis!r}")
        return list(g.axes[axis])

    def _entry(self, shape: Any) -> dict[str, Any]:
        s = TableShape.of(shape)
        entry = self.shapes.get(s.key)
        if not entry or not entry["batches"]:
            raise LatencyTableError(f"the {self.device} {self.dtype} latency table has no "
                                    f"entry for shape {s.key}; measure it with pyengine "
                                    "latency-table or get_table()")
        return entry

    def value(self, shape: Any, grid: str, batch: int, **coords: float) -> float:
        """One grid's interpolated ms at ``batch`` and ``coords``."""
        entry = self._entry(shape)
        vals = {}
        for b, part in entry["batches"].items():
            g = part["grids"].get(grid)
            if g is not None:
                vals[b] = g(**coords)
        if not vals:
            raise LatencyTableError(f"the {self.device} {self.dtype} latency table has no grid "
                                    f"{grid!r} for shape {entry['shape'].key}")
        return interpolate_batch(vals, batch)

    # ---- predictions (ms) --------------------------------------------------------------
    def core_ms(self, shape: Any, batch: int, buckets: Sequence[Bucket],
                backend: str = "torch") -> float:
        """The varlen attention op of one layer whose heads run as ``buckets``."""
        buckets = [b for b in buckets if b[0] > 0 and b[2] > 0]
        if not buckets:
            return 0.0
        t = sum(self.run_ms(shape, batch, h, qk, v, backend) for h, qk, v in buckets)
        if len(buckets) > 1:
            t += self.value(shape, f"runs/{backend}", batch, runs=len(buckets))
        return max(t, 0.0)

    def run_ms(self, shape: Any, batch: int, heads: int, qk: int, v: int,
               backend: str = "torch") -> float:
        """One run of the op alone: ``heads`` heads of q/k width ``qk`` and v width ``v``."""
        if qk == 0:
            return self.value(shape, f"attn0/{backend}", batch, heads=heads, v=v)
        if qk == v:
            return self.value(shape, f"attn_eq/{backend}", batch, heads=heads, width=qk)
        return self.value(shape, f"attn_ne/{backend}", batch, heads=heads, qk=qk, v=v)

    def calibrated(self, shape: Any) -> bool:
        """Whether every measured batch of ``shape`` holds the in-context calibration
        (:mod:`pyengine.measure.latency_calibration`); without it the grids price layers as
        timed alone."""
        entry = self.shapes.get(TableShape.of(shape).key)
        return bool(entry and entry["batches"]) and all(
            all(n in p["grids"] for n in CALIBRATION_GRIDS) for p in entry["batches"].values())

    def calibration_done(self, shape: Any) -> bool:
        """Whether calibrating ``shape`` was tried at every measured batch (done, or found
        impossible for the shape)."""
        entry = self.shapes.get(TableShape.of(shape).key)
        return bool(entry and entry["batches"]) and all(
            "calibration" in p for p in entry["batches"].values())

    def scale(self, shape: Any, batch: int, kind: str) -> float:
        """In-model / alone time of ``kind`` ("attn" or "mlp") modules (1 uncalibrated):
        interpolated between measured batches, constant outside them."""
        if kind not in ("attn", "mlp"):
            raise ValueError(f"kind must be 'attn' or 'mlp', got {kind!r}")
        if not self.calibrated(shape):
            return 1.0
        entry = self._entry(shape)
        vals = {b: p["grids"][f"calib_{kind}"]() for b, p in entry["batches"].items()}
        bs = sorted(vals)
        return interpolate_batch(vals, min(max(batch, bs[0]), bs[-1]))

    def linear_ms(self, shape: Any, batch: int, which: str, width: int) -> float:
        """``which`` = "qkv" (D -> width) or "proj" (width -> D)."""
        if which not in ("qkv", "proj"):
            raise ValueError(f"which must be 'qkv' or 'proj', got {which!r}")
        return self.value(shape, which, batch, width=width) if width > 0 else 0.0

    def branch_ms(self, shape: Any, batch: int, kind: str = "attn") -> float:
        """What a kept ``kind`` ("attn" or "mlp") branch costs beside its grids: in a model
        (``<kind>_ctx``) when the table is calibrated, else its norm and residual add timed
        alone."""
        if kind not in ("attn", "mlp"):
            raise ValueError(f"kind must be 'attn' or 'mlp', got {kind!r}")
        return self.value(shape, f"{kind}_ctx" if self.calibrated(shape) else "branch", batch)

    def attention_ms(self, shape: Any, batch: int, buckets: Sequence[Bucket],
                     backend: str = "torch") -> float:
        """One attention branch: norm + residual add, qkv, the op, proj (0 without heads)."""
        if not any(h > 0 and v > 0 for h, _, v in buckets):
            return 0.0
        return self.branch_ms(shape, batch) + self.scale(shape, batch, "attn") * \
            self.attention_grids_ms(shape, batch, buckets, backend)

    def attention_grids_ms(self, shape: Any, batch: int, buckets: Sequence[Bucket],
                           backend: str = "torch") -> float:
        """The attention module as the grids time it alone: qkv, the op, proj (0 without
        heads); :meth:`attention_ms` adds the branch and the in-model calibration."""
        buckets = [b for b in buckets if b[0] > 0 and b[2] > 0]
        if not buckets:
            return 0.0
        sqk = sum(h * qk for h, qk, _ in buckets)
        sv = sum(h * v for h, _, v in buckets)
        return (self.linear_ms(shape, batch, "qkv", 2 * sqk + sv)
                + self.core_ms(shape, batch, buckets, backend)
                + self.linear_ms(shape, batch, "proj", sv))

    def mlp_ms(self, shape: Any, batch: int, width: int) -> float:
        """One FFN branch of ``width`` neurons: norm + residual add + Mlp (0 when removed)."""
        if width <= 0:
            return 0.0
        return (self.branch_ms(shape, batch, "mlp")
                + self.scale(shape, batch, "mlp") * self.value(shape, "mlp", batch, width=width))

    def stem_ms(self, shape: Any, batch: int) -> float:
        return self.value(shape, "stem", batch)

    def head_ms(self, shape: Any, batch: int) -> float:
        """The classifier end (norm, pooling, head), plus the forward's own cost in a model
        (``forward_ctx``) when the table is calibrated."""
        ms = self.value(shape, "head", batch)
        return ms + self.value(shape, "forward_ctx", batch) if self.calibrated(shape) else ms

    def spec_ms(self, spec, batch: int, backend: str | None = None) -> float:
        """A whole ViT of structure ``spec`` (with ``dense`` geometry): stem, every kept branch,
        head. The spec's layout (``pyengine.compile``'s, in its meta) sets the buckets and
        backends; without one, the exact layout. ``backend`` overrides the layout's backends
        (default: the layout's, else "torch")."""
        from pyengine.models.vit.layout import layer_buckets, layout_of
        if spec.dense is None:
            raise LatencyTableError("spec_ms needs a spec with dense geometry (pyengine.spec)")
        layout = layout_of(spec)
        t = self.stem_ms(spec, batch) + self.head_ms(spec, batch)
        for i, blk in enumerate(spec.blocks):
            buckets, planned = layer_buckets(spec, i, layout)
            be = backend or (planned if planned not in (None, "auto") else "torch")
            t += self.attention_ms(spec, batch, buckets, be) + self.mlp_ms(spec, batch,
                                                                          len(blk.mlp))
        return t


# --------------------------------------------------------------------------------------
# The cache: load, check, measure what is missing
# --------------------------------------------------------------------------------------

def _stale(table: LatencyTable) -> str | None:
    """Why a cached table no longer describes this installation (None: it does)."""
    tv = table.env.get("torch")
    if tv is not None and tv != torch.__version__:
        return f"measured with torch {tv}, this is {torch.__version__}"
    if table.env.get("extension_id", None) != _extension_id():
        return "measured with another build of pyengine._C"
    from pyengine.models.packed_linear import LINEAR_KIND
    if table.env.get("linear", "plain") != LINEAR_KIND:
        return f"its linear layers were timed as {table.env.get('linear', 'plain')!r}, the " \
               f"compact models run {LINEAR_KIND!r}"
    return None


def read_json(path: str | os.PathLike) -> Any:
    """A table file's JSON; :class:`LatencyTableError` naming the file if it is not JSON."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise LatencyTableError(f"{p}: not valid JSON ({e})") from None


def check_header(d: Any, where: str, fmt: str, body: str) -> None:
    """A cached table file's JSON: an object of format ``fmt`` with device, dtype and
    ``body``; else :class:`LatencyTableError` naming ``where``."""
    if not isinstance(d, Mapping):
        raise LatencyTableError(f"{where}: a latency table is a JSON object")
    if d.get("format") != fmt:
        raise LatencyTableError(f"{where}: format {d.get('format')!r}, this pyengine reads "
                                f"{fmt!r}")
    for k in ("device", "dtype", body):
        if k not in d:
            raise LatencyTableError(f"{where}: missing {k!r}")


def load_cached(cls, p: Path, key: str, dtype: str, stale: Callable[[Any], str | None],
                log: Callable[[str], None] | None = None, what: str = "latency table"):
    """The table of class ``cls`` cached at ``p`` if it is there, readable and not
    ``stale`` (its reason, or None); else None (logged: it gets measured anew). A file
    holding another device's or dtype's table raises :class:`LatencyTableError`."""
    if not p.is_file():
        return None
    try:
        table = cls.load(p)
    except LatencyTableError as e:
        if log:
            log(f"{what} {p} is unreadable ({e}); measuring a new one")
        return None
    if table.device != key or table.dtype != dtype:
        raise LatencyTableError(f"{p} holds the table of {table.device}/{table.dtype}, not "
                                f"{key}/{dtype}")
    why = stale(table)
    if why:
        if log:
            log(f"{what} {p} is stale ({why}); measuring it again")
        return None
    return table


def load_table(device: str | torch.device | None = None, dtype=torch.float32,
               path: str | os.PathLike | None = None) -> LatencyTable | None:
    """The cached table of ``device`` and ``dtype`` (or the file ``path``); None if missing.
    A malformed file raises :class:`LatencyTableError` naming it."""
    p = Path(path) if path is not None else table_path(device, dtype)
    if not p.is_file():
        return None
    return LatencyTable.load(p)


def get_table(shape: Any, device: str | torch.device | None = None, dtype=torch.float32,
              batches: Sequence[int] = (1, 8), *, path: str | os.PathLike | None = None,
              measure: bool | None = None, progress: bool = True, calibrate: bool = True,
              log: Callable[[str], None] | None = None, **measure_options) -> LatencyTable | None:
    """The table of ``device``/``dtype`` with ``shape`` measured at ``batches`` for every
    attention backend that can run there: read from the cache and completed by measuring
    what is missing (a progress bar; saved back). Returns None only when something is missing
    and measuring is off (``measure=False``, or ``PYENGINE_LATENCY=off``). ``calibrate``: also
    time whole models of the shape (:mod:`pyengine.measure.latency_calibration`) at every
    measured batch that lacks it."""
    from pyengine.measure import latency_grid

    dev = torch.device("cpu" if device is None else device)
    dt = as_dtype(dtype)
    key = device_key(dev)
    p = Path(path) if path is not None else table_path(dev, dt)
    table = load_cached(LatencyTable, p, key, dtype_name(dt), _stale, log)
    batches = sorted({int(b) for b in batches})
    wanted = latency_grid.candidate_backends(dev, dt)

    def complete(t: LatencyTable) -> bool:
        return t.has(shape, batches, wanted) and (not calibrate or t.calibration_done(shape))

    if table is not None and complete(table):
        return table
    if measure is None:
        measure = measuring_enabled()
    if not measure:
        return table if table is not None and table.has(shape, batches) else None
    if table is None:
        from pyengine.measure.timing import environment
        from pyengine.models.packed_linear import LINEAR_KIND
        table = LatencyTable(key, dtype_name(dt), {**environment(dev),
                                                   "extension_id": _extension_id(),
                                                   "linear": LINEAR_KIND})
    missing = [b for b in batches if not table.has(shape, [b], wanted)]
    if missing and log:
        log(f"measuring the {key} {dtype_name(dt)} latency table for shape "
            f"{TableShape.of(shape).key}, batch {', '.join(map(str, missing))} (once; cached in "
            f"{p})")
    for b in missing:
        grids, info = latency_grid.measure_grids(TableShape.of(shape), b, dev, dt, wanted,
                                                 progress=progress, **measure_options)
        table.add(shape, b, grids, wanted, **info)
    if calibrate:
        _calibrate(table, TableShape.of(shape), dev, dt, progress, log)
    table.save(p)
    return table


def _calibrate(table: LatencyTable, shape: TableShape, dev: torch.device, dt: torch.dtype,
               progress: bool, log) -> None:
    """Time whole models of ``shape`` at every measured batch without a calibration."""
    from pyengine.measure.latency_calibration import measure_calibration
    entry = table.shapes[shape.key]
    for b, part in sorted(entry["batches"].items()):
        if "calibration" in part:
            continue
        if log:
            log(f"calibrating the latency table in whole models of shape {shape.key}, batch {b}")
        try:
            grids, info = measure_calibration(shape, b, dev, dt, part["grids"],
                                              part.get("candidates", []), progress=progress)
        except LatencyTableError as e:  # a shape no timm ViT has: the grids alone price it
            part["calibration"] = {"unavailable": str(e)}
            if log:
                log(f"no calibration for shape {shape.key}: {e}")
            continue
        part["grids"].update(grids)
        part["calibration"] = info
