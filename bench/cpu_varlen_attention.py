"""CPU varlen attention: the C++ kernel (backend "cpu") against torch's SDPA and against the
per-run SDPA path (backend "torch", the reference), plus a whole compact model with either.

    python bench/cpu_varlen_attention.py --out bench/results/cpu      # ~4 min on 2 quiet cores

What "auto" should run on a CPU (pyengine/ops/priority.py) is decided from this file's output.
Every case times its contenders interleaved with pyengine's one harness
(pyengine.measure.timing.measure: warm-up, round robin, median and IQR per contender, paired
ratios with their p25-p75 spread), at each --batch, --dtypes and --threads:

* uniform: H heads of width d for d in --widths (64, 40, 24), H = round(384 / d), so that the
  widths cost about equal FLOPs (6 x 64, 10 x 40, 16 x 24: deit_small's 384 channels).
    sdpa   F.scaled_dot_product_attention on contiguous [B, H, N, d] tensors: torch's best case
    torch  the reference on the packed layout: q, k, v sliced from one qkv projection output,
           one SDPA call per run of equal head shapes, the output packed again
    cpu    the kernel on the same packed views (no copies)
  The target is cpu at >= 0.90 of sdpa's FLOP/s (ratio sdpa/cpu time >= 0.90).
* mixed: heads of varying widths, torch (one SDPA call per run + concat) vs cpu:
    mix6         widths qk 64 56 48 40 16 7, v 64 64 48 40 24 7 (bench/cpu_csrc.py's case)
    two_runs     3 x 64 and 3 x 32 heads: two runs, the per-run path's best mixed case
    <model>      every attention layer of the compact --model at --target MACs
                 (pyengine.structure.synthetic.heterogeneous_spec, seed 0), one call each
  The target is cpu faster than torch (ratio torch/cpu > 1).
* model: the compact --model at --target MACs, its attention on backend torch vs cpu (the
  whole forward pass; pyengine.measure.bench.set_attention_backend).

FLOPs are pyengine.cost.count_flops of the reference call (2 B N^2 (qk + v) per head; uniform
heads of qk width 0 count nothing). bfloat16 runs whether or not the CPU has bf16 arithmetic
(the log says which flags it has): the kernel computes in float32 on converted tiles.
Writes cpu_varlen_attention.json (with the harness's environment record) and the raw log
cpu_varlen_attention.log under --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pyengine import ops
from pyengine.cost import count_flops
from pyengine.io.atomic import write_text
from pyengine.measure.timing import environment, measure
from pyengine.ops import varlen_attention_reference

LOG: list[str] = []
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LOG.append(msg)


def cpu_flags() -> list[str]:
    """The CPU's vector/bf16 feature flags (for reading the bf16 numbers)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2"))
                                  or f in ("fma", "f16c"))
    except OSError:
        pass
    return []


def packed_qkv(B: int, N: int, qk_dims, v_dims, dtype, g: torch.Generator):
    """q, k, v as the compact attention sees them: views of one qkv projection output."""
    sqk, sv = sum(qk_dims), sum(v_dims)
    qkv = torch.randn(B, N, 2 * sqk + sv, generator=g).to(dtype)
    return qkv.split([sqk, sqk, sv], dim=-1)


def attention_case(B, N, qk_dims, v_dims, dtype, g, with_sdpa: bool):
    """Contenders of one attention problem and its FLOPs: {name: callable}, flops, check."""
    q, k, v = packed_qkv(B, N, qk_dims, v_dims, dtype, g)
    scales = [d ** -0.5 if d else 1.0 for d in qk_dims]
    fns = {}
    if with_sdpa:  # uniform widths: torch's kernel on its preferred layout
        H, d = len(qk_dims), qk_dims[0]
        qs, ks, vs = (torch.randn(B, H, N, d, generator=g).to(dtype) for _ in range(3))
        fns["sdpa"] = lambda: F.scaled_dot_product_attention(qs, ks, vs, scale=scales[0])
    fns["torch"] = lambda: varlen_attention_reference(q, k, v, qk_dims, v_dims, scales)
    fns["cpu"] = lambda: ops.varlen_attention(q, k, v, qk_dims, v_dims, scales, backend="cpu")
    flops = count_flops(fns["torch"])

    def check() -> float:
        ref = varlen_attention_reference(q.double(), k.double(), v.double(), qk_dims, v_dims,
                                         scales)
        return (fns["cpu"]().double() - ref).abs().max().item()

    return fns, flops, check


def layers_case(B, N, layers, dtype, g):
    """Every attention layer of a model, one call each: {name: callable}, flops, check."""
    cases = [attention_case(B, N, qk, vd, dtype, g, False) for qk, vd in layers]
    fns = {name: (lambda name=name: [c[0][name]() for c in cases]) for name in ("torch", "cpu")}
    return fns, sum(c[1] for c in cases), lambda: max(c[2]() for c in cases)


def model_layers(model) -> list[tuple[list[int], list[int]]]:
    from pyengine.models.vit.compact import CompactAttention
    return [(list(m.qk_dims), list(m.v_dims)) for m in model.modules()
            if isinstance(m, CompactAttention)]


def run_case(rows, section, case, heads, B, dtype, threads, fns, flops, check, a,
             diff_vs: str = "float64 reference") -> None:
    err = check()
    s = measure(fns, a.warmup, a.repeats, "cpu", min_sample_ms=a.min_sample_ms)
    stats = s.stats()
    ratios = {}
    for base in ("sdpa", "torch"):
        if base in fns and "cpu" in fns:
            ratios[f"{base}_over_cpu"] = s.ratio(base, "cpu")
    dt = str(dtype).replace("torch.", "")
    for name, st in stats.items():
        gfs = flops / (st["median_ms"] * 1e6) if flops else None
        rows.append({"section": section, "case": case, "heads": heads, "batch": B, "dtype": dt,
                     "threads": threads, "contender": name, **st, "flops": flops,
                     "gflop_per_s": gfs,
                     **({"max_abs_diff": err, "diff_vs": diff_vs, **ratios}
                        if name == "cpu" else {})})
        log(f"{section:8s} {case:22s} B{B:<3d} {dt:9s} t{threads} {name:6s} median "
            f"{st['median_ms']:9.3f} ms (IQR {st['iqr_ms']:.3f}, min {st['min_ms']:.3f})"
            + (f"  {gfs:6.1f} GFLOP/s" if gfs else ""))
    for key, r in ratios.items():
        log(f"{section:8s} {case:22s} B{B:<3d} {dt:9s} t{threads} {key}: {r['ratio']:.3f} "
            f"(paired p25-p75 {r['p25']:.3f}-{r['p75']:.3f})   [>1: cpu faster]")
    log(f"{section:8s} {case:22s} B{B:<3d} {dt:9s} t{threads} max|cpu - {diff_vs}| {err:.2e}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1,8", help="batch sizes (comma list)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="float32 and/or bfloat16")
    p.add_argument("--threads", default=str(torch.get_num_threads()),
                   help="intra-op thread counts (comma list; default: torch's)")
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--widths", default="64,40,24", help="head widths of the uniform cases")
    p.add_argument("--sections", default="uniform,mixed,model")
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--model-kwargs", default="{}", help="JSON kwargs of the timm model")
    p.add_argument("--target", type=float, default=0.5, help="MAC fraction of the compact model")
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-sample-ms", type=float, default=20.0,
                   help="calls per sample so that one sample takes at least this long")
    p.add_argument("--out", default="bench/results/cpu")
    a = p.parse_args(argv)
    batches = [int(b) for b in a.batch.split(",")]
    dtypes = [DTYPES[d] for d in a.dtypes.split(",")]
    thread_counts = [int(t) for t in a.threads.split(",")]
    widths = [int(w) for w in a.widths.split(",")]
    sections = a.sections.split(",")
    why = ops.supported_backends("varlen_attention", "cpu")["cpu"]
    if why:
        raise SystemExit(f"the CPU kernel is not available: {'; '.join(why)}")
    t_start = time.time()
    log(f"== cpu_varlen_attention {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: "
        f"{json.dumps(environment('cpu'))}")
    log(f"cpu flags: {' '.join(cpu_flags())}")
    log(f"args: {json.dumps(vars(a))}")

    compact = None
    if "mixed" in sections or "model" in sections:
        from pyengine.measure.bench import load_models
        _, _, compact = load_models(a.model, target=a.target, seed=0,
                                    model_kwargs=json.loads(a.model_kwargs))
        log(f"{a.model} at {a.target} MACs (heterogeneous_spec seed 0), attention layers "
            f"(qk dims, v dims): {model_layers(compact)}")
    g = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    with torch.inference_mode():
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for dtype in dtypes:
                for B in batches:
                    if "uniform" in sections:
                        for d in widths:
                            H = max(1, round(384 / d))
                            qk = [d] * H
                            fns, flops, check = attention_case(B, a.tokens, qk, qk, dtype, g, True)
                            run_case(rows, "uniform", f"{H}x{d}", {"qk_dims": qk, "v_dims": qk},
                                     B, dtype, threads, fns, flops, check, a)
                    if "mixed" in sections:
                        mixes = {"mix6": ([64, 56, 48, 40, 16, 7], [64, 64, 48, 40, 24, 7]),
                                 "two_runs": ([64] * 3 + [32] * 3, [64] * 3 + [32] * 3)}
                        for name, (qk, vd) in mixes.items():
                            fns, flops, check = attention_case(B, a.tokens, qk, vd, dtype, g,
                                                               False)
                            run_case(rows, "mixed", name, {"qk_dims": qk, "v_dims": vd}, B,
                                     dtype, threads, fns, flops, check, a)
                        layers = model_layers(compact)
                        fns, flops, check = layers_case(B, a.tokens, layers, dtype, g)
                        run_case(rows, "mixed", f"{a.model.split('_patch')[0]}_layers",
                                 {"layers": layers}, B, dtype, threads, fns, flops, check, a)
                    if "model" in sections:
                        from pyengine.measure.bench import set_attention_backend
                        models = {}
                        for backend in ("torch", "cpu"):
                            m = copy.deepcopy(compact).to(dtype)
                            set_attention_backend(m, backend)
                            models[backend] = m
                        pe = compact.patch_embed
                        x = torch.randn(B, pe.proj.in_channels, *pe.img_size, generator=g)
                        x = x.to(dtype)
                        fns = {name: (lambda m=m: m(x)) for name, m in models.items()}

                        def check(fns=fns) -> float:
                            return (fns["cpu"]().float() - fns["torch"]().float()).abs().max().item()

                        run_case(rows, "model", f"{a.model.split('_patch')[0]}_{a.target:g}",
                                 None, B, dtype, threads, fns, 0, check, a,
                                 diff_vs="the model on backend torch")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"done in {time.time() - t_start:.0f} s; wrote {out / 'cpu_varlen_attention.json'}")
    write_text(out / "cpu_varlen_attention.json", json.dumps(
        {"env": environment("cpu"), "cpu_flags": cpu_flags(), "args": vars(a),
         "loadavg_end": os.getloadavg()[0], "rows": rows}, indent=2) + "\n")
    write_text(out / "cpu_varlen_attention.log", "\n".join(LOG) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
