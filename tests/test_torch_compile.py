"""Compact models work with torch.export and torch.compile(fullgraph=True)."""
import torch

import pyengine

from _specs import random_spec


def _compact():
    model = pyengine.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3,
                                  num_classes=5)
    pyengine.gate(model.eval())
    pyengine.apply(model, random_spec(pyengine.geometry(model), 4))
    return pyengine.compile(model).eval()


def test_export_matches_eager():
    compact = _compact()
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(compact, (x,))
    x2 = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ep.module()(x2) - compact(x2)).abs().max() <= 1e-5


def test_torch_compile_fullgraph_matches_eager():
    compact = _compact()
    compiled = torch.compile(compact, fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (compiled(x) - compact(x)).abs().max() <= 1e-5
