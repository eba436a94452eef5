"""The figure of a roofline profile (:func:`pyengine.measure.roofline.profile`'s report).

Four panels, every variant in each (the first, dense, hollow markers; the others filled):
the roofline (achieved FLOP/s against intensity, under the compute roof and the memory roofs
of DRAM and of the fastest cache), the memory roof by footprint (achieved GB/s of every timed
layer against the bandwidth ceiling at its footprint: LayerNorm and GELU have no FLOPs and
show only here), time per layer kind, and per layer the compact/dense time against the
compact/dense FLOPs (below the diagonal: pruning sped the layer up more than its FLOPs fell).
Layers that landed above the measured roof are circled in red.
"""
from __future__ import annotations

from typing import Any

__all__ = ["plot", "KIND_COLORS"]

KIND_COLORS = {"linear": "tab:blue", "attention": "tab:red", "conv": "tab:purple",
               "norm": "tab:green", "elementwise": "tab:orange", "other": "tab:gray"}
_MARKERS = ["o", "^", "s", "D", "v"]


def _style(i: int, n: int, color: str) -> dict:
    hollow = i == 0 and n > 1
    return {"marker": _MARKERS[i % len(_MARKERS)], "facecolors": "none" if hollow else color,
            "edgecolors": color}


def plot(report: dict[str, Any], path) -> None:
    """Write the four-panel roofline figure of ``report`` to ``path`` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    roof = report["roof"]
    P, dram = roof["flops_per_s"], roof["dram_bytes_per_s"]
    ceilings = [(c["footprint_bytes"], c["bytes_per_s"]) for c in roof["ceilings"]]
    cache = max([bw for _, bw in ceilings] + [dram])
    profs = report["profiles"]
    n = len(profs)
    fig, axes = plt.subplots(2, 2, figsize=(14, 10.5))
    ax, mx, bx, cx = axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]

    # ---- (a) roofline
    xs = []
    for i, p in enumerate(profs):
        for r in p["layers"]:
            if r["flops"] <= 0 or not r.get("measured_ms") or r["kind"] == "other":
                continue
            y = r["flops"] / (r["measured_ms"] / 1e3)
            xs.append(r["intensity"])
            ax.scatter(r["intensity"], y, s=28, alpha=0.8,
                       **_style(i, n, KIND_COLORS.get(r["kind"], "k")))
            if r.get("above_roof"):
                ax.scatter(r["intensity"], y, s=140, facecolors="none", edgecolors="red", lw=1.5)
    lo = min(xs + [P / cache]) / 4
    hi = max(xs + [P / dram]) * 4
    grid = [lo * (hi / lo) ** (k / 300) for k in range(301)]
    ax.plot(grid, [min(P, dram * g) for g in grid], "k-", lw=1.6)
    if cache > dram * 1.01:
        ax.plot(grid, [min(P, cache * g) for g in grid], "k--", lw=1.0)
    mP = roof.get("measured_flops_per_s", P)
    if mP < P * 0.999:
        ax.axhline(mP, color="red", ls=":", lw=1.0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte, cost model)")
    ax.set_ylabel("achieved FLOP/s (measured, median)")
    cfg = report["config"]
    env = report["env"]
    ax.set_title(f"{cfg.get('model') or ''} batch {cfg['batch']} {cfg['dtype']} on "
                 f"{env.get('gpu') or env.get('cpu') or 'CPU'}\nroof {roof['source']}: "
                 f"{P / 1e9:.4g} GFLOP/s, DRAM {dram / 1e9:.3g} GB/s", fontsize=9)
    handles = [Line2D([], [], color="k", lw=1.6, label="roof: compute, DRAM bandwidth")]
    if cache > dram * 1.01:
        handles.append(Line2D([], [], color="k", ls="--", lw=1.0,
                              label=f"fastest cache ceiling {cache / 1e9:.3g} GB/s"))
    if mP < P * 0.999:
        handles.append(Line2D([], [], color="red", ls=":", label="compute roof as measured "
                                                                 "(raised: see checks)"))
    handles += [Line2D([], [], ls="", marker="o", color=c, label=k)
                for k, c in KIND_COLORS.items() if k != "other"]
    handles += [Line2D([], [], ls="", marker=_MARKERS[i % len(_MARKERS)], color="k",
                       fillstyle="none" if i == 0 and n > 1 else "full", label=p["variant"])
                for i, p in enumerate(profs)]
    if any(r.get("above_roof") for p in profs for r in p["layers"]):
        handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none",
                              markeredgecolor="red", markersize=10,
                              label="above the measured roof"))
    ax.legend(handles=handles, fontsize=7, loc="lower right")

    # ---- (b) memory roof by footprint
    fps = []
    for i, p in enumerate(profs):
        for r in p["layers"]:
            if not r.get("measured_ms") or r["kind"] == "other" or not r["bytes"]:
                continue
            fps.append(r["bytes"])
            y = r["bytes"] / (r["measured_ms"] / 1e3) / 1e9
            mx.scatter(r["bytes"], y, s=28, alpha=0.8,
                       **_style(i, n, KIND_COLORS.get(r["kind"], "k")))
            if r.get("above_roof"):
                mx.scatter(r["bytes"], y, s=140, facecolors="none", edgecolors="red", lw=1.5)
    if fps:
        flo, fhi = min(fps + [f for f, _ in ceilings]) / 2, max(fps) * 1.5
        g = [flo * (fhi / flo) ** (k / 300) for k in range(301)]

        def bw_at(b):  # Roof.bandwidth
            return max([dram] + [bw for f, bw in ceilings if f > b / 4])

        mx.plot(g, [bw_at(b) / 1e9 for b in g], "k-", lw=1.6,
                label="memory roof at footprint B (best copy/read above B/4)")
    mx.scatter([f for f, _ in ceilings], [bw / 1e9 for _, bw in ceilings], marker="x",
               color="k", s=18, label="stream probes (best sample)")
    mx.axhline(dram / 1e9, color="k", ls=":", lw=1.0,
               label=f"DRAM: stream beyond the last-level cache, {dram / 1e9:.3g} GB/s")
    if roof.get("llc_bytes"):
        mx.axvline(roof["llc_bytes"], color="gray", ls="--", lw=0.8,
                   label="last-level cache size")
    mx.set_xscale("log")
    mx.set_yscale("log")
    mx.set_xlabel("bytes the layer moves (cost model: weights + activations in and out)")
    mx.set_ylabel("achieved GB/s (measured, median)")
    mx.set_title("memory roof by footprint (every timed layer)", fontsize=9)
    mx.legend(fontsize=7, loc="lower left")

    # ---- (c) time per kind
    kinds = [k for k in KIND_COLORS if any(k in p["by_kind"] for p in profs)]
    labels = [p["variant"] for p in profs]
    bottom = [0.0] * len(labels)
    for k in kinds:
        vals = [p["by_kind"].get(k, {}).get("measured_ms", 0.0) for p in profs]
        bx.bar(labels, vals, bottom=bottom, color=KIND_COLORS[k], label=k)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for j, p in enumerate(profs):
        bx.text(j, bottom[j], f"{p['total_ms']:.1f} ms", ha="center", va="bottom", fontsize=8)
    bx.set_ylabel("measured time per forward pass (ms)")
    bx.set_title("where the time goes, by layer kind", fontsize=9)
    bx.legend(fontsize=8)

    # ---- (d) which layers pruning sped up
    comps = report.get("comparison") or []
    if comps:
        c = comps[0]
        pts = [r for r in c["layers"] if r.get("speedup") and r.get("flops_ratio")]
        mem = [r for r in c["layers"] if r.get("speedup") and not r.get("flops_ratio")
               and r.get("bytes_ratio")]
        for r in pts:
            cx.scatter(r["flops_ratio"], 1 / r["speedup"], s=28, alpha=0.8,
                       color=KIND_COLORS.get(r["kind"], "k"))
        for r in mem:
            cx.scatter(r["bytes_ratio"], 1 / r["speedup"], s=28, alpha=0.8, marker="s",
                       facecolors="none", edgecolors=KIND_COLORS.get(r["kind"], "k"))
        cx.plot([k / 100 for k in range(1, 201)], [k / 100 for k in range(1, 201)], "k:",
                lw=1.0, label="time falls as the work does")
        cx.axhline(1.0, color="gray", lw=0.8, label="no change")
        cx.set_yscale("log")
        cx.set_xlim(0, max([r["flops_ratio"] for r in pts] + [1.1]) * 1.05)
        cx.set_xlabel(f"{c['variant']} / {c['base']} work per layer (FLOPs; squares: bytes)")
        cx.set_ylabel(f"{c['variant']} / {c['base']} measured time per layer")
        cx.set_title("which layers pruning sped up (below the dotted line: as much as their "
                     "work fell)", fontsize=9)
        cx.legend(fontsize=7, loc="upper left")
    else:
        p = profs[0]
        rows = [r for r in p["layers"] if r.get("roof_fraction") is not None]
        cx.bar(range(len(rows)), [100 * r["roof_fraction"] for r in rows],
               color=[KIND_COLORS.get(r["kind"], "k") for r in rows])
        cx.set_xlabel("layer (model order)")
        cx.set_ylabel("% of the roof at the layer's intensity")
        cx.set_title("how close each layer gets to its roof", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
