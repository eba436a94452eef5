"""Microbenchmarks of the three ops, every available backend of each, one device.

    OMP_NUM_THREADS=1 python bench/bench_ops.py --out bench/results/cpu             # CPU
    python bench/bench_ops.py --device cuda --out bench/results/gpu                 # GPU

CPU runs the "torch" and "cpu" (csrc) backends; "triton" and "cuda" need a CUDA device (the
Triton interpreter is a correctness tool, not a speed one: it is skipped here). A backend that
is not available is recorded with the reason. Shapes are ViT-S/16 sized (197 tokens, a pruned
layer with mixed head dims, FFN 384 -> 1536 at half the neurons and at all of them, the
importance statistics of 12 layers) at batch 8 on the CPU, 64 on a GPU. The backends of one
case are timed interleaved by pyengine's one harness (pyengine.measure.timing: CUDA events or
perf_counter, warm-up, round robin, median and IQR; each backend's ratio to "torch" with its
paired spread). Writes bench_ops.json (with the environment record) and the raw log
bench_ops.log under --out.

(The bench_ops.json / .log committed under bench/results/cpu/ before this harness existed were
written by a pytest-benchmark version of this file; their statistics are pytest-benchmark's.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from pyengine import ops
from pyengine.io.atomic import write_text
from pyengine.measure.timing import environment, measure

HEADS_QK = [64, 64, 48, 40, 32, 16]
HEADS_V = [64, 56, 48, 40, 24, 16]
BACKENDS = ("torch", "cpu", "triton", "cuda")
LOG: list[str] = []


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LOG.append(msg)


def unavailable(op: str, backend: str, device: torch.device) -> str | None:
    """Why ``backend`` of ``op`` cannot be timed on ``device`` (None: it can)."""
    if backend == "triton" and device.type != "cuda":
        return "triton timings need a CUDA device (the interpreter is not a speed test)"
    why = ops.supported_backends(op, device)[backend]
    return "; ".join(why) if why else None


def cases(device: torch.device, batch: int):
    """(op, case, {shape info}, backend -> zero-argument callable)."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    dt = str(dtype).replace("torch.", "")
    B = batch
    q = torch.randn(B, 197, sum(HEADS_QK), device=device, dtype=dtype)
    k = torch.randn_like(q)
    v = torch.randn(B, 197, sum(HEADS_V), device=device, dtype=dtype)
    scales = [d ** -0.5 for d in HEADS_QK]
    yield ("varlen_attention", f"B{B} N197 6 mixed heads {dt}",
           {"batch": B, "tokens": 197, "qk_dims": HEADS_QK, "v_dims": HEADS_V, "dtype": dt},
           lambda b: lambda: ops.varlen_attention(q, k, v, HEADS_QK, HEADS_V, scales, backend=b))
    x = torch.randn(B, 197, 384, device=device, dtype=dtype)
    w1 = torch.randn(1536, 384, device=device, dtype=dtype) * 0.05
    b1 = torch.zeros(1536, device=device, dtype=dtype)
    w2 = torch.randn(384, 1536, device=device, dtype=dtype) * 0.025
    b2 = torch.zeros(384, device=device, dtype=dtype)
    for kept in (0.5, 1.0):
        g = torch.Generator().manual_seed(0)
        keep = torch.randperm(1536, generator=g)[: int(1536 * kept)].sort().values.tolist()
        yield ("masked_ffn", f"B{B} N197 384->1536 keep {kept:.0%} {dt}",
               {"batch": B, "tokens": 197, "kept": kept, "dtype": dt},
               lambda b, keep=keep: lambda: ops.masked_ffn(x, w1, b1, w2, b2, keep=keep,
                                                           backend=b))
    # a 12-block ViT-S: per block the qkv input (384), fc1 output (1536) with gradients
    xs, gs = [], []
    for _ in range(12):
        for C in (384, 1536):
            xs.append(torch.randn(B, 197, C, device=device, dtype=dtype))
            gs.append(torch.randn(B, 197, C, device=device, dtype=dtype))
    yield ("importance_reduce_many", f"12 layers x (384, 1536) B{B} N197 {dt}",
           {"tensors": len(xs), "dtype": dt,
            "bytes": sum(2 * t.numel() * t.element_size() for t in xs)},
           lambda b: lambda: ops.importance_reduce_many(xs, gs, backend=b))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 8 on the CPU, 64 on CUDA")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: OMP_NUM_THREADS, else 1)")
    p.add_argument("--out", default="bench/results/cpu")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for, but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(a.threads or int(os.environ.get("OMP_NUM_THREADS", "1")))
    batch = a.batch or (8 if device.type == "cpu" else 64)
    env = environment(device)
    log(f"== bench_ops {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: {json.dumps(env)}")
    rows, skipped = [], []
    for op, case, info, make in cases(device, batch):
        fns = {}
        for b in BACKENDS:
            why = unavailable(op, b, device)
            if why is None:
                fn = make(b)
                try:
                    fn()
                except (RuntimeError, NotImplementedError) as e:
                    why = f"backend not available: {e}"
                else:
                    fns[b] = fn
            if why is not None:
                skipped.append({"op": op, "case": case, "backend": b, "reason": why})
                log(f"{op:24s} {case:40s} {b:6s} skipped: {why}")
        if not fns:
            continue
        s = measure(fns, a.warmup, a.repeats, device)
        for b, st in s.stats().items():
            row = {"op": op, "case": case, **info, "backend": b, "device": str(device), **st}
            if b != "torch" and "torch" in fns:
                row["speedup_vs_torch"] = s.ratio("torch", b)
            rows.append(row)
            sp = row.get("speedup_vs_torch")
            log(f"{op:24s} {case:40s} {b:6s} median {st['median_ms']:9.3f} ms "
                f"(IQR {st['iqr_ms']:.3f})" + (f"  {sp['ratio']:.2f}x torch (paired p25-p75 "
                                               f"{sp['p25']:.2f}-{sp['p75']:.2f})" if sp else ""))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"wrote {out / 'bench_ops.json'} and .log")
    write_text(out / "bench_ops.json", json.dumps(
        {"env": env, "config": {"batch": batch, "warmup": a.warmup, "repeats": a.repeats},
         "rows": rows, "skipped": skipped}, indent=2) + "\n")
    write_text(out / "bench_ops.log", "\n".join(LOG) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
