"""GPU check and timing of the csrc CUDA kernels beside the Triton and torch backends.

One command on a machine with an NVIDIA GPU (H100/H200), after the normal install (it builds
nothing; pyengine._C must already contain its CUDA kernels):

    python bench/gpu_csrc.py                      # checks + timings -> bench/results/gpu/
    compute-sanitizer --tool memcheck python bench/gpu_csrc.py --check-only --small

For every op (varlen_attention, masked_ffn, importance_reduce_many) and dtype (bfloat16,
float32) it
  1. checks the CUDA kernel (pyengine.ops, backend="cuda") against the torch
     reference computed in float64 on the same rounded inputs, on odd shapes too (head dims
     1/7/40, qk dim 0, no kept neurons, 197 tokens);
  2. times the backends "cuda" (csrc), "triton" (pyengine.ops.<op>(..., backend="triton")) and
     "torch" (the reference) on ViT-sized shapes, interleaved, with pyengine's one harness
     (pyengine.measure.timing: CUDA events, warm-up, median, IQR and min of --repeats runs).
A backend that is not available is recorded with the reason, not skipped silently. Writes
gpu_csrc_<gpu>.json and the raw log gpu_csrc_<gpu>.log (every printed line) under --out.
Exit status 1 when any CUDA check fails.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from pyengine import ops
from pyengine.ops import _ext
from pyengine.ops import importance_reduce_reference, masked_ffn_reference
from pyengine.io.atomic import write_text
from pyengine.measure.timing import environment, measure
from pyengine.ops import varlen_attention_reference

LOG: list[str] = []
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2}


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LOG.append(msg)


# ------------------------------------------------------------------------------- inputs
def varlen_inputs(B, N, qk_dims, v_dims, dtype, dev="cuda"):
    g = torch.Generator(device="cpu").manual_seed(B * 1000 + N)
    mk = lambda w: torch.randn(B, N, w, generator=g).to(dev, dtype)  # noqa: E731
    q, k, v = mk(sum(qk_dims)), mk(sum(qk_dims)), mk(sum(v_dims))
    scales = [d ** -0.5 if d else 1.0 for d in qk_dims]
    return (q, k, v, list(qk_dims), list(v_dims), scales)


def ffn_inputs(lead, d, hidden, keep_n, dtype, gate=True, dev="cuda"):
    g = torch.Generator(device="cpu").manual_seed(hidden + keep_n)
    x = torch.randn(*lead, d, generator=g).to(dev, dtype)
    w1 = (torch.randn(hidden, d, generator=g) / d ** 0.5).to(dev, dtype)
    b1 = torch.randn(hidden, generator=g).to(dev, dtype)
    w2 = (torch.randn(d, hidden, generator=g) / hidden ** 0.5).to(dev, dtype)
    b2 = torch.randn(d, generator=g).to(dev, dtype)
    keep = torch.randperm(hidden, generator=g)[:keep_n].sort().values.to(dev)
    gt = torch.rand(hidden, generator=g).to(dev, dtype) if gate else None
    return (x, w1, b1, w2, b2, keep, gt, "gelu")


def many_inputs(shapes, dtype, dev="cuda"):
    g = torch.Generator(device="cpu").manual_seed(len(shapes))
    xs = [torch.randn(*s, generator=g).to(dev, dtype) for s in shapes]
    gs = [torch.randn(*s, generator=g).to(dev, dtype) for s in shapes]
    return (xs, gs)


# ------------------------------------------------------------------------- backends
def run_varlen(backend, q, k, v, qk_dims, v_dims, scales):
    if backend == "torch":
        return varlen_attention_reference(q, k, v, qk_dims, v_dims, scales)
    return ops.varlen_attention(q, k, v, qk_dims, v_dims, scales, backend=backend)


def run_ffn(backend, x, w1, b1, w2, b2, keep, gate, act):
    if backend == "torch":
        return masked_ffn_reference(x, w1, b1, w2, b2, keep, gate, act)
    return ops.masked_ffn(x, w1, b1, w2, b2, keep, gate, act, backend=backend)


def run_many(backend, xs, gs):
    if backend == "torch":
        return [importance_reduce_reference(x, g) for x, g in zip(xs, gs)]
    return ops.importance_reduce_many(xs, gs, backend=backend)


def ref64(op, args):
    """The torch reference in float64 on the same (rounded) inputs, on the CPU."""
    d = lambda t: t.detach().double().cpu() if isinstance(t, torch.Tensor) and t.is_floating_point() else (t.cpu() if isinstance(t, torch.Tensor) else t)  # noqa: E731
    if op == "varlen_attention":
        q, k, v, qk, vd, s = args
        return varlen_attention_reference(d(q), d(k), d(v), qk, vd, s)
    if op == "masked_ffn":
        return masked_ffn_reference(*[d(a) for a in args])
    xs, gs = args
    out = []
    for x, g in zip(xs, gs):
        C = x.shape[-1]
        xd, gd = d(x).reshape(-1, C), d(g).reshape(-1, C)
        out.append(torch.stack([xd.abs().sum(0), (xd * xd).sum(0), (xd * gd).abs().sum(0)]))
    return out


RUN = {"varlen_attention": run_varlen, "masked_ffn": run_ffn, "importance_reduce_many": run_many}


def max_err(out, ref):
    outs = out if isinstance(out, list) else [out]
    refs = ref if isinstance(ref, list) else [ref]
    err, scale = 0.0, 1.0
    for o, r in zip(outs, refs):
        if o.numel() == 0:
            continue
        e = (o.double().cpu() - r).abs().max().item()
        s = r.abs().max().item()
        err, scale = max(err, e), max(scale, s)
    return err, scale


# ------------------------------------------------------------------------ correctness
def check_cases(small: bool):
    heads = [([1, 7, 16, 40, 64], [64, 40, 16, 7, 1]), ([0, 64, 32], [16, 64, 8]),
             ([64] * 6, [64] * 6), ([5, 0, 9], [0, 4, 0])]
    cases = []
    for qk, vd in heads:
        for B, N in ([(2, 197)] if small else [(2, 197), (3, 33), (1, 1)]):
            cases.append(("varlen_attention", f"B{B} N{N} qk{qk} v{vd}",
                          lambda dt, B=B, N=N, qk=qk, vd=vd: varlen_inputs(B, N, qk, vd, dt)))
    for lead, d, hidden, keep_n, gate in [((2, 197), 384, 1536, 700, True),
                                          ((2, 197), 384, 1536, 0, True),
                                          ((5, 7), 40, 96, 96, False)]:
        cases.append(("masked_ffn", f"x{lead + (d,)} hidden {hidden} keep {keep_n}",
                      lambda dt, lead=lead, d=d, h=hidden, k=keep_n, g=gate:
                      ffn_inputs(lead, d, h, k, dt, g)))
    shape_sets = [[(2, 197, 384), (2, 197, 1536), (5, 1), (0, 7), (3, 4, 5, 6), (40000, 3),
                   (33, 600), (2, 197, 6)]]
    for shapes in shape_sets:
        cases.append(("importance_reduce_many", f"{len(shapes)} tensors",
                      lambda dt, s=shapes: many_inputs(s, dt)))
    return cases


def run_checks(small: bool) -> tuple[list[dict], bool]:
    rows, ok_all = [], True
    for dtype in (torch.bfloat16, torch.float32):
        for op, name, make in check_cases(small):
            args = make(dtype)
            row = {"op": op, "case": name, "dtype": str(dtype).split(".")[-1]}
            try:
                out = RUN[op]("cuda", *args)
                torch.cuda.synchronize()
                err, scale = max_err(out, ref64(op, args))
                tol = TOL[dtype] * max(1.0, scale) if op == "importance_reduce_many" \
                    else TOL[dtype] * max(1.0, scale ** 0.5)
                row.update(max_abs_err=err, ref_max_abs=scale, tol=tol, ok=err <= tol)
            except Exception as e:  # noqa: BLE001  (a failing kernel is a result, not a crash)
                row.update(ok=False, error=f"{type(e).__name__}: {e}")
            ok_all &= row["ok"]
            log(f"check {row['op']:24s} {row['dtype']:9s} {row['case']:45s} "
                + (f"err {row['max_abs_err']:.3g} (tol {row['tol']:.3g}) "
                   if "max_abs_err" in row else row.get("error", "")) + ("OK" if row["ok"] else "FAIL"))
            rows.append(row)
    return rows, ok_all


# ------------------------------------------------------------------------------ timing
def bench_cases():
    vit_s_mixed = ([64, 56, 48, 40, 32, 16], [64, 64, 48, 40, 24, 16])
    vit_b_half = ([32] * 12, [32] * 12)
    return [
        ("varlen_attention", "ViT-S B64 N197 6 heads mixed dims",
         lambda dt: varlen_inputs(64, 197, *vit_s_mixed, dt)),
        ("varlen_attention", "ViT-S B64 N197 6x64 (dense)",
         lambda dt: varlen_inputs(64, 197, [64] * 6, [64] * 6, dt)),
        ("varlen_attention", "ViT-B B32 N197 12x32",
         lambda dt: varlen_inputs(32, 197, *vit_b_half, dt)),
        ("masked_ffn", "ViT-S B64 N197 384->1536 keep 50%",
         lambda dt: ffn_inputs((64, 197), 384, 1536, 768, dt)),
        ("masked_ffn", "ViT-B B32 N197 768->3072 keep 30%",
         lambda dt: ffn_inputs((32, 197), 768, 3072, 922, dt)),
        ("importance_reduce_many", "ViT-S 12 layers x (384, 1536) B64 N197",
         lambda dt: many_inputs([(64, 197, 384), (64, 197, 1536)] * 12, dt)),
    ]


def run_timings(warmup: int, repeats: int) -> list[dict]:
    """Per case and dtype, the backends that run are timed interleaved by the one harness
    (pyengine.measure.timing: CUDA events, round robin); one that fails is recorded as
    unavailable with the reason."""
    rows = []
    dev = torch.device("cuda")
    for dtype in (torch.bfloat16, torch.float32):
        for op, name, make in bench_cases():
            args = make(dtype)
            fns, rs = {}, {}
            for backend in ("cuda", "triton", "torch"):
                row = {"op": op, "case": name, "dtype": str(dtype).split(".")[-1],
                       "backend": backend}
                fn = (lambda b=backend: RUN[op](b, *args))
                try:
                    fn()
                    torch.cuda.synchronize()
                    fns[backend] = fn
                except Exception as e:  # noqa: BLE001
                    row["unavailable"] = f"{type(e).__name__}: {e}"
                rs[backend] = row
                rows.append(row)
            try:
                stats = measure(fns, warmup, repeats, dev, inference=False).stats() if fns else {}
            except Exception:  # noqa: BLE001  one backend failed mid-way: time them one by one
                stats = {}
                for backend, fn in fns.items():
                    try:
                        stats.update(measure({backend: fn}, warmup, repeats, dev,
                                             inference=False).stats())
                    except Exception as e:  # noqa: BLE001
                        rs[backend]["unavailable"] = f"{type(e).__name__}: {e}"
            for backend, row in rs.items():
                if backend in stats:
                    row.update(stats[backend])
                    msg = (f"{row['median_ms']:.4f} ms (IQR {row['iqr_ms']:.4f}, "
                           f"min {row['min_ms']:.4f})")
                else:
                    msg = "unavailable: " + row["unavailable"][:160]
                log(f"time  {op:24s} {row['dtype']:9s} {name:42s} {backend:7s} {msg}")
            del args, fns
            torch.cuda.empty_cache()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/gpu")
    p.add_argument("--check-only", action="store_true", help="correctness only (for sanitizers)")
    p.add_argument("--small", action="store_true", help="fewer check shapes")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_csrc.py needs a CUDA GPU (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    env = environment("cuda")
    log(f"== gpu_csrc {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: {json.dumps(env)}")
    if not _ext.has_cuda_kernels():
        log(f"== FAIL: {_ext.describe()}: build pyengine._C with a CUDA toolkit first")
        return 1
    checks, ok = run_checks(a.small)
    timings = [] if a.check_only else run_timings(a.warmup, a.repeats)
    log(f"== checks: {'all OK' if ok else 'FAILURES'}")
    if a.check_only:
        return 0 if ok else 1
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", env["gpu"] or "gpu").strip("_").lower()
    result = {"env": env, "checks": checks, "checks_ok": ok, "timings": timings,
              "warmup": a.warmup}
    write_text(out / f"gpu_csrc_{tag}.json", json.dumps(result, indent=2) + "\n")
    log(f"wrote {out / f'gpu_csrc_{tag}.json'}")
    write_text(out / f"gpu_csrc_{tag}.log", "\n".join(LOG) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
