"""SSS: scale-factor gates (ViT and ResNet), folding at compile, the APG driver inside fit,
and the prune plug-in (exact zeros, target mode)."""

import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import pyengine
from pyengine.methods.base import run_method
from pyengine.models.resnet import blocks as resnet
from pyengine.methods import sss
from pyengine.methods.apg import APG

from _specs import random_spec


def _vit(**kw):
    return pyengine.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2,
                                 num_classes=4, **kw).eval()


def _loader(n=48, size=16, classes=4, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def test_factors_start_at_one_and_change_nothing():
    for dense in (_vit(), timm.create_model("resnet10t", num_classes=4).eval()):
        x = torch.randn(2, 3, 16, 16) if not resnet.is_resnet(dense) else torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            want = dense(x)
            gated = pyengine.gate(dense, method="sss")
            got = gated(x)
        assert torch.allclose(want, got, atol=1e-5)
        fs = sss.scale_factors(gated)
        assert fs and all(isinstance(f, torch.nn.Parameter) and bool((f == 1).all()) for f in fs)


def test_learned_slots():
    m = pyengine.gate(_vit(), method="sss")
    g = m.blocks[0].attn.gates
    names = {n for n, _ in g.named_parameters()}
    assert names == {"block", "head"}  # q/k and v dims stay fixed ones by default
    assert {n for n, _ in m.blocks[0].mlp.gates.named_parameters()} == {"block", "neuron"}
    m2 = pyengine.gate(_vit(), method="sss", dims=True)
    assert {n for n, _ in m2.blocks[0].attn.gates.named_parameters()} == {"block", "head", "qk", "v"}
    r = pyengine.gate(timm.create_model("resnet14t", num_classes=3), method="sss")
    assert {n for n, _ in r.layer1[0].gates.named_parameters()} == {"block", "conv1", "conv2"}
    # 1 block factor + inner channels per block
    g0 = resnet.geometry(r)
    assert sum(f.numel() for f in sss.scale_factors(r)) == sum(1 + sum(c) for c in g0.inner)


def test_vit_real_factors_fold_into_compact_exactly():
    m = pyengine.gate(_vit(init_values=0.5), method="sss", dims=True)
    with torch.no_grad():
        for gates in (mod for mod in m.modules() if isinstance(mod, sss.ScaleGates)):
            for name in gates.learned:
                t = getattr(gates, name)
                t.copy_(torch.empty_like(t).uniform_(-2, 2) * (torch.rand_like(t) > 0.3))
                if name == "block":
                    t.fill_(-0.8)
        m.blocks[1].attn.gates.head.zero_()  # whole attention block removed
    s = pyengine.spec(m)
    assert s.blocks[1].heads == ()
    assert 0 < sum(len(b.mlp) for b in s.blocks) < 2 * m.blocks[0].mlp.hidden
    compact = pyengine.compile(m).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert (m(x) - compact(x)).abs().max() <= 1e-4
        # the gated model itself is unchanged by compile (folding happens on the copy)
        assert (m(x) - m(x)).abs().max() == 0
    assert len(s.blocks[0].mlp) == int((m.blocks[0].mlp.gates.neuron != 0).sum())


def test_apply_keeps_learned_scales():
    m = pyengine.gate(_vit(), method="sss")
    with torch.no_grad():
        m.blocks[0].mlp.gates.neuron.mul_(0.5)
    spec = random_spec(pyengine.geometry(m), 1)
    pyengine.apply(m, spec)
    assert pyengine.spec(m).blocks == spec.blocks
    kept = m.blocks[0].mlp.gates.neuron[list(spec.blocks[0].mlp)]
    assert bool((kept == 0.5).all()) or not spec.blocks[0].mlp


def test_controller_equals_stepping_after_backward():
    """fit calls on_step before each forward; stepping APG there with the gradient left by the
    previous backward is exactly APG stepped right after that backward."""
    def run(lagged: bool):
        torch.manual_seed(3)
        m = pyengine.gate(_vit(), method="sss")
        for p in m.parameters():
            p.requires_grad_(False)
        fs = sss.scale_factors(m)
        for f in fs:
            f.requires_grad_(True)
        apg = APG(fs, lr=0.1, gamma=3.0, momentum=0.9, nonneg=True)
        ctl = sss.SSSController(m, apg, 1, target=None)
        for step, (x, y) in enumerate(_loader()):
            if lagged:
                ctl(step, 3)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            if not lagged:
                apg.step()
                apg.zero_grad()
        if lagged:
            ctl.finish()
        else:
            apg.finalize()
        return [f.detach().clone() for f in fs]
    a, b = run(True), run(False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(bool((x == 0).any()) for x in a)


def _sss(model, teacher, loader, img_size=16, **kw):
    """SSS through the method interface with this file's defaults."""
    opts = dict(target=0.5, gamma=None, target_gamma=None, prune_at=0.5, apg_lr=0.05,
                apg_momentum=0.9, sss_nonneg=True, sss_dims=False, epochs=2, lr=1e-3,
                weight_decay=0.05, kd_alpha=0.5, kd_temperature=4.0, seed=0, device="cpu",
                amp=None, min_heads=0, round_to=None, progress=False, tolerance=0.03)
    opts.update(kw)
    return run_method(model, "sss", loader, teacher=teacher, log=lambda s: None,
                      img_size=img_size, **opts)


def test_prune_structure_plain_gamma_gives_exact_zeros_and_compiles():
    m = _vit()
    teacher = _vit()
    gated = _sss(m, teacher, _loader(), gamma=2.0, apg_lr=0.1)
    fs = sss.scale_factors(gated)
    zeros = sum(int((f == 0).sum()) for f in fs)
    assert zeros > 0
    s = pyengine.spec(gated)
    dense = pyengine.cost(pyengine.spec(_vit()))
    assert pyengine.cost(s).macs < dense.macs
    compact = pyengine.compile(gated.eval()).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (gated(x) - compact(x)).abs().max() <= 1e-4
    # a factor at zero is removed, and every removed head/neuron has a zero factor
    for blk, b in zip(gated.blocks, s.blocks):
        neuron = blk.mlp.gates.neuron
        assert int((neuron != 0).sum()) == len(b.mlp) or not b.mlp


@pytest.mark.parametrize("target", [0.6, 0.3])
def test_prune_structure_target_mode_vit(target):
    gated = _sss(_vit(), None, _loader(), target=target, kd_alpha=0.0)
    ratio = sss.structure_macs(gated) / sss.structure_macs(pyengine.gate(_vit(), method="sss"))
    assert ratio <= target * 1.03
    assert ratio > 0.05  # not everything thrown away on the way
    assert gated.pyengine_sss["macs_ratio"] == pytest.approx(ratio)


def test_prune_structure_target_mode_resnet():
    m = pyengine.create_model("resnet10t", num_classes=4)
    gated = _sss(m, None, _loader(n=32, size=32), img_size=32, target=0.6, kd_alpha=0.0,
                 epochs=1)
    assert gated.pyengine_sss["macs_ratio"] <= 0.6 * 1.03
    s = pyengine.spec(gated)
    compact = pyengine.compile(gated).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (gated(x) - compact(x)).abs().max() <= 1e-4
    c = pyengine.cost(compact, img_size=32)
    assert c.macs == pyengine.cost(s, img_size=32).macs


def test_threshold_to_target():
    m = pyengine.gate(_vit(), method="sss")
    with torch.no_grad():
        for f in sss.scale_factors(m):
            f.copy_(torch.rand_like(f) + 0.01)
    dense = sss.structure_macs(m)
    t = sss.threshold_to_target(m, 0.4, dense)
    assert t > 0
    ratio = sss.structure_macs(m) / dense
    assert ratio <= 0.4
    # the smallest threshold that does it: one notch lower is above the target
    assert all(bool(((f == 0) | (f.abs() >= t)).all()) for f in sss.scale_factors(m))


def test_errors():
    with pytest.raises(ValueError, match="no SSS scale factors"):
        sss.scale_factors(pyengine.gate(_vit()))
    with pytest.raises(ValueError, match="bf16"):
        _sss(_vit(), None, _loader(), amp="fp16")


def test_resnet_norms_after_scaled_channels_train_on_running_stats():
    """With batch statistics, bn2 cancels a common scale of a block's channel factors: the
    loss would not feel L1 shrinking them all together. SSS freezes those norms."""
    m = pyengine.gate(timm.create_model("resnet14t", num_classes=4), method="sss").train()
    with torch.no_grad():  # timm starts each last BN at weight 0 (zero_init_last)
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.normal_(1, 0.2)
    norms = sss.frozen_norms(m)
    assert len(norms) == 2 * sum(resnet.geometry(m).layers)  # bottleneck: bn2 and bn3
    x = torch.randn(4, 3, 32, 32)

    def common_scale_grad():
        blk = m.layer1[0]
        out = m(x).square().sum()
        (g,) = torch.autograd.grad(out, blk.gates.conv1)
        return (g * blk.gates.conv1).sum().abs().item()  # d loss / d (common scale)
    assert common_scale_grad() < 1e-3  # batch statistics: invariant
    for bn in norms:
        bn.eval()
    assert common_scale_grad() > 1e-2
