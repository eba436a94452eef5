"""Routing against hand computations; the sweep, the one-shot plug-in and both CLI commands on
tiny models (the dense-model trainer is replaced by tiny untrained models)."""
import argparse
import json
import math

import numpy as np
import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import pyengine
from pyengine.models.vit import cost as cost_model
from pyengine.methods.base import run_method
from pyengine.experiments.route import cross_validate, pareto, pick, prior, route_curve
from pyengine.structure.spec import Spec


# ---- routing ---------------------------------------------------------------------------------
def test_priors_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, -1.0]])
    p = np.exp([[2, 0, 0], [1, 1, -1]]) / np.exp([[2, 0, 0], [1, 1, -1]]).sum(1, keepdims=True)
    np.testing.assert_allclose(prior(logits, "max_softmax"), p.max(1))
    np.testing.assert_allclose(prior(logits, "margin"), [p[0, 0] - p[0, 1], 0.0], atol=1e-15)
    np.testing.assert_allclose(prior(logits, "neg_entropy"), (p * np.log(p)).sum(1))
    with pytest.raises(ValueError, match="unknown prior 'bogus'"):
        prior(logits, "bogus")


def _routing_case():
    # 10 inputs, 3 classes; the light expert is wrong exactly on its 3 least confident inputs,
    # the heavy expert is right everywhere but input 9
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    conf = torch.tensor([5., 4.5, 4., 3.5, 3., 2.5, 2., 0.3, 0.2, 0.1])
    light = torch.zeros(10, 3)
    wrong = {7, 8, 9}
    for i in range(10):
        light[i, (y[i] + (1 if i in wrong else 0)) % 3] = conf[i]
    heavy = torch.full((10, 3), -1.0)
    heavy[torch.arange(10), y] = 1.0
    heavy[9] = torch.tensor([-1.0, 1.0, -1.0])
    return light, heavy, y


def test_route_curve_by_hand():
    light, heavy, y = _routing_case()
    curve = route_curve(light, heavy, y, light_macs=25.0, heavy_macs=100.0)
    assert curve[0]["usage"] == 0 and curve[0]["top1"] == 70.0 and curve[0]["cost"] == 0.25
    assert curve[-1]["usage"] == 1 and curve[-1]["top1"] == 90.0 and curve[-1]["cost"] == 1.25
    # routing the 3 least confident: inputs 7 and 8 fixed, 9 stays wrong -> 90%, cost 0.25 + 0.3
    p3 = [c for c in curve if math.isclose(c["usage"], 0.3)][0]
    assert p3["top1"] == 90.0 and math.isclose(p3["cost"], 0.55)
    # routing 2 (inputs 8 and 9) fixes only 8 -> 80%
    p2 = [c for c in curve if math.isclose(c["usage"], 0.2)][0]
    assert p2["top1"] == 80.0
    best = pick(curve, 90.0)
    assert math.isclose(best["usage"], 0.3) and math.isclose(best["cost"], 0.55)
    assert pick(curve, 95.0) is None
    front = pareto(curve)
    costs = [p["cost"] for p in front]
    assert costs == sorted(costs) and front[-1]["top1"] == 90.0
    assert all(a["top1"] < b["top1"] for a, b in zip(front, front[1:]))


def test_cross_validate_holds_out():
    light, heavy, y = _routing_case()
    cv = cross_validate(light, heavy, y, 25.0, 100.0, "max_softmax", folds=2, seed=0)
    assert len(cv["folds"]) == 2
    assert 0 <= cv["usage"] <= 1 and cv["cost"] == pytest.approx(0.25 + cv["usage"])


# ---- tiny models and data -------------------------------------------------------------------
def tiny_vit():
    torch.manual_seed(0)
    return pyengine.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
                                 embed_dim=12, depth=2, num_heads=3, mlp_ratio=2.0,
                                 num_classes=10)


def tiny_resnet():
    torch.manual_seed(0)
    m = pyengine.create_model("resnet18", num_classes=10, channels=(8, 8, 16, 16), stem_width=8)
    m.pyengine_img_size = 32
    return m


def tiny_data(n=48):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))


# ---- sweep -----------------------------------------------------------------------------------
def test_sweep_rows_budget_and_plot(tmp_path):
    from pyengine.cli.commands.sweep import claim
    from pyengine.experiments.sweep import plot, sweep
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    val = DataLoader(tiny_data(20), batch_size=8)
    r = sweep(model, tiny_data(), val, ["agf", "wanda", "random"], (0.0, 0.5), seeds=(0, 1),
              calib_batches=2, batch_size=8, progress=False, log=lambda s: None)
    assert len(r["rows"]) == 3 * 2 * 2
    for row in r["rows"]:
        assert row["kept_macs"] <= row["target"] + 1e-12
        if row["removed"] == 0:
            assert row["top1"] == r["dense_top1"]
        else:
            assert row["kept_macs"] > row["target"] - 0.1
    s = r["summary"]["top1"]
    assert set(s) == {"agf", "wanda", "random"} and s["agf"]["0.50"]["n"] == 2
    # the trained model itself is untouched (a gated copy is pruned)
    assert not pyengine.api.is_gated(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    c = claim(r, at="0.50")
    assert set(c["static_below_random"]) == {"wanda"} and isinstance(c["claim_holds"], bool)
    png = tmp_path / "s.png"
    plot({"vit": r}, png)
    assert png.stat().st_size > 1000


def test_sweep_resnet():
    from pyengine.experiments.sweep import sweep
    val = DataLoader(tiny_data(16), batch_size=8)
    r = sweep(tiny_resnet(), tiny_data(16), val, ["taylor", "magnitude"], (0.0, 0.2),
              seeds=(0,), calib_batches=1, batch_size=8, progress=False, log=lambda s: None)
    assert len(r["rows"]) == 4
    assert all(row["kept_macs"] <= row["target"] + 1e-12 for row in r["rows"])


def test_sweep_errors():
    from pyengine.experiments.sweep import sweep
    val = DataLoader(tiny_data(8), batch_size=8)
    with pytest.raises(ValueError, match="unknown criterion 'l1'"):
        sweep(tiny_vit(), tiny_data(8), val, ["l1"], progress=False)
    with pytest.raises(ValueError, match="must be in"):
        sweep(tiny_vit(), tiny_data(8), val, ["agf"], removed=(1.0,), progress=False)


# ---- the prune plug-in --------------------------------------------------------------------------
def _oneshot(model, loader, method="agf", **kw):
    """A one-shot method through the method interface with this file's defaults."""
    opts = dict(target=0.5, epochs=0, lr=1e-3, seed=0, device="cpu", amp=None, min_heads=1,
                round_to=None, calib_batches=2, allocation="global", granularity="dim",
                min_head_dims=0.0, min_ffn=0.0)
    opts.update(kw)
    return run_method(model, method, loader, img_size=32, **opts)


@pytest.mark.parametrize("method", ["agf", "taylor", "wanda", "ria", "magnitude", "random"])
def test_prune_structure_plugin(method):
    model = tiny_vit()
    loader = DataLoader(tiny_data(16), batch_size=8)
    out = _oneshot(model, loader, method=method, target=0.6)
    assert out is model and pyengine.api.is_gated(out)
    s = pyengine.spec(out)
    dense = cost_model.total_macs(Spec.full(pyengine.geometry(out), "vit_tiny_patch16_224"))
    assert 0.5 < cost_model.total_macs(s) / dense <= 0.6
    assert all(len(b.heads) >= 1 for b in s.blocks)
    compact = pyengine.compile(out.eval())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(compact(x), out(x), rtol=1e-4, atol=1e-5)


def test_prune_structure_plugin_resnet_and_flags():
    model = tiny_resnet()
    loader = DataLoader(tiny_data(16), batch_size=8)
    out = _oneshot(model, loader, method="agf", target=0.8, round_to=4, allocation="uniform")
    s = pyengine.spec(out)
    assert all(len(b.kept("conv1")) % 4 == 0 for b in s.blocks)
    assert any(len(b.kept("conv1")) < c for b, (c,) in zip(s.blocks, s.dense.inner))
    assert pyengine.cost(s).macs <= 0.8 * pyengine.cost(pyengine.api.spec(tiny_resnet())).macs
    from pyengine.cli import build_parser
    a = build_parser().parse_args(["prune", "--model", "m", "--out", "o", "--method", "agf",
                                   "--calib-batches", "3", "--allocation", "uniform",
                                   "--granularity", "head"])
    assert (a.calib_batches, a.allocation, a.granularity) == (3, "uniform", "head")


# ---- the commands, with the dense trainer replaced by tiny models --------------------------
@pytest.fixture
def tiny_dense(monkeypatch):
    import pyengine.experiments.sweep as sw
    monkeypatch.setattr(sw, "trained_dense", lambda arch, *a, **k: (
        (tiny_vit() if arch == "vit" else tiny_resnet()).eval(),
        {"arch": arch, "recipe": "tiny test model", "history": [{"epoch": 0}]}))


def test_sweep_command(tmp_path, tiny_dense):
    from pyengine.cli import main
    out = tmp_path / "sweep.json"
    rc = main(["sweep", "--arch", "vit", "--criteria", "agf", "random", "--removed", "0", "0.5",
               "--seeds", "1", "--calib-batches", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    r = json.loads(out.read_text())
    run = r["runs"]["vit/global"]
    assert len(run["rows"]) == 2 * 1 * 2 and r["claim_75"]["vit/global"] == {}
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_route_command(tmp_path, tiny_dense):
    from pyengine.cli import main
    out = tmp_path / "route.json"
    rc = main(["route", "--arch", "vit", "--light-target", "0.5", "--calib-batches", "1",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["light"]["kept_macs"] <= 0.5
    for name, d in r["priors"].items():
        assert d["curve"][0]["usage"] == 0 and d["curve"][-1]["usage"] == 1
        assert d["curve"][-1]["top1"] == pytest.approx(r["heavy"]["top1"])
        m = d["matched_in_sample"]
        assert m["top1"] >= r["heavy"]["top1"] - 1e-9
        assert m["cost"] == pytest.approx(r["light"]["kept_macs"] + m["usage"])
    assert (tmp_path / "route.png").stat().st_size > 1000
    assert main(["route", "--light-target", "1.5", "--out", str(out)]) == 1
