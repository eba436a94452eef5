"""The torch reference of varlen_attention and its argument checks (the ground truth of tests).

The reference runs one SDPA call per run of consecutive heads with equal dims; compact models
pack heads sorted by dims so that each distinct shape is one run and the slices are views, not
gathers.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _runs(qk_dims: Sequence[int], v_dims: Sequence[int], scales: Sequence[float]):
    """Yield (count, qk, v, scale, qk_offset, v_offset) for runs of heads with equal shapes."""
    i, n = 0, len(qk_dims)
    qo = vo = 0
    while i < n:
        j = i
        while j + 1 < n and (qk_dims[j + 1], v_dims[j + 1], scales[j + 1]) == (
                qk_dims[i], v_dims[i], scales[i]):
            j += 1
        g = j - i + 1
        yield g, qk_dims[i], v_dims[i], scales[i], qo, vo
        qo += g * qk_dims[i]
        vo += g * v_dims[i]
        i = j + 1


def scales_list(scale, n: int) -> list[float]:
    """One float scale per head from a single scale or a sequence of ``n``."""
    if isinstance(scale, (int, float)):
        return [float(scale)] * n
    scales = [float(s) for s in scale]
    if len(scales) != n:
        raise ValueError(f"varlen_attention: {len(scales)} scales for {n} heads")
    return scales


def check_inputs(q, k, v, qk_dims, v_dims) -> None:
    if len(qk_dims) != len(v_dims):
        raise ValueError(f"varlen_attention: {len(qk_dims)} qk dims but {len(v_dims)} v dims")
    if any(d < 0 for d in qk_dims) or any(d < 0 for d in v_dims):
        raise ValueError("varlen_attention: head dims must be >= 0")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("varlen_attention: q, k, v must be [batch, tokens, packed dims]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] != sum(qk_dims) or k.shape[-1] != sum(qk_dims):
        raise ValueError(f"varlen_attention: q/k last dims {q.shape[-1]}/{k.shape[-1]} != "
                         f"sum(qk_dims) = {sum(qk_dims)}")
    if v.shape[-1] != sum(v_dims):
        raise ValueError(f"varlen_attention: v last dim {v.shape[-1]} != sum(v_dims) = {sum(v_dims)}")
    if k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0]:
        raise ValueError("varlen_attention: batch/token dims of q, k, v do not match: "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               qk_dims: Sequence[int], v_dims: Sequence[int],
                               scale: float | Sequence[float]) -> torch.Tensor:
    """Ground truth for every backend: plain torch, differentiable, traceable by export."""
    B, N, _ = q.shape
    scales = scales_list(scale, len(qk_dims))
    outs = []
    for g, dq, dv, s, qo, vo in _runs(qk_dims, v_dims, scales):
        if dv == 0:
            continue
        vh = v[..., vo:vo + g * dv].unflatten(-1, (g, dv)).transpose(1, 2)  # [B, g, Nk, dv]
        if dq == 0:
            # zero scores -> uniform attention over the keys
            oh = vh.mean(dim=2, keepdim=True).expand(B, g, N, dv)
        else:
            qh = q[..., qo:qo + g * dq].unflatten(-1, (g, dq)).transpose(1, 2)
            kh = k[..., qo:qo + g * dq].unflatten(-1, (g, dq)).transpose(1, 2)
            oh = F.scaled_dot_product_attention(qh, kh, vh, scale=s)
        outs.append(oh.transpose(1, 2).reshape(B, N, g * dv))
    if not outs:
        return v.new_zeros(B, N, 0)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
