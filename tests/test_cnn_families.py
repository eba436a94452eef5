"""ConvNeXt, EfficientNet / MobileNetV3 and RegNet: family specs, gate/apply/compile
equivalence, cost vs FlopCounterMode and exact params, save/load, importance units, the
solver ledger, HiAP's expected MACs and projection, and HiAP / AGF runs at a MAC target."""
import copy
import json
import random

import pytest
import timm
import torch
from torch.utils.data import DataLoader, Subset

import pyengine
from pyengine.cost.flop_count import count_flops
from pyengine.methods.base import run_method
from pyengine.methods.criteria import CRITERIA, calibrate, score
from pyengine.models import UnsupportedModuleError, adapter_for
from pyengine.models.cnn.ledger import SlotLedger
from pyengine.structure.spec import Spec, SpecError, make_conv_block

IMG = 32
FAMILIES = {"convnext_atto": "convnext", "efficientnet_b0": "efficientnet",
            "mobilenetv3_small_100": "efficientnet", "regnety_002": "regnet"}
NAMES = list(FAMILIES)
_DENSE: dict = {}


def dense(name, **kw):
    """A fresh copy of the dense model, with non-trivial BatchNorm statistics and affine and
    layer scales of order 1, so a slicing error cannot hide (cached per name and kwargs)."""
    key = (name, json.dumps(kw, sort_keys=True))
    if key not in _DENSE:
        torch.manual_seed(1)
        m = pyengine.create_model(name, num_classes=10, img_size=IMG, **kw).eval()
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_mean.normal_(0, 0.1)
                    mod.running_var.uniform_(0.5, 1.5)
                    mod.weight.normal_(1, 0.2)
                    mod.bias.normal_(0, 0.1)
                if getattr(mod, "gamma", None) is not None:  # ConvNeXt layer scale (1e-6)
                    mod.gamma.normal_(0.5, 0.2)
        _DENSE[key] = m
    return copy.deepcopy(_DENSE[key])


def random_spec(a, g, seed, model, p_remove=0.3):
    """Random kept units (1, 3, a third, all; odd counts) and removed residual blocks."""
    rng = random.Random(seed)
    it = iter(g.blocks)
    stages = []
    for n in g.layers:
        st = []
        for _ in range(n):
            b = next(it)
            if b.removable and rng.random() < p_remove:
                st.append(make_conv_block(False))
                continue
            ch = {}
            if b.slot:
                k = min(b.units, rng.choice((1, 3, max(1, b.units // 3), b.units)))
                units = rng.sample(range(b.units), k)
                ch[b.slot] = [u * b.group + j for u in units for j in range(b.group)]
            st.append(make_conv_block(True, **ch))
        stages.append(tuple(st))
    return a.spec_type(tuple(stages), model=model, dense=g)


def _close(want, got, tol=1e-4):
    return (want - got).abs().max().item() <= tol * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("name", NAMES)
def test_compile_equals_hard_gated(name):
    model = pyengine.gate(dense(name))
    a = adapter_for(model)
    assert a.name == FAMILIES[name]
    g = pyengine.geometry(model)
    x = torch.randn(2, 3, IMG, IMG)
    for seed in range(3):
        s = random_spec(a, g, seed, name)
        pyengine.apply(model, s)
        assert pyengine.spec(model) == s
        compact = pyengine.compile(model).eval()
        assert pyengine.spec(compact) == s and pyengine.is_compact(compact)
        with torch.no_grad():
            assert _close(model.forward_features(x), compact.forward_features(x)), seed
            want, got = model(x), compact(x)
        assert torch.isfinite(got).all() and _close(want, got), seed
        assert sum(p.numel() for p in compact.parameters()) < sum(
            p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_cost_agrees_with_flop_counter_and_params_exact(name):
    model = pyengine.gate(dense(name))
    a = adapter_for(model)
    x = torch.randn(3, 3, IMG, IMG)
    pyengine.apply(model, random_spec(a, pyengine.geometry(model), 10, name))
    compact = pyengine.compile(model).eval()
    c = pyengine.cost(compact, batch=3)
    assert c.flops == count_flops(compact, x) and c.flops == 2 * c.macs
    assert c.params == sum(p.numel() for p in compact.parameters())
    # the spec alone and the gated model it came from cost the same
    assert pyengine.cost(pyengine.spec(compact), batch=3).macs == c.macs
    assert pyengine.cost(model, batch=3).macs == c.macs
    # dense: timm's own model, no pyengine involved
    d = timm.create_model(name, num_classes=10).eval()
    cd = pyengine.cost(d, batch=3, img_size=IMG)
    assert cd.flops == count_flops(d, x) and cd.params == sum(p.numel() for p in d.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip_exact(tmp_path, monkeypatch, name):
    model = pyengine.gate(dense(name))
    pyengine.apply(model, random_spec(adapter_for(model), pyengine.geometry(model), 3, name))
    compact = pyengine.compile(model).eval()
    pyengine.save(compact, tmp_path)
    assert json.loads((tmp_path / "spec.json").read_text())["family"] == FAMILIES[name]
    # the input size the cost model assumes travels with the model (and its dense twin)
    assert json.loads((tmp_path / "config.json").read_text())["kwargs"]["img_size"] == IMG

    def no_pickle(*a, **k):
        raise AssertionError("pyengine.load must not unpickle anything")
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = pyengine.load(tmp_path)
    assert pyengine.spec(loaded) == pyengine.spec(compact)
    a, b = compact.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(loaded(x), compact(x))
    assert pyengine.cost(loaded).macs == pyengine.cost(compact).macs


@pytest.mark.parametrize("name", NAMES)
def test_real_valued_gates_fold_exactly(name):
    """SSS scale factors (zeros included, a block without a residual left with no unit): the
    compact model computes what the gated one does."""
    model = pyengine.gate(dense(name), method="sss")
    gates = pyengine.api.gate_sets(model)
    g = pyengine.geometry(model)
    ids = [i for i, b in enumerate(g.blocks) if b.slot or b.removable]
    with torch.no_grad():
        for k, gs in enumerate(gates):
            for slot in gs.learned:
                t = getattr(gs, slot)
                t.copy_(torch.empty_like(t).uniform_(0.2, 1.5) * (torch.rand_like(t) > 0.3))
            if "block" in gs.learned:
                gs.block.fill_(0.0 if k == 1 else 0.7)
        # a block without a residual whose units are all zero keeps its first one (value 0)
        fixed = [k for k, i in enumerate(ids) if not g.blocks[i].removable and g.blocks[i].slot]
        if fixed:
            getattr(gates[fixed[0]], g.blocks[ids[fixed[0]]].slot).zero_()
    s = pyengine.spec(model)
    if fixed:
        i = ids[fixed[0]]
        assert s.blocks[i].keep and s.blocks[i].kept(g.blocks[i].slot) == tuple(
            range(g.blocks[i].group))
    compact = pyengine.compile(model).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert _close(model(x), compact(x))
    assert pyengine.cost(compact).macs == pyengine.cost(s).macs


def test_spec_json_and_errors():
    specs = {}
    for name in NAMES:
        m = dense(name)
        a = adapter_for(m)
        s = random_spec(a, pyengine.geometry(m), 7, name)
        back = Spec.from_json(s.to_json())  # dispatched on "family"
        assert back == s and type(back) is a.spec_type and back.dense.img_size == IMG
        specs[name] = (m, s)
    # a block without a residual cannot be removed
    m, s = specs["efficientnet_b0"]
    d = s.to_dict()
    bad = json.loads(json.dumps(d))
    bad["stages"][0][0] = {"keep": False, "channels": {}}
    with pytest.raises(SpecError, match=r"stages\[0\]\[0\]: this block has no residual"):
        Spec.from_dict(bad)
    bad = json.loads(json.dumps(d))
    bad["stages"][1][0] = {"keep": True, "channels": {"mid": [0, 999]}}
    with pytest.raises(SpecError, match=r"stages\[1\]\[0\].channels.mid: index 999 out of range"):
        Spec.from_dict(bad)
    bad["stages"][1][0] = {"keep": True, "channels": {"mlp": [0]}}
    with pytest.raises(SpecError, match=r"prunable slots are \['mid'\]"):
        Spec.from_dict(bad)
    bad["stages"][1][0] = {"keep": True, "channels": {"mid": []}}
    with pytest.raises(SpecError, match="keeps at least one channel"):
        Spec.from_dict(bad)
    with pytest.raises(SpecError, match="unknown spec family 'nosuchnet'"):
        Spec.from_dict({**d, "family": "nosuchnet"})
    # the JSON's family decides the type: an EfficientNet model takes no ConvNeXt spec
    other = Spec.from_dict({**d, "family": "convnext"})
    assert type(other).__name__ == "ConvNeXtSpec"
    with pytest.raises(SpecError, match="ConvNeXt spec.*EfficientNet/MobileNetV3 spec"):
        pyengine.apply(pyengine.gate(copy.deepcopy(m)), other)
    # RegNet keeps whole groups of its group conv
    m, s = specs["regnety_002"]
    bad = json.loads(json.dumps(s.to_dict()))
    bad["stages"][0][0] = {"keep": True, "channels": {"mid": [0, 1, 2, 3, 4, 5, 6, 7, 8]}}
    with pytest.raises(SpecError, match=r"group 1 \(channels 8-15\) is kept only in part"):
        Spec.from_dict(bad)
    # a spec of one family on another's model, a ViT or ResNet spec on a CNN of these families
    gm = pyengine.gate(specs["convnext_atto"][0])
    with pytest.raises(SpecError, match="ConvNeXt spec"):
        pyengine.apply(gm, specs["regnety_002"][1])
    with pytest.raises(SpecError, match="ConvNeXt spec"):
        pyengine.apply(gm, Spec((), model="vit_tiny_patch16_224"))


@pytest.mark.parametrize("name", NAMES)
def test_importance_units(name):
    """Every criterion scores every unit (finite, its shape; gated like plain), and each unit
    owns exactly the weights the compact model drops when the unit goes (magnitude)."""
    model = dense(name)
    a = adapter_for(model)
    g = pyengine.geometry(model)
    batches = [(torch.randn(2, 3, IMG, IMG), torch.randint(0, 10, (2,)))]
    calib = calibrate(model, batches, batches=1)
    scores = {c: score(model, c, calib) for c in CRITERIA}
    for c, sc in scores.items():
        assert len(sc) == len(g.blocks)
        for s, b in zip(sc, g.blocks):
            if b.slot:
                v = s.channels[b.slot]
                assert v.shape == (b.units,) and torch.isfinite(v).all(), c
                assert (v >= 0).all() and v.sum() > 0, c
            if b.removable:
                assert s.block == s.block and (c == "random" or s.block > 0), c
    gated = pyengine.gate(copy.deepcopy(model))
    gcal = calibrate(gated, batches, batches=1)
    for c in ("wanda", "agf"):
        for s, t in zip(scores[c], score(gated, c, gcal)):
            for k in s.channels:
                torch.testing.assert_close(s.channels[k], t.channels[k], rtol=1e-5, atol=1e-12)
    # magnitude^2 of a unit == the squared weights (conv / linear) it takes out of the model
    def weights(m):
        return sum(float((p.detach().double() ** 2).sum()) for n, p in m.named_parameters()
                   if p.dim() >= 2)
    full = a.spec_type.full(g, name)
    total = weights(pyengine.compile(pyengine.apply(pyengine.gate(dense(name)), full)))
    slotted = [i for i, b in enumerate(g.blocks) if b.units > 1]
    for i in (slotted[0], slotted[-1]):
        b = g.blocks[i]
        u = b.units // 2
        kept = [c for c in range(b.channels) if c // b.group != u]
        blocks = list(full.blocks)
        blocks[i] = make_conv_block(True, **{b.slot: kept})
        it = iter(blocks)
        s = a.spec_type(tuple(tuple(next(it) for _ in range(n)) for n in g.layers), name,
                        dense=g)
        m = pyengine.apply(pyengine.gate(dense(name)), s)
        dropped = total - weights(pyengine.compile(m))
        mag = float(scores["magnitude"][i].channels[b.slot][u]) ** 2
        assert dropped == pytest.approx(mag, rel=1e-6), i


@pytest.mark.parametrize("name", NAMES)
def test_ledger_and_expected_macs_agree_with_cost(name):
    from pyengine.methods.hiap import hiap_gate_sets
    model = pyengine.gate(dense(name), method="hiap")
    a = adapter_for(model)
    g = pyengine.geometry(model)
    sets = hiap_gate_sets(model)
    for seed in range(3):
        s = random_spec(a, g, seed, name)
        led = SlotLedger(a, g, name)
        led.kept = [None if not b.keep else sorted({c // gb.group for c in b.kept(gb.slot)})
                    if gb.slot else [] for b, gb in zip(s.blocks, g.blocks)]
        macs = pyengine.cost(s).macs
        assert led.total() == macs and led.spec({}) == s
        # the expected MACs of 0/1 probabilities are the structure's MACs (expected_macs is
        # multilinear in every probability, so exact on the vertices means exact everywhere)
        pyengine.apply(model, s)
        hard = [{k: v.double() for k, v in gs.hard().items()} for gs in sets]
        assert a.expected_macs(model, hard).item() == macs
    for gs in sets:
        gs.release()
    with torch.no_grad():
        for gs in sets:
            for v in gs.logits.values():
                v.copy_(torch.randn_like(v))
    e = a.expected_macs(model, [gs.probs() for gs in sets], batch=2)
    e.backward()
    assert 0 < e.item() < 2 * pyengine.cost(a.full_spec(g, name)).macs
    assert all(v.grad is not None and (v.grad > 0).all() for gs in sets
               for v in gs.logits.values())


def _digits(n=32, batch=16):
    from pyengine.train.data import digits
    return DataLoader(Subset(digits("train", IMG), range(n)), batch_size=batch)


@pytest.mark.parametrize("name", NAMES)
def test_hiap_and_agf_reach_the_target(name):
    for method, kw in (("hiap", {"epochs": 1, "kd_alpha": 0.0}), ("agf", {"calib_batches": 2})):
        model = dense(name)
        d = pyengine.cost(model).macs
        gated = run_method(model, method, _digits(), _digits(16), target=0.5, progress=False,
                           log=lambda s: None, img_size=IMG, **kw).eval()
        compact = pyengine.compile(gated).eval()
        ratio = pyengine.cost(compact).macs / d
        assert abs(ratio - 0.5) <= 0.03 * 0.5, (method, ratio)
        if method == "agf":
            assert ratio <= 0.5
        x = torch.randn(2, 3, IMG, IMG)
        with torch.no_grad():
            assert _close(gated(x), compact(x)), method


def test_convnext_linear_mlp_and_removed_blocks():
    """ConvNeXt with Linear MLPs on NHWC (tiny and larger); RegNet's removed blocks keep the
    stage's downsample and are the identity elsewhere (ReLU inputs)."""
    from pyengine.models.cnn.family import RemovedBlock
    model = pyengine.gate(dense("convnext_atto", conv_mlp=False))
    a = adapter_for(model)
    g = pyengine.geometry(model)
    assert g.kwargs == {"conv_mlp": False}
    s = random_spec(a, g, 4, "convnext_atto")
    pyengine.apply(model, s)
    compact = pyengine.compile(model).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert _close(model(x), compact(x))
    assert pyengine.cost(compact, batch=2).flops == count_flops(compact, x)
    assert pyengine.cost(s, batch=2).macs == pyengine.cost(compact, batch=2).macs
    calib = calibrate(model, [(x, torch.tensor([1, 2]))], batches=1)
    assert all(torch.isfinite(v.channels["mlp"]).all() for v in score(model, "agf", calib))

    model = pyengine.gate(dense("regnety_002"))
    g = pyengine.geometry(model)
    s = a2 = adapter_for(model)
    s = a2.spec_type(tuple(tuple(make_conv_block(False) for _ in range(n)) for n in g.layers),
                     "regnety_002", dense=g)
    pyengine.apply(model, s)
    compact = pyengine.compile(model).eval()
    kinds = [type(m) for st in a2.family.stages(compact) for m in (r.get() for r in st)]
    assert kinds == [RemovedBlock if b == 0 else torch.nn.Identity
                     for n in g.layers for b in range(n)]
    with torch.no_grad():
        assert _close(model(x), compact(x))


def test_unsupported_blocks_are_named():
    with pytest.raises(UnsupportedModuleError, match=r"stages\[0\]\[0\].*GlobalResponseNorm"):
        pyengine.gate(timm.create_model("convnextv2_atto", num_classes=3))
    with pytest.raises(UnsupportedModuleError, match=r"UniversalInvertedResidual"):
        pyengine.gate(timm.create_model("mobilenetv4_conv_small", num_classes=3))


def test_bench_and_profile_take_cnn_families(tmp_path):
    """`pyengine bench` / `profile` on a CNN: dense, compact at the target and Torch-Pruning at
    the compact model's MACs; the padded-heads variant is skipped with its reason."""
    from pyengine.cli import main
    kw = ["--model", "mobilenetv3_small_100", "--model-kwargs",
          '{"img_size": 32, "num_classes": 10}', "--target", "0.5", "--device", "cpu",
          "--dtype", "fp32"]
    out = tmp_path / "bench.json"
    assert main(["bench", *kw, "--batch", "2", "--warmup", "0", "--repeats", "2",
                 "--rounds", "1", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    res = {r["variant"]: r for r in rep["results"]}
    assert list(res) == ["dense", "compact", "torch-pruning"]
    assert [s["variant"] for s in rep["skipped"]] == ["padded"]
    assert "ViT models only" in rep["skipped"][0]["reason"]
    assert 0.5 * 0.97 <= res["compact"]["macs_ratio"] <= 0.5
    assert abs(res["torch-pruning"]["macs"] / res["compact"]["macs"] - 1) < 0.02
    assert res["compact"]["input_shape"] == [2, 3, 32, 32]
    assert rep["config"]["torch_pruning"]["importance"] == "GroupMagnitudeImportance(p=2)"
    for b in rep["config"]["spec_shapes"]:
        assert b.get("mid", 8) % 8 == 0  # random channels in multiples of 8
    prof = tmp_path / "profile.json"
    assert main(["profile", *kw, "--batch", "2", "--repeats", "1", "--warmup", "0",
                 "--copy-mib", "1", "--gemm-n", "32", "--json", str(prof)]) == 0
    p = {r["variant"]: r for r in json.loads(prof.read_text())["profiles"]}
    # the same seed, the same structure: the profile costs what the bench timed
    assert p["compact"]["macs"] == res["compact"]["macs"] < p["dense"]["macs"] == \
        res["dense"]["macs"]


@pytest.mark.parametrize("name", ["resnet18", "resnet26"])
def test_resnet_expected_macs_and_projection(name):
    """The ResNet adapter's expected MACs (HiAP's budget term) on 0/1 probabilities are the
    cost model's MACs of that structure, removed blocks and emptied slots included; its
    projection reaches the target."""
    from pyengine.methods.hiap import hiap_gate_sets
    model = pyengine.gate(pyengine.create_model(name, num_classes=10, img_size=IMG),
                          method="hiap").eval()
    sets = hiap_gate_sets(model)
    a = adapter_for(model)
    for seed in range(3):
        torch.manual_seed(seed)
        with torch.no_grad():
            for gs in sets:
                for k, v in gs.logits.items():
                    v.copy_(torch.randn_like(v) * 2 + (seed - 1.0 if k == "block" else -1.0))
        hard = [{k: v.double() for k, v in gs.hard().items()} for gs in sets]
        assert a.expected_macs(model, hard).item() == pyengine.cost(pyengine.spec(model)).macs
    e = a.expected_macs(model, [gs.probs() for gs in sets])
    e.backward()
    assert all(v.grad is not None and (v.grad >= 0).all() for gs in sets
               for v in gs.logits.values())
    # HiAP's projection on a ResNet: the target within 3%, compile exact
    from pyengine.methods.hiap import finalize
    s = finalize(model, 0.5)
    dense = pyengine.cost(a.full_spec(pyengine.geometry(model), name)).macs
    assert abs(pyengine.cost(s).macs / dense - 0.5) <= 0.03 * 0.5
    assert pyengine.spec(model) == s
    compact = pyengine.compile(model).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert _close(model(x), compact(x))
