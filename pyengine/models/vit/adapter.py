"""What pyengine needs to know about a timm VisionTransformer: its geometry, its name and
the kwargs that rebuild its dense container with ``timm.create_model``."""
from __future__ import annotations

from typing import Any

import timm
from torch import nn

from pyengine.models.vit.gated import GatedAttention, GatedMlp, UnsupportedModuleError
from pyengine.structure.spec import Geometry

SUPPORTED = "timm VisionTransformer models (vit_*, deit_*, deit_*_distilled)"


def check_vit(model: nn.Module) -> None:
    from timm.models.vision_transformer import VisionTransformer
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModuleError(
            f"pyengine cannot prune {type(model).__module__}.{type(model).__name__}; "
            f"supported: {SUPPORTED}")


def create_model(name: str, **kwargs) -> nn.Module:
    """``timm.create_model`` that remembers its arguments, so save/load rebuild it exactly."""
    kwargs.setdefault("pretrained", False)
    model = timm.create_model(name, **kwargs)
    model.pyengine_config = {"architecture": name.split(".")[0],
                             "kwargs": {k: v for k, v in kwargs.items()
                                        if k not in ("pretrained", "pretrained_cfg_overlay",
                                                     "checkpoint_path")}}
    return model


def model_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "pyengine_config", None)
    if cfg:
        return cfg["architecture"]
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    return pcfg.get("architecture")


def geometry(model: nn.Module) -> Geometry:
    """The dense geometry of a timm ViT, gated or not (compact models carry theirs in the spec)."""
    spec = getattr(model, "pyengine_spec", None)
    if spec is not None and spec.dense is not None:
        return spec.dense
    check_vit(model)
    blk = model.blocks[0]
    attn, mlp = blk.attn, blk.mlp
    if not hasattr(attn, "num_heads") or not hasattr(mlp, "fc1"):
        raise UnsupportedModuleError(f"block 0 has {type(attn).__name__}/{type(mlp).__name__}; "
                                     f"supported: {SUPPORTED}")
    pe = model.patch_embed
    return Geometry(
        depth=len(model.blocks), embed_dim=model.embed_dim, num_heads=attn.num_heads,
        head_dim=attn.head_dim, mlp_hidden=mlp.fc1.out_features,
        num_tokens=pe.num_patches + model.num_prefix_tokens,
        num_patches=pe.num_patches, in_chans=pe.proj.in_channels,
        patch_size=tuple(pe.patch_size), num_classes=model.num_classes,
        qkv_bias=attn.qkv.bias is not None)


def dense_config(model: nn.Module) -> dict[str, Any]:
    """``{"architecture", "kwargs"}`` that rebuild the dense container of ``model``."""
    cfg = getattr(model, "pyengine_config", None)
    if cfg:
        return {"architecture": cfg["architecture"], "kwargs": dict(cfg["kwargs"])}
    check_vit(model)
    name = model_name(model)
    if name is None:
        raise ValueError("cannot tell which timm model this is (no pretrained_cfg); create it "
                         "with pyengine.create_model(name, **kwargs) so it can be saved")
    g = geometry(model)
    blk = model.blocks[0]
    from timm.layers import LayerScale
    kw: dict[str, Any] = dict(
        img_size=list(model.patch_embed.img_size), patch_size=list(g.patch_size),
        in_chans=g.in_chans, num_classes=g.num_classes, global_pool=model.global_pool,
        embed_dim=g.embed_dim, depth=g.depth, num_heads=g.num_heads,
        mlp_ratio=g.mlp_hidden / g.embed_dim, qkv_bias=g.qkv_bias,
        class_token=model.cls_token is not None, reg_tokens=model.num_reg_tokens,
        no_embed_class=model.no_embed_class, pre_norm=not isinstance(model.norm_pre, nn.Identity),
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        init_values=1.0 if isinstance(blk.ls1, LayerScale) else None,
        dynamic_img_size=getattr(model, "dynamic_img_size", False))
    return {"architecture": name, "kwargs": kw}


def is_gated(model: nn.Module) -> bool:
    return any(isinstance(m, (GatedAttention, GatedMlp)) for m in model.modules())
