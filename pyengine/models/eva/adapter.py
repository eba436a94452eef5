"""The adapter of timm EVA / EVA02 models (``timm.models.eva.Eva``: eva02_*, eva_*).

Structure units, per block: the heads with their q/k dims and value dims, and the FFN
neurons (:class:`EvaSpec`). With rotary position embedding a q/k unit is a rotary pair (both
dims are rotated together, so they are kept or pruned together), in the model's layout
(interleaved pairs (2i, 2i+1) or halves (i, i+Dh/2)). A SwiGLU neuron owns its gate and value
rows of fc1 (``GluMlp`` packed or ``SwiGLU`` split) and its fc2 column. With q/k norm (a
LayerNorm over the whole head dim) q/k dims are not prunable; heads and value dims still
are. The residual stream (embedding width) is not pruned.

Not supported (a clear error at gate time): post-norm blocks, ``AttentionRope`` /
grouped-query attention, the gated attention output, the inner attention norm
(``scale_attn_inner``), an FFN norm over the neurons (``scale_mlp``: eva02_base/large),
mixed or DINOv3 rotary embeddings, attention pooling (``global_pool="map"``).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pyengine.models.base import register_adapter
from pyengine.models.transformer.adapter import TransformerAdapter, require
from pyengine.models.transformer.gated import GatedAttention
from pyengine.models.transformer.spec import TransformerSpec
from pyengine.models.transformer.tokens import (TokenGeometry, attn_config, check_norm, ffn_config,
                                                token_compact_block, token_cost_rows)
from pyengine.structure.spec import register_spec_type

SUPPORTED = ("timm Eva models with pre-norm EvaBlocks, EvaAttention (fused or separate qkv, "
             "optional q/k LayerNorm), rotary 'cat' embeddings or none, and a Mlp / SwiGLU FFN "
             "without a hidden norm (eva02_tiny/small_*, eva_giant_*, ...)")


@dataclass(frozen=True)
class EvaGeometry(TokenGeometry):
    """Dense shape of a timm EVA (see :class:`~pyengine.models.transformer.tokens.TokenGeometry`)."""


@register_spec_type("eva")
@dataclass(frozen=True)
class EvaSpec(TransformerSpec):
    """What a pruned EVA keeps (JSON ``"family": "eva"``; rotary pairs kept whole)."""

    geometry_type = EvaGeometry


def _eva_attention(attn: nn.Module, where: str) -> None:
    from timm.models.eva import EvaAttention
    if isinstance(attn, GatedAttention):
        return
    require(type(attn) is EvaAttention, where,
            f"{type(attn).__name__} (AttentionRope / grouped-query attention) is not supported",
            SUPPORTED)
    require(isinstance(attn.norm, nn.Identity), where, "the inner attention norm "
            "(scale_attn_inner) normalizes over all heads, which pruning changes", SUPPORTED)
    require(getattr(attn, "gate", None) is None, where, "gated attention output is not "
            "supported", SUPPORTED)


def geometry(model: nn.Module) -> EvaGeometry:
    """The dense geometry of a timm EVA, gated or not (compact ones carry it in the spec)."""
    s = getattr(model, "pyengine_spec", None)
    if isinstance(s, EvaSpec) and s.dense is not None:
        return s.dense
    from timm.layers import RotaryEmbeddingCat
    from timm.models.eva import EvaBlock
    D = model.embed_dim
    require(getattr(model, "attn_pool", None) is None, "global_pool='map'", "attention pooling "
            "is not supported", SUPPORTED)
    require(not getattr(model, "rope_mixed", False), "rope", "mixed rotary embeddings (per-head "
            "frequencies) are not supported", SUPPORTED)
    rope = "none"
    if model.rope is not None:
        require(type(model.rope) is RotaryEmbeddingCat, "rope",
                f"{type(model.rope).__name__} is not supported", SUPPORTED)
    configs = []
    for i, blk in enumerate(model.blocks):
        where = f"blocks.{i}"
        require(type(blk) is EvaBlock, where, f"{type(blk).__name__} (post-norm) is not "
                "supported", SUPPORTED)
        require(check_norm(blk.norm1, D) and check_norm(blk.norm2, D), where,
                "block norms must be LayerNorms with weight and bias", SUPPORTED)
        _eva_attention(blk.attn, f"{where}.attn")
        cfg = {**attn_config(blk.attn, f"{where}.attn", D, SUPPORTED),
               **ffn_config(blk.mlp, f"{where}.mlp", SUPPORTED),
               "layer_scale": (blk.gamma_1 is not None, blk.gamma_2 is not None)}
        configs.append(cfg)
        if model.rope is not None:
            half = (blk.attn.rope_half if isinstance(blk.attn, GatedAttention)
                    else bool(getattr(blk.attn, "rotate_half", False)))
            rope = "half" if half else "interleaved"
            require(model.rope.dim == cfg["head_dim"], "rope", f"rotary dim {model.rope.dim} != "
                    f"head dim {cfg['head_dim']}", SUPPORTED)
    require(all(c == configs[0] for c in configs), "blocks", "blocks of different shapes",
            SUPPORTED)
    cfg = configs[0]
    pe = model.patch_embed
    require(isinstance(pe.norm, nn.Identity), "patch_embed", "a patch norm is not supported",
            SUPPORTED)
    for name in ("norm_pre", "norm", "fc_norm"):
        mod = getattr(model, name)
        require(isinstance(mod, nn.Identity) or check_norm(mod, D), name,
                "must be a LayerNorm with weight and bias", SUPPORTED)
    P = pe.num_patches
    return EvaGeometry(
        depth=len(model.blocks), embed_dim=D, num_heads=cfg["num_heads"],
        head_dim=cfg["head_dim"], mlp_hidden=cfg["mlp_hidden"],
        num_tokens=P + model.num_prefix_tokens, num_patches=P, in_chans=pe.proj.in_channels,
        patch_size=tuple(pe.patch_size), num_classes=model.num_classes,
        qkv_bias=cfg["qkv_bias"], ffn=cfg["ffn"], rope=rope, qk_norm=cfg["qk_norm"],
        layer_scale=cfg["layer_scale"], patch_bias=pe.proj.bias is not None,
        pos_tokens=0 if model.pos_embed is None else int(model.pos_embed.shape[1]),
        norm_pre=not isinstance(model.norm_pre, nn.Identity),
        final_norm=not isinstance(model.norm, nn.Identity),
        fc_norm=not isinstance(model.fc_norm, nn.Identity), pool=model.global_pool or "")


@register_adapter
class EvaAdapter(TransformerAdapter):
    name = "eva"
    spec_type = EvaSpec
    spec_label = "EVA spec (family 'eva')"
    geometry_type = EvaGeometry
    supported = SUPPORTED
    model_type = "timm.models.eva.Eva"

    def geometry(self, model: nn.Module) -> EvaGeometry:
        return geometry(model)

    def attn_options(self, model: nn.Module) -> dict:
        g = self.geometry(model)
        return {"rope_half": None if g.rope == "none" else g.rope == "half",
                "npt": model.num_prefix_tokens}

    def compact_block(self, block, b, sh, copy_weights: bool, opts: dict):
        return token_compact_block(block, b, sh, copy_weights, **opts)

    def cost_rows(self, spec, row, batch: int, attention: str) -> None:
        token_cost_rows(spec, row, batch, attention)

