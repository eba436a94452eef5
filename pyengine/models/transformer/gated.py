"""Gated drop-in replacements for the attention and FFN of timm's EVA, BEiT and Swin blocks.

They keep the original parameters under timm's attribute names (``qkv``, ``q_bias``,
``v_bias``, ``q_proj``..., ``relative_position_bias_table``, ``proj``; ``fc1``/``fc2``,
``fc1_g``/``fc1_x``), so the gated model's state dict is the dense one plus the gates, and
compute what the timm module computes with the gate values multiplied in: q/k unit gates on q
and k alike (after q/k norm and rotary embedding; a rotary pair shares its gate, and a
rotation commutes with a common scale), value gates times the head gate on v, the block gate
on the branch output, neuron gates on the FFN's hidden activation (the product of gate and
value row in a gated FFN). The hard-gated operator is exactly the compact one.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pyengine.models.transformer.gating import (attn_shapes, mlp_shapes, qk_dim_gates,
                                                unit_index)
from pyengine.models.transformer.spec import BlockShape
from pyengine.structure.gates import Gates

__all__ = ["GatedAttention", "GatedFFN", "attn_heads", "ffn_kind", "ffn_hidden",
           "relative_bias", "apply_rope"]


def attn_heads(attn: nn.Module) -> tuple[int, int]:
    """(num_heads, head_dim) of a timm EVA/BEiT/Swin attention or its gated form."""
    H = attn.num_heads
    if getattr(attn, "qkv", None) is not None:
        return H, attn.qkv.out_features // 3 // H
    return H, attn.q_proj.out_features // H


def ffn_kind(mlp: nn.Module) -> str:
    """"mlp" (fc1, act, fc2), "glu" (timm GluMlp: fc1 makes [gate | value] or [value | gate])
    or "swiglu" (timm SwiGLU: fc1_g and fc1_x)."""
    if isinstance(mlp, GatedFFN):
        return mlp.kind
    from timm.layers import GluMlp, Mlp, SwiGLU
    if type(mlp) is Mlp:
        return "mlp"
    if type(mlp) is GluMlp:
        return "glu"
    if type(mlp) is SwiGLU:
        return "swiglu"
    return type(mlp).__name__


def ffn_hidden(mlp: nn.Module) -> int:
    kind = ffn_kind(mlp)
    if kind == "glu":
        return mlp.fc1.out_features // 2
    if kind == "swiglu":
        return mlp.fc1_g.out_features
    return mlp.fc1.out_features


def relative_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[heads, n, n] additive scores bias from a relative-position table [rows, heads] and its
    index [n, n] (timm's ``_get_rel_pos_bias``)."""
    n = index.shape[0]
    return table[index.reshape(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()


def rot_interleaved(x: torch.Tensor) -> torch.Tensor:
    """[-x1, x0, -x3, x2, ...]: the rotation of adjacent pairs."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


def apply_rope(x: torch.Tensor, rope: torch.Tensor, half: bool, npt: int) -> torch.Tensor:
    """timm's ``apply_rot_embed_cat`` on the tokens after the ``npt`` prefix tokens of
    ``x`` [B, H, N, Dh]."""
    from timm.layers import apply_rot_embed_cat
    if npt == 0:
        return apply_rot_embed_cat(x, rope, half=half).type_as(x)
    return torch.cat([x[:, :, :npt, :],
                      apply_rot_embed_cat(x[:, :, npt:, :], rope, half=half)], dim=2).type_as(x)


def _window_bias(bias: torch.Tensor | None, mask: torch.Tensor | None, batch: int, heads: int,
                 n: int) -> torch.Tensor | None:
    """Swin: add the shifted-window mask [nW, n, n] to a bias [heads, n, n] (or none) for
    ``batch`` = images * nW windows -> [batch, heads, n, n]."""
    if mask is None:
        return None if bias is None else bias.unsqueeze(0)
    nw = mask.shape[0]
    b = bias if bias is not None else mask.new_zeros(heads, n, n)
    full = b.view(1, 1, heads, n, n) + mask.view(1, nw, 1, n, n)
    return full.expand(batch // nw, nw, heads, n, n).reshape(batch, heads, n, n)


class GatedAttention(nn.Module):
    """Gated timm EVA / BEiT / Swin attention (one forward for all three; the family's block
    calls it with its own keywords: EVA ``rope``, BEiT ``shared_rel_pos_bias``, Swin ``mask``).

    ``rope_half``: rotary layout of the model (None: no rotary embedding); ``npt``: prefix
    tokens that are not rotated."""

    def __init__(self, attn: nn.Module, sh: BlockShape, make_gates: Callable[[Mapping], Gates],
                 rope_half: bool | None = None, npt: int = 0):
        super().__init__()
        self.num_heads, self.head_dim = attn_heads(attn)
        self.shape = sh
        self.scale = float(attn.scale)
        self.rope_half, self.npt = rope_half, int(npt)
        for name in ("qkv", "q_proj", "k_proj", "v_proj"):
            setattr(self, name, getattr(attn, name, None))
        for name in ("q_bias", "v_bias"):
            setattr(self, name, getattr(attn, name, None))
        kb = getattr(attn, "k_bias", None)
        if kb is not None:
            self.register_buffer("k_bias", kb, persistent=False)
        else:
            self.k_bias = None
        for name in ("q_norm", "k_norm"):
            norm = getattr(attn, name, None)
            setattr(self, name, nn.Identity() if norm is None else norm)
        table = getattr(attn, "relative_position_bias_table", None)
        self.relative_position_bias_table = table
        if table is not None:
            self.register_buffer("relative_position_index", attn.relative_position_index,
                                 persistent=False)
        self.attn_drop, self.proj, self.proj_drop = attn.attn_drop, attn.proj, attn.proj_drop
        self.qkv_tap = nn.Identity()  # q|k|v after biases: what importance hooks record
        self.register_buffer("unit_index", unit_index(sh), persistent=False)
        self.gates = make_gates(attn_shapes(sh))

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, 3 * H * Dh]: q | k | v as the timm module computes them."""
        if self.qkv is None:
            out = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        elif self.q_bias is not None:
            bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            out = F.linear(x, self.qkv.weight, bias)
        else:
            out = self.qkv(x)
        return self.qkv_tap(out)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                shared_rel_pos_bias: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("pyengine's gated attention takes no attention mask")
        g = self.gates.values()
        B, N, _ = x.shape
        H, Dh = self.num_heads, self.head_dim
        q, k, v = self.project_qkv(x).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = apply_rope(q, rope, bool(self.rope_half), self.npt)
            k = apply_rope(k, rope, bool(self.rope_half), self.npt)
        gqk = qk_dim_gates(g, self.shape, self.unit_index)
        if gqk is not None:
            q, k = q * gqk[None, :, None, :], k * gqk[None, :, None, :]
        v = v * (g["v"] * g["head"][:, None])[None, :, None, :]
        bias = None
        if self.relative_position_bias_table is not None:
            bias = relative_bias(self.relative_position_bias_table, self.relative_position_index)
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        bias = _window_bias(bias, mask, B, H, N)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), scale=self.scale,
            dropout_p=self.attn_drop.p if self.training else 0.0)
        o = self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, N, H * Dh)))
        return o * g["block"]

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, gates={self.gates.kind}"


class GatedFFN(nn.Module):
    """Gated timm Mlp / GluMlp / SwiGLU (no norm over the hidden neurons)."""

    def __init__(self, mlp: nn.Module, sh: BlockShape, make_gates: Callable[[Mapping], Gates]):
        super().__init__()
        self.kind = ffn_kind(mlp)
        self.hidden = ffn_hidden(mlp)
        if self.kind == "swiglu":
            self.fc1_g, self.fc1_x = mlp.fc1_g, mlp.fc1_x
        else:
            self.fc1 = mlp.fc1
        self.gate_last = bool(getattr(mlp, "gate_last", False))
        self.act, self.drop1, self.fc2, self.drop2 = mlp.act, mlp.drop1, mlp.fc2, mlp.drop2
        self.gates = make_gates(mlp_shapes(sh))

    def hidden_act(self, x: torch.Tensor) -> torch.Tensor:
        """The activation fc2 reads, per neuron."""
        if self.kind == "mlp":
            return self.drop1(self.act(self.fc1(x)))
        if self.kind == "swiglu":
            return self.drop1(self.act(self.fc1_g(x)) * self.fc1_x(x))
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.drop1(a * self.act(b) if self.gate_last else self.act(a) * b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gates.values()
        return self.drop2(self.fc2(self.hidden_act(x) * g["neuron"])) * g["block"]

    def extra_repr(self) -> str:
        return f"kind={self.kind}, hidden={self.hidden}, gates={self.gates.kind}"
