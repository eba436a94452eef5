"""Spec: JSON round trip, validation with clear errors, spec/apply on gated models."""
import json

import pytest
import timm
import torch

import pyengine
from pyengine import Spec, SpecError

from _specs import random_spec

TINY = dict(img_size=32, patch_size=8, depth=2, num_classes=5)


def _gated():
    return pyengine.gate(timm.create_model("vit_tiny_patch16_224", **TINY).eval())


def test_design_example_parses_and_round_trips():
    text = """{"format": "pyengine.spec/1", "model": "deit_small_patch16_224",
     "blocks": [
       {"heads": [{"index": 0, "qk": [0, 1, 5], "v": [0, 2]}, {"index": 3, "qk": [4], "v": [1, 9]}],
        "mlp": [0, 1, 7, 300]},
       {"heads": [], "mlp": []}
     ]}"""
    s = Spec.from_json(text)
    assert s.blocks[0].qk_dims == [3, 1] and s.blocks[0].v_dims == [2, 2]
    assert not s.blocks[1].has_attn and not s.blocks[1].has_mlp
    assert Spec.from_json(s.to_json()) == s
    assert json.loads(s.to_json())["blocks"][0]["mlp"] == [0, 1, 7, 300]


def test_random_specs_round_trip_with_geometry():
    g = pyengine.geometry(timm.create_model("deit_tiny_patch16_224"))
    for seed in range(5):
        s = random_spec(g, seed, model="deit_tiny_patch16_224")
        assert Spec.from_json(s.to_json()) == s


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["blocks"][0]["heads"][0].update(index=9), "head index"),
    (lambda d: d["blocks"][0]["heads"][0].update(qk=[1, 1]), "duplicate index 1"),
    (lambda d: d["blocks"][0]["heads"][0].update(v=[64]), "index 64 out of range"),
    (lambda d: d["blocks"][0].update(mlp=[-1]), "out of range"),
    (lambda d: d["blocks"][0].update(mlp=[768]), "index 768 out of range"),
    (lambda d: d["blocks"][0].update(mlp=[1.5]), "expected integers"),
    (lambda d: d["blocks"][0].pop("mlp"), "needs both"),
    (lambda d: d["blocks"][0].update(extra=1), "unknown field"),
    (lambda d: d.update(format="other/9"), "unsupported spec format"),
    (lambda d: d["blocks"].pop(), "dense.depth"),
    (lambda d: d["blocks"][0]["heads"].append(dict(d["blocks"][0]["heads"][0])), "duplicate head"),
    (lambda d: d["blocks"][0]["heads"][0].update(v=[]), "keeps no value dims"),
    (lambda d: d.update(meta=[1, 2]), "meta: expected a JSON object"),
])
def test_validation_errors_are_clear(mutate, message):
    g = pyengine.geometry(timm.create_model("deit_tiny_patch16_224"))
    d = Spec.full(g, model="deit_tiny_patch16_224").to_dict()
    mutate(d)
    with pytest.raises(SpecError, match=message):
        Spec.from_dict(d)


def test_not_json_and_not_object():
    with pytest.raises(SpecError, match="not valid JSON"):
        Spec.from_json("{blocks: ")
    with pytest.raises(SpecError, match="JSON object"):
        Spec.from_json("[1, 2]")


def test_apply_checks_the_model():
    model = _gated()
    g = pyengine.geometry(model)
    other = random_spec(pyengine.geometry(timm.create_model("deit_tiny_patch16_224")), 0,
                        model="deit_tiny_patch16_224")
    with pytest.raises(SpecError):
        pyengine.apply(model, other)
    wrong_name = Spec(random_spec(g, 0).blocks, model="deit_base_patch16_224")
    with pytest.raises(SpecError, match="deit_base_patch16_224"):
        pyengine.apply(model, wrong_name)
    # no dense geometry in the JSON: indices are still checked against the model
    d = random_spec(g, 1).to_dict()
    d.pop("dense")
    d["blocks"][0]["mlp"] = [100000]
    with pytest.raises(SpecError, match="out of range"):
        pyengine.apply(model, Spec.from_dict(d))
    with pytest.raises(ValueError, match="pyengine.gate"):
        pyengine.apply(timm.create_model("vit_tiny_patch16_224", **TINY), random_spec(g, 2))


def test_spec_of_dense_and_gated_models_is_full():
    dense = timm.create_model("vit_tiny_patch16_224", **TINY)
    g = pyengine.geometry(dense)
    assert pyengine.spec(dense) == Spec.full(g, model="vit_tiny_patch16_224")
    assert pyengine.spec(_gated()) == Spec.full(g, model="vit_tiny_patch16_224")


def test_unsupported_models_name_the_module():
    with pytest.raises(pyengine.UnsupportedModuleError, match="ResNet"):
        pyengine.gate(timm.create_model("seresnet18"))  # plain ResNets are supported (CNN spec)
    qkn = timm.create_model("vit_tiny_patch16_224", qk_norm=True, **TINY)
    with pytest.raises(pyengine.UnsupportedModuleError, match="qk_norm"):
        pyengine.gate(qkn)
    # the failed gate left the model untouched
    assert type(qkn.blocks[0].attn).__name__ == "Attention"
    with pytest.raises(ValueError, match="unknown gate method"):
        pyengine.gate(timm.create_model("vit_tiny_patch16_224", **TINY), method="nope")
    # HiAP gates are a registered kind now (pyengine.hiap, imported on first use)
    assert pyengine.gate(timm.create_model("vit_tiny_patch16_224", **TINY),
                         method="hiap").pyengine_method == "hiap"


def test_gate_keeps_original_parameters():
    model = timm.create_model("vit_tiny_patch16_224", **TINY)
    before = {n: p for n, p in model.named_parameters()}
    pyengine.gate(model)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    assert all(after[name] is p for name, p in before.items())
