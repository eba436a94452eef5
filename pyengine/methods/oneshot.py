"""One-shot pruning by an importance criterion: the ``pyengine prune`` plug-in of
agf / taylor / wanda / ria / magnitude / random.

    pyengine prune --model digits_vit --method agf --target 0.5 --calib-batches 8 \\
        --allocation global --granularity dim --out runs/agf50

:class:`OneShot` gates the dense model, calibrates on ``--calib-batches`` training batches
(forward + backward hooks), scores every structure by the criterion, allocates a structure
at the MAC target (:mod:`pyengine.allocate`) and fixes it in the gates. Fine-tuning, if any,
is done by ``pyengine prune`` on the compact model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from pyengine.structure.solver import GRANULARITIES, MODES, allocate
from pyengine.methods.base import Method, MethodContext, register_method
from pyengine.methods.criteria import CRITERIA, calibrate, get_criterion, score

__all__ = ["OneShot", "one_shot"]



def one_shot(model: nn.Module, criterion: str, target: float, calib=None, *, loader=None,
             calib_batches: int = 8, allocation: str = "global", granularity: str = "dim",
             min_heads: int = 1, round_to: int = 1, min_dims: int = 1, min_neurons: int = 0,
             seed: int = 0, device="cpu", latency=None):
    """Gate ``model`` (in place, mask gates), score it by ``criterion`` and fix the structure
    allocated at ``target`` (kept fraction of dense MACs). Pass ``calib`` to reuse a
    calibration, or ``loader`` to run one. Returns ``(model, spec)``."""
    from pyengine import api
    from pyengine.models import geometry
    from pyengine.models.factory import model_name

    crit = get_criterion(criterion)
    api.gate(model, method="mask")
    if calib is None and crit.needs_data:
        if loader is None:
            raise ValueError(f"criterion {criterion!r} needs calibration data: pass loader= or "
                             "calib=")
        calib = calibrate(model, loader, batches=calib_batches, device=device)
    scores = score(model, criterion, calib, seed=seed)
    spec = allocate(scores, geometry(model), target, mode=allocation, granularity=granularity,
                    min_heads=min_heads, round_to=round_to, model=model_name(model),
                    min_dims=min_dims, min_neurons=min_neurons, latency=latency,
                    meta={"method": criterion, "seed": seed,
                          "calib_samples": calib.samples if calib is not None else 0})
    api.apply(model, spec)
    return model, spec


class OneShot(Method):
    """Score every structure by one criterion on calibration batches and allocate a structure
    at the budget's target; no training (fine-tuning, if any, is the pipeline's)."""

    def __init__(self, criterion: str):
        self.criterion = criterion

    @dataclass
    class Config:
        calib_batches: int = field(default=8, metadata={
            "help": "training batches of forward/backward calibration (default 8)"})
        allocation: str = field(default="global", metadata={
            "choices": list(MODES),
            "help": "global ranking (normalized per structure type) or per-layer uniform"})
        granularity: str = field(default="dim", metadata={
            "choices": list(GRANULARITIES),
            "help": "what is removed: q/k + v dims and neurons (dim), whole heads and neurons "
                    "(head), whole attention/FFN branches (block)"})

    def check(self, config: "OneShot.Config", ctx: MethodContext) -> None:
        if not isinstance(config.calib_batches, int) or config.calib_batches < 1:
            raise ValueError(f"calib_batches must be a positive integer, got "
                             f"{config.calib_batches!r}")
        if config.allocation not in MODES:
            raise ValueError(f"allocation must be one of {', '.join(MODES)}, got "
                             f"{config.allocation!r}")
        if config.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got "
                             f"{config.granularity!r}")

    def prune(self, model: nn.Module, config: "OneShot.Config", ctx: MethodContext) -> nn.Module:
        from pyengine.models import geometry

        latency = ctx.latency_model(model)  # None: the budget is in MACs
        b, t = ctx.budget, ctx.training
        g = geometry(model)
        # fractions of a head's dims / of an FFN -> counts (families without heads: 1 unit)
        head_dim, hidden = getattr(g, "head_dim", 1), getattr(g, "mlp_hidden", 1)
        was_training = model.training
        model, _ = one_shot(
            model, self.criterion, b.target, loader=ctx.train_loader,
            calib_batches=config.calib_batches, allocation=config.allocation,
            granularity=config.granularity, min_heads=b.min_heads, round_to=b.round_to or 1,
            min_dims=max(1, int(round(b.min_head_dims * head_dim))),
            min_neurons=int(round(b.min_ffn * hidden)), seed=t.seed, device=t.device,
            latency=latency)
        model.train(was_training)
        return model


for _name in CRITERIA:
    register_method(_name, criterion=_name)(OneShot)
