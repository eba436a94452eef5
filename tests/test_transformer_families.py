"""EVA/EVA02, BEiT and Swin: gate -> random spec -> compile equals the hard-gated model,
cost == FlopCounterMode (count_flops), exact parameter counts, specs as JSON with their
family rules, save/load, SSS factors, HiAP and the one-shot criteria at a MAC target."""
import json
import random

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pyengine
from pyengine.cost.flop_count import count_flops
from pyengine.models import UnsupportedModuleError, adapter_for
from pyengine.structure.spec import Spec, SpecError, make_block

IMG = 32
# tiny configs of the three test models, plus the variants each family's code branches on:
# head dims 20/8/10 (odd), rotary interleaved and half, q/k norm, separate q/k/v projections,
# register tokens, Mlp / GluMlp / SwiGLU FFNs, per-block and shared relative-position tables,
# layer scale, padded Swin windows with a shift.
CONFIGS = {
    "eva": ("eva02_tiny_patch14_224",
            dict(img_size=IMG, patch_size=8, depth=3, embed_dim=40, num_heads=2)),
    "eva_qknorm_half": ("eva02_tiny_patch14_224",
                        dict(img_size=IMG, patch_size=8, depth=2, embed_dim=40, num_heads=2,
                             qk_norm=True, rope_rotate_half=True, qkv_fused=False,
                             init_values=0.1, num_reg_tokens=2)),
    "eva_mlp_norope": ("eva02_tiny_patch14_224",
                       dict(img_size=IMG, patch_size=8, depth=2, embed_dim=36, num_heads=3,
                            use_rot_pos_emb=False, swiglu_mlp=False, mlp_ratio=2.0)),
    "eva_swiglu": ("eva02_tiny_patch14_224",
                   dict(img_size=IMG, patch_size=8, depth=2, embed_dim=40, num_heads=2,
                        swiglu_align_to=8)),
    "beit": ("beit_base_patch16_224",
             dict(img_size=IMG, patch_size=8, depth=3, embed_dim=40, num_heads=5)),
    "beit_shared": ("beit_base_patch16_224",
                    dict(img_size=IMG, patch_size=8, depth=2, embed_dim=40, num_heads=4,
                         use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                         use_abs_pos_emb=True, swiglu_mlp=True, qkv_bias=False,
                         init_values=None)),
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=IMG, window_size=4, depths=(2, 2, 1), embed_dim=16,
                  num_heads=(2, 3, 4))),
    "swin_padded": ("swin_tiny_patch4_window7_224",
                    dict(img_size=IMG, depths=(2, 1), embed_dim=16, num_heads=(2, 3))),
}


def _model(key, seed=0):
    name, kw = CONFIGS[key]
    torch.manual_seed(seed)
    m = pyengine.create_model(name, num_classes=7, **kw).eval()
    with torch.no_grad():  # non-trivial biases, tables, layer scales and norms
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return name, m


def random_spec(a, g, seed, name):
    """Random heads (odd dim counts, q/k-less heads, whole rotary pairs), FFN widths of 1, 7,
    a third or all, and removed attention / FFN branches."""
    rng = random.Random(seed)
    blocks = []
    for sh in g.shapes():
        heads = []
        if rng.random() > 0.2:
            for h in range(sh.heads):
                if rng.random() < 0.7:
                    U = sh.head_dim // sh.qk_unit
                    nu = U if sh.qk_fixed else rng.choice((0, 1, U, max(1, U // 3)))
                    qk = sh.dims_of_units(rng.sample(range(U), nu))
                    nv = rng.choice((1, min(7, sh.head_dim), sh.head_dim))
                    heads.append((h, qk, rng.sample(range(sh.head_dim), nv)))
        mlp = [] if rng.random() < 0.2 else rng.sample(
            range(sh.hidden), rng.choice((1, 7, sh.hidden // 3, sh.hidden)))
        blocks.append(make_block(heads, mlp))
    return a.spec_type(tuple(blocks), model=name, dense=g)


def _features(model, x):
    return model.forward_features(x)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_compile_equals_hard_gated_and_cost_is_counted(key):
    name, model = _model(key)
    x = torch.randn(2, 3, IMG, IMG)
    dense_cost = pyengine.cost(model, batch=2)
    assert dense_cost.flops == count_flops(model, x)
    assert dense_cost.params == sum(p.numel() for p in model.parameters())
    gated = pyengine.gate(model, method="mask")
    a = adapter_for(gated)
    g = a.geometry(gated)
    for seed in range(3):
        s = random_spec(a, g, seed, name)
        pyengine.apply(gated, s)
        assert pyengine.spec(gated) == s
        compact = pyengine.compile(gated).eval()
        assert pyengine.spec(compact) == s
        with torch.no_grad():
            for f in (lambda m: m(x), lambda m: _features(m, x)):
                want, got = f(gated), f(compact)
                assert torch.isfinite(got).all()
                assert (want - got).abs().max().item() <= 1e-4, (key, seed)
        c = pyengine.cost(compact, batch=2)
        assert c.flops == count_flops(compact, x), (key, seed)
        assert c.params == sum(p.numel() for p in compact.parameters()), (key, seed)
        assert pyengine.cost(s, batch=2).macs == c.macs
        assert c.macs < dense_cost.macs


@pytest.mark.parametrize("key", ["eva", "eva_qknorm_half", "beit", "swin"])
def test_save_load_round_trip_is_exact(key, tmp_path):
    name, model = _model(key)
    gated = pyengine.gate(model)
    a = adapter_for(gated)
    s = random_spec(a, a.geometry(gated), 5, name)
    pyengine.apply(gated, s)
    compact = pyengine.compile(gated).eval()
    pyengine.save(compact, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "spec.json").read_text())
    assert saved["family"] == a.name
    loaded = pyengine.load(tmp_path / "m")
    assert pyengine.spec(loaded) == s
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(loaded(x), compact(x))
    assert pyengine.cost(loaded).macs == pyengine.cost(compact).macs


def test_specs_are_json_with_their_family_rules():
    for key in ("eva", "eva_qknorm_half", "beit_shared", "swin"):
        name, model = _model(key)
        a = adapter_for(model)
        s = random_spec(a, a.geometry(model), 1, name)
        back = Spec.from_json(s.to_json())  # dispatches on "family"
        assert type(back) is a.spec_type and back == s and back.dense == s.dense
    # rotary pairs are one unit
    name, model = _model("eva")
    g = adapter_for(model).geometry(model)
    d = json.loads(adapter_for(model).spec_type.full(g, name).to_json())
    d["blocks"][0]["heads"][0]["qk"] = [0, 1, 2]
    with pytest.raises(SpecError, match=r"blocks\[0\].heads\[0\].qk: rotary pairs .* dim 2"):
        Spec.from_dict(d)
    # with rotate_half the pair of dim 0 is dim Dh/2
    name, model = _model("eva_qknorm_half")
    g = adapter_for(model).geometry(model)
    assert g.shapes()[0].unit_dims(0) == (0, g.head_dim // 2)
    d = json.loads(adapter_for(model).spec_type.full(g, name).to_json())
    d["blocks"][1]["heads"][1]["qk"] = d["blocks"][1]["heads"][1]["qk"][:-2]
    with pytest.raises(SpecError, match=r"blocks\[1\].heads\[1\].qk: .*qk_norm.*keeps all"):
        Spec.from_dict(d)
    # ranges against each block's own shape (Swin: stage 1 has 3 heads of 10 dims)
    name, model = _model("swin")
    g = adapter_for(model).geometry(model)
    d = json.loads(adapter_for(model).spec_type.full(g, name).to_json())
    d["blocks"][2]["heads"][0]["v"] = [10]
    with pytest.raises(SpecError, match=r"blocks\[2\].heads\[0\].v: index 10 out of range"):
        Spec.from_dict(d)
    d = json.loads(adapter_for(model).spec_type.full(g, name).to_json())
    d["family"] = "tulip"
    with pytest.raises(SpecError, match="unknown spec family 'tulip'"):
        Spec.from_dict(d)
    # a spec of another family does not fit
    eva_spec = adapter_for(_model("eva")[1]).full_spec(
        adapter_for(_model("eva")[1]).geometry(_model("eva")[1]), "eva02_tiny_patch14_224")
    gated = pyengine.gate(model)
    with pytest.raises(SpecError, match="EVA spec .* does not fit a swin model"):
        pyengine.apply(gated, eva_spec)


@pytest.mark.parametrize("key", ["eva", "beit", "swin"])
def test_sss_factors_fold_into_the_compact_model(key):
    name, model = _model(key)
    dense = pyengine.cost(model).macs
    gated = pyengine.gate(model, method="sss", dims=True)
    torch.manual_seed(3)
    with torch.no_grad():
        for gs in pyengine.api.gate_sets(gated):
            for k in gs.learned:
                t = getattr(gs, k)
                t.copy_(torch.rand_like(t) * 1.5 * (torch.rand_like(t) > 0.3))
    x = torch.randn(2, 3, IMG, IMG)
    compact = pyengine.compile(gated).eval()
    with torch.no_grad():
        assert (gated(x) - compact(x)).abs().max().item() <= 1e-4
    assert pyengine.cost(compact).macs < dense


@pytest.mark.parametrize("key", ["eva_qknorm_half", "beit", "swin"])
def test_expected_macs_equal_the_cost_of_hard_gates(key):
    name, model = _model(key)
    pyengine.gate(model, method="hiap")
    a = adapter_for(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for gs in a.gate_sets(model):
            for t in gs.logits.values():
                t.copy_(torch.randn_like(t) * 2)
    model.eval()
    hard = [{k: v.double() for k, v in gs.hard().items()} for gs in a.gate_sets(model)]
    assert a.expected_macs(model, hard).item() == pyengine.cost(pyengine.spec(model)).macs
    # the expectation of sampled structures (independent Bernoulli gates)
    probs = [gs.probs() for gs in a.gate_sets(model)]
    exact = a.expected_macs(model, probs).item()
    gen = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(300):
        sample = [{k: (torch.rand(p.shape, generator=gen) < p).double() for k, p in d.items()}
                  for d in probs]
        from pyengine.structure.gates import _consistent
        draws.append(a.expected_macs(model, [_consistent(d) for d in sample]).item())
    assert abs(sum(draws) / len(draws) - exact) / exact < 0.03


def _loaders(n=64, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, IMG, IMG, generator=g)
    y = (x[:, 0].mean((1, 2)) * 40).long().clamp(-3, 3) + 3
    ds = TensorDataset(x, y % classes)
    return DataLoader(ds, batch_size=16, shuffle=True, generator=g), DataLoader(ds, batch_size=32)


@pytest.mark.parametrize("key", ["eva", "beit", "swin"])
@pytest.mark.parametrize("method", ["hiap", "agf"])
def test_hiap_and_agf_reach_the_mac_target(key, method):
    from pyengine.methods.base import run_method
    name, model = _model(key)
    dense = pyengine.cost(model).macs
    train, val = _loaders(n=32)
    opts = {"calib_batches": 2} if method == "agf" else {"epochs": 1, "lr": 1e-3}
    gated = run_method(model, method, train, val, target=0.5, progress=False,
                       log=lambda *a: None, **opts)
    gated.eval()
    compact = pyengine.compile(gated).eval()
    ratio = pyengine.cost(compact).macs / dense
    assert abs(ratio - 0.5) <= 0.03 * 0.5, ratio
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        assert (gated(x) - compact(x)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("key", ["eva_qknorm_half", "beit_shared", "swin"])
def test_every_criterion_scores_every_unit(key):
    from pyengine.methods.criteria import CRITERIA, calibrate, score
    from pyengine.structure.solver import allocate
    name, model = _model(key)
    gated = pyengine.gate(model)
    a = adapter_for(gated)
    g = a.geometry(gated)
    calib = calibrate(gated, _loaders(n=16)[0], batches=1)
    for crit in CRITERIA:
        scores = score(gated, crit, calib)
        for s, sh in zip(scores, g.shapes()):
            assert s.head.shape == (sh.heads,) and s.v.shape == (sh.heads, sh.head_dim)
            assert s.neuron.shape == (sh.hidden,)
            assert (s.qk is None) == sh.qk_fixed
            if s.qk is not None:
                assert s.qk.shape == (sh.heads, sh.head_dim // sh.qk_unit)
            for t in (s.head, s.v, s.neuron):
                assert torch.isfinite(t).all()
        for mode, gran in (("global", "dim"), ("uniform", "head"), ("global", "block")):
            if mode == "global" and gran == "block" and crit != "random":
                continue
            spec = allocate(scores, g, 0.6, mode=mode, granularity=gran, model=name,
                            min_heads=0 if gran == "block" else 1)
            assert spec.meta["kept_macs"] <= 0.6
            pyengine.apply(gated, spec)
    assert sum(1 for crit in CRITERIA) == 6


def test_unsupported_configs_raise_clear_errors():
    m = pyengine.create_model("eva02_tiny_patch14_224", img_size=IMG, patch_size=8, depth=1,
                              embed_dim=32, num_heads=2, scale_mlp=True)
    with pytest.raises(UnsupportedModuleError, match=r"blocks.0.mlp: .*scale_mlp"):
        pyengine.gate(m)
    m = pyengine.create_model("eva02_tiny_patch14_224", img_size=IMG, patch_size=8, depth=1,
                              embed_dim=32, num_heads=2, scale_attn_inner=True)
    with pytest.raises(UnsupportedModuleError, match="scale_attn_inner"):
        pyengine.gate(m)
    m = pyengine.create_model("swin_tiny_patch4_window7_224", img_size=IMG, depths=(1,),
                              embed_dim=16, num_heads=(2,), dynamic_img_size=True)
    with pytest.raises(UnsupportedModuleError, match="dynamic_img_size"):
        pyengine.gate(m)


def test_bench_builds_compact_variants_for_the_families():
    from pyengine.measure.bench import bench, build_variants
    name, kw = CONFIGS["swin"]
    v = build_variants(name, ["dense", "padded"], target=0.5, model_kwargs=kw)
    assert set(v.models) == {"dense", "compact"} and "padded" in v.skipped
    assert v.info["compact_macs_ratio"] <= 0.5
    rep = bench(v, batches=[1], dtype="fp32", device="cpu", warmup=1, repeats=2, rounds=1,
                show=lambda s: None)
    assert {r["variant"] for r in rep["results"]} == {"dense", "compact"}
    assert all(r["median_ms"] > 0 for r in rep["results"])


def test_prune_cli_runs_hiap_on_a_swin(tmp_path):
    from pyengine.cli import main
    out = tmp_path / "swin"
    kw = {"window_size": 2, "depths": [1, 1], "embed_dim": 16, "num_heads": [2, 4]}
    rc = main(["prune", "--model", "swin_tiny_patch4_window7_224", "--model-kwargs",
               json.dumps(kw), "--data", "digits", "--img-size", "8", "--batch-size", "128",
               "--no-progress", "--no-augment", "--dense-epochs", "1", "--epochs", "1", "--method", "hiap",
               "--target", "0.5", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert abs(m["macs_ratio"] - 0.5) <= 0.015 and m["max_abs_diff"] <= 1e-4
    compact = pyengine.load(out)
    assert pyengine.cost(compact).macs == m["pruned_macs"]
