"""torch.library custom ops for the Triton kernels, so torch.compile and torch.export see them.

    torch.ops.pyengine.varlen_attention_triton(q, k, v, qk_dims, v_dims, scales) -> (out, lse)
    torch.ops.pyengine.varlen_attention_triton_bwd(do, q, k, v, out, lse, qk_dims, v_dims,
                                                   scales) -> (dq, dk, dv)
    torch.ops.pyengine.masked_ffn_triton(x, w1, b1, w2, b2, keep, gate, act) -> (y, z, h)
    torch.ops.pyengine.masked_ffn_triton_bwd(gy, x, w1, w2, keep, gate, z, h, act, has_b1,
                                             has_b2) -> (dx, dw1, db1, dw2, db2, dgate)
    torch.ops.pyengine.importance_reduce_many_triton(xs, gs) -> list of [3, C_i]

Each has a fake (meta) implementation; the forward ops have autograd formulas whose backward
is itself a custom op, so a compiled training step stays one graph. The extra outputs (lse,
z, h) are what the backward needs; the Python wrappers in pyengine.ops return only the result.
The Triton modules are imported inside the op bodies: registering the ops costs nothing and
works where Triton is missing.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

# ---- varlen-head attention ---------------------------------------------------------------------


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


def _attn_setup(ctx, inputs, output):
    q, k, v, qk_dims, v_dims, scales = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.dims = (qk_dims, v_dims, scales)


def _attn_backward(ctx, g_out, g_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if g_out is None:
        g_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.pyengine.varlen_attention_triton_bwd(
        g_out.contiguous(), q, k, v, out, lse, *ctx.dims)
    return dq, dk, dv, None, None, None


varlen_attention_triton.register_autograd(_attn_backward, setup_context=_attn_setup)


@register_flop_formula(torch.ops.pyengine.varlen_attention_triton)
def _attn_flops(q_shape, k_shape, v_shape, qk_dims, v_dims, scales, *args, out_shape=None,
                **kwargs):
    # the same count as the reference op (what FlopCounterMode gives SDPA); qk == 0: means
    B, N, _ = q_shape
    return 2 * B * N * k_shape[1] * sum(q + v for q, v in zip(qk_dims, v_dims) if q > 0)


# ---- masked FFN --------------------------------------------------------------------------------


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


# ---- batched importance reduction --------------------------------------------------------------


@torch.library.custom_op("pyengine::importance_reduce_many_triton", mutates_args=())
def importance_reduce_many_triton(xs: list[Tensor], gs: list[Optional[Tensor]]) -> list[Tensor]:
    from pyengine.kernels import importance as K
    # the kernel writes one packed buffer; outputs of a custom op must not alias each other
    return [t.clone() for t in K.importance_reduce_many(list(xs), list(gs))]


@importance_reduce_many_triton.register_fake
def _(xs, gs):
    return [x.new_empty(3, x.shape[-1], dtype=torch.float32) for x in xs]
