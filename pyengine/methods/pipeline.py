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
import dataclasses
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pyengine.errors import SettingError
from pyengine.io.atomic import write_bytes, write_json
from pyengine.io.manifest import entry, read_verified
from pyengine.io.weights import load_checkpoint
from pyengine.methods.base import (Budget, MethodContext, Training, check_config,
                                   check_geometry, check_values, get_method,
                                   resolve_latency_budget)

__all__ = ["PruneJob", "run", "compact_vs_gated", "digits_recipe", "recipe_fit_kwargs",
           "check_finite"]

RUN_FORMAT = "pyengine.run/1"
RUN_FILE = "run.json"  # in OUT/checkpoints: the settings that define the run + the dense weights


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
    overwrite: bool = False             # replace what a non-empty ``out`` holds
    # metrics.json: predicted (latency table) and measured (timing harness) ms of the dense and
    # pruned models on the training device at these batch sizes (empty: none)
    latency_batches: tuple[int, ...] = (1, 64)

    def check(self) -> None:
        """Every setting validated before any work starts (the model's geometry is checked
        by :func:`run` as soon as the model is built)."""
        from pyengine.models.factory import check_model_kwargs, check_model_name
        from pyengine.train.data import check_data
        method = get_method(self.method)
        check_config(self.budget, self.training)
        if self.method_config is None:
            self.method_config = method.Config()
        elif not isinstance(self.method_config, method.Config):
            raise TypeError(f"method_config of {self.method!r} must be a "
                            f"{method.Config.__qualname__}, got "
                            f"{type(self.method_config).__name__}")
        check_values(self.method_config)
        method.check(self.method_config, MethodContext(self.budget, self.training))
        for name, check in (("model", lambda: check_model_name(self.model, "model")),
                            ("model_kwargs", lambda: self.model_kwargs is None or
                             check_model_kwargs(self.model_kwargs, "model_kwargs")),
                            ("data", lambda: check_data(self.data))):
            try:
                check()
            except (ValueError, OSError) as e:
                raise SettingError(name, str(e)) from None
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise SettingError("checkpoint", f"checkpoint {self.checkpoint} does not exist"
                               if not Path(self.checkpoint).exists() else
                               f"checkpoint {self.checkpoint} is a directory, not a file")
        if (self.data != "digits" and self.checkpoint is None and self.dense_epochs is None
                and not self.resume):
            raise SettingError("checkpoint", "no checkpoint: give the dense weights with "
                               "--checkpoint FILE or train them here with --dense-epochs N")
        if self.resume and self.overwrite:
            raise SettingError("overwrite", "overwrite and --resume contradict each other: "
                               "--resume continues the run in out, --overwrite starts a new "
                               "one there")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise SettingError("out", f"out {out} is a file; give a directory")
        if out.is_dir() and not (self.resume or self.overwrite):
            held = _held(out)
            if held:
                raise SettingError(
                    "out", f"out {out} is not empty (it holds {', '.join(held[:4])}"
                    f"{', ...' if len(held) > 4 else ''}): pass --overwrite to replace it with "
                    "this run, or --resume to continue the run it holds")
        if not all(isinstance(b, int) and b >= 1 for b in self.latency_batches):
            raise SettingError("latency_batches", f"latency_batches must be positive integers, "
                               f"got {list(self.latency_batches)!r}")
        for name in ("batch_size",):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise SettingError(name, f"{name} must be a positive integer, got {v!r}")
        for name in ("workers", "finetune"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise SettingError(name, f"{name} must be an integer >= 0, got {v!r}")
        for name in ("img_size", "dense_epochs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise SettingError(name, f"{name} must be a positive integer, got {v!r}")
        if self.data == "digits" and self.img_size is not None and self.img_size < 8:
            raise SettingError("img_size", f"img_size must be >= 8 for digits, got "
                               f"{self.img_size}")
        if self.finetune_lr is not None and not (isinstance(self.finetune_lr, (int, float))
                                                 and 0 < self.finetune_lr < float("inf")):
            raise SettingError("finetune_lr", f"finetune_lr must be a finite number > 0, got "
                               f"{self.finetune_lr!r}")

    @property
    def resume(self) -> bool:
        return bool(self.training.resume)

    def identity(self) -> dict:
        """The settings that define the run's result (not where or how fast it runs): what
        checkpoints record and ``resume`` compares."""
        asdict = lambda obj: json.loads(json.dumps(dataclasses.asdict(obj)))  # noqa: E731
        training = {k: v for k, v in asdict(self.training).items()
                    if k not in ("device", "progress", "checkpoint_dir", "resume")}
        data = self.data if self.data == "digits" else os.path.abspath(self.data)
        return {"format": RUN_FORMAT, "model": self.model, "model_kwargs": self.model_kwargs,
                "data": data, "checkpoint": (os.path.abspath(self.checkpoint)
                                             if self.checkpoint else None),
                "method": self.method, "method_config": asdict(self.method_config),
                "budget": _budget_identity(asdict(self.budget)), "training": training,
                "img_size": self.img_size, "batch_size": self.batch_size,
                "augment": self.augment, "dense_epochs": self.dense_epochs,
                "finetune": self.finetune, "finetune_lr": self.finetune_lr,
                "recipe": self.recipe}


def _budget_identity(d: dict) -> dict:
    """The budget's settings, the latency ones only where set (runs recorded before they
    existed still resume)."""
    for k, default in (("budget", "macs"), ("target_ms", None), ("latency_batch", 1)):
        if d.get(k, default) == default:
            d.pop(k, None)
    return d


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
    """Max |compact(x) - gated(x)| over up to ``max_images`` images of ``loader``; NaN when
    either model gives a NaN (torch.maximum propagates it; a Python max would drop it)."""
    worst, seen = torch.zeros((), dtype=torch.float64), 0
    for x, _ in loader:
        x = x[:max_images - seen].to(device)
        diff = (gated(x).double() - compact(x).double()).abs().max().cpu()
        worst = torch.maximum(worst, diff)
        seen += x.shape[0]
        if seen >= max_images:
            break
    return float(worst)


def check_finite(model: nn.Module, where: str) -> None:
    """FloatingPointError naming the first parameter or buffer of ``model`` with NaN/inf."""
    for kind, items in (("weight", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                what = "NaN" if bool(torch.isnan(t).any()) else "inf"
                raise FloatingPointError(f"{where}: {kind} {name} holds {what} values")


def _held(out: Path) -> list[str]:
    """What ``out`` holds, not counting the settings record of a run that stopped before it
    wrote anything else."""
    held = sorted(p.name for p in out.iterdir())
    ck = out / "checkpoints"
    if held == ["checkpoints"] and ck.is_dir() and [p.name for p in ck.iterdir()] == [RUN_FILE]:
        return []
    return held


def _prepare_out(job: PruneJob, run_id: dict, log) -> Path:
    """OUT ready for this run: a new run (or --overwrite) starts with no checkpoints and
    records its settings; --resume checks that the recorded settings are this run's."""
    out = Path(job.out)
    ck = out / "checkpoints"
    record = ck / RUN_FILE
    if job.resume and ck.is_dir():
        if record.is_file():
            try:
                recorded = json.loads(record.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{record}: not valid JSON ({e}); cannot tell which run "
                                 f"{out} holds") from None
            from pyengine.train.checkpoint import run_differences
            diff = run_differences(recorded.get("settings", {}), run_id)
            if diff:
                raise ValueError(f"cannot resume {out}: it holds a run with other settings ("
                                 f"{'; '.join(diff)}); run with the same flags, or use "
                                 "--overwrite to start a new run there")
            return out
        warnings.warn(f"{out} records no run settings (made by an older pyengine): cannot "
                      "check that --resume continues the same run", stacklevel=3)
        return out
    if job.overwrite and ck.exists():
        log(f"--overwrite: removing the previous run's checkpoints in {ck}")
        shutil.rmtree(ck)
    write_json({"format": RUN_FORMAT, "settings": run_id, "files": {}}, record)
    return out


def _record_file(out: Path, name: str, data: bytes) -> None:
    """Note the size and checksum of ``checkpoints/name`` in run.json (checked on resume)."""
    record = out / "checkpoints" / RUN_FILE
    if not record.is_file():  # a resumed run from before run records
        return
    doc = json.loads(record.read_text())
    doc.setdefault("files", {})[name] = entry(data)
    write_json(doc, record)


def _recorded_entry(out: Path, name: str) -> dict | None:
    record = out / "checkpoints" / RUN_FILE
    if not record.is_file():
        return None
    return json.loads(record.read_text()).get("files", {}).get(name)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(job: PruneJob, log: Callable[[str], None] = print) -> dict:
    """The whole ``pyengine prune`` job; returns metrics and models (and writes ``job.out``)."""
    from pyengine import api
    from pyengine.cost import cost
    from pyengine.io.model_dir import save
    from pyengine.models import create_model, geometry
    from pyengine.train import distributed as dist
    from pyengine.train.data import loaders
    from pyengine.train.trainer import evaluate, fit, row_printer

    t_start = time.perf_counter()
    job.check()  # fail before any training
    method = get_method(job.method)
    b, t = job.budget, job.training
    run_id = job.identity()
    torch.manual_seed(t.seed)
    recipe = {**digits_recipe(), **(job.recipe or {})}
    img_size = job.img_size
    if img_size is None and job.data == "digits":
        img_size = recipe["img_size"]
    distributed = dist.launched() or dist.is_initialized()  # torchrun: each rank its shard
    if distributed:
        dist.init(t.device)  # every rank has checked OUT before rank 0 writes to it
        if not dist.is_main():
            log = lambda text: None  # noqa: E731 - one rank speaks
    out = Path(job.out)
    if dist.is_main():
        _prepare_out(job, run_id, log)
    if distributed:
        dist.barrier()  # rank 0 has prepared OUT (and compared the recorded settings)
    if t.epochs == 0 and job.method in ("hiap", "sss"):
        warnings.warn(f"epochs is 0: {job.method} learns nothing; its structure comes from "
                      "the initial gates alone", stacklevel=2)
    train_loader, val_loader, n_classes = loaders(job.data, img_size or 224, job.batch_size,
                                                  job.workers, t.seed, distributed=distributed,
                                                  augment=job.augment)
    kw = {"num_classes": n_classes, **({"img_size": img_size} if img_size else {}),
          **(job.model_kwargs or {})}
    model = create_model(job.model, **kw).to(t.device)
    check_geometry(b, geometry(model))  # e.g. min_heads above the model's heads
    # a latency budget: the device's table (measured once) and target_ms -> target, before
    # any training (a target below the predicted floor fails here)
    b, latency = resolve_latency_budget(b, t, model, log, method=job.method)
    times: dict[str, float] = {}

    # ---- the dense model: a checkpoint, a previous run's (resume), or trained here
    dense_file = out / "checkpoints" / "dense.safetensors"
    t0 = time.perf_counter()
    if job.checkpoint:
        load_checkpoint(model, job.checkpoint)
        log(f"dense model: {job.model} from {job.checkpoint}")
    elif t.resume and dense_file.is_file():
        read_verified(dense_file, _recorded_entry(out, dense_file.name))
        load_checkpoint(model, dense_file)
        log(f"dense model: resumed from {dense_file}")
    else:
        if job.dense_epochs is not None:
            recipe["epochs"] = job.dense_epochs
        shown = {k: v for k, v in recipe.items()
                 if k not in ("img_size", "batch_size", "seed", "augment")}
        log(f"dense model: training {job.model} at {img_size}px, batch {job.batch_size}, "
            f"augment={job.augment}, with the digits recipe {shown}")
        fit(model, train_loader, val_loader, **recipe_fit_kwargs(recipe, len(train_loader)),
            seed=t.seed, device=t.device, amp=t.amp, progress=t.progress,
            log=row_printer("dense", t.progress),
            checkpoint_dir=str(out / "checkpoints" / "dense"), resume=t.resume,
            run={"phase": "dense", **run_id})
        from safetensors.torch import save as st_save
        if dist.is_main():
            data = st_save({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()})
            write_bytes(dense_file, data)
            _record_file(out, dense_file.name, data)
    check_finite(model, f"the dense weights of {job.checkpoint}" if job.checkpoint
                 else "the dense model")
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
    ctx = MethodContext(b, training, teacher, train_loader, val_loader, log, img_size,
                        run={"phase": job.method, **run_id}, latency=latency)
    gated = method.prune(model, job.method_config, ctx)
    b = ctx.budget  # a latency budget's target_ms is a fraction of the dense prediction now
    times["method_s"] = time.perf_counter() - t0
    check_finite(gated, f"the model after {job.method}")
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
            checkpoint_dir=str(out / "checkpoints" / "finetune"), resume=t.resume,
            run={"phase": "finetune", **run_id})
        gated.eval()
        check_finite(gated, "the model after fine-tuning")
    times["finetune_s"] = time.perf_counter() - t0
    s = api.spec(gated)
    compact = api.compile(gated).eval()
    max_abs_diff = compact_vs_gated(gated, compact, val_loader, t.device)
    if not max_abs_diff < float("inf"):  # NaN or inf: some output is not a number
        raise FloatingPointError(f"compact vs hard-gated max |diff| is {max_abs_diff}: the "
                                 "models' outputs on validation images are not finite")
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
    if b.budget == "latency":
        lm = ctx.latency
        metrics.update(budget="latency", target_ms=b.target * lm.dense,
                       latency_batch=b.latency_batch, dense_predicted_ms=lm.dense,
                       pruned_predicted_ms=lm.spec_ms(s), latency_ratio=lm.spec_ms(s) / lm.dense)
        if metrics["latency_ratio"] > b.target * (1 + b.tolerance):
            log(f"warning: the predicted latency ratio {metrics['latency_ratio']:.4f} is above "
                f"the target {b.target:.4f}: no further step lowers the table's prediction "
                f"(a flat or noisy table; measure it on a quiet machine)")
    if job.latency_batches:
        from pyengine.measure.latency_report import latency_report
        metrics["latency"] = latency_report({"dense": dense, "pruned": compact}, t.device,
                                            job.latency_batches,
                                            measure_table=b.budget == "latency")
    if dist.is_main():  # every rank holds the same model; one writes it, metrics with it
        save(compact, out, extra_files={"metrics.json": json.dumps(metrics, indent=2) + "\n"})
    log(f"pruned top-1 {pruned_top1:.2f}% (dense {dense_top1:.2f}%), MAC ratio "
        f"{metrics['macs_ratio']:.4f}"
        + (f", predicted latency ratio {metrics['latency_ratio']:.4f}"
           if b.budget == "latency" else "")
        + f" (target {b.target:.4g}), wrote {out}/")
    return {"metrics": metrics, "compact": compact, "gated": gated, "dense": dense,
            "spec": s, "val_loader": val_loader, "train_loader": train_loader}
