"""Pruning limit, the measured side: one-shot global magnitude pruning (unstructured) and
Spec-unit pruning (structured) against hand-made references, and the ``pyengine limit`` CLI."""
import copy
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pyengine
from pyengine.experiments.limit import measure, measure_structured, prunable_parameters
from pyengine.experiments.limit.measured import (contiguous_matching, largest_matching, removal_order,
                                     removed_prefix, structured_units)
from pyengine.experiments.limit.models import DigitsMLP, digits_vit_small
from pyengine.train.trainer import evaluate


def _loader(img, n=40, n_cls=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, img, img, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, n_cls, (n,), generator=g)), batch_size=16)


def _teacher_labels(model, loader):
    """Relabel with the model's own predictions so the unpruned accuracy is 100%."""
    xs = torch.cat([x for x, _ in loader])
    with torch.no_grad():
        y = model(xs).argmax(-1)
    return DataLoader(TensorDataset(xs, y), batch_size=16)


def test_threshold_rules():
    ratios = [0.0, 0.1, 0.2, 0.3, 0.4]
    acc = [90.0, 90.0, 89.0, 90.0, 50.0]
    assert largest_matching(ratios, acc, 90.0) == 0.3  # the paper: largest ratio that matches
    assert contiguous_matching(ratios, acc, 90.0) == 0.1  # before the first drop
    assert largest_matching(ratios, acc, 90.0, tolerance=1.0) == 0.3
    assert contiguous_matching(ratios, acc, 90.0, tolerance=1.0) == 0.3
    assert largest_matching(ratios, [10.0] * 5, 90.0) == 0.0


def test_measure_matches_manual_global_magnitude_pruning():
    model = DigitsMLP(img_size=6, hidden=(9, 5))
    loader = _teacher_labels(model, _loader(6))
    before = copy.deepcopy(model.state_dict())
    ratios = [0.0, 0.25, 0.5, 0.8, 1.0]
    curve = measure(model, loader, ratios)
    # weights restored exactly
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert curve.base == 100.0 and curve.accuracy[0] == 100.0
    weights = [p for _, p in prunable_parameters(model)]
    flat = torch.cat([p.detach().reshape(-1) for p in weights])
    n = flat.numel()
    for r, acc, R in zip(ratios, curve.accuracy, curve.R):
        k = int(np.floor(r * n + 1e-9))
        ref = copy.deepcopy(model)
        thr_idx = torch.sort(flat.abs().double(), stable=True).indices[:k]
        pruned = flat.clone()
        pruned[thr_idx] = 0
        chunks = torch.split(pruned, [p.numel() for p in weights])
        with torch.no_grad():
            for (_, p), c in zip(prunable_parameters(ref), chunks):
                p.copy_(c.view_as(p))
        assert acc == evaluate(ref, loader)
        assert abs(R - float((flat - pruned).double().norm())) < 1e-6
    assert curve.threshold == largest_matching(ratios, curve.accuracy, 100.0)
    with pytest.raises(ValueError, match="ratios"):
        measure(model, loader, [0.5, 1.2])


def _zero_units(model, units, removed):
    """Reference for structured pruning: zero every weight a removed unit owns."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i in removed:
            u = units[i]
            if u.kind == "head":
                attn = ref.blocks[u.block].attn
                H, Dh = attn.num_heads, attn.head_dim
                qkv = attn.qkv.weight.view(3, H, Dh, -1)
                qkv[:, u.index] = 0
                attn.proj.weight.view(-1, H, Dh)[:, u.index] = 0
            else:
                mlp = ref.blocks[u.block].mlp
                mlp.fc1.weight[u.index] = 0
                mlp.fc2.weight[:, u.index] = 0
    return ref


def test_structured_vit_equals_zeroed_units_and_removes_whole_blocks():
    # head dim 7, 3 heads, odd FFN width; high ratios remove every head of a block
    model = digits_vit_small(img_size=8, patch_size=4, embed_dim=21, num_heads=3, depth=2,
                             mlp_ratio=13 / 21)
    loader = _teacher_labels(model, _loader(8, n=24))
    units = structured_units(model)
    assert sum(u.kind == "head" for u in units) == 6 and sum(u.kind == "neuron" for u in units) == 26
    order = removal_order(units)
    ratios = [0.0, 0.3, 0.6, 0.9, 1.0]
    curve = measure_structured(model, loader, ratios)
    assert curve.accuracy[0] == 100.0
    for r, acc, R, frac in zip(ratios, curve.accuracy, curve.R, curve.meta["removed_fraction"]):
        k = removed_prefix(units, order, r)
        assert frac <= r + 1e-12
        ref = _zero_units(model, units, order[:k])
        assert acc == evaluate(ref, loader), r
        assert abs(R - np.sqrt(sum(units[i].sqnorm for i in order[:k]))) < 1e-9
    # the ratio-1 spec removes everything: logits are the head applied to the residual stream
    assert curve.meta["removed_units"][-1] == len(units)
    assert not pyengine.api.is_gated(model)  # the caller's model is untouched


def test_structured_mlp_neurons_and_bad_models():
    model = DigitsMLP(img_size=5, hidden=(8, 6))
    loader = _teacher_labels(model, _loader(5))
    units = structured_units(model)
    assert len(units) == 14 and all(u.size == (25 + 6 if u.block == 0 else 8 + 10) for u in units)
    before = copy.deepcopy(model.state_dict())
    curve = measure_structured(model, loader, [0.0, 0.5])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    order = removal_order(units)
    k = removed_prefix(units, order, 0.5)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i in order[:k]:
            u = units[i]
            ref.layers[u.block].weight[u.index] = 0
            ref.layers[u.block + 1].weight[:, u.index] = 0
    assert curve.accuracy[1] == evaluate(ref, loader)
    with pytest.raises(ValueError, match="structured"):
        structured_units(torch.nn.Linear(3, 3))


def test_cli_limit_writes_json_and_plot(tmp_path, capsys):
    from pyengine.cli import main
    rc = main(["limit", "--model", "digits_mlp", "--epochs", "2", "--iters", "6", "--probes", "2",
               "--flat-rows", "4", "--steps", "10", "--hessian-samples", "256", "--structured",
               "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "predicted threshold:" in out and "measured threshold:" in out
    r = json.loads((tmp_path / "limit_digits_mlp.json").read_text())
    assert (tmp_path / "limit_digits_mlp.png").stat().st_size > 10_000
    assert r["format"] == "pyengine.limit/1" and r["prunable_weights"] == 64 * 128 + 128 * 128 + 1280
    assert len(r["measured"]["accuracy"]) == 10 and r["measured"]["ratios"][-1] == 0.9
    assert r["predicted"]["ratio"] in r["measured"]["ratios"]
    assert r["hessian"]["samples"] == 256 and len(r["spectrum"]["nodes"]) == 2
    assert abs(r["gap"] - (r["predicted"]["ratio"] - r["measured"]["threshold"])) < 1e-12
    assert abs(r["loss"]["eps_std"] - np.std(r["loss"]["per_batch"])) < 1e-12
    assert "structured" in r and len(r["flat"]["rows"]) == 4


@pytest.mark.parametrize("argv, msg", [
    (["--model", "digits_mlp", "--iters", "0"], "--iters"),
    (["--model", "no_such_model_xyz"], "no_such_model_xyz"),
    (["--model", "digits_mlp", "--tolerance", "-1"], ">= 0"),
])
def test_cli_limit_bad_input(argv, msg, tmp_path, capsys):
    from pyengine.cli import main
    assert main(["limit", *argv, "--out", str(tmp_path), "--quiet"]) == 1
    assert msg in capsys.readouterr().err


def test_cli_limit_on_a_saved_directory(tmp_path, capsys):
    """A pyengine.save directory is analysed as saved (no training, its own input size);
    the structured extension needs the dense model and says so before any work."""
    from pyengine.cli import main
    model = digits_vit_small(embed_dim=16, num_heads=2, depth=1, mlp_ratio=1.0)
    pyengine.gate(model)
    pyengine.save(model, tmp_path / "m")
    rc = main(["limit", "--model", str(tmp_path / "m"), "--iters", "3", "--probes", "1",
               "--flat-rows", "2", "--steps", "4", "--hessian-samples", "64", "--no-plot",
               "--out", str(tmp_path), "--name", "saved", "--quiet"])
    assert rc == 0
    r = json.loads((tmp_path / "saved.json").read_text())
    assert r["epochs"] == 0 and r["img_size"] == 16 and r["history"] == []
    assert main(["limit", "--model", str(tmp_path / "m"), "--structured", "--out",
                 str(tmp_path), "--quiet"]) == 1
    assert "dense model" in capsys.readouterr().err
