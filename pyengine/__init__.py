"""pyengine: structured pruning of timm Vision Transformers that is really faster on a GPU.

    model = pyengine.create_model("deit_small_patch16_224")   # or timm.create_model(...)
    pyengine.gate(model, method="mask")      # timm Attention/Mlp -> gated modules
    pyengine.apply(model, pyengine.Spec.from_json(text))
    compact = pyengine.compile(model)        # dense, smaller, same outputs
    pyengine.save(compact, "out/"); compact = pyengine.load("out/")
    c = pyengine.cost(compact, batch=64, dtype=torch.bfloat16)
"""
from . import ops
from .api import apply, compile, gate, is_compact, load, save, spec
from .gated import UnsupportedModuleError
from .gates import available_methods, register_gates
from .spec import Block, Geometry, Head, Spec, SpecError
from .vit import create_model, geometry

__version__ = "0.1.0"


def cost(model_or_spec, batch: int = 1, dtype=None, device=None):
    """Analytical FLOPs, MACs and bytes of a model or spec; see :mod:`pyengine.cost_model`."""
    from .cost_model import cost as _cost
    import torch
    return _cost(model_or_spec, batch=batch, dtype=dtype or torch.float32, device=device)


__all__ = ["gate", "spec", "apply", "compile", "save", "load", "cost", "create_model",
           "geometry", "is_compact", "Spec", "SpecError", "Block", "Head", "Geometry",
           "UnsupportedModuleError", "available_methods", "register_gates", "ops", "__version__"]
