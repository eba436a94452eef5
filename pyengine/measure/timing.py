"""Latency measurement: warm-up, many repeats, median and interquartile range.

Variants are timed interleaved (A, B, A, B, ...) so that drift of the machine (frequency,
other load) hits all of them alike instead of biasing whichever ran last.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import torch


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(times_ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times_ms, n=4) if len(times_ms) >= 2 else [times_ms[0]] * 3
    return {"median_ms": statistics.median(times_ms), "iqr_ms": q[2] - q[0],
            "min_ms": min(times_ms), "mean_ms": statistics.fmean(times_ms),
            "repeats": len(times_ms)}


def compare(fns: Mapping[str, Callable[[], object]], warmup: int = 3, repeats: int = 20,
            device: torch.device | None = None, progress: Callable[[int], None] | None = None
            ) -> dict[str, dict[str, float]]:
    """Time each zero-argument callable ``repeats`` times, interleaved; returns stats per name."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        _sync(device)
        times: dict[str, list[float]] = {k: [] for k in fns}
        for i in range(repeats):
            for name, fn in fns.items():
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[name].append((time.perf_counter() - t0) * 1e3)
            if progress is not None:
                progress(i + 1)
    return {k: _stats(v) for k, v in times.items()}


def environment() -> dict[str, object]:
    """What a result was measured on (recorded beside every timing)."""
    import platform
    env: dict[str, object] = {"torch": torch.__version__, "python": platform.python_version(),
                              "cpu": platform.processor() or platform.machine(),
                              "threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    env["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    import timm
    env["timm"] = timm.__version__
    return env
