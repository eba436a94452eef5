"""The ``pyengine prune`` job: data, dense model, method, fine-tuning, compile, check, save.

    job = PruneJob(model="digits_vit", out="runs/hiap50", method="hiap",
                   budget=Budget(target=0.5), training=Training(epochs=10))
    result = run(job)              # writes OUT/ (pyengine.save) + OUT/metrics.json

The dense model comes from ``checkpoint``, from a previous run's checkpoints (``resume``), or
is trained here with the digits recipe. The method (:mod:`pyengine.methods.base`) returns the
model gated with its structure fixed; an optional fine-tuning trains the hard-gated model
(distilled from the dense one), which is then compiled, checked against the gated model and
saved.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pyengine.io.atomic import write_bytes, write_json
from pyengine.io.weights import load_checkpoint
from pyengine.methods.base import (Budget, MethodContext, Training, check_config, get_method)

__all__ = ["PruneJob", "run", "compact_vs_gated", "digits_recipe", "recipe_fit_kwargs"]


@dataclass
class PruneJob:
    """Everything one ``pyengine prune`` run does (the command line fills it from its flags)."""

    model: str
    out: str
    method: str = "hiap"
    data: str = "digits"
    model_kwargs: dict | None = None
    checkpoint: str | None = None
    img_size: int | None = None
    batch_size: int = 64
    workers: int = 0
    augment: bool = True
    dense_epochs: int | None = None
    finetune: int = 0
    finetune_lr: float | None = None
    recipe: dict | None = None          # overrides of the dense digits recipe
    budget: Budget = field(default_factory=Budget)
    training: Training = field(default_factory=Training)
    method_config: Any = None           # the method's Config (None: its defaults)

    def check(self) -> None:
        """Every setting validated before any work starts."""
        method = get_method(self.method)
        check_config(self.budget, self.training)
        if self.method_config is None:
            self.method_config = method.Config()
        elif not isinstance(self.method_config, method.Config):
            raise TypeError(f"method_config of {self.method!r} must be a "
                            f"{method.Config.__qualname__}, got "
                            f"{type(self.method_config).__name__}")
        for name in ("batch_size",):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("workers", "finetune"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        for name in ("img_size", "dense_epochs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.finetune_lr is not None and not self.finetune_lr > 0:
            raise ValueError(f"finetune_lr must be > 0, got {self.finetune_lr!r}")


def digits_recipe() -> dict:
    """The trainer's recipe for the dense digits model (:data:`pyengine.train.DIGITS_RECIPE`)."""
    from pyengine.train.trainer import DIGITS_RECIPE
    return dict(DIGITS_RECIPE)


def recipe_fit_kwargs(recipe: dict, steps_per_epoch: int) -> dict:
    """fit() keyword arguments from a recipe (warmup in epochs becomes steps; data keys drop)."""
    kw = {k: recipe[k] for k in ("epochs", "lr", "weight_decay", "optimizer", "label_smoothing",
                                 "grad_clip") if k in recipe}
    kw["warmup_steps"] = int(round(recipe.get("warmup_epochs", 0) * steps_per_epoch))
    return kw


@torch.inference_mode()
def compact_vs_gated(gated: nn.Module, compact: nn.Module, loader, device,
                     max_images: int = 256) -> float:
    """Max |compact(x) - gated(x)| over up to ``max_images`` images of ``loader``."""
    worst, seen = 0.0, 0
    for x, _ in loader:
        x = x[:max_images - seen].to(device)
        worst = max(worst, (gated(x) - compact(x)).abs().max().item())
        seen += x.shape[0]
        if seen >= max_images:
            break
    return worst


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(job: PruneJob, log: Callable[[str], None] = print) -> dict:
    """The whole ``pyengine prune`` job; returns metrics and models (and writes ``job.out``)."""
    from pyengine import api
    from pyengine.cost import cost
    from pyengine.io.model_dir import save
    from pyengine.models import create_model
    from pyengine.train import distributed as dist
    from pyengine.train.data import loaders
    from pyengine.train.trainer import evaluate, fit, row_printer

    t_start = time.perf_counter()
    job.check()  # fail before any training
    method = get_method(job.method)
    b, t = job.budget, job.training
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(t.seed)
    recipe = {**digits_recipe(), **(job.recipe or {})}
    img_size = job.img_size
    if img_size is None and job.data == "digits":
        img_size = recipe["img_size"]
    distributed = dist.launched() or dist.is_initialized()  # torchrun: each rank its shard
    if distributed:
        dist.init(t.device)
        if not dist.is_main():
            log = lambda text: None  # noqa: E731 - one rank speaks
    train_loader, val_loader, n_classes = loaders(job.data, img_size or 224, job.batch_size,
                                                  job.workers, t.seed, distributed=distributed,
                                                  augment=job.augment)
    kw = {"num_classes": n_classes, **({"img_size": img_size} if img_size else {}),
          **(job.model_kwargs or {})}
    model = create_model(job.model, **kw).to(t.device)
    times: dict[str, float] = {}

    # ---- the dense model: a checkpoint, a previous run's (resume), or trained here
    dense_file = out / "checkpoints" / "dense.safetensors"
    t0 = time.perf_counter()
    if job.checkpoint:
        load_checkpoint(model, job.checkpoint)
        log(f"dense model: {job.model} from {job.checkpoint}")
    elif t.resume and dense_file.is_file():
        load_checkpoint(model, dense_file)
        log(f"dense model: resumed from {dense_file}")
    else:
        if job.dense_epochs is not None:
            recipe["epochs"] = job.dense_epochs
        if job.data != "digits" and job.dense_epochs is None:
            raise ValueError("no --checkpoint: give the dense weights with --checkpoint FILE "
                             "or train them here with --dense-epochs N")
        shown = {k: v for k, v in recipe.items()
                 if k not in ("img_size", "batch_size", "seed", "augment")}
        log(f"dense model: training {job.model} at {img_size}px, batch {job.batch_size}, "
            f"augment={job.augment}, with the digits recipe {shown}")
        fit(model, train_loader, val_loader, **recipe_fit_kwargs(recipe, len(train_loader)),
            seed=t.seed, device=t.device, amp=t.amp, progress=t.progress,
            log=row_printer("dense", t.progress),
            checkpoint_dir=str(out / "checkpoints" / "dense"), resume=t.resume)
        from safetensors.torch import save as st_save
        if dist.is_main():
            dense_file.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(dense_file, st_save(
                {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}))
    times["dense_s"] = time.perf_counter() - t0
    model.eval()
    dense_top1 = evaluate(model, val_loader, t.device)
    dense_cost = cost(model)
    dense_params = _params(model)
    log(f"dense top-1 {dense_top1:.2f}%  GMACs {dense_cost.macs / 1e9:.4f}  "
        f"params {dense_cost.params / 1e6:.3f}M")
    dense = copy.deepcopy(model).eval()
    for p in dense.parameters():
        p.requires_grad_(False)
    teacher = dense if t.kd_alpha > 0 else None

    # ---- the method learns / scores the structure and fixes it
    t0 = time.perf_counter()
    training = copy.copy(t)
    training.checkpoint_dir = str(out / "checkpoints")
    ctx = MethodContext(b, training, teacher, train_loader, val_loader, log, img_size)
    method.check(job.method_config, ctx)
    gated = method.prune(model, job.method_config, ctx)
    times["method_s"] = time.perf_counter() - t0
    gated.eval()
    pruned_top1_before = evaluate(gated, val_loader, t.device)
    log(f"{job.method}: structure fixed, top-1 {pruned_top1_before:.2f}% (hard-gated, before "
        f"fine-tuning)")

    # ---- optional fine-tuning with the structure fixed, distilled from the dense model. The
    # gated model is trained (its gates are frozen masks), so the compact model compiled
    # afterwards is exactly the operator that was fine-tuned.
    t0 = time.perf_counter()
    if job.finetune > 0:
        for gates in api.gate_sets(gated):  # the structure is fixed: gates rest
            for gp in gates.parameters():
                gp.requires_grad_(False)
        gated.train()
        fit(gated, train_loader, val_loader, epochs=job.finetune,
            lr=job.finetune_lr or t.lr, weight_decay=t.weight_decay, teacher=teacher,
            kd_alpha=t.kd_alpha, kd_temperature=t.kd_temperature, seed=t.seed,
            device=t.device, amp=t.amp, progress=t.progress,
            warmup_steps=t.warmup_steps, grad_clip=t.grad_clip,
            log=row_printer("finetune", t.progress),
            checkpoint_dir=str(out / "checkpoints" / "finetune"), resume=t.resume)
        gated.eval()
    times["finetune_s"] = time.perf_counter() - t0
    s = api.spec(gated)
    compact = api.compile(gated).eval()
    max_abs_diff = compact_vs_gated(gated, compact, val_loader, t.device)
    log(f"compiled: compact vs hard-gated max |diff| {max_abs_diff:.2e} on validation images")
    pruned_top1 = evaluate(compact, val_loader, t.device)
    pc = cost(s)  # the pruned structure; the compact model's head layout may pad (below)
    times["total_s"] = time.perf_counter() - t_start
    metrics = {
        "method": job.method, "model": job.model, "data": job.data, "target": b.target,
        "dense_top1": dense_top1, "pruned_top1": pruned_top1,
        "pruned_top1_before_finetune": pruned_top1_before,
        "dense_macs": dense_cost.macs, "pruned_macs": pc.macs,
        "macs_ratio": pc.macs / dense_cost.macs,
        "compiled_macs": cost(compact).macs,  # what the compact model computes (its layout)
        "dense_params": dense_params, "pruned_params": _params(compact),
        "epochs": t.epochs, "finetune_epochs": job.finetune,
        "max_abs_diff": max_abs_diff,
        "heads_kept": sum(len(getattr(blk, "heads", ())) for blk in s.blocks),
        "seed": t.seed, "device": str(t.device), "times": times,
    }
    if dist.is_main():  # every rank holds the same model; one writes it
        save(compact, out)
        write_json(metrics, out / "metrics.json")
    log(f"pruned top-1 {pruned_top1:.2f}% (dense {dense_top1:.2f}%), MAC ratio "
        f"{metrics['macs_ratio']:.4f} (target {b.target}), wrote {out}/")
    return {"metrics": metrics, "compact": compact, "gated": gated, "dense": dense,
            "spec": s, "val_loader": val_loader, "train_loader": train_loader}
