"""HiAP gates, temperature schedule, loss, short training runs and the final projection."""
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import pyengine
from pyengine.models.vit.cost import total_macs
from pyengine.cost.expected import dense_macs, expected_macs
from pyengine.methods.hiap import (HiAPGates, HiAPLoss, TemperatureSchedule, finalize, gate_parameters,
                           hiap_gates, logistic_noise)
from pyengine.structure.solver import project
from pyengine.train.trainer import fit


def _vit(embed_dim=24, depth=2, heads=3, mlp_ratio=2.0, classes=4, **kw):
    return pyengine.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8,
                                 embed_dim=embed_dim, depth=depth, num_heads=heads,
                                 mlp_ratio=mlp_ratio, num_classes=classes, **kw)


def _set_logits(model, fn):
    with torch.no_grad():
        for a, m in hiap_gates(model):
            for g in (a, m):
                for k, p in g.logits.items():
                    p.copy_(fn(k, p))


def test_straight_through_values_and_gradient():
    """Forward: exactly the hard sample 1[z > 0.5]; backward: d z / d alpha, z the soft sample."""
    g = HiAPGates({"block": (), "neuron": (7,)}, init=0.0, tau=0.7).train()
    with torch.no_grad():
        g.logits["neuron"].copy_(torch.linspace(-2, 2, 7))
        g.logits["block"].fill_(5.0)
    w = torch.randn(7)
    torch.manual_seed(3)
    vals = g.values()
    (vals["neuron"] * w).sum().backward()
    torch.manual_seed(3)  # the same noise, drawn in slot order
    eps_block = logistic_noise(())
    eps = logistic_noise((7,))
    z = torch.sigmoid((g.logits["neuron"].detach() + eps) / 0.7)
    assert set(vals["neuron"].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(vals["neuron"].detach(), (z > 0.5).float())
    assert bool(vals["block"] == ((5.0 + eps_block) / 0.7 > 0))
    torch.testing.assert_close(g.logits["neuron"].grad, w * z * (1 - z) / 0.7)


def test_logistic_noise_gives_sigmoid_keep_probability():
    torch.manual_seed(0)
    alpha = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0])
    eps = logistic_noise((20000, 5))
    keep = ((alpha + eps) > 0).float().mean(0)
    torch.testing.assert_close(keep, torch.sigmoid(alpha), atol=0.012, rtol=0)


def test_gradients_reach_every_gate_of_a_gated_vit():
    torch.manual_seed(0)
    model = pyengine.gate(_vit(), method="hiap", init=1.0).train()
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,))
    # a sampled-off block passes no gradient to its heads (output * 0): accumulate a few samples
    for _ in range(4):
        F.cross_entropy(model(x), y).backward()
    for i, (a, m) in enumerate(hiap_gates(model)):
        va, vm = a.values(), m.values()
        for v in (*va.values(), *vm.values()):
            assert set(v.detach().unique().tolist()) <= {0.0, 1.0}
        for g in (a, m):
            for k, p in g.logits.items():
                assert p.grad is not None and torch.isfinite(p.grad).all(), (i, k)
                assert (p.grad != 0).any(), (i, k)
    # weights get gradients too (the gated modules keep the timm parameters)
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_temperature_schedule_is_exponential():
    sched = TemperatureSchedule(None, 2.0, 0.5)
    total = 101
    assert sched.value(0, total) == pytest.approx(2.0)
    assert sched.value(total - 1, total) == pytest.approx(0.5)
    assert sched.value(50, total) == pytest.approx(1.0)  # geometric mean at the midpoint
    assert sched.value(25, total) == pytest.approx(2.0 * 0.25 ** 0.25)
    vals = [sched.value(s, total) for s in range(total)]
    ratios = [b / a for a, b in zip(vals, vals[1:])]
    assert max(ratios) == pytest.approx(min(ratios))  # constant factor per step
    assert sched.value(10 * total, total) == pytest.approx(0.5)  # clamped
    model = pyengine.gate(_vit(), method="hiap")
    s = TemperatureSchedule(model, 2.0, 0.5)
    assert s(50, total) == pytest.approx(1.0)
    assert all(a.tau == m.tau == pytest.approx(1.0) for a, m in hiap_gates(model))
    with pytest.raises(ValueError, match="temperatures"):
        TemperatureSchedule(None, 0.0, 0.5)


def test_eval_gates_are_deterministic_and_match_spec_and_compile():
    torch.manual_seed(1)
    model = pyengine.gate(_vit(embed_dim=28, heads=4), method="hiap")
    _set_logits(model, lambda k, p: torch.randn(p.shape) * 2 + 0.5)
    x = torch.randn(5, 3, 16, 16)
    model.train()
    outs = [model(x) for _ in range(3)]
    assert not torch.allclose(outs[0], outs[1])  # training samples
    model.eval()
    with torch.no_grad():
        y1, y2 = model(x), model(x)
    assert torch.equal(y1, y2)
    for a, m in hiap_gates(model):
        for g in (a, m):
            det = {k: (p > 0).float() for k, p in g.logits.items()}
            hard = g.hard()
            vals = g.values()
            for k in det:
                assert torch.equal(vals[k] != 0, hard[k])
            # consistency: a head with no v dim is off; a block with no unit is off
            if "head" in hard:
                assert torch.equal(hard["head"], (det["head"] * det["block"]).bool()
                                   & (det["v"] != 0).any(-1) | (hard["head"] & ~hard["block"]))
    s = pyengine.spec(model)
    compact = pyengine.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), y1, atol=1e-5, rtol=1e-5)
    assert pyengine.cost(compact).macs == total_macs(s)


def test_frozen_structure_survives_state_dict_and_release():
    torch.manual_seed(2)
    model = pyengine.gate(_vit(), method="hiap")
    g = pyengine.geometry(model)
    s = pyengine.Spec.from_dict({"blocks": [
        {"heads": [{"index": 1, "qk": [0, 3], "v": [2]}], "mlp": [0, 5, 7]},
        {"heads": [], "mlp": [1]}]}).with_dense(g, pyengine.spec(model).model)
    pyengine.apply(model, s)
    model.train()  # frozen masks win over sampling, also in training
    assert pyengine.spec(model).blocks == s.blocks
    vals = hiap_gates(model)[1][0].values()
    assert float(vals["block"]) == 0.0 and vals["head"].sum() == 0
    other = pyengine.gate(_vit(), method="hiap")
    other.load_state_dict(model.state_dict())
    assert pyengine.spec(other).blocks == s.blocks
    for a, m in hiap_gates(model):
        a.release()
        m.release()
    assert pyengine.spec(model.eval()) == pyengine.Spec.full(g, model=s.model)  # init 3 > 0


def test_loss_terms():
    model = pyengine.gate(_vit(), method="hiap", init=3.0)
    loss = HiAPLoss(target=0.5, budget_weight=1.0)
    val, stats = loss(model)
    ratio = expected_macs(model).item() / dense_macs(model)
    assert stats["emacs"] == pytest.approx(ratio)
    assert val.item() == pytest.approx((ratio - 0.5) ** 2, rel=1e-5)
    val.backward()
    for p in gate_parameters(model):  # over budget: descent lowers every logit
        assert (p.grad > 0).all()
    # macro gradients scaled 2x relative to an unscaled loss, micro 1x
    model.zero_grad()
    HiAPLoss(target=0.5, budget_weight=1.0, macro_weight=1.0)(model)[0].backward()
    g1 = {k: p.grad.clone() for k, p in hiap_gates(model)[0][0].logits.items()}
    model.zero_grad()
    val.detach()
    HiAPLoss(target=0.5, budget_weight=1.0)(model)[0].backward()
    a = hiap_gates(model)[0][0]
    torch.testing.assert_close(a.logits["head"].grad, 2 * g1["head"])
    torch.testing.assert_close(a.logits["qk"].grad, g1["qk"])
    # feasibility: zero when satisfied, positive and pushing up when violated
    assert HiAPLoss(0.5, min_heads=1, min_head_dims=0.5, min_ffn=0.5).feasibility(model) == 0
    _set_logits(model, lambda k, p: torch.full(p.shape, -4.0))
    model.zero_grad()
    f = HiAPLoss(0.5, min_heads=2, min_head_dims=0.5, min_ffn=0.5).feasibility(model)
    assert f > 0
    f.backward()
    a, m = hiap_gates(model)[0]
    assert (a.logits["head"].grad < 0).all() and (m.logits["neuron"].grad < 0).all()
    assert (a.logits["v"].grad < 0).all()
    with pytest.raises(ValueError, match="target"):
        HiAPLoss(target=1.5)
    with pytest.raises(ValueError, match="min_ffn"):
        HiAPLoss(target=0.5, min_ffn=2.0)


def _random_scores(model, rng):
    out = []
    for a, m in hiap_gates(model):
        mk = lambda g: {k: torch.randn(p.shape, generator=torch.Generator().manual_seed(  # noqa
            rng.randrange(1 << 30))) * 2 + rng.uniform(-1, 2) for k, p in g.logits.items()}
        out.append((mk(a), mk(m)))
    return out


@pytest.mark.parametrize("round_to", [None, 8, 3])
def test_projection_hits_target_within_tolerance_and_respects_constraints(round_to):
    rng = random.Random(round_to or 0)
    model = pyengine.gate(_vit(embed_dim=40, depth=3, heads=5, mlp_ratio=3.2), method="hiap")
    g = pyengine.geometry(model)  # head dim 8, FFN 128
    dense = total_macs(pyengine.Spec.full(g))
    x = torch.randn(3, 3, 16, 16)
    for target in (0.3, 0.5, 0.75):
        for min_heads, min_dims, min_ffn in ((1, 0.0, 0.0), (2, 0.25, 0.1), (0, 0.0, 0.0)):
            scores = _random_scores(model, rng)
            kw = dict(min_heads=min_heads, min_head_dims=min_dims, min_ffn=min_ffn,
                      round_to=round_to)
            floor = total_macs(project(model, scores, 0.01, **kw))  # the smallest feasible
            s = project(model, scores, target, tolerance=0.03, **kw)
            if floor <= target * 0.97 * dense:
                assert abs(total_macs(s) / dense - target) <= 0.03 * target
            else:  # the constraints do not allow the target: the closest feasible
                assert total_macs(s) == floor
            assert pyengine.spec(model).blocks == s.blocks  # applied
            for b in s.blocks:
                assert len(b.heads) >= min_heads
                for h in b.heads:
                    for dims in (h.qk, h.v):
                        assert len(dims) >= math.ceil(min_dims * g.head_dim) or (
                            dims is h.qk and min_dims == 0)
                        if round_to:
                            assert len(dims) % round_to == 0 or len(dims) == g.head_dim
                assert len(b.mlp) >= math.ceil(min_ffn * g.mlp_hidden)
                if round_to:
                    assert len(b.mlp) % round_to == 0 or len(b.mlp) == g.mlp_hidden
    model.eval()
    compact = pyengine.compile(model)
    assert pyengine.cost(compact).macs == total_macs(pyengine.spec(model))
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), atol=1e-5, rtol=1e-5)


def test_projection_removes_whole_blocks_only_when_allowed():
    model = pyengine.gate(_vit(embed_dim=24, depth=3, heads=3), method="hiap")
    scores = [({k: torch.full(p.shape, 2.0) for k, p in a.logits.items()},
               {k: torch.full(p.shape, 2.0) for k, p in m.logits.items()})
              for a, m in hiap_gates(model)]
    for k in scores[1][0]:
        scores[1][0][k] = torch.full_like(scores[1][0][k], -3.0)  # block 1 attention: unwanted
    for k in scores[2][1]:
        scores[2][1][k] = torch.full_like(scores[2][1][k], -3.0)  # block 2 FFN: unwanted
    s = project(model, scores, 0.6, min_heads=0, min_ffn=0.0)
    assert not s.blocks[1].has_attn and not s.blocks[2].has_mlp
    s = project(model, scores, 0.6, min_heads=1, min_ffn=0.25)
    assert all(len(b.heads) >= 1 and len(b.mlp) >= 0.25 * 48 for b in s.blocks)


def test_projection_errors():
    model = pyengine.gate(_vit(), method="hiap")
    scores = [(dict(a.logits), dict(m.logits)) for a, m in hiap_gates(model)]
    with pytest.raises(ValueError, match="min_heads"):
        project(model, scores, 0.5, min_heads=9)
    with pytest.raises(ValueError, match="target"):
        project(model, scores, 0.0)
    with pytest.raises(ValueError, match="blocks"):
        project(model, scores[:1], 0.5)


def _synthetic_loaders(n=96, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = (x[:, 0, :8].mean((1, 2)) > 0).long() + 2 * (x[:, 1, 8:].mean((1, 2)) > 0).long()
    ds = TensorDataset(x, y % classes)
    return (DataLoader(ds, batch_size=16, shuffle=True, generator=g, drop_last=True),
            DataLoader(ds, batch_size=32))


def test_budget_reached_in_a_short_run_and_compile_is_exact():
    torch.manual_seed(0)
    model = _vit(embed_dim=32, depth=2, heads=4, mlp_ratio=2.0)
    teacher = _vit(embed_dim=32, depth=2, heads=4, mlp_ratio=2.0).eval()
    pyengine.gate(model, method="hiap", init=2.0)
    train, val = _synthetic_loaders()
    loss = HiAPLoss(target=0.5, budget_weight=20.0)
    gates = gate_parameters(model)
    ids = {id(p) for p in gates}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids]},
              {"params": gates, "lr": 0.1, "weight_decay": 0.0}]
    hist = fit(model, train, None, epochs=15, lr=1e-3, param_groups=groups, teacher=teacher,
               extra_loss=loss, on_step=TemperatureSchedule(model), progress=False)
    ratio = expected_macs(model).item() / dense_macs(model)
    assert abs(ratio - 0.5) < 0.05, hist[-1]
    assert hist[-1]["emacs"] < hist[0]["emacs"]
    model.eval()
    s = finalize(model, 0.5, tolerance=0.03, round_to=4)
    assert abs(total_macs(s) / dense_macs(model) - 0.5) <= 0.015
    compact = pyengine.compile(model)
    assert pyengine.cost(compact).macs == total_macs(s)
    x = torch.randn(7, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), atol=1e-5, rtol=1e-5)
