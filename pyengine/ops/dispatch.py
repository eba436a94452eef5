"""One dispatcher for every op: backends declare what they support, "auto" follows a priority list.

An op is an :class:`Op`: a name and its backends, one :class:`Backend` subclass each (the torch
reference, Triton, the csrc "cuda" and "cpu" kernels). ``dispatch(op, backend, *args)`` runs

* an explicit backend when ``not_supported_reasons(*args)`` is empty (and, when an input
  requires grad, the backend has a backward), else raises :class:`BackendNotAvailable` with the
  reasons;
* ``"auto"``: the first backend of the op's priority list for the inputs' device
  (pyengine/ops/priority.py) that has no reasons; none: :class:`BackendNotAvailable` listing the
  reasons of every backend of the op.

The kinds of backends (torch, Triton, csrc) live in pyengine/ops/bases.py, each op's backends in
pyengine/ops/<op>/backends.py. To add a backend: write its class there (``name``, what it
supports, ``run``), add an instance to the op's ``BACKENDS`` tuple and, once a committed timing
shows it wins, its name to the op's priority list.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from . import priority

__all__ = ["Backend", "Op", "BackendNotAvailable", "DtypeNotSupported", "BACKENDS", "OPS",
           "register", "dispatch", "select", "supported_backends", "available_backends",
           "describe"]

# what ``backend=`` accepts for every op; the op's backends keep this order (reference first)
BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")
DEVICE_KINDS = ("cpu", "cuda")  # the device kinds describe() reports


class BackendNotAvailable(RuntimeError):
    """No backend (or not the one asked for) can run these inputs; the message says why."""


class DtypeNotSupported(BackendNotAvailable, TypeError):
    """An explicit backend that only fails on dtypes (a TypeError, as the kernels raised before)."""


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


class Backend:
    """One way to run an op; subclasses declare what they support and implement :meth:`run`.

    ``not_supported_reasons(*args)`` gets the op's normalized arguments (those of ``run``) and
    returns why this backend cannot run them, [] when it can: availability in this installation
    (:meth:`unavailable`), device, dtypes and any further limits (:meth:`input_reasons`).
    """

    name: str = ""
    supported_devices: tuple[str, ...] | None = None  # device types; None: any device
    supported_dtypes: tuple[torch.dtype, ...] | None = None  # None: any dtype
    supports_autograd: bool = False  # False: its outputs carry no gradient to the inputs

    def unavailable(self) -> str | None:
        """Why this installation cannot run the backend at all (not installed, not built)."""
        return None

    def tensors(self, *args) -> Sequence[Tensor]:
        """The op's input tensors (device, dtypes, requires_grad); the first sets the device."""
        raise NotImplementedError

    def input_reasons(self, *args) -> list[str]:
        """Limits beyond device and dtype (shapes, ...) that these inputs hit; [] if none."""
        return []

    def device_reason(self, device: torch.device) -> str | None:
        devs = self.supported_devices
        if devs is None or device.type in devs:
            return None
        return f"needs tensors on a {' or '.join(devs)} device, got {device}"

    def dtype_reasons(self, *args) -> list[str]:
        ok = self.supported_dtypes
        if ok is None:
            return []
        bad = []
        for t in self.tensors(*args):
            if t is not None and t.dtype not in ok and t.dtype not in bad:
                bad.append(t.dtype)
        if not bad:
            return []
        return [f"takes {', '.join(_dtype_name(d) for d in ok)} tensors, got "
                f"{', '.join(_dtype_name(d) for d in bad)}"]

    def not_supported_reasons(self, *args) -> list[str]:
        reasons = []
        ts = [t for t in self.tensors(*args) if t is not None]
        if ts:
            why = self.device_reason(ts[0].device)
            if why:
                reasons.append(why)
        why = self.unavailable()
        if why:
            reasons.append(why)
        reasons += self.dtype_reasons(*args)
        reasons += self.input_reasons(*args)
        return reasons

    def run(self, *args) -> Any:
        """Compute the op; called only after ``not_supported_reasons(*args)`` came back empty."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} backend {self.name!r}>"


@dataclass(frozen=True)
class Op:
    """An op's name and backends (in :data:`BACKENDS` order); auto's order is in priority.py."""

    name: str
    backends: tuple[Backend, ...]

    def backend(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        raise ValueError(f"{self.name}: unknown backend {name!r}; choose from "
                         f"{', '.join(BACKENDS)}")

    def check_backend(self, name: str) -> None:
        """ValueError for a ``backend=`` value that is not "auto" or one of the op's backends."""
        if name != "auto":
            self.backend(name)

    def grad_backends(self) -> list[str]:
        return [b.name for b in self.backends if b.supports_autograd]


OPS: dict[str, Op] = {}


def register(op: Op) -> Op:
    """Make ``op`` known to available_backends() and describe(); returns it."""
    names = [b.name for b in op.backends]
    if names != [n for n in BACKENDS if n in names] or "torch" not in names:
        raise ValueError(f"{op.name}: backends {names} must include 'torch' and follow {BACKENDS}")
    OPS[op.name] = op
    return op


def _needs_grad(tensors: Sequence[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def reasons(op: Op, b: Backend, args: tuple) -> list[str]:
    """Why backend ``b`` of ``op`` cannot run ``args``: its own reasons plus the gradient rule
    (an input that requires grad needs a backend with a backward, or its gradients are lost)."""
    out = list(b.not_supported_reasons(*args))
    if not b.supports_autograd and _needs_grad(b.tensors(*args)):
        out.append(f"has no backward and an input requires grad (backends with gradients: "
                   f"{', '.join(op.grad_backends())})")
    return out


def select(op: Op, backend: str, args: tuple) -> Backend:
    """The backend that runs ``args``: the named one or auto's pick; else BackendNotAvailable."""
    if backend != "auto":
        b = op.backend(backend)
        why = reasons(op, b, args)
        if why:
            # dtype-only failures stay TypeErrors, as the kernels raised them before
            cls = DtypeNotSupported if set(why) <= set(b.dtype_reasons(*args)) else \
                BackendNotAvailable
            raise cls(f"{op.name}: backend={backend!r} is not available: {'; '.join(why)}")
        return b
    device = op.backends[0].tensors(*args)[0].device
    order = priority.auto_order(op.name, device.type)
    for name in order:
        b = op.backend(name)
        if not reasons(op, b, args):
            return b
    report = []
    for b in op.backends:
        why = reasons(op, b, args) or [f"not in auto's priority list for {device.type} "
                                       f"({', '.join(order)})"]
        report.append(f"{b.name}: {', '.join(why)}")
    raise BackendNotAvailable(f"{op.name}: no backend for these inputs: {'; '.join(report)}")


def dispatch(op: Op, backend: str, *args) -> Any:
    """Run ``op`` on ``args`` (the normalized arguments of its backends' ``run``)."""
    return select(op, backend, args).run(*args)


# ---- reports -------------------------------------------------------------------------------
def _op(op: str | Op) -> Op:
    if isinstance(op, Op):
        return op
    try:
        return OPS[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}") from None


def supported_backends(op: str | Op, device: torch.device | str = "cpu"
                       ) -> dict[str, list[str]]:
    """Every backend of ``op`` -> why it cannot run on ``device`` here ([]: it can).

    Installation and device only; dtypes and shapes are checked per call.
    """
    o, dev = _op(op), torch.device(device)
    out = {}
    for b in o.backends:
        why = [w for w in (b.device_reason(dev), b.unavailable()) if w]
        out[b.name] = why
    return out


def available_backends(op: str | Op, device: torch.device | str = "cpu") -> list[str]:
    """The backends of ``op`` that can run on ``device`` in this installation (reference first)."""
    return [name for name, why in supported_backends(op, device).items() if not why]


def describe() -> str:
    """Every op's backends per device kind, and what "auto" picks (for logs and bug reports)."""
    from . import _ext

    lines = [_ext.describe()]
    for o in OPS.values():
        lines.append(o.name)
        for kind in DEVICE_KINDS:
            sup = supported_backends(o, kind)
            auto = next((n for n in priority.auto_order(o.name, kind) if not sup[n]), None)
            lines.append(f"  {kind}: auto -> {auto or 'none'}")
            for name, why in sup.items():
                lines.append(f"    {name}: {'; '.join(why) if why else 'ok'}")
    return "\n".join(lines)
