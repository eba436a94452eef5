"""The one timing harness: every latency pyengine reports is measured here, and every result
file records the machine with :func:`environment`.

What it does
    :func:`sample`      one sample: ``inner`` back-to-back calls of a zero-argument callable,
                        bracketed by a pair of CUDA events on a CUDA device (the end event is
                        synchronized) or by ``time.perf_counter`` on the CPU; returns ms per
                        call. :class:`Clock` is that pair of marks on its own (the per-layer
                        hooks of :mod:`pyengine.measure.roofline` use it).
    :func:`cuda_graph`  a callable captured once as a CUDA graph; the returned callable replays
                        it (``graphs=True`` below; CUDA only).
    :func:`measure`     several variants timed together: warm-up calls of every variant, one
                        timed calibration call each (it sets ``inner`` from ``min_sample_ms``),
                        then ``repeats`` samples per variant taken round-robin over the
                        variants in ``rounds`` passes (default: one sample of each in turn, A B
                        A B ...), so that drift of clocks and other load hits all of them alike.
                        Returns the raw :class:`Samples`.
    :func:`compare`     :func:`measure` summarized: ``{name: summarize(...) + {"inner"}}``.
    :func:`summarize`   the one set of statistics: ``median_ms``, ``iqr_ms``, ``min_ms``,
                        ``mean_ms``, ``repeats``.
    :func:`ratio`       a ratio of two variants with its spread, from paired samples (sample
                        ``i`` of both variants is taken in the same round-robin pass); the
                        speedups of ``pyengine bench`` and the demo come with it.
    :func:`environment` what a result was measured on (versions, GPU, driver, CPU, threads;
                        no host name).

The IQR, defined once
    ``iqr = p75 - p25`` where ``p`` is the quantile with linear interpolation between order
    statistics (:func:`quantile`; numpy's default ``percentile`` method, ``statistics``'
    ``method="inclusive"``): for sorted samples ``x[0..n-1]`` the quantile ``q`` is
    ``x[k] + (x[k+1] - x[k]) * f`` with ``k + f = q * (n - 1)``. One sample has IQR 0.

Timing a new variant
    Make it a zero-argument callable and add it to the dict of its peers, so that it is timed
    interleaved with them in the same run::

        x = torch.randn(64, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
        s = measure({"dense": lambda: dense(x), "mine": lambda: mine(x)}, warmup=10,
                    repeats=50, device="cuda", graphs=True)
        stats = s.stats()                   # {"dense": {"median_ms", "iqr_ms", ...}, ...}
        speedup = s.ratio("dense", "mine")  # {"ratio", "median", "iqr", "p25", "p75", "pairs"}
        result = {"env": environment("cuda"), "stats": stats, "speedup": speedup}

    Forward passes run under ``torch.inference_mode()``; pass ``inference=False`` to time
    training steps (autograd on).
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """Quantile ``q`` in [0, 1] by linear interpolation between order statistics (numpy's
    default ``percentile`` method); the one definition behind every IQR pyengine reports."""
    xs = sorted(values)
    if not xs:
        raise ValueError("no samples")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    pos = q * (len(xs) - 1)
    k = math.floor(pos)
    if k + 1 >= len(xs):
        return float(xs[-1])
    return float(xs[k] + (xs[k + 1] - xs[k]) * (pos - k))


def iqr(values: Sequence[float]) -> float:
    """Interquartile range: ``quantile(values, 0.75) - quantile(values, 0.25)``."""
    return max(0.0, quantile(values, 0.75) - quantile(values, 0.25))


def summarize(times_ms: Sequence[float]) -> dict[str, float]:
    """Median, interquartile range (see the module docstring), min, mean and count of the
    samples in milliseconds."""
    t = [float(v) for v in times_ms]
    if not t:
        raise ValueError("no samples to summarize")
    return {"median_ms": statistics.median(t), "iqr_ms": iqr(t), "min_ms": min(t),
            "mean_ms": statistics.fmean(t), "repeats": len(t)}


def ratio(a_ms: Sequence[float], b_ms: Sequence[float]) -> dict[str, float]:
    """``a / b`` with its spread, e.g. ``ratio(dense, compact)`` is the compact model's speedup.

    ``ratio``: median(a) / median(b), the point estimate (what ``speedup`` fields hold);
    ``median``, ``p25``, ``p75``, ``iqr``: of the paired ratios ``a[i] / b[i]`` (samples taken
    in the same pass of :func:`measure`, so both saw the same state of the machine);
    ``pairs``: how many pairs.
    """
    a, b = list(a_ms), list(b_ms)
    if not a or len(a) != len(b):
        raise ValueError(f"ratio needs two equally long, non-empty sample lists; got {len(a)} "
                         f"and {len(b)}")
    if min(b) <= 0 or statistics.median(b) <= 0:
        raise ValueError("ratio: the denominator's samples must be positive")
    r = [x / y for x, y in zip(a, b)]
    p25, p75 = quantile(r, 0.25), quantile(r, 0.75)
    return {"ratio": statistics.median(a) / statistics.median(b), "median": statistics.median(r),
            "p25": p25, "p75": p75, "iqr": max(0.0, p75 - p25), "pairs": len(r)}


# --------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------

def _device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


class Clock:
    """Timestamps on one device: CUDA events recorded in stream order, or ``perf_counter``.

    ``mark()`` returns a timestamp; ``elapsed_ms(start, end)`` the time between two of them
    (on CUDA after ``sync()`` or ``end.synchronize()``)."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = _device(device)
        self.cuda = self.device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def elapsed_ms(self, start, end) -> float:
        if self.cuda:
            return float(start.elapsed_time(end))
        return (end - start) * 1e3


def sample(fn: Callable[[], object], device: torch.device | str | None = None, inner: int = 1,
           prepare: Callable[[], object] | None = None) -> float:
    """Milliseconds per call over ``inner`` back-to-back calls of ``fn`` (CUDA events on a CUDA
    device, ``perf_counter`` on the CPU). ``prepare`` runs first, outside the timed span (e.g.
    flushing the L2 cache)."""
    if inner < 1:
        raise ValueError(f"inner must be >= 1, got {inner}")
    clock = Clock(device)
    if prepare is not None:
        prepare()
    start = clock.mark()
    for _ in range(inner):
        fn()
    end = clock.mark()
    if clock.cuda:
        end.synchronize()
    return clock.elapsed_ms(start, end) / inner


def cuda_graph(fn: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """``fn`` captured once as a CUDA graph (after ``warmup`` calls on a side stream, which
    settle the allocator and any autotuning); the returned callable replays it. Its
    ``.graph`` and ``.output`` attributes keep the graph and its output tensors alive."""
    if not torch.cuda.is_available():
        raise ValueError("CUDA graphs need a CUDA device; torch sees none here")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> None:
        graph.replay()

    replay.graph, replay.output = graph, out  # type: ignore[attr-defined]
    return replay


def warm_up(fns: Mapping[str, Callable[[], object]] | Sequence[Callable[[], object]],
            warmup: int, device: torch.device | str | None = None) -> None:
    """``warmup`` calls of every callable, interleaved, then a device synchronization."""
    calls = list(fns.values()) if isinstance(fns, Mapping) else list(fns)
    for _ in range(warmup):
        for fn in calls:
            fn()
    Clock(device).sync()


@dataclass
class Samples:
    """Raw samples of :func:`measure`: per variant, ms per call of each sample in the order
    taken (sample ``i`` of every variant comes from the same round-robin pass)."""

    times_ms: dict[str, list[float]]
    inner: dict[str, int] = field(default_factory=dict)

    def stats(self) -> dict[str, dict[str, float]]:
        """:func:`summarize` of every variant, with its ``inner`` (calls per sample)."""
        return {k: {**summarize(v), "inner": self.inner.get(k, 1)}
                for k, v in self.times_ms.items()}

    def ratio(self, a: str, b: str) -> dict[str, float]:
        """:func:`ratio` of variant ``a``'s samples over variant ``b``'s."""
        return ratio(self.times_ms[a], self.times_ms[b])


class _L2Flush:
    """Overwrite a buffer larger than the L2 cache before a sample (CUDA), as
    ``triton.testing.do_bench`` does, so that no sample starts with warm caches."""

    def __init__(self, device: torch.device, mib: int = 256):
        self.buf = torch.empty(mib * 2 ** 20, dtype=torch.int8, device=device)

    def __call__(self) -> None:
        self.buf.zero_()


def measure(fns: Mapping[str, Callable[[], object]], warmup: int = 3, repeats: int = 20,
            device: torch.device | str | None = None, *, graphs: bool = False, inner: int = 1,
            rounds: int | None = None, min_sample_ms: float = 0.0, flush_l2: bool = False,
            inference: bool = True, progress: Callable[[int], None] | None = None) -> Samples:
    """Time zero-argument callables interleaved; returns their raw :class:`Samples`.

    1. ``graphs=True`` (CUDA only): each callable is captured as a CUDA graph
       (:func:`cuda_graph`) and its replays are timed instead.
    2. ``warmup`` calls of every variant, interleaved.
    3. One timed call of each variant sets its ``inner``: ``max(inner, ceil(min_sample_ms /
       that time))`` calls per sample, so that very short calls are not lost in the timer's
       resolution (``inner`` as given when ``min_sample_ms`` is 0).
    4. ``repeats`` samples per variant in ``rounds`` round-robin passes (default ``repeats``:
       one sample of each variant in turn); ``progress(n)`` after each pass, ``n`` the samples
       per variant taken so far.

    ``device``: where the callables run (None: the CPU). ``flush_l2``: overwrite 256 MiB
    before every sample (CUDA; no effect on the CPU). ``inference``: run everything under
    ``torch.inference_mode()`` (off to time training steps).
    """
    if not fns:
        raise ValueError("nothing to time")
    if repeats < 1 or warmup < 0 or inner < 1 or (rounds is not None and rounds < 1):
        raise ValueError(f"need repeats >= 1, rounds >= 1, warmup >= 0, inner >= 1; got "
                         f"repeats={repeats}, rounds={rounds}, warmup={warmup}, inner={inner}")
    dev = _device(device)
    if graphs and dev.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device; got device {str(dev)!r}")
    mode = torch.inference_mode() if inference else contextlib.nullcontext()
    with mode:
        calls = {k: (cuda_graph(fn) if graphs else fn) for k, fn in fns.items()}
        warm_up(calls, warmup, dev)
        prepare = _L2Flush(dev) if flush_l2 and dev.type == "cuda" else None
        n_inner: dict[str, int] = {}
        for name, fn in calls.items():
            t = sample(fn, dev, inner, prepare)
            n_inner[name] = max(inner, math.ceil(min_sample_ms / t)) \
                if min_sample_ms > 0 and t > 0 else inner
        times: dict[str, list[float]] = {k: [] for k in calls}
        rounds = min(rounds or repeats, repeats)
        per = [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]
        done = 0
        for n in per:
            for name, fn in calls.items():
                for _ in range(n):
                    times[name].append(sample(fn, dev, n_inner[name], prepare))
            done += n
            if progress is not None:
                progress(done)
    return Samples(times, n_inner)


def measure_in_place(models: Sequence[tuple[Callable[[Any], object],
                                           Mapping[Any, torch.nn.Module]]],
                     x: torch.Tensor, *, repeats: int, min_seconds: float,
                     max_rounds_factor: int, warmup: int = 2,
                     device: torch.device | str | None = None, progress: bool = True,
                     desc: str = "") -> tuple[list[list[float]], list[dict[Any, list[float]]], int]:
    """Time models whole and their parts in place: ``models`` holds ``(model, {key: module})``.
    Each round, model by model, one unhooked forward of ``x`` (its total) and one with every
    named module timed by forward pre/post hooks (its parts; apart, so the hooks' syncs do
    not weigh on the total). At least ``repeats`` rounds, more for small models so that the
    samples span ``min_seconds`` (at most ``max_rounds_factor * repeats``). Returns
    ``(totals, parts, rounds)``: per model its total samples and ``{key: samples}`` (ms)."""
    from tqdm import tqdm
    dev = _device(device)
    clock = Clock(dev)
    totals: list[list[float]] = [[] for _ in models]
    parts: list[dict[Any, list[float]]] = [{} for _ in models]
    started: dict[Any, Any] = {}
    hooks: list[list[tuple]] = [[] for _ in models]
    for m_i, (_, named) in enumerate(models):
        for key, mod in named.items():
            def pre(_m, _inp, key=key):
                started[key] = clock.mark()

            def post(_m, _inp, _out, key=key, m_i=m_i):
                end = clock.mark()
                clock.sync()
                parts[m_i].setdefault(key, []).append(clock.elapsed_ms(started[key], end))
            hooks[m_i].append((mod, pre, post))
    bar = tqdm(total=repeats * len(models), unit="model", disable=not progress, leave=False,
               desc=desc)
    with torch.inference_mode():
        warm_up([lambda m=m: m(x) for m, _ in models], warmup, dev)
        rounds, done = repeats, 0
        while done < rounds:
            for m_i, (model, _) in enumerate(models):
                clock.sync()  # the whole forward, unhooked ...
                t0 = clock.mark()
                model(x)
                t1 = clock.mark()
                clock.sync()
                totals[m_i].append(clock.elapsed_ms(t0, t1))
                handles = []  # ... and a pass with its parts timed in place
                for mod, pre, post in hooks[m_i]:
                    handles += [mod.register_forward_pre_hook(pre),
                                mod.register_forward_hook(post)]
                try:
                    model(x)
                finally:
                    for h in handles:
                        h.remove()
                bar.update(1)
            done += 1
            if done == 1:  # small models: more rounds, so that the samples span min_seconds
                one = sum(t[0] for t in totals) * 2e-3
                rounds = max(repeats, min(math.ceil(min_seconds / max(one, 1e-6)),
                                          max_rounds_factor * repeats))
                bar.total = rounds * len(models)
    bar.close()
    return totals, parts, rounds


def compare(fns: Mapping[str, Callable[[], object]], warmup: int = 3, repeats: int = 20,
            device: torch.device | str | None = None, graphs: bool = False, inner: int = 1,
            progress: Callable[[int], None] | None = None, **kwargs
            ) -> dict[str, dict[str, float]]:
    """Time each zero-argument callable interleaved (:func:`measure`, same arguments); returns
    ``{name: {"median_ms", "iqr_ms", "min_ms", "mean_ms", "repeats", "inner"}}``."""
    return measure(fns, warmup, repeats, device, graphs=graphs, inner=inner, progress=progress,
                   **kwargs).stats()


# --------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver_version() -> str | None:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import pynvml
        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        return None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # not installed, or a broken install: recorded as absent
        return None
    return getattr(mod, "__version__", "unknown")


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """What a result was measured on; every result file of pyengine and bench/ records it.

    ``device``: the device the numbers come from (None: CUDA when torch sees a GPU, else the
    CPU). Always the keys ``device``, ``gpu``, ``driver`` (None off CUDA), ``python``,
    ``platform``, ``torch``, ``cuda`` (torch's CUDA version, None in a CPU build), ``triton``,
    ``timm``, ``torch_pruning`` (None where not installed), ``pyengine``, ``extension`` (the
    C++/CUDA extension's state), ``cpu`` (model), ``cpu_count``, ``threads`` (torch's intra-op
    threads) and ``loadavg_1m`` where the OS has it; on CUDA also ``gpu_sms``,
    ``gpu_memory_gib``, ``compute_capability`` and ``cudnn``. No host name.
    """
    import pyengine
    from pyengine.measure import baselines
    from pyengine.ops import _ext

    dev = torch.device(device) if device is not None else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env: dict[str, Any] = {"device": str(dev), "gpu": None, "driver": None,
                           "python": platform.python_version(), "platform": platform.platform(),
                           "torch": torch.__version__, "cuda": torch.version.cuda,
                           "triton": _version("triton"), "timm": _version("timm")}
    ok, ver = baselines.torch_pruning_available()
    env["torch_pruning"] = ver if ok else None
    env["pyengine"] = pyengine.__version__
    env["extension"] = _ext.describe()
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env["gpu"] = p.name
        env["gpu_sms"] = p.multi_processor_count
        env["gpu_memory_gib"] = round(p.total_memory / 2 ** 30, 1)
        env["compute_capability"] = f"{p.major}.{p.minor}"
        env["driver"] = _driver_version()
        env["cudnn"] = torch.backends.cudnn.version()
    env["cpu"] = _cpu_model()
    env["cpu_count"] = os.cpu_count()
    env["threads"] = torch.get_num_threads()
    try:  # other load on the machine while measuring (a shared CPU makes timings noisy)
        env["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        pass
    return env


__all__ = ["quantile", "iqr", "summarize", "ratio", "Clock", "sample", "cuda_graph", "warm_up",
           "Samples", "measure", "compare", "environment"]
