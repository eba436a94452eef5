"""Batched importance-score reductions: per-channel sums of |x|, x^2 and |x * g|.

    stats = importance_reduce(x, g=None, backend="auto")   # float32 [3, C]
    stats[0] = sum |x|,  stats[1] = sum x^2,  stats[2] = sum |x * g|  (zeros when g is None)
    stats = importance_reduce_many(xs, gs=None)            # one [3, C_i] per xs[i], one launch

The sums run over every leading dim of ``x`` ([..., C]: batch, tokens, ...); accumulation is in
fp32 or wider whatever the input dtype (fp32, fp16, bf16, fp64). These are the raw statistics
of the one-shot criteria (magnitude / Wanda activation norms, first-order Taylor and AGF's
|a * dL/da|).

Here: the public functions (this file), the torch references and argument checks
(reference.py), the backends (backends.py: torch, triton = kernels/importance.py, cuda/cpu =
csrc kernels) and their torch.library registrations (library.py).
"""
from __future__ import annotations

from torch import Tensor

from ..dispatch import Op, dispatch, register
from .backends import BACKENDS as _BACKENDS
from .backends import MANY_BACKENDS as _MANY_BACKENDS
from .reference import (check, check_many, importance_reduce_many_reference,
                        importance_reduce_reference)

__all__ = ["importance_reduce", "importance_reduce_reference", "importance_reduce_many",
           "importance_reduce_many_reference", "OP", "MANY_OP"]

OP = register(Op("importance_reduce", _BACKENDS))
MANY_OP = register(Op("importance_reduce_many", _MANY_BACKENDS))


def importance_reduce(x: Tensor, g: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Per-channel importance statistics of ``x`` ([..., C]) as float32 [3, C].

    Row 0 = sum |x|, row 1 = sum x^2, row 2 = sum |x * g| (zeros when ``g`` is None), summed
    over all leading dims. ``g`` (optional) must have the shape, device and a floating dtype
    like ``x``. ``backend``: "torch" (reference), "triton", "cuda"/"cpu" (csrc kernels) or
    "auto" (pyengine/ops/priority.py: the csrc kernel for x's device when built, else torch).
    """
    OP.check_backend(backend)
    check(x, g)
    return dispatch(OP, backend, x, g)


def importance_reduce_many(xs: list[Tensor], gs: list[Tensor | None] | None = None,
                           backend: str = "auto") -> list[Tensor]:
    """:func:`importance_reduce` of many tensors of different shapes, in one launch.

    ``xs[i]`` is ``[..., C_i]``; ``gs`` is None or a list of the same length whose entries are
    None or tensors shaped like ``xs[i]``. Returns a list of float32 ``[3, C_i]``. All tensors
    must be on one device. Backends as for :func:`importance_reduce`; "triton" is one launch
    over pointer/offset tables, opt-in until GPU timings are measured.
    """
    MANY_OP.check_backend(backend)
    gs = check_many(xs, gs)
    if not xs:
        return []
    return dispatch(MANY_OP, backend, xs, gs)
