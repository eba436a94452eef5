"""The trainer shared by every learned method (HiAP, SSS, fine-tuning).

``fit`` runs ``loss = (1-a) CE + a T^2 KL(teacher || student) + extra_loss(...)`` with AdamW or
SGD, linear warmup then cosine decay, optional autocast (bf16 / fp16 with a grad scaler on
CUDA), gradient clipping, a tqdm bar, per-epoch validation, atomic checkpoints (safetensors +
JSON, see :mod:`pyengine.checkpoint`) and exact resume, and DistributedDataParallel under
torchrun. ``evaluate`` gives top-1 in percent, summed over ranks.

Exact resume rests on three things: the data order of epoch ``e`` is the permutation of
``seed + e``; every sample's augmentation is seeded from ``(seed, epoch, index)``
(:class:`pyengine.data.SeededDataset`); and the checkpoint holds every RNG state, the
optimizer, scheduler and scaler states and the running sums of the current epoch. A run
killed after a checkpoint and resumed therefore ends bit-identical to an uninterrupted one.

``DIGITS_RECIPE`` and :func:`train_digits` train the default small ViT on the embedded digits.
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (BatchSampler, DataLoader, IterableDataset, RandomSampler,
                              SequentialSampler)
from tqdm import tqdm

from pyengine.train import distributed as dist
from pyengine.train.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, \
    set_rng_state
from pyengine.train.data import SeededDataset

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# The default training of pyengine.zoo.digits_vit() on the embedded digits (see
# bench/results/cpu/digits_recipe.{json,log} for what it reaches and how long it takes).
DIGITS_RECIPE: dict[str, Any] = dict(
    img_size=32, batch_size=32, epochs=8, lr=1e-3, weight_decay=0.05, warmup_epochs=0.5,
    label_smoothing=0.0, augment=False, optimizer="adamw", grad_clip=None, seed=0)


# ---------------------------------------------------------------------------- pieces
def seed_everything(seed: int, deterministic: bool = False) -> int:
    """Seed python, numpy and torch (all devices); optionally force deterministic kernels."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    return seed


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, norms, position embeddings, class tokens and
    anything ``model.no_weight_decay()`` names are left undecayed (timm's convention)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(params, name: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.05):
    """AdamW or SGD (momentum 0.9, Nesterov) over parameters or param-group dicts."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay,
                               nesterov=True)
    raise ValueError(f"unknown optimizer {name!r}; choose 'adamw' or 'sgd'")


def lr_factor(step: int, total: int, warmup: int = 0) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, mean over the batch (Hinton)."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    q = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(s, q, reduction="batchmean", log_target=True) * (t * t)


def _param_list(param_groups) -> list[dict]:
    groups = []
    for i, g in enumerate(param_groups):
        if not isinstance(g, dict) or "params" not in g:
            raise TypeError(f"param_groups[{i}] must be a dict with 'params', got {g!r}")
        g = dict(g)
        g["params"] = list(g["params"])
        groups.append(g)
    if not groups:
        raise ValueError("param_groups is empty")
    return groups


def _epoch_loader(loader, epoch: int, seed: int, skip: int):
    """Epoch ``epoch`` of ``loader`` from batch ``skip`` on, in the order fixed by the seed.

    A map-style loader with an ordinary batch size is rebuilt over the explicit index order
    with per-sample seeding; anything else (iterable datasets, custom batch samplers) is used
    as is, which cannot start mid-epoch.
    """
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    rebuildable = (isinstance(loader, DataLoader) and loader.batch_size is not None
                   and isinstance(loader.batch_sampler, BatchSampler)
                   and not isinstance(loader.dataset, IterableDataset))
    if not rebuildable:
        if skip:
            what = type(getattr(loader, "dataset", None)).__name__
            raise ValueError(f"cannot resume in the middle of an epoch with a "
                             f"{type(loader).__name__} over {what}; checkpoint at epoch ends "
                             f"(checkpoint_every=None)")
        return loader
    n = len(loader.dataset)
    if hasattr(sampler, "set_epoch") or not isinstance(sampler, (RandomSampler,
                                                                  SequentialSampler)):
        order = list(sampler)
    elif isinstance(sampler, SequentialSampler):
        order = list(range(n))
    else:  # RandomSampler: replace its unseeded draw by the epoch's permutation
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g).tolist()[:sampler.num_samples]
    bs = loader.batch_size
    kw = {}
    if loader.num_workers > 0:
        kw = dict(prefetch_factor=loader.prefetch_factor, timeout=loader.timeout,
                  worker_init_fn=loader.worker_init_fn,
                  multiprocessing_context=loader.multiprocessing_context)
    return DataLoader(SeededDataset(loader.dataset, seed, epoch), batch_size=bs,
                      sampler=order[skip * bs:], num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      drop_last=loader.drop_last,
                      generator=torch.Generator().manual_seed(seed + epoch), **kw)


def _logged(extra: dict | None) -> dict[str, float]:
    out = {}
    for k, v in (extra or {}).items():
        out[str(k)] = float(v.detach().float().item() if isinstance(v, torch.Tensor) else v)
    return out


def _write_log(log, row: dict) -> None:
    if log is None:
        return
    if callable(log):
        log(row)
        return
    with open(log, "a") as f:
        f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------- evaluate
@torch.no_grad()
def row_printer(tag: str, progress: bool):
    """fit's ``log``: print each epoch row when there is no progress bar (which shows it)."""
    if progress:
        return None

    def show(row: dict) -> None:
        print(f"[{tag}] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in row.items()), flush=True)
    return show


def evaluate(model: nn.Module, loader, device: str | torch.device = "cpu",
             amp: str | None = None) -> float:
    """Top-1 accuracy (percent) of ``model`` over ``loader``; counts are summed over ranks."""
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.no_grad(), torch.autocast(device.type, dtype=AMP_DTYPES.get(amp),
                                                 enabled=amp is not None):
                out = model(x)
            correct += (out.argmax(-1) == y).sum().item()
            total += y.numel()
    finally:
        model.train(was_training)
    counts = dist.all_reduce_sum(torch.tensor([correct, total], dtype=torch.float64,
                                              device=device))
    correct, total = counts.tolist()
    if total == 0:
        raise ValueError("evaluate: the loader is empty")
    return 100.0 * correct / total


# ---------------------------------------------------------------------------- fit
def fit(model: nn.Module, train_loader, val_loader=None, *, epochs: int, lr: float = 1e-3,
        weight_decay: float = 0.05, optimizer: str = "adamw", param_groups=None,
        amp: str | None = None, teacher: nn.Module | None = None, kd_alpha: float = 0.5,
        kd_temperature: float = 4.0, label_smoothing: float = 0.0,
        extra_loss: Callable | None = None, on_step: Callable[[int, int], Any] | None = None,
        checkpoint_dir: str | Path | None = None, resume: bool = False,
        checkpoint_every: int | None = None, keep_checkpoints: int = 2,
        extra_state: dict[str, Any] | None = None, seed: int = 0,
        device: str | torch.device = "cpu", progress: bool = True, warmup_steps: int = 0,
        grad_clip: float | None = None, log=None, distributed: bool | None = None,
        find_unused_parameters: bool = False, run: dict | None = None) -> list[dict]:
    """Train ``model`` in place; returns one history row per epoch.

    Each row: ``epoch``, ``step``, ``lr``, ``loss`` (mean total loss), ``train_top1``,
    ``val_top1`` (with a ``val_loader``) and the epoch means of ``extra_loss``'s logs.

    - ``param_groups``: torch-style list of dicts used instead of the default groups (which
      exempt biases, norms and embeddings from weight decay); a group's own ``lr`` and
      ``weight_decay`` win over the arguments, and the schedule scales every group alike.
    - ``amp``: ``"bf16"`` or ``"fp16"`` autocast on the model's device (fp16 on CUDA uses a
      GradScaler).
    - ``teacher``: distil with ``(1-kd_alpha) CE + kd_alpha T^2 KL``; the teacher runs in eval
      mode without gradients.
    - ``extra_loss(model, logits, x, y, step)``: a Tensor or ``(Tensor, {name: float})``; the
      dict shows in the progress bar and its epoch means go into the history. ``model`` is
      the unwrapped module even under DDP.
    - ``on_step(step, total_steps)``: called at the start of every training step, before
      the forward pass and the optimizer step (temperature annealing and the like).
    - ``checkpoint_dir``: checkpoint at each epoch end and every ``checkpoint_every`` steps;
      ``resume=True`` continues from the newest checkpoint there (or starts fresh if none).
      ``extra_state`` objects (``state_dict()``/``load_state_dict()``) are saved too.
    - ``distributed``: None = when torchrun started several processes or a process group
      exists; the model is wrapped in DDP, only rank 0 prints and writes checkpoints.
    - ``log``: a callable receiving each row, or a path that gets one JSON line per row.
    - ``run``: the settings that define the run (JSON); recorded in every checkpoint, and a
      resume from a checkpoint recorded with other settings is refused (the message lists
      the differences). ``epochs``, ``seed`` and the optimizer settings are always checked.
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if not 0.0 <= kd_alpha <= 1.0:
        raise ValueError(f"kd_alpha must be in [0, 1], got {kd_alpha!r}")
    if kd_temperature <= 0:
        raise ValueError(f"kd_temperature must be > 0, got {kd_temperature!r}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int)
                                         or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive int or None, got "
                         f"{checkpoint_every!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    extra_state = dict(extra_state or {})
    for k, v in extra_state.items():
        if not (hasattr(v, "state_dict") and hasattr(v, "load_state_dict")):
            raise TypeError(f"extra_state[{k!r}] has no state_dict()/load_state_dict()")

    if distributed is None:
        distributed = dist.launched() or dist.is_initialized()
    if distributed:
        dist.init(device)
    device = dist.device_for_rank(device)
    main = dist.is_main()
    seed_everything(seed)

    model.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
    groups = (_param_list(param_groups) if param_groups is not None
              else default_param_groups(model, weight_decay))
    opt = make_optimizer(groups, optimizer, lr, weight_decay)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("fit: the training loader yields no batch (dataset smaller than one "
                         "batch with drop_last?)")
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warmup_steps))
    scaler = (torch.amp.GradScaler("cuda") if amp == "fp16" and device.type == "cuda"
              else None)
    autocast_dtype = AMP_DTYPES.get(amp)
    params = [p for g in opt.param_groups for p in g["params"]]

    step = epoch = batch_in_epoch = 0
    history: list[dict] = []
    sums = _fresh_sums()
    run = {**(run or {}), "fit": {"epochs": epochs, "seed": seed, "lr": lr,
                                  "weight_decay": weight_decay, "optimizer": optimizer,
                                  "warmup_steps": warmup_steps, "grad_clip": grad_clip,
                                  "amp": amp, "kd_alpha": kd_alpha if teacher is not None else None,
                                  "kd_temperature": kd_temperature if teacher is not None else None,
                                  "label_smoothing": label_smoothing}}
    if resume:
        ckpt = latest_checkpoint(checkpoint_dir)
        if ckpt is not None:
            st = load_checkpoint(ckpt, run=run)
            prog = st["progress"]
            if prog["steps_per_epoch"] != steps_per_epoch:
                raise ValueError(f"cannot resume {ckpt}: it has {prog['steps_per_epoch']} steps "
                                 f"per epoch, this loader {steps_per_epoch} (data or batch size "
                                 f"changed)")
            try:
                model.load_state_dict(st["model"])
                opt.load_state_dict(st["optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(f"cannot resume from {ckpt}: it does not fit this model or "
                                 f"optimizer ({first})") from None
            sched.load_state_dict(st["scheduler"])
            if scaler is not None and st.get("scaler"):
                scaler.load_state_dict(st["scaler"])
            for k, obj in extra_state.items():
                if k not in st["extra_state"]:
                    raise ValueError(f"checkpoint {ckpt} has no extra_state {k!r} (has "
                                     f"{sorted(st['extra_state'])})")
                obj.load_state_dict(st["extra_state"][k])
            step, epoch, batch_in_epoch = prog["step"], prog["epoch"], prog["batch_in_epoch"]
            history, sums = prog["history"], prog["sums"]
            set_rng_state(st["rng"])
            if main and progress:
                tqdm.write(f"resumed from {ckpt} (epoch {epoch + 1}, step {step})")

    net = dist.wrap(model, device, find_unused_parameters) if distributed else model

    def save():
        if checkpoint_dir is None:
            return
        if main:
            state = {
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "extra_state": {k: v.state_dict() for k, v in extra_state.items()},
                "rng": rng_state(),
                "progress": {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                             "steps_per_epoch": steps_per_epoch, "epochs": epochs,
                             "seed": seed, "history": history, "sums": sums}}
            save_checkpoint(checkpoint_dir, step, state, keep=keep_checkpoints, run=run)
        dist.barrier()

    while epoch < epochs:
        loader = _epoch_loader(train_loader, epoch, seed, batch_in_epoch)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", total=steps_per_epoch,
                   initial=batch_in_epoch, disable=not (progress and main), leave=False,
                   dynamic_ncols=True)
        t0 = time.perf_counter()
        for x, y in bar:
            if on_step is not None:
                on_step(step, total)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=amp is not None):
                out = net(x)
                loss = F.cross_entropy(out.float(), y, label_smoothing=label_smoothing)
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(x)
                    loss = (1 - kd_alpha) * loss + kd_alpha * kd_loss(out, t_out,
                                                                      kd_temperature)
            logs: dict[str, float] = {}
            if extra_loss is not None:  # outside autocast: cost sums stay in fp32
                extra = extra_loss(model, out, x, y, step)
                if isinstance(extra, tuple):
                    extra, logs = extra[0], _logged(extra[1])
                loss = loss + extra
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1}, "
                                         f"step {step}")
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            step += 1
            batch_in_epoch += 1
            n = y.numel()
            sums["loss"] += loss.item() * n
            sums["correct"] += (out.argmax(-1) == y).sum().item()
            sums["count"] += n
            sums["steps"] += 1
            for k, v in logs.items():
                sums["extra"][k] = sums["extra"].get(k, 0.0) + v
            if main and progress:
                bar.set_postfix(loss=f"{sums['loss'] / sums['count']:.3f}",
                                top1=f"{100 * sums['correct'] / sums['count']:.1f}",
                                **{k: f"{v:.4g}" for k, v in logs.items()})
            if (checkpoint_every and step % checkpoint_every == 0
                    and batch_in_epoch < steps_per_epoch):
                save()
        bar.close()
        row = _epoch_row(epoch, step, sched.get_last_lr()[0], sums, device)
        row_time = time.perf_counter() - t0
        if val_loader is not None:
            row["val_top1"] = evaluate(model, val_loader, device, amp=amp)
        history.append(row)
        if main:
            _write_log(log, row)
            if progress:
                tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in row.items()) + f" ({row_time:.1f}s)")
        epoch += 1
        batch_in_epoch = 0
        sums = _fresh_sums()
        save()
    return history


def _fresh_sums() -> dict:
    return {"loss": 0.0, "correct": 0, "count": 0, "steps": 0, "extra": {}}


def _epoch_row(epoch: int, step: int, lr: float, sums: dict, device) -> dict:
    """The history row, with sums taken over every rank so all ranks log the same row."""
    keys = sorted(sums["extra"])
    vec = torch.tensor([sums["loss"], sums["correct"], sums["count"], sums["steps"]]
                       + [sums["extra"][k] for k in keys], dtype=torch.float64, device=device)
    vec = dist.all_reduce_sum(vec).tolist()
    loss, correct, count, steps = vec[:4]
    row = {"epoch": epoch + 1, "step": step, "lr": lr, "loss": loss / max(count, 1),
           "train_top1": 100.0 * correct / max(count, 1)}
    for k, v in zip(keys, vec[4:]):
        row[k] = v / max(steps, 1)
    return row


# ---------------------------------------------------------------------------- the recipe
def train_digits(model: nn.Module | None = None, recipe: dict | None = None, *,
                 device: str | torch.device = "cpu", progress: bool = True,
                 **fit_kwargs) -> tuple[nn.Module, list[dict]]:
    """Train ``model`` (default ``pyengine.zoo.digits_vit()``) on digits with ``recipe``
    (default :data:`DIGITS_RECIPE`, keys overridable); returns ``(model, history)``."""
    from pyengine.train.data import loaders
    from pyengine.models.zoo import digits_vit
    r = {**DIGITS_RECIPE, **(recipe or {})}
    unknown = set(r) - set(DIGITS_RECIPE)
    if unknown:
        raise ValueError(f"unknown recipe keys {sorted(unknown)}; known: {sorted(DIGITS_RECIPE)}")
    seed_everything(r["seed"])
    if model is None:
        model = digits_vit(img_size=r["img_size"])
    train, val, _ = loaders("digits", img_size=r["img_size"], batch_size=r["batch_size"],
                            seed=r["seed"], augment=r["augment"],
                            distributed=dist.launched() or dist.is_initialized())
    history = fit(model, train, val, epochs=r["epochs"], lr=r["lr"],
                  weight_decay=r["weight_decay"], optimizer=r["optimizer"],
                  label_smoothing=r["label_smoothing"], grad_clip=r["grad_clip"],
                  warmup_steps=int(round(r["warmup_epochs"] * len(train))), seed=r["seed"],
                  device=device, progress=progress, **fit_kwargs)
    return model, history



# ---------------------------------------------------------------------------- recipe run
def record_digits_recipe(out: str | Path, recipe: dict | None = None,
                         model_kwargs: dict | None = None) -> dict:
    """Train the digits recipe and write what it reached to ``out`` (JSON, atomically).

    The JSON holds the recipe, the model shape, the per-epoch history with wall and CPU
    seconds, the final top-1 and the machine (threads, CPU, load average before/after).
    """
    import os

    from pyengine.io.atomic import write_json
    from pyengine.measure.timing import environment
    from pyengine.models.zoo import DIGITS_VIT, digits_vit
    model_kw = dict(model_kwargs or {})
    recipe = {**DIGITS_RECIPE, **(recipe or {})}
    load0 = os.getloadavg()
    seed_everything(recipe["seed"])
    model = digits_vit(**model_kw)
    t0, c0 = time.perf_counter(), time.process_time()
    rows = []

    def log(row):
        rows.append({**row, "wall_s": round(time.perf_counter() - t0, 2),
                     "cpu_s": round(time.process_time() - c0, 2)})
        print(json.dumps(rows[-1]), flush=True)

    _, history = train_digits(model, recipe, progress=False, log=log)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    result = {"task": "digits_recipe", "dense_top1": history[-1]["val_top1"],
              "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
              "epochs": recipe["epochs"], "recipe": recipe,
              "model": {**DIGITS_VIT, **model_kw,
                        "params": sum(p.numel() for p in model.parameters())},
              "history": rows, "machine": {**environment("cpu"), "loadavg_before": load0,
                                           "loadavg_after": os.getloadavg()}}
    print(json.dumps({k: v for k, v in result.items() if k != "history"}), flush=True)
    write_json(result, out, indent=1)
    return result
