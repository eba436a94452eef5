"""The method interface: how a structure is found, one way for every method.

A method takes a dense model and returns it gated (``pyengine.gate``) with its final hard
structure fixed. It is told three things, each a dataclass:

* :class:`Budget`   what structure to reach (the MAC target and its feasibility constraints),
  shared by every method;
* :class:`Training` how weights train while a learned method runs (epochs, lr, distillation,
  device, checkpoints), shared by every learned method and the fine-tuning;
* ``Method.Config`` the method's own options (HiAP's temperatures, SSS's gamma, a criterion's
  calibration batches), one dataclass per method.

Adding a method::

    @register_method("mymethod")
    class MyMethod(Method):
        @dataclass
        class Config:
            strength: float = field(default=1.0, metadata={"help": "how hard to push"})

        def prune(self, model, config, ctx):
            pyengine.gate(model, method="mask")
            ...                                    # ctx.budget, ctx.training, ctx.train_loader
            pyengine.apply(model, spec)
            return model

Its options then appear as ``pyengine prune --method mymethod --strength 2`` (the command line
builds its flags from the dataclass fields and their ``help`` metadata), and
:func:`run_method` takes them as keyword arguments.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from pyengine.errors import SettingError

__all__ = ["Budget", "Training", "MethodContext", "Method", "register_method", "get_method",
           "methods", "run_method", "split_options", "check_config", "check_values",
           "check_geometry", "resolve_latency_budget", "require_expected_latency"]


@dataclass
class Budget:
    """The structure to reach: ``target`` of the dense model's MACs (``budget="latency"``: of
    its predicted latency; ``target_ms``: an absolute latency), within ``tolerance``."""

    target: float = field(default=0.5, metadata={
        "help": "kept fraction of the dense model's cost in the --budget unit (default 0.5 "
                "of its MACs)", "type": "fraction"})
    tolerance: float = field(default=0.03, metadata={
        "help": "final MACs within target * (1 +- tolerance) (default 0.03)"})
    min_heads: int = field(default=1, metadata={
        "help": "minimum heads per layer (0 lets a whole attention block go)"})
    min_head_dims: float = field(default=0.0, metadata={
        "help": "minimum fraction of q/k and of v dims inside a kept head"})
    min_ffn: float = field(default=0.0, metadata={
        "help": "minimum kept fraction of each FFN (0 lets a whole FFN go)"})
    round_to: int | None = field(default=None, metadata={
        "help": "round kept dims per head and neurons per FFN to multiples of K (e.g. 8 for "
                "tensor cores)", "metavar": "K"})
    # the budget's unit: MACs, or the latency predicted by the device's latency table
    # (cost/latency.py: ViTs; cost/cnn_latency.py: CNNs, one-shot methods and SSS), on the
    # training device in float32 at latency_batch
    budget: str = field(default="macs", metadata={
        "choices": ["macs", "latency"],
        "help": "what --target is a fraction of: dense MACs (default) or the dense model's "
                "latency predicted on --device by its latency table (ViTs; CNNs with the "
                "one-shot methods and SSS)"})
    target_ms: float | None = field(default=None, metadata={
        "help": "absolute latency budget in ms per batch of --latency-batch images (with "
                "--budget latency; replaces --target)", "metavar": "MS"})
    latency_batch: int = field(default=1, metadata={
        "help": "batch size the latency budget is predicted at (default 1)"})


@dataclass
class Training:
    """How weights train while a learned method runs (and in fine-tuning)."""

    epochs: int = field(default=10, metadata={"help": "epochs of structure learning"})
    lr: float = field(default=5e-4, metadata={"help": "weight learning rate"})
    weight_decay: float = 0.05
    warmup_steps: int = 0
    grad_clip: float | None = None
    kd_alpha: float = field(default=0.5, metadata={
        "help": "distillation weight from the dense model (0: no teacher)"})
    kd_temperature: float = 4.0
    amp: str | None = field(default=None, metadata={"choices": ["bf16", "fp16"]})
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    checkpoint_dir: str | None = None  # each method checkpoints into a folder of its own here
    resume: bool = False


@dataclass
class MethodContext:
    """What a method is handed besides the model and its own config."""

    budget: Budget = field(default_factory=Budget)
    training: Training = field(default_factory=Training)
    teacher: nn.Module | None = None
    train_loader: Any = None
    val_loader: Any = None
    log: Callable[[str], None] = print
    img_size: int | None = None  # the input side (the cost model's input for CNNs)
    run: dict | None = None  # the settings that define the run (recorded in checkpoints)
    latency: Any = None  # budget "latency": the LatencyModel (made on first use)

    def latency_model(self, model: nn.Module):
        """The budget's latency model (None when the budget is in MACs), made on first use
        from the device's latency table; ``target_ms`` becomes ``budget.target`` here (call it
        before reading the budget)."""
        if self.budget.budget != "latency":
            return None
        if self.latency is None:
            self.budget, self.latency = resolve_latency_budget(self.budget, self.training,
                                                               model, self.log)
        return self.latency

    def checkpoint_dir(self, name: str) -> str | None:
        d = self.training.checkpoint_dir
        return None if d is None else f"{d.rstrip('/')}/{name}"


class Method:
    """A way of finding a structure. Subclasses set ``Config`` and implement :meth:`prune`."""

    name = "base"
    # a latency budget prices its gate probabilities (LatencyModel.expected: ViTs only)
    needs_expected_latency = False

    @dataclass
    class Config:
        pass

    def prune(self, model: nn.Module, config, ctx: MethodContext) -> nn.Module:
        """Return ``model`` gated with its final hard structure fixed (in place is fine)."""
        raise NotImplementedError

    def check(self, config, ctx: MethodContext) -> None:
        """Reject settings this method cannot run with, before any work starts."""


_METHODS: dict[str, Method] = {}


def register_method(name: str, **init):
    """Class decorator: make a :class:`Method` subclass available as ``name``."""
    def deco(cls):
        obj = cls(**init)
        obj.name = name
        _METHODS[name] = obj
        return cls
    return deco


def _load_builtin() -> None:
    from pyengine.methods import hiap, oneshot, sss  # noqa: F401  (they register themselves)


def methods() -> dict[str, Method]:
    """Every registered method by name."""
    _load_builtin()
    return dict(_METHODS)


def get_method(name: str) -> Method:
    known = methods()
    if name not in known:
        raise ValueError(f"unknown pruning method {name!r}; known: {', '.join(sorted(known))}")
    return known[name]


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def split_options(method: Method, options: dict[str, Any]) -> tuple[Budget, Training, Any]:
    """Keyword options -> (Budget, Training, method config), by field name; an unknown option
    is a TypeError that lists the known ones."""
    parts = {Budget: {}, Training: {}, method.Config: {}}
    for k, v in options.items():
        for cls in (method.Config, Budget, Training):
            if k in _fields(cls):
                parts[cls][k] = v
                break
        else:
            known = sorted(_fields(Budget) | _fields(Training) | _fields(method.Config))
            raise TypeError(f"{method.name}: unknown option {k!r}; known: {', '.join(known)}")
    return Budget(**parts[Budget]), Training(**parts[Training]), method.Config(**parts[method.Config])


def check_values(obj, where: str = "") -> None:
    """Every field of dataclass ``obj`` typed ``int`` holds an int and every float is finite
    (None allowed where the field's type says so); the error names the field."""
    at = f"{where}: " if where else ""

    def bad(name, text):
        raise SettingError(name, f"{at}{name} {text}") if not at else ValueError(f"{at}{name} "
                                                                                f"{text}")
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        kinds = {p.strip() for p in str(text).split("|")}
        if v is None:
            if "None" not in kinds:
                bad(f.name, "must be set, got None")
            continue
        if "int" in kinds and "float" not in kinds and (not isinstance(v, int)
                                                        or isinstance(v, bool)):
            bad(f.name, f"must be an integer, got {v!r}")
        if "float" in kinds:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                bad(f.name, f"must be a number, got {v!r}")
            if not math.isfinite(v):
                bad(f.name, f"must be a finite number, got {v!r}")


def check_config(budget: Budget, training: Training) -> None:
    """Reject bad shared settings with one message naming the setting, before any work."""
    def bad(name, value, want):
        raise SettingError(name, f"{name} must be {want}, got {value!r}")
    check_values(budget)
    check_values(training)
    if not isinstance(budget.target, (int, float)) or not 0.0 < budget.target <= 1.0:
        bad("target", budget.target, "a fraction of the dense cost in (0, 1]")
    if budget.budget not in ("macs", "latency"):
        bad("budget", budget.budget, "'macs' or 'latency'")
    if budget.target_ms is not None:
        if budget.budget != "latency":
            raise SettingError("target_ms", "target_ms is a latency budget: add --budget "
                               f"latency (the budget is {budget.budget!r})")
        if not budget.target_ms > 0:
            bad("target_ms", budget.target_ms, "a finite number of ms > 0")
    if not isinstance(budget.latency_batch, int) or budget.latency_batch < 1:
        bad("latency_batch", budget.latency_batch, "a positive integer")
    if not 0.0 <= budget.tolerance < 1.0:
        bad("tolerance", budget.tolerance, "in [0, 1)")
    if not isinstance(budget.min_heads, int) or budget.min_heads < 0:
        bad("min_heads", budget.min_heads, "an integer >= 0")
    for name in ("min_head_dims", "min_ffn"):
        v = getattr(budget, name)
        if not 0.0 <= v <= 1.0:
            bad(name, v, "a fraction in [0, 1]")
    if budget.round_to is not None and (not isinstance(budget.round_to, int)
                                        or budget.round_to < 1):
        bad("round_to", budget.round_to, "a positive integer")
    if not isinstance(training.epochs, int) or training.epochs < 0:
        bad("epochs", training.epochs, "an integer >= 0")
    for name in ("lr", "weight_decay", "kd_temperature"):
        v = getattr(training, name)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (
                name != "weight_decay" and v == 0):
            bad(name, v, "a finite number > 0" if name != "weight_decay" else "finite and >= 0")
    if not 0.0 <= training.kd_alpha <= 1.0:
        bad("kd_alpha", training.kd_alpha, "in [0, 1]")
    if training.grad_clip is not None and not (training.grad_clip > 0):
        bad("grad_clip", training.grad_clip, "> 0")
    if training.amp not in (None, "bf16", "fp16"):
        bad("amp", training.amp, "None, 'bf16' or 'fp16'")
    for name in ("warmup_steps", "seed"):
        v = getattr(training, name)
        if v < 0:
            bad(name, v, "an integer >= 0")
    from pyengine.train.device import check_device
    check_device(training.device, "device")


def resolve_latency_budget(budget: Budget, training: Training, model: nn.Module,
                           log: Callable[[str], None] | None = None, method: str | None = None):
    """``(budget, latency model)``: the latency model of ``model`` on the training device
    (float32, ``budget.latency_batch``) and the budget with ``target_ms`` turned into the
    fraction ``target`` of the dense prediction. A budget in MACs comes back unchanged.
    A CNN gets a :class:`~pyengine.cost.cnn_latency.CnnLatencyModel` (its measured block
    table); ``method`` (its name) is refused there when it needs an expected latency of gate
    probabilities (HiAP), which CNNs do not have yet."""
    if budget.budget != "latency":
        return budget, None
    from pyengine.cost.cnn_latency import CnnLatencyModel, cnn_spec_of
    from pyengine.cost.latency import LatencyModel
    from pyengine.cost.latency_table import LatencyTableError
    if method is not None:
        require_expected_latency(method, model)
    cnn = cnn_spec_of(model) is not None
    try:
        make = CnnLatencyModel.for_model if cnn else LatencyModel.for_model
        lm = make(model, training.device, batch=int(budget.latency_batch), log=log,
                  progress=bool(training.progress))
    except LatencyTableError as e:
        raise SettingError("budget", f"budget latency: {e}") from None
    if budget.target_ms is not None:
        ms = float(budget.target_ms)
        if ms <= lm.fixed:
            raise SettingError("target_ms", f"target_ms {ms:g} is at or below the predicted "
                               f"floor {lm.fixed:.4g} ms (stem + head, batch "
                               f"{budget.latency_batch}) on {lm.table.device}")
        if ms > lm.dense:
            raise SettingError("target_ms", f"target_ms {ms:g} is above the dense model's "
                               f"predicted {lm.dense:.4g} ms (batch {budget.latency_batch}) on "
                               f"{lm.table.device}: nothing to prune")
        budget = dataclasses.replace(budget, target=ms / lm.dense)
    if log:
        log(f"latency budget: {budget.target:.4f} of the dense model's predicted "
            f"{lm.dense:.4g} ms = {budget.target * lm.dense:.4g} ms (batch "
            f"{budget.latency_batch}, {lm.table.device} {lm.table.dtype})")
    return budget, lm


def require_expected_latency(method: str, model: nn.Module) -> None:
    """Refuse a latency budget for ``method`` on a CNN ``model`` when the method needs the
    expected latency of gate probabilities (HiAP's budget loss): CNNs have no differentiable
    latency model yet, only the predicted latency of hard structures."""
    from pyengine.cost.cnn_latency import cnn_spec_of
    if getattr(get_method(method), "needs_expected_latency", False) and \
            cnn_spec_of(model) is not None:
        raise SettingError("budget", f"{method} with --budget latency needs a differentiable "
                           "expected latency, which CNNs do not have yet: use --budget macs, "
                           "or a one-shot method (e.g. --method agf) or sss")


def check_geometry(budget: Budget, geometry) -> None:
    """Budget settings the model cannot meet (checked as soon as the model is built)."""
    heads = getattr(geometry, "num_heads", None)
    if isinstance(heads, (tuple, list)):  # one count per stage (Swin): the fewest bind
        heads = min(heads) if heads else None
    if heads is not None and budget.min_heads > heads:
        raise SettingError("min_heads", f"min_heads must be at most the model's {heads} heads per layer, got "
                         f"{budget.min_heads}")
    widths = [w for w in (getattr(geometry, "head_dim", None),
                          getattr(geometry, "mlp_hidden", None)) if w]
    if budget.round_to is not None and widths and budget.round_to > max(widths):
        raise SettingError("round_to", f"round_to must be at most the model's widest unit ({max(widths)}: "
                         f"head dim {getattr(geometry, 'head_dim', '-')}, FFN "
                         f"{getattr(geometry, 'mlp_hidden', '-')}), got {budget.round_to}")


def run_method(model: nn.Module, method: str, train_loader=None, val_loader=None, *,
               teacher: nn.Module | None = None, log: Callable[[str], None] = print,
               img_size: int | None = None, **options) -> nn.Module:
    """Run ``method`` on ``model`` (gated in place, structure fixed); ``options`` are fields of
    :class:`Budget`, :class:`Training` or the method's ``Config``::

        run_method(model, "sss", loader, target=0.6, epochs=2, gamma=None)
    """
    m = get_method(method)
    budget, training, config = split_options(m, options)
    check_config(budget, training)
    ctx = MethodContext(budget, training, teacher, train_loader, val_loader, log, img_size)
    m.check(config, ctx)
    return m.prune(model, config, ctx)
