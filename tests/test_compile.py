"""pyengine.compile gives a dense model whose outputs equal the hard-gated model's."""
import pytest
import timm
import torch

import pyengine
from pyengine.structure.spec import Spec, make_block

from _specs import random_spec


def _gated(name, **kw):
    m = timm.create_model(name, pretrained=False, **kw).eval()
    return pyengine.gate(m, method="mask")


@pytest.mark.parametrize("name,seeds", [("deit_tiny_patch16_224", range(12)),
                                        ("deit_small_patch16_224", range(100, 110))])
def test_compile_equals_hard_gated(name, seeds):
    model = _gated(name)
    g = pyengine.geometry(model)
    x = torch.randn(2, 3, 224, 224)
    for seed in seeds:
        s = random_spec(g, seed, model=name)
        pyengine.apply(model, s)
        assert pyengine.spec(model).blocks == s.blocks
        compact = pyengine.compile(model).eval()
        assert pyengine.spec(compact) == pyengine.spec(model)
        with torch.no_grad():
            want, got = model(x), compact(x)
        assert torch.isfinite(got).all()
        assert (want - got).abs().max().item() <= 1e-4, f"seed {seed}"
        # the compact model really is smaller where the spec says so
        n_dense = sum(p.numel() for p in model.parameters())
        n_compact = sum(p.numel() for p in compact.parameters())
        assert n_compact <= n_dense


def test_pruned_output_differs_from_dense():
    # guards against an apply() that silently does nothing
    model = _gated("deit_tiny_patch16_224")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        dense = model(x)
        pyengine.apply(model, random_spec(pyengine.geometry(model), 3))
        pruned = model(x)
    assert (dense - pruned).abs().max() > 1e-2


def test_everything_removed_is_identity_on_residual():
    model = _gated("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5)
    s = Spec((make_block([], []), make_block([], [])), model="vit_tiny_patch16_224")
    pyengine.apply(model, s)
    compact = pyengine.compile(model).eval()
    assert all(b.attn is None and b.mlp is None for b in compact.blocks)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = compact.patch_embed(x)
        feats = compact.norm(compact._pos_embed(feats))
        want = compact.head(feats[:, 0])
        assert (compact(x) - want).abs().max() <= 1e-6
        assert (model(x) - want).abs().max() <= 1e-5


def test_heads_switched_off_inside_kept_block_remove_bias_too():
    # block gate on but every head off: the Spec says the attention is gone (bias included),
    # so the gated forward must agree with the compact one
    model = _gated("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=5)
    with torch.no_grad():
        model.blocks[0].attn.proj.bias.normal_()
        model.blocks[0].attn.gates.head.zero_()
    s = pyengine.spec(model)
    assert s.blocks[0].heads == ()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - pyengine.compile(model).eval()(x)).abs().max() <= 1e-5


def test_distilled_and_layerscale_models():
    for name, kw in [("deit_tiny_distilled_patch16_224", dict(img_size=64)),
                     ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=3,
                                                   init_values=0.1, num_classes=7))]:
        model = _gated(name, **kw)
        g = pyengine.geometry(model)
        x = torch.randn(2, 3, kw["img_size"], kw["img_size"])
        for seed in range(3):
            pyengine.apply(model, random_spec(g, seed))
            compact = pyengine.compile(model).eval()
            with torch.no_grad():
                assert (model(x) - compact(x)).abs().max() <= 1e-4


def test_compile_training_mode_gradients_match():
    """The compact model trains: gradients that flow back through every pruned block (to the
    patch embedding) equal the hard-gated model's."""
    model = _gated("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=5)
    pyengine.apply(model, random_spec(pyengine.geometry(model), 11))
    compact = pyengine.compile(model)
    x = torch.randn(3, 3, 32, 32)
    model(x).square().sum().backward()
    compact(x).square().sum().backward()
    for name in ("patch_embed.proj.weight", "cls_token", "head.weight", "norm.weight"):
        a = model.get_parameter(name).grad
        b = compact.get_parameter(name).grad
        assert a.abs().max() > 0
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), name
