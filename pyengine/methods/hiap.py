"""HiAP: hierarchical Gumbel-Sigmoid gates learned against an expected-MAC budget.

Every gate slot (attention ``block``, ``head`` [H], ``qk`` [H, Dh], ``v`` [H, Dh]; FFN
``block``, ``neuron`` [M]) gets a logit ``alpha``. In training a gate is sampled

    z = sigmoid((alpha + eps) / tau),  eps ~ Logistic(0, 1),  hard = 1[z > 0.5]

and the forward uses ``hard`` while the backward goes through ``z`` (straight-through). The
hard sample is 1 with probability ``sigmoid(alpha)`` whatever ``tau`` is, so the expected cost
of the sampled structure is a function of ``sigmoid(alpha)`` alone (see
:mod:`pyengine.expected_cost`); ``tau`` only shapes the gradient and is annealed
exponentially (2.0 -> 0.5 by default) by :class:`TemperatureSchedule`. In eval and at export
the gates are deterministic: ``sigmoid(alpha) > 0.5``. Macro (block, head) and micro (q/k dim,
v dim, neuron) gates multiply, so a head's effective gate is macro * micro, with the hard
semantics of :func:`pyengine.gates._consistent` in training, eval and :func:`pyengine.spec`.

    pyengine.gate(model, method="hiap")
    loss = HiAPLoss(target=0.5)                        # extra_loss for pyengine.train.fit
    fit(model, ..., extra_loss=loss, on_step=TemperatureSchedule(model), teacher=dense)
    finalize(model, target=0.5)                        # hard structure within +-3% of target
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from pyengine.methods.base import (Method, MethodContext, register_method,
                                   require_expected_latency)
from pyengine.structure.gates import Gates, _consistent, register_gates

__all__ = ["HiAPGates", "TemperatureSchedule", "HiAPLoss", "hiap_gates", "gate_parameters",
           "finalize", "HiAP", "logistic_noise"]

MACRO = ("block", "head")


def logistic_noise(shape, device=None, dtype=torch.float32,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """eps = log(u) - log(1 - u), u ~ U(0, 1): P(alpha + eps > 0) = sigmoid(alpha)."""
    u = torch.rand(shape, device=device, dtype=dtype, generator=generator)
    u = u.clamp(torch.finfo(dtype).tiny, 1.0 - torch.finfo(dtype).eps)
    return torch.log(u) - torch.log1p(-u)


@register_gates("hiap")
class HiAPGates(Gates):
    """Learned gates: logits per slot (``self.logits[slot]``), Gumbel-Sigmoid straight-through
    samples in training, ``sigmoid(alpha) > 0.5`` in eval. :meth:`set_hard` (what
    ``pyengine.apply`` calls) fixes a structure; :meth:`release` returns to learning."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], init: float = 3.0,
                 tau: float = 2.0):
        super().__init__(shapes)
        if not math.isfinite(init):
            raise ValueError(f"hiap gate init logit must be finite, got {init!r}")
        if not tau > 0:
            raise ValueError(f"hiap temperature must be > 0, got {tau!r}")
        self.logits = nn.ParameterDict(
            {k: nn.Parameter(torch.full(v, float(init))) for k, v in self.shapes.items()})
        self.tau = float(tau)
        for k, v in self.shapes.items():
            self.register_buffer(f"fixed_{k}", torch.ones(v))
        # a 0-dim bool buffer, so a fixed structure survives state_dict / checkpoints, and a
        # python mirror read in the forward (no device sync per call on a GPU)
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self._frozen = False

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._frozen = bool(self.frozen)

    # ---- probabilities and samples ------------------------------------------------------
    def probs(self) -> dict[str, torch.Tensor]:
        """Keep probabilities ``sigmoid(alpha)`` per slot (raw, before consistency)."""
        return {k: torch.sigmoid(a) for k, a in self.logits.items()}

    def sample(self) -> dict[str, torch.Tensor]:
        """Straight-through Gumbel-Sigmoid: values exactly 0/1, gradient of the soft sample."""
        out = {}
        for k, a in self.logits.items():
            z = torch.sigmoid((a + logistic_noise(a.shape, a.device, a.dtype)) / self.tau)
            hard = (z > 0.5).to(z.dtype)
            out[k] = hard + (z - z.detach())
        return out

    def _fixed(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, f"fixed_{k}") for k in self.shapes}

    def _deterministic(self) -> dict[str, torch.Tensor]:
        return {k: (a > 0).to(a.dtype) for k, a in self.logits.items()}

    def values(self) -> dict[str, torch.Tensor]:
        if self._frozen:
            return _consistent(self._fixed())
        if self.training:
            return _consistent(self.sample())
        return _consistent(self._deterministic())

    def hard(self) -> dict[str, torch.Tensor]:
        raw = self._fixed() if self._frozen else self._deterministic()
        return {k: v.detach() != 0 for k, v in _consistent(raw).items()}

    @torch.no_grad()
    def set_hard(self, masks: Mapping[str, torch.Tensor]) -> None:
        for name, m in masks.items():
            if name not in self.shapes:
                raise ValueError(f"unknown gate slot {name!r}; slots: {sorted(self.shapes)}")
            buf = getattr(self, f"fixed_{name}")
            if tuple(m.shape) != tuple(buf.shape):
                raise ValueError(f"gate slot {name!r}: mask shape {tuple(m.shape)} != "
                                 f"{tuple(buf.shape)}")
            buf.copy_(m.to(buf.dtype))
        self.frozen.fill_(True)
        self._frozen = True

    @torch.no_grad()
    def release(self) -> None:
        """Back to learned gates (the logits decide again)."""
        self.frozen.fill_(False)
        self._frozen = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tau={self.tau:.3g}"


def hiap_gates(model: nn.Module) -> list[tuple[HiAPGates, HiAPGates]]:
    """``[(attention gates, FFN gates)]`` per block of a model gated with ``method="hiap"``
    (any transformer family: its adapter's gate sets, attention and FFN block by block)."""
    from pyengine.models import adapter_for
    a = adapter_for(model)
    if not a.is_gated(model):
        raise ValueError("model has no gated blocks; call pyengine.gate(model, method='hiap')")
    sets = a.gate_sets(model)
    for i, gs in enumerate(sets):
        if not isinstance(gs, HiAPGates):
            raise ValueError(f"gate set {i} ({type(gs).__name__}) is not a HiAP gate set; call "
                             "pyengine.gate(model, method='hiap') first")
    if len(sets) % 2 or any("head" not in sets[i].shapes for i in range(0, len(sets), 2)):
        raise ValueError(f"HiAP pairs the attention and FFN gates of transformer blocks; the "
                         f"{a.name} family's gate sets are not such pairs")
    return list(zip(sets[0::2], sets[1::2]))


def hiap_gate_sets(model: nn.Module) -> list[HiAPGates]:
    """Every HiAP gate set of a gated model of any family, in its adapter's ``gate_sets``
    order (a ViT: attention and FFN gates of each block in turn, as :func:`hiap_gates`)."""
    from pyengine.api import gate_sets
    sets = gate_sets(model)
    if not sets or not all(isinstance(g, HiAPGates) for g in sets):
        raise ValueError("model is not gated with HiAP gates; call "
                         "pyengine.gate(model, method='hiap') first")
    return sets


def _has_heads(sets: list[HiAPGates]) -> bool:
    # (attention, FFN) gate pairs of a ViT: the head / dim / FFN feasibility terms apply
    return any("head" in g.shapes for g in sets)


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The gate logits of ``model`` (their own optimizer group: higher lr, no weight decay)."""
    return [p for g in hiap_gate_sets(model) for p in g.logits.values()]


class TemperatureSchedule:
    """Exponential annealing ``tau(s) = start * (end / start) ** (s / (total - 1))``.

    Call it as fit's ``on_step(step, total)``: it sets the temperature of every HiAP gate of
    ``model`` (``model`` may be None to use it only as a function of the step)."""

    def __init__(self, model: nn.Module | None = None, start: float = 2.0, end: float = 0.5):
        if not (start > 0 and end > 0):
            raise ValueError(f"temperatures must be > 0, got start={start!r}, end={end!r}")
        self.model, self.start, self.end = model, float(start), float(end)
        self.tau = self.start

    def value(self, step: int, total: int) -> float:
        frac = min(max(step, 0), max(total - 1, 1)) / max(total - 1, 1)
        return self.start * (self.end / self.start) ** frac

    def __call__(self, step: int, total: int) -> float:
        self.tau = self.value(step, total)
        if self.model is not None:
            for g in hiap_gate_sets(self.model):
                g.tau = self.tau
        return self.tau


def _scale_grad(x: torch.Tensor, w: float) -> torch.Tensor:
    """``x`` in the forward, ``w * grad`` in the backward."""
    return x if w == 1.0 else x * w + x.detach() * (1.0 - w)


class HiAPLoss:
    """The HiAP terms added to CE (+ KD, which fit adds from its teacher):

    * budget: ``budget_weight * (E[MACs] / dense MACs - target)^2`` with the gradient into
      macro gates (blocks, heads) scaled by ``macro_weight`` and into micro gates by
      ``micro_weight`` (HiAP's lambda_macro : lambda_micro = 2 : 1);
    * feasibility (``feasibility_weight`` times): per layer ``ReLU(min_heads - E[#heads])^2``,
      per head ``ReLU(min_head_dims - E[kept fraction of qk dims])^2`` and the same for v dims,
      per layer ``ReLU(min_ffn - E[kept FFN fraction])^2``. 0 turns a constraint off (whole
      attention or FFN blocks may then go).

    Call signature is fit's ``extra_loss(model, logits, x, y, step)``; returns ``(loss, stats)``.
    """

    def __init__(self, target: float, budget_weight: float = 20.0, macro_weight: float = 2.0,
                 micro_weight: float = 1.0, min_heads: int = 1, min_head_dims: float = 0.0,
                 min_ffn: float = 0.0, feasibility_weight: float = 1.0, latency=None):
        if not 0.0 < target <= 1.0:
            raise ValueError(f"target must be a fraction of the dense cost in (0, 1], got "
                             f"{target!r}")
        # budget "latency": a LatencyModel (cost/latency.py); the budget term is then on the
        # expected predicted ms instead of the expected MACs
        self.latency = latency
        for name, v in (("min_head_dims", min_head_dims), ("min_ffn", min_ffn)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} is a fraction in [0, 1], got {v!r}")
        if min_heads < 0:
            raise ValueError(f"min_heads must be >= 0, got {min_heads!r}")
        self.target = float(target)
        self.budget_weight = float(budget_weight)
        self.feasibility_weight = float(feasibility_weight)
        self.macro_weight, self.micro_weight = float(macro_weight), float(micro_weight)
        self.min_heads = int(min_heads)
        self.min_head_dims, self.min_ffn = float(min_head_dims), float(min_ffn)
        self._dense: dict[int, float] = {}

    def stacked(self, model: nn.Module) -> tuple[dict, dict]:
        """Keep probabilities stacked over blocks ({slot: [L, ...]}), for few big kernels."""
        from pyengine.cost.expected import stack_probs
        return stack_probs([(a.probs(), m.probs()) for a, m in hiap_gates(model)])

    def feasibility(self, model: nn.Module, stacked: tuple[dict, dict] | None = None,
                    probs: list | None = None) -> torch.Tensor:
        """The feasibility penalty; ``probs``: keep probabilities per gate set (attention, FFN,
        block by block; default: the gates' own). Blocks of one shape are stacked (few big
        kernels); blocks of different shapes (Swin's stages) are summed one by one."""
        if stacked is None:
            if probs is None:
                probs = [gs.probs() for pair in hiap_gates(model) for gs in pair]
            pairs = list(zip(probs[0::2], probs[1::2]))
            if _stackable(pairs):
                from pyengine.cost.expected import stack_probs
                stacked = stack_probs(pairs)
            else:
                return sum(self._feasibility(pa, pm) for pa, pm in pairs)
        pa, pm = stacked
        return self._feasibility({**pa, "block": pa["block"][:, None]},
                                 {**pm, "block": pm["block"][:, None]})

    def _feasibility(self, pa: dict, pm: dict) -> torch.Tensor:
        # per block (or stacked blocks: a leading block axis, block gates [L, 1])
        total = pa["head"].new_zeros(())
        if self.min_heads > 0:  # per layer: expected kept heads
            heads = (pa["block"] * pa["head"]).sum(-1)
            total = total + (torch.relu(self.min_heads - heads) ** 2).sum()
        if self.min_head_dims > 0:  # per head: expected kept fraction of its dims
            if "qk" in pa:  # (q/k dims fixed by q/k norm have no gates)
                total = total + (torch.relu(self.min_head_dims - pa["qk"].mean(-1)) ** 2).sum()
            total = total + (torch.relu(self.min_head_dims - pa["v"].mean(-1)) ** 2).sum()
        if self.min_ffn > 0:  # per layer: expected kept fraction of the FFN
            ffn = pm["block"].squeeze(-1) * pm["neuron"].mean(-1)
            total = total + (torch.relu(self.min_ffn - ffn) ** 2).sum()
        return total

    def dense_macs(self, model: nn.Module) -> float:
        """MACs of the unpruned model: the expected MACs with every gate kept (with 0/1
        probabilities the expected MACs are the cost model's)."""
        from pyengine.models import adapter_for
        key = id(model)
        if key not in self._dense:
            ones = [{k: torch.ones(v, dtype=torch.float64) for k, v in gs.shapes.items()}
                    for gs in hiap_gate_sets(model)]
            self._dense[key] = float(adapter_for(model).expected_macs(model, ones))
        return self._dense[key]

    def __call__(self, model: nn.Module, logits=None, x=None, y=None, step=None):
        # the expected MACs of any family come from its adapter; the head / dim / FFN
        # feasibility terms are a transformer's (attention and FFN gate pairs)
        from pyengine.models import adapter_for
        sets = hiap_gate_sets(model)
        probs = [g.probs() for g in sets]
        w = lambda k: self.macro_weight if k in MACRO else self.micro_weight  # noqa: E731
        scaled = [{k: _scale_grad(v, w(k)) for k, v in p.items()} for p in probs]
        if self.latency is not None:
            macs = self.latency.expected(scaled)
            ratio = macs / self.dense_latency(model)
        else:
            macs = adapter_for(model).expected_macs(model, scaled)
            ratio = macs / self.dense_macs(model)
        budget = self.budget_weight * (ratio - self.target) ** 2
        if _has_heads(sets):
            feas = self.feasibility_weight * self.feasibility(model, probs=probs)
        else:
            feas = torch.zeros((), dtype=macs.dtype, device=macs.device)
        loss = (budget + feas).to(torch.float32)
        key = "elat" if self.latency is not None else "emacs"
        return loss, {key: float(ratio.detach()), "feas": float(feas.detach())}

    def dense_latency(self, model: nn.Module) -> float:
        """Expected ms with every gate kept (the latency model's dense prediction)."""
        key = ("latency", id(model))
        if key not in self._dense:
            ones = [{k: torch.ones(v, dtype=torch.float64) for k, v in gs.shapes.items()}
                    for gs in hiap_gate_sets(model)]
            self._dense[key] = float(self.latency.expected(ones))
        return self._dense[key]


def _stackable(pairs: list) -> bool:
    """Whether every block's gate slots have one shape (then they stack into few kernels)."""
    first = pairs[0] if pairs else None
    if first is None or set(first[0]) != {"block", "head", "qk", "v"}:
        return False
    return all({k: tuple(t.shape) for k, t in a.items()} ==
               {k: tuple(t.shape) for k, t in first[0].items()} and
               tuple(m["neuron"].shape) == tuple(first[1]["neuron"].shape) for a, m in pairs)


def finalize(model: nn.Module, target: float, tolerance: float = 0.03, min_heads: int = 1,
             min_head_dims: float = 0.0, min_ffn: float = 0.0, round_to: int | None = None,
             latency=None):
    """Fix the final hard structure of a HiAP-trained model: start from ``sigmoid(alpha) >
    0.5``, round and make feasible, then add/remove units ranked by their logits until the
    MACs are within ``tolerance`` (relative) of ``target`` * dense (the family's projection,
    :meth:`pyengine.models.Adapter.project`); with ``latency`` (a ViT's
    :class:`~pyengine.cost.latency.LatencyModel`) the predicted ms instead. Returns the Spec."""
    from pyengine.models import adapter_for
    sets = hiap_gate_sets(model)
    scores = [{k: v.detach() for k, v in g.logits.items()} for g in sets]
    for g in sets:
        g.release()
    if latency is not None:
        from pyengine.structure.solver import project
        return project(model, list(zip(scores[0::2], scores[1::2])), target,
                       tolerance=tolerance, round_to=round_to, min_heads=min_heads,
                       min_head_dims=min_head_dims, min_ffn=min_ffn, latency=latency)
    return adapter_for(model).project(model, scores, target, tolerance=tolerance,
                                      round_to=round_to, min_heads=min_heads,
                                      min_head_dims=min_head_dims, min_ffn=min_ffn)


# --------------------------------------------------------------------------------------
# The `pyengine prune --method hiap` plug-in
# --------------------------------------------------------------------------------------


@register_method("hiap")
class HiAP(Method):
    """Gate the model with HiAP, learn the structure with CE + KD + budget + feasibility, and
    fix the final hard structure at the budget's target (see :func:`finalize`)."""

    needs_expected_latency = True  # the budget loss of a latency budget: LatencyModel.expected

    @dataclass
    class Config:
        tau_start: float = field(default=2.0, metadata={
            "help": "Gumbel-Sigmoid temperature at the start (annealed exponentially)"})
        tau_end: float = field(default=0.5, metadata={"help": "temperature at the end"})
        gate_lr: float = field(default=0.05, metadata={
            "help": "learning rate of the gate logits"})
        gate_init: float = field(default=3.0, metadata={
            "help": "initial gate logit (sigmoid(3) = 0.95 keep probability)"})
        budget_weight: float = 20.0
        macro_weight: float = field(default=2.0, metadata={
            "help": "budget gradient scale for block/head gates (HiAP: 2)"})
        micro_weight: float = field(default=1.0, metadata={
            "help": "budget gradient scale for dim/neuron gates (HiAP: 1)"})
        feasibility_weight: float = 1.0

    def check(self, config: "HiAP.Config", ctx: MethodContext) -> None:
        if not (config.tau_start > 0 and config.tau_end > 0):
            raise ValueError(f"hiap: temperatures must be > 0, got tau_start="
                             f"{config.tau_start!r}, tau_end={config.tau_end!r}")
        if not math.isfinite(config.gate_init):
            raise ValueError(f"hiap: gate_init must be finite, got {config.gate_init!r}")
        if not (config.gate_lr > 0 and math.isfinite(config.gate_lr)):
            raise ValueError(f"hiap: gate_lr must be a finite number > 0, got {config.gate_lr!r}")

    def prune(self, model: nn.Module, config: "HiAP.Config", ctx: MethodContext) -> nn.Module:
        from pyengine.api import gate
        from pyengine.train.trainer import default_param_groups, fit, row_printer

        if ctx.budget.budget == "latency":
            require_expected_latency(self.name, model)  # a CNN: no expected latency yet
        latency = ctx.latency_model(model)  # None: the budget is in MACs
        b, t = ctx.budget, ctx.training
        gate(model, method="hiap", init=float(config.gate_init), tau=float(config.tau_start))
        model.to(t.device)
        loss = HiAPLoss(b.target, budget_weight=float(config.budget_weight),
                        macro_weight=float(config.macro_weight),
                        micro_weight=float(config.micro_weight), min_heads=int(b.min_heads),
                        min_head_dims=float(b.min_head_dims), min_ffn=float(b.min_ffn),
                        feasibility_weight=float(config.feasibility_weight), latency=latency)
        schedule = TemperatureSchedule(model, float(config.tau_start), float(config.tau_end))
        gates = gate_parameters(model)
        gate_ids = {id(p) for p in gates}
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in gate_ids]}
                  for g in default_param_groups(model, float(t.weight_decay))]
        groups = [g for g in groups if g["params"]]
        # the gates learn faster than the weights and are not decayed toward 0 (= sigmoid 0.5)
        groups.append({"params": gates, "lr": float(config.gate_lr), "weight_decay": 0.0})
        fit(model, ctx.train_loader, ctx.val_loader, epochs=int(t.epochs), lr=float(t.lr),
            weight_decay=float(t.weight_decay), param_groups=groups, grad_clip=t.grad_clip,
            amp=t.amp, teacher=ctx.teacher, kd_alpha=float(t.kd_alpha),
            kd_temperature=float(t.kd_temperature), extra_loss=loss, on_step=schedule,
            checkpoint_dir=ctx.checkpoint_dir("hiap"), resume=bool(t.resume), run=ctx.run,
            seed=int(t.seed), device=t.device, progress=bool(t.progress),
            log=row_printer("hiap", bool(t.progress)), warmup_steps=int(t.warmup_steps))
        model.eval()
        finalize(model, b.target, tolerance=float(b.tolerance), min_heads=int(b.min_heads),
                 min_head_dims=float(b.min_head_dims), min_ffn=float(b.min_ffn),
                 round_to=b.round_to, latency=latency)
        return model
