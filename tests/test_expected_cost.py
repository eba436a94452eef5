"""Expected MACs from gate probabilities against the exact cost model."""
import random

import pytest
import timm
import torch

import pyengine
from pyengine.models.vit.cost import total_macs
from pyengine.cost.expected import dense_macs, expected_macs, expected_total_macs
from pyengine.methods.hiap import hiap_gates

# (embed_dim, depth, heads, mlp_ratio): head dims 16, 7, 1 and 40
GEOMS = [(64, 3, 4, 2.0), (21, 2, 3, 3.0), (5, 2, 5, 1.6), (80, 1, 2, 0.5)]


def _vit(embed_dim, depth, heads, mlp_ratio, **kw):
    return pyengine.create_model("vit_tiny_patch16_224", img_size=24, patch_size=8,
                                 embed_dim=embed_dim, depth=depth, num_heads=heads,
                                 mlp_ratio=mlp_ratio, num_classes=7, **kw)


def _random_logits(model, rng: random.Random, p_off: float):
    """Logits of +-1 with P(off) = p_off per unit, per slot; sometimes whole slots off."""
    with torch.no_grad():
        for a, m in hiap_gates(model):
            for g in (a, m):
                for k, p in g.logits.items():
                    mode = rng.random()
                    if mode < 0.1:
                        p.fill_(-1.0)           # the whole slot off (block, all heads, ...)
                    else:
                        off = torch.rand(p.shape, generator=torch.Generator().manual_seed(
                            rng.randrange(1 << 30))) < p_off
                        p.copy_(torch.where(off, -1.0, 1.0))


def _hard_probs(model):
    return [({k: (v > 0).double() for k, v in a.logits.items()},
             {k: (v > 0).double() for k, v in m.logits.items()}) for a, m in hiap_gates(model)]


@pytest.mark.parametrize("geom", GEOMS)
def test_zero_one_probabilities_equal_the_cost_model_exactly(geom):
    rng = random.Random(sum(geom[:3]))
    model = pyengine.gate(_vit(*geom), method="hiap").eval()
    for trial in range(12):
        _random_logits(model, rng, p_off=rng.choice([0.0, 0.3, 0.7, 0.95]))
        s = pyengine.spec(model)
        e = expected_macs(model, probs=_hard_probs(model))
        assert e.dtype == torch.float64
        assert e.item() == total_macs(s)
        # the gates' own probabilities at +-inf logits give the same number
        with torch.no_grad():
            for a, m in hiap_gates(model):
                for g in (a, m):
                    for p in g.logits.values():
                        p.mul_(1e4)
        assert expected_macs(model).item() == total_macs(s)
        if trial % 4 == 0:
            assert e.item() == pyengine.cost(pyengine.compile(model)).macs


def test_dense_macs_and_distilled_heads():
    for name in ("deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"):
        m = timm.create_model(name)
        ref = pyengine.cost(m).macs
        assert dense_macs(m) == ref
        pyengine.gate(m, method="hiap", init=50.0)
        assert expected_macs(m).item() == ref
        assert expected_macs(m, batch=3).item() == 3 * ref


def test_expectation_matches_sampled_structures():
    """Monte Carlo over independent Bernoulli gates: the nonlinear terms (a head counts only
    if it keeps a v dim; scores only if it keeps a q/k dim) are real expectations."""
    torch.manual_seed(0)
    model = pyengine.gate(_vit(12, 2, 3, 1.0), method="hiap")
    g = pyengine.geometry(model)
    with torch.no_grad():
        for a, m in hiap_gates(model):
            for gs in (a, m):
                for p in gs.logits.values():
                    p.copy_(torch.randn(p.shape) * 1.5 - 0.5)
    exact = expected_macs(model).item()
    n, acc = 3000, 0.0
    probs = [(a.probs(), m.probs()) for a, m in hiap_gates(model)]
    for _ in range(n):
        sample = [({k: (torch.rand(v.shape) < v).double() for k, v in pa.items()},
                   {k: (torch.rand(v.shape) < v).double() for k, v in pm.items()})
                  for pa, pm in probs]
        acc += expected_total_macs(g, sample).item()
    assert abs(acc / n - exact) / exact < 0.01
    # and the sampled values are really the cost model of those hard structures
    with torch.no_grad():
        for (a, m), (sa, sm) in zip(hiap_gates(model), sample):
            for gs, smp in ((a, sa), (m, sm)):
                for k, p in gs.logits.items():
                    p.copy_(smp[k] * 2 - 1)
    assert expected_total_macs(g, sample).item() == total_macs(pyengine.spec(model.eval()))


def test_gradients_are_finite_and_positive():
    torch.manual_seed(1)
    model = pyengine.gate(_vit(21, 2, 3, 3.0), method="hiap")
    with torch.no_grad():
        for a, m in hiap_gates(model):
            for gs in (a, m):
                for p in gs.logits.values():
                    p.copy_(torch.randn(p.shape))
    e = expected_macs(model)
    e.backward()
    for a, m in hiap_gates(model):
        for gs in (a, m):
            for k, p in gs.logits.items():
                assert torch.isfinite(p.grad).all(), k
                # keeping more of anything never costs less
                assert (p.grad > 0).all(), (k, p.grad)
    # at probability 0 of a head, its dims cost nothing: zero gradient there
    model.zero_grad()
    with torch.no_grad():
        hiap_gates(model)[0][0].logits["head"][1] = -1e4
    expected_macs(model).backward()
    a = hiap_gates(model)[0][0]
    assert (a.logits["qk"].grad[1] == 0).all() and (a.logits["v"].grad[1] == 0).all()
    assert (a.logits["qk"].grad[0] > 0).all()


def test_wrong_number_of_blocks_is_an_error():
    model = pyengine.gate(_vit(21, 2, 3, 3.0), method="hiap")
    probs = [(a.probs(), m.probs()) for a, m in hiap_gates(model)]
    with pytest.raises(ValueError, match="expected 2 blocks"):
        expected_total_macs(pyengine.geometry(model), probs[:1])
