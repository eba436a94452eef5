"""CPU timing of the csrc C++ kernels against the torch references (the backend="cpu" vs
backend="torch" choice of pyengine.ops on a CPU).

    python bench/cpu_csrc.py --threads 1 --out bench/results/cpu

deit_small-sized shapes (batch 8, 197 tokens, heterogeneous heads, 50% of the FFN kept, the
importance statistics of 12 layers at once). Each (case, backend) pair is timed interleaved
(round robin, so load from other processes hits both alike): median/min/max of --repeats
calls after warm-up, with the max abs difference to the reference. Writes cpu_csrc.json and
the raw log cpu_csrc.log under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from pyengine import ops
from pyengine.ops import _ext
from pyengine.ops import importance_reduce_reference, masked_ffn_reference
from pyengine.ops import varlen_attention_reference

LOG: list[str] = []


def log(msg: str) -> None:
    print(msg, flush=True)
    LOG.append(msg)


def cases(batch: int):
    g = torch.Generator().manual_seed(0)
    qk, vd = [64, 56, 48, 40, 16, 7], [64, 64, 48, 40, 24, 7]
    q = torch.randn(batch, 197, sum(qk), generator=g)
    k = torch.randn(batch, 197, sum(qk), generator=g)
    v = torch.randn(batch, 197, sum(vd), generator=g)
    sc = [d ** -0.5 for d in qk]
    yield ("varlen_attention", f"B{batch} N197 heads qk{qk} v{vd}",
           lambda: varlen_attention_reference(q, k, v, qk, vd, sc),
           lambda: ops.varlen_attention(q, k, v, qk, vd, sc, backend="cpu"))
    x = torch.randn(batch, 197, 384, generator=g)
    w1, b1 = torch.randn(1536, 384, generator=g) / 20, torch.randn(1536, generator=g)
    w2, b2 = torch.randn(384, 1536, generator=g) / 40, torch.randn(384, generator=g)
    keep = torch.randperm(1536, generator=g)[:768].sort().values
    yield ("masked_ffn", f"B{batch} N197 384->1536 keep 768",
           lambda: masked_ffn_reference(x, w1, b1, w2, b2, keep, None, "gelu"),
           lambda: ops.masked_ffn(x, w1, b1, w2, b2, keep, None, "gelu", backend="cpu"))
    xs = [torch.randn(batch, 197, c, generator=g) for c in [384, 1536] * 12]
    gs = [torch.randn_like(t) for t in xs]
    yield ("importance_reduce_many", f"12 layers x (384, 1536), B{batch} N197",
           lambda: [importance_reduce_reference(a, b) for a, b in zip(xs, gs)],
           lambda: ops.importance_reduce_many(xs, gs, backend="cpu"))


def diff(a, b) -> float:
    a = a if isinstance(a, list) else [a]
    b = b if isinstance(b, list) else [b]
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "threads": a.threads, "cpu_count": os.cpu_count(), "extension": _ext.describe(),
           "load_avg_start": os.getloadavg()}
    log(f"== cpu_csrc {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: {json.dumps(env)}")
    rows = []
    for op, name, ref_fn, cpp_fn in cases(a.batch):
        err = diff(cpp_fn(), ref_fn())
        fns = {"torch": ref_fn, "cpu": cpp_fn}
        for _ in range(a.warmup):
            for f in fns.values():
                f()
        ms = {b: [] for b in fns}
        for _ in range(a.repeats):
            for b, f in fns.items():
                t0 = time.perf_counter()
                f()
                ms[b].append((time.perf_counter() - t0) * 1e3)
        for b in fns:
            row = {"op": op, "case": name, "backend": b, "median_ms": statistics.median(ms[b]),
                   "min_ms": min(ms[b]), "max_ms": max(ms[b]), "repeats": a.repeats,
                   "max_abs_diff_vs_torch": err if b == "cpu" else 0.0}
            rows.append(row)
            log(f"{op:24s} {name:45s} {b:6s} median {row['median_ms']:9.3f} ms  "
                f"(min {row['min_ms']:.3f}, max {row['max_ms']:.3f})"
                + (f"  max|cpu - torch| {err:.2e}" if b == "cpu" else ""))
        med = {r["backend"]: r["median_ms"] for r in rows[-2:]}
        log(f"{op:24s} speedup cpu vs torch (median): {med['torch'] / med['cpu']:.2f}x")
    env["load_avg_end"] = os.getloadavg()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("cpu_csrc.json", json.dumps({"env": env, "rows": rows}, indent=2) + "\n"),
                       ("cpu_csrc.log", "\n".join(LOG) + "\n")):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)
    log(f"wrote {out / 'cpu_csrc.json'}")
    (out / "cpu_csrc.log").write_text("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
