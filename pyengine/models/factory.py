"""Turning a model name (or a saved model directory) into a model: the one way pyengine does it.

    model = create_model("deit_small_patch16_224")        # timm.create_model, remembered
    model = create_model("digits_vit", num_classes=10)    # pyengine's digits models are in
                                                          # timm's registry too (models.zoo)
    model = load_model("runs/hiap50")                     # a pyengine.save directory
    model = load_model("resnet18", num_classes=10, img_size=32)

``create_model`` records its arguments on the model (``model.pyengine_config``), so that
``pyengine.save`` can write them and ``pyengine.load`` rebuild the same container.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable

from torch import nn

__all__ = ["create_model", "load_model", "model_name", "img_size_is_input", "MODEL_KWARGS",
           "check_model_kwargs", "check_model_name"]

# timm families whose constructors take no img_size: any input size runs, and pyengine keeps
# the size as the cost model's input (model.pyengine_img_size)
_SIZE_FREE_MODULES = ("timm.models.resnet", "timm.models.convnext", "timm.models.efficientnet",
                      "timm.models.mobilenetv3", "timm.models.regnet")


# ---- what a saved config.json may hand to timm.create_model --------------------------------
# Constructor settings of the supported families, each with its JSON type. Nothing that loads
# weights, names a file or reaches the network (pretrained, pretrained_cfg(_overlay),
# checkpoint_path, cache_dir, ...) is here, so a model directory cannot make load() do that.
# A new family adds its own settings here.
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{0,64}$")  # a layer / pooling name, never a path


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v):
    return (_int(v) or isinstance(v, float)) and math.isfinite(v)


def _bool(v):
    return isinstance(v, bool)


def _name(v):
    return isinstance(v, str) and bool(_NAME.match(v))


def _int_or_pair(v):
    return _int(v) or (isinstance(v, (list, tuple)) and len(v) == 2 and all(_int(x) for x in v))


def _ints(v):  # (a tuple before the JSON round trip, a list after)
    return isinstance(v, (list, tuple)) and len(v) <= 64 and all(_int(x) for x in v)


def _int_or_ints(v):
    return _int(v) or _ints(v)


def _optional(check):
    return lambda v: v is None or check(v)


_TYPE_NAMES = {_int: "an integer", _num: "a finite number", _bool: "true or false",
               _name: "a short name (letters, digits, _ . -)", _int_or_pair:
               "an integer or [h, w]", _ints: "a list of integers",
               _int_or_ints: "an integer or a list of integers"}

MODEL_KWARGS: dict[str, Callable[[Any], bool]] = {
    # timm VisionTransformer
    "img_size": _int_or_pair, "patch_size": _int_or_pair, "in_chans": _int,
    "num_classes": _int, "global_pool": _name, "embed_dim": _int, "depth": _int,
    "num_heads": _int, "mlp_ratio": _num, "qkv_bias": _bool, "qk_norm": _bool,
    "scale_attn_norm": _bool, "scale_mlp_norm": _bool, "proj_bias": _bool,
    "init_values": _optional(_num), "class_token": _bool, "pos_embed": _name,
    "no_embed_class": _bool, "reg_tokens": _int, "pre_norm": _bool, "final_norm": _bool,
    "fc_norm": _optional(_bool), "pool_include_prefix": _bool, "dynamic_img_size": _bool,
    "dynamic_img_pad": _bool, "drop_rate": _num, "pos_drop_rate": _num,
    "patch_drop_rate": _num, "proj_drop_rate": _num, "attn_drop_rate": _num,
    "drop_path_rate": _num, "weight_init": _name, "fix_init": _bool, "act_layer": _name,
    "norm_layer": _name,
    # pyengine's digits models (models.zoo)
    "pos_init": _name, "pos_temperature": _num,
    # timm ResNet
    "output_stride": _int, "cardinality": _int, "base_width": _int, "stem_width": _int,
    "stem_type": _name, "replace_stem_pool": _bool, "block_reduce_first": _int,
    "down_kernel_size": _int, "avg_down": _bool, "channels": _ints, "drop_block_rate": _num,
    "zero_init_last": _bool,
    # timm Eva (EVA, EVA02) and Beit
    "num_kv_heads": _optional(_int), "qkv_fused": _bool, "swiglu_mlp": _bool,
    "swiglu_align_to": _int, "scale_mlp": _bool, "scale_attn_inner": _bool, "attn_type": _name,
    "attn_only_layer_scale": _bool, "num_reg_tokens": _int, "use_abs_pos_emb": _bool,
    "use_rot_pos_emb": _bool, "rope_type": _name, "rope_grid_offset": _num,
    "rope_grid_indexing": _name, "rope_temperature": _num, "rope_rotate_half": _bool,
    "use_post_norm": _bool, "use_pre_transformer_norm": _bool,
    "use_post_transformer_norm": _optional(_bool), "use_fc_norm": _optional(_bool),
    "ref_feat_shape": _optional(_int_or_pair), "head_init_scale": _num,
    "use_rel_pos_bias": _bool, "use_shared_rel_pos_bias": _bool,
    # timm SwinTransformer (num_heads and depths per stage)
    "depths": _ints, "head_dim": _optional(_int), "window_size": _int_or_pair,
    "always_partition": _bool, "strict_img_size": _bool,
    # timm ConvNeXt, EfficientNet / MobileNetV3 (and their model functions), RegNet
    "dims": _ints, "kernel_sizes": _int_or_ints, "ls_init_value": _optional(_num),
    "head_norm_first": _bool, "head_hidden_size": _optional(_int), "conv_mlp": _bool,
    "conv_bias": _bool, "use_grn": _bool, "norm_eps": _optional(_num), "num_features": _int,
    "stem_size": _int, "fix_stem": _bool, "pad_type": _name, "head_bias": _bool,
    "head_norm": _bool, "se_from_exp": _bool, "layer_scale_init_value": _optional(_num),
    "channel_multiplier": _num, "depth_multiplier": _num,
}
MODEL_KWARGS["num_heads"] = _int_or_ints  # ViT: one count; Swin: one per stage


def check_model_kwargs(kwargs: Any, where: str = "model kwargs") -> dict:
    """``kwargs`` if every key is a known constructor setting of the right JSON type
    (:data:`MODEL_KWARGS`); else a ValueError naming ``where`` and the key."""
    if not isinstance(kwargs, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(kwargs).__name__}")
    for k, v in kwargs.items():
        check = MODEL_KWARGS.get(k)
        if check is None:
            raise ValueError(f"{where}: {k!r} is not a model setting pyengine rebuilds models "
                             "with (settings that load weights or read files never are; a new "
                             "one goes into pyengine.models.factory.MODEL_KWARGS)")
        if not check(v):
            want = next((n for f, n in _TYPE_NAMES.items() if f is check), "another type")
            raise ValueError(f"{where}: {k} must be {want}, got {v!r}")
    return kwargs


def check_model_name(name: Any, where: str = "--model") -> str:
    """``name`` if it is a model in timm's registry (digits models included)."""
    import timm

    from pyengine.models import zoo  # noqa: F401  (registers the digits models with timm)
    at = f"{where}: " if where else ""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{at}expected a model name, got {name!r}")
    if not timm.is_model(name.split(".")[0]):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
        raise ValueError(f"{at}unknown model {name!r}: neither a timm model name nor a "
                         "pyengine.save directory" + (f" (similar: {', '.join(close)})"
                                                      if close else ""))
    return name


def img_size_is_input(name: str) -> bool:
    """True when timm model ``name`` takes any input size (CNNs): img_size is not a kwarg."""
    import timm
    return timm.models.model_entrypoint(name.split(".")[0]).__module__ in _SIZE_FREE_MODULES


def create_model(name: str, **kwargs) -> nn.Module:
    """``timm.create_model`` that remembers its arguments, so save/load rebuild it exactly.

    ``img_size`` of a CNN (which takes any size) is kept as ``model.pyengine_img_size``, the
    input size the cost model assumes, instead of being passed to timm (and remembered, so a
    saved model and its rebuilt dense twin keep it)."""
    import timm

    from pyengine.models import zoo  # noqa: F401  (registers the digits models with timm)
    kwargs.setdefault("pretrained", False)
    arch = name.split(".")[0]
    check_model_name(name, "")
    size = None
    if "img_size" in kwargs and img_size_is_input(arch):
        size = kwargs.pop("img_size")
    model = timm.create_model(name, **kwargs)
    model.pyengine_config = {"architecture": arch,
                             "kwargs": {k: v for k, v in {**kwargs, **(
                                 {"img_size": size} if size else {})}.items()
                                        if k not in ("pretrained", "pretrained_cfg_overlay",
                                                     "checkpoint_path")}}
    if size:
        model.pyengine_img_size = int(size)
    return model


def load_model(name_or_dir: str | Path, **kwargs) -> nn.Module:
    """A ``pyengine.save`` directory (compact model), or a timm model name (dense model)."""
    path = Path(name_or_dir)
    if path.is_dir():
        if kwargs:
            raise ValueError(f"{path} is a saved model; model kwargs {sorted(kwargs)} apply only "
                             "to a timm model name (a saved model rebuilds from its config.json)")
        from pyengine.io.model_dir import load
        return load(path)
    text = str(name_or_dir)
    if "/" in text or "\\" in text or path.suffix in (".json", ".safetensors", ".pt", ".pth"):
        raise FileNotFoundError(f"{text} is neither a directory nor a timm model name")
    return create_model(text, **kwargs)


def model_name(model: nn.Module) -> str | None:
    """The timm architecture of ``model`` (what create_model was called with), if known."""
    cfg = getattr(model, "pyengine_config", None)
    if cfg:
        return cfg["architecture"]
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    return pcfg.get("architecture")


def remembered_config(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "pyengine_config", None)
    if cfg:
        return {"architecture": cfg["architecture"], "kwargs": dict(cfg["kwargs"])}
    return None
