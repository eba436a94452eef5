"""pyengine::importance_reduce: the csrc CPU kernel against a float64 reference, the Python
dispatch (backends and their errors), and the op's fake impl (opcheck, torch.compile, export).

Tests of the compiled extension skip (with the load error) when pyengine._C is not built; the
torch-reference and dispatch tests always run.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pyengine import ops
from pyengine.ops import _ext
from pyengine.ops import importance_reduce, importance_reduce_reference

needs_ext = pytest.mark.skipif(
    not _ext.available(), reason=f"pyengine._C is not built: {_ext.load_error()}")


def ref64(x, g=None):
    """Float64 ground truth on the very same (already rounded) input values."""
    C = x.shape[-1]
    xd = x.detach().to(torch.float64).reshape(-1, C)
    out = torch.zeros(3, C, dtype=torch.float64)
    out[0] = xd.abs().sum(0)
    out[1] = (xd * xd).sum(0)
    if g is not None:
        out[2] = (xd * g.detach().to(torch.float64).reshape(-1, C)).abs().sum(0)
    return out


def assert_stats(out, x, g=None, rtol=1e-6, atol=1e-6):
    C = x.shape[-1]
    assert out.shape == (3, C)
    assert out.dtype == torch.float32
    assert out.device == x.device
    assert out.is_contiguous()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref64(x, g), rtol=rtol, atol=atol)
    if g is None:
        assert (out[2] == 0).all()


SHAPES = [
    (2, 197, 384),   # a ViT-S activation: batch x tokens x channels
    (5, 1),          # C = 1
    (0, 7),          # zero rows
    (3, 4, 5, 6),    # several leading dims
    (7,),            # 1-dim: one row
    (40000, 3),      # few channels, many rows (row-parallel path with per-block partials)
    (33, 600),       # several channel blocks, the last one partial
    (300, 1024),     # channel-parallel path
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _inputs(shape, dtype, with_g):
    x = torch.randn(shape, dtype=torch.float32).to(dtype)
    g = torch.randn(shape, dtype=torch.float32).to(dtype) if with_g else None
    return x, g


# --------------------------------------------------------------------- csrc CPU kernel


@needs_ext
@pytest.mark.parametrize("with_g", [True, False], ids=["g", "no_g"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_kernel_matches_float64(shape, dtype, with_g):
    x, g = _inputs(shape, dtype, with_g)
    out = torch.ops.pyengine.importance_reduce(x, g)
    # the CPU kernel accumulates in double: only the final rounding to float32 remains
    assert_stats(out, x, g, rtol=1e-6, atol=1e-6)
    # and through the Python entry point
    out2 = importance_reduce(x, g, backend="cpu")
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


@needs_ext
def test_cpu_kernel_zero_rows_and_empty_channels():
    out = torch.ops.pyengine.importance_reduce(torch.empty(0, 7), torch.empty(0, 7))
    assert out.shape == (3, 7) and out.dtype == torch.float32 and (out == 0).all()
    out = torch.ops.pyengine.importance_reduce(torch.empty(4, 0))
    assert out.shape == (3, 0) and out.dtype == torch.float32
    out = torch.ops.pyengine.importance_reduce(torch.empty(2, 0, 5, dtype=torch.bfloat16))
    assert out.shape == (3, 5) and (out == 0).all()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cpu_kernel_non_contiguous(dtype):
    x = torch.randn(384, 197).to(dtype).t()           # [197, 384], transposed
    g = torch.randn(384, 197).to(dtype).t()
    assert not x.is_contiguous()
    assert_stats(torch.ops.pyengine.importance_reduce(x, g), x, g)
    y = torch.randn(4, 50, 64)[:, ::3, 1::2]          # strided slices
    gy = torch.randn(4, 50, 64)[:, ::3, 1::2]
    assert not y.is_contiguous()
    assert_stats(torch.ops.pyengine.importance_reduce(y, gy), y, gy)
    z = torch.randn(8, 16, 32).permute(2, 0, 1)       # channels not last in memory
    assert_stats(torch.ops.pyengine.importance_reduce(z), z)
    z = torch.randn(1, 10).expand(6, 10)              # stride-0 leading dim
    assert_stats(torch.ops.pyengine.importance_reduce(z, z), z, z)


@needs_ext
def test_cpu_kernel_mixed_dtypes_promote():
    x = torch.randn(3, 11, 16).to(torch.bfloat16)
    g = torch.randn(3, 11, 16)                        # float32 gradient of a bf16 activation
    assert_stats(torch.ops.pyengine.importance_reduce(x, g), x, g)


@needs_ext
def test_cpu_kernel_large_values_accumulate_wide():
    # 2^25 ones: a float32 running sum would stop at 2^24
    x = torch.ones(1 << 25, 1, dtype=torch.bfloat16)
    out = torch.ops.pyengine.importance_reduce(x)
    assert out[0, 0].item() == float(1 << 25)
    assert out[1, 0].item() == float(1 << 25)


@needs_ext
def test_cpu_kernel_does_not_touch_inputs():
    x, g = _inputs((4, 9, 12), torch.float32, True)
    x0, g0 = x.clone(), g.clone()
    torch.ops.pyengine.importance_reduce(x, g)
    assert torch.equal(x, x0) and torch.equal(g, g0)


@needs_ext
def test_cpu_kernel_thread_count_invariant():
    x, g = _inputs((5000, 40), torch.float32, True)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.pyengine.importance_reduce(x, g)
        torch.set_num_threads(max(2, n))
        many = torch.ops.pyengine.importance_reduce(x, g)
    finally:
        torch.set_num_threads(n)
    torch.testing.assert_close(one, many, rtol=1e-6, atol=1e-6)


@needs_ext
def test_cpu_kernel_errors():
    op = torch.ops.pyengine.importance_reduce
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="g must have the shape of x"):
        op(x, torch.randn(4, 7))
    with pytest.raises(ValueError, match="g must have the shape of x"):
        op(x, torch.randn(8))
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        op(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="g must be a floating tensor"):
        op(x, torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        op(torch.ones(4, 8, dtype=torch.complex64))
    if hasattr(torch, "float8_e4m3fn"):
        with pytest.raises(TypeError, match="x must be a floating tensor"):
            op(torch.ones(4, 8).to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="at least 1 dim"):
        op(torch.tensor(3.0))
    with pytest.raises(RuntimeError, match="same device"):
        op(x, torch.randn(4, 8, device="meta"))


@needs_ext
def test_extension_flags():
    assert _ext.available() and _ext.load_error() is None
    assert isinstance(_ext.has_cuda_kernels(), bool)
    assert _ext.has_kernel("importance_reduce", "cpu")
    assert _ext.has_kernel("importance_reduce", "cuda") == _ext.has_cuda_kernels()
    assert "loaded" in _ext.describe()
    import pyengine._C as C

    assert C.has_cuda() == _ext.has_cuda_kernels()


# ------------------------------------------------------------- the op under tracing


@needs_ext
@pytest.mark.parametrize("with_g", [True, False], ids=["g", "no_g"])
def test_opcheck(with_g):
    op = torch.ops.pyengine.importance_reduce.default
    for shape, dtype in [((2, 5, 16), torch.float32), ((3, 1), torch.bfloat16),
                         ((0, 4), torch.float32)]:
        x, g = _inputs(shape, dtype, with_g)
        torch.library.opcheck(op, (x, g))
    torch.library.opcheck(op, (torch.randn(6, 10).t(), None))  # non-contiguous


@needs_ext
def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 197, 384, dtype=torch.bfloat16)
        out = torch.ops.pyengine.importance_reduce(x, torch.empty_like(x))
        assert out.shape == (3, 384) and out.dtype == torch.float32
        with pytest.raises(ValueError, match="shape of x"):
            torch.ops.pyengine.importance_reduce(x, torch.empty(2, 197, 383))


@needs_ext
def test_torch_compile_fullgraph():
    def f(x, g):
        s = torch.ops.pyengine.importance_reduce(x * 2.0, g)
        return s[0] / s[1].clamp_min(1e-12)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=False)
    x, g = _inputs((2, 9, 16), torch.float32, True)
    torch.testing.assert_close(compiled(x, g), f(x, g))


@needs_ext
def test_torch_export():
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.ops.pyengine.importance_reduce(x)

    x = torch.randn(2, 9, 16)
    ep = torch.export.export(M(), (x,))
    assert any(n.target is torch.ops.pyengine.importance_reduce.default
               for n in ep.graph.nodes if n.op == "call_function")
    torch.testing.assert_close(ep.module()(x), M()(x))


# ------------------------------------------------------- reference and dispatch (always run)


@pytest.mark.parametrize("with_g", [True, False], ids=["g", "no_g"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", [(2, 197, 384), (5, 1), (0, 7), (3, 4, 5, 6)],
                         ids=lambda s: "x".join(map(str, s)))
def test_torch_reference(shape, dtype, with_g):
    x, g = _inputs(shape, dtype, with_g)
    out = importance_reduce(x, g, backend="torch")
    assert_stats(out, x, g, rtol=1e-5, atol=1e-4)  # fp32 accumulation
    torch.testing.assert_close(importance_reduce_reference(x, g), out, rtol=0, atol=0)


def test_torch_reference_non_contiguous():
    x = torch.randn(384, 197).t()
    assert_stats(importance_reduce(x, x, backend="torch"), x, x, rtol=1e-5, atol=1e-4)


def test_auto_backend_matches_reference():
    x, g = _inputs((2, 33, 48), torch.bfloat16, True)
    out = importance_reduce(x, g)  # auto: the csrc kernel when built, else torch
    ref = importance_reduce_reference(x, g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    assert "torch" in ops.available_backends("importance_reduce", "cpu")
    assert ("cpu" in ops.available_backends("importance_reduce", "cpu")) == \
        _ext.has_kernel("importance_reduce", "cpu")


def test_dispatch_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="unknown backend 'fast'.*auto, torch, triton, cuda, cpu"):
        importance_reduce(x, backend="fast")
    # backend="triton" works on CPU tensors only under TRITON_INTERPRET (tests/test_triton_*.py)
    with pytest.raises(RuntimeError, match="needs tensors on a cuda device"):
        importance_reduce(x, backend="cuda")
    with pytest.raises(ValueError, match="shape of x"):
        importance_reduce(x, torch.randn(4, 9), backend="torch")
    with pytest.raises(TypeError, match="floating"):
        importance_reduce(torch.ones(4, 8, dtype=torch.int64), backend="torch")
    with pytest.raises(TypeError, match="floating"):
        importance_reduce(torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating"):
        importance_reduce(x, torch.ones(4, 8, dtype=torch.complex64), backend="torch")
    with pytest.raises(ValueError, match="at least 1 dim"):
        importance_reduce(torch.tensor(1.0), backend="torch")
    with pytest.raises(TypeError, match="torch.Tensor"):
        importance_reduce([1.0, 2.0])


def test_unavailable_extension_falls_back(monkeypatch):
    # pretend pyengine._C failed to load (and Triton's CPU interpreter is off)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_ext, "_tried", True)
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_error", "pyengine._C could not be imported (ImportError: nope)")
    assert not _ext.available() and not _ext.has_cuda_kernels()
    assert not _ext.has_kernel("importance_reduce", "cpu")
    x, g = _inputs((3, 5, 8), torch.float32, True)
    torch.testing.assert_close(importance_reduce(x, g), importance_reduce_reference(x, g))
    with pytest.raises(RuntimeError, match="backend='cpu' is not available.*ImportError: nope"):
        importance_reduce(x, g, backend="cpu")
    assert ops.available_backends("importance_reduce", "cpu") == ["torch"]


def test_import_without_extension():
    # a fresh interpreter where pyengine._C is disabled: pyengine.ops still imports and works
    code = (
        "import torch\n"
        "from pyengine import ops\n"
        "from pyengine.ops import _ext\n"
        "assert not _ext.available(), 'extension should be disabled'\n"
        "assert 'PYENGINE_DISABLE_EXT' in _ext.load_error()\n"
        "out = ops.importance_reduce(torch.randn(2, 3, 4))\n"
        "assert out.shape == (3, 4) and out.dtype == torch.float32\n"
        "try:\n"
        "    ops.importance_reduce(torch.randn(2, 4), backend='cpu')\n"
        "except RuntimeError as e:\n"
        "    assert 'PYENGINE_DISABLE_EXT' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('backend=cpu should fail')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYENGINE_DISABLE_EXT="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
