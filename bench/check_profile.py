"""Check `pyengine profile` JSON files against issue 20's acceptance, and print the figures.

    python bench/check_profile.py bench/results/cpu/profile_deit_small_50pct_b8_cpu.json \
        --fc-batch bench/results/cpu/profile_deit_small_50pct_b64_cpu.json

Checks, per file: no layer above the measured roof by more than 10% (``roof_fraction_measured``
<= 1.10; the roof as measured, before any raise); every norm and elementwise row (LayerNorm,
GELU, residual adds) classified memory-bound; the dtype and how the roof was measured are in
the report. With ``--fc-batch FILE``: the dense model's fc1/fc2 layers at >= 50% of their roof
(``roof_fraction``) in FILE (the batch-64 run). Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys


def check(path: str) -> list[tuple[str, bool, str]]:
    rep = json.load(open(path))
    out = []
    rows = [(p["variant"], r) for p in rep["profiles"] for r in p["layers"]
            if r["kind"] != "other"]
    fr = [(r.get("roof_fraction_measured"), v, r["name"]) for v, r in rows
          if r.get("roof_fraction_measured") is not None]
    worst = max(fr, key=lambda t: t[0]) if fr else (None, "-", "-")
    out.append(("no layer above the measured roof by more than 10%",
                bool(fr) and worst[0] <= 1.10,
                f"highest {worst[0]:.3f} of the roof ({worst[1]}: {worst[2]}); "
                f"{sum(1 for f, _, _ in fr if f > 1.0)} of {len(fr)} timed rows above 1.0"
                if fr else "no timed rows"))
    mem = [(v, r) for v, r in rows if r["kind"] in ("norm", "elementwise")]
    bad = [f"{v}: {r['name']}" for v, r in mem if r.get("bound") != "memory"]
    out.append(("LayerNorm/GELU/adds memory-bound", bool(mem) and not bad,
                f"{len(mem)} norm/elementwise rows" + (f"; not memory-bound: {bad[:5]}"
                                                       if bad else "")))
    method = rep.get("roof", {}).get("method", {})
    ok = bool(rep["config"].get("dtype")) and all(method.get(k) for k in ("compute", "memory"))
    out.append(("header names the dtype and how the peaks were measured", ok,
                f"dtype {rep['config'].get('dtype')} ({rep['config'].get('dtype_source')})"))
    return out


def check_fc(path: str) -> tuple[str, bool, str]:
    rep = json.load(open(path))
    dense = rep["profiles"][0]
    fc = [r for r in dense["layers"] if r["name"].endswith((".fc1", ".fc2"))
          and r.get("roof_fraction") is not None]
    fr = [r["roof_fraction"] for r in fc]
    ok = bool(fr) and min(fr) >= 0.5
    detail = (f"batch {dense['batch']}: {len(fr)} fc1/fc2 rows, min {min(fr):.2f}, median "
              f"{statistics.median(fr):.2f}, max {max(fr):.2f} of the roof "
              f"({rep['roof']['flops_per_s'] / 1e9:.1f} GFLOP/s)") if fr else "no fc rows"
    return (f"dense fc1/fc2 at >= 50% of the roof ({dense['variant']})", ok, detail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="profile JSON files")
    ap.add_argument("--fc-batch", help="the profile JSON whose dense fc1/fc2 must reach 50%%")
    a = ap.parse_args(argv)
    results = []
    for f in a.files:
        results += [(f, *c) for c in check(f)]
    if a.fc_batch:
        results += [(a.fc_batch, *check_fc(a.fc_batch))]
    for f, name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name}  [{f}]\n      {detail}")
    return 0 if all(ok for _, _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
