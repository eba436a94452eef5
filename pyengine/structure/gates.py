"""Gate sets: the per-structure multipliers a gated module applies in its forward.

A gated attention has the slots ``block`` (scalar), ``head`` [H], ``qk`` [H, Dh] and ``v``
[H, Dh]; a gated FFN has ``block`` (scalar) and ``neuron`` [M]. A gate kind decides how the
values are produced (fixed masks here; HiAP's Gumbel-Sigmoid gates and SSS's scale factors
register themselves under their own names) and must be able to report and fix a hard
structure, which is all :func:`pyengine.spec` and :func:`pyengine.apply` use.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

ATTN_SLOTS = ("block", "head", "qk", "v")
MLP_SLOTS = ("block", "neuron")

_KINDS: dict[str, Callable[..., "Gates"]] = {}
# kinds that later issues add; named here so the error says where they come from
_PLANNED: dict[str, str] = {}
# kinds defined in their own modules, imported on first use (keeps `import pyengine` light)
_LAZY = {"hiap": "pyengine.methods.hiap", "sss": "pyengine.methods.sss"}


def register_gates(name: str):
    """Class decorator: make a :class:`Gates` subclass available as ``gate(model, method=name)``."""
    def deco(cls):
        _KINDS[name] = cls
        cls.kind = name
        return cls
    return deco


def gate_factory(method: str, **kwargs) -> Callable[[Mapping[str, tuple[int, ...]]], "Gates"]:
    if method not in _KINDS and method in _LAZY:
        import importlib
        importlib.import_module(_LAZY[method])  # registers the kind
    if method not in _KINDS:
        if method in _PLANNED:
            raise NotImplementedError(
                f"gate method {method!r} is not available in this build yet (it lands with "
                f"{_PLANNED[method]}); available: {available_methods()}")
        raise ValueError(f"unknown gate method {method!r}; available: {available_methods()}")
    cls = _KINDS[method]
    return lambda shapes: cls(shapes, **kwargs)


def _consistent(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hard-gate semantics shared by every kind: a head with no value dims is off, and a
    block with no head (or no neuron) left is removed, bias included, as the Spec says."""
    out = dict(values)
    if "head" in out:
        head = out["head"] * (out["v"] != 0).any(-1)
        out["head"] = head
        out["block"] = out["block"] * (head != 0).any()
    elif "block" in out:  # (a CNN block without a residual has no block gate)
        # an FFN ("neuron") or a conv block (one slot per inner conv): a block that keeps no
        # unit in some slot is removed
        for k in [k for k in out if k != "block"]:
            out["block"] = out["block"] * (out[k] != 0).any()
    return out


class Gates(nn.Module):
    """Base class of gate kinds. ``values()`` feeds the forward; ``hard()``/``set_hard()``
    read and fix the discrete structure."""

    kind = "base"

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]):
        super().__init__()
        self.shapes = {k: tuple(v) for k, v in shapes.items()}

    def values(self) -> dict[str, torch.Tensor]:
        """The slot values the forward multiplies in (default: a tensor attribute per slot,
        made consistent)."""
        return _consistent({k: getattr(self, k) for k in self.shapes})

    def hard(self) -> dict[str, torch.Tensor]:
        """Boolean keep-masks per slot, already made consistent (see :func:`_consistent`)."""
        return {k: v != 0 for k, v in self.values().items()}

    def set_hard(self, masks: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={list(v)}" for k, v in self.shapes.items())


@register_gates("mask")
class MaskGates(Gates):
    """Fixed 0/1 masks (buffers, not trained). Start fully on."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]):
        super().__init__(shapes)
        for name, shape in self.shapes.items():
            self.register_buffer(name, torch.ones(shape))

    @torch.no_grad()
    def set_hard(self, masks: Mapping[str, torch.Tensor]) -> None:
        for name, m in masks.items():
            buf = getattr(self, name)
            if tuple(m.shape) != tuple(buf.shape):
                raise ValueError(f"gate slot {name!r}: mask shape {tuple(m.shape)} != "
                                 f"{tuple(buf.shape)}")
            buf.copy_(m.to(buf.dtype))


def available_methods() -> list[str]:
    return sorted(set(_KINDS) | set(_LAZY))
