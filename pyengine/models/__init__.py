"""Models: one architecture adapter per model family (vit, resnet) behind one interface
(:class:`Adapter`, found with :func:`adapter_for`), the one way to turn a name into a model
(:func:`create_model`, :func:`load_model`), and the digits models registered with timm (zoo).
"""
from pyengine.models.base import (Adapter, UnsupportedModuleError, adapter_for,
                                  adapter_for_geometry, adapter_for_spec, adapters,
                                  register_adapter)
from pyengine.models.factory import create_model, load_model, model_name


def geometry(model):
    """The dense geometry of ``model`` (any supported family, gated, compact or plain)."""
    return adapter_for(model).geometry(model)


__all__ = ["Adapter", "UnsupportedModuleError", "adapter_for", "adapter_for_spec",
           "adapter_for_geometry", "adapters",
           "register_adapter", "create_model", "load_model", "model_name", "geometry"]
