"""The padded-heads baseline computes exactly what the compact model computes, with uniform
heads per layer, and the cost model counts its real (padded) work."""
import pytest
import torch

import pyengine
from pyengine.cost.flop_count import count_flops
from pyengine.models.vit.padded import PaddedAttention, pad_heads, padded_spec, padded_widths
from pyengine.structure.spec import Spec, make_block

from _specs import random_spec

NAME = "vit_tiny_patch16_224"
KW = dict(depth=3, img_size=32, patch_size=8)   # 16 patches + cls = 17 tokens, head_dim 64


def _compact(spec_fn, dtype=torch.float64):
    model = pyengine.create_model(NAME, **KW).eval().to(dtype)
    pyengine.gate(model)
    s = spec_fn(pyengine.geometry(model))
    pyengine.apply(model, s)
    return model, pyengine.compile(model).eval(), s




@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("multiple,same", [(1, False), (8, False), (1, True)])
def test_padded_equals_compact(seed, multiple, same):
    # random specs mix in head dims 1, 7, 40, q/k dims of 0, layers with no heads or no FFN
    gated, compact, s = _compact(lambda g: random_spec(g, seed, model=NAME))
    padded = pad_heads(compact, multiple=multiple, same_qk_v=same).eval()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want, got, ref = compact(x), padded(x), gated(x)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() <= 1e-10
    assert (got - ref).abs().max().item() <= 1e-10
    # every layer runs uniform heads at (rounded) layer maxima
    for blk, b in zip(padded.blocks, s.blocks):
        if not b.has_attn:
            assert blk.attn is None
            continue
        assert isinstance(blk.attn, PaddedAttention)
        assert blk.attn.num_heads == len(b.heads)
        pqk, pv = max(1, max(b.qk_dims)), max(b.v_dims)
        if same:
            pqk = pv = max(pqk, pv)
        assert blk.attn.qk_dim == min(64, -(-pqk // multiple) * multiple)
        assert blk.attn.v_dim == min(64, -(-pv // multiple) * multiple)
    # the cost model counts the padded shapes, and agrees with torch's flop counter
    assert pyengine.cost(padded, batch=3).flops == count_flops(padded, x)
    assert pyengine.cost(padded, batch=3).macs >= pyengine.cost(compact, batch=3).macs
    # the compact model is untouched by padding
    with torch.no_grad():
        assert torch.equal(compact(x), want)


def test_padding_costs_what_the_widest_head_costs():
    # one layer: heads of q/k dims 7 and 40, v dims 1 and 16 -> both heads at 40 / 16
    def spec(g):
        blocks = [make_block([(0, range(7), [3]), (2, range(40), range(16))], range(10))]
        blocks += [make_block([], [])] * (g.depth - 1)
        return Spec(tuple(blocks), model=NAME, dense=g)
    _, compact, s = _compact(spec)
    p = padded_spec(s)
    assert [(len(h.qk), len(h.v)) for h in p.blocks[0].heads] == [(40, 16), (40, 16)]
    g = s.dense
    n = g.num_tokens
    extra = n * n * (40 - 7 + 16 - 1) + n * g.embed_dim * (2 * (40 - 7) + 16 - 1) \
        + n * (16 - 1) * g.embed_dim
    assert pyengine.cost(p).macs - pyengine.cost(s).macs == extra
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(pad_heads(compact)(x), compact(x), rtol=0, atol=1e-12)


def test_padded_widths_and_errors():
    assert padded_widths([0, 0], [5, 3], 64) == (1, 5)
    assert padded_widths([7, 40], [1, 16], 64, multiple=16) == (48, 16)
    assert padded_widths([60], [61], 64, multiple=16) == (64, 64)   # capped at head_dim
    assert padded_widths([7], [20], 64, same_qk_v=True) == (20, 20)
    with pytest.raises(ValueError, match="multiple"):
        padded_widths([7], [7], 64, multiple=0)
    dense = pyengine.create_model(NAME, **KW)
    with pytest.raises(ValueError, match="compact model"):
        pad_heads(dense)
