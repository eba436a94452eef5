"""The roof of a roofline profile: upper bounds on compute rate and memory bandwidth, measured
on the device the profile runs on (or taken from a vendor data sheet), and the dtype users
would run there.

    dt, why = default_dtype("cpu")          # float32 on a CPU without bf16 matrix units
    probes = gemm_probes([512, 1024], dt, dev) + stream_probes(ladder(rows_bytes, llc), dev)
    samples = timing.measure({p.name: p.fn for p in probes}, ...)
    roof = Roof.measured(probes, samples, device_name, dt, llc)

An upper bound, not one sample: the compute roof is the best rate of several GEMMs (square
ones and the model's own layer shapes, each repeated after warm-up, best sample of each), and
the memory roof the best rate of streams (a copy and a read) at each footprint: a layer whose
bytes fit in a cache is bounded by that cache's bandwidth, not DRAM's, so a single DRAM copy
would be exceeded by every small layer. The DRAM figure is the stream larger than the
last-level cache (4x its size; read from sysfs, or torch's L2 size on CUDA). pyengine.measure
.roofline times these probes interleaved with the profiled forward passes, so both see the
same state of a shared machine, and takes the best of each probe against the median of each
layer. A layer that still lands above the roof is reported and the roof raised to what it
achieved (:meth:`Roof.raise_to`), never silently.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from pyengine.cost.dtypes import dtype_name
from pyengine.cost.peaks import Peaks

__all__ = ["default_dtype", "cpu_flags", "llc_bytes", "Probe", "gemm_probes", "stream_probes",
           "ladder", "Roof", "DEFAULT_GEMM_SIZES"]

#: square GEMM sizes of the compute probes, by device type
DEFAULT_GEMM_SIZES = {"cpu": (256, 512, 1024, 2048), "cuda": (2048, 4096, 8192)}
_ASSUMED_LLC = 256 * 2 ** 20  # when the OS does not say: larger than most CPUs' last level


# --------------------------------------------------------------------------------------
# The dtype users would run
# --------------------------------------------------------------------------------------

def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (x86 ``flags``, Arm ``Features``); empty
    where the file is not there."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(val.split())
    except OSError:
        pass
    return set()


def default_dtype(device: str | torch.device, flags: set[str] | None = None
                  ) -> tuple[torch.dtype, str]:
    """The dtype a user would deploy on ``device``, and why.

    GPU: bfloat16 where the GPU has bf16 tensor cores, else float16. CPU: bfloat16 only with
    bf16 matrix units (Intel AMX: ``amx_bf16`` and ``amx_tile`` flags); otherwise float32.
    ``avx512_bf16`` alone (dot-product instructions, no matrix units) does not count: there
    torch's bf16 GEMMs are no faster than fp32 ones and its bf16 elementwise ops convert
    through fp32, so nobody deploys bf16 on such a CPU; Arm CPUs with bf16 instructions get
    float32 too (pass ``--dtype bf16`` to profile bf16 there). ``flags``: the CPU flags to
    decide from (default: :func:`cpu_flags`; tests pass their own).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no including_emulation
            bf16 = torch.cuda.is_bf16_supported()
        if bf16:
            return torch.bfloat16, "bf16 tensor cores on this GPU"
        return torch.float16, "this GPU has no bf16 tensor cores"
    flags = cpu_flags() if flags is None else set(flags)
    if {"amx_bf16", "amx_tile"} <= flags:
        return torch.bfloat16, "CPU with bf16 matrix units (AMX-BF16)"
    extra = " (avx512_bf16 dot products only)" if "avx512_bf16" in flags else ""
    return torch.float32, (f"CPU without bf16 matrix units{extra}: bf16 would run on a slower "
                           "path nobody deploys")


# --------------------------------------------------------------------------------------
# Last-level cache
# --------------------------------------------------------------------------------------

def _parse_size(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(t[-1:], 1)
    return int(float(t.rstrip("KMGB").strip() or 0) * mult)


def llc_bytes(device: str | torch.device = "cpu",
              sysfs: str = "/sys/devices/system/cpu/cpu0/cache") -> tuple[int, str]:
    """Size of the last-level cache in bytes and where it was read (CPU: the highest-level
    cache of cpu0 in sysfs, else ``sysconf``; CUDA: torch's L2 size); a safe large size
    (256 MiB) marked "assumed" when neither says."""
    dev = torch.device(device)
    if dev.type == "cuda":
        size = int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 0)
        if size > 0:
            return size, "L2 size from torch.cuda.get_device_properties"
        return _ASSUMED_LLC, "assumed (torch reports no L2 size)"
    best = (0, 0)
    try:
        for entry in sorted(os.listdir(sysfs)):
            if not entry.startswith("index"):
                continue
            d = os.path.join(sysfs, entry)
            with open(os.path.join(d, "type")) as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(os.path.join(d, "level")) as f:
                level = int(f.read())
            with open(os.path.join(d, "size")) as f:
                size = _parse_size(f.read())
            best = max(best, (level, size))
    except (OSError, ValueError):
        best = (0, 0)
    if best[1] > 0:
        return best[1], f"L{best[0]} size from {sysfs}"
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            size = os.sysconf(name)
        except (ValueError, OSError, AttributeError):
            continue
        if size and size > 0:
            return int(size), f"{name} from sysconf"
    return _ASSUMED_LLC, "assumed (the OS does not report the cache size)"


# --------------------------------------------------------------------------------------
# Probes: zero-argument callables with a known amount of work per call
# --------------------------------------------------------------------------------------

@dataclass
class Probe:
    """One microbenchmark: ``fn`` does ``work`` FLOPs (kind "compute") or moves ``work``
    bytes (kind "memory", ``footprint`` = bytes touched) per call."""

    name: str
    kind: str
    work: float
    fn: Callable[[], object]
    footprint: int = 0
    stream: str = ""     # memory probes: "copy" or "read"


def gemm_probes(sizes: Sequence[int], dtype: torch.dtype, device: torch.device) -> list[Probe]:
    """n x n x n matmuls at ``dtype`` on random data (random, not zeros: zeros can run faster)."""
    out = []
    for n in sizes:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"GEMM sizes must be positive integers, got {n!r}")
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        out.append(Probe(f"gemm {n}x{n}x{n}", "compute", 2.0 * n ** 3,
                         lambda a=a, b=b: torch.mm(a, b)))
    return out


def ladder(footprints: Sequence[int], llc: int, top: int | None = None,
           smallest: int = 16 * 2 ** 10) -> list[int]:
    """Stream footprints (bytes touched) to probe: powers of two from a quarter of the
    smallest layer footprint (at least ``smallest``) up to the largest, plus ``top``, the
    DRAM stream (default 4x the last-level cache: a copy whose source alone is twice the
    cache)."""
    top = int(top or 4 * llc)
    fp = [int(b) for b in footprints if b > 0] or [top]
    lo = max(smallest, min(fp) // 4)
    hi = min(max(fp), top)
    sizes = []
    s = 2 ** max(0, int(math.floor(math.log2(lo))))
    while s <= hi:
        sizes.append(s)
        s *= 2
    return sorted(set(sizes + [top]))


def stream_probes(footprints: Sequence[int], device: torch.device) -> list[Probe]:
    """A copy (half the footprint read, half written) and a read (a sum over all of it) at
    each footprint, all views of one buffer of the largest footprint (so the probes cost one
    allocation). float32 data: bandwidth does not depend on the dtype."""
    top = max(footprints)
    buf = torch.rand(top // 4 + 1, device=device)
    out = []
    for fp in sorted(set(int(f) for f in footprints)):
        n = max(1, fp // 8)                   # copy: n floats read + n written
        src, dst = buf[:n], buf[n:2 * n]
        out.append(Probe(f"copy {_fmt_bytes(fp)}", "memory", 8.0 * n,
                         lambda s=src, d=dst: d.copy_(s), footprint=8 * n, stream="copy"))
        m = max(1, fp // 4)                   # read: m floats
        r = buf[:m]
        out.append(Probe(f"read {_fmt_bytes(fp)}", "memory", 4.0 * m,
                         lambda r=r: r.sum(), footprint=4 * m, stream="read"))
    return out


def _fmt_bytes(n: float) -> str:
    for unit, k in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= k:
            v = n / k
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.3g} {unit}"
    return f"{int(n)} B"


# --------------------------------------------------------------------------------------
# The roof
# --------------------------------------------------------------------------------------

@dataclass
class Roof:
    """Compute roof ``flops_per_s`` at ``dtype`` and memory roof by footprint: ``ceilings``,
    ``[(bytes touched, bytes/s)]`` measured at those footprints, over the floor
    ``dram_bytes_per_s`` (the stream beyond the last-level cache, at ``dram_footprint``). A
    layer moving ``B`` bytes is bounded by :meth:`bandwidth` ``(B)``: the best ceiling at
    footprints above ``B/4`` (the cache level its data fits in, with one more step of
    margin, or any larger footprint), never below DRAM's."""

    device: str
    dtype: str
    flops_per_s: float
    dram_bytes_per_s: float
    ceilings: list[tuple[int, float]]
    dram_footprint: int
    source: str                               # "measured" or "vendor"
    method: dict[str, str]                    # "dtype", "compute", "memory": how, in words
    probes: list[dict[str, Any]] = field(default_factory=list)
    raised: list[dict[str, Any]] = field(default_factory=list)
    llc_bytes: int = 0
    llc_source: str = ""

    # ---- building -----------------------------------------------------------------------
    @classmethod
    def measured(cls, probes: Sequence[Probe], times_ms: dict[str, Sequence[float]],
                 device: str, dtype: torch.dtype, llc: tuple[int, str], dram_footprint: int,
                 dtype_why: str = "",
                 context: str = "interleaved with the profiled forward passes") -> "Roof":
        """The roof from the probes' samples (``times_ms[probe.name]``, ms per call): the best
        (fastest) sample of each probe; compute = max over the compute probes, each
        footprint's ceiling = max of its copy and read."""
        rows = []
        for p in probes:
            t = list(times_ms[p.name])
            best = min(t)
            rows.append({"name": p.name, "kind": p.kind, "work": p.work,
                         "footprint": p.footprint, "stream": p.stream, "best_ms": best,
                         "median_ms": sorted(t)[len(t) // 2], "samples": len(t),
                         "rate": p.work / (best / 1e3) if best > 0 else 0.0})
        comp = [r for r in rows if r["kind"] == "compute"]
        mem = [r for r in rows if r["kind"] == "memory"]
        if not comp or not mem:
            raise ValueError("a measured roof needs compute and memory probes")
        top = max(comp, key=lambda r: r["rate"])
        by_fp: dict[int, float] = {}
        for r in mem:
            by_fp[r["footprint"]] = max(by_fp.get(r["footprint"], 0.0), r["rate"])
        ceilings = sorted(by_fp.items())
        dram_fp = min((f for f, _ in ceilings if f >= dram_footprint), default=ceilings[-1][0])
        dram = max(bw for f, bw in ceilings if f >= dram_fp)
        n_sq = sum(1 for r in comp if r["name"].startswith("gemm "))
        n = min(r["samples"] for r in rows)
        cache = [bw for f, bw in ceilings if f < dram_fp]
        method = {
            "dtype": f"{dtype_name(dtype)}" + (f" ({dtype_why})" if dtype_why else ""),
            "compute": (f"best of {len(comp)} GEMMs at {dtype_name(dtype)} ({n_sq} square, "
                        f"{len(comp) - n_sq} of the models' own layer shapes), fastest of "
                        f"{n} samples each after warm-up, {context}: {_rate(top['rate'])} "
                        f"({top['name']})"),
            "memory": (f"best of a copy and a read at each of {len(ceilings)} footprints, "
                       f"fastest of {n} samples each, likewise: DRAM "
                       f"{dram / 1e9:.1f} GB/s at {_fmt_bytes(dram_fp)} ("
                       + ("4x " if dram_footprint == 4 * llc[0] else
                          "set by --copy-mib or capped by memory; ")
                       + f"the last-level cache is {_fmt_bytes(llc[0])}: {llc[1]})"
                       + (f"; in-cache ceilings {min(cache) / 1e9:.3g}-{max(cache) / 1e9:.3g}"
                          f" GB/s by footprint ({_fmt_bytes(ceilings[0][0])}-"
                          f"{_fmt_bytes(max(f for f, _ in ceilings if f < dram_fp))})"
                          if cache else "")),
        }
        return cls(device=device, dtype=dtype_name(dtype), flops_per_s=top["rate"],
                   dram_bytes_per_s=dram, ceilings=ceilings, dram_footprint=dram_fp,
                   source="measured", method=method,
                   probes=rows, llc_bytes=llc[0], llc_source=llc[1])

    @classmethod
    def vendor(cls, peaks: Peaks, dtype: torch.dtype, dtype_why: str = "") -> "Roof":
        """The roof of a data sheet: one compute figure at ``dtype``, one (DRAM) bandwidth for
        every footprint (so layers running from cache may land above it: they are reported
        and the roof raised)."""
        P, bw = peaks.flops_for(dtype), peaks.bytes_per_s
        src = f" ({peaks.source})" if peaks.source else ""
        method = {"dtype": f"{dtype_name(dtype)}" + (f" ({dtype_why})" if dtype_why else ""),
                  "compute": f"vendor figure for {peaks.name} at {dtype_name(dtype)}: "
                             f"{_rate(P)}{src}",
                  "memory": f"vendor figure for {peaks.name}: {bw / 1e9:.0f} GB/s DRAM, the "
                            "same for every footprint (caches not modelled)"}
        return cls(device=peaks.name, dtype=dtype_name(dtype), flops_per_s=P,
                   dram_bytes_per_s=bw, ceilings=[], dram_footprint=0, source="vendor",
                   method=method)

    # ---- reading --------------------------------------------------------------------------
    def bandwidth(self, nbytes: float) -> float:
        """The memory roof (bytes/s) of a layer that touches ``nbytes``: the best ceiling at
        any footprint above ``nbytes / 4``, at least the DRAM figure. Larger footprints count
        too: a stream that fits a smaller footprint is never truly slower than a larger one, so
        one unlucky probe (preempted in every sample) cannot pull a layer's roof down."""
        return max([self.dram_bytes_per_s] + [bw for f, bw in self.ceilings if f > nbytes / 4])

    def time_s(self, flops: float, nbytes: float) -> float:
        """The roofline lower bound of a layer: ``max(flops / compute, bytes / bandwidth)``."""
        return max(flops / self.flops_per_s if flops else 0.0,
                   nbytes / self.bandwidth(nbytes) if nbytes else 0.0)

    def bound(self, flops: float, nbytes: float) -> str:
        """"compute" when the compute roof binds at this intensity and footprint, else
        "memory"."""
        if not flops:
            return "memory"
        if not nbytes:
            return "compute"
        return "compute" if flops / self.flops_per_s >= nbytes / self.bandwidth(nbytes) \
            else "memory"

    def ridge(self, nbytes: float | None = None) -> float:
        """FLOP/byte where the roofs meet (DRAM bandwidth, or the ceiling at ``nbytes``)."""
        bw = self.dram_bytes_per_s if nbytes is None else self.bandwidth(nbytes)
        return self.flops_per_s / bw

    def peaks(self) -> Peaks:
        """As :class:`~pyengine.cost.Peaks` (compute and DRAM bandwidth) for ``pyengine.cost``."""
        return Peaks(f"{self.source}: {self.device}", self.flops_per_s, self.dram_bytes_per_s,
                     {self.dtype: self.flops_per_s}, source=self.method.get("compute", ""))

    # ---- raising --------------------------------------------------------------------------
    def raise_to(self, layer: str, flops: float, nbytes: float, seconds: float
                 ) -> dict[str, Any] | None:
        """A layer that ran in ``seconds`` is above the roof when that is less than
        :meth:`time_s`: raise the roof that binds (compute to ``flops / seconds``, the memory
        ceiling at ``nbytes`` to ``nbytes / seconds``) and return what was raised (None when
        the layer was under the roof)."""
        if seconds <= 0 or seconds >= self.time_s(flops, nbytes):
            return None
        entry: dict[str, Any] = {"layer": layer, "measured_s": seconds,
                                 "roof_s": self.time_s(flops, nbytes),
                                 "times_above": self.time_s(flops, nbytes) / seconds}
        if flops and flops / self.flops_per_s > seconds:
            entry["compute_from"] = self.flops_per_s
            self.flops_per_s = flops / seconds
            entry["compute_to"] = self.flops_per_s
        if nbytes and nbytes / self.bandwidth(nbytes) > seconds:
            entry["bandwidth_from"] = self.bandwidth(nbytes)
            self.ceilings = sorted(self.ceilings + [(int(nbytes), nbytes / seconds)])
            entry["bandwidth_to"] = nbytes / seconds
            entry["footprint"] = int(nbytes)
            if self.dram_footprint and nbytes >= self.dram_footprint:
                self.dram_bytes_per_s = max(self.dram_bytes_per_s, nbytes / seconds)
        self.raised.append(entry)
        return entry

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "dtype": self.dtype, "source": self.source,
                "flops_per_s": self.flops_per_s, "dram_bytes_per_s": self.dram_bytes_per_s,
                "dram_footprint_bytes": self.dram_footprint,
                "ridge_flop_per_byte": self.ridge(),
                "ceilings": [{"footprint_bytes": f, "bytes_per_s": bw} for f, bw in self.ceilings],
                "method": dict(self.method), "llc_bytes": self.llc_bytes,
                "llc_source": self.llc_source, "probes": list(self.probes),
                "raised": list(self.raised)}


def _rate(flops_per_s: float) -> str:
    if flops_per_s >= 1e12:
        return f"{flops_per_s / 1e12:.3g} TFLOP/s"
    return f"{flops_per_s / 1e9:.3g} GFLOP/s"
