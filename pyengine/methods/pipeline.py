"""The library side of ``pyengine prune``: method plug-ins, the budget projection, the pipeline.

Methods plug in by name (:data:`METHODS`, "module:function"); each function is

    prune_structure(model, teacher, train_loader, val_loader, args) -> nn.Module

and returns the model gated (``pyengine.gate``) with its final hard structure fixed. A method
module may define ``add_arguments(parser)`` for its own flags. :func:`project` turns per-unit
scores into a structure at a MAC target (ranked add/remove, feasibility, rounding); learned
and one-shot methods can both finish with it. :func:`run` is the whole pipeline: data, dense
model (checkpoint or trained with the digits recipe), method, compile, optional fine-tune
with distillation, evaluation, ``pyengine.save`` + ``metrics.json``.
"""
from __future__ import annotations

import copy
import importlib
import math
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from pyengine.io.atomic import write_bytes, write_json
from pyengine.cost.model import attn_macs, mlp_macs, total_macs
from pyengine.structure.spec import Block, Head, Spec

METHODS = {"hiap": "pyengine.methods.hiap:prune_structure", "sss": "pyengine.methods.sss:prune_structure",
           **{m: "pyengine.methods.oneshot:prune_structure"
              for m in ("agf", "taylor", "wanda", "ria", "magnitude", "random")}}

__all__ = ["METHODS", "method_module", "method_function", "available", "project",
           "allowed_counts", "load_checkpoint", "run"]


def method_module(method: str):
    """The module of ``method``, or None while it does not exist yet (only a missing module
    itself counts; an import error inside an existing module propagates)."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; known: {sorted(METHODS)}")
    name = METHODS[method].split(":")[0]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        return None


def method_function(method: str) -> Callable:
    mod = method_module(method)
    if mod is None:
        raise NotImplementedError(f"pruning method {method!r} is not available in this build "
                                  f"({METHODS[method].split(':')[0]} does not exist yet); "
                                  f"available: {available()}")
    return getattr(mod, METHODS[method].split(":")[1])


def available() -> list[str]:
    return sorted(m for m in METHODS if method_module(m) is not None)


# --------------------------------------------------------------------------------------
# Projection onto a MAC budget
# --------------------------------------------------------------------------------------


def allowed_counts(total: int, round_to: int | None, minimum: int = 0,
                   allow_zero: bool = True) -> list[int]:
    """Kept counts a group of ``total`` units may have: multiples of ``round_to`` (and
    ``total`` itself, and 0 if ``allow_zero``), at least ``minimum`` (0 aside)."""
    r = int(round_to) if round_to else 1
    if r < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    counts = set(range(r, total, r)) | {total}
    counts = {c for c in counts if c >= minimum}
    if allow_zero and minimum <= 0:
        counts.add(0)
    if not counts:
        counts = {total}
    return sorted(counts)


def _nearest(allowed: list[int], c: int) -> int:
    return min(allowed, key=lambda a: (abs(a - c), -a))


class _Layer:
    """Counts of one block during projection: heads on/off with their qk/v counts, FFN width.
    Units inside a group are kept in score order (top-k)."""

    def __init__(self, g, att: Mapping[str, torch.Tensor], mlp: Mapping[str, torch.Tensor],
                 threshold: float | None, opts: dict):
        H, Dh, M = g.num_heads, g.head_dim, g.mlp_hidden
        f = lambda t: t.detach().double().cpu()  # noqa: E731
        sa, sm = {k: f(v) for k, v in att.items()}, {k: f(v) for k, v in mlp.items()}
        for name, t, shape in (("attention head", sa["head"], (H,)), ("qk", sa["qk"], (H, Dh)),
                               ("v", sa["v"], (H, Dh)), ("neuron", sm["neuron"], (M,))):
            if tuple(t.shape) != shape:
                raise ValueError(f"scores for {name} have shape {tuple(t.shape)}, expected {shape}")
        # ranking: effective keep probability, macro * micro (sigmoid of logit-like scores)
        p = lambda t: torch.sigmoid(t)  # noqa: E731
        pb, pmb = float(p(sa["block"].reshape(()))), float(p(sm["block"].reshape(())))
        self.p_head = (pb * p(sa["head"])).tolist()
        self.qk_order = torch.argsort(sa["qk"], dim=-1, descending=True, stable=True).tolist()
        self.v_order = torch.argsort(sa["v"], dim=-1, descending=True, stable=True).tolist()
        self.n_order = torch.argsort(sm["neuron"], descending=True, stable=True).tolist()
        pqk = torch.sort(p(sa["qk"]), dim=-1, descending=True).values
        pv = torch.sort(p(sa["v"]), dim=-1, descending=True).values
        pn = torch.sort(p(sm["neuron"]), descending=True).values
        # prefix sums of sorted probabilities: mean probability of any step in O(1)
        z = lambda t: torch.cat([torch.zeros(t.shape[:-1] + (1,), dtype=t.dtype),  # noqa: E731
                                 t.cumsum(-1)], -1)
        self.cqk = (z(pqk) * torch.tensor(self.p_head, dtype=torch.float64)[:, None]).tolist()
        self.cv = (z(pv) * torch.tensor(self.p_head, dtype=torch.float64)[:, None]).tolist()
        self.cn = (z(pn) * pmb).tolist()
        self.qk_allowed, self.v_allowed = opts["qk_allowed"], opts["v_allowed"]
        self.n_allowed, self.min_heads = opts["n_allowed"], opts["min_heads"]
        if threshold is None:  # start from everything
            self.on = [True] * H
            self.kq, self.kv, self.m = [Dh] * H, [Dh] * H, M
        else:
            kq = (sa["qk"] > threshold).sum(-1).tolist()
            kv = (sa["v"] > threshold).sum(-1).tolist()
            battn = bool(sa["block"] > threshold)
            self.on = [battn and bool(sa["head"][h] > threshold) and kv[h] > 0 for h in range(H)]
            self.kq = [_nearest(self.qk_allowed, c) for c in kq]
            self.kv = [_nearest(self.v_allowed, c) for c in kv]
            m = int((sm["neuron"] > threshold).sum()) if bool(sm["block"] > threshold) else 0
            self.m = _nearest(self.n_allowed, m)
        # feasibility: enough heads (the most probable ones)
        need = self.min_heads - sum(self.on)
        for h in sorted(range(H), key=lambda h: -self.p_head[h]):
            if need <= 0:
                break
            if not self.on[h]:
                self.on[h], need = True, need - 1

    def spec_block(self) -> Block:
        heads = tuple(Head(h, tuple(sorted(self.qk_order[h][:self.kq[h]])),
                           tuple(sorted(self.v_order[h][:self.kv[h]])))
                      for h in range(len(self.on)) if self.on[h])
        return Block(heads, tuple(sorted(self.n_order[:self.m])))

    def macs(self, g) -> int:
        qk = [self.kq[h] for h in range(len(self.on)) if self.on[h]]
        v = [self.kv[h] for h in range(len(self.on)) if self.on[h]]
        return attn_macs(g, qk, v) + mlp_macs(g, self.m)

    def moves(self, remove: bool):
        """Yield (score, apply, undo): one step of one group, scored by the mean effective keep
        probability of the units it removes (or adds)."""
        def step(allowed, c, down):
            i = allowed.index(c)
            j = i - 1 if down else i + 1
            return allowed[j] if 0 <= j < len(allowed) else None

        def mean(cs, a, b):
            return (cs[b] - cs[a]) / (b - a) if b != a else 0.0

        m2 = step(self.n_allowed, self.m, remove)
        if m2 is not None:
            lo, hi = sorted((self.m, m2))
            old = self.m
            yield (mean(self.cn, lo, hi), lambda m2=m2: setattr(self, "m", m2),
                   lambda old=old: setattr(self, "m", old))
        n_on = sum(self.on)
        for h in range(len(self.on)):
            if self.on[h]:
                for counts, allowed, cum in ((self.kq, self.qk_allowed, self.cqk[h]),
                                             (self.kv, self.v_allowed, self.cv[h])):
                    c2 = step(allowed, counts[h], remove)
                    if c2 is not None:
                        lo, hi = sorted((counts[h], c2))
                        old = counts[h]

                        def do(counts=counts, h=h, c2=c2):
                            counts[h] = c2

                        def undo(counts=counts, h=h, old=old):
                            counts[h] = old
                        yield mean(cum, lo, hi), do, undo
            if self.on[h] == remove and (not remove or n_on > self.min_heads):
                def flip(h=h, v=not remove):
                    self.on[h] = v
                yield self.p_head[h], flip, (lambda h=h, v=remove: self.on.__setitem__(h, v))


def project(model: nn.Module, scores: Sequence[tuple[Mapping, Mapping]], target: float,
            tolerance: float = 0.03, min_heads: int = 1, min_head_dims: float = 0.0,
            min_ffn: float = 0.0, round_to: int | None = None,
            threshold: float | None = 0.0) -> Spec:
    """Choose the hard structure of gated ``model`` from per-unit ``scores`` (logit-like:
    larger keeps; ``sigmoid(score)`` is read as a keep probability), and apply it.

    ``scores``: per block ``(attn, mlp)`` dicts with the gate slots ({block, head, qk, v} and
    {block, neuron}). Start: units with score > ``threshold`` (None: everything), counts
    rounded to multiples of ``round_to``, at least ``min_heads`` heads per layer, at least
    ``min_head_dims`` of a kept head's qk and v dims, at least ``min_ffn`` of the FFN (0
    allows removing whole attention/FFN blocks). Then, while the MACs are outside
    ``target * dense * (1 +- tolerance)``, remove the step with the lowest mean effective keep
    probability (block * head * unit) that does not overshoot, or add the highest one.
    Returns the Spec (also applied to ``model`` with :func:`pyengine.apply`)."""
    from pyengine import api
    from pyengine.models.vit.adapter import geometry, model_name
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be a fraction of dense MACs in (0, 1], got {target!r}")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
    g = geometry(model)
    if len(scores) != g.depth:
        raise ValueError(f"scores for {len(scores)} blocks, the model has {g.depth}")
    if not 0 <= min_heads <= g.num_heads:
        raise ValueError(f"min_heads must be in [0, {g.num_heads}], got {min_heads!r}")
    for name, v in (("min_head_dims", min_head_dims), ("min_ffn", min_ffn)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} is a fraction in [0, 1], got {v!r}")
    Dh, M = g.head_dim, g.mlp_hidden
    dmin = max(1, math.ceil(min_head_dims * Dh - 1e-9))
    opts = {"qk_allowed": allowed_counts(Dh, round_to, dmin if min_head_dims > 0 else 0,
                                         allow_zero=min_head_dims == 0),
            "v_allowed": allowed_counts(Dh, round_to, dmin, allow_zero=False),
            "n_allowed": allowed_counts(M, round_to, math.ceil(min_ffn * M - 1e-9),
                                        allow_zero=min_ffn == 0),
            "min_heads": int(min_heads)}
    layers = [_Layer(g, a, m, threshold, opts) for a, m in scores]
    name = model_name(model)
    dense_spec = Spec.full(g, model=name)
    dense = total_macs(dense_spec)
    fixed = total_macs(Spec(tuple(Block() for _ in range(g.depth)), model=name, dense=g))
    goal = target * dense
    lo, hi = goal * (1 - tolerance), goal * (1 + tolerance)
    per = [lay.macs(g) for lay in layers]
    macs = fixed + sum(per)

    def layer_moves(i: int, remove: bool) -> list:
        """(score, MAC change, apply) of every single step in layer ``i``."""
        lay, out = layers[i], []
        for score, do, undo in lay.moves(remove):
            do()
            delta = lay.macs(g) - per[i]
            undo()
            # a step that changes nothing (qk dims of a head that attends uniformly anyway)
            # or moves the wrong way is no step
            if (delta < 0) if remove else (delta > 0):
                out.append((score, delta, do))
        return out

    cache: dict[tuple[int, bool], list] = {}
    while not lo <= macs <= hi:
        remove = macs > hi
        pick = closest = None
        for i in range(len(layers)):
            if (i, remove) not in cache:
                cache[(i, remove)] = layer_moves(i, remove)
            for score, delta, do in cache[(i, remove)]:
                new = macs + delta
                key = score if remove else -score
                # the best-ranked step that does not leave the band on the far side ...
                if (new >= lo if remove else new <= hi) and (pick is None or key < pick[0]):
                    pick = (key, i, do)
                # ... else the step that lands closest to the goal
                if closest is None or abs(new - goal) < closest[0]:
                    closest = (abs(new - goal), i, do)
        if pick is None:
            if closest is None or closest[0] >= abs(macs - goal):
                break  # nothing brings it closer: the constraints do not allow the target
            pick = closest
        _, i, do = pick
        do()
        per[i] = layers[i].macs(g)
        macs = fixed + sum(per)
        cache.pop((i, True), None)
        cache.pop((i, False), None)
    s = Spec(tuple(lay.spec_block() for lay in layers), model=name, dense=g)
    got = total_macs(s)
    assert got == macs, (got, macs)  # the ledger above and the cost model agree
    api.apply(model, s)
    return s


# --------------------------------------------------------------------------------------
# Checkpoints of the dense model
# --------------------------------------------------------------------------------------


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local checkpoint (safetensors, or a torch .pth/.pt/.bin read with
    ``weights_only=True``) into a timm ``model``; strict, with a clear error."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(p))
    else:
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickles with code are refused on purpose
            raise ValueError(f"cannot read checkpoint {p} with weights_only=True ({e}); convert "
                             "it to safetensors or a plain state_dict") from None
    for key in ("state_dict", "model", "model_state", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {p} does not hold a state_dict of tensors")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {p} does not fit the model: missing {sorted(missing)[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected "
                         f"{sorted(unexpected)[:8]}{'...' if len(unexpected) > 8 else ''}")
    return model


# --------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------


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


def build_model(args, num_classes: int) -> nn.Module:
    from pyengine.models import zoo
    from pyengine.models.vit.adapter import create_model
    kw = {"num_classes": num_classes}
    if getattr(args, "img_size", None):
        kw["img_size"] = args.img_size
    kw.update(getattr(args, "model_kwargs", None) or {})
    if args.model == "digits_vit":
        return zoo.digits_vit(**kw)
    import timm
    if timm.models.model_entrypoint(args.model.split(".")[0]).__module__ == "timm.models.resnet":
        # CNNs take any input size: it is a cost-model input, not a constructor argument
        size = kw.pop("img_size", None)
        model = create_model(args.model, **kw)
        if size:
            model.pyengine_img_size = size
        return model
    return create_model(args.model, **kw)


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


def row_printer(tag: str, progress: bool):
    """fit's ``log``: print each epoch row when there is no progress bar (which shows it)."""
    if progress:
        return None

    def show(row: dict) -> None:
        print(f"[{tag}] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in row.items()), flush=True)
    return show


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(args, log: Callable[[str], None] = print) -> dict:
    """The whole ``pyengine prune`` job; returns metrics (and writes ``args.out``)."""
    from pyengine import api
    from pyengine.api import save
    from pyengine.cost.model import cost
    from pyengine.train.data import loaders
    from pyengine.train.trainer import evaluate, fit

    t_start = time.perf_counter()
    fn = method_function(args.method)  # fail before any training
    if not 0.0 < args.target <= 1.0:
        raise ValueError(f"--target is a fraction of dense MACs in (0, 1], got {args.target!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    recipe = {**digits_recipe(), **(getattr(args, "recipe", None) or {})}
    if args.img_size is None and args.data == "digits":
        args.img_size = recipe["img_size"]
    from pyengine.train import distributed as dist
    distributed = dist.launched() or dist.is_initialized()  # torchrun: each rank its shard
    if distributed:
        dist.init(args.device)
        if not dist.is_main():
            log = lambda text: None  # noqa: E731 - one rank speaks
    train_loader, val_loader, n_classes = loaders(args.data, args.img_size or 224,
                                                  args.batch_size, args.workers, args.seed,
                                                  distributed=distributed,
                                                  augment=args.augment)
    model = build_model(args, n_classes).to(args.device)
    times: dict[str, float] = {}

    # ---- the dense model: a checkpoint, a previous run's (resume), or trained here
    dense_file = out / "checkpoints" / "dense.safetensors"
    t0 = time.perf_counter()
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
        log(f"dense model: {args.model} from {args.checkpoint}")
    elif args.resume and dense_file.is_file():
        load_checkpoint(model, dense_file)
        log(f"dense model: resumed from {dense_file}")
    else:
        if args.dense_epochs is not None:
            recipe["epochs"] = args.dense_epochs
        if args.data != "digits" and args.dense_epochs is None:
            raise ValueError("no --checkpoint: give the dense weights with --checkpoint FILE "
                             "or train them here with --dense-epochs N")
        shown = {k: v for k, v in recipe.items()
                 if k not in ("img_size", "batch_size", "seed", "augment")}
        log(f"dense model: training {args.model} at {args.img_size}px, batch {args.batch_size}, "
            f"augment={args.augment}, with the digits recipe {shown}")
        fit(model, train_loader, val_loader, **recipe_fit_kwargs(recipe, len(train_loader)),
            seed=args.seed, device=args.device, amp=args.amp, progress=args.progress,
            log=row_printer("dense", args.progress),
            checkpoint_dir=str(out / "checkpoints" / "dense"), resume=args.resume)
        from safetensors.torch import save as st_save
        if dist.is_main():
            dense_file.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(dense_file, st_save(
                {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}))
    times["dense_s"] = time.perf_counter() - t0
    model.eval()
    dense_top1 = evaluate(model, val_loader, args.device)
    dense_cost = cost(model)
    dense_params = _params(model)
    log(f"dense top-1 {dense_top1:.2f}%  GMACs {dense_cost.macs / 1e9:.4f}  "
        f"params {dense_cost.params / 1e6:.3f}M")
    dense = copy.deepcopy(model).eval()
    for p in dense.parameters():
        p.requires_grad_(False)
    teacher = dense if args.kd_alpha > 0 else None

    # ---- the method learns / scores the structure and fixes it
    t0 = time.perf_counter()
    gated = fn(model, teacher, train_loader, val_loader, args)
    times["method_s"] = time.perf_counter() - t0
    gated.eval()
    pruned_top1_before = evaluate(gated, val_loader, args.device)
    log(f"{args.method}: structure fixed, top-1 {pruned_top1_before:.2f}% (hard-gated, before "
        f"fine-tuning)")

    # ---- optional fine-tuning with the structure fixed, distilled from the dense model. The
    # gated model is trained (its gates are frozen masks), so the compact model compiled
    # afterwards is exactly the operator that was fine-tuned.
    t0 = time.perf_counter()
    if args.finetune and args.finetune > 0:
        for attn, mlp in api._gated_blocks(gated):  # the structure is fixed: gates rest
            for gp in (*attn.gates.parameters(), *mlp.gates.parameters()):
                gp.requires_grad_(False)
        gated.train()
        fit(gated, train_loader, val_loader, epochs=args.finetune,
            lr=args.finetune_lr or args.lr, weight_decay=args.weight_decay, teacher=teacher,
            kd_alpha=args.kd_alpha, kd_temperature=args.kd_temperature, seed=args.seed,
            device=args.device, amp=args.amp, progress=args.progress,
            warmup_steps=args.warmup_steps, grad_clip=args.grad_clip,
            log=row_printer("finetune", args.progress),
            checkpoint_dir=str(out / "checkpoints" / "finetune"), resume=args.resume)
        gated.eval()
    times["finetune_s"] = time.perf_counter() - t0
    s = api.spec(gated)
    compact = api.compile(gated).eval()
    max_abs_diff = compact_vs_gated(gated, compact, val_loader, args.device)
    log(f"compiled: compact vs hard-gated max |diff| {max_abs_diff:.2e} on validation images")
    pruned_top1 = evaluate(compact, val_loader, args.device)
    pc = cost(compact)
    times["total_s"] = time.perf_counter() - t_start
    metrics = {
        "method": args.method, "model": args.model, "data": args.data, "target": args.target,
        "dense_top1": dense_top1, "pruned_top1": pruned_top1,
        "pruned_top1_before_finetune": pruned_top1_before,
        "dense_macs": dense_cost.macs, "pruned_macs": pc.macs,
        "macs_ratio": pc.macs / dense_cost.macs,
        "dense_params": dense_params, "pruned_params": _params(compact),
        "epochs": args.epochs, "finetune_epochs": args.finetune or 0,
        "max_abs_diff": max_abs_diff,
        "heads_kept": sum(len(getattr(b, "heads", ())) for b in s.blocks),
        "seed": args.seed, "device": str(args.device), "times": times,
    }
    if dist.is_main():  # every rank holds the same model; one writes it
        save(compact, out)
        write_json(metrics, out / "metrics.json")
    log(f"pruned top-1 {pruned_top1:.2f}% (dense {dense_top1:.2f}%), MAC ratio "
        f"{metrics['macs_ratio']:.4f} (target {args.target}), wrote {out}/")
    return {"metrics": metrics, "compact": compact, "gated": gated, "dense": dense,
            "spec": s, "val_loader": val_loader, "train_loader": train_loader}
