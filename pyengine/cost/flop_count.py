"""FLOPs as ``torch.utils.flop_counter.FlopCounterMode`` counts them, independent of which
scaled-dot-product-attention kernel torch picks.

FlopCounterMode counts an SDPA call only when it has a formula for the aten kernel that runs,
and which kernel runs is torch's choice (torch 2.14 counts 0 for CPU flash attention, the
math fallback as two bmm). :func:`count_flops` therefore runs the model with
``torch.nn.functional.scaled_dot_product_attention`` replaced by its math (``q @ k^T``,
softmax, ``@ v`` in plain torch ops), which every torch version counts as
``2*B*H*Nq*Nk*(qk + v)`` FLOPs; matmuls, convs and custom ops with a registered formula
(``pyengine::varlen_attention``) count as usual.

    flops = count_flops(model, x)       # what pyengine.cost(model, batch=len(x)).flops predicts
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "math_attention", "sdpa_math"]


def sdpa_math(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
    """``F.scaled_dot_product_attention`` written as plain torch ops (same semantics)."""
    L, S = query.shape[-2], key.shape[-2]
    s = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and query.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    scores = (query @ key.transpose(-2, -1)) * s
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    p = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    return p @ value


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Within the block, ``F.scaled_dot_product_attention`` is :func:`sdpa_math` (timm and
    pyengine call it through the module attribute, so the swap reaches them)."""
    orig = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = sdpa_math
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig


def count_flops(fn: Callable, *args, **kwargs) -> int:
    """FLOPs of ``fn(*args, **kwargs)`` (a model or any callable) under FlopCounterMode, with
    attention counted as its math (see the module docstring); no autograd graph is built."""
    with math_attention(), FlopCounterMode(display=False) as fc, torch.no_grad():
        fn(*args, **kwargs)
    return int(fc.get_total_flops())
