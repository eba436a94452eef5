"""Step time of HiAP training vs plain training (GPU; deit_small, synthetic data, bf16 AMP).

    python bench/hiap_step_time.py --out bench/results/h100 [--steps 300 --batch 128]

Both variants run the same AdamW step under bf16 autocast on random images and labels:
"plain" is dense timm deit_small with cross-entropy; "hiap" is the same model gated with
HiAP gates (Gumbel-Sigmoid sampling, straight-through, temperature schedule) with CE + the
expected-MAC budget and feasibility terms; "hiap_kd" adds distillation from a dense teacher
(one extra forward), as `pyengine prune --method hiap` trains. The three are timed interleaved
by pyengine's one harness (pyengine.measure.timing: CUDA events around one step per sample,
warm-up, round robin); the JSON holds the per-variant median / IQR, the step-time ratios with
their paired spread, each variant's peak memory in one lone step (above what was allocated
before it) and the environment record. Writes <out>/hiap_step_time_<model>_b<batch>.json;
pipe stdout to a .log beside it. CPU dry run of the script (numbers meaningless):
``python bench/hiap_step_time.py --device cpu --model vit_tiny_patch16_224 --model-kwargs
'{"depth": 1, "img_size": 32}' --batch 2 --steps 2 --warmup 1 --out /tmp/hiap``.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import pyengine
from pyengine.methods.hiap import HiAPLoss, TemperatureSchedule, gate_parameters
from pyengine.io.atomic import write_json
from pyengine.measure.timing import environment, measure
from pyengine.train.trainer import default_param_groups, kd_loss


def make_step(model, opt, loss_terms, teacher=None, kd_alpha=0.5, on_step=None,
              device_type="cuda"):
    def step(i, total, x, y):
        if on_step is not None:
            on_step(i, total)
        with torch.autocast(device_type, dtype=torch.bfloat16):
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


def step_peak_gb(fn, dev) -> float | None:
    """Peak memory of one call of ``fn`` above what was allocated before it (GiB; CUDA)."""
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    return (torch.cuda.max_memory_allocated(dev) - before) / 2 ** 30


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--model-kwargs", type=json.loads, default={},
                   help="timm kwargs, e.g. for the CPU dry run")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--device", default="cuda", help="cuda; cpu only as a dry run of the script")
    p.add_argument("--out", default="bench/results/h100")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("bench/hiap_step_time.py needs a CUDA GPU (--device cpu: a dry run)",
              file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    base = pyengine.create_model(a.model, **a.model_kwargs).to(dev)
    n_cls = base.num_classes
    pe = base.patch_embed
    x = torch.randn(a.batch, pe.proj.in_channels, *pe.img_size, device=dev)
    y = torch.randint(0, n_cls, (a.batch,), device=dev)
    total = a.warmup + a.steps + 2  # warm-up, the harness's calibration call, memory, samples

    def variant(model, loss_terms=None, teacher=None, hiap=False):
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
        step = make_step(model, opt, loss_terms, teacher, on_step=on_step,
                         device_type=dev.type)
        i = itertools.count()
        return lambda: step(next(i), total, x, y)

    fns = {"plain": variant(copy.deepcopy(base))}
    hiap = pyengine.gate(copy.deepcopy(base), method="hiap")
    fns["hiap"] = variant(hiap, HiAPLoss(a.target), hiap=True)
    teacher = copy.deepcopy(base).eval()
    for q in teacher.parameters():
        q.requires_grad_(False)
    hiap_kd = pyengine.gate(copy.deepcopy(base), method="hiap")
    fns["hiap_kd"] = variant(hiap_kd, HiAPLoss(a.target), teacher=teacher, hiap=True)
    mem = {k: step_peak_gb(fn, dev) for k, fn in fns.items()}  # one lone step each
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    samples = measure(fns, a.warmup, a.steps, dev, inference=False)
    wall = time.perf_counter() - t0
    results = {}
    for name, st in samples.stats().items():
        results[name] = {**st, "step_peak_mem_gb": mem[name]}
        print(f"{name:8s} median {st['median_ms']:.2f} ms/step (IQR {st['iqr_ms']:.2f})"
              + (f", one step's peak {mem[name]:.1f} GB" if mem[name] is not None else ""),
              flush=True)
    report = {
        "model": a.model, "model_kwargs": a.model_kwargs, "batch": a.batch, "amp": "bf16",
        "steps": a.steps, "warmup": a.warmup, "target": a.target,
        "data": "synthetic (random images and labels)", "device": str(dev),
        "timing": "pyengine.measure.timing.measure: the three variants interleaved, one "
                  "training step per sample",
        "variants": results, "wall_s": wall,
        "peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 2 ** 30
        if dev.type == "cuda" else None,
        "env": environment(dev),
    }
    for k in ("hiap", "hiap_kd"):  # step-time ratio (of medians) and its paired spread
        r = samples.ratio(k, "plain")
        report[f"{k}_over_plain"] = r["ratio"]
        report[f"{k}_over_plain_spread"] = r
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = write_json(report, out / f"hiap_step_time_{a.model}_b{a.batch}.json")
    h, k = report["hiap_over_plain_spread"], report["hiap_kd_over_plain_spread"]
    print(f"HiAP step / plain step: {h['ratio']:.3f} (paired p25-p75 {h['p25']:.3f}-"
          f"{h['p75']:.3f}); with KD teacher: {k['ratio']:.3f} ({k['p25']:.3f}-{k['p75']:.3f}); "
          f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
