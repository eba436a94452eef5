"""torch.library registrations of masked_ffn, so torch.compile and torch.export see them.

    torch.ops.pyengine.masked_ffn_triton(x, w1, b1, w2, b2, keep, gate, act) -> (y, z, h)
    torch.ops.pyengine.masked_ffn_triton_bwd(gy, x, w1, w2, keep, gate, z, h, act, has_b1,
                                             has_b2) -> (dx, dw1, db1, dw2, db2, dgate)
        the Triton kernels (kernels/masked_ffn.py); the forward's autograd formula calls the
        backward op, so a compiled training step stays one graph; z and h are what it needs
    torch.ops.pyengine.masked_ffn_fwd: the csrc kernel (schema in csrc/ops.cpp, whose
        set_python_module names this module); its fake impl is registered here

The Triton module is imported inside the op bodies: registering costs nothing and works where
Triton is missing.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _ext


# ---- the Triton kernels -----------------------------------------------------------------------
@torch.library.custom_op("pyengine::masked_ffn_triton", mutates_args=())
def masked_ffn_triton(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                      b2: Optional[Tensor], keep: Tensor, gate: Optional[Tensor],
                      act: str) -> tuple[Tensor, Tensor, Tensor]:
    from pyengine.kernels import masked_ffn as K
    return K.forward(x, w1, b1, w2, b2, keep, gate, act)


@masked_ffn_triton.register_fake
def _(x, w1, b1, w2, b2, keep, gate, act):
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    K = keep.shape[0]
    return (x.new_empty(*x.shape[:-1], w2.shape[0]), x.new_empty(M, K), x.new_empty(M, K))


@torch.library.custom_op("pyengine::masked_ffn_triton_bwd", mutates_args=())
def masked_ffn_triton_bwd(gy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, keep: Tensor,
                          gate: Optional[Tensor], z: Tensor, h: Tensor, act: str, has_b1: bool,
                          has_b2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from pyengine.kernels import masked_ffn as K
    dx, dw1, db1, dw2, db2, dgate = K.backward(gy, x, w1, w2, keep, gate, z, h, act, has_b1,
                                               has_b2)
    # custom ops cannot return None: an empty tensor stands for "no such input" (fresh each:
    # outputs must not alias one another)
    return (dx, dw1, db1 if db1 is not None else x.new_empty(0), dw2,
            db2 if db2 is not None else x.new_empty(0),
            dgate if dgate is not None else x.new_empty(0))


@masked_ffn_triton_bwd.register_fake
def _(gy, x, w1, w2, keep, gate, z, h, act, has_b1, has_b2):
    return (torch.empty_like(x), torch.empty_like(w1),
            x.new_empty(w1.shape[0] if has_b1 else 0),
            torch.empty_like(w2), x.new_empty(w2.shape[0] if has_b2 else 0),
            gate.new_empty(gate.shape) if gate is not None else x.new_empty(0))


def _ffn_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, keep, gate, act = inputs
    _, z, h = output
    ctx.save_for_backward(x, w1, w2, keep, gate, z, h)
    ctx.act = act
    ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None


def _ffn_backward(ctx, gy, gz, gh):
    x, w1, w2, keep, gate, z, h = ctx.saved_tensors
    dx, dw1, db1, dw2, db2, dgate = torch.ops.pyengine.masked_ffn_triton_bwd(
        gy, x, w1, w2, keep, gate, z, h, ctx.act, ctx.has_b1, ctx.has_b2)
    return (dx, dw1, db1 if ctx.has_b1 else None, dw2, db2 if ctx.has_b2 else None, None,
            dgate if gate is not None else None, None)


masked_ffn_triton.register_autograd(_ffn_backward, setup_context=_ffn_setup)



# ---- fake impl of the csrc kernel ----------------------------------------------------------
# It repeats the C++ checks that shape and device inference need (it also serves as the op's
# Meta kernel, where mixed devices would otherwise go unnoticed).
def _csrc_fake(x, w1, b1, w2, b2, keep, gate, act):
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("gate", gate)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"pyengine::masked_ffn_fwd: {name} must be on x's device "
                               f"{x.device}, got {t.device}")
    if x.shape[-1] != w1.shape[1] or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"pyengine::masked_ffn_fwd: shapes do not chain: x {tuple(x.shape)}, "
                         f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    return x.new_empty((*x.shape[:-1], w2.shape[0]))


if _ext.has_op("masked_ffn_fwd"):
    torch.library.register_fake("pyengine::masked_ffn_fwd", _csrc_fake)
