"""Step time of HiAP training vs plain training (GPU; deit_small, synthetic data, bf16 AMP).

    python bench/hiap_step_time.py --out bench/results/h100 [--steps 300 --batch 128]

Both variants run the same AdamW step under bf16 autocast on random images and labels:
"plain" is dense timm deit_small with cross-entropy; "hiap" is the same model gated with
HiAP gates (Gumbel-Sigmoid sampling, straight-through, temperature schedule) with CE + the
expected-MAC budget and feasibility terms; "hiap_kd" adds distillation from a dense teacher
(one extra forward), as `pyengine prune --method hiap` trains. Steps are timed with CUDA
events after a warm-up; the JSON holds the per-variant median / IQR and the environment.
Writes <out>/hiap_step_time_<model>_b<batch>.json; pipe stdout to a .log beside it.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import pyengine
from pyengine.methods.hiap import HiAPLoss, TemperatureSchedule, gate_parameters
from pyengine.measure.timing import environment
from pyengine.train.trainer import default_param_groups, kd_loss


def make_step(model, opt, loss_terms, teacher=None, kd_alpha=0.5, on_step=None):
    def step(i, total, x, y):
        if on_step is not None:
            on_step(i, total)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
            loss = F.cross_entropy(out.float(), y)
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(x)
                loss = (1 - kd_alpha) * loss + kd_alpha * kd_loss(out, t, 4.0)
        if loss_terms is not None:
            extra, _ = loss_terms(model, out, x, y, i)
            loss = loss + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def time_steps(step, x, y, warmup: int, steps: int) -> list[float]:
    total = warmup + steps
    for i in range(warmup):
        step(i, total, x, y)
    torch.cuda.synchronize()
    times = []
    for i in range(warmup, total):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step(i, total, x, y)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def stats(ms: list[float]) -> dict:
    q = statistics.quantiles(ms, n=4)
    return {"median_ms": statistics.median(ms), "iqr_ms": q[2] - q[0], "min_ms": min(ms),
            "mean_ms": statistics.fmean(ms), "steps": len(ms)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--out", default="bench/results/h100")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/hiap_step_time.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.device("cuda")
    torch.manual_seed(0)
    base = pyengine.create_model(a.model).to(dev)
    n_cls = base.num_classes
    x = torch.randn(a.batch, 3, 224, 224, device=dev)
    y = torch.randint(0, n_cls, (a.batch,), device=dev)
    results = {}

    def run(name, model, loss_terms=None, teacher=None, hiap=False):
        if hiap:
            gates = gate_parameters(model)
            ids = {id(q) for q in gates}
            groups = [{**g, "params": [q for q in g["params"] if id(q) not in ids]}
                      for g in default_param_groups(model, 0.05)]
            groups = [g for g in groups if g["params"]] + [
                {"params": gates, "lr": 0.05, "weight_decay": 0.0}]
            on_step = TemperatureSchedule(model)
        else:
            groups, on_step = default_param_groups(model, 0.05), None
        opt = torch.optim.AdamW(groups, lr=a.lr, weight_decay=0.05)
        model.train()
        step = make_step(model, opt, loss_terms, teacher, on_step=on_step)
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ms = time_steps(step, x, y, a.warmup, a.steps)
        results[name] = {**stats(ms), "wall_s": time.perf_counter() - t0,
                         "peak_mem_gb": torch.cuda.max_memory_allocated() / 2 ** 30}
        print(f"{name:8s} median {results[name]['median_ms']:.2f} ms/step "
              f"(IQR {results[name]['iqr_ms']:.2f}), peak {results[name]['peak_mem_gb']:.1f} GB",
              flush=True)

    run("plain", copy.deepcopy(base))
    hiap = pyengine.gate(copy.deepcopy(base), method="hiap")
    run("hiap", hiap, HiAPLoss(a.target), hiap=True)
    teacher = copy.deepcopy(base).eval()
    for q in teacher.parameters():
        q.requires_grad_(False)
    hiap_kd = pyengine.gate(copy.deepcopy(base), method="hiap")
    run("hiap_kd", hiap_kd, HiAPLoss(a.target), teacher=teacher, hiap=True)
    report = {
        "model": a.model, "batch": a.batch, "amp": "bf16", "steps": a.steps, "warmup": a.warmup,
        "target": a.target, "data": "synthetic (random images and labels)",
        "variants": results,
        "hiap_over_plain": results["hiap"]["median_ms"] / results["plain"]["median_ms"],
        "hiap_kd_over_plain": results["hiap_kd"]["median_ms"] / results["plain"]["median_ms"],
        "env": environment(),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"hiap_step_time_{a.model}_b{a.batch}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"HiAP step / plain step: {report['hiap_over_plain']:.3f} "
          f"(with KD teacher: {report['hiap_kd_over_plain']:.3f}); wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
