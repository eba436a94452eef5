"""The Torch-Pruning peer: same MACs as the target (within a few %), one head dim for every
head, the residual width untouched, and the cost model agreeing with torch's flop counter."""
import pytest
import torch

import pyengine
from pyengine.cost.flop_count import count_flops
from pyengine.measure.baselines import torch_pruning_model, uniform_spec, uniform_widths
from pyengine.models.vit.cost import total_macs
from pyengine.structure.spec import Spec
from pyengine.structure.synthetic import heterogeneous_spec

tp = pytest.importorskip("torch_pruning")

NAME = "vit_tiny_patch16_224"
KW = dict(depth=2, img_size=32, patch_size=8)


def _dense():
    return pyengine.create_model(NAME, **KW).eval()


@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_torch_pruning_model_matches_macs_with_uniform_heads(target):
    dense = _dense()
    g = pyengine.geometry(dense)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    model = torch_pruning_model(dense, target)
    # dense untouched
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    info = model.pyengine_baseline
    assert abs(info["macs_ratio"] - target) <= 0.03
    for blk in model.blocks:
        a = blk.attn
        assert a.num_heads == g.num_heads and a.head_dim == info["head_dim"]
        assert a.qkv.out_features == 3 * g.num_heads * info["head_dim"]
        assert a.proj.in_features == g.num_heads * info["head_dim"]
        assert a.proj.out_features == g.embed_dim == blk.mlp.fc2.out_features
        assert blk.mlp.fc1.out_features == info["mlp_hidden"]
        assert info["head_dim"] % 8 == 0 and info["mlp_hidden"] % 8 == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, g.num_classes) and torch.isfinite(y).all()
    # the MACs the bench reports for it are what torch counts when it runs
    c = pyengine.cost(model, batch=2)
    assert c.flops == count_flops(model, x)
    assert abs(c.macs / pyengine.cost(dense, batch=2).macs - target) <= 0.03


def test_torch_pruning_model_matches_a_heterogeneous_compact_model():
    dense = _dense()
    gated = pyengine.gate(_dense())
    s = heterogeneous_spec(pyengine.geometry(gated), 0.5, seed=3, model=NAME)
    pyengine.apply(gated, s)
    compact = pyengine.compile(gated)
    target = pyengine.cost(compact).macs / pyengine.cost(dense).macs
    peer = torch_pruning_model(dense, target)
    assert abs(pyengine.cost(peer).macs / pyengine.cost(compact).macs - 1) <= 0.05
    # uniform where ours is heterogeneous
    assert len({(len(h.qk), len(h.v)) for b in s.blocks for h in b.heads}) > 1
    assert len({(len(h.qk), len(h.v)) for b in peer.pyengine_spec.blocks for h in b.heads}) == 1


def test_uniform_widths_and_spec():
    g = pyengine.geometry(pyengine.create_model("deit_small_patch16_224"))
    full = total_macs(Spec.full(g))
    for target in (0.25, 0.5, 0.9):
        d, m = uniform_widths(g, target)
        assert d % 8 == 0 and m % 8 == 0
        assert abs(total_macs(uniform_spec(g, d, m)) / full - target) < 0.01
    assert uniform_widths(g, 1.0) == (g.head_dim, g.mlp_hidden)
    with pytest.raises(ValueError, match="target"):
        uniform_widths(g, 0.0)
    with pytest.raises(ValueError, match="head_dim"):
        uniform_spec(g, 0, 10)
    with pytest.raises(ValueError, match="mlp"):
        uniform_spec(g, 8, g.mlp_hidden + 1)


def test_uniform_attention_fallback_computes_timm_attention():
    # the path for an older timm whose Attention cannot run pruned head dims
    from pyengine.measure.baselines import _uniform_attention
    model = torch_pruning_model(_dense(), 0.5)
    a = model.blocks[0].attn
    x = torch.randn(2, 17, a.qkv.in_features)
    u = _uniform_attention(a)
    with torch.no_grad():
        assert torch.allclose(u(x), a(x), atol=1e-5, rtol=1e-5)
