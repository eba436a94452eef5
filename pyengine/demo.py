"""``pyengine demo``: structure -> compile -> check -> measure, on a CPU, in about a minute.

It takes a timm ViT, fixes a pruned structure (heterogeneous head dims at a MAC target),
compiles the dense smaller model, checks that it equals the hard-gated model, and times
dense timm against it. Learned structures (HiAP on the digits data) replace the synthetic
one when the HiAP issue lands; every number printed here is measured on this machine.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import timm
import torch
from tqdm import tqdm

from . import api
from .cost_model import cost
from .synthetic import heterogeneous_spec
from .timing import compare, environment
from .vit import geometry


def compact_vs_dense(model_name: str = "deit_small_patch16_224", target: float = 0.5,
                     batch: int = 8, repeats: int = 10, warmup: int = 2, seed: int = 0,
                     spec_seed: int = 0, show_progress: bool = True) -> dict:
    """Build, verify and time one compact model against its dense timm twin (CPU, float32)."""
    torch.manual_seed(seed)
    dense = timm.create_model(model_name, pretrained=False).eval()
    gated = api.gate(copy.deepcopy(dense))  # gated modules share nothing with `dense`
    s = heterogeneous_spec(geometry(gated), target, seed=spec_seed, model=model_name)
    api.apply(gated, s)
    t0 = time.perf_counter()
    compact = api.compile(gated).eval()
    compile_s = time.perf_counter() - t0
    img = dense.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(batch, *img)
    with torch.inference_mode():
        max_abs_diff = (gated(x) - compact(x)).abs().max().item()
    bar = tqdm(total=repeats, desc=f"timing {model_name} b{batch}", disable=not show_progress,
               leave=False)
    times = compare({"dense": lambda: dense(x), "compact": lambda: compact(x)}, warmup=warmup,
                    repeats=repeats, progress=lambda i: bar.update(1))
    bar.close()
    c_dense, c_compact = cost(dense, batch=batch), cost(compact, batch=batch)
    speedup = times["dense"]["median_ms"] / times["compact"]["median_ms"]
    macs_ratio = c_compact.macs / c_dense.macs
    summ = s.summary()
    return {
        "model": model_name, "batch": batch, "dtype": "float32", "device": "cpu",
        "target": target, "spec_seed": spec_seed,
        "dense_macs": c_dense.macs, "compact_macs": c_compact.macs, "macs_ratio": macs_ratio,
        "dense_params": c_dense.params, "compact_params": c_compact.params,
        "kept_heads": summ["heads"], "distinct_head_shapes": len(
            {(len(h.qk), len(h.v)) for b in s.blocks for h in b.heads}),
        "max_abs_diff": max_abs_diff, "compile_s": compile_s,
        "dense_ms": times["dense"], "compact_ms": times["compact"], "speedup": speedup,
        "speedup_per_mac_reduction": speedup * macs_ratio,
        "env": environment(), "spec": s.to_dict(),
    }


def format_table(r: dict) -> str:
    rows = [
        ("", "dense timm", "pyengine compact"),
        ("GMACs / image", f"{r['dense_macs'] / r['batch'] / 1e9:.3f}",
         f"{r['compact_macs'] / r['batch'] / 1e9:.3f}"),
        ("params (M)", f"{r['dense_params'] / 1e6:.2f}", f"{r['compact_params'] / 1e6:.2f}"),
        (f"latency ms (b{r['batch']}, median)", f"{r['dense_ms']['median_ms']:.1f}",
         f"{r['compact_ms']['median_ms']:.1f}"),
        ("latency IQR ms", f"{r['dense_ms']['iqr_ms']:.1f}", f"{r['compact_ms']['iqr_ms']:.1f}"),
    ]
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines += ["",
              f"MAC ratio {r['macs_ratio']:.3f}  speedup {r['speedup']:.2f}x  "
              f"speedup x MAC ratio {r['speedup_per_mac_reduction']:.2f}",
              f"compact vs hard-gated max |diff| {r['max_abs_diff']:.2e}  "
              f"({r['kept_heads']} heads kept, {r['distinct_head_shapes']} distinct head shapes)"]
    return "\n".join(lines)


def run(out: str | Path = "pyengine-demo", model_name: str = "deit_small_patch16_224",
        target: float = 0.5, batch: int = 8, repeats: int = 10, seed: int = 0) -> dict:
    r = compact_vs_dense(model_name, target, batch, repeats, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {k: v for k, v in r.items() if k != "spec"}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "spec.json").write_text(json.dumps(r["spec"]) + "\n")
    print(format_table(r))
    print(f"\nwrote {out / 'report.json'} and {out / 'spec.json'}")
    return r
