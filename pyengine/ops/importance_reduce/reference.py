"""The torch references of importance_reduce(_many) and their argument checks.

The checks raise the same exception types and wording as the C++ kernels, so a caller sees one
error whichever backend runs.
"""
from __future__ import annotations

import torch
from torch import Tensor

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check(x: Tensor, g: Tensor | None) -> None:
    """The argument checks of importance_reduce."""
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


def check_many(xs, gs) -> list:
    """Validate the lists of ``importance_reduce_many``; return ``gs`` as a list (None entries)."""
    if isinstance(xs, Tensor) or not isinstance(xs, (list, tuple)):
        raise TypeError(f"importance_reduce_many: xs must be a list of tensors, got "
                        f"{type(xs).__name__}")
    if gs is None:
        gs = [None] * len(xs)
    elif isinstance(gs, Tensor) or not isinstance(gs, (list, tuple)):
        raise TypeError(f"importance_reduce_many: gs must be a list of tensors/None or None, got "
                        f"{type(gs).__name__}")
    elif len(gs) != len(xs):
        raise ValueError(f"importance_reduce_many: {len(xs)} tensors in xs but {len(gs)} in gs")
    for i, (x, g) in enumerate(zip(xs, gs)):
        try:
            check(x, g)
        except (TypeError, ValueError, RuntimeError) as e:
            raise type(e)(f"importance_reduce_many: entry {i}: {e}") from None
    devs = {x.device for x in xs}
    if len(devs) > 1:
        raise RuntimeError(f"importance_reduce_many: all tensors must be on one device, got "
                           f"{sorted(str(d) for d in devs)}")
    return list(gs)


def importance_reduce_reference(x: Tensor, g: Tensor | None = None) -> Tensor:
    """Pure-PyTorch reference: float32 [3, C] = (sum |x|, sum x^2, sum |x*g|) over leading dims.

    Accumulates in float32, or float64 for float64 inputs.
    """
    check(x, g)
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


def importance_reduce_many_reference(xs: list[Tensor], gs: list[Tensor | None] | None = None
                                     ) -> list[Tensor]:
    """Pure-PyTorch reference: ``[importance_reduce_reference(x, g) for x, g in zip(xs, gs)]``."""
    gs = check_many(xs, gs)
    return [importance_reduce_reference(x, g) for x, g in zip(xs, gs)]
