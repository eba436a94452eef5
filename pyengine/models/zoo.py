"""Small models for the embedded digits data (32x32 inputs, 10 classes), built through timm's
registry so every pyengine path (gate, compile, save/load) treats them like any timm model."""
from __future__ import annotations

import torch
from torch import nn

from pyengine.models.vit.adapter import create_model

# 64 tokens of 4x4 pixels (one source pixel each), 3 heads of 64 dims, FFN 768. Mean-pooled
# tokens and a low-temperature sine-cosine position start let it learn digits in a few epochs
# (pyengine.train.DIGITS_RECIPE; results in bench/results/cpu/digits_recipe*.json); 4 blocks
# rather than 6 cut the training cost by a third.
DIGITS_VIT = dict(img_size=32, patch_size=4, embed_dim=192, depth=4, num_heads=3,
                  num_classes=10, global_pool="avg")
POS_TEMPERATURE = 20.0  # 8x8 positions: a high temperature leaves most channels near-constant


def sincos_pos_embed_(model: nn.Module, temperature: float = 10000.0) -> nn.Module:
    """Start a timm ViT's learned position embedding from 2-D sine-cosine values.

    On small data a ViT spends its first epochs discovering where its patches are; a
    sine-cosine start (MAE, "simple ViT") gives that for free. It stays a learned parameter.
    """
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
    pe = model.pos_embed
    grid = model.patch_embed.grid_size
    n_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    table = build_sincos2d_pos_embed(list(grid), dim=pe.shape[-1], temperature=temperature)
    with torch.no_grad():
        pe[0, n_prefix:] = table.to(pe.dtype)
        pe[0, :n_prefix] = 0.0
    return model


def digits_vit(pos_init: str = "sincos", pos_temperature: float = POS_TEMPERATURE,
               **overrides) -> nn.Module:
    """A 4-block ViT (3 heads of 64 dims, FFN 768, mean-pooled) over 8x8 patches of 4x4 pixels.

    ``pos_init``: ``"sincos"`` (default) or ``"learn"`` (timm's random init).
    """
    if pos_init not in ("sincos", "learn"):
        raise ValueError(f"pos_init must be 'sincos' or 'learn', got {pos_init!r}")
    model = create_model("vit_tiny_patch16_224", **{**DIGITS_VIT, **overrides})
    if pos_init == "sincos":
        sincos_pos_embed_(model, pos_temperature)
    return model


def digits_resnet(name: str = "resnet18", **overrides) -> nn.Module:
    """A timm ResNet for 32x32 digits (10 classes)."""
    return create_model(name, **{"num_classes": 10, **overrides})
