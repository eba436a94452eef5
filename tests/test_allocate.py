"""Allocation of scores to a MAC target: budget met tightly, feasibility, rounding, ranking."""
import pytest
import torch

import pyengine
from pyengine.models.vit import cost as cost_model
from pyengine.structure.solver import allocate
from pyengine.methods.criteria import BlockScores
from pyengine.structure.spec import Geometry, Spec

G = Geometry(depth=3, embed_dim=24, num_heads=3, head_dim=8, mlp_hidden=40, num_tokens=17,
             num_patches=16, in_chans=3, patch_size=(4, 4), num_classes=5)


def rand_scores(g=G, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return [BlockScores(r(g.num_heads), r(g.num_heads, g.head_dim), r(g.num_heads, g.head_dim),
                        r(g.mlp_hidden), float(r(1)), float(r(1))) for _ in range(g.depth)]


def kept_fraction(s: Spec) -> float:
    return cost_model.total_macs(s) / cost_model.total_macs(Spec.full(G))


@pytest.mark.parametrize("mode", ["global", "uniform"])
@pytest.mark.parametrize("granularity", ["dim", "head"])
@pytest.mark.parametrize("target", [0.9, 0.5, 0.3])
def test_budget_met_and_tight(mode, granularity, target):
    s = allocate(rand_scores(), G, target, mode=mode, granularity=granularity, min_heads=1)
    f = kept_fraction(s)
    assert f <= target + 1e-12
    # dims/neurons are fine-grained: within a few % of the target; heads are coarser
    slack = 0.03 if granularity == "dim" else 0.12
    assert f >= target - slack, (f, target)
    assert s.meta["kept_macs"] == pytest.approx(f)
    assert all(len(b.heads) >= 1 for b in s.blocks)


def test_global_dim_keeps_the_top_scored_within_each_group():
    sc = rand_scores(seed=1)
    s = allocate(sc, G, 0.5, mode="global", granularity="dim")
    for b, blk in enumerate(s.blocks):
        kept = set(blk.mlp)
        dropped = set(range(G.mlp_hidden)) - kept
        if kept and dropped:
            assert min(sc[b].neuron[list(kept)]) > max(sc[b].neuron[list(dropped)])
        for h in blk.heads:
            for name in ("qk", "v"):
                k = set(getattr(h, name))
                d = set(range(G.head_dim)) - k
                t = getattr(sc[b], name)[h.index]
                if k and d:
                    assert min(t[list(k)]) > max(t[list(d)])


def test_global_ranks_across_layers():
    # layer 0's neurons all score below layer 2's: global removes them first; uniform does not
    sc = rand_scores(seed=2)
    sc[0].neuron *= 0.01
    sc[2].neuron += 10
    s = allocate(sc, G, 0.7, mode="global", granularity="dim")
    assert len(s.blocks[0].mlp) < len(s.blocks[2].mlp) == G.mlp_hidden
    u = allocate(sc, G, 0.7, mode="uniform", granularity="dim")
    assert len(u.blocks[0].mlp) == len(u.blocks[2].mlp)


def test_uniform_keeps_the_same_counts_in_every_layer():
    s = allocate(rand_scores(), G, 0.4, mode="uniform", granularity="dim")
    counts = {(tuple(b.qk_dims), tuple(b.v_dims), len(b.mlp)) for b in s.blocks}
    assert len(counts) == 1


@pytest.mark.parametrize("mode", ["global", "uniform"])
def test_round_to_multiples(mode):
    s = allocate(rand_scores(), G, 0.45, mode=mode, granularity="dim", round_to=4)
    for b in s.blocks:
        assert len(b.mlp) % 4 == 0
        for h in b.heads:
            assert len(h.qk) % 4 == 0 and len(h.v) % 4 == 0 and len(h.qk) >= 4
    assert kept_fraction(s) <= 0.45


@pytest.mark.parametrize("granularity", ["dim", "head"])
def test_min_heads(granularity):
    sc = rand_scores()
    b = sc[0]  # layer 0's attention scores tiny next to the other layers': its heads go first
    b.qk *= 1e-3
    b.v *= 1e-3
    b.head *= 1e-3
    s = allocate(sc, G, 0.5, granularity=granularity, min_heads=2)
    assert all(len(b.heads) >= 2 for b in s.blocks)
    s0 = allocate(sc, G, 0.5, granularity=granularity, min_heads=0)
    assert not s0.blocks[0].has_attn  # the whole attention branch removed
    assert kept_fraction(s0) <= 0.5


def test_block_granularity_removes_branches():
    sc = rand_scores()
    s = allocate(sc, G, 0.6, granularity="block", min_heads=0)
    assert kept_fraction(s) <= 0.6
    for b in s.blocks:  # a branch is all or nothing
        assert len(b.mlp) in (0, G.mlp_hidden)
        assert len(b.heads) in (0, G.num_heads)


def test_full_target_keeps_everything():
    s = allocate(rand_scores(), G, 1.0)
    assert s.blocks == Spec.full(G).blocks


def test_spec_applies_to_a_gated_model_and_compiles():
    model = pyengine.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4,
                                  embed_dim=24, depth=3, num_heads=3, mlp_ratio=40 / 24,
                                  num_classes=5)
    g = pyengine.geometry(model)
    assert g.head_dim == 8 and g.mlp_hidden == 40
    pyengine.gate(model)
    s = allocate(rand_scores(g), g, 0.5, model="vit_tiny_patch16_224")
    pyengine.apply(model, s)
    assert pyengine.spec(model).blocks == s.blocks
    compact = pyengine.compile(model.eval())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(compact(x), model(x), rtol=1e-4, atol=1e-5)
    assert pyengine.cost(compact).macs == cost_model.total_macs(s)


def test_errors():
    sc = rand_scores()
    with pytest.raises(ValueError, match="target must be"):
        allocate(sc, G, 1.5)
    with pytest.raises(ValueError, match="unknown allocation mode 'best'"):
        allocate(sc, G, 0.5, mode="best")
    with pytest.raises(ValueError, match="unknown granularity"):
        allocate(sc, G, 0.5, granularity="neuron")
    with pytest.raises(ValueError, match="cannot reach the MAC target"):
        allocate(sc, G, 0.05, granularity="head", min_heads=3)
    with pytest.raises(ValueError, match="use granularity"):
        allocate(sc, G, 0.5, mode="uniform", granularity="block")
    with pytest.raises(ValueError, match="block scores for a model of depth"):
        allocate(sc[:2], G, 0.5)
    with pytest.raises(ValueError, match="min_heads"):
        allocate(sc, G, 0.5, min_heads=4)


@pytest.mark.parametrize("mode", ["global", "uniform"])
def test_min_dims_and_min_neurons(mode):
    s = allocate(rand_scores(), G, 0.4, mode=mode, min_dims=3, min_neurons=5, min_heads=1)
    assert kept_fraction(s) <= 0.4
    for b in s.blocks:
        assert len(b.mlp) >= 5
        for h in b.heads:
            assert len(h.qk) >= 3 and len(h.v) >= 3
    with pytest.raises(ValueError, match="min_neurons must be"):
        allocate(rand_scores(), G, 0.3, min_neurons=41)


def test_a_model_with_a_class_token_keeps_one_attention_branch():
    """min_heads=0 lets layers lose their attention, but not all of them while there is a
    class token (it would never see the image: a constant model)."""
    import dataclasses
    # whole branches ranked: the FFNs' branch scores all above the attention ones'
    scores = [dataclasses.replace(s, attn=0.1 + 0.01 * i, mlp=10.0 + i)
              for i, s in enumerate(rand_scores())]
    for g, kept in ((G, 1), (dataclasses.replace(G, num_tokens=16), 0)):
        s = allocate(scores, g, 0.3, mode="global", granularity="block", min_heads=0,
                     min_neurons=0)
        assert sum(len(b.heads) > 0 for b in s.blocks) == kept, [len(b.heads) for b in s.blocks]
    # the ledger's rule: the last head of the model goes only without prefix tokens
    from pyengine.models.vit.ledger import ViTLedger
    for g, last in ((G, None), (dataclasses.replace(G, num_tokens=16), 2)):
        led = ViTLedger(g, None, min_heads=0)
        got = [led.remove(("head", l, h, None)) for l in range(3) for h in range(3)]
        assert got == [0, 0, 0, 1, 1, 1, 2, 2, last], got
        led = ViTLedger(g, None, min_heads=0)
        got = [led.remove(("attn", l, None, None)) for l in range(3)]
        assert got == [0, 1, last], got
