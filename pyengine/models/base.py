"""The architecture adapter: everything pyengine needs to know about one model family.

The public API (gate, spec, apply, compile, save, load, cost) and the methods never look at a
model's type themselves; they ask :func:`adapter_for` for the family's adapter and call it.
Adding a model family means writing one :class:`Adapter` subclass and registering it::

    @register_adapter
    class SwinAdapter(Adapter):
        name = "swin"
        spec_type = SwinSpec
        def supports(self, model): ...     # None, or why this adapter does not take the model
        def geometry(self, model): ...     # the dense shape a spec is checked against
        def gate(self, model, make_gates): ...
        ...

An adapter method takes the whole model; the per-layer details (gated and compact modules,
cost rows, importance units) live in the family's own sub-package (models/vit, models/resnet).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from torch import nn

__all__ = ["Adapter", "UnsupportedModuleError", "register_adapter", "adapter_for",
           "adapter_for_spec", "adapters"]


class UnsupportedModuleError(TypeError):
    """A model or module that pyengine cannot gate, compile or cost."""


class Adapter:
    """One model family. Subclasses implement every method below for their family."""

    name = "base"
    spec_type: type = object      # the Spec class of this family (Spec, CnnSpec, ...)
    spec_label = "spec"           # how errors call it ("ViT spec (blocks)")
    geometry_type: type = object  # its dense geometry class
    supported = ""                # one line for error messages: which timm models

    # ---- recognising ---------------------------------------------------------------------
    def supports(self, model: nn.Module) -> str | None:
        """None when this adapter handles ``model`` (dense, gated or compact), else why not."""
        raise NotImplementedError

    def check(self, model: nn.Module) -> None:
        """Raise :class:`UnsupportedModuleError` early when a part of ``model`` cannot be gated."""

    # ---- structure -------------------------------------------------------------------------
    def geometry(self, model: nn.Module):
        """The dense geometry of ``model`` (gated or not; compact models carry theirs in the
        spec)."""
        raise NotImplementedError

    def is_gated(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def is_compact(self, model: nn.Module) -> bool:
        return isinstance(getattr(model, "pyengine_spec", None), self.spec_type)

    def gate(self, model: nn.Module, make_gates: Callable[[Mapping], Any]) -> None:
        """In place: swap the prunable parts for gated modules built with ``make_gates``."""
        raise NotImplementedError

    def gate_sets(self, model: nn.Module) -> list:
        """Every gate set (a :class:`~pyengine.structure.gates.Gates`) of a gated model."""
        raise NotImplementedError

    def spec(self, model: nn.Module, name: str | None):
        """The current hard structure of a gated model, or the full spec of a dense one."""
        raise NotImplementedError

    def full_spec(self, geometry, name: str | None):
        return self.spec_type.full(geometry, model=name)

    def apply(self, model: nn.Module, spec, name: str | None) -> None:
        """Fix the gates of a gated model to ``spec`` (validated against its geometry)."""
        raise NotImplementedError

    def fold_gates(self, model: nn.Module) -> None:
        """In place: multiply real-valued gate values into the weights (for compile)."""
        raise NotImplementedError

    def build(self, container: nn.Module, spec, copy_weights: bool) -> nn.Module:
        """Replace the prunable parts of ``container`` (dense, or gated with folded gates) by
        compact modules for ``spec``; copy the kept weights if asked. Sets
        ``container.pyengine_spec``."""
        raise NotImplementedError

    def plan_layout(self, spec, layout: str, device, dtype, batches=None, log=None):
        """``spec`` with the run layout ``pyengine.compile`` builds it in ("auto", "exact",
        "padded"; see :mod:`pyengine.models.vit.layout`), recorded in its meta. Families
        without a layout choice return ``spec`` as it is."""
        return spec

    def skeleton_spec(self, spec, geometry, name: str):
        """``spec`` checked against the geometry of a freshly built dense model (save/load),
        with its geometry and model name filled in."""
        from pyengine.structure.spec import SpecError
        if spec.dense is not None and spec.dense != geometry:
            raise SpecError(f"spec was made for geometry {spec.dense}, the rebuilt model is "
                            f"{geometry}")
        # the spec's own geometry where it has one: it keeps what the comparison leaves out
        # (a CNN's img_size and timm kwargs, which its cost model reads)
        return spec.with_dense(spec.dense or geometry, name)

    def dense_config(self, model: nn.Module, name: str | None) -> dict:
        """``{"architecture", "kwargs"}`` that rebuild the dense container with timm: what
        ``pyengine.create_model`` recorded, else the name and :meth:`rebuild_kwargs`."""
        from pyengine.models.factory import remembered_config
        cfg = remembered_config(model)
        if cfg:
            return cfg
        if name is None:
            raise ValueError("cannot tell which timm model this is (no pretrained_cfg); create "
                             "it with pyengine.create_model(name, **kwargs) so it can be saved")
        return {"architecture": name, "kwargs": self.rebuild_kwargs(model)}

    def rebuild_kwargs(self, model: nn.Module) -> dict:
        """timm.create_model kwargs that rebuild a model not made by pyengine.create_model."""
        raise NotImplementedError

    # ---- cost and importance -----------------------------------------------------------------
    def cost(self, model_or_spec, batch: int, dtype, peaks, **options):
        """Per-layer cost rows (see :mod:`pyengine.cost.model`)."""
        raise NotImplementedError

    def ledger(self, geometry, model: str | None, **constraints):
        """The structure solver's ledger for this family (see :mod:`pyengine.structure.solver`)."""
        raise NotImplementedError

    def importance(self, model: nn.Module):
        """The importance units of ``model`` (see :mod:`pyengine.models.importance`)."""
        raise NotImplementedError

    def synthetic_spec(self, model: nn.Module, target: float, seed: int = 0,
                       name: str | None = None, round_to: int = 8):
        """A made-to-order structure at ``target`` of the dense MACs, for benchmarks before any
        method has run: random importance scores through the structure solver (finest
        granularity, global ranking, kept counts in multiples of ``round_to`` like the ViT's
        heterogeneous heads)."""
        import copy

        from pyengine.methods.criteria import score
        from pyengine.structure.solver import allocate
        from pyengine.structure.gates import gate_factory
        gated = model
        if not self.is_gated(model):
            gated = copy.deepcopy(model)
            self.gate(gated, gate_factory("mask"))
        return allocate(score(gated, "random", seed=seed), self.geometry(gated), target,
                        round_to=round_to, model=name,
                        meta={"made_by": "random scores, structure.solver.allocate",
                              "seed": seed})

    # ---- HiAP (learned gates against an expected-MAC budget) ----------------------------------
    def expected_macs(self, model: nn.Module, probs=None, batch: int = 1, transform=None):
        """Differentiable expected MACs (float64 scalar) of a gated model from keep
        probabilities: ``probs`` one ``{slot: tensor}`` per gate set, aligned with
        :meth:`gate_sets` (default: the gates' own); ``transform(slot, tensor)`` is applied to
        every probability first (HiAP scales the gradients of macro and micro gates)."""
        raise NotImplementedError(f"HiAP's expected cost is not available for {self.name} "
                                  "models")

    def project(self, model: nn.Module, scores, target: float, **options):
        """HiAP's final structure at ``target`` (fraction of dense MACs) from logit-like
        ``scores`` (one dict per gate set, aligned with :meth:`gate_sets`); applied to
        ``model``, returned as a spec."""
        raise NotImplementedError(f"HiAP's final projection is not available for {self.name} "
                                  "models")


_ADAPTERS: list[Adapter] = []


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make a model family known to pyengine."""
    _ADAPTERS.append(cls())
    return cls


def adapters() -> list[Adapter]:
    _load_builtin()
    return list(_ADAPTERS)


def _load_builtin() -> None:
    # the built-in families register themselves on import
    from pyengine.models import resnet, vit  # noqa: F401
    from pyengine.models import convnext, efficientnet, regnet  # noqa: F401
    from pyengine.models import beit, eva, swin  # noqa: F401  (transformer families)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s family; the error lists why each family declined it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch nn.Module (a timm model), got {type(model).__name__}")
    reasons = []
    for a in adapters():
        why = a.supports(model)
        if why is None:
            return a
        reasons.append(f"{a.name}: {why}")
    raise UnsupportedModuleError(
        f"pyengine cannot prune {type(model).__module__}.{type(model).__name__}: "
        + "; ".join(reasons))


def adapter_for_spec(spec: Any) -> Adapter:
    """The adapter whose spec type ``spec`` is."""
    for a in adapters():
        if isinstance(spec, a.spec_type):
            return a
    raise TypeError(f"expected a pyengine spec ({', '.join(a.spec_type.__name__ for a in adapters())}),"
                    f" got {type(spec).__name__}")


def adapter_for_geometry(geometry: Any) -> Adapter:
    """The adapter whose dense geometry type ``geometry`` is."""
    for a in adapters():
        if isinstance(geometry, a.geometry_type):
            return a
    raise TypeError(f"expected a dense geometry ("
                    f"{', '.join(a.geometry_type.__name__ for a in adapters())}), got "
                    f"{type(geometry).__name__}")


def names(models: Iterable[Adapter]) -> str:
    return ", ".join(a.name for a in models)
