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

from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["create_model", "load_model", "model_name", "img_size_is_input"]

# timm families whose constructors take no img_size: any input size runs, and pyengine keeps
# the size as the cost model's input (model.pyengine_img_size)
_SIZE_FREE_MODULES = ("timm.models.resnet", "timm.models.convnext", "timm.models.efficientnet",
                      "timm.models.mobilenetv3", "timm.models.regnet")


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
    if not timm.is_model(arch):
        raise ValueError(f"unknown model {name!r}: neither a timm model name "
                         "(timm.list_models() lists them) nor a pyengine.save directory")
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
