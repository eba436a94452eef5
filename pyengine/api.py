"""The public API: gate, spec, apply, compile (save and load are in :mod:`pyengine.io.model_dir`).

Every function works on any supported model family: it asks :func:`pyengine.models.adapter_for`
for the family's adapter and lets it do the family-specific part.
"""
from __future__ import annotations

import copy

from torch import nn

from pyengine.models import adapter_for, create_model, model_name
from pyengine.structure.gates import gate_factory
from pyengine.structure.spec import SpecError


def gate(model: nn.Module, method: str = "mask", **gate_kwargs) -> nn.Module:
    """In place: swap the prunable parts of ``model`` for gated modules; returns ``model``.

    The gated modules keep the original parameters. ``method`` picks the gate kind
    ("mask": fixed 0/1 masks; "hiap" and "sss" plug into the same slots). A ViT's
    Attention/Mlp become gated attention/FFN modules; a ResNet's residual blocks become gated
    blocks (inner conv channels and one gate per block).
    """
    a = adapter_for(model)
    if a.is_gated(model):
        if getattr(model, "pyengine_method", None) == method:
            return model
        raise ValueError(f"model is already gated with method "
                         f"{getattr(model, 'pyengine_method', None)!r}")
    if a.is_compact(model):
        raise ValueError("model is already compact (pyengine.compile / pyengine.load): gate the "
                         "dense model instead")
    make = gate_factory(method, **gate_kwargs)
    a.check(model)
    a.gate(model, make)
    model.pyengine_method = method
    return model


def spec(model: nn.Module):
    """The current hard structure of ``model`` (gated, compact or plain dense timm)."""
    s = getattr(model, "pyengine_spec", None)
    if s is not None:
        return s
    return adapter_for(model).spec(model, model_name(model))


def apply(model: nn.Module, s) -> nn.Module:
    """Fix the gates of a gated ``model`` to the structure ``s`` (validated against it)."""
    a = adapter_for(model)
    if not isinstance(s, a.spec_type):
        other = [b for b in _adapters() if isinstance(s, b.spec_type)]
        if other:
            raise SpecError(f"a {other[0].spec_label} does not fit a {a.name} model "
                            f"({type(model).__name__}): it needs a {a.spec_label}")
        raise TypeError(f"apply expects a pyengine spec ({a.spec_type.__name__}), got "
                        f"{type(s).__name__}")
    if not a.is_gated(model):
        raise ValueError("model is not gated: call pyengine.gate(model) first")
    a.apply(model, s, model_name(model))
    return model


def _adapters():
    from pyengine.models import adapters
    return adapters()


LAYOUTS = ("auto", "exact", "padded")


def _note(text: str) -> None:
    import sys
    print(f"pyengine: {text}", file=sys.stderr, flush=True)


def compile(model: nn.Module, layout: str = "auto", device=None, *,  # noqa: A001 - the contract
            batch=None, dtype=None) -> nn.Module:
    """A dense, smaller copy of a gated ``model`` that computes what its hard gates compute
    (a compact model is returned as a copy, in the layout it has).

    ``layout`` (ViTs): how each attention layer runs its kept heads (pyengine.models.vit.layout):
    "exact" one run per distinct head shape, "padded" one run at the layer's largest widths,
    "auto" (default) the zero-padded grouping with the lowest latency predicted by the latency
    table of ``device`` (measured once per device and cached; None: the model's device if it
    is a GPU, else the CPU), for batch sizes ``batch`` (an int or a list; default 1 and 8) and
    ``dtype`` (default: the model's).
    Every layout computes the same outputs; the choice is recorded in the spec (save/load keep
    it) and shown in the attention modules' repr.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    a = adapter_for(model)
    s = spec(model)
    name = model_name(model)
    cfg = a.dense_config(model, name) if (
        getattr(model, "pyengine_config", None) is not None or name is not None) else None
    out = copy.deepcopy(model)
    out.__dict__.pop("pyengine_method", None)
    if a.is_compact(model):
        return out
    param = next(model.parameters(), None)
    if device is None:
        device = param.device if param is not None and param.device.type == "cuda" else "cpu"
    batches = [batch] if isinstance(batch, int) else batch
    if dtype is None and param is not None:
        dtype = param.dtype
    s = a.plan_layout(s, layout, device=device, dtype=dtype, batches=batches, log=_note)
    a.fold_gates(out)  # real-valued gates (SSS scales) live on in the weights
    out = a.build(out, s, copy_weights=True)
    if cfg is not None:
        out.pyengine_config = cfg
    return out


def is_compact(model: nn.Module) -> bool:
    return adapter_for(model).is_compact(model)


def is_gated(model: nn.Module) -> bool:
    return adapter_for(model).is_gated(model)


def gate_sets(model: nn.Module) -> list:
    """Every gate set of a gated model (e.g. to freeze them while fine-tuning)."""
    return adapter_for(model).gate_sets(model)


__all__ = ["gate", "spec", "apply", "compile", "create_model", "is_compact", "is_gated",
           "gate_sets", "LAYOUTS"]
