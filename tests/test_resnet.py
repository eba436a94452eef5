"""timm ResNets: CNN specs, gate/apply/compile equivalence, cost vs FlopCounterMode, save/load."""
import json
import random

import pytest
import timm
import torch

import pyengine
from pyengine.cost.flop_count import count_flops
from pyengine.models.resnet import blocks as resnet
from pyengine.structure.spec import CnnSpec, Spec, SpecError, make_conv_block

IMG = 64


def random_cnn_spec(g, seed, model=None, p_remove=0.25):
    """Random kept channels (1 channel, a third, all, odd counts) and removed blocks, the
    downsample blocks included."""
    rng = random.Random(seed)
    it = iter(zip(g.inner, g.downsample))
    stages = []
    for n in g.layers:
        blocks = []
        for _ in range(n):
            inner, _ds = next(it)
            if rng.random() < p_remove:
                blocks.append(make_conv_block(False))
                continue
            chans = {}
            for slot, c in zip(g.slots, inner):
                k = rng.choice((1, 7, max(1, c // 3), c))
                chans[slot] = rng.sample(range(c), min(k, c))
            blocks.append(make_conv_block(True, **chans))
        stages.append(tuple(blocks))
    return CnnSpec(tuple(stages), model=model, dense=g)


def _gated(name, **kw):
    m = pyengine.create_model(name, num_classes=7, **kw)
    m.pyengine_img_size = IMG
    # non-trivial BN statistics and affine, so slicing errors cannot hide
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.normal_(1, 0.2)
                mod.bias.normal_(0, 0.1)
    return pyengine.gate(m.eval(), method="mask")


@pytest.mark.parametrize("name,seeds", [("resnet18", range(6)), ("resnet50", range(3)),
                                        ("resnet26d", range(2))])
def test_compile_equals_hard_gated(name, seeds):
    model = _gated(name)
    g = resnet.geometry(model)
    x = torch.randn(2, 3, IMG, IMG)
    for seed in seeds:
        s = random_cnn_spec(g, seed, model=name)
        pyengine.apply(model, s)
        assert pyengine.spec(model) == s
        compact = pyengine.compile(model).eval()
        assert pyengine.spec(compact) == s
        with torch.no_grad():
            want, got = model(x), compact(x)
        assert torch.isfinite(got).all()
        assert (want - got).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item()), seed
        assert sum(p.numel() for p in compact.parameters()) < sum(
            p.numel() for p in model.parameters())


def test_removed_blocks_are_identity_or_shortcut():
    model = _gated("resnet18")
    g = resnet.geometry(model)
    s = CnnSpec(tuple(tuple(make_conv_block(False) for _ in range(n)) for n in g.layers),
                model="resnet18", dense=g)
    pyengine.apply(model, s)
    compact = pyengine.compile(model).eval()
    for st in resnet.stages(compact):
        for blk in st:
            if isinstance(blk, resnet.RemovedBlock):
                assert blk.downsample is not None  # only downsample blocks keep anything
            else:
                assert isinstance(blk, torch.nn.Identity)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert (model(x) - compact(x)).abs().max() <= 1e-5
        # by hand: stem, then relu(downsample(.)) for the three downsample blocks
        h = compact.maxpool(compact.act1(compact.bn1(compact.conv1(x))))
        for st in resnet.stages(compact)[1:]:
            h = torch.relu(st[0].downsample(h))
        want = compact.fc(compact.global_pool(h))
        assert (compact(x) - want).abs().max() <= 1e-6


def test_scale_gates_fold_into_compact_weights():
    """Real-valued (SSS) gate values: compile folds them into the weights exactly."""
    m = pyengine.create_model("resnet18", num_classes=5).eval()
    pyengine.gate(m, method="sss")
    with torch.no_grad():
        for blk in (b for st in resnet.stages(m) for b in st):
            blk.gates.conv1.uniform_(-1.5, 1.5)
            blk.gates.conv1[::3] = 0
            blk.gates.block.fill_(0.7)
        resnet.stages(m)[2][1].gates.block.zero_()
    s = pyengine.spec(m)
    assert not s.stages[2][1].keep
    assert len(s.stages[0][0].kept("conv1")) == 64 - 22
    compact = pyengine.compile(m).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert (m(x) - compact(x)).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_cost_agrees_with_flop_counter(name):
    model = _gated(name)
    g = resnet.geometry(model)
    x = torch.randn(3, 3, IMG, IMG)
    for seed in (0, 1):
        pyengine.apply(model, random_cnn_spec(g, seed + 10, model=name))
        compact = pyengine.compile(model).eval()
        counted = count_flops(compact, x)
        c = pyengine.cost(compact, batch=3, img_size=IMG)
        assert abs(c.flops - counted) <= 0.01 * counted
        assert c.flops == 2 * c.macs
        # the spec alone (dense geometry included) costs the same
        assert pyengine.cost(pyengine.spec(compact), batch=3, img_size=IMG).macs == c.macs
        # and so does the gated model it came from
        assert pyengine.cost(model, batch=3, img_size=IMG).macs == c.macs
        assert c.params == sum(p.numel() for p in compact.parameters())
    # dense: timm's own model, no pyengine involved
    dense = timm.create_model(name, num_classes=7).eval()
    assert pyengine.cost(dense, batch=3, img_size=IMG).flops == count_flops(dense, x)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_save_load_round_trip_exact(tmp_path, monkeypatch, name):
    model = _gated(name)
    pyengine.apply(model, random_cnn_spec(resnet.geometry(model), 3, model=name))
    compact = pyengine.compile(model).eval()
    pyengine.save(compact, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "manifest.json",
                                                          "model.safetensors", "spec.json"]
    assert "stages" in json.loads((tmp_path / "spec.json").read_text())

    def no_pickle(*a, **k):
        raise AssertionError("pyengine.load must not unpickle anything")
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = pyengine.load(tmp_path)
    assert pyengine.spec(loaded) == pyengine.spec(compact)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(loaded(x), compact(x))
    a, b = compact.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compact_trains_like_hard_gated():
    model = _gated("resnet18")
    pyengine.apply(model, random_cnn_spec(resnet.geometry(model), 4))
    compact = pyengine.compile(model)
    model.train(), compact.train()  # BN batch statistics are per channel: still equal
    x = torch.randn(4, 3, IMG, IMG)
    model(x).square().sum().backward()
    compact(x).square().sum().backward()
    for name in ("conv1.weight", "fc.weight", "bn1.weight"):
        a, b = model.get_parameter(name).grad, compact.get_parameter(name).grad
        assert a.abs().max() > 0
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), name


def test_cnn_spec_json_and_errors():
    g = resnet.geometry(_gated("resnet50"))
    s = random_cnn_spec(g, 7, model="resnet50")
    assert Spec.from_json(s.to_json()) == s
    assert isinstance(Spec.from_json(s.to_json()), CnnSpec)
    d = s.to_dict()
    bad = json.loads(json.dumps(d))
    bad["stages"][0][0] = {"keep": True, "channels": {"conv1": [0, 999], "conv2": [1]}}
    with pytest.raises(SpecError, match=r"stages\[0\]\[0\].channels.conv1: index 999"):
        Spec.from_dict(bad)
    bad["stages"][0][0] = {"keep": True, "channels": {"conv1": [0]}}
    with pytest.raises(SpecError, match="conv2"):
        Spec.from_dict(bad)
    bad["stages"][0][0] = {"keep": True, "channels": {"conv1": [], "conv2": [1]}}
    with pytest.raises(SpecError, match="keep.*false"):
        Spec.from_dict(bad)
    bad["stages"][0][0] = {"keep": "yes", "channels": {}}
    with pytest.raises(SpecError, match="keep"):
        Spec.from_dict(bad)
    bad["stages"][0][0] = {"keep": True, "channels": {"conv1": [3, 3], "conv2": [1]}}
    with pytest.raises(SpecError, match="duplicate index 3"):
        Spec.from_dict(bad)
    bad = json.loads(json.dumps(d))
    bad["stages"][0].pop()
    with pytest.raises(SpecError, match="blocks per stage"):
        Spec.from_dict(bad)
    # a removed block keeps nothing, whatever channels were written
    d2 = json.loads(json.dumps(d))
    d2["stages"][1][0] = {"keep": False, "channels": {"conv1": [1]}}
    assert Spec.from_dict(d2).stages[1][0].channels == ()
    # ViT spec on a ResNet and the other way round
    m = _gated("resnet18")
    with pytest.raises(SpecError, match="CNN spec"):
        pyengine.apply(m, Spec((), model="resnet18"))
    vit = pyengine.gate(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
                                          depth=1))
    with pytest.raises(SpecError, match="CNN spec"):
        pyengine.apply(vit, s)
    with pytest.raises(SpecError, match="resnet50"):
        pyengine.apply(m, s)


def test_gate_keeps_parameters_and_timm_names():
    m = timm.create_model("resnet18")
    before = dict(m.named_parameters())
    pyengine.gate(m)
    after = {n: p for n, p in m.named_parameters()}
    assert before.keys() == after.keys()
    assert all(before[k] is after[k] for k in before)
    assert pyengine.spec(m) == CnnSpec.full(resnet.geometry(m), model="resnet18")


def test_compact_resnet_exports():
    model = _gated("resnet18")
    pyengine.apply(model, random_cnn_spec(resnet.geometry(model), 5))
    compact = pyengine.compile(model).eval()
    ep = torch.export.export(compact, (torch.randn(2, 3, IMG, IMG),))
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert (ep.module()(x) - compact(x)).abs().max() <= 1e-5
