"""pyengine: structured pruning of timm Vision Transformers that is really faster on a GPU.

    model = pyengine.create_model("deit_small_patch16_224")   # or timm.create_model(...)
    pyengine.gate(model, method="mask")      # timm Attention/Mlp -> gated modules
    pyengine.apply(model, pyengine.Spec.from_json(text))
    compact = pyengine.compile(model)        # dense, smaller, same outputs
    pyengine.save(compact, "out/"); compact = pyengine.load("out/")
    c = pyengine.cost(compact, batch=64, dtype=torch.bfloat16)
    ms = pyengine.latency(compact, batch=1, device="cpu").ms   # the device's latency table
"""
from pyengine import _aliases, ops
from pyengine.api import apply, compile, gate, is_compact, spec
from pyengine.cost import Cost, Peaks, cost
from pyengine.cost.latency import Latency, latency
from pyengine.io.model_dir import load, save
from pyengine.methods import apg as optim
from pyengine.models import UnsupportedModuleError, create_model, geometry
from pyengine.structure.gates import available_methods, register_gates
from pyengine.structure.spec import (Block, CnnGeometry, CnnSpec, ConvBlock, Geometry, Head, Spec,
                                     SpecError, make_conv_block)

_aliases.install()

__version__ = "0.1.0"


__all__ = ["gate", "spec", "apply", "compile", "save", "load", "cost", "Cost", "Peaks", "create_model",
           "geometry", "is_compact", "Spec", "SpecError", "Block", "Head", "Geometry",
           "UnsupportedModuleError", "available_methods", "register_gates", "ops", "optim",
           "CnnSpec", "CnnGeometry", "ConvBlock", "make_conv_block", "__version__",
           "latency", "Latency"]
