"""torch.library registrations of varlen_attention, so torch.compile and torch.export see them.

    torch.ops.pyengine.varlen_attention(q, k, v, qk_dims, v_dims, scales) -> out
        the torch reference as a custom op (autograd through the reference, FLOP formula)
    torch.ops.pyengine.varlen_attention_triton(q, k, v, qk_dims, v_dims, scales) -> (out, lse)
    torch.ops.pyengine.varlen_attention_triton_bwd(do, q, k, v, out, lse, qk_dims, v_dims,
                                                   scales) -> (dq, dk, dv)
        the Triton kernels (kernels/varlen_attention.py); the forward's autograd formula calls
        the backward op, so a compiled training step stays one graph; lse is what it needs
    torch.ops.pyengine.varlen_attention_fwd: the csrc kernel (schema in csrc/ops.cpp, whose
        set_python_module names this module); its fake impl is registered here

The Triton module is imported inside the op bodies: registering costs nothing and works where
Triton is missing.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .. import _ext
from .reference import varlen_attention_reference


def _flops(q_shape, k_shape, v_shape, qk_dims, v_dims, scales, *args, out_shape=None,
           **kwargs):
    # what FlopCounterMode counts for SDPA: 2*B*N*Nk*(qk+v) per head; qk == 0 heads are means
    B, N, _ = q_shape
    return 2 * B * N * k_shape[1] * sum(q + v for q, v in zip(qk_dims, v_dims) if q > 0)


# ---- the reference as a custom op: the slot the Triton/CUDA kernels fill ----------------------
@torch.library.custom_op("pyengine::varlen_attention", mutates_args=())
def varlen_attention_op(q: Tensor, k: Tensor, v: Tensor, qk_dims: list[int], v_dims: list[int],
                        scales: list[float]) -> Tensor:
    return varlen_attention_reference(q, k, v, qk_dims, v_dims, scales).contiguous()


@varlen_attention_op.register_fake
def _(q, k, v, qk_dims, v_dims, scales):
    return q.new_empty(q.shape[0], q.shape[1], sum(v_dims), dtype=v.dtype)


def _ref_setup(ctx, inputs, output):
    q, k, v, qk_dims, v_dims, scales = inputs
    ctx.save_for_backward(q, k, v)
    ctx.dims = (qk_dims, v_dims, scales)


def _ref_backward(ctx, grad):
    q, k, v = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = varlen_attention_reference(*leaves, *ctx.dims)
        gq, gk, gv = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    zeros = [torch.zeros_like(t) if gt is None else gt for t, gt in zip((q, k, v), (gq, gk, gv))]
    return zeros[0], zeros[1], zeros[2], None, None, None


varlen_attention_op.register_autograd(_ref_backward, setup_context=_ref_setup)
register_flop_formula(torch.ops.pyengine.varlen_attention)(_flops)


# ---- the Triton kernels -----------------------------------------------------------------------
@torch.library.custom_op("pyengine::varlen_attention_triton", mutates_args=())
def varlen_attention_triton(q: Tensor, k: Tensor, v: Tensor, qk_dims: list[int],
                            v_dims: list[int], scales: list[float]) -> tuple[Tensor, Tensor]:
    from pyengine.kernels import varlen_attention as K
    return K.forward(q, k, v, qk_dims, v_dims, scales)


@varlen_attention_triton.register_fake
def _(q, k, v, qk_dims, v_dims, scales):
    B, N = q.shape[0], q.shape[1]
    return (q.new_empty(B, N, sum(v_dims), dtype=v.dtype),
            q.new_empty(B, len(qk_dims), N, dtype=torch.float32))


@torch.library.custom_op("pyengine::varlen_attention_triton_bwd", mutates_args=())
def varlen_attention_triton_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                lse: Tensor, qk_dims: list[int], v_dims: list[int],
                                scales: list[float]) -> tuple[Tensor, Tensor, Tensor]:
    from pyengine.kernels import varlen_attention as K
    return K.backward(do, q, k, v, out, lse, qk_dims, v_dims, scales)


@varlen_attention_triton_bwd.register_fake
def _(do, q, k, v, out, lse, qk_dims, v_dims, scales):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _triton_setup(ctx, inputs, output):
    q, k, v, qk_dims, v_dims, scales = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.dims = (qk_dims, v_dims, scales)


def _triton_backward(ctx, g_out, g_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if g_out is None:
        g_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.pyengine.varlen_attention_triton_bwd(
        g_out.contiguous(), q, k, v, out, lse, *ctx.dims)
    return dq, dk, dv, None, None, None


varlen_attention_triton.register_autograd(_triton_backward, setup_context=_triton_setup)
# the same count as the reference op (what FlopCounterMode gives SDPA)
register_flop_formula(torch.ops.pyengine.varlen_attention_triton)(_flops)


# ---- fake impl of the csrc kernel ----------------------------------------------------------
# It repeats the C++ checks that shape and device inference need (it also serves as the op's
# Meta kernel, where mixed devices would otherwise go unnoticed).
def _csrc_fake(q, k, v, qk_dims, v_dims, scales):
    if not q.device == k.device == v.device:
        raise RuntimeError(f"pyengine::varlen_attention_fwd: q, k, v must be on one device, got "
                           f"{q.device}, {k.device}, {v.device}")
    if len(qk_dims) != len(v_dims) or len(qk_dims) != len(scales):
        raise ValueError("pyengine::varlen_attention_fwd: qk_dims, v_dims and scales must have "
                         "one entry per head")
    if q.dim() != 3 or v.dim() != 3:
        raise ValueError("pyengine::varlen_attention_fwd: q, k, v must be [batch, tokens, packed "
                         "dims]")
    return q.new_empty((q.shape[0], q.shape[1], sum(v_dims)), dtype=v.dtype)


if _ext.has_op("varlen_attention_fwd"):
    torch.library.register_fake("pyengine::varlen_attention_fwd", _csrc_fake)
    # counted like the reference (FlopCounterMode and pyengine.cost agree whichever backend runs)
    register_flop_formula(torch.ops.pyengine.varlen_attention_fwd)(_flops)
