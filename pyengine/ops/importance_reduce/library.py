"""torch.library registrations of importance_reduce(_many), for torch.compile and torch.export.

    torch.ops.pyengine.importance_reduce_many_triton(xs, gs) -> list of [3, C_i]
        the batched Triton kernel (kernels/importance.py); no autograd (statistics)
    torch.ops.pyengine.importance_reduce / importance_reduce_many: the csrc kernels (schemas in
        csrc/ops.cpp, whose set_python_module names this module); their fake impls live here

The Triton module is imported inside the op body: registering costs nothing and works where
Triton is missing.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from .reference import check


# ---- the Triton kernel ------------------------------------------------------------------------
@torch.library.custom_op("pyengine::importance_reduce_many_triton", mutates_args=())
def importance_reduce_many_triton(xs: list[Tensor], gs: list[Optional[Tensor]]) -> list[Tensor]:
    from pyengine.kernels import importance as K
    # the kernel writes one packed buffer; outputs of a custom op must not alias each other
    return [t.clone() for t in K.importance_reduce_many(list(xs), list(gs))]


@importance_reduce_many_triton.register_fake
def _(xs, gs):
    return [x.new_empty(3, x.shape[-1], dtype=torch.float32) for x in xs]


# ---- fake impls of the csrc kernels ----------------------------------------------------------
def _reduce_fake(x: Tensor, g: Tensor | None = None) -> Tensor:
    check(x, g)
    return x.new_empty((3, x.shape[-1]), dtype=torch.float32)


# It repeats the C++ device check (it also serves as the op's Meta kernel, where mixed devices
# would otherwise go unnoticed).
def _many_fake(xs, gs):
    devs = {t.device for t in [*xs, *gs] if t is not None}
    if len(devs) > 1:
        raise RuntimeError(f"pyengine::importance_reduce_many: all tensors must be on one "
                           f"device, got {sorted(str(d) for d in devs)}")
    total = sum(3 * x.shape[-1] for x in xs)
    return xs[0].new_empty((total,), dtype=torch.float32)


for _name, _fake in (("importance_reduce", _reduce_fake), ("importance_reduce_many", _many_fake)):
    if _ext.has_op(_name):
        torch.library.register_fake(f"pyengine::{_name}", _fake)
