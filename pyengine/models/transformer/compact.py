"""Compact (dense, smaller) attention and FFN of the EVA, BEiT and Swin families, the block
EVA and BEiT compile into, and folding gate values into weights.

A compact attention keeps one fused qkv Linear over the kept q/k and value dims of the kept
heads, packed sorted by head shape (one run per distinct (q/k, v) width) with a head's rotary
pairs side by side, so one interleaved rotation serves both rotary layouts; the q/v biases
(k has none in EVA/BEiT), a q/k norm (its weights in the packed order), the columns of the
relative-position table of the kept heads, and a proj Linear over the kept value dims.
Attention without an additive bias runs on ``pyengine.ops.varlen_attention``; with one
(relative position, Swin's shifted-window mask) it runs one SDPA per run of equal head shapes
(:func:`biased_varlen_attention`).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyengine import ops
from pyengine.models.transformer.gated import (GatedAttention, GatedFFN, attn_heads,
                                               ffn_hidden, ffn_kind, relative_bias,
                                               rot_interleaved)
from pyengine.models.transformer.gating import qk_dim_gates
from pyengine.models.transformer.spec import BlockShape
from pyengine.structure.spec import Block, Head

__all__ = ["CompactAttention", "CompactBlock", "biased_varlen_attention", "compact_attention",
           "compact_ffn", "fold_gates", "packing_order", "qk_order"]


def packing_order(heads: Sequence[Head]) -> list[Head]:
    """Kept heads in packed order: grouped by (q/k dims, v dims), then by dense index."""
    return sorted(heads, key=lambda h: (len(h.qk), len(h.v), h.index))


def qk_order(head: Head, sh: BlockShape) -> list[int]:
    """A head's kept q/k dims in packed order: unit by unit (a rotary pair side by side)."""
    units = sorted({sh.unit_of(d) for d in head.qk})
    return [d for u in units for d in sh.unit_dims(u)]


def biased_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            qk_dims: Sequence[int], v_dims: Sequence[int], scale: float,
                            bias: torch.Tensor | None, mask: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """Heads of different widths (packed as in ``ops.varlen_attention``) with an additive
    scores bias: ``softmax(q_h k_h^T * scale + bias_h + mask) v_h``. ``bias`` [heads, N, N]
    (relative position), ``mask`` [nW, N, N] (Swin's shifted windows; the batch runs over
    images x nW windows), either may be None. A head without q/k dims attends by its bias
    alone. One SDPA call per run of equal head shapes where q/k and v widths agree (fused on
    the CPU), else timm's unfused path (a matmul pair, broadcast adds of bias and mask)."""
    from pyengine.ops.varlen_attention.reference import _runs, scales_list
    B, N, _ = q.shape
    outs = []
    h0 = 0
    for g, dq, dv, s, qo, vo in _runs(list(qk_dims), list(v_dims), scales_list(scale, len(qk_dims))):
        b = None if bias is None else bias[h0:h0 + g].to(v.dtype)
        h0 += g
        vh = v[..., vo:vo + g * dv].unflatten(-1, (g, dv)).transpose(1, 2)  # [B, g, N, dv]
        if dq > 0:
            qh = q[..., qo:qo + g * dq].unflatten(-1, (g, dq)).transpose(1, 2)
            kh = k[..., qo:qo + g * dq].unflatten(-1, (g, dq)).transpose(1, 2)
        if dq > 0 and dq == dv:
            # equal q/k and v widths: one fused SDPA call (torch's CPU flash kernel takes it)
            m = b if b is not None else v.new_zeros(g, N, N)
            if mask is not None:
                nw = mask.shape[0]
                m = (m[None, None] + mask.to(v.dtype)[None, :, None]).expand(
                    B // nw, nw, g, N, N).reshape(B, g, N, N)
            oh = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=m, scale=s)
        else:
            if dq > 0:
                att = (qh * s) @ kh.transpose(-2, -1)
                if b is not None:
                    att = att + b
            else:
                att = (b if b is not None else v.new_zeros(g, N, N)).expand(B, g, N, N)
            if mask is not None:
                nw = mask.shape[0]
                att = (att.view(-1, nw, g, N, N) + mask.to(v.dtype)[None, :, None]).view(
                    B, g, N, N)
            oh = att.softmax(dim=-1) @ vh
        outs.append(oh.transpose(1, 2).reshape(B, N, g * dv))
    if not outs:
        return v.new_zeros(B, N, 0)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


class CompactAttention(nn.Module):
    """Attention over the kept heads of one block (see the module docstring)."""

    def __init__(self, dim: int, heads: list[Head], sh: BlockShape, scale: float,
                 proj_bias: bool = True, rope_half: bool | None = None, npt: int = 0,
                 qk_norm: nn.Module | None = None, relative_index: torch.Tensor | None = None,
                 backend: str = "auto"):
        super().__init__()
        self.head_index = [h.index for h in heads]
        self.qk_dims = [len(h.qk) for h in heads]
        self.v_dims = [len(h.v) for h in heads]
        self.head_dim = sh.head_dim
        self.scale = float(scale)
        self.backend = backend
        self.npt = int(npt)
        sqk, sv = sum(self.qk_dims), sum(self.v_dims)
        self.splits = [sqk, sqk, sv]
        self.qkv = nn.Linear(dim, 2 * sqk + sv, bias=sh.qkv_bias == "qkv")
        if sh.qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(sqk))
            self.v_bias = nn.Parameter(torch.zeros(sv))
            self.register_buffer("k_bias", torch.zeros(sqk), persistent=False)
        else:
            self.q_bias = self.v_bias = self.k_bias = None
        # q/k norm over each head's (full, fixed) dims, weights permuted into packed order
        self.q_norm = copy.deepcopy(qk_norm[0]) if qk_norm is not None else None
        self.k_norm = copy.deepcopy(qk_norm[1]) if qk_norm is not None else None
        self.register_buffer("head_index_t", torch.tensor(self.head_index, dtype=torch.long),
                             persistent=False)
        if rope_half is not None:
            dims = [d for h in heads for d in qk_order(h, sh)]
            self.register_buffer("rope_index", torch.tensor(dims, dtype=torch.long),
                                 persistent=False)
        else:
            self.rope_index = None
        if relative_index is not None:
            rows = sh.bias_rows
            self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, len(heads)))
            self.register_buffer("relative_position_index", relative_index.clone(),
                                 persistent=False)
        else:
            self.relative_position_bias_table = None
        self.proj = nn.Linear(sv, dim, bias=proj_bias)
        self.proj_drop = nn.Identity()

    def _rope(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        if rope.dim() == 4:  # [B, 1, N, 2 Dh] (patch dropout): the head axis is shared
            rope = rope[:, 0]
        dh = rope.shape[-1] // 2
        sin = rope[..., :dh].index_select(-1, self.rope_index)
        cos = rope[..., dh:].index_select(-1, self.rope_index)
        t = x[:, self.npt:]
        t = (t * cos + rot_interleaved(t) * sin).to(x.dtype)
        return t if self.npt == 0 else torch.cat([x[:, :self.npt], t], dim=1)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                shared_rel_pos_bias: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("compact attention takes no attention mask")
        B, N, _ = x.shape
        if self.q_bias is not None:
            qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        else:
            qkv = self.qkv(x)
        q, k, v = qkv.split(self.splits, dim=-1)
        if self.q_norm is not None:
            q = self.q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(-2)
            k = self.k_norm(k.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        if rope is not None and self.rope_index is not None:
            q, k = self._rope(q, rope), self._rope(k, rope)
        bias = None
        if self.relative_position_bias_table is not None:
            bias = relative_bias(self.relative_position_bias_table, self.relative_position_index)
        if shared_rel_pos_bias is not None:
            shared = shared_rel_pos_bias.index_select(0, self.head_index_t)
            bias = shared if bias is None else bias + shared
        if bias is None and mask is None:
            o = ops.varlen_attention(q, k, v, self.qk_dims, self.v_dims, self.scale,
                                     backend=self.backend)
        else:
            o = biased_varlen_attention(q, k, v, self.qk_dims, self.v_dims, self.scale, bias,
                                        mask)
        return self.proj_drop(self.proj(o))

    def extra_repr(self) -> str:
        return f"heads={self.head_index}, qk_dims={self.qk_dims}, v_dims={self.v_dims}"


class CompactBlock(nn.Module):
    """A pre-norm EVA / BEiT block whose attention and/or FFN branch may be absent (the
    residual stream passes through); layer scales ``gamma_1``/``gamma_2`` as in timm."""

    def __init__(self, norm1, attn, gamma_1, drop_path1, norm2, mlp, gamma_2, drop_path2):
        super().__init__()
        self.norm1, self.attn, self.drop_path1 = norm1, attn, drop_path1
        self.norm2, self.mlp, self.drop_path2 = norm2, mlp, drop_path2
        self.gamma_1, self.gamma_2 = gamma_1, gamma_2

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.attn is not None:
            a = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal,
                          shared_rel_pos_bias=shared_rel_pos_bias)
            x = x + self.drop_path1(a if self.gamma_1 is None else self.gamma_1 * a)
        if self.mlp is not None:
            m = self.mlp(self.norm2(x))
            x = x + self.drop_path2(m if self.gamma_2 is None else self.gamma_2 * m)
        return x


# ---- weights of a (dense or folded gated) timm attention ------------------------------------
def _qkv_weights(attn: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """(weight [3 * H * Dh, D] as q | k | v, [q bias, k bias, v bias])."""
    if getattr(attn, "qkv", None) is not None:
        W = attn.qkv.weight
        if getattr(attn, "q_bias", None) is not None:
            return W, [attn.q_bias, attn.k_bias, attn.v_bias]
        b = attn.qkv.bias
        if b is None:
            return W, [None, None, None]
        return W, list(b.chunk(3))
    W = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    return W, [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]


@torch.no_grad()
def compact_attention(attn: nn.Module, b: Block, sh: BlockShape, copy_weights: bool,
                      rope_half: bool | None = None, npt: int = 0) -> CompactAttention:
    """The compact twin of a timm (or gated, gates folded) EVA/BEiT/Swin attention."""
    H, Dh = attn_heads(attn)
    heads = packing_order(b.heads)
    dev, dt = attn.proj.weight.device, attn.proj.weight.dtype
    qk_norm = None
    order = None
    if sh.qk_fixed and not isinstance(attn.q_norm, nn.Identity):
        order = qk_order(Head(0, tuple(range(Dh)), ()), sh)
        qk_norm = []
        for norm in (attn.q_norm, attn.k_norm):
            n = copy.deepcopy(norm)
            for p in n.parameters():
                if p.dim() == 1 and p.shape[0] == Dh:
                    p.copy_(p[order])
            qk_norm.append(n)
    table = getattr(attn, "relative_position_bias_table", None)
    new = CompactAttention(attn.proj.out_features, heads, sh, attn.scale,
                           attn.proj.bias is not None, rope_half, npt, qk_norm,
                           attn.relative_position_index if table is not None else None)
    new.proj_drop = copy.deepcopy(attn.proj_drop)
    new.to(device=dev, dtype=dt)
    if not copy_weights:
        return new
    q = [h.index * Dh + d for h in heads for d in qk_order(h, sh)]
    vv = [h.index * Dh + d for h in heads for d in h.v]
    idx = lambda lst: torch.tensor(lst, dtype=torch.long, device=dev)  # noqa: E731
    W, (bq, bk, bv) = _qkv_weights(attn)
    rows = idx(q + [H * Dh + r for r in q] + [2 * H * Dh + r for r in vv])
    new.qkv.weight.copy_(W.index_select(0, rows))
    if sh.qkv_bias == "qkv":
        new.qkv.bias.copy_(torch.cat([bq.index_select(0, idx(q)), bk.index_select(0, idx(q)),
                                      bv.index_select(0, idx(vv))]))
    elif sh.qkv_bias == "qv":
        new.q_bias.copy_(bq.index_select(0, idx(q)))
        new.v_bias.copy_(bv.index_select(0, idx(vv)))
    new.proj.weight.copy_(attn.proj.weight.index_select(1, idx(vv)))
    if attn.proj.bias is not None:
        new.proj.bias.copy_(attn.proj.bias)
    if table is not None:
        new.relative_position_bias_table.copy_(table.index_select(1, idx(new.head_index)))
    return new


@torch.no_grad()
def compact_ffn(mlp: nn.Module, neurons: Sequence[int], copy_weights: bool) -> nn.Module:
    """The timm Mlp / GluMlp / SwiGLU over the kept ``neurons`` of ``mlp``."""
    from timm.layers import GluMlp, Mlp, SwiGLU
    kind = ffn_kind(mlp)
    m = len(neurons)
    fc1 = mlp.fc1_g if kind == "swiglu" else mlp.fc1
    D, Dout = fc1.in_features, mlp.fc2.out_features
    bias = (fc1.bias is not None, mlp.fc2.bias is not None)
    if kind == "mlp":
        new = Mlp(D, m, Dout, bias=bias)
    elif kind == "glu":
        new = GluMlp(D, 2 * m, Dout, act_layer=nn.SiLU, bias=bias,
                     gate_last=bool(getattr(mlp, "gate_last", False)))
    else:
        new = SwiGLU(D, m, Dout, bias=bias)
    new.act = copy.deepcopy(mlp.act)
    new.drop1, new.drop2 = copy.deepcopy(mlp.drop1), copy.deepcopy(mlp.drop2)
    new.to(device=mlp.fc2.weight.device, dtype=mlp.fc2.weight.dtype)
    if not copy_weights:
        return new
    dev = mlp.fc2.weight.device
    idx = torch.tensor(list(neurons), dtype=torch.long, device=dev)
    M = ffn_hidden(mlp)
    pairs = [(new.fc1, mlp.fc1, torch.cat([idx, idx + M]) if kind == "glu" else idx)] \
        if kind != "swiglu" else [(new.fc1_g, mlp.fc1_g, idx), (new.fc1_x, mlp.fc1_x, idx)]
    for dst, src, rows in pairs:
        dst.weight.copy_(src.weight.index_select(0, rows))
        if src.bias is not None:
            dst.bias.copy_(src.bias.index_select(0, rows))
    new.fc2.weight.copy_(mlp.fc2.weight.index_select(1, idx))
    if mlp.fc2.bias is not None:
        new.fc2.bias.copy_(mlp.fc2.bias)
    return new


@torch.no_grad()
def fold_gates(model: nn.Module) -> None:
    """In place: multiply the gate values of every gated attention / FFN of ``model`` into its
    weights, so the kept units compute the same with their gates at 1 (mask gates are 0/1 and
    change nothing; SSS's real-valued factors survive compile this way). q/k unit gates scale
    the q and k rows (q*g . k*g), value gates times the head gate the v rows, the block gate
    proj (fc2) weight and bias, neuron gates the fc2 columns that read them."""
    for m in model.modules():
        if isinstance(m, GatedAttention):
            g = m.gates.values()
            H, Dh = m.num_heads, m.head_dim
            W = m.proj.weight
            gqk = qk_dim_gates(g, m.shape, m.unit_index)
            rq = (gqk if gqk is not None else torch.ones(H, Dh, device=W.device)).reshape(-1)
            rv = (g["v"] * g["head"][:, None]).reshape(-1)
            rq, rv = rq.to(W.dtype), rv.to(W.dtype)
            if m.qkv is not None:
                row = torch.cat([rq, rq, rv])
                m.qkv.weight.mul_(row[:, None])
                if m.qkv.bias is not None:
                    m.qkv.bias.mul_(row)
                if m.q_bias is not None:
                    m.q_bias.mul_(rq)
                    m.k_bias.mul_(rq)
                    m.v_bias.mul_(rv)
            else:
                for lin, r in ((m.q_proj, rq), (m.k_proj, rq), (m.v_proj, rv)):
                    lin.weight.mul_(r[:, None])
                    if lin.bias is not None:
                        lin.bias.mul_(r)
            m.proj.weight.mul_(g["block"])
            if m.proj.bias is not None:
                m.proj.bias.mul_(g["block"])
        elif isinstance(m, GatedFFN):
            g = m.gates.values()
            m.fc2.weight.mul_(g["neuron"].to(m.fc2.weight.dtype)[None, :] * g["block"])
            if m.fc2.bias is not None:
                m.fc2.bias.mul_(g["block"])
