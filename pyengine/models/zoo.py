"""Small models for the embedded digits data (32x32 inputs, 10 classes), registered with
timm's model registry, so every path (``timm.create_model``, ``pyengine.create_model``, gate,
compile, save/load, the CLI's ``--model digits_vit``) treats them like any timm model:

    model = pyengine.create_model("digits_vit", num_classes=10)
    model = pyengine.create_model("digits_vit_small")      # the pruning-limit experiments
"""
from __future__ import annotations

import timm
import torch
from timm.models import register_model
from torch import nn

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


def _vit(defaults: dict, pos_init: str, pos_temperature: float, kwargs: dict) -> nn.Module:
    if pos_init not in ("sincos", "learn"):
        raise ValueError(f"pos_init must be 'sincos' or 'learn', got {pos_init!r}")
    for k in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay"):
        kwargs.pop(k, None)  # no pretrained weights exist: they are trained here
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**defaults, **kwargs})
    if pos_init == "sincos":
        sincos_pos_embed_(model, pos_temperature)
    return model


def _register(name: str, defaults: dict, pos_init_default: str) -> None:
    """Put ``name`` into timm's registry (once): ``timm.create_model(name, **kwargs)``."""
    if name in timm.list_models(name):
        return

    def entry(pretrained: bool = False, pos_init: str = pos_init_default,
              pos_temperature: float = POS_TEMPERATURE, **kwargs) -> nn.Module:
        return _vit(defaults, pos_init, pos_temperature, kwargs)

    entry.__name__ = entry.__qualname__ = name  # timm registers a function under its name
    register_model(entry)


_register("digits_vit", DIGITS_VIT, "sincos")
# A 2-block ViT (2 heads of 32 dims, FFN 256) over 4x4 patches of 16x16 digits: ~100k weights,
# so 64 Lanczos steps over the training set take minutes on one core (pruning-limit experiments)
DIGITS_VIT_SMALL = dict(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2,
                        mlp_ratio=4.0, num_classes=10)
_register("digits_vit_small", DIGITS_VIT_SMALL, "learn")


def digits_vit(**kwargs) -> nn.Module:
    """``pyengine.create_model("digits_vit", **kwargs)``: a 4-block ViT (3 heads of 64 dims, FFN
    768, mean-pooled) over 8x8 patches of 4x4 pixels. ``pos_init``: ``"sincos"`` (default) or
    ``"learn"`` (timm's random init); ``pos_temperature`` of the sine-cosine start."""
    from pyengine.models.factory import create_model
    return create_model("digits_vit", **kwargs)


def digits_vit_small(**kwargs) -> nn.Module:
    """``pyengine.create_model("digits_vit_small", **kwargs)`` (pruning-limit experiments)."""
    from pyengine.models.factory import create_model
    return create_model("digits_vit_small", **kwargs)


def digits_resnet(name: str = "resnet18", **overrides) -> nn.Module:
    """A timm ResNet for 32x32 digits (10 classes)."""
    from pyengine.models.factory import create_model
    return create_model(name, **{"num_classes": 10, **overrides})
