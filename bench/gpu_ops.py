"""GPU correctness and speed of the Triton kernels (issue 4), one command on an H100/H200:

    python bench/gpu_ops.py                 # -> bench/results/gpu/gpu_ops_<gpu>.json + .log
    python bench/gpu_ops.py --check-only    # correctness only
    TRITON_INTERPRET=1 python bench/gpu_ops.py --small --out /tmp/x   # script smoke test on CPU

What it measures (every number printed goes to the .log; the JSON holds the same values):

1. Correctness at bfloat16 and float16 (and float32) against a float32 reference computed from
   the same rounded inputs: varlen attention forward and backward (head dims 1, 7, 16, 40, 64,
   a qk-dim-0 head, 197 tokens), masked FFN forward and backward at 50% kept neurons with soft
   gates, the batched importance reduction. Error = max |got - ref| / max |ref|.
2. varlen attention (one launch per layer; also one launch per tile shape, for comparison)
   vs torch SDPA with the flash backend on a uniform problem of the same FLOPs
   (head dim 64; target: >= 80% of its FLOP/s), and vs padding every head to the layer maximum
   (SDPA flash on zero-padded heads, the attention call only: the padding copies are not
   timed, which favours the baseline; target: faster whenever dims vary). Also the ratio of a
   layer of 16-dim heads to one of 64-dim heads (target: about a quarter).
3. masked FFN forward + backward at 50% kept neurons vs the dense FFN forward + backward
   (cuBLAS through F.linear; target: <= 0.6x the dense time).
4. batched importance reduction (every layer of a ViT-S, activations and gradients, one call)
   in bytes read per second vs the measured copy bandwidth (read + write of a large buffer;
   target: >= 70%).
Timings: pyengine's one harness (pyengine.measure.timing): the variants of one comparison are
timed interleaved (round robin), CUDA events around one call per sample, the L2 cache flushed
before every sample, warm-up, median (and IQR, in the "stats" entries) in ms.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pyengine import ops
from pyengine.io.atomic import write_text
from pyengine.measure.timing import compare, environment

LOG: list[str] = []


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LOG.append(msg)


# the harness's settings: set by main() (GPU: many samples, L2 flushed before each; CPU smoke
# test: a few)
TIMING = {"warmup": 10, "repeats": 50}


def timed(fns: dict, device) -> dict:
    """The callables timed interleaved by the one harness (pyengine.measure.timing), autograd
    on, the L2 cache flushed before every sample on a GPU; ``{name: {median_ms, iqr_ms, ...}}``."""
    return compare(fns, TIMING["warmup"], TIMING["repeats"], device,
                   flush_l2=device.type == "cuda", inference=False)


def rel_err(got, ref) -> float:
    got, ref = got.detach().float(), ref.detach().float()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


# ---------------------------------------------------------------------------- correctness
TOL = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def check_attention(dtype, device, B, N) -> dict:
    qk, vd = [1, 7, 16, 40, 64, 0], [64, 40, 16, 7, 1, 5]
    g = torch.Generator().manual_seed(1)
    mk = lambda w: torch.randn(B, N, w, generator=g).to(device, dtype)  # noqa: E731
    q, k, v = mk(sum(qk)), mk(sum(qk)), mk(sum(vd))
    do = mk(sum(vd))
    scales = [d ** -0.5 if d else 1.0 for d in qk]
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = ops.varlen_attention(*leaves, qk, vd, scales, backend="triton")
    grads = torch.autograd.grad(out, leaves, do)
    ref_leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = ops.varlen_attention_reference(*ref_leaves, qk, vd, scales)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.float(), allow_unused=True)
    ref_grads = [torch.zeros_like(t) if r is None else r for t, r in zip(ref_leaves, ref_grads)]
    errs = {"out": rel_err(out, ref)}
    errs.update({f"d{n}": rel_err(a, b) for n, a, b in zip("qkv", grads, ref_grads)})
    return errs


def check_ffn(dtype, device, M) -> dict:
    g = torch.Generator().manual_seed(2)
    D, Hd, O = 384, 1536, 384
    x = torch.randn(M, D, generator=g)
    w1, b1 = torch.randn(Hd, D, generator=g) * D ** -0.5, torch.randn(Hd, generator=g) * 0.1
    w2, b2 = torch.randn(O, Hd, generator=g) * Hd ** -0.5, torch.randn(O, generator=g) * 0.1
    gate = torch.rand(Hd, generator=g)
    gy = torch.randn(M, O, generator=g)
    keep = torch.randperm(Hd, generator=g)[: Hd // 2].sort().values.tolist()
    base = [t.to(device) for t in (x, w1, b1, w2, b2, gate)]
    low = [t.to(dtype).requires_grad_() for t in base[:5]] + [base[5].clone().requires_grad_()]
    ref = [t.float().detach().requires_grad_() for t in low]
    y = ops.masked_ffn(*low[:5], keep=keep, gate=low[5], backend="triton")
    gl = torch.autograd.grad(y, low, gy.to(device, dtype))
    yr = ops.masked_ffn_reference(*ref[:5], keep=keep, gate=ref[5])
    gr = torch.autograd.grad(yr, ref, gy.to(device))
    errs = {"out": rel_err(y, yr)}
    errs.update({f"d{n}": rel_err(a, b) for n, a, b in
                 zip(("x", "w1", "b1", "w2", "b2", "gate"), gl, gr)})
    return errs


def check_importance(dtype, device, B) -> dict:
    g = torch.Generator().manual_seed(3)
    shapes = [(B, 197, 384), (B, 197, 1536), (B, 197, 7), (B * 197, 40), (3, 1)]
    xs = [torch.randn(*s, generator=g).to(device, dtype) for s in shapes]
    gs = [torch.randn(*s, generator=g).to(device, dtype) if i % 2 == 0 else None
          for i, s in enumerate(shapes)]
    got = ops.importance_reduce_many(xs, gs, backend="triton")
    ref = ops.importance_reduce_many(xs, gs, backend="torch")
    return {"max_rel": max(rel_err(a, b) for a, b in zip(got, ref))}


# ---------------------------------------------------------------------------- timings
def _sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def _attn_flops(B, N, qk, vd) -> int:
    return 2 * B * N * N * sum(a + b for a, b in zip(qk, vd) if a > 0)


def time_attention(name, qk, vd, B, N, dtype, device, with_sdpa: bool) -> dict:
    g = torch.Generator().manual_seed(4)
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    q, k, v = mk(B, N, sum(qk)), mk(B, N, sum(qk)), mk(B, N, sum(vd))
    scales = [d ** -0.5 if d else 1.0 for d in qk]
    flops = _attn_flops(B, N, qk, vd)
    r = {"layer": name, "qk_dims": qk, "v_dims": vd, "batch": B, "tokens": N,
         "dtype": str(dtype).replace("torch.", ""), "flops": flops}
    from pyengine.kernels import varlen_attention as KV

    def per_bucket():  # the same kernel, one launch per tile shape instead of one per layer
        saved, KV.MAX_BUCKETS = KV.MAX_BUCKETS, 1
        try:
            return ops.varlen_attention(q, k, v, qk, vd, scales, backend="triton")
        finally:
            KV.MAX_BUCKETS = saved
    fwd = {"triton": lambda: ops.varlen_attention(q, k, v, qk, vd, scales, backend="triton"),
           "triton_launch_per_bucket": per_bucket,
           "torch_ref": lambda: ops.varlen_attention(q, k, v, qk, vd, scales, backend="torch")}
    if with_sdpa:
        H = len(qk)
        # (a) uniform head dim 64 with the same FLOPs: sum(dq + dv) / 128 heads
        Hu = max(1, round(sum(a + b for a, b in zip(qk, vd) if a > 0) / 128))
        uq, uk, uv = (mk(B, Hu, N, 64) for _ in range(3))
        uflops = _attn_flops(B, N, [64] * Hu, [64] * Hu)
        r["sdpa_uniform"] = {"heads": Hu, "head_dim": 64, "flops": uflops}
        # (b) every head zero-padded to the layer maximum (multiple of 8 for flash)
        Dp = 8 * math.ceil(max(max(qk), max(vd)) / 8)
        pq, pk, pv = (mk(B, H, N, Dp) for _ in range(3))
        r["sdpa_padded"] = {"heads": H, "head_dim": Dp}
        fwd["sdpa_uniform"] = lambda: _sdpa_flash(uq, uk, uv)
        fwd["sdpa_padded"] = lambda: _sdpa_flash(pq, pk, pv)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    do = torch.randn(B, N, sum(vd), device=device, dtype=dtype)

    def fwd_bwd(backend):
        out = ops.varlen_attention(*leaves, qk, vd, scales, backend=backend)
        torch.autograd.grad(out, leaves, do)
    st = timed(fwd, device)
    st_b = timed({"triton": lambda: fwd_bwd("triton"), "torch_ref": lambda: fwd_bwd("torch")},
                 device)
    r["stats_fwd"], r["stats_fwd_bwd"] = st, st_b
    r["triton_fwd_ms"] = st["triton"]["median_ms"]
    r["triton_launch_per_bucket_fwd_ms"] = st["triton_launch_per_bucket"]["median_ms"]
    r["torch_ref_fwd_ms"] = st["torch_ref"]["median_ms"]
    r["triton_fwd_bwd_ms"] = st_b["triton"]["median_ms"]
    r["torch_ref_fwd_bwd_ms"] = st_b["torch_ref"]["median_ms"]
    r["triton_tflops"] = flops / r["triton_fwd_ms"] / 1e9
    if with_sdpa:
        r["sdpa_uniform"]["ms"] = st["sdpa_uniform"]["median_ms"]
        r["sdpa_uniform"]["tflops"] = uflops / r["sdpa_uniform"]["ms"] / 1e9
        r["flops_ratio_vs_sdpa_uniform"] = r["triton_tflops"] / r["sdpa_uniform"]["tflops"]
        r["sdpa_padded"]["ms"] = st["sdpa_padded"]["median_ms"]
        r["speedup_vs_padded"] = r["sdpa_padded"]["ms"] / r["triton_fwd_ms"]
    return r


def time_ffn(D, Hd, M, kept, dtype, device) -> dict:
    g = torch.Generator().manual_seed(5)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(device, dtype)  # noqa: E731
    x = mk(M, D).requires_grad_()
    w1, b1 = mk(Hd, D, sc=D ** -0.5).requires_grad_(), mk(Hd, sc=0.1).requires_grad_()
    w2, b2 = mk(D, Hd, sc=Hd ** -0.5).requires_grad_(), mk(D, sc=0.1).requires_grad_()
    gy = mk(M, D)
    params = [x, w1, b1, w2, b2]
    keep = torch.randperm(Hd, generator=g)[: int(Hd * kept)].sort().values.to(device)
    keep_t = keep.to(torch.int32)

    def dense():
        y = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
        torch.autograd.grad(y, params, gy)

    def masked(backend):
        k = keep_t if backend == "triton" else keep
        y = ops.masked_ffn(x, w1, b1, w2, b2, keep=k, backend=backend)
        torch.autograd.grad(y, params, gy)

    def masked_fwd():
        with torch.no_grad():
            ops.masked_ffn(x, w1, b1, w2, b2, keep=keep_t, backend="triton")

    def dense_fwd():
        with torch.no_grad():
            F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    r = {"D": D, "hidden": Hd, "tokens": M, "kept": kept, "dtype": str(dtype).replace("torch.", "")}
    st_b = timed({"dense": dense, "triton": lambda: masked("triton"),
                  "torch_ref": lambda: masked("torch")}, device)
    st = timed({"dense": dense_fwd, "triton": masked_fwd}, device)
    r["stats_fwd_bwd"], r["stats_fwd"] = st_b, st
    r["dense_fwd_bwd_ms"] = st_b["dense"]["median_ms"]
    r["triton_fwd_bwd_ms"] = st_b["triton"]["median_ms"]
    r["torch_ref_fwd_bwd_ms"] = st_b["torch_ref"]["median_ms"]
    r["dense_fwd_ms"] = st["dense"]["median_ms"]
    r["triton_fwd_ms"] = st["triton"]["median_ms"]
    r["triton_over_dense_fwd_bwd"] = r["triton_fwd_bwd_ms"] / r["dense_fwd_bwd_ms"]
    r["torch_ref_over_dense_fwd_bwd"] = r["torch_ref_fwd_bwd_ms"] / r["dense_fwd_bwd_ms"]
    return r


def time_importance(B, dtype, device, copy_mib: int) -> dict:
    xs, gs = [], []
    for _ in range(12):
        for C in (384, 1536):
            xs.append(torch.randn(B, 197, C, device=device, dtype=dtype))
            gs.append(torch.randn(B, 197, C, device=device, dtype=dtype))
    nbytes = sum(2 * x.numel() * x.element_size() for x in xs)
    r = {"tensors": len(xs), "batch": B, "bytes_read": nbytes,
         "dtype": str(dtype).replace("torch.", "")}
    buf = torch.empty(copy_mib * 2 ** 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(buf)
    st = timed({"triton": lambda: ops.importance_reduce_many(xs, gs, backend="triton"),
                "torch": lambda: ops.importance_reduce_many(xs, gs, backend="torch"),
                "copy": lambda: dst.copy_(buf)}, device)
    r["stats"] = st
    r["triton_ms"] = st["triton"]["median_ms"]
    r["torch_ms"] = st["torch"]["median_ms"]
    r["copy_ms"] = st["copy"]["median_ms"]
    r["copy_gbps"] = 2 * buf.numel() / r["copy_ms"] / 1e6          # read + write
    r["triton_gbps"] = nbytes / r["triton_ms"] / 1e6
    r["torch_gbps"] = nbytes / r["torch_ms"] / 1e6
    r["triton_fraction_of_copy"] = r["triton_gbps"] / r["copy_gbps"]
    return r


# ---------------------------------------------------------------------------- main
LAYERS = {
    # a DeiT-S layer after heterogeneous pruning
    "deit_s_pruned": ([64, 64, 48, 40, 32, 16], [64, 56, 48, 40, 24, 16]),
    # the odd dims of the acceptance list, two of each
    "odd_dims": ([1, 7, 16, 40, 64, 1, 7, 16, 40, 64], [64, 40, 16, 7, 1, 64, 40, 16, 7, 1]),
    # a ViT-B layer, 12 heads from 16 to 64
    "vit_b_pruned": ([64, 64, 56, 48, 48, 40, 40, 32, 32, 24, 16, 16],
                     [64, 64, 64, 48, 40, 40, 32, 32, 24, 24, 16, 16]),
    # uniform dims: the kernel against SDPA on the very same problem
    "uniform64_x6": ([64] * 6, [64] * 6),
    # cost per head: 12 heads of 16 vs 12 heads of 64
    "uniform16_x12": ([16] * 12, [16] * 12),
    "uniform64_x12": ([64] * 12, [64] * 12),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/gpu")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--small", action="store_true",
                    help="tiny shapes (script smoke test; numbers meaningless)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls (GPU 10, CPU 1)")
    ap.add_argument("--repeats", type=int, default=None, help="samples (GPU 50, CPU 3)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.small:
        print("bench/gpu_ops.py needs a CUDA device (or --small with TRITON_INTERPRET=1)",
              file=sys.stderr)
        return 2
    torch.manual_seed(0)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cpu = device.type == "cpu"
    TIMING["warmup"] = args.warmup if args.warmup is not None else (1 if cpu else 10)
    TIMING["repeats"] = args.repeats if args.repeats is not None else (3 if cpu else 50)
    env = {**environment(device), "interpret": os.environ.get("TRITON_INTERPRET", "0"),
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tag = (env.get("gpu") or "cpu").replace(" ", "_").replace("/", "_")
    res = {"env": env, "timing": {**TIMING, "flush_l2": not cpu, "harness":
                                  "pyengine.measure.timing (interleaved, CUDA events)"},
           "checks": {}, "attention": [], "ffn": [], "importance": [], "targets": {}}
    log(f"# gpu_ops {json.dumps(env)}")
    dtypes = [torch.float32] if device.type == "cpu" else [torch.bfloat16, torch.float16,
                                                            torch.float32]
    B, N, M = (1, 23, 40) if args.small else (4, 197, 4 * 197)
    ok = True
    for dt in dtypes:
        name = str(dt).replace("torch.", "")
        c = {"attention": check_attention(dt, device, B, N), "ffn": check_ffn(dt, device, M),
             "importance": check_importance(dt, device, B)}
        passed = all(e <= TOL[dt] for part in c.values() for e in part.values())
        c["tolerance"], c["pass"] = TOL[dt], passed
        ok &= passed
        res["checks"][name] = c
        log(f"check {name}: {'PASS' if passed else 'FAIL'} (tol {TOL[dt]}) "
            + json.dumps({k: v for k, v in c.items() if isinstance(v, dict)}))
    if not args.check_only:
        dt = torch.float32 if device.type == "cpu" else torch.bfloat16
        Bt, Nt = (1, 23) if args.small else (128, 197)
        for name, (qk, vd) in LAYERS.items():
            if args.small and name.startswith("uniform"):
                continue
            r = time_attention(name, qk, vd, Bt, Nt, dt, device, with_sdpa=device.type == "cuda")
            res["attention"].append(r)
            log("attention " + json.dumps(r))
        for D, Hd in ((384, 1536), (768, 3072)):
            if args.small:
                D, Hd = 32, 64
            r = time_ffn(D, Hd, 40 if args.small else 128 * 197, 0.5, dt, device)
            res["ffn"].append(r)
            log("ffn " + json.dumps(r))
            if args.small:
                break
        r = time_importance(1 if args.small else 64, dt, device, 1 if args.small else 1024)
        res["importance"].append(r)
        log("importance " + json.dumps(r))
        att = {r["layer"]: r for r in res["attention"]}
        t = res["targets"]
        if device.type == "cuda":
            varied = [r for r in res["attention"] if not r["layer"].startswith("uniform")]
            t["attention_flops_vs_sdpa_uniform_min"] = min(
                r["flops_ratio_vs_sdpa_uniform"] for r in res["attention"])
            t["attention_flops_target_0.8_met"] = t["attention_flops_vs_sdpa_uniform_min"] >= 0.8
            t["attention_speedup_vs_padded_min_varied"] = min(
                r["speedup_vs_padded"] for r in varied)
            t["attention_faster_than_padded"] = t["attention_speedup_vs_padded_min_varied"] > 1
            if "uniform16_x12" in att and "uniform64_x12" in att:
                t["head16_over_head64_time"] = (att["uniform16_x12"]["triton_fwd_ms"]
                                                / att["uniform64_x12"]["triton_fwd_ms"])
        t["ffn_fwd_bwd_over_dense_max"] = max(r["triton_over_dense_fwd_bwd"] for r in res["ffn"])
        t["ffn_target_0.6_met"] = t["ffn_fwd_bwd_over_dense_max"] <= 0.6
        t["importance_fraction_of_copy"] = res["importance"][0]["triton_fraction_of_copy"]
        t["importance_target_0.7_met"] = t["importance_fraction_of_copy"] >= 0.7
        log("targets " + json.dumps(t))
    res["all_checks_pass"] = ok
    write_text(out_dir / f"gpu_ops_{tag}.json", json.dumps(res, indent=1))
    write_text(out_dir / f"gpu_ops_{tag}.log", "\n".join(LOG) + "\n")
    log(f"wrote {out_dir / f'gpu_ops_{tag}.json'} and .log")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
