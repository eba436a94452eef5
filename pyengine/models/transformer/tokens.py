"""Single-stream transformers of the BEiT lineage (timm's ``Beit`` and ``Eva``): their dense
geometry, compact block and cost rows. Every block sees all tokens (patches + prefix tokens),
the residual stream keeps the embedding width (it is not pruned).

What is counted beyond the blocks (per image, P patches, D width, C classes): the patch
embedding conv ``P*D*in_chans*ph*pw`` and the classifier ``D*C``; parameters of the patch
embedding, class/register tokens, absolute position embedding, a shared relative-position
table, the norms and the classifier.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from pyengine.models.transformer.adapter import require
from pyengine.models.transformer.compact import CompactBlock, compact_attention, compact_ffn
from pyengine.models.transformer.gated import GatedFFN, attn_heads, ffn_hidden, ffn_kind
from pyengine.models.transformer.spec import BlockShape, TransformerGeometry

__all__ = ["TokenGeometry", "token_cost_rows", "token_compact_block", "attn_config",
           "ffn_config", "check_norm"]

FFNS = ("mlp", "glu", "swiglu")
ROPES = ("none", "interleaved", "half")
REL_POS = ("none", "block", "shared")


@dataclass(frozen=True)
class TokenGeometry(TransformerGeometry):
    """Dense shape of a single-stream EVA / BEiT model (see :func:`BlockShape` for the
    per-block fields it implies)."""

    depth: int
    embed_dim: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    num_tokens: int           # tokens the blocks see: patches + prefix (class, register) tokens
    num_patches: int
    in_chans: int = 3
    patch_size: tuple[int, int] = (16, 16)
    num_classes: int = 0
    qkv_bias: str = "qv"      # "qv": q and v biases, k none (BEiT/EVA); "qkv"; "none"
    ffn: str = "mlp"          # "mlp" (GELU), "glu" (timm GluMlp, packed), "swiglu" (SwiGLU)
    rope: str = "none"        # rotary layout: "interleaved" pairs (2i, 2i+1), "half" (i, i+Dh/2)
    qk_norm: bool = False     # LayerNorm of q and k over the head dim: q/k dims stay whole
    rel_pos: str = "none"     # relative-position bias: per "block", one "shared" table, "none"
    rel_pos_rows: int = 0     # rows of the relative-position table(s)
    layer_scale: tuple[bool, bool] = (False, False)
    patch_bias: bool = True
    pos_tokens: int = 0       # rows of the absolute position embedding (0: none)
    norm_pre: bool = False
    final_norm: bool = False  # LayerNorm over all tokens after the blocks
    fc_norm: bool = False     # LayerNorm of the pooled feature
    pool: str = "avg"

    _POSITIVE = ("depth", "embed_dim", "num_heads", "head_dim", "mlp_hidden", "num_tokens",
                 "num_patches", "in_chans", "patch_size")

    def block_shapes(self) -> tuple[BlockShape, ...]:
        for name, v, allowed in (("ffn", self.ffn, FFNS), ("rope", self.rope, ROPES),
                                 ("rel_pos", self.rel_pos, REL_POS)):
            if v not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {v!r}")
        sh = BlockShape(
            dim=self.embed_dim, heads=self.num_heads, head_dim=self.head_dim,
            hidden=self.mlp_hidden, tokens=self.num_tokens, windows=1, window=self.num_tokens,
            qk_unit=1 if self.rope == "none" else 2, rope_half=self.rope == "half",
            qk_fixed=bool(self.qk_norm), glu=self.ffn != "mlp", qkv_bias=self.qkv_bias,
            attn_bias=self.rel_pos != "none",
            bias_rows=self.rel_pos_rows if self.rel_pos == "block" else 0,
            layer_scale=tuple(bool(x) for x in self.layer_scale))
        return (sh,) * self.depth


def token_compact_block(block: nn.Module, b, sh: BlockShape, copy_weights: bool,
                        rope_half: bool | None = None, npt: int = 0) -> CompactBlock:
    """The compact twin of a (dense or gated, gates folded) timm EVA / BEiT block."""
    attn = mlp = None
    if b.has_attn:
        attn = compact_attention(block.attn, b, sh, copy_weights,
                                 rope_half=rope_half if sh.qk_unit == 2 else None, npt=npt)
    if b.has_mlp:
        mlp = compact_ffn(block.mlp, b.mlp, copy_weights)

    def param(p):
        return None if p is None else nn.Parameter(p.detach().clone())

    ka, km = attn is not None, mlp is not None
    return CompactBlock(
        copy.deepcopy(block.norm1) if ka else None, attn,
        param(block.gamma_1) if ka else None, copy.deepcopy(block.drop_path1) if ka else None,
        copy.deepcopy(block.norm2) if km else None, mlp,
        param(block.gamma_2) if km else None, copy.deepcopy(block.drop_path2) if km else None)


def token_cost_rows(spec, row, batch: int, attention: str) -> None:
    """Every cost row of a single-stream EVA / BEiT ``spec`` (compact module names)."""
    from pyengine.models.transformer.cost import block_rows
    g = spec.dense
    B, N, D, P = batch, g.num_tokens, g.embed_dim, g.num_patches
    ph, pw = g.patch_size
    C = g.in_chans
    tok = B * N * D
    row("patch_embed.proj", "conv", B * P * D * C * ph * pw,
        D * C * ph * pw + (D if g.patch_bias else 0), B * P * C * ph * pw + B * P * D)
    prefix = N - P
    row("pos_embed", "elementwise", 0, (g.pos_tokens + prefix) * D, B * P * D + tok)
    if g.rel_pos == "shared":
        row("rel_pos_bias", "elementwise", 0, g.rel_pos_rows * g.num_heads,
            g.num_heads * N * N)
    if g.norm_pre:
        row("norm_pre", "norm", 0, 2 * D, 2 * tok)
    for i, (b, sh) in enumerate(zip(spec.blocks, g.shapes())):
        block_rows(row, f"blocks.{i}", sh, b, B, attention, rope=g.rope != "none",
                   qk_norm=bool(g.qk_norm))
    if g.final_norm:
        row("norm", "norm", 0, 2 * D, 2 * tok)
    if g.pool in ("avg", "avgmax", "max"):
        row("pool", "elementwise", 0, 0, B * P * D + B * D)
    if g.fc_norm:
        row("fc_norm", "norm", 0, 2 * D, 2 * B * D)
    if g.num_classes > 0:
        c = g.num_classes
        row("head", "linear", B * D * c, D * c + c, B * D + B * c)


def check_norm(norm: nn.Module, dim: int) -> bool:
    """A LayerNorm over ``dim`` with a weight and a bias (what the cost rows count)."""
    w, b = getattr(norm, "weight", None), getattr(norm, "bias", None)
    return (isinstance(norm, nn.LayerNorm) and isinstance(w, torch.Tensor)
            and isinstance(b, torch.Tensor) and tuple(w.shape) == (dim,))


def attn_config(attn: nn.Module, where: str, D: int, supported: str) -> dict:
    """What a geometry needs of one (dense or gated) EVA / BEiT attention: heads, head dim,
    q/k/v bias layout, q/k norm; unsupported parts raise."""
    H, Dh = attn_heads(attn)
    q_norm = getattr(attn, "q_norm", None)
    qk_norm = q_norm is not None and not isinstance(q_norm, nn.Identity)
    if qk_norm:
        require(check_norm(attn.q_norm, Dh) and check_norm(attn.k_norm, Dh), where,
                "q/k norm must be a LayerNorm with weight and bias over the head dim", supported)
    if attn.qkv is not None:
        qb = getattr(attn, "q_bias", None)
        require(attn.qkv.bias is None or qb is None, where, "a qkv bias and q/v biases together",
                supported)
        bias = "qv" if qb is not None else ("qkv" if attn.qkv.bias is not None else "none")
    else:
        has = [getattr(attn, f"{w}_proj").bias is not None for w in "qkv"]
        bias = {(True, False, True): "qv", (True, True, True): "qkv",
                (False, False, False): "none"}.get(tuple(has))
        require(bias is not None, where, f"q/k/v biases {has} are not a supported layout",
                supported)
    require(attn.proj.bias is not None and attn.proj.out_features == D, where,
            "proj must map the heads back to the width with a bias", supported)
    return {"num_heads": H, "head_dim": Dh, "qkv_bias": bias, "qk_norm": qk_norm}


def ffn_config(mlp: nn.Module, where: str, supported: str) -> dict:
    """Hidden width and kind of one (dense or gated) timm Mlp / GluMlp / SwiGLU."""
    kind = ffn_kind(mlp)
    require(kind in ("mlp", "glu", "swiglu"), where, f"FFN {kind} is not supported", supported)
    if not isinstance(mlp, GatedFFN):
        require(isinstance(mlp.norm, nn.Identity), where, "a norm over the FFN neurons "
                "(scale_mlp) changes when neurons are pruned", supported)
        require(isinstance(mlp.fc2, nn.Linear), where, "a 1x1-conv FFN is not supported",
                supported)
    fc1s = [mlp.fc1_g, mlp.fc1_x] if kind == "swiglu" else [mlp.fc1]
    require(all(f.bias is not None for f in fc1s) and mlp.fc2.bias is not None, where,
            "FFN layers without bias are not supported", supported)
    return {"mlp_hidden": ffn_hidden(mlp), "ffn": kind}
