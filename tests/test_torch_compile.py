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


def test_planned_layout_compiles_fullgraph(tmp_path, monkeypatch):
    # padded buckets and a planned backend (resolved where the layer runs) in one graph
    from pyengine.cost.latency_table import table_path
    from pyengine.models.vit.compact import CompactAttention

    from _latency import fake_table
    model = pyengine.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3,
                                  num_classes=5)
    pyengine.gate(model.eval())
    pyengine.apply(model, random_spec(pyengine.geometry(model), 4, p_head=1.0))
    t = fake_table(pyengine.geometry(model), candidates=("torch", "cpu"),
                   runs=lambda be, b, k: 500.0 * (k - 1),
                   attn=lambda be, b, h, qk, v: (0.5 if be == "cpu" else 1.0) * h * (qk + v + 1))
    monkeypatch.setenv("PYENGINE_CACHE", str(tmp_path))
    t.save(table_path("cpu", "float32"))
    compact = pyengine.compile(model).eval()
    layers = [m for m in compact.modules() if isinstance(m, CompactAttention)]
    assert layers and all(len(a.layout.buckets) == 1 for a in layers)
    assert all(a.planned_backend == "cpu" for a in layers)
    compiled = torch.compile(compact, fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        assert (compact(x) - want).abs().max() <= 1e-5
        assert (compiled(x) - want).abs().max() <= 1e-5
