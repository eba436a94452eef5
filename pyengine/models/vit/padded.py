"""The padded-heads baseline: what stock attention kernels force a pruned model to run.

Standard attention kernels (SDPA, FlashAttention) take one head dim per call, so a model
whose heads kept different q/k and v widths must pad every head of a layer to the widest
one. :func:`pad_heads` builds that model from a compact one: each attention layer gets one
uniform q/k width (the layer's largest kept q/k dim) and one uniform v width (its largest v
dim), the extra weight rows and columns are zero, and attention runs as a single SDPA call
over all heads. Zero q/k dims add nothing to the scores and zero v dims meet zero proj
columns, so the outputs equal the compact model's; only the work (and the time) grows.

    padded = pyengine.padded.pad_heads(compact)         # same outputs, uniform heads
    pyengine.cost(padded)                               # MACs of the padded shapes
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from pyengine.models.vit.compact import CompactAttention
from pyengine.structure.spec import Block, Head, Spec


def _round_up(x: int, multiple: int) -> int:
    return int(math.ceil(x / multiple)) * multiple


class PaddedAttention(nn.Module):
    """Multi-head attention with ``num_heads`` heads of q/k width ``qk_dim`` and v width
    ``v_dim`` (timm's Attention, but the two widths may differ and need not divide ``dim``)."""

    def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int, scale: float,
                 qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        if num_heads < 1 or qk_dim < 1 or v_dim < 1:
            raise ValueError(f"PaddedAttention needs >= 1 head, q/k dim and v dim; got "
                             f"num_heads={num_heads}, qk_dim={qk_dim}, v_dim={v_dim}")
        self.num_heads, self.qk_dim, self.v_dim = num_heads, qk_dim, v_dim
        self.scale = float(scale)
        self.splits = [num_heads * qk_dim, num_heads * qk_dim, num_heads * v_dim]
        self.qkv = nn.Linear(dim, sum(self.splits), bias=qkv_bias)
        self.proj = nn.Linear(num_heads * v_dim, dim, bias=proj_bias)
        self.proj_drop = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).split(self.splits, dim=-1)
        q = q.view(B, N, self.num_heads, self.qk_dim).transpose(1, 2)
        k = k.view(B, N, self.num_heads, self.qk_dim).transpose(1, 2)
        v = v.view(B, N, self.num_heads, self.v_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, N, -1)))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, qk_dim={self.qk_dim}, v_dim={self.v_dim}"


def padded_widths(qk_dims: list[int], v_dims: list[int], head_dim: int, multiple: int = 1,
                  same_qk_v: bool = False) -> tuple[int, int]:
    """The uniform (q/k, v) widths one layer is padded to.

    The layer maxima, rounded up to ``multiple`` (at most ``head_dim``); q/k is at least 1 so
    a layer whose heads all kept no q/k dim still runs (zero scores: uniform attention, as in
    the compact model). ``same_qk_v``: one width for both, as FlashAttention requires.
    """
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple!r}")
    pqk = max(1, max(qk_dims))
    pv = max(v_dims)
    if same_qk_v:
        pqk = pv = max(pqk, pv)
    return (min(head_dim, _round_up(pqk, multiple)), min(head_dim, _round_up(pv, multiple)))


@torch.no_grad()
def pad_attention(attn: CompactAttention, head_dim: int, multiple: int = 1,
                  same_qk_v: bool = False) -> PaddedAttention:
    """The padded twin of one compact attention layer (zero-padded copies of its weights)."""
    H = len(attn.qk_dims)
    pqk, pv = padded_widths(attn.qk_dims, attn.v_dims, head_dim, multiple, same_qk_v)
    w = attn.qkv.weight
    out = PaddedAttention(attn.qkv.in_features, H, pqk, pv, attn.scale,
                          attn.qkv.bias is not None, attn.proj.bias is not None)
    out.proj_drop = copy.deepcopy(attn.proj_drop)
    out.to(device=w.device, dtype=w.dtype)
    for p in out.parameters():
        p.zero_()
    sqk = sum(attn.qk_dims)
    # compact rows: [q of every head | k of every head | v of every head], heads packed in
    # order; padded rows: the same, with head i at i * width
    src_q = src_v = 0
    for i, (dq, dv) in enumerate(zip(attn.qk_dims, attn.v_dims)):
        for src, dst in ((src_q, i * pqk), (sqk + src_q, H * pqk + i * pqk)):  # q, then k
            out.qkv.weight[dst:dst + dq] = w[src:src + dq]
            if attn.qkv.bias is not None:
                out.qkv.bias[dst:dst + dq] = attn.qkv.bias[src:src + dq]
        src, dst = 2 * sqk + src_v, 2 * H * pqk + i * pv
        out.qkv.weight[dst:dst + dv] = w[src:src + dv]
        if attn.qkv.bias is not None:
            out.qkv.bias[dst:dst + dv] = attn.qkv.bias[src:src + dv]
        out.proj.weight[:, i * pv:i * pv + dv] = attn.proj.weight[:, src_v:src_v + dv]
        src_q += dq
        src_v += dv
    if attn.proj.bias is not None:
        out.proj.bias.copy_(attn.proj.bias)
    return out


def padded_spec(spec: Spec, multiple: int = 1, same_qk_v: bool = False) -> Spec:
    """The structure the padded model really computes: every kept head of a layer at the
    layer's padded widths (its MACs are what :func:`pyengine.cost` should count)."""
    if spec.dense is None:
        raise ValueError("padded_spec needs a spec with dense geometry (pyengine.spec(model))")
    hd = spec.dense.head_dim
    blocks = []
    for b in spec.blocks:
        if not b.has_attn:
            blocks.append(b)
            continue
        pqk, pv = padded_widths(b.qk_dims, b.v_dims, hd, multiple, same_qk_v)
        heads = tuple(Head(h.index, tuple(range(pqk)), tuple(range(pv))) for h in b.heads)
        blocks.append(Block(heads, b.mlp))
    meta = dict(spec.meta)
    meta.update({"padded_from": "pyengine.padded.pad_heads", "multiple": multiple,
                 "same_qk_v": same_qk_v})
    return Spec(tuple(blocks), model=spec.model, dense=spec.dense, meta=meta)


def pad_heads(compact: nn.Module, multiple: int = 1, same_qk_v: bool = False) -> nn.Module:
    """A copy of a compact model (``pyengine.compile`` / ``pyengine.load``) whose attention
    layers run uniform, zero-padded heads through one SDPA call; same outputs.

    ``multiple``: round the padded widths up to it (8 suits tensor cores); ``same_qk_v``: pad
    q/k and v to one width (FlashAttention needs equal widths). The copy carries the padded
    structure as ``pyengine_spec``, so ``pyengine.cost(padded)`` counts its real MACs.
    """
    spec = getattr(compact, "pyengine_spec", None)
    if not isinstance(spec, Spec) or spec.dense is None:
        raise ValueError("pad_heads expects a compact model (pyengine.compile or pyengine.load); "
                         f"{type(compact).__name__} carries no pyengine_spec with dense geometry")
    from pyengine.models.vit.layout import computed_spec
    spec = computed_spec(spec)  # the compact layers' (bucket) widths are what gets padded
    out = copy.deepcopy(compact)
    hd = spec.dense.head_dim
    for blk in out.blocks:
        attn = getattr(blk, "attn", None)
        if isinstance(attn, CompactAttention):
            blk.attn = pad_attention(attn, hd, multiple, same_qk_v)
    out.pyengine_spec = padded_spec(spec, multiple, same_qk_v)
    out.__dict__.pop("pyengine_config", None)  # not a savable compact model any more
    return out


__all__ = ["PaddedAttention", "pad_heads", "pad_attention", "padded_spec", "padded_widths"]
