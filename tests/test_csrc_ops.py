"""The csrc C++ CPU kernels of the three hot ops against the torch references.

pyengine.ops.{varlen_attention, masked_ffn, importance_reduce_many} with backend="cpu"
(torch.ops.pyengine.varlen_attention_fwd / masked_ffn_fwd / importance_reduce_many) on fresh
random inputs with odd shapes, their argument errors, their fake impls (opcheck,
torch.compile) and the error of kernels that are not built. The CUDA kernels
cannot run here (no GPU): bench/gpu_csrc.py checks them on a GPU.
"""
from __future__ import annotations

import random

import pytest
import torch

from pyengine import ops
from pyengine.ops import _ext
from pyengine.ops import importance_reduce_reference, masked_ffn_reference
from pyengine.ops import varlen_attention_reference

from _naive import naive_varlen

pytestmark = pytest.mark.skipif(
    not _ext.available(), reason=f"pyengine._C is not built: {_ext.load_error()}")


# ------------------------------------------------------------------------ varlen attention
def _qkv(B, Nq, Nk, qk_dims, v_dims, dtype=torch.float32):
    q = torch.randn(B, Nq, sum(qk_dims), dtype=torch.float64).to(dtype)
    k = torch.randn(B, Nk, sum(qk_dims), dtype=torch.float64).to(dtype)
    v = torch.randn(B, Nk, sum(v_dims), dtype=torch.float64).to(dtype)
    return q, k, v


def _ref64(q, k, v, qk_dims, v_dims, scales):
    """The torch reference in float64 on the very same (rounded) inputs."""
    return varlen_attention_reference(q.double(), k.double(), v.double(), qk_dims, v_dims, scales)


HEADS = [
    # (qk_dims, v_dims): mixed widths 1, 7, 16, 40, 64, unequal q/k and v dims, qk dim 0
    ([1, 7, 16, 40, 64], [64, 40, 16, 7, 1]),
    ([64, 64, 7, 7, 7], [64, 64, 7, 7, 7]),
    ([0, 16, 0], [8, 16, 3]),          # uniform-attention heads
    ([5, 0, 9], [0, 4, 0]),            # heads with no v dims contribute no columns
    ([33], [40]),
]


@pytest.mark.parametrize("dims", HEADS, ids=lambda d: "qk" + "-".join(map(str, d[0])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_varlen_attention_matches_reference(dims, dtype):
    qk_dims, v_dims = dims
    H = len(qk_dims)
    scales = [random.uniform(0.05, 0.5) for _ in range(H)]
    q, k, v = _qkv(2, 197, 197, qk_dims, v_dims, dtype)
    out = ops.varlen_attention(q, k, v, qk_dims, v_dims, scales, backend="cpu")
    assert out.shape == (2, 197, sum(v_dims)) and out.dtype == dtype and out.is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.double(), _ref64(q, k, v, qk_dims, v_dims, scales),
                               rtol=tol, atol=tol)
    # the float32 path also against the float32 reference itself
    if dtype == torch.float32:
        torch.testing.assert_close(out, varlen_attention_reference(q, k, v, qk_dims, v_dims,
                                                                   scales), rtol=1e-5, atol=1e-5)


def test_varlen_attention_cross_attention_and_single_scale():
    # Nq != Nk, odd counts, one scale for all heads
    qk_dims, v_dims = [7, 40, 1], [3, 40, 16]
    q, k, v = _qkv(3, 5, 37, qk_dims, v_dims)
    out = ops.varlen_attention(q, k, v, qk_dims, v_dims, 0.125, backend="cpu")
    torch.testing.assert_close(out.double(), _ref64(q, k, v, qk_dims, v_dims, 0.125),
                               rtol=1e-5, atol=1e-5)


def test_varlen_attention_large_scores_are_stable():
    # scores of several hundred: a softmax without the max subtraction would overflow
    qk_dims, v_dims = [16, 40], [16, 40]
    q, k, v = _qkv(1, 33, 33, qk_dims, v_dims)
    q, k = q * 30, k * 30
    out = ops.varlen_attention(q, k, v, qk_dims, v_dims, [1.0, 0.7], backend="cpu")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _ref64(q, k, v, qk_dims, v_dims, [1.0, 0.7]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_varlen_attention_half_types(dtype):
    qk_dims, v_dims = [1, 7, 16, 40, 64], [64, 40, 16, 7, 1]
    q, k, v = _qkv(2, 21, 21, qk_dims, v_dims, dtype)
    out = ops.varlen_attention(q, k, v, qk_dims, v_dims, 0.2, backend="cpu")
    assert out.dtype == dtype
    # float32 math on the rounded inputs, one rounding at the end
    torch.testing.assert_close(out.double(), _ref64(q, k, v, qk_dims, v_dims, 0.2),
                               rtol=1e-2, atol=1e-2)


def test_varlen_attention_strided_qkv_from_one_projection():
    # q, k, v sliced out of one [B, N, 3 * D] projection: token stride != width (no copy needed)
    qk_dims, v_dims = [7, 40, 1], [7, 40, 1]
    D = sum(qk_dims)
    qkv = torch.randn(2, 19, 3 * D)
    q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
    assert not q.is_contiguous()
    scales = [0.3, 0.1, 0.9]
    out = torch.ops.pyengine.varlen_attention_fwd(q, k, v, qk_dims, v_dims, scales)
    torch.testing.assert_close(out.double(), _ref64(q, k, v, qk_dims, v_dims, scales),
                               rtol=1e-5, atol=1e-5)
    # a transposed last dim is made contiguous by the Python wrapper
    qt = q.contiguous().transpose(0, 1).contiguous().transpose(0, 1)  # token-major layout
    out2 = ops.varlen_attention(qt, k, v, qk_dims, v_dims, scales, backend="cpu")
    torch.testing.assert_close(out2, out, rtol=1e-6, atol=1e-6)


def test_varlen_attention_empty_cases():
    q, k, v = _qkv(2, 9, 9, [], [])
    out = ops.varlen_attention(q, k, v, [], [], [], backend="cpu")  # no heads at all
    assert out.shape == (2, 9, 0)
    q, k, v = _qkv(0, 9, 9, [4], [4])
    assert ops.varlen_attention(q, k, v, [4], [4], 1.0, backend="cpu").shape == (0, 9, 4)
    q, k, v = _qkv(2, 0, 5, [4], [4])
    assert ops.varlen_attention(q, k, v, [4], [4], 1.0, backend="cpu").shape == (2, 0, 4)
    q, k, v = _qkv(2, 3, 0, [4], [4])                                      # no keys: zeros
    out = ops.varlen_attention(q, k, v, [4], [4], 1.0, backend="cpu")
    torch.testing.assert_close(out, varlen_attention_reference(q, k, v, [4], [4], 1.0))


# The kernel runs the vector-ISA build the CPU supports (AVX512, AVX2 or the baseline one);
# PYENGINE_CPU_CAPABILITY lowers it, so every build this machine can run is checked.
ISAS = ["default", "avx2", "avx512"]

ODD_HEADS = [
    # widths 1, 7, 40, 64 in both orders, unequal q/k and v widths
    ([1, 7, 40, 64, 64], [64, 40, 7, 1, 64]),
    # qk 0 heads (uniform attention) and v 0 heads (no output columns) between others
    ([0, 7, 64, 5, 0, 1], [3, 0, 40, 0, 7, 1]),
]


def _poisoned():
    """Every tensor torch allocates without initializing (the kernel's output among them) starts
    as NaN, so an element the kernel forgets to write fails the comparison."""
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(4).isnan().all()


@pytest.fixture
def poison():
    mode = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    _poisoned()
    yield
    torch.use_deterministic_algorithms(mode)
    torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dims", ODD_HEADS, ids=["widths", "zero-heads"])
@pytest.mark.parametrize("B,N", [(1, 1), (3, 17), (1, 197), (2, 70)])
def test_varlen_attention_kernel_odd_shapes(isa, dims, B, N, monkeypatch, poison):
    # against the naive float64 reference on fresh inputs, q/k/v views of one qkv projection
    # output (token and batch strides of the fused width, as compact attention calls it)
    monkeypatch.setenv("PYENGINE_CPU_CAPABILITY", isa)
    qk_dims, v_dims = dims
    sqk, sv = sum(qk_dims), sum(v_dims)
    qkv = torch.randn(B, N, 2 * sqk + sv)
    q, k, v = qkv.split([sqk, sqk, sv], dim=-1)
    scales = [random.uniform(0.05, 1.0) for _ in qk_dims]
    out = torch.ops.pyengine.varlen_attention_fwd(q, k, v, qk_dims, v_dims, scales)
    assert out.shape == (B, N, sv) and out.is_contiguous()
    torch.testing.assert_close(out.double(), naive_varlen(q, k, v, qk_dims, v_dims, scales),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64],
                         ids=["bfloat16", "float16", "float64"])
def test_varlen_attention_kernel_dtypes(isa, dtype, monkeypatch, poison):
    # 16-bit inputs are computed in float32 and rounded once; float64 stays float64
    monkeypatch.setenv("PYENGINE_CPU_CAPABILITY", isa)
    qk_dims, v_dims = ODD_HEADS[1]
    q, k, v = _qkv(3, 67, 67, qk_dims, v_dims, dtype)
    out = ops.varlen_attention(q, k, v, qk_dims, v_dims, 0.3, backend="cpu")
    assert out.dtype == dtype
    ref = naive_varlen(q, k, v, qk_dims, v_dims, [0.3] * len(qk_dims))
    tol = 1e-12 if dtype == torch.float64 else 1e-2  # 16-bit: the final rounding
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("Nq,Nk", [(5, 600), (70, 513), (130, 257)])
def test_varlen_attention_kernel_many_key_blocks(isa, Nq, Nk, monkeypatch, poison):
    # more keys than one softmax block (256): the running max and sum rescale the output, and
    # large scores would overflow without the max
    monkeypatch.setenv("PYENGINE_CPU_CAPABILITY", isa)
    qk_dims, v_dims = [7, 40, 0], [40, 1, 9]
    q, k, v = _qkv(2, Nq, Nk, qk_dims, v_dims)
    q = q * 8
    k[:, -1] *= 8  # the last key block holds the largest scores of many rows
    scales = [0.9, 0.4, 1.0]
    out = ops.varlen_attention(q, k, v, qk_dims, v_dims, scales, backend="cpu")
    assert torch.isfinite(out).all()
    # scores in the hundreds: float32 rounding of a score moves its weight by ~1e-5
    torch.testing.assert_close(out.double(), naive_varlen(q, k, v, qk_dims, v_dims, scales),
                               rtol=1e-4, atol=1e-4)


def test_varlen_attention_kernel_thread_counts_agree():
    # the work split changes with the thread count, the result must not (not even in its bits)
    qk_dims, v_dims = [64, 40, 7, 1, 0], [64, 7, 40, 1, 5]
    q, k, v = _qkv(3, 197, 197, qk_dims, v_dims)
    n = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(ops.varlen_attention(q, k, v, qk_dims, v_dims, 0.2, backend="cpu"))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0].double(),
                               naive_varlen(q, k, v, qk_dims, v_dims, [0.2] * 5),
                               rtol=1e-5, atol=1e-5)


def test_varlen_attention_kernel_capability_setting(monkeypatch):
    q, k, v = _qkv(1, 3, 3, [4], [4])
    monkeypatch.setenv("PYENGINE_CPU_CAPABILITY", "sse9")
    with pytest.raises(ValueError, match="PYENGINE_CPU_CAPABILITY must be default, avx2 or "
                                         "avx512, got 'sse9'"):
        torch.ops.pyengine.varlen_attention_fwd(q, k, v, [4], [4], [1.0])


def test_varlen_attention_kernel_refuses_grad():
    # forward only: with inputs that need grad the dispatcher says so instead of losing them
    q, k, v = (t.requires_grad_() for t in _qkv(1, 5, 5, [4], [4]))
    with pytest.raises(ops.BackendNotAvailable, match="has no backward"):
        ops.varlen_attention(q, k, v, [4], [4], 1.0, backend="cpu")
    assert ops.varlen_attention(q, k, v, [4], [4], 1.0).requires_grad  # auto: the reference


def test_varlen_attention_errors():
    op = torch.ops.pyengine.varlen_attention_fwd
    q, k, v = _qkv(2, 5, 5, [4, 8], [4, 8])
    with pytest.raises(ValueError, match="one entry per head"):
        op(q, k, v, [4, 8], [4, 8], [1.0])
    with pytest.raises(ValueError, match=r"sum\(qk_dims\) = 11"):
        op(q, k, v, [4, 7], [4, 8], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"sum\(v_dims\) = 13"):
        op(q, k, v, [4, 8], [5, 8], [1.0, 1.0])
    with pytest.raises(ValueError, match="head 1 has a negative dim"):
        op(q, k, v, [16, -4], [4, 8], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"\[batch, tokens, packed dims\]"):
        op(q[0], k[0], v[0], [4, 8], [4, 8], [1.0, 1.0])
    with pytest.raises(ValueError, match="one batch size"):
        op(q, k[:1], v[:1], [4, 8], [4, 8], [1.0, 1.0])
    with pytest.raises(ValueError, match="one token count"):
        op(q, k, v[:, :3], [4, 8], [4, 8], [1.0, 1.0])
    with pytest.raises(TypeError, match="one dtype"):
        op(q, k.double(), v, [4, 8], [4, 8], [1.0, 1.0])
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64"):
        op(q.int(), k.int(), v.int(), [4, 8], [4, 8], [1.0, 1.0])
    with pytest.raises(ValueError, match="k must be contiguous in its last dim"):
        op(q, k.transpose(0, 2).contiguous().transpose(0, 2), v, [4, 8], [4, 8], [1.0, 1.0])
    with pytest.raises(RuntimeError, match="one device"):
        op(q, k, v.to("meta"), [4, 8], [4, 8], [1.0, 1.0])
    with pytest.raises(RuntimeError, match="needs tensors on a cuda device, got cpu"):
        ops.varlen_attention(q, k, v, [4, 8], [4, 8], 1.0, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        ops.varlen_attention(q, k, v, [4, 8], [4, 8], 1.0, backend="gpu")
    with pytest.raises(ValueError, match="2 scales for 1 heads"):
        ops.varlen_attention(q[..., :4], k[..., :4], v[..., :4], [4], [4], [1.0, 2.0],
                             backend="cpu")


# ------------------------------------------------------------------------------ masked FFN
def _ffn(in_f, hidden, out_f, dtype=torch.float32, bias=True):
    w1 = torch.randn(hidden, in_f, dtype=dtype) / in_f ** 0.5
    b1 = torch.randn(hidden, dtype=dtype) if bias else None
    w2 = torch.randn(out_f, hidden, dtype=dtype) / max(hidden, 1) ** 0.5
    b2 = torch.randn(out_f, dtype=dtype) if bias else None
    return w1, b1, w2, b2


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_masked_ffn_matches_reference(act, dtype):
    x = torch.randn(2, 197, 40, dtype=dtype)
    w1, b1, w2, b2 = _ffn(40, 96, 24, dtype)
    keep = torch.randperm(96)[:37].sort().values
    gate = torch.rand(96, dtype=dtype)
    out = ops.masked_ffn(x, w1, b1, w2, b2, keep, gate, act, backend="cpu")
    ref = masked_ffn_reference(x.double(), w1.double(), b1.double(), w2.double(), b2.double(),
                               keep, gate.double(), act)
    assert out.shape == (2, 197, 24) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("case", ["all_kept", "none_kept", "no_bias", "list_keep_int32_unsorted",
                                  "token_gates", "one_row", "duplicate_keep"])
def test_masked_ffn_cases(case):
    x = torch.randn(3, 7, 16)
    w1, b1, w2, b2 = _ffn(16, 50, 9, bias=case != "no_bias")
    keep, gate = torch.randperm(50)[:11], None
    if case == "all_kept":
        keep = None
    elif case == "none_kept":
        keep = torch.empty(0, dtype=torch.long)
    elif case == "list_keep_int32_unsorted":
        keep = [49, 0, 7, 3, 22]
    elif case == "token_gates":
        gate = torch.rand(3, 7, 50)           # per-token soft gates over the full hidden width
    elif case == "one_row":
        x = torch.randn(16)
    elif case == "duplicate_keep":
        keep = torch.tensor([5, 5, 1])
    k_arg = torch.tensor(keep, dtype=torch.int32) if case == "list_keep_int32_unsorted" else keep
    out = ops.masked_ffn(x, w1, b1, w2, b2, k_arg, gate, "gelu", backend="cpu")
    ref = masked_ffn_reference(x, w1, b1, w2, b2, keep, gate, "gelu")
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if case == "none_kept":  # no neurons: only the output bias is left
        torch.testing.assert_close(out, b2.expand_as(out))
    if case == "list_keep_int32_unsorted":  # the Python wrapper also takes a list
        out2 = ops.masked_ffn(x, w1, b1, w2, b2, keep, gate, "gelu", backend="cpu")
        torch.testing.assert_close(out2, out, rtol=0, atol=0)


def test_masked_ffn_bfloat16():
    x = torch.randn(2, 13, 32).bfloat16()
    w1, b1, w2, b2 = (t.bfloat16() for t in _ffn(32, 64, 32))
    keep = torch.arange(0, 64, 3)
    out = ops.masked_ffn(x, w1, b1, w2, b2, keep, None, "gelu", backend="cpu")
    ref = masked_ffn_reference(x.double(), w1.double(), b1.double(), w2.double(), b2.double(),
                               keep, None, "gelu")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=3e-2)


def test_masked_ffn_errors():
    op = torch.ops.pyengine.masked_ffn_fwd
    x = torch.randn(4, 16)
    w1, b1, w2, b2 = _ffn(16, 32, 8)
    with pytest.raises(ValueError, match="keep holds index 32 out of range"):
        op(x, w1, b1, w2, b2, torch.tensor([0, 32]), None, "gelu")
    with pytest.raises(ValueError, match="keep holds index -1 out of range"):
        op(x, w1, b1, w2, b2, torch.tensor([-1, 3]), None, "gelu")
    with pytest.raises(TypeError, match="keep must hold int64 or int32"):
        op(x, w1, b1, w2, b2, torch.tensor([0.0, 1.0]), None, "gelu")
    with pytest.raises(ValueError, match="keep must be 1-dim"):
        op(x, w1, b1, w2, b2, torch.tensor([[0, 1]]), None, "gelu")
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        op(x, w1, b1, w2, b2, None, None, "swish")
    with pytest.raises(ValueError, match="shapes do not chain"):
        op(torch.randn(4, 15), w1, b1, w2, b2, None, None, "gelu")
    with pytest.raises(ValueError, match="shapes do not chain"):
        op(x, w1, b1, w2[:, :31], b2, None, None, "gelu")
    with pytest.raises(ValueError, match=r"b1 must be \[32\]"):
        op(x, w1, b1[:5], w2, b2, None, None, "gelu")
    with pytest.raises(ValueError, match=r"b2 must be \[8\]"):
        op(x, w1, b1, w2, b1, None, None, "gelu")
    with pytest.raises(TypeError, match="w1 must have x's dtype"):
        op(x, w1.double(), b1, w2, b2, None, None, "gelu")
    with pytest.raises(TypeError, match="x must be float32"):
        op(x.int(), w1, b1, w2, b2, None, None, "gelu")
    with pytest.raises(ValueError, match="gate must be"):
        op(x, w1, b1, w2, b2, None, torch.rand(31), "gelu")
    with pytest.raises(ValueError, match="does not broadcast"):
        op(x, w1, b1, w2, b2, None, torch.rand(5, 32), "gelu")
    with pytest.raises(RuntimeError, match="w2 must be on x's device"):
        op(x, w1, b1, w2.to("meta"), b2, None, None, "gelu")


# -------------------------------------------------------------------- importance reductions
def _ref_many64(xs, gs):
    out = []
    for x, g in zip(xs, gs):
        C = x.shape[-1]
        xd = x.double().reshape(-1, C)
        r = torch.zeros(3, C, dtype=torch.float64)
        r[0], r[1] = xd.abs().sum(0), (xd * xd).sum(0)
        if g is not None:
            r[2] = (xd * g.double().reshape(-1, C)).abs().sum(0)
        out.append(r)
    return out


def test_importance_reduce_many_matches_reference():
    shapes = [(2, 197, 384), (5, 1), (0, 7), (3, 4, 5, 6), (7,), (40000, 3), (33, 600),
              (2, 197, 6)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    xs, gs = [], []
    for i, s in enumerate(shapes):
        dt = dtypes[i % len(dtypes)]
        xs.append(torch.randn(s).to(dt))
        gs.append(torch.randn(s).to(dt) if i % 3 != 1 else None)
    out = ops.importance_reduce_many(xs, gs, backend="cpu")
    assert len(out) == len(xs)
    for o, r, x, g in zip(out, _ref_many64(xs, gs), xs, gs):
        assert o.shape == (3, x.shape[-1]) and o.dtype == torch.float32 and o.is_contiguous()
        torch.testing.assert_close(o.double(), r, rtol=1e-6, atol=1e-6)  # double accumulation
        torch.testing.assert_close(o, importance_reduce_reference(x, g), rtol=1e-4, atol=1e-3)
    # without gs: zeros in row 2
    out = ops.importance_reduce_many(xs, None, backend="cpu")
    for o, r in zip(out, _ref_many64(xs, [None] * len(xs))):
        torch.testing.assert_close(o.double(), r, rtol=1e-6, atol=1e-6)
        assert (o[2] == 0).all()


def test_importance_reduce_many_non_contiguous_and_mixed_pairs():
    x = torch.randn(64, 197).t()                      # [197, 64], transposed
    g = torch.randn(197, 64).double()                  # float64 g of a float32 x: promoted
    y = torch.randn(4, 50, 64)[:, ::3, 1::2]
    out = ops.importance_reduce_many([x, y], [g, None], backend="cpu")
    ref = _ref_many64([x, y], [g, None])
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.double(), r, rtol=1e-6, atol=1e-6)


def test_importance_reduce_many_empty_and_thread_invariant():
    assert ops.importance_reduce_many([], None, backend="cpu") == []
    out = ops.importance_reduce_many([torch.empty(4, 0), torch.empty(0, 3)], None,
                                     backend="cpu")
    assert out[0].shape == (3, 0) and out[1].shape == (3, 3) and (out[1] == 0).all()
    xs = [torch.randn(5000, 40), torch.randn(3, 8)]
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.importance_reduce_many(xs, xs, backend="cpu")
        torch.set_num_threads(max(2, n))
        many = ops.importance_reduce_many(xs, xs, backend="cpu")
    finally:
        torch.set_num_threads(n)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_importance_reduce_many_errors():
    op = torch.ops.pyengine.importance_reduce_many
    xs = [torch.randn(4, 8), torch.randn(3, 5)]
    with pytest.raises(ValueError, match="entry 1: .*g must have the shape of x"):
        op(xs, [None, torch.randn(3, 4)])
    with pytest.raises(TypeError, match="entry 0: .*x must be a floating tensor"):
        op([torch.ones(4, 8, dtype=torch.int32)], [])
    with pytest.raises(ValueError, match="gs must be empty or have one entry per tensor"):
        op(xs, [None])
    with pytest.raises(ValueError, match="entry 0: .*at least 1 dim"):
        op([torch.tensor(1.0)], [])
    with pytest.raises(RuntimeError, match="all tensors must be on one device"):
        op([torch.randn(2, 3), torch.randn(2, 3, device="meta")], [])
    with pytest.raises(ValueError, match="2 tensors in xs but 1 in gs"):
        ops.importance_reduce_many(xs, [None], backend="cpu")


# ------------------------------------------------------ availability, fakes and tracing
def test_available_and_not_built(monkeypatch):
    for op in ("varlen_attention", "masked_ffn", "importance_reduce_many"):
        assert "cpu" in ops.available_backends(op, "cpu")
        assert ("cuda" in ops.available_backends(op, "cuda")) == _ext.has_cuda_kernels()
    with pytest.raises(ValueError, match="unknown op 'conv'"):
        ops.available_backends("conv", "cpu")
    # pretend pyengine._C failed to load: every csrc backend says why
    monkeypatch.setattr(_ext, "_tried", True)
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_error", "pyengine._C could not be imported (ImportError: nope)")
    assert "cpu" not in ops.available_backends("masked_ffn", "cpu")
    x = torch.randn(2, 4)
    with pytest.raises(ops.BackendNotAvailable, match="backend='cpu' is not available.*nope"):
        ops.importance_reduce_many([x], None, backend="cpu")
    with pytest.raises(ops.BackendNotAvailable, match="nope"):
        ops.varlen_attention(x[None], x[None], x[None], [4], [4], 1.0, backend="cpu")
    w1, b1, w2, b2 = _ffn(4, 8, 4)
    with pytest.raises(ops.BackendNotAvailable, match="nope"):
        ops.masked_ffn(x, w1, b1, w2, b2, None, None, "gelu", backend="cpu")


def test_opcheck_all_ops():
    qk_dims, v_dims = [7, 0, 16], [5, 3, 16]
    q, k, v = _qkv(2, 9, 11, qk_dims, v_dims)
    torch.library.opcheck(torch.ops.pyengine.varlen_attention_fwd.default,
                          (q, k, v, qk_dims, v_dims, [0.3, 1.0, 0.25]))
    x = torch.randn(2, 5, 16)
    w1, b1, w2, b2 = _ffn(16, 24, 8)
    torch.library.opcheck(torch.ops.pyengine.masked_ffn_fwd.default,
                          (x, w1, b1, w2, b2, torch.tensor([1, 4, 9]), torch.rand(24), "silu"))
    torch.library.opcheck(torch.ops.pyengine.masked_ffn_fwd.default,
                          (x, w1, None, w2, None, None, None, "gelu"))
    torch.library.opcheck(torch.ops.pyengine.importance_reduce_many.default,
                          ([torch.randn(3, 4, 5), torch.randn(7, 2).bfloat16()],
                           [torch.randn(3, 4, 5), None]))


def test_torch_compile_fullgraph():
    qk_dims, v_dims = [7, 16], [5, 16]

    def f(q, k, v, x, w1, b1, w2, b2):
        a = torch.ops.pyengine.varlen_attention_fwd(q * 2.0, k, v, qk_dims, v_dims, [0.3, 0.2])
        y = torch.ops.pyengine.masked_ffn_fwd(a, w1, b1, w2, b2, None, None, "gelu")
        s = torch.ops.pyengine.importance_reduce_many([y, a], [])
        return y.sum() + s.sum()

    q, k, v = _qkv(2, 9, 9, qk_dims, v_dims)
    x = torch.randn(2, 9, 21)
    w1, b1, w2, b2 = _ffn(21, 30, 6)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=False)
    args = (q, k, v, x, w1, b1, w2, b2)
    torch.testing.assert_close(compiled(*args), f(*args))
