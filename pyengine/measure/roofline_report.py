"""The analysis and text of a roofline profile (:func:`pyengine.measure.roofline.profile`):
each row's roof (at its intensity and footprint), the layers above the measured roof (reported,
and the roof raised to them), totals by layer kind, each variant against the first (dense vs
compact, layer by layer), and the printed tables."""
from __future__ import annotations

import copy
from typing import Any, Sequence

from pyengine.measure.roof import Roof

__all__ = ["analyse", "format_profile", "VERDICT_FACTOR"]

#: the verdict thresholds of the dense-vs-compact table: a layer is "faster" when its time
#: fell by at least this factor, "slower" when it rose by it
VERDICT_FACTOR = 1.1


# --------------------------------------------------------------------------------------
# Analysis: roof fractions, raising, totals by kind, dense vs compact
# --------------------------------------------------------------------------------------

def _timed(r: dict) -> bool:
    return r["kind"] != "other" and r.get("measured_ms") is not None and r["measured_ms"] > 0


def analyse(report: dict[str, Any], roof: Roof) -> dict[str, Any]:
    """Fill in the roof fields of every row (``report["profiles"]`` with measured times),
    raise the roof over any layer above it (recorded in ``checks``), and add totals by kind
    and the comparison of each variant with the first. Tests call this with made-up times."""
    measured = copy.deepcopy(roof)
    worst = (0.0, None)
    for p in report["profiles"]:
        for r in p["layers"]:
            if _timed(r):
                f = measured.time_s(r["flops"], r["bytes"]) * 1e3 / r["measured_ms"]
                r["roof_fraction_measured"] = f
                if f > worst[0]:
                    worst = (f, f"{p['variant']}: {r['name']}")
    above = []
    for p in report["profiles"]:
        for r in p["layers"]:
            if _timed(r):
                e = roof.raise_to(f"{p['variant']}: {r['name']}", r["flops"], r["bytes"],
                                  r["measured_ms"] / 1e3)
                if e is not None:
                    above.append(e)
    for p in report["profiles"]:
        roof_ms = 0.0
        for r in p["layers"]:
            if r["kind"] == "other":
                continue
            t_roof = roof.time_s(r["flops"], r["bytes"]) * 1e3
            bw = roof.bandwidth(r["bytes"]) if r["bytes"] else roof.dram_bytes_per_s
            r["roof_ms"] = t_roof
            r["roof_gbps"] = bw / 1e9
            r["roof_tflops"] = (r["flops"] / (t_roof / 1e3) / 1e12) if r["flops"] and t_roof \
                else 0.0
            r["bound"] = roof.bound(r["flops"], r["bytes"])
            if _timed(r):
                t = r["measured_ms"] / 1e3
                r["achieved_tflops"] = r["flops"] / t / 1e12
                r["achieved_gbps"] = r["bytes"] / t / 1e9
                r["roof_fraction"] = t_roof / r["measured_ms"]
                r["above_roof"] = r["roof_fraction_measured"] > 1.0
                roof_ms += t_roof
        p["timed_ms"] = sum(r["measured_ms"] for r in p["layers"] if _timed(r))
        p["roof_ms"] = roof_ms
        p["achieved_tflops"] = p["flops"] / (p["total_ms"] / 1e3) / 1e12 if p["total_ms"] else 0.0
        p["by_kind"] = _by_kind(p["layers"], p["total_ms"])
    report["roof"] = roof.as_dict()
    report["roof"]["measured_flops_per_s"] = measured.flops_per_s
    report["roof"]["measured_dram_bytes_per_s"] = measured.dram_bytes_per_s
    report["peaks"] = {"device": roof.device, "flops_per_s": roof.flops_per_s,
                       "bytes_per_s": roof.dram_bytes_per_s,
                       "ridge_flop_per_byte": roof.ridge(), "source": roof.source}
    report["checks"] = {"max_roof_fraction": worst[0], "max_roof_layer": worst[1],
                        "above_roof": above, "roof_raised": bool(above)}
    if len(report["profiles"]) > 1:
        base = report["profiles"][0]
        report["comparison"] = [_compare(base, p) for p in report["profiles"][1:]]
    return report


_KINDS = ("linear", "attention", "conv", "norm", "elementwise", "other")


def _by_kind(rows: Sequence[dict], total_ms: float) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        d = out.setdefault(r["kind"], {"rows": 0, "timed_rows": 0, "flops": 0, "bytes": 0,
                                       "measured_ms": 0.0, "roof_ms": 0.0})
        d["rows"] += 1
        d["flops"] += r["flops"]
        d["bytes"] += r["bytes"]
        if r["kind"] == "other" or _timed(r):
            d["timed_rows"] += 1
            d["measured_ms"] += r["measured_ms"] or 0.0
            d["roof_ms"] += r.get("roof_ms", 0.0) if r["kind"] != "other" else 0.0
    for k, d in out.items():
        timed = [r for r in rows if r["kind"] == k and _timed(r)]
        tf, tb = sum(r["flops"] for r in timed), sum(r["bytes"] for r in timed)
        t = d["measured_ms"] / 1e3
        d["achieved_tflops"] = tf / t / 1e12 if t > 0 else None
        d["achieved_gbps"] = tb / t / 1e9 if t > 0 else None
        d["roof_fraction"] = d["roof_ms"] / d["measured_ms"] if d["measured_ms"] > 0 \
            and k != "other" else None
        d["share_of_time"] = d["measured_ms"] / total_ms if total_ms else None
    return dict(sorted(out.items(), key=lambda kv: _KINDS.index(kv[0])
                       if kv[0] in _KINDS else len(_KINDS)))


def _verdict(speedup: float | None) -> str:
    if speedup is None:
        return "-"
    if speedup >= VERDICT_FACTOR:
        return "faster"
    if speedup <= 1 / VERDICT_FACTOR:
        return "slower"
    return "same"


def _compare(base: dict, other: dict) -> dict:
    b = {r["name"]: r for r in base["layers"]}
    o = {r["name"]: r for r in other["layers"]}
    names = list(b) + [n for n in o if n not in b]
    layers = []
    for n in names:
        rb, ro = b.get(n), o.get(n)
        d: dict[str, Any] = {"name": n, "kind": (rb or ro)["kind"],
                             "base_ms": rb.get("measured_ms") if rb else None,
                             "ms": ro.get("measured_ms") if ro else None}
        if rb and ro:
            d["flops_ratio"] = ro["flops"] / rb["flops"] if rb["flops"] else None
            d["bytes_ratio"] = ro["bytes"] / rb["bytes"] if rb["bytes"] else None
            d["roof_speedup"] = rb["roof_ms"] / ro["roof_ms"] \
                if rb.get("roof_ms") and ro.get("roof_ms") else None
            d["base_roof_fraction"] = rb.get("roof_fraction")
            d["roof_fraction"] = ro.get("roof_fraction")
            sp = d["base_ms"] / d["ms"] if d["base_ms"] and d["ms"] else None
            d["speedup"] = sp
            d["verdict"] = _verdict(sp)
        else:
            d["verdict"] = "removed" if rb else "new"
            d["speedup"] = None
        layers.append(d)
    kinds = []
    for k in dict.fromkeys(list(base["by_kind"]) + list(other["by_kind"])):
        kb, ko = base["by_kind"].get(k, {}), other["by_kind"].get(k, {})
        tb, to = kb.get("measured_ms", 0.0), ko.get("measured_ms", 0.0)
        sp = tb / to if tb and to else None
        kinds.append({"kind": k, "base_ms": tb, "ms": to, "speedup": sp,
                      "flops_ratio": ko.get("flops", 0) / kb["flops"] if kb.get("flops") else None,
                      "saved_ms": tb - to, "verdict": _verdict(sp)})
    total = {"base_ms": base["total_ms"], "ms": other["total_ms"],
             "speedup": base["total_ms"] / other["total_ms"] if other["total_ms"] else None,
             "flops_ratio": other["flops"] / base["flops"] if base["flops"] else None}
    return {"base": base["variant"], "variant": other["variant"], "layers": layers,
            "by_kind": kinds, "total": total}


def _rate_unit(report) -> tuple[str, float]:
    return ("TFLOP/s", 1.0) if report["roof"]["flops_per_s"] >= 1e12 else ("GFLOP/s", 1e3)


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}"


def _scaled(v, scale: float):
    return None if not v else v * scale


def _x(v) -> str:
    return "-" if v is None else f"x{v:.2f}"


def format_profile(report: dict[str, Any], max_rows: int | None = None) -> str:
    """The header (dtype and how the roof was measured), the roof check, a table per variant,
    totals by kind, and dense vs compact side by side."""
    cfg, roof, env, chk = report["config"], report["roof"], report["env"], report["checks"]
    unit, scale = _rate_unit(report)
    dev = env.get("gpu") or f"{env.get('cpu', 'CPU')}, {env.get('threads')} threads"
    load = f", load average {env['loadavg_1m']}" if env.get("loadavg_1m") is not None else ""
    L = [f"pyengine profile: {cfg.get('model') or 'model'}, batch {cfg['batch']}, input "
         f"{cfg.get('input_shape')}, {cfg['device']} ({dev}), torch {env.get('torch')}{load}",
         f"dtype: {cfg['dtype']} ({cfg['dtype_source']}; --dtype overrides)",
         f"roof, compute: {roof['method']['compute']}",
         f"roof, memory: {roof['method']['memory']}",
         f"ridge: {roof['ridge_flop_per_byte']:.1f} FLOP/B at DRAM bandwidth; a layer's own "
         "memory roof is the ceiling at its footprint (column GB/s roof)"]
    if chk["above_roof"]:
        worst = max(chk["above_roof"], key=lambda e: e["times_above"])
        L.append(f"roof check: WARNING {len(chk['above_roof'])} layer(s) above the measured "
                 f"roof, up to {worst['times_above']:.2f}x ({worst['layer']}); the roof is "
                 "raised to what they achieved:")
        for e in chk["above_roof"]:
            parts = []
            if "compute_to" in e:
                parts.append(f"compute {e['compute_from'] * scale / 1e12:.4g} -> "
                             f"{e['compute_to'] * scale / 1e12:.4g} {unit}")
            if "bandwidth_to" in e:
                parts.append(f"bandwidth at {e['footprint'] / 1e6:.3g} MB "
                             f"{e['bandwidth_from'] / 1e9:.1f} -> {e['bandwidth_to'] / 1e9:.1f}"
                             " GB/s")
            L.append(f"  {e['layer']}: {e['times_above']:.2f}x above; " + ", ".join(parts))
    else:
        L.append(f"roof check: no layer above the measured roof (highest: "
                 f"{chk['max_roof_layer']} at {100 * chk['max_roof_fraction']:.0f}% of it)")
    for p in report["profiles"]:
        L.append("")
        L.append(f"--- {p['variant']}: forward {p['total_ms']:.3f} ms (IQR "
                 f"{p['total_iqr_ms']:.3f}), {p['macs'] / 1e9:.3f} GMACs, achieved "
                 f"{p['achieved_tflops'] * scale:.4g} {unit}; timed layers "
                 f"{p['timed_ms']:.3f} ms against {p['roof_ms']:.3f} ms at the roof")
        hdr = (f"{'layer':<24} {'kind':<11} {'MFLOP':>9} {'MB':>8} {'FLOP/B':>7} {'ms':>9} "
               f"{unit:>8} {'GB/s':>7} {'GB/s roof':>9} {'% roof':>6} {'bound':>7}")
        L += [hdr, "-" * len(hdr)]
        rows = p["layers"] if max_rows is None else p["layers"][:max_rows]
        for r in rows:
            frac = r.get("roof_fraction")
            flag = " ABOVE" if r.get("above_roof") else ""
            rate = _scaled(r.get("achieved_tflops") if r["flops"] else None, scale)
            L.append(f"{r['name']:<24} {r['kind']:<11} {r['flops'] / 1e6:>9.1f} "
                     f"{r['bytes'] / 1e6:>8.2f} {r['intensity']:>7.1f} "
                     f"{_f(r.get('measured_ms'), '.4f'):>9} {_f(rate, '.4g'):>8} "
                     f"{_f(r.get('achieved_gbps'), '.1f'):>7} {_f(r.get('roof_gbps'), '.1f'):>9} "
                     f"{_pct(frac):>6} "
                     f"{r.get('bound', '-'):>7}{flag}")
        if max_rows is not None and len(p["layers"]) > max_rows:
            L.append(f"... {len(p['layers']) - max_rows} more rows (all in the JSON)")
        L.append(f"by kind ({p['variant']}):")
        kh = (f"  {'kind':<11} {'rows':>5} {'timed':>5} {'GFLOP':>8} {'MB':>8} {'ms':>9} "
              f"{'% time':>6} {unit:>8} {'GB/s':>7} {'% roof':>6}")
        L.append(kh)
        for k, d in p["by_kind"].items():
            L.append(f"  {k:<11} {d['rows']:>5} {d['timed_rows']:>5} {d['flops'] / 1e9:>8.3f} "
                     f"{d['bytes'] / 1e6:>8.1f} {d['measured_ms']:>9.3f} "
                     f"{_pct(d['share_of_time']):>6} "
                     f"{_f(_scaled(d['achieved_tflops'], scale), '.4g'):>8} "
                     f"{_f(d['achieved_gbps'], '.1f'):>7} {_pct(d['roof_fraction']):>6}")
    for cmp in report.get("comparison", []):
        b, v = cmp["base"], cmp["variant"]
        L.append("")
        L.append(f"--- {b} vs {v}, layer by layer (speedup = {b} ms / {v} ms; faster/slower: "
                 f"by {VERDICT_FACTOR}x or more)")
        hdr = (f"{'layer':<24} {'kind':<11} {b + ' ms':>10} {v + ' ms':>11} {'speedup':>7} "
               f"{'FLOPs':>6} {'at roof':>7} {'%roof ' + b[:1]:>7} {'%roof ' + v[:1]:>7} "
               f"verdict")
        L += [hdr, "-" * len(hdr)]
        rows = cmp["layers"] if max_rows is None else cmp["layers"][:max_rows]
        for r in rows:
            L.append(f"{r['name']:<24} {r['kind']:<11} {_f(r['base_ms'], '.4f'):>10} "
                     f"{_f(r['ms'], '.4f'):>11} {_f(r.get('speedup'), '.2f'):>7} "
                     f"{_f(r.get('flops_ratio'), '.2f'):>6} {_f(r.get('roof_speedup'), '.2f'):>7} "
                     f"{_pct(r.get('base_roof_fraction')):>7} {_pct(r.get('roof_fraction')):>7} "
                     f"{r['verdict']}")
        if max_rows is not None and len(cmp["layers"]) > max_rows:
            L.append(f"... {len(cmp['layers']) - max_rows} more rows (all in the JSON)")
        counts = {}
        for r in cmp["layers"]:
            counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
        L.append("layers: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
        L.append(f"by kind ({b} vs {v}):")
        for k in cmp["by_kind"]:
            L.append(f"  {k['kind']:<11} {k['base_ms']:>10.3f} {k['ms']:>11.3f} ms "
                     f"speedup {_f(k['speedup'], '.2f'):>5}  FLOPs {_x(k['flops_ratio'])}"
                     f"  saved {k['saved_ms']:.3f} ms  {k['verdict']}")
        t = cmp["total"]
        L.append(f"  {'total':<11} {t['base_ms']:>10.3f} {t['ms']:>11.3f} ms speedup "
                 f"{_f(t['speedup'], '.2f')}  FLOPs {_x(t['flops_ratio'])}")
    return "\n".join(L)
