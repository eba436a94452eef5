"""CPU timing of the csrc C++ kernels against the torch references (the backend="cpu" vs
backend="torch" choice of pyengine.ops on a CPU).

    python bench/cpu_csrc.py --threads 1 --out bench/results/cpu

deit_small-sized shapes (batch 8, 197 tokens, heterogeneous heads, 50% of the FFN kept, the
importance statistics of 12 layers at once). Each (case, backend) pair is timed interleaved
by pyengine's one harness (pyengine.measure.timing: round robin, so load from other processes
hits both alike): median/IQR/min of --repeats calls after warm-up, the speedup with its paired
spread, and the max abs difference to the reference. Writes cpu_csrc.json (with the harness's
environment record) and the raw log cpu_csrc.log under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from pyengine import ops
from pyengine.io.atomic import write_text
from pyengine.measure.timing import environment, measure
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/cpu")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    env = environment("cpu")
    log(f"== cpu_csrc {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: {json.dumps(env)}")
    rows = []
    for op, name, ref_fn, cpp_fn in cases(a.batch):
        err = diff(cpp_fn(), ref_fn())
        s = measure({"torch": ref_fn, "cpu": cpp_fn}, a.warmup, a.repeats, "cpu")
        speedup = s.ratio("torch", "cpu")
        for b, st in s.stats().items():
            row = {"op": op, "case": name, "backend": b, **st,
                   "max_abs_diff_vs_torch": err if b == "cpu" else 0.0}
            if b == "cpu":
                row["speedup_vs_torch"] = speedup
            rows.append(row)
            log(f"{op:24s} {name:45s} {b:6s} median {row['median_ms']:9.3f} ms  "
                f"(IQR {row['iqr_ms']:.3f}, min {row['min_ms']:.3f})"
                + (f"  max|cpu - torch| {err:.2e}" if b == "cpu" else ""))
        log(f"{op:24s} speedup cpu vs torch (median): {speedup['ratio']:.2f}x "
            f"(paired p25-p75 {speedup['p25']:.2f}-{speedup['p75']:.2f})")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"wrote {out / 'cpu_csrc.json'}")
    write_text(out / "cpu_csrc.json", json.dumps(
        {"env": env, "loadavg_end": os.getloadavg()[0], "rows": rows}, indent=2) + "\n")
    write_text(out / "cpu_csrc.log", "\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
