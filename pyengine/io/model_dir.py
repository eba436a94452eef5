"""Model directories: ``pyengine.save`` / ``pyengine.load`` (safetensors + spec.json +
config.json; nothing is ever unpickled)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pyengine.api import compile, is_compact, is_gated
from pyengine.io.atomic import write_bytes, write_json, write_text
from pyengine.models import adapter_for, create_model
from pyengine.structure.spec import Spec

MODEL_FORMAT = "pyengine.model/1"
WEIGHTS, SPEC, CONFIG = "model.safetensors", "spec.json", "config.json"

__all__ = ["save", "load", "MODEL_FORMAT", "WEIGHTS", "SPEC", "CONFIG"]


def save(model: nn.Module, directory) -> Path:
    """Write ``model.safetensors`` + ``spec.json`` + ``config.json`` (no pickle) to ``directory``.

    A gated model is compiled first. Each file is written atomically.
    """
    from safetensors.torch import save as st_save

    if not is_compact(model):
        if not is_gated(model):
            raise ValueError("save expects a compact (pyengine.compile) or gated model")
        model = compile(model)
    cfg = getattr(model, "pyengine_config", None)
    if cfg is None:
        raise ValueError("cannot tell which timm model this is; create it with "
                         "pyengine.create_model(name, **kwargs) so it can be rebuilt on load")
    rebuilt = _skeleton(cfg["architecture"], cfg["kwargs"], model.pyengine_spec)
    if repr(rebuilt) != repr(model):
        raise ValueError(
            f"timm.create_model({cfg['architecture']!r}, **{cfg['kwargs']}) does not rebuild this "
            "model's architecture; create it with pyengine.create_model(name, **kwargs)")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = {"format": MODEL_FORMAT, "architecture": cfg["architecture"],
              "kwargs": cfg["kwargs"], "torch": torch.__version__}
    write_bytes(d / WEIGHTS, st_save(state, metadata={"format": MODEL_FORMAT}))
    write_text(d / SPEC, model.pyengine_spec.to_json())
    write_json(config, d / CONFIG)
    return d


def _skeleton(architecture: str, kwargs: dict, s) -> nn.Module:
    """The compact model's modules, randomly initialised, rebuilt from its config and spec."""
    model = create_model(architecture, **kwargs)
    a = adapter_for(model)
    if not isinstance(s, a.spec_type):
        raise ValueError(f"spec.json holds a {type(s).__name__}, but {architecture} needs a "
                         f"{a.spec_type.__name__}")
    s = a.skeleton_spec(s, a.geometry(model), architecture)
    return a.build(model, s, copy_weights=False)


def load(directory, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a compact model saved by :func:`save` (timm container + spec + safetensors)."""
    from safetensors.torch import load_file

    d = Path(directory)
    for name in (WEIGHTS, SPEC, CONFIG):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name} is missing; not a pyengine.save directory")
    config = json.loads((d / CONFIG).read_text())
    if config.get("format") != MODEL_FORMAT:
        raise ValueError(f"{d / CONFIG}: format {config.get('format')!r}, expected {MODEL_FORMAT!r}")
    model = _skeleton(config["architecture"], config["kwargs"], Spec.from_json((d / SPEC).read_text()))
    model.load_state_dict(load_file(str(d / WEIGHTS)), strict=True)
    return model.to(device).eval()
