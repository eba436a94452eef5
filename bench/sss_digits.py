"""SSS on the embedded digits, end to end on CPU: train the dense model (digits recipe), learn
the structure with SSS (weights on AdamW through pyengine.train.fit, scale factors on APG) in
one pass, compile, check compact == hard-gated, and write metrics JSON.

    OMP_NUM_THREADS=1 python bench/sss_digits.py --arch vit --target 0.6 \\
        --out bench/results/cpu/sss_vit_digits 2>&1 | tee bench/results/cpu/sss_vit_digits.log
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

import pyengine
from pyengine.methods import sss
from pyengine.methods.base import run_method
from pyengine.models import zoo
from pyengine.io.atomic import write_json, write_text
from pyengine.measure.timing import environment
from pyengine.train.data import loaders
from pyengine.train.trainer import DIGITS_RECIPE, evaluate, fit, seed_everything


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["vit", "resnet"], default="vit")
    p.add_argument("--resnet", default="resnet18")
    p.add_argument("--vit-kwargs", type=json.loads, default={},
                   help="overrides of pyengine.zoo.digits_vit, e.g. '{\"embed_dim\": 128}'")
    p.add_argument("--batch-size", type=int, default=DIGITS_RECIPE["batch_size"])
    p.add_argument("--dense-lr", type=float, default=DIGITS_RECIPE["lr"])
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--dense-epochs", type=int, default=DIGITS_RECIPE["epochs"])
    p.add_argument("--epochs", type=int, default=8, help="SSS epochs (one pass)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--target", type=float, default=None, help="MAC target (target mode)")
    p.add_argument("--gamma", type=float, default=None, help="fixed gamma (plain SSS)")
    p.add_argument("--target-gamma", type=float, default=None, help="default: auto")
    p.add_argument("--prune-at", type=float, default=0.5)
    p.add_argument("--apg-lr", type=float, default=0.05)
    p.add_argument("--kd-alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense-cache", default=None, help="safetensors file: reuse the dense "
                   "weights if it exists, else write them there after training")
    p.add_argument("--out", required=True, help="path prefix: writes OUT.json")
    a = p.parse_args(argv)
    if (a.target is None) == (a.gamma is None):
        p.error("give exactly one of --target (target mode) and --gamma (plain SSS)")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    r = {**DIGITS_RECIPE, "batch_size": a.batch_size, "lr": a.dense_lr, "augment": a.augment}
    seed_everything(a.seed)
    train, val, n = loaders("digits", img_size=r["img_size"], batch_size=r["batch_size"],
                            seed=a.seed, augment=r["augment"])
    if a.arch == "vit":
        model = zoo.digits_vit(**a.vit_kwargs)
        name = f"digits_vit({json.dumps(a.vit_kwargs)})" if a.vit_kwargs else "digits_vit"
    else:
        model, name = zoo.digits_resnet(a.resnet), f"digits_resnet({a.resnet})"
        model.pyengine_img_size = r["img_size"]
    from pyengine.train.cache import load_trained, save_trained
    dense_source = {"trained_here": True, "recipe": r}
    if a.dense_cache and load_trained(model, a.dense_cache) is not None:
        dense_source = {"trained_here": False, "weights": a.dense_cache,
                        "note": "trained by an earlier run of this script with the same model; "
                                "its raw log is committed beside this file as *.dense.log"}
        print(f"dense {name}: weights from {a.dense_cache}", flush=True)
    else:
        print(f"dense {name}: {a.dense_epochs} epochs of the digits recipe", flush=True)
        fit(model, train, val, epochs=a.dense_epochs, lr=r["lr"], weight_decay=r["weight_decay"],
            optimizer=r["optimizer"], label_smoothing=r["label_smoothing"],
            grad_clip=r["grad_clip"], warmup_steps=int(round(r["warmup_epochs"] * len(train))),
            seed=a.seed, progress=False,
            log=lambda row: print("dense", json.dumps(row), flush=True))
        if a.dense_cache:
            save_trained(model, a.dense_cache, {"recipe": r, "epochs": a.dense_epochs})
    model.eval()
    dense_top1 = evaluate(model, val)
    dense_cost = pyengine.cost(model, **({"img_size": r["img_size"]} if a.arch == "resnet" else {}))
    print(f"dense top-1 {dense_top1:.2f}%  MMACs {dense_cost.macs / 1e6:.2f}", flush=True)
    t_dense = time.perf_counter() - t0
    teacher = copy.deepcopy(model).eval()
    for q in teacher.parameters():
        q.requires_grad_(False)

    t1 = time.perf_counter()
    gated = run_method(
        model, "sss", train, val, teacher=teacher if a.kd_alpha > 0 else None,
        img_size=r["img_size"], target=a.target if a.target is not None else 0.5,
        gamma=a.gamma, target_gamma=a.target_gamma, prune_at=a.prune_at, apg_lr=a.apg_lr,
        apg_momentum=0.9, sss_nonneg=True, sss_dims=False, epochs=a.epochs, lr=a.lr,
        weight_decay=0.05, kd_alpha=a.kd_alpha, kd_temperature=4.0, seed=a.seed, device="cpu",
        amp=None, min_heads=0, round_to=None, progress=False, tolerance=0.03)
    t_sss = time.perf_counter() - t1
    gated.eval()
    s = pyengine.spec(gated)
    zeros = sum(int((f == 0).sum()) for f in sss.scale_factors(gated))
    total = sum(f.numel() for f in sss.scale_factors(gated))
    gated_top1 = evaluate(gated, val)
    compact = pyengine.compile(gated).eval()
    worst = 0.0
    with torch.no_grad():
        for x, _ in val:
            worst = max(worst, (gated(x) - compact(x)).abs().max().item())
    compact_top1 = evaluate(compact, val)
    kw = {"img_size": r["img_size"]} if a.arch == "resnet" else {}
    pc = pyengine.cost(compact, **kw)
    metrics = {
        "method": "sss", "model": name, "data": "digits", "img_size": r["img_size"],
        "mode": "target" if a.target is not None else "gamma", "target": a.target,
        "gamma": gated.pyengine_sss["gamma"], "prune_at": a.prune_at,
        "structure_fixed": gated.pyengine_sss["fixed"],
        "dense": dense_source, "sss_epochs": a.epochs, "lr": a.lr, "apg_lr": a.apg_lr,
        "kd_alpha": a.kd_alpha, "finetune_epochs": 0,
        "dense_top1": dense_top1, "gated_top1": gated_top1, "pruned_top1": compact_top1,
        "top1_drop": dense_top1 - compact_top1,
        "dense_macs": dense_cost.macs, "pruned_macs": pc.macs,
        "macs_ratio": pc.macs / dense_cost.macs,
        "dense_params": sum(q.numel() for q in teacher.parameters()),
        "pruned_params": sum(q.numel() for q in compact.parameters()),
        "zero_factors": zeros, "factors": total, "zero_factors_after_pass":
            gated.pyengine_sss["zero_factors"],
        "max_abs_diff_compact_vs_gated": worst, "spec_summary": s.summary(),
        "check_history": gated.pyengine_sss["history"],
        "seconds": {"dense": t_dense, "sss": t_sss, "total": time.perf_counter() - t0},
        "device": "cpu", "env": environment("cpu"),
        "command": " ".join(["python", "bench/sss_digits.py"] + (argv or sys.argv[1:])),
    }
    out = Path(a.out + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(metrics, out)
    write_text(Path(a.out + ".spec.json"), s.to_json())
    print(f"sss: {zeros}/{total} factors exactly zero; compact top-1 {compact_top1:.2f}% "
          f"(dense {dense_top1:.2f}%), MAC ratio {metrics['macs_ratio']:.4f}, "
          f"compact vs gated max |diff| {worst:.2e}; wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
