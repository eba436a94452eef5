"""PackedLinear: fp32 CPU inference on a prepacked oneDNN weight equals the float64 linear;
autograd, other dtypes and copies take the plain path; the cache follows the weight."""
import copy

import pytest
import torch

import pyengine
from pyengine.models.packed_linear import MIN_FEATURES, MIN_ROWS, PackedLinear, available

pytestmark = pytest.mark.skipif(not available(), reason="torch built without oneDNN")


def _ref(layer, x):
    b = None if layer.bias is None else layer.bias.double()
    return torch.nn.functional.linear(x.double(), layer.weight.double(), b)


@pytest.mark.parametrize("fin,fout", [(1, 7), (7, 1), (40, 40), (384, 936), (256, 300)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1,), (197,), (3, 17), (2, 100, 3)])
def test_packed_inference_equals_the_float64_linear(fin, fout, bias, shape):
    gen = torch.Generator().manual_seed(fin * 1000 + fout)
    layer = PackedLinear(fin, fout, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(fout, fin, generator=gen))
        if bias:
            layer.bias.copy_(torch.randn(fout, generator=gen))
    x = torch.randn(*shape, fin, generator=gen)
    with torch.inference_mode():
        y = layer(x)
    rows = x.numel() // fin
    # packed where it pays: wide enough layers, enough rows
    assert ("_pack" in layer.__dict__) == (min(fin, fout) >= MIN_FEATURES and rows >= MIN_ROWS)
    assert y.shape == (*shape, fout) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _ref(layer, x), rtol=1e-5, atol=1e-4 * fin ** 0.5)


def test_one_packed_weight_serves_every_row_count():
    torch.manual_seed(0)
    layer = PackedLinear(256, 264)
    first = None
    with torch.inference_mode():
        for rows in (197, 1, 1576, 7, 197):
            x = torch.randn(rows, 256)
            torch.testing.assert_close(layer(x).double(), _ref(layer, x), rtol=1e-5, atol=2e-3)
            if first is None:
                first = layer.__dict__["_pack"][1]
            assert layer.__dict__["_pack"][1] is first  # packed once (small inputs: plain)


def test_the_packed_weight_follows_the_weight():
    torch.manual_seed(0)
    layer = PackedLinear(256, 256)
    x = torch.randn(MIN_ROWS, 256)
    with torch.no_grad():
        layer(x)
        first = layer.__dict__["_pack"][1]
        layer.weight.mul_(-3.0)  # in place: a new version
        torch.testing.assert_close(layer(x).double(), _ref(layer, x), rtol=1e-5, atol=2e-3)
        assert layer.__dict__["_pack"][1] is not first
        layer.load_state_dict({"weight": torch.randn(256, 256), "bias": torch.zeros(256)})
        torch.testing.assert_close(layer(x).double(), _ref(layer, x), rtol=1e-5, atol=2e-3)
    c = copy.deepcopy(layer)  # copies carry no cache
    assert "_pack" not in c.__dict__ and torch.equal(c.weight, layer.weight)
    layer.double()  # another dtype: the plain path, no stale cache
    assert "_pack" not in layer.__dict__
    with torch.no_grad():
        y = layer(x.double())
    assert y.dtype == torch.float64 and "_pack" not in layer.__dict__


def test_flop_counting_sees_a_linear():
    from torch.utils.flop_counter import FlopCounterMode
    layer = PackedLinear(256, 256)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        layer(torch.randn(MIN_ROWS, 256))
    assert fc.get_total_flops() == 2 * MIN_ROWS * 256 * 256 and "_pack" not in layer.__dict__


def test_autograd_takes_the_plain_path():
    torch.manual_seed(0)
    layer = PackedLinear(12, 5)
    x = torch.randn(3, 12, requires_grad=True)
    y = layer(x)
    assert "_pack" not in layer.__dict__
    y.square().sum().backward()
    ref = copy.deepcopy(layer)
    xr = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(xr, ref.weight, ref.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad)


def test_compact_vit_layers_are_packed_and_equal_the_gated_model():
    torch.manual_seed(0)
    m = pyengine.create_model("vit_small_patch16_224", img_size=64, patch_size=8, depth=2,
                              num_classes=5).eval()
    g = pyengine.gate(m)
    from pyengine.models import adapter_for
    s = adapter_for(g).synthetic_spec(g, 0.5, seed=0, name="vit_small_patch16_224")
    pyengine.apply(g, s)
    c = pyengine.compile(g).eval()
    lin = [mod for mod in c.modules() if isinstance(mod, PackedLinear)]
    # qkv + proj per kept attention branch, fc1 + fc2 per kept FFN
    assert len(lin) == 2 * sum(b.has_attn + b.has_mlp for b in s.blocks) > 0
    x = torch.randn(3, 3, 64, 64)  # 3 x 65 rows: the wide layers take the packed path
    with torch.inference_mode():
        ref, got = g(x), c(x)
    assert any("_pack" in mod.__dict__ for mod in lin)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
