"""Compact (dense, smaller) modules that a pruned ViT compiles into.

A compact block keeps only what its :class:`~pyengine.spec.Block` lists: one fused qkv
Linear over the kept q/k/v dims of the kept heads (packed sorted by head shape, so the
varlen-attention op sees one run per distinct shape), a proj Linear over the kept value dims,
and a timm Mlp over the kept neurons. A removed attention or FFN branch is gone entirely:
the block passes the residual through.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from pyengine import ops
from pyengine.structure.spec import Block as BlockSpec
from pyengine.structure.spec import Head


def packing_order(heads: tuple[Head, ...]) -> list[Head]:
    """Kept heads in packed order: grouped by (qk dim, v dim), then by dense index."""
    return sorted(heads, key=lambda h: (len(h.qk), len(h.v), h.index))


class CompactAttention(nn.Module):
    def __init__(self, dim: int, heads: list[Head], scale: float, qkv_bias: bool = True,
                 proj_bias: bool = True, backend: str = "auto"):
        super().__init__()
        self.head_index = [h.index for h in heads]
        self.qk_dims = [len(h.qk) for h in heads]
        self.v_dims = [len(h.v) for h in heads]
        self.scale = float(scale)
        self.backend = backend
        sqk, sv = sum(self.qk_dims), sum(self.v_dims)
        self.splits = [sqk, sqk, sv]
        self.qkv = nn.Linear(dim, 2 * sqk + sv, bias=qkv_bias)
        self.proj = nn.Linear(sv, dim, bias=proj_bias)
        self.proj_drop = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(self.splits, dim=-1)
        o = ops.varlen_attention(q, k, v, self.qk_dims, self.v_dims, self.scale,
                                 backend=self.backend)
        return self.proj_drop(self.proj(o))

    def extra_repr(self) -> str:
        return f"heads={self.head_index}, qk_dims={self.qk_dims}, v_dims={self.v_dims}"


class CompactBlock(nn.Module):
    """A pre-norm ViT block whose attention and/or FFN branch may be absent."""

    def __init__(self, norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2):
        super().__init__()
        self.norm1, self.attn, self.ls1, self.drop_path1 = norm1, attn, ls1, drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = norm2, mlp, ls2, drop_path2

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("compact ViT blocks do not take attention masks yet")
        if self.attn is not None:
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        if self.mlp is not None:
            x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def _rows(head: Head, which: int, H: int, Dh: int, dims) -> list[int]:
    return [which * H * Dh + head.index * Dh + j for j in dims]


@torch.no_grad()
def compact_block(block: nn.Module, bspec: BlockSpec, copy_weights: bool) -> CompactBlock:
    """Build the compact twin of a timm (or gated) ViT block; copy gathered weights if asked."""
    from timm.layers import Mlp

    attn, mlp = block.attn, block.mlp
    H, Dh = attn.num_heads, attn.head_dim
    dim = attn.qkv.in_features
    new_attn = None
    if bspec.has_attn:
        heads = packing_order(bspec.heads)
        new_attn = CompactAttention(dim, heads, attn.scale, attn.qkv.bias is not None,
                                    attn.proj.bias is not None)
        new_attn.proj_drop = copy.deepcopy(attn.proj_drop)
        new_attn.to(device=attn.qkv.weight.device, dtype=attn.qkv.weight.dtype)
        if copy_weights:
            rows = ([r for h in heads for r in _rows(h, 0, H, Dh, h.qk)]
                    + [r for h in heads for r in _rows(h, 1, H, Dh, h.qk)]
                    + [r for h in heads for r in _rows(h, 2, H, Dh, h.v)])
            cols = [h.index * Dh + j for h in heads for j in h.v]
            ri = torch.tensor(rows, dtype=torch.long, device=attn.qkv.weight.device)
            ci = torch.tensor(cols, dtype=torch.long, device=attn.qkv.weight.device)
            new_attn.qkv.weight.copy_(attn.qkv.weight.index_select(0, ri))
            if attn.qkv.bias is not None:
                new_attn.qkv.bias.copy_(attn.qkv.bias.index_select(0, ri))
            new_attn.proj.weight.copy_(attn.proj.weight.index_select(1, ci))
            if attn.proj.bias is not None:
                new_attn.proj.bias.copy_(attn.proj.bias)
    new_mlp = None
    if bspec.has_mlp:
        m = len(bspec.mlp)
        new_mlp = Mlp(mlp.fc1.in_features, m, mlp.fc2.out_features,
                      bias=(mlp.fc1.bias is not None, mlp.fc2.bias is not None))
        new_mlp.act = copy.deepcopy(mlp.act)
        new_mlp.drop1, new_mlp.drop2 = copy.deepcopy(mlp.drop1), copy.deepcopy(mlp.drop2)
        new_mlp.to(device=mlp.fc1.weight.device, dtype=mlp.fc1.weight.dtype)
        if copy_weights:
            idx = torch.tensor(bspec.mlp, dtype=torch.long, device=mlp.fc1.weight.device)
            new_mlp.fc1.weight.copy_(mlp.fc1.weight.index_select(0, idx))
            if mlp.fc1.bias is not None:
                new_mlp.fc1.bias.copy_(mlp.fc1.bias.index_select(0, idx))
            new_mlp.fc2.weight.copy_(mlp.fc2.weight.index_select(1, idx))
            if mlp.fc2.bias is not None:
                new_mlp.fc2.bias.copy_(mlp.fc2.bias)
    keep_a, keep_m = new_attn is not None, new_mlp is not None
    return CompactBlock(
        copy.deepcopy(block.norm1) if keep_a else None, new_attn,
        copy.deepcopy(block.ls1) if keep_a else None, copy.deepcopy(block.drop_path1) if keep_a else None,
        copy.deepcopy(block.norm2) if keep_m else None, new_mlp,
        copy.deepcopy(block.ls2) if keep_m else None, copy.deepcopy(block.drop_path2) if keep_m else None)


@torch.no_grad()
def fold_gates(model: nn.Module) -> None:
    """In place: multiply the gate values of every gated ViT module into its weights, so that
    the block computes the same with the kept gates at 1. Mask gates are 0/1, so this changes
    nothing for them; SSS scale factors (any real value) survive compile this way.

    q/k gates scale q and k rows alike (q*g . k*g, as the gated forward does), value gates
    (times the head gate) scale v rows, the block gate scales proj (or fc2) weight and bias,
    and neuron gates scale the fc2 columns that read them.
    """
    from pyengine.models.vit.gated import GatedAttention, GatedMlp

    for m in model.modules():
        if isinstance(m, GatedAttention):
            g = m.gates.values()
            H, Dh = m.num_heads, m.head_dim
            row = torch.cat([g["qk"].reshape(-1), g["qk"].reshape(-1),
                             (g["v"] * g["head"][:, None]).reshape(-1)])
            row = row.to(m.qkv.weight.dtype)
            assert row.numel() == 3 * H * Dh
            m.qkv.weight.mul_(row[:, None])
            if m.qkv.bias is not None:
                m.qkv.bias.mul_(row)
            m.proj.weight.mul_(g["block"])
            if m.proj.bias is not None:
                m.proj.bias.mul_(g["block"])
        elif isinstance(m, GatedMlp):
            g = m.gates.values()
            m.fc2.weight.mul_(g["neuron"].to(m.fc2.weight.dtype)[None, :] * g["block"])
            if m.fc2.bias is not None:
                m.fc2.bias.mul_(g["block"])
