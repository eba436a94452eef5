"""SSS: Sparse Structure Selection (Huang & Wang, ECCV 2018) for timm ViTs and ResNets.

A scale factor (init 1) multiplies each prunable structure: heads, FFN neurons and whole
attention/FFN blocks of a ViT (the gate slots of :mod:`pyengine.gated`); the inner conv
channels of each ResNet block and one factor per residual block on the branch output before
the add (:mod:`pyengine.resnet`). The weights train with the user's optimizer through
:func:`pyengine.train.fit`; the factors train with :class:`pyengine.optim.APG` under
``gamma * ||factors||_1`` (handled by the prox step only, never added to the loss). Factors the
prox sets to exactly zero are removed: the hard structure is ``factor != 0``, and compile
folds the surviving factor values into the weights. In a ResNet the BatchNorms that read
scaled channels train on their running statistics (see :func:`frozen_norms`): batch
statistics would cancel a common scale of a block's channel factors and let them all
collapse to zero together.

``--gamma G`` runs plain SSS: the structure is whatever the one training pass zeroes.
Without ``--gamma`` (target mode, ``--target`` of the dense MACs) gamma is set from the run
length (a factor the loss does not defend reaches 0 at half of ``--prune-at``) and the
structure of exact zeros is costed every 1% of the pass; it is fixed as soon as it is within
the target (or, at ``--prune-at``, by a final global threshold on ``|factor|`` with the
exact zeros going first), and the rest of the pass trains that fixed structure
(:class:`SSSController`).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from pyengine.methods.apg import APG
from pyengine.methods.base import Method, MethodContext, register_method
from pyengine.structure.gates import Gates, register_gates

__all__ = ["ScaleGates", "scale_factors", "SSS",
           "threshold_to_target", "structure_macs", "SSSController", "frozen_norms"]

LEARNED_SLOTS = ("block", "head", "neuron", "conv1", "conv2", "mlp", "mid")


@register_gates("sss")
class ScaleGates(Gates):
    """Deterministic scale factors, one per unit of each slot, initialised to ``init``.

    The slots in :data:`LEARNED_SLOTS` are parameters (heads, neurons, blocks, conv
    channels); q/k and value dims stay fixed ones (buffers) unless ``dims=True``.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dims: bool = False,
                 init: float = 1.0):
        super().__init__(shapes)
        self.learned = tuple(k for k in self.shapes
                             if k in LEARNED_SLOTS or (dims and k in ("qk", "v")))
        for name, shape in self.shapes.items():
            t = torch.full(shape, float(init))
            if name in self.learned:
                self.register_parameter(name, nn.Parameter(t))
            else:
                self.register_buffer(name, t)

    @torch.no_grad()
    def set_hard(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Zero the factors outside ``masks``; kept units keep their learned scale (a kept
        unit whose factor was exactly 0 restarts at 1)."""
        for name, m in masks.items():
            t = getattr(self, name)
            if tuple(m.shape) != tuple(t.shape):
                raise ValueError(f"gate slot {name!r}: mask shape {tuple(m.shape)} != "
                                 f"{tuple(t.shape)}")
            m = m.to(device=t.device, dtype=torch.bool)
            t.copy_(torch.where(m, torch.where(t != 0, t, torch.ones_like(t)),
                                torch.zeros_like(t)))


def scale_factors(model: nn.Module) -> list[nn.Parameter]:
    """The learned SSS factors of a model gated with ``method="sss"``."""
    out = [getattr(m, k) for m in model.modules() if isinstance(m, ScaleGates)
           for k in m.learned]
    if not out:
        raise ValueError("model has no SSS scale factors: pyengine.gate(model, method='sss')")
    return out


def structure_macs(model: nn.Module, img_size: int | None = None) -> int:
    """MACs (per image) of the current hard structure of a gated model."""
    from pyengine.api import spec
    from pyengine.cost import cost
    s = spec(model)
    return cost(s).macs if img_size is None else cost(s, img_size=img_size).macs


# ---- target mode ----------------------------------------------------------------------------

def frozen_norms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorms that directly read SSS-scaled channels (a ResNet block's conv2->bn2, and
    conv3->bn3 of a Bottleneck). With batch statistics they would undo any common scale of
    the channel factors before them, so L1 could shrink all of a block's factors together at
    no cost to the loss until they collapse to zero at once; SSS trains them on their running
    statistics (eval mode) instead, which makes every factor's scale matter."""
    from pyengine.models.cnn.family import PrunableBlock
    from pyengine.models.resnet.blocks import GatedResBlock
    out = []
    for m in model.modules():
        if isinstance(m, GatedResBlock) and isinstance(m.gates, ScaleGates):
            out.append(m.bn2)
            if m.kind == "bottleneck":
                out.append(m.bn3)
        elif isinstance(m, PrunableBlock) and isinstance(m.gates, ScaleGates):
            out += m.frozen_norms()  # ConvNeXt, EfficientNet, RegNet blocks
    return out


class SSSController:
    """Drives APG from ``fit``'s ``on_step`` hook (called before each forward): it steps APG
    with the gradient the previous step left on the factors (the look-ahead point has not
    moved since, so this is exactly APG's step).

    Target mode (``target`` set): every ``check_every`` steps the structure of the APG
    iterate (its exact zeros) is costed. Once the prox zeros alone bring the MACs within
    ``[target * (1 - tolerance), target]`` the structure is frozen (removed units stay at 0,
    gamma becomes 0, the rest keeps training). If a check overshoots below that band (many
    factors reached zero together), the iterate of the previous check is restored and
    thresholded to the target instead. At ``prune_at`` of the run, if the target is not
    reached yet, the smallest ``|factor|`` are removed by one global threshold (exact zeros
    go first) and the structure is frozen, leaving the rest of the pass to recover.
    """

    def __init__(self, model: nn.Module, apg: APG, dense_macs: int, target: float | None,
                 img_size: int | None = None, prune_at: float = 0.5, check_every: int = 5,
                 tolerance: float = 0.03, log=print, measure=None):
        if not 0.0 < prune_at <= 1.0:
            raise ValueError(f"sss: prune_at must be in (0, 1], got {prune_at!r}")
        self.model, self.apg, self.dense_macs = model, apg, dense_macs
        # the budget's cost of the current structure (default MACs; a latency budget: ms, and
        # dense_macs is then the dense model's predicted ms)
        self.measure = measure or (lambda m: structure_macs(m, img_size))
        self.unit = getattr(measure, "unit", "MAC")  # what the logged ratio is of
        self.target, self.img_size, self.prune_at = target, img_size, prune_at
        self.check_every, self.tolerance, self.log = max(1, check_every), tolerance, log
        self.masks: list[torch.Tensor] | None = None  # set once frozen
        self.snapshot: list[torch.Tensor] | None = None
        self.history: list[dict] = []
        self.event: dict | None = None
        self.steps = 0
        self.frozen_bn = frozen_norms(model)

    def __call__(self, step: int, total: int) -> None:
        for bn in self.frozen_bn:  # fit puts the model in train mode each epoch
            bn.eval()
        if step > 0:
            self.apg_step()
        if self.target is None or self.masks is not None:
            return
        due = step >= int(self.prune_at * total)
        if step % self.check_every and not due:
            return
        ratio = self.ratio()
        self.history.append({"step": step, "macs_ratio": ratio,
                             "zeros": sum(int((z == 0).sum()) for z in self._iterates())})
        if self.target * (1 - self.tolerance) <= ratio <= self.target:
            self.freeze(step, "prox zeros", ratio)
        elif ratio < self.target and self.snapshot is not None:
            self.prune(step, self.snapshot, "overshoot: previous check's iterate thresholded")
        elif ratio < self.target:
            self.freeze(step, "prox zeros (first check)", ratio)
        elif due:
            self.prune(step, self._iterates(), f"{self.prune_at:.0%} of the pass: threshold")
        else:
            self.snapshot = [z.detach().clone() for z in self._iterates()]

    def _iterates(self) -> list[torch.Tensor]:
        return [self.apg.state.get(p, {}).get("prox", p) for p in self._params()]

    @torch.no_grad()
    def prune(self, step: int, values: list[torch.Tensor], why: str) -> None:
        values = [v.clone() for v in values]
        for p, v in zip(self._params(), values):
            p.copy_(v)
            st = self.apg.state.get(p, {})
            st.pop("prox", None)
            if "momentum_buffer" in st:
                st["momentum_buffer"].zero_()
        t = threshold_to_target(self.model, self.target, self.dense_macs, self.img_size,
                                measure=self.measure)
        for p in self._params():
            self.apg.state[p]["prox"] = p.detach().clone()
        ratio = self.measure(self.model) / self.dense_macs
        self.freeze(step, f"{why} |factor| < {t:.4g}", ratio)

    @torch.no_grad()
    def freeze(self, step: int, why: str, ratio: float) -> None:
        self.masks = [(z != 0).to(z.dtype) for z in self._iterates()]
        for g in self.apg.param_groups:
            g["gamma"] = 0.0
        self.event = {"step": step, "why": why, "macs_ratio": ratio,
                      "zeros": sum(int((m == 0).sum()) for m in self.masks)}
        self.log(f"sss: structure fixed at step {step} ({why}): {self.unit} ratio {ratio:.4f}, "
                 f"{self.event['zeros']} factors zero; the rest keeps training with gamma 0")

    @torch.no_grad()
    def apg_step(self) -> None:
        if all(p.grad is None for g in self.apg.param_groups for p in g["params"]):
            return
        self.apg.step()
        self.apg.zero_grad(set_to_none=True)
        self.steps += 1
        if self.masks is not None:
            for p, m in zip(self._params(), self.masks):
                p.mul_(m)
                st = self.apg.state.get(p, {})
                for k in ("prox", "momentum_buffer"):
                    if k in st:
                        st[k].mul_(m)

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.apg.param_groups for p in g["params"]]

    @contextlib.contextmanager
    def iterate(self):
        """Temporarily put the APG iterate ``z`` (exact zeros) into the factors."""
        saved = [p.detach().clone() for p in self._params()]
        with torch.no_grad():
            for p in self._params():
                z = self.apg.state.get(p, {}).get("prox")
                if z is not None:
                    p.copy_(z)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self._params(), saved):
                    p.copy_(s)

    def ratio(self) -> float:
        with self.iterate():
            return self.measure(self.model) / self.dense_macs

    def finish(self) -> None:
        """The last step's gradient, then the iterate into the factors."""
        self.apg_step()
        self.apg.finalize()
        if self.masks is not None:
            with torch.no_grad():
                for p, m in zip(self._params(), self.masks):
                    p.mul_(m)


@torch.no_grad()
def threshold_to_target(model: nn.Module, target: float, dense_macs: int,
                        img_size: int | None = None, measure=None) -> float:
    """Zero the smallest ``|factor|`` (one global threshold, :func:`pyengine.structure.solver.
    threshold`) until the structure's MACs are <= ``target * dense_macs``."""
    from pyengine.structure.solver import threshold
    return threshold(model, scale_factors(model), target, dense_macs,
                     measure or (lambda m: structure_macs(m, img_size)))


# ---- the method ----------------------------------------------------------------------------

@register_method("sss")
class SSS(Method):
    """Gate ``model`` with SSS factors, train weights (``fit``) and factors (APG) in one pass,
    and return the gated model with its final hard structure (factor != 0)."""

    @dataclass
    class Config:
        gamma: float | None = field(default=None, metadata={
            "help": "L1 strength on the scale factors: plain SSS, the structure is what the "
                    "prox zeroes (default: target mode, gamma tuned to reach --target)"})
        target_gamma: float | None = field(default=None, metadata={
            "help": "target mode: gamma of the pass (default: auto, so that a factor without "
                    "gradient support reaches 0 at half of --prune-at of the pass)"})
        prune_at: float = field(default=0.5, metadata={
            "help": "target mode: fraction of the pass at which the structure is fixed by a "
                    "final threshold if the prox zeros have not reached --target (default 0.5)"})
        apg_lr: float = field(default=0.05, metadata={"help": "APG step size (default 0.05)"})
        apg_momentum: float = 0.9
        sss_nonneg: bool = field(default=True, metadata={
            "flag": "--sss-signed", "action": "store_false",
            "help": "allow negative factors (default: non-negative, as SSS's reference)"})
        sss_dims: bool = field(default=False, metadata={
            "help": "also learn a factor per q/k and value dim of each head (ViT)"})

    def check(self, config: "SSS.Config", ctx: MethodContext) -> None:
        if ctx.training.amp == "fp16":
            raise ValueError("sss: --amp fp16 scales the gradients of the factors too (APG steps "
                             "outside the grad scaler); use --amp bf16")
        if not 0.0 < config.prune_at <= 1.0:
            raise ValueError(f"sss: prune_at must be in (0, 1], got {config.prune_at!r}")
        for name in ("gamma", "target_gamma"):
            v = getattr(config, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ValueError(f"sss: {name} must be a finite number >= 0, got {v!r}")
        if not (config.apg_lr > 0 and math.isfinite(config.apg_lr)):
            raise ValueError(f"sss: apg_lr must be a finite number > 0, got {config.apg_lr!r}")
        if not 0.0 <= config.apg_momentum < 1.0:
            raise ValueError(f"sss: apg_momentum must be in [0, 1), got {config.apg_momentum!r}")

    def prune(self, model: nn.Module, config: "SSS.Config", ctx: MethodContext) -> nn.Module:
        from pyengine.api import gate
        from pyengine.train.trainer import default_param_groups, fit

        self.check(config, ctx)
        latency = ctx.latency_model(model)  # None: the budget is in MACs
        b, t, log = ctx.budget, ctx.training, ctx.log
        if ctx.img_size:
            model.pyengine_img_size = int(ctx.img_size)  # the cost model's input for CNNs
        gate(model, method="sss", dims=bool(config.sss_dims))
        model.to(t.device)
        if latency is not None:  # the budget's unit: predicted ms of the structure
            from pyengine.api import spec as spec_of

            def measure(m):
                return latency.spec_ms(spec_of(m))
            measure.unit = "predicted latency"
        else:
            def measure(m):
                return structure_macs(m)
            measure.unit = "MAC"
        dense_macs = measure(model)
        gamma = config.gamma
        target = None if gamma is not None else float(b.target)
        factors = scale_factors(model)
        ids = {id(p) for p in factors}
        wd = float(t.weight_decay)
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in ids]}
                  for g in default_param_groups(model, wd)]
        groups = [g for g in groups if g["params"]]
        steps = max(1, int(t.epochs) * len(ctx.train_loader))
        lr_f, mu = float(config.apg_lr), float(config.apg_momentum)
        prune_at = float(config.prune_at)
        if gamma is None:
            # the L1 pull per step is lr*gamma, about lr*gamma/(1-mu) once momentum builds up:
            # a factor the loss does not defend goes from 1 to exactly 0 in half of prune_at, so
            # the prox itself finds zeros well before the threshold fallback
            gamma = config.target_gamma or 2 * (1 - mu) / (lr_f * prune_at * steps)
        apg = APG(factors, lr=lr_f, gamma=float(gamma), momentum=mu,
                  nonneg=bool(config.sss_nonneg))
        log(f"sss: {sum(f.numel() for f in factors)} scale factors on APG (lr {lr_f}, gamma "
            f"{float(gamma):.4g}, momentum {mu}); "
            + (f"target mode, {target} of dense MACs" if target is not None else "plain SSS"))
        ctl = SSSController(model, apg, dense_macs, target, prune_at=prune_at,
                            check_every=max(1, steps // 100), tolerance=float(b.tolerance),
                            log=log, measure=measure)
        if b.round_to:
            log("sss: --round-to is not applied (SSS keeps what the prox leaves)")
        fit(model, ctx.train_loader, ctx.val_loader, epochs=int(t.epochs), lr=float(t.lr),
            weight_decay=wd, param_groups=groups, grad_clip=t.grad_clip, amp=t.amp,
            teacher=ctx.teacher, kd_alpha=float(t.kd_alpha),
            kd_temperature=float(t.kd_temperature), on_step=ctl, extra_state={"apg": apg},
            checkpoint_dir=ctx.checkpoint_dir("sss"), resume=bool(t.resume), run=ctx.run,
            seed=int(t.seed), device=t.device, progress=bool(t.progress),
            warmup_steps=int(t.warmup_steps),
            log=lambda row: log("sss epoch " + " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())))
        ctl.finish()
        model.eval()
        ratio = measure(model) / dense_macs
        zeros = sum(int((p == 0).sum()) for p in factors)
        log(f"sss: one pass done, {zeros}/{sum(p.numel() for p in factors)} factors exactly "
            f"zero, {measure.unit} ratio {ratio:.4f}")
        if target is not None and ratio > target * (1 + float(b.tolerance)):
            thr = threshold_to_target(model, target, dense_macs, measure=measure)
            ratio = measure(model) / dense_macs
            log(f"sss: final threshold |factor| < {thr:.4g} -> {measure.unit} ratio {ratio:.4f}")
        model.pyengine_sss = {"dense_macs": dense_macs, "macs_ratio": ratio,
                              "gamma": float(gamma), "zero_factors": zeros, "fixed": ctl.event,
                              "history": ctl.history}
        return model
