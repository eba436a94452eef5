"""Torch references of the ops against naive float64 per-head computations."""
import math

import pytest
import torch

from pyengine import ops

from _naive import naive_varlen


@pytest.mark.parametrize("qk_dims,v_dims,N", [
    ([1, 7, 16, 40, 64], [64, 40, 16, 7, 1], 13),
    ([7, 7, 7, 40, 40, 1], [7, 7, 7, 40, 40, 1], 197),
    ([0, 16, 0], [5, 16, 3], 9),           # zero q/k dims: uniform attention
    ([40, 7, 40], [40, 7, 40], 1),         # runs that are not adjacent; one token
])
def test_varlen_attention_reference(qk_dims, v_dims, N):
    B = 2
    q = torch.randn(B, N, sum(qk_dims))
    k = torch.randn(B, N, sum(qk_dims))
    v = torch.randn(B, N, sum(v_dims))
    scales = [1 / math.sqrt(max(d, 1)) for d in qk_dims]
    want = naive_varlen(q, k, v, qk_dims, v_dims, scales)
    got = ops.varlen_attention(q, k, v, qk_dims, v_dims, scales)
    assert got.shape == (B, N, sum(v_dims))
    assert (got.double() - want).abs().max() < 1e-5


def test_varlen_attention_custom_op_and_autograd():
    qk_dims, v_dims = [1, 7, 7, 16], [3, 7, 7, 1]
    q = torch.randn(2, 5, sum(qk_dims), dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, sum(qk_dims), dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 5, sum(v_dims), dtype=torch.float64, requires_grad=True)
    scales = [0.5, 0.25, 0.25, 0.125]
    op = torch.ops.pyengine.varlen_attention
    assert torch.autograd.gradcheck(lambda a, b, c: op(a, b, c, qk_dims, v_dims, scales), (q, k, v))
    torch.library.opcheck(op, (q, k, v, qk_dims, v_dims, scales))


def test_varlen_attention_bad_inputs():
    q = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="sum\\(qk_dims\\)"):
        ops.varlen_attention(q, q, q, [4, 3], [4, 4], 1.0)
    with pytest.raises(ValueError, match="2 qk dims but 1 v dims"):
        ops.varlen_attention(q, q, q, [4, 4], [8], 1.0)
    with pytest.raises(ValueError, match="unknown backend"):
        ops.varlen_attention(q, q, q, [8], [8], 1.0, backend="fast")
    with pytest.raises(RuntimeError, match="needs tensors on a cuda device"):
        ops.varlen_attention(q, q, q, [8], [8], 1.0, backend="cuda")


@pytest.mark.parametrize("keep", [None, [0, 3, 4], []])
def test_masked_ffn_reference(keep):
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    w1, b1 = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    w2, b2 = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    gate = torch.rand(10, dtype=torch.float64)
    idx = list(range(10)) if keep is None else keep
    mask = torch.zeros(10, dtype=torch.float64)
    mask[idx] = 1
    want = (torch.nn.functional.gelu(x @ w1.T + b1) * gate * mask) @ w2.T + b2
    got = ops.masked_ffn(x, w1, b1, w2, b2, keep=keep, gate=gate)
    assert (got - want).abs().max() < 1e-10


def test_varlen_attention_custom_op_flops_match_reference():
    from pyengine.cost.flop_count import count_flops
    qk_dims, v_dims = [0, 7, 16, 16], [3, 7, 16, 16]
    q, k = torch.randn(2, 11, sum(qk_dims)), torch.randn(2, 11, sum(qk_dims))
    v = torch.randn(2, 11, sum(v_dims))
    counts = [count_flops(f, q, k, v, qk_dims, v_dims, [0.3] * 4)
              for f in (torch.ops.pyengine.varlen_attention, ops.varlen_attention_reference)]
    assert counts[0] == counts[1] == 2 * 2 * 11 * 11 * (7 + 7 + 16 + 16 + 16 + 16)
