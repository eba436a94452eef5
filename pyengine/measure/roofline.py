"""Per-layer roofline profile: the cost model's FLOPs and bytes against measured time, before
and after pruning, under a roof measured on the device the profile runs on.

    report = profile({"dense": dense, "compact": compact}, batch=8)   # dtype: the device's own
    print(format_profile(report))
    plot(report, "roofline.png")

Which layers. The rows are the model family's cost rows (``pyengine.cost``, through the
architecture adapter); nothing here knows a family. A row is timed by name:

* a row named like a module (``blocks.3.mlp.fc1``, ``layer1.0.conv2``) is that module's time,
  minus the time of rows nested inside it;
* a row with no module of its own (``blocks.3.attn.sdpa``, ``layer1.0.add``) gets what its
  nearest enclosing module (``blocks.3.attn``) spends outside its timed rows, when it is the
  only such row there; rows that share an enclosing module (``blocks.3.add1`` and ``add2``) or
  sit at the top level (``pos_embed``) stay untimed, and their time is in ``other``: the
  forward pass minus every timed row.

Time comes from the one harness (:mod:`pyengine.measure.timing`): forward hooks put a pair of
:class:`~pyengine.measure.timing.Clock` marks (CUDA events on a GPU, ``perf_counter`` on the
CPU) around each module, over ``repeats`` forward passes that :func:`~pyengine.measure.timing
.measure` takes after warm-up. A row's time is its median over the passes. On a GPU the events
are recorded in stream order around each module, so a layer's time is GPU time; at small
batches eager launches can leave the GPU waiting, and that wait lands in the layer (or in
``other``), never making a layer look faster than it is.

The roof (:mod:`pyengine.measure.roof`) is an upper bound measured in the same
:func:`~pyengine.measure.timing.measure` call, its probes interleaved with the forward passes
so both see the same state of a shared machine: compute = the best sample of square GEMMs and
of every compute layer's own module replayed on random inputs of its own shapes; memory = the
best copy or read at each footprint (cache levels) down to the DRAM stream beyond the
last-level cache. Best-of-repeats probes against median layers: a layer lands above the roof
only when the roof misses a faster path; if one does, the report says so (``checks``) and the
roof is raised to what the layer achieved, never silently. ``--peaks <key>`` takes a vendor
data sheet's figures instead (:data:`pyengine.cost.PEAKS`).

The report (``profile()``, ``pyengine profile --json``)::

    {"env", "config": {"model", "batch", "dtype", "dtype_source", "device", "repeats",
                       "warmup", "peaks"},
     "roof": Roof.as_dict() (method in words, compute FLOP/s, DRAM bytes/s, ceilings by
             footprint, every probe's best and median, what was raised),
     "peaks": {"device", "flops_per_s", "bytes_per_s" (DRAM), "ridge_flop_per_byte", "source"},
     "checks": {"max_roof_fraction", "max_roof_layer", "above_roof": [...], "roof_raised"},
     "profiles": [{"variant", "model", "batch", "dtype", "total_ms", "total_iqr_ms",
                   "timed_ms", "macs", "flops", "bytes", "params", "roof_ms",
                   "achieved_tflops", "by_kind": {kind: totals},
                   "layers": [{"name", "kind", "macs", "flops", "bytes", "params", "intensity",
                               "timed_as", "measured_ms", "measured_iqr_ms", "measured_min_ms",
                               "achieved_tflops", "achieved_gbps", "roof_tflops", "roof_gbps",
                               "roof_ms", "roof_fraction", "roof_fraction_measured",
                               "above_roof", "bound"}, ..., {"name": "other", ...}]}],
     "comparison": [{"base", "variant", "layers": [{"name", "kind", "base_ms", "ms",
                     "speedup", "roof_speedup", "flops_ratio", "base_roof_fraction",
                     "roof_fraction", "verdict"}], "by_kind": [...], "total": {...}}]}

``roof_fraction`` is ``roof_ms / measured_ms`` against the final roof (1.0: at the roof);
``roof_fraction_measured`` the same against the roof as measured, before any raise.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from pyengine.cost import PEAKS, Peaks, cost
from pyengine.measure.bench import dtype_name, parse_dtype, resolve_device
from pyengine.measure.roof import (DEFAULT_GEMM_SIZES, Probe, Roof, default_dtype, gemm_probes,
                                   ladder, llc_bytes, stream_probes)
from pyengine.measure.roofline_report import (VERDICT_FACTOR, analyse,  # noqa: F401 - API
                                              format_profile)
from pyengine.measure.timing import Clock, environment, measure, summarize

__all__ = ["profile", "format_profile", "plot", "measure_peaks", "layer_stats", "layer_times",
           "example_input", "RowTimer", "analyse"]

# --------------------------------------------------------------------------------------
# The input
# --------------------------------------------------------------------------------------

def _input_shape(model: nn.Module) -> tuple[int, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    inp = cfg.get("input_size")
    chans = int(inp[0]) if inp else 3
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    if img is not None:  # timm's patch-embedding models (their pretrained_cfg keeps 224)
        c = getattr(getattr(pe, "proj", None), "in_channels", None) or chans
        return (int(c), *(int(v) for v in (img if isinstance(img, (tuple, list))
                                            else (img, img))))
    spec = getattr(model, "pyengine_spec", None)
    size = getattr(getattr(spec, "dense", None), "img_size", 0) \
        or getattr(model, "pyengine_img_size", 0)
    if isinstance(size, int) and size > 0:
        return (chans, size, size)
    if inp:
        return tuple(int(v) for v in inp)
    raise ValueError(f"cannot tell the input size of {type(model).__name__}: pass "
                     "input_shape=(C, H, W)")


def example_input(model: nn.Module, batch: int, dtype: torch.dtype, device: torch.device,
                  input_shape: Sequence[int] | None = None) -> torch.Tensor:
    """A random batch of the model's input shape (``input_shape`` without the batch
    dimension, or read off the model: timm's ``patch_embed``, the spec's ``img_size``, timm's
    ``pretrained_cfg``)."""
    shape = tuple(input_shape) if input_shape is not None else _input_shape(model)
    return torch.randn(batch, *shape, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------
# Per-row time: hooks on the modules the cost rows name
# --------------------------------------------------------------------------------------

def _enclosing(name: str, modules: Mapping[str, nn.Module]) -> str:
    """The longest proper dotted prefix of ``name`` that is a module ("" for the model)."""
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        p = ".".join(parts[:k])
        if p in modules:
            return p
    return ""


class RowTimer:
    """Forward hooks that time the cost rows of one model by module name (see the module
    docstring for the rule); :meth:`run` is one recorded forward pass, :meth:`times` the
    per-row times of the last passes."""

    def __init__(self, model: nn.Module, rows: Sequence[str], device: torch.device):
        self.model = model
        self.clock = Clock(device)
        mods = dict(model.named_modules())
        self.rows = list(rows)
        row_set = set(rows)
        self.own = [r for r in rows if r and r in mods]           # rows with a module
        groups: dict[str, list[str]] = {}
        for r in rows:
            if r not in mods:
                groups.setdefault(_enclosing(r, mods), []).append(r)
        # a module-less row takes the rest of its enclosing module when it is alone there
        self.rest_of = {a: rs[0] for a, rs in groups.items()
                        if a and len(rs) == 1 and a not in row_set}
        self.untimed = [r for a, rs in groups.items() for r in rs
                        if not (a and len(rs) == 1 and a not in row_set)]
        self.hooked = list(dict.fromkeys(self.own + list(self.rest_of)))
        self._modules = {n: mods[n] for n in self.hooked}
        hooked = set(self.hooked)

        def top_inside(a: str) -> list[str]:
            inner = [h for h in hooked if h.startswith(a + ".")]
            return [h for h in inner if not any(h.startswith(o + ".") for o in inner if o != h)]

        self.inside = {h: top_inside(h) for h in self.hooked}
        self.passes: list[tuple[Any, Any, dict[str, list]]] = []
        self._marks: dict[str, list] | None = None
        self._handles: list = []

    def timed_as(self, row: str) -> str | None:
        if row in self.own:
            return "module"
        for a, r in self.rest_of.items():
            if r == row:
                return f"rest of {a}"
        return None

    # ---- hooks ---------------------------------------------------------------------------
    def install(self) -> "RowTimer":
        for n, m in self._modules.items():
            self._handles.append(m.register_forward_pre_hook(self._pre(n)))
            self._handles.append(m.register_forward_hook(self._post(n)))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "RowTimer":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _pre(self, name: str):
        def hook(module, args):
            if self._marks is not None:
                self._marks.setdefault(name, []).append([self.clock.mark(), None])
        return hook

    def _post(self, name: str):
        def hook(module, args, output):
            if self._marks is not None:
                self._marks[name][-1][1] = self.clock.mark()
        return hook

    # ---- passes --------------------------------------------------------------------------
    def run(self, x: torch.Tensor) -> None:
        """One forward pass with its marks recorded (hooks fire only here, so replaying a
        module elsewhere, as the roof's probes do, records nothing)."""
        self._marks = marks = {}
        t0 = self.clock.mark()
        try:
            self.model(x)
        finally:
            t1 = self.clock.mark()
            self._marks = None
        self.passes.append((t0, t1, marks))

    def times(self, last: int | None = None
              ) -> tuple[dict[str, list[float]], list[float], list[float]]:
        """Per timed row, the ms of each of the ``last`` passes (all when None); the whole
        pass; and the rest (pass minus the timed rows, per pass)."""
        self.clock.sync()
        passes = self.passes if last is None else self.passes[-last:]
        rows: dict[str, list[float]] = {}
        totals, rest = [], []
        for t0, t1, marks in passes:
            incl = {n: sum(self.clock.elapsed_ms(s, e) for s, e in spans if e is not None)
                    for n, spans in marks.items()}
            got: dict[str, float] = {}
            for h in self.hooked:
                if h not in incl:
                    continue
                excl = max(0.0, incl[h] - sum(incl.get(d, 0.0) for d in self.inside[h]))
                got[self.rest_of.get(h, h)] = excl
            for r, t in got.items():
                rows.setdefault(r, []).append(t)
            total = self.clock.elapsed_ms(t0, t1)
            totals.append(total)
            rest.append(max(0.0, total - sum(got.values())))
        return rows, totals, rest


# --------------------------------------------------------------------------------------
# Probes of the models' own layers
# --------------------------------------------------------------------------------------

def _compute_modules(model: nn.Module, layers, timer: RowTimer) -> dict[str, tuple[nn.Module, Any]]:
    """Row name -> (module, row) for rows with FLOPs that are a module with no timed row
    inside: the layers whose own shapes the compute roof is measured at."""
    mods = dict(model.named_modules())
    return {r.name: (mods[r.name], r) for r in layers
            if r.flops > 0 and r.name in timer.own and not timer.inside.get(r.name)}


@torch.no_grad()
def _record_args(model: nn.Module, x: torch.Tensor, targets: Mapping[str, tuple]) -> dict:
    """One forward pass recording each target module's positional and keyword arguments,
    tensors as (shape, dtype) (floating ones) or kept as they are (others)."""
    seen: dict[str, tuple] = {}

    def spec(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape), v.dtype) if v.is_floating_point() else v
        return v

    def hook(name):
        def fn(module, args, kwargs):
            if name not in seen:
                seen[name] = (tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()})
        return fn

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True)
               for n, (m, _) in targets.items()]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _is_spec(v) -> bool:
    return isinstance(v, tuple) and len(v) == 3 and v[0] == "tensor"


def layer_probes(models: Sequence[tuple[str, nn.Module, torch.Tensor, Any, RowTimer]],
                 device: torch.device) -> list[Probe]:
    """A compute probe per distinct compute layer (module type, parameters, argument shapes)
    of the models: the module itself (``forward``, no hooks) on random inputs of its shapes,
    all views of one shared buffer per dtype. Work: the row's FLOPs."""
    found: dict[tuple, tuple[str, str, nn.Module, tuple, dict, float]] = {}
    for label, model, x, c, timer in models:
        targets = _compute_modules(model, c.layers, timer)
        args = _record_args(model, x, targets)
        for name, (mod, row) in targets.items():
            if name not in args:
                continue  # not called in the forward pass
            a, kw = args[name]
            shapes = tuple((v[1], str(v[2])) for v in list(a) + list(kw.values()) if _is_spec(v))
            key = (type(mod).__qualname__, mod.extra_repr(),
                   tuple(tuple(p.shape) for p in mod.parameters(recurse=True)), shapes,
                   repr([v for v in list(a) + list(kw.values()) if not _is_spec(v)])[:200])
            if key not in found:
                found[key] = (label, name, mod, a, kw, float(row.flops))
    need: dict[torch.dtype, int] = {}
    for _, _, _, a, kw, _ in found.values():
        for v in list(a) + list(kw.values()):
            if _is_spec(v):
                n = 1
                for s in v[1]:
                    n *= s
                need[v[2]] = max(need.get(v[2], 0), n)
    bufs = {dt: torch.randn(n, device=device).to(dt) for dt, n in need.items()}

    def real(v):
        if _is_spec(v):
            n = 1
            for s in v[1]:
                n *= s
            return bufs[v[2]][:n].view(v[1])
        return v

    probes = []
    for label, name, mod, a, kw, flops in found.values():
        ra, rkw = tuple(real(v) for v in a), {k: real(v) for k, v in kw.items()}
        shapes = "x".join("(" + ",".join(map(str, v[1])) + ")" for v in a if _is_spec(v))
        probes.append(Probe(f"layer {label} {name} {shapes}", "compute", flops,
                            lambda m=mod, a=ra, k=rkw: m.forward(*a, **k)))
    return probes


# --------------------------------------------------------------------------------------
# Peaks on their own, and per-layer times on their own
# --------------------------------------------------------------------------------------

def _min_sample_ms(dev: torch.device) -> float:
    # short probes (a 16 KiB copy) are repeated inside one sample until it lasts this long
    return 1.0 if dev.type == "cpu" else 0.2


@torch.no_grad()
def measure_peaks(device: str | torch.device | None = None, dtype=None,
                  gemm_sizes: Sequence[int] | None = None, copy_mib: int | None = None,
                  footprints: Sequence[int] = (), repeats: int = 10, warmup: int = 2) -> Roof:
    """The measured roof of ``device`` at ``dtype`` (default: :func:`~pyengine.measure.roof
    .default_dtype`) without a model: square GEMMs of ``gemm_sizes``, streams at
    ``footprints`` (bytes) and the DRAM stream (source ``copy_mib`` MiB; default twice the
    last-level cache)."""
    dev = resolve_device(device)
    dt, why = (parse_dtype(dtype), "given") if dtype is not None else default_dtype(dev)
    sizes = list(gemm_sizes or DEFAULT_GEMM_SIZES[dev.type])
    llc = llc_bytes(dev)
    top = _dram_footprint(llc[0], copy_mib, dev)
    probes = gemm_probes(sizes, dt, dev) + stream_probes(ladder(list(footprints) or [top],
                                                                llc[0], top), dev)
    s = measure({p.name: p.fn for p in probes}, warmup, repeats, dev,
                min_sample_ms=_min_sample_ms(dev))
    return Roof.measured(probes, s.times_ms, _device_name(dev), dt, llc, top, why,
                         context="on their own (no model)")


def _memory_bytes(dev: torch.device) -> int:
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev).total_memory)
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def _dram_footprint(llc: int, copy_mib: int | None, dev: torch.device) -> int:
    """Bytes the DRAM stream touches: ``2 * copy_mib`` MiB, else 4x the last-level cache
    (capped at an eighth of the device's memory, for a machine whose cache is reported huge)."""
    if copy_mib is not None:
        if copy_mib < 1:
            raise ValueError(f"copy_mib must be a positive number of MiB, got {copy_mib}")
        return 2 * copy_mib * 2 ** 20
    mem = _memory_bytes(dev)
    return min(4 * llc, mem // 8) if mem else 4 * llc


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    from pyengine.measure.timing import _cpu_model
    return f"{_cpu_model()} ({torch.get_num_threads()} threads)"


@torch.no_grad()
def layer_stats(model: nn.Module, x: torch.Tensor, names: Sequence[str], warmup: int = 3,
                repeats: int = 20) -> tuple[dict[str, dict], dict, dict]:
    """:func:`~pyengine.measure.timing.summarize` of each row in ``names`` that can be timed
    (see the module docstring), of the whole forward pass, and of the rest (the pass minus the
    timed rows, per pass), over ``repeats`` passes after ``warmup``."""
    timer = RowTimer(model, names, x.device)
    with timer:
        s = measure({"forward": lambda: timer.run(x)}, warmup, repeats, x.device)
    rows, totals, rest = timer.times(repeats * s.inner["forward"])
    return {n: summarize(v) for n, v in rows.items()}, summarize(totals), summarize(rest)


def layer_times(model: nn.Module, x: torch.Tensor, names: Sequence[str], warmup: int = 3,
                repeats: int = 20) -> tuple[dict[str, float], float, float]:
    """Medians of :func:`layer_stats`: per row, of the whole forward and of the rest (ms)."""
    rows, total, rest = layer_stats(model, x, names, warmup, repeats)
    return ({n: st["median_ms"] for n, st in rows.items()}, total["median_ms"],
            rest["median_ms"])


# --------------------------------------------------------------------------------------
# The profile
# --------------------------------------------------------------------------------------

def _resolve_peaks(peaks) -> Peaks | None:
    if peaks is None or (isinstance(peaks, str) and peaks == "measured"):
        return None
    if isinstance(peaks, Peaks):
        return peaks
    if isinstance(peaks, str):
        from pyengine.cost.peaks import peaks_for
        try:
            return peaks_for(peaks)
        except ValueError:
            raise ValueError(f"unknown --peaks {peaks!r}; use 'measured' or one of "
                             f"{sorted(PEAKS)}") from None
    raise TypeError(f"peaks must be 'measured', a key of PEAKS or a Peaks, got {peaks!r}")


@torch.no_grad()
def profile(models: Mapping[str, nn.Module], batch: int = 64, dtype=None,
            device: str | torch.device | None = None, peaks=None, repeats: int = 20,
            warmup: int = 3, model_name: str | None = None,
            gemm_sizes: Sequence[int] | None = None, copy_mib: int | None = None,
            input_shape: Sequence[int] | None = None, progress: bool = False) -> dict[str, Any]:
    """Profile each model (e.g. ``{"dense": ..., "compact": ...}``) at one batch size.

    ``dtype``: None for the device's default (:func:`~pyengine.measure.roof.default_dtype`).
    ``peaks``: None/"measured" (the roof measured here, interleaved with the models), a key of
    :data:`~pyengine.cost.PEAKS` or a :class:`~pyengine.cost.Peaks` (vendor figures).
    ``gemm_sizes``: the square GEMMs of the compute roof (default per device type);
    ``copy_mib``: the DRAM stream's source size (default twice the last-level cache).
    """
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if not models:
        raise ValueError("profile needs at least one model")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    dev = resolve_device(device)
    if dtype is None:
        dt, why = default_dtype(dev)
        dtype_source = f"default on this device: {why}"
    else:
        dt, dtype_source = parse_dtype(dtype), "--dtype"
    vendor = _resolve_peaks(peaks)

    prepared = []
    for label, m in models.items():
        m = m.to(device=dev, dtype=dt).eval()
        c = cost(m, batch=batch, dtype=dt)
        x = example_input(m, batch, dt, dev, input_shape)
        prepared.append((label, m, x, c, RowTimer(m, [r.name for r in c.layers], dev)))

    probes: list[Probe] = []
    llc = (0, "")
    top = 0
    if vendor is None:
        llc = llc_bytes(dev)
        top = _dram_footprint(llc[0], copy_mib, dev)
        footprints = [r.bytes for _, _, _, c, _ in prepared for r in c.layers]
        probes = (gemm_probes(list(gemm_sizes or DEFAULT_GEMM_SIZES[dev.type]), dt, dev)
                  + layer_probes(prepared, dev)
                  + stream_probes(ladder(footprints, llc[0], top), dev))

    fns: dict[str, Callable[[], object]] = {}
    for label, m, x, c, timer in prepared:
        fns[f"forward {label}"] = (lambda t=timer, x=x: t.run(x))
    for p in probes:
        fns[p.name] = p.fn
    bar = _bar(repeats, len(fns)) if progress else None
    for *_, timer in prepared:
        timer.install()
    try:
        s = measure(fns, warmup, repeats, dev, min_sample_ms=_min_sample_ms(dev),
                    progress=(lambda n: bar.update(n - bar.n)) if bar else None)
    finally:
        for *_, timer in prepared:
            timer.remove()
        if bar is not None:
            bar.close()

    name = _device_name(dev)
    if vendor is None:
        roof = Roof.measured(probes, s.times_ms, name, dt, llc, top, dtype_source)
    else:
        roof = Roof.vendor(vendor, dt, dtype_source)

    profiles = []
    for label, m, x, c, timer in prepared:
        rows, totals, rest = timer.times(repeats * s.inner[f"forward {label}"])
        profiles.append(_profile_rows(label, model_name, batch, dt, c, timer, rows, totals, rest))
    report = {"env": environment(dev),
              "config": {"model": model_name, "batch": batch, "dtype": dtype_name(dt),
                         "dtype_source": dtype_source, "device": str(dev),
                         "input_shape": list(prepared[0][2].shape), "repeats": repeats,
                         "warmup": warmup,
                         "peaks": "measured" if vendor is None else vendor.name},
              "profiles": profiles}
    return analyse(report, roof)


def _bar(repeats: int, n: int):
    from tqdm import tqdm
    return tqdm(total=repeats, desc=f"profile ({n} timed callables per pass)", leave=False)


def _profile_rows(label, model_name, batch, dt, c, timer: RowTimer, rows, totals, rest) -> dict:
    out = []
    for r in c.layers:
        d = {"name": r.name, "kind": r.kind, "macs": r.macs, "flops": r.flops,
             "bytes": r.bytes, "params": r.params, "intensity": r.intensity,
             "timed_as": timer.timed_as(r.name) if r.name in rows else None,
             "measured_ms": None, "measured_iqr_ms": None, "measured_min_ms": None}
        if r.name in rows:
            st = summarize(rows[r.name])
            d.update(measured_ms=st["median_ms"], measured_iqr_ms=st["iqr_ms"],
                     measured_min_ms=st["min_ms"])
        out.append(d)
    rs = summarize(rest)
    out.append({"name": "other", "kind": "other", "macs": 0, "flops": 0, "bytes": 0,
                "params": 0, "intensity": 0.0, "timed_as": "rest of the forward pass",
                "measured_ms": rs["median_ms"], "measured_iqr_ms": rs["iqr_ms"],
                "measured_min_ms": rs["min_ms"],
                "note": "forward time in no timed row: "
                        + (", ".join(timer.untimed[:6]) + (", ..." if len(timer.untimed) > 6
                                                           else "") if timer.untimed else "")
                        + " (no module of their own), Python between the layers, hooks"})
    tot = summarize(totals)
    return {"variant": label, "model": model_name, "batch": batch, "dtype": dtype_name(dt),
            "total_ms": tot["median_ms"], "total_iqr_ms": tot["iqr_ms"],
            "macs": c.macs, "flops": c.flops, "bytes": c.bytes, "params": c.params,
            "layers": out}


def plot(report: dict[str, Any], path) -> None:
    """The roofline figure (see :mod:`pyengine.measure.roofline_plot`)."""
    from pyengine.measure.roofline_plot import plot as _plot
    _plot(report, path)
