"""Per-layer roofline profile: analytical FLOPs and bytes (the cost model) against measured
time, before and after pruning.

    peaks = measure_peaks("cuda", torch.bfloat16)        # one copy, one GEMM microbenchmark
    report = profile({"dense": dense, "compact": compact}, batch=64, dtype="bf16",
                     device="cuda", peaks=peaks)
    plot(report, "roofline.png")

Each row of :func:`pyengine.cost` (``blocks.3.attn.qkv``, ``blocks.3.mlp.act``, ...) is timed
with a pair of marks of the harness's :class:`~pyengine.measure.timing.Clock` (CUDA events,
``perf_counter`` on the CPU) around the module of the same name, through forward hooks, over
many forward passes after warm-up; median and IQR per row are the harness's
:func:`~pyengine.measure.timing.summarize`. The peaks' microbenchmarks are timed by
:func:`~pyengine.measure.timing.compare`. Attention's core
(``blocks.i.attn.sdpa``) has no module of its own: it is the attention module's time minus
its qkv and proj. Rows with no module (position embedding, residual adds) are not timed one
by one; what the hooked rows leave of the whole forward pass is reported as ``other``.
From time, FLOPs and bytes come achieved TFLOP/s and GB/s, and against the *measured* peaks
whether each layer is bound by memory or by compute (its intensity below or above the ridge).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from pyengine.cost import cost
from pyengine.cost.peaks import Peaks
from pyengine.measure.bench import dtype_name, parse_dtype, resolve_device
from pyengine.measure.timing import Clock, compare, environment, summarize, warm_up


# --------------------------------------------------------------------------------------
# Measured peaks
# --------------------------------------------------------------------------------------

def _time_ms(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median ms of ``fn`` (the harness's events / perf_counter samples)."""
    return compare({"fn": fn}, warmup, repeats, device)["fn"]["median_ms"]


def _copy_ms(n_el: int, dev: torch.device, repeats: int) -> float:
    src = torch.rand(n_el, device=dev)  # random, not zeros: zeros can run faster
    dst = torch.empty_like(src)
    return _time_ms(lambda: dst.copy_(src), dev, 3, repeats)


def _gemm_ms(n: int, dt: torch.dtype, dev: torch.device, repeats: int) -> float:
    a = torch.randn(n, n, device=dev).to(dt)
    b = torch.randn(n, n, device=dev).to(dt)
    return _time_ms(lambda: a @ b, dev, 3, repeats)


@torch.no_grad()
def measure_peaks(device: str | torch.device | None = None, dtype="bfloat16",
                  copy_mib: int | None = None, gemm_n: int | None = None,
                  repeats: int = 10) -> tuple[Peaks, dict[str, Any]]:
    """Measured memory bandwidth (a device-to-device copy, bytes read + written) and matmul
    rate (an n x n x n GEMM at ``dtype`` on random data) of ``device``.

    Defaults: 1 GiB copy and n = 8192 on CUDA; 64 MiB and n = 1024 on the CPU. Returns the
    :class:`Peaks` (usable as ``pyengine.cost(..., device=peaks)``) and the raw numbers.
    """
    dev = resolve_device(device)
    dt = parse_dtype(dtype)
    cuda = dev.type == "cuda"
    copy_mib = copy_mib or (1024 if cuda else 64)
    gemm_n = gemm_n or (8192 if cuda else 1024)
    if copy_mib < 1 or gemm_n < 1:
        raise ValueError(f"copy_mib and gemm_n must be positive, got {copy_mib}, {gemm_n}")
    n_el = copy_mib * 2**20 // 4
    copy_ms = _copy_ms(n_el, dev, repeats)
    bytes_per_s = 2 * n_el * 4 / (copy_ms / 1e3)   # read + written
    gemm_ms = _gemm_ms(gemm_n, dt, dev, repeats)
    flops_per_s = 2 * gemm_n ** 3 / (gemm_ms / 1e3)
    name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    peaks = Peaks(f"measured: {name}", flops_per_s, bytes_per_s, {dtype_name(dt): flops_per_s})
    raw = {"device": name, "copy_mib": copy_mib, "copy_ms": copy_ms,
           "bytes_per_s": bytes_per_s, "gemm_n": gemm_n, "gemm_dtype": dtype_name(dt),
           "gemm_ms": gemm_ms, "flops_per_s": flops_per_s,
           "ridge_flop_per_byte": flops_per_s / bytes_per_s}
    return peaks, raw


# --------------------------------------------------------------------------------------
# Per-layer time
# --------------------------------------------------------------------------------------

class _Marks(Clock):
    """Start/end marks of the hooked modules within one forward pass."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.marks: dict[str, list] = {}

    def pre(self, name):
        def hook(module, args):
            self.marks[name] = [self.mark(), None]
        return hook

    def post(self, name):
        def hook(module, args, output):
            self.marks[name][1] = self.mark()
        return hook

    def elapsed(self) -> dict[str, float]:
        self.sync()
        return {k: self.elapsed_ms(s, e) for k, (s, e) in self.marks.items()}


def _hook_names(model: nn.Module, rows: Sequence[str]) -> dict[str, nn.Module]:
    mods = dict(model.named_modules())
    names = {r: mods[r] for r in rows if r in mods}
    for r in rows:  # attention core: timed as the attention module, minus qkv and proj
        if r.endswith(".attn.sdpa"):
            parent = r[:-len(".sdpa")]
            if parent in mods:
                names[parent] = mods[parent]
    return names


@torch.no_grad()
def layer_stats(model: nn.Module, x: torch.Tensor, names: Sequence[str], warmup: int = 3,
                repeats: int = 20) -> tuple[dict[str, dict], dict, dict]:
    """:func:`~pyengine.measure.timing.summarize` (median, IQR, ...) of each row in ``names``
    that can be timed (a module of that name, or an attention core), of the whole forward, and
    of the rest (forward minus the timed rows, per pass, so one preempted pass does not inflate
    it), over ``repeats`` forward passes after ``warmup``."""
    dev = x.device
    hooked = _hook_names(model, names)
    clock = _Marks(dev)
    handles = []
    for n, m in hooked.items():
        handles.append(m.register_forward_pre_hook(clock.pre(n)))
        handles.append(m.register_forward_hook(clock.post(n)))
    samples: dict[str, list[float]] = {}
    totals: list[float] = []
    rest: list[float] = []
    try:
        with torch.inference_mode():
            warm_up([lambda: model(x)], warmup, dev)
            for _ in range(repeats):
                clock.marks.clear()
                t0 = clock.mark()
                model(x)
                t1 = clock.mark()
                ms = clock.elapsed()
                total = clock.elapsed_ms(t0, t1)
                rows = {}
                for r in names:
                    if r.endswith(".attn.sdpa") and r[:-len(".sdpa")] in ms:
                        parent = r[:-len(".sdpa")]
                        rows[r] = max(0.0, ms[parent] - ms.get(f"{parent}.qkv", 0.0)
                                      - ms.get(f"{parent}.proj", 0.0))
                    elif r in ms:
                        rows[r] = ms[r]
                for r, t in rows.items():
                    samples.setdefault(r, []).append(t)
                totals.append(total)
                rest.append(max(0.0, total - sum(rows.values())))
    finally:
        for h in handles:
            h.remove()
    return {n: summarize(v) for n, v in samples.items()}, summarize(totals), summarize(rest)


def layer_times(model: nn.Module, x: torch.Tensor, names: Sequence[str], warmup: int = 3,
                repeats: int = 20) -> tuple[dict[str, float], float, float]:
    """Medians of :func:`layer_stats`: per row, of the whole forward and of the rest (ms)."""
    rows, total, rest = layer_stats(model, x, names, warmup, repeats)
    return ({n: st["median_ms"] for n, st in rows.items()}, total["median_ms"],
            rest["median_ms"])


def profile_model(model: nn.Module, batch: int, dtype, device: torch.device, peaks: Peaks,
                  repeats: int = 20, warmup: int = 3) -> dict[str, Any]:
    """Cost-model rows of ``model`` with measured time, achieved rates and the bound."""
    dt = parse_dtype(dtype)
    model = model.to(device=device, dtype=dt).eval()
    c = cost(model, batch=batch, dtype=dt, device=peaks)
    from pyengine.measure.bench import _image_shape
    x = torch.randn(batch, *_image_shape(model), device=device, dtype=dt)
    names = [r.name for r in c.layers]
    stats, total_st, other_st = layer_stats(model, x, names, warmup, repeats)
    total, other = total_st["median_ms"], other_st["median_ms"]
    ridge = peaks.ridge(dt)
    rows = []
    timed = 0.0
    for r in c.layers:
        d = r.as_dict()
        d["roofline_ms"] = d.pop("time_s") * 1e3
        st = stats.get(r.name)
        t = st["median_ms"] if st is not None else None
        d["measured_ms"] = t
        d["measured_iqr_ms"] = st["iqr_ms"] if st is not None else None
        if t is not None and t > 0:
            timed += t
            d["achieved_tflops"] = r.flops / (t / 1e3) / 1e12
            d["achieved_gbps"] = r.bytes / (t / 1e3) / 1e9
            d["roof_fraction"] = d["roofline_ms"] / t   # 1.0: at the roof
        rows.append(d)
    rows.append({"name": "other", "kind": "other", "macs": 0, "bytes": 0, "params": 0,
                 "flops": 0, "intensity": 0.0, "bound": "-", "roofline_ms": 0.0,
                 "measured_ms": other, "measured_iqr_ms": other_st["iqr_ms"],
                 "note": "forward time not in any hooked layer (position embedding, residual "
                         "adds, hooks)"})
    return {"batch": batch, "dtype": dtype_name(dt), "total_ms": total,
            "total_iqr_ms": total_st["iqr_ms"], "timed_ms": timed,
            "macs": c.macs, "flops": c.flops, "bytes": c.bytes, "params": c.params,
            "roofline_ms": c.time_s * 1e3, "ridge_flop_per_byte": ridge,
            "achieved_tflops": c.flops / (total / 1e3) / 1e12,
            "by_kind": _by_kind(rows), "layers": rows}


def _by_kind(rows) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        d = out.setdefault(r["kind"], {"flops": 0, "bytes": 0, "measured_ms": 0.0})
        d["flops"] += r["flops"]
        d["bytes"] += r["bytes"]
        d["measured_ms"] += r["measured_ms"] or 0.0
    return out


def profile(models: Mapping[str, nn.Module], batch: int = 64, dtype="bfloat16",
            device: str | torch.device | None = None, peaks: Peaks | None = None,
            peaks_raw: dict | None = None, repeats: int = 20, warmup: int = 3,
            model_name: str | None = None, copy_mib: int | None = None,
            gemm_n: int | None = None) -> dict[str, Any]:
    """Profile each model (e.g. ``{"dense": ..., "compact": ...}``) at one batch size."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if not models:
        raise ValueError("profile needs at least one model")
    dev = resolve_device(device)
    dt = parse_dtype(dtype)
    if peaks is None:
        peaks, peaks_raw = measure_peaks(dev, dt, copy_mib, gemm_n)
    profiles = []
    for label, m in models.items():
        p = profile_model(m, batch, dt, dev, peaks, repeats, warmup)
        profiles.append({"variant": label, "model": model_name, **p})
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return {"env": environment(dev),
            "peaks": peaks_raw or {"device": peaks.name, "flops_per_s": peaks.flops_for(dt),
                                   "bytes_per_s": peaks.bytes_per_s},
            "config": {"model": model_name, "batch": batch, "dtype": dtype_name(dt),
                       "device": str(dev), "repeats": repeats, "warmup": warmup},
            "profiles": profiles}


def format_profile(report: dict[str, Any], max_rows: int | None = 40) -> str:
    pk = report["peaks"]
    lines = [f"measured peaks: {pk['flops_per_s'] / 1e12:.2f} TFLOP/s, "
             f"{pk['bytes_per_s'] / 1e9:.1f} GB/s (ridge "
             f"{pk['flops_per_s'] / pk['bytes_per_s']:.1f} FLOP/B)"]
    for p in report["profiles"]:
        lines.append(f"--- {p['variant']}: batch {p['batch']} {p['dtype']}, forward "
                     f"{p['total_ms']:.3f} ms (roofline bound {p['roofline_ms']:.3f} ms), "
                     f"{p['achieved_tflops']:.3f} TFLOP/s, GMACs {p['macs'] / 1e9:.3f}")
        hdr = (f"{'layer':<22} {'kind':<11} {'FLOP/B':>8} {'bound':>7} {'ms':>8} "
               f"{'TFLOP/s':>8} {'GB/s':>8} {'of roof':>7}")
        lines += [hdr, "-" * len(hdr)]
        rows = p["layers"] if max_rows is None else p["layers"][:max_rows]
        for r in rows:
            t = r["measured_ms"]
            tf = f"{r['achieved_tflops']:.3f}" if "achieved_tflops" in r else "-"
            gb = f"{r['achieved_gbps']:.1f}" if "achieved_gbps" in r else "-"
            fr = f"{r['roof_fraction']:.2f}" if "roof_fraction" in r else "-"
            lines.append(f"{r['name']:<22} {r['kind']:<11} {r['intensity']:>8.1f} "
                         f"{r['bound']:>7} {('%.4f' % t) if t is not None else '-':>8} "
                         f"{tf:>8} {gb:>8} {fr:>7}")
        if max_rows is not None and len(p["layers"]) > max_rows:
            lines.append(f"... {len(p['layers']) - max_rows} more rows (all in the JSON)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The plot
# --------------------------------------------------------------------------------------

_KIND_COLORS = {"linear": "tab:blue", "attention": "tab:red", "conv": "tab:purple",
                "norm": "tab:green", "elementwise": "tab:orange", "other": "tab:gray"}


def plot(report: dict[str, Any], path) -> None:
    """Roofline (achieved FLOP/s against intensity, measured roofs) and time per layer kind,
    one marker style per variant (dense vs compact: before/after pruning)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pk = report["peaks"]
    P, BW = pk["flops_per_s"], pk["bytes_per_s"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [3, 2]})
    markers = ["o", "^", "s", "D", "v"]
    xs = []
    for i, p in enumerate(report["profiles"]):
        for r in p["layers"]:
            if r["flops"] <= 0 or not r.get("measured_ms"):
                continue
            xs.append(r["intensity"])
            c = _KIND_COLORS.get(r["kind"], "k")
            hollow = i == 0 and len(report["profiles"]) > 1  # dense: hollow, pruned: filled
            ax.scatter(r["intensity"], r["flops"] / (r["measured_ms"] / 1e3),
                       marker=markers[i % len(markers)], s=26, alpha=0.75,
                       facecolors="none" if hollow else c, edgecolors=c)
    lo = min(xs + [1.0]) / 4
    hi = max(xs + [P / BW]) * 4
    grid = [lo * (hi / lo) ** (k / 200) for k in range(201)]
    ax.plot(grid, [min(P, BW * g) for g in grid], "k-", lw=1.5,
            label=f"measured roof: {P / 1e12:.3g} TFLOP/s, {BW / 1e9:.3g} GB/s")
    ax.axvline(P / BW, color="k", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte, cost model)")
    ax.set_ylabel("achieved FLOP/s (measured)")
    cfg = report["config"]
    ax.set_title(f"{cfg.get('model') or ''} batch {cfg['batch']} {cfg['dtype']} on "
                 f"{report['env'].get('gpu') or 'CPU'}", fontsize=10)
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color="k", lw=1.5, label=ax.lines[0].get_label())]
    handles += [Line2D([], [], ls="", marker="o", color=c, label=k)
                for k, c in _KIND_COLORS.items() if k not in ("other", "norm", "elementwise")]
    handles += [Line2D([], [], ls="", marker=markers[i % len(markers)], color="k",
                       fillstyle="none" if i == 0 and len(report["profiles"]) > 1 else "full",
                       label=p["variant"]) for i, p in enumerate(report["profiles"])]
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    # time per kind, stacked, one bar per variant
    kinds = [k for k in _KIND_COLORS if any(k in p["by_kind"] for p in report["profiles"])]
    labels = [p["variant"] for p in report["profiles"]]
    bottom = [0.0] * len(labels)
    for k in kinds:
        vals = [p["by_kind"].get(k, {}).get("measured_ms", 0.0) for p in report["profiles"]]
        bx.bar(labels, vals, bottom=bottom, color=_KIND_COLORS[k], label=k)
        bottom = [b + v for b, v in zip(bottom, vals)]
    bx.set_ylabel("measured time per forward (ms)")
    bx.set_title("where the time goes", fontsize=10)
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["measure_peaks", "layer_stats", "layer_times", "profile_model", "profile", "format_profile", "plot"]
