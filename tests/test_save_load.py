"""save/load: safetensors + spec.json + config.json, exact round trip, no pickle."""
import json

import pytest
import timm
import torch

import pyengine

from _specs import random_spec


def test_round_trip_exact(tmp_path, monkeypatch):
    model = pyengine.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3,
                                  num_classes=7)
    pyengine.gate(model.eval())
    pyengine.apply(model, random_spec(pyengine.geometry(model), 5))
    compact = pyengine.compile(model).eval()
    pyengine.save(compact, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors",
                                                          "spec.json"]
    assert json.loads((tmp_path / "config.json").read_text())["kwargs"]["depth"] == 3

    def no_pickle(*a, **k):
        raise AssertionError("pyengine.load must not unpickle anything")
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = pyengine.load(tmp_path)
    assert pyengine.spec(loaded) == pyengine.spec(compact)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), compact(x))
    sd_a, sd_b = compact.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_round_trip_plain_timm_model(tmp_path):
    # created by timm directly: the rebuild kwargs come from introspection, and save checks
    # that they really rebuild the same architecture
    model = pyengine.gate(timm.create_model("deit_tiny_patch16_224").eval())
    pyengine.apply(model, random_spec(pyengine.geometry(model), 9, model="deit_tiny_patch16_224"))
    pyengine.save(model, tmp_path)  # a gated model is compiled on the way
    loaded = pyengine.load(tmp_path)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), pyengine.compile(model).eval()(x))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        pyengine.load(tmp_path)
    with pytest.raises(ValueError, match="compact"):
        pyengine.save(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
                                        depth=1), tmp_path)
