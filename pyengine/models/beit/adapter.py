"""The adapter of timm BEiT models (``timm.models.beit.Beit``: beit_*, beitv2_*).

Structure units, per block: the heads with their q/k and value dims, and the FFN neurons
(:class:`BeitSpec`). Each block's relative-position bias table has one column per head; the
compact block keeps the columns of its kept heads. A head without q/k dims still attends by
its relative-position bias (softmax of the bias over the values). A shared table
(``use_shared_rel_pos_bias``) stays whole; each compact block picks its heads' rows of the
shared bias. Layer scale (gamma) stays with its branch. The residual stream is not pruned.

Not supported: an FFN norm over the neurons (``scale_mlp``).
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

SUPPORTED = ("timm Beit models with per-block or shared relative-position bias (or none), "
             "q/v biases, layer scale, and a Mlp / SwiGLU FFN without a hidden norm "
             "(beit_*_patch16_*, beitv2_*)")


@dataclass(frozen=True)
class BeitGeometry(TokenGeometry):
    """Dense shape of a timm BEiT (see :class:`~pyengine.models.transformer.tokens.TokenGeometry`)."""


@register_spec_type("beit")
@dataclass(frozen=True)
class BeitSpec(TransformerSpec):
    """What a pruned BEiT keeps (JSON ``"family": "beit"``)."""

    geometry_type = BeitGeometry


def geometry(model: nn.Module) -> BeitGeometry:
    """The dense geometry of a timm BEiT, gated or not (compact ones carry it in the spec)."""
    s = getattr(model, "pyengine_spec", None)
    if isinstance(s, BeitSpec) and s.dense is not None:
        return s.dense
    from timm.models.beit import Attention, Block
    D = model.embed_dim
    configs = []
    for i, blk in enumerate(model.blocks):
        where = f"blocks.{i}"
        require(type(blk) is Block, where, f"{type(blk).__name__} is not a timm beit Block",
                SUPPORTED)
        attn = blk.attn
        if not isinstance(attn, GatedAttention):
            require(type(attn) is Attention, f"{where}.attn", f"{type(attn).__name__} is not a "
                    "timm beit Attention", SUPPORTED)
        require(check_norm(blk.norm1, D) and check_norm(blk.norm2, D), where,
                "block norms must be LayerNorms with weight and bias", SUPPORTED)
        table = getattr(attn, "relative_position_bias_table", None)
        cfg = {**attn_config(attn, f"{where}.attn", D, SUPPORTED),
               **ffn_config(blk.mlp, f"{where}.mlp", SUPPORTED),
               "layer_scale": (blk.gamma_1 is not None, blk.gamma_2 is not None),
               "table": None if table is None else int(table.shape[0])}
        configs.append(cfg)
    require(all(c == configs[0] for c in configs), "blocks", "blocks of different shapes",
            SUPPORTED)
    cfg = configs[0]
    shared = model.rel_pos_bias
    if cfg["table"] is not None:
        require(shared is None or shared.relative_position_bias_table.shape[0] == cfg["table"],
                "rel_pos_bias", "a shared table of another size than the blocks'", SUPPORTED)
        rel, rows = "block", cfg["table"]
    elif shared is not None:
        rel, rows = "shared", int(shared.relative_position_bias_table.shape[0])
    else:
        rel, rows = "none", 0
    pe = model.patch_embed
    require(isinstance(pe.norm, nn.Identity), "patch_embed", "a patch norm is not supported",
            SUPPORTED)
    for name in ("norm", "fc_norm"):
        mod = getattr(model, name)
        require(isinstance(mod, nn.Identity) or check_norm(mod, D), name,
                "must be a LayerNorm with weight and bias", SUPPORTED)
    P = pe.num_patches
    return BeitGeometry(
        depth=len(model.blocks), embed_dim=D, num_heads=cfg["num_heads"],
        head_dim=cfg["head_dim"], mlp_hidden=cfg["mlp_hidden"], num_tokens=P + 1,
        num_patches=P, in_chans=pe.proj.in_channels, patch_size=tuple(pe.patch_size),
        num_classes=model.num_classes, qkv_bias=cfg["qkv_bias"], ffn=cfg["ffn"],
        rel_pos=rel, rel_pos_rows=rows, layer_scale=cfg["layer_scale"],
        patch_bias=pe.proj.bias is not None,
        pos_tokens=0 if model.pos_embed is None else int(model.pos_embed.shape[1]),
        final_norm=not isinstance(model.norm, nn.Identity),
        fc_norm=not isinstance(model.fc_norm, nn.Identity), pool=model.global_pool or "")


@register_adapter
class BeitAdapter(TransformerAdapter):
    name = "beit"
    spec_type = BeitSpec
    spec_label = "BEiT spec (family 'beit')"
    geometry_type = BeitGeometry
    supported = SUPPORTED
    model_type = "timm.models.beit.Beit"

    def geometry(self, model: nn.Module) -> BeitGeometry:
        return geometry(model)

    def compact_block(self, block, b, sh, copy_weights: bool, opts: dict):
        return token_compact_block(block, b, sh, copy_weights)

    def cost_rows(self, spec, row, batch: int, attention: str) -> None:
        token_cost_rows(spec, row, batch, attention)

