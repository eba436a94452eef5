"""Batched importance-score reductions: per-channel sums of |x|, x^2 and |x * g|.

    stats = importance_reduce(x, g=None, backend="auto")   # float32 [3, C]
    stats[0] = sum |x|,  stats[1] = sum x^2,  stats[2] = sum |x * g|  (zeros when g is None)

The sums run over every leading dim of ``x`` ([..., C]: batch, tokens, ...); accumulation is in
fp32 or wider whatever the input dtype (fp32, fp16, bf16, fp64). These are the raw statistics
of the one-shot criteria (magnitude / Wanda activation norms, first-order Taylor and AGF's
|a * dL/da|).

Backends:

* ``"torch"``: the reference (pure PyTorch, always available; the ground truth of the tests).
* ``"cpu"``: the C++ kernel of ``pyengine._C`` (x on the CPU).
* ``"cuda"``: the CUDA kernel of ``pyengine._C`` (x on a CUDA device; CUDA builds only).
* ``"triton"``: not implemented yet (NotImplementedError).
* ``"auto"``: the ``pyengine._C`` kernel for x's device when the extension has one, else torch.

The compiled op is ``torch.ops.pyengine.importance_reduce(x, g=None)``; this module registers
its fake (meta) implementation so that torch.compile and torch.export can trace it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _ext

__all__ = ["importance_reduce", "importance_reduce_reference", "BACKENDS", "available_backends"]

OP_NAME = "importance_reduce"
QUALNAME = "pyengine::importance_reduce"
BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")

_TRITON_TODO = (
    "importance_reduce: the Triton backend is not implemented yet (open work item: a Triton "
    "kernel for the batched importance reduction in kernels/, tested under TRITON_INTERPRET=1); "
    "use backend='torch', 'cpu' or 'cuda'"
)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(x: Tensor, g: Tensor | None) -> None:
    """The argument checks of the op (same exception types and wording as the C++ kernels)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"importance_reduce: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("pyengine::importance_reduce: x must have at least 1 dim ([..., C]), "
                         "got a 0-dim tensor")
    if x.dtype not in _DTYPES:
        raise TypeError("pyengine::importance_reduce: x must be a floating tensor (float32, "
                        f"float16, bfloat16 or float64), got {x.dtype}")
    if g is None:
        return
    if not isinstance(g, Tensor):
        raise TypeError(f"importance_reduce: g must be a torch.Tensor or None, got "
                        f"{type(g).__name__}")
    if g.dtype not in _DTYPES:
        raise TypeError("pyengine::importance_reduce: g must be a floating tensor (float32, "
                        f"float16, bfloat16 or float64), got {g.dtype}")
    if g.shape != x.shape:
        raise ValueError(f"pyengine::importance_reduce: g must have the shape of x, got g "
                         f"{list(g.shape)} and x {list(x.shape)}")
    if g.device != x.device:
        raise RuntimeError(f"pyengine::importance_reduce: x and g must be on the same device, "
                           f"got x on {x.device} and g on {g.device}")


def importance_reduce_reference(x: Tensor, g: Tensor | None = None) -> Tensor:
    """Pure-PyTorch reference: float32 [3, C] = (sum |x|, sum x^2, sum |x*g|) over leading dims.

    Accumulates in float32, or float64 for float64 inputs.
    """
    _check(x, g)
    C = x.shape[-1]
    acc = torch.promote_types(x.dtype, torch.float32)
    if g is not None:
        acc = torch.promote_types(acc, g.dtype)
    xf = x.reshape(-1, C).to(acc)
    out = torch.zeros(3, C, dtype=acc, device=x.device)
    if xf.shape[0] == 0:
        return out.float()
    out[0] = xf.abs().sum(0)
    out[1] = (xf * xf).sum(0)
    if g is not None:
        out[2] = (xf * g.reshape(-1, C).to(acc)).abs().sum(0)
    return out.float()


def _has_kernel(device_type: str) -> bool:
    return _ext.has_kernel(OP_NAME, device_type)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device`` in this installation (reference first)."""
    dev = torch.device(device).type
    out = ["torch"]
    if dev == "cpu" and _has_kernel("cpu"):
        out.append("cpu")
    if dev == "cuda" and _has_kernel("cuda"):
        out.append("cuda")
    return out


def _unavailable(backend: str, x: Tensor) -> RuntimeError:
    if not _ext.available():
        why = _ext.load_error()
    elif backend == "cuda" and not _ext.has_cuda_kernels():
        why = ("this build of pyengine._C has no CUDA kernels (it was built C++ only: no CUDA "
               "toolkit, a CPU build of torch, or PYENGINE_NO_CUDA=1; rebuild with a CUDA "
               "toolkit matching torch.version.cuda)")
    else:
        why = f"pyengine._C has no {backend} kernel for {QUALNAME}"
    return RuntimeError(f"importance_reduce: backend={backend!r} is not available: {why}")


def importance_reduce(x: Tensor, g: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Per-channel importance statistics of ``x`` ([..., C]) as float32 [3, C].

    Row 0 = sum |x|, row 1 = sum x^2, row 2 = sum |x * g| (zeros when ``g`` is None), summed
    over all leading dims. ``g`` (optional) must have the shape, device and a floating dtype
    like ``x``. ``backend`` is one of "auto", "torch", "triton", "cuda", "cpu".
    """
    if backend not in BACKENDS:
        raise ValueError(f"importance_reduce: unknown backend {backend!r}; valid backends: "
                         f"{', '.join(BACKENDS)}")
    _check(x, g)
    dev = x.device.type
    if backend == "auto":
        backend = dev if dev in ("cpu", "cuda") and _has_kernel(dev) else "torch"
    if backend == "torch":
        return importance_reduce_reference(x, g)
    if backend == "triton":
        raise NotImplementedError(_TRITON_TODO)
    # "cpu" or "cuda": the pyengine._C kernel
    if dev != backend:
        raise RuntimeError(f"importance_reduce: backend={backend!r} needs x on a {backend} "
                           f"device, got x on {x.device}")
    if not _has_kernel(backend):
        raise _unavailable(backend, x)
    return torch.ops.pyengine.importance_reduce(x, g)


# -- fake (meta) implementation, so torch.compile / torch.export can trace the compiled op --
_fake_registered = False


def _importance_reduce_fake(x: Tensor, g: Tensor | None = None) -> Tensor:
    _check(x, g)
    return x.new_empty((3, x.shape[-1]), dtype=torch.float32)


def _register_fake() -> bool:
    global _fake_registered
    if _fake_registered:
        return True
    if not _ext.has_op(OP_NAME):
        return False
    torch.library.register_fake(QUALNAME, _importance_reduce_fake)
    _fake_registered = True
    return True


_register_fake()
