"""Backend dispatch of the three ops: the auto table, the csrc route (pyengine.ops._csrc), clear
errors, and the Triton custom ops under torch.library checks, torch.compile and torch.export."""
import sys
import types

import pytest
import torch

import pyengine.ops as ops
from pyengine.ops import _dispatch

QK, V = [7, 16, 0], [5, 16, 3]


def _attn_inputs(B=2, N=11, grad=False):
    q = torch.randn(B, N, sum(QK), requires_grad=grad)
    k = torch.randn(B, N, sum(QK), requires_grad=grad)
    v = torch.randn(B, N, sum(V), requires_grad=grad)
    return q, k, v, [0.4, 0.25, 1.0]


def _ffn_inputs():
    x = torch.randn(2, 5, 12)
    w1, b1 = torch.randn(20, 12) * 0.3, torch.randn(20)
    w2, b2 = torch.randn(6, 20) * 0.2, torch.randn(6)
    return x, w1, b1, w2, b2


@pytest.fixture
def fake_csrc(monkeypatch):
    """A stand-in pyengine.ops._csrc that records calls and answers with the references."""
    calls = []
    mod = types.ModuleType("pyengine.ops._csrc")

    def varlen_attention(q, k, v, qk_dims, v_dims, scales, device_kind):
        calls.append(("varlen_attention", device_kind, qk_dims, v_dims, scales))
        return ops.varlen_attention_reference(q, k, v, qk_dims, v_dims, scales)

    def masked_ffn(x, w1, b1, w2, b2, keep, gate, act, device_kind):
        calls.append(("masked_ffn", device_kind, keep, act))
        return ops.masked_ffn_reference(x, w1, b1, w2, b2, keep, gate, act)

    def importance_reduce_many(xs, gs, device_kind):
        calls.append(("importance_reduce_many", device_kind, len(xs)))
        return ops.importance_reduce_many_reference(xs, gs)

    mod.varlen_attention, mod.masked_ffn = varlen_attention, masked_ffn
    mod.importance_reduce_many = importance_reduce_many
    monkeypatch.setitem(sys.modules, "pyengine.ops._csrc", mod)
    monkeypatch.setattr(ops, "_csrc", mod, raising=False)
    monkeypatch.setattr(ops.importance, "_csrc_missing", {})
    return calls


def test_cpu_backend_routes_to_csrc(fake_csrc):
    q, k, v, s = _attn_inputs()
    out = ops.varlen_attention(q, k, v, QK, V, s, backend="cpu")
    torch.testing.assert_close(out, ops.varlen_attention_reference(q, k, v, QK, V, s))
    x, w1, b1, w2, b2 = _ffn_inputs()
    ops.masked_ffn(x, w1, b1, w2, b2, keep=[1, 4], act="relu", backend="cpu")
    ops.importance_reduce_many([x, w1], None, backend="cpu")
    assert fake_csrc == [("varlen_attention", "cpu", QK, V, s),
                         ("masked_ffn", "cpu", [1, 4], "relu"),
                         ("importance_reduce_many", "cpu", 2)]


def test_auto_importance_many_prefers_csrc_when_built(fake_csrc):
    xs = [torch.randn(3, 4), torch.randn(2, 2, 9)]
    got = ops.importance_reduce_many(xs)
    assert fake_csrc == [("importance_reduce_many", "cpu", 2)]
    for a, b in zip(got, ops.importance_reduce_many_reference(xs)):
        torch.testing.assert_close(a, b)


def test_unbuilt_csrc_is_a_clear_error(monkeypatch):
    mod = types.ModuleType("pyengine.ops._csrc")

    def not_built(*args):
        raise NotImplementedError("pyengine._C was built without varlen_attention")

    mod.varlen_attention = mod.masked_ffn = mod.importance_reduce_many = not_built
    monkeypatch.setitem(sys.modules, "pyengine.ops._csrc", mod)
    monkeypatch.setattr(ops, "_csrc", mod, raising=False)
    monkeypatch.setattr(ops.importance, "_csrc_missing", {})
    q, k, v, s = _attn_inputs()
    with pytest.raises(RuntimeError, match="backend='cpu' is not available.*not built"):
        ops.varlen_attention(q, k, v, QK, V, s, backend="cpu")
    x, w1, b1, w2, b2 = _ffn_inputs()
    with pytest.raises(RuntimeError, match="masked_ffn: backend='cpu' is not available"):
        ops.masked_ffn(x, w1, b1, w2, b2, backend="cpu")
    with pytest.raises(RuntimeError, match="importance_reduce_many: backend='cpu' is not avail"):
        ops.importance_reduce_many([x], backend="cpu")
    # auto falls back on the reference when the csrc kernel is not built
    got = ops.importance_reduce_many([x])
    torch.testing.assert_close(got[0], ops.importance_reduce_reference(x))


def test_wrong_device_and_unknown_backend():
    q, k, v, s = _attn_inputs()
    with pytest.raises(RuntimeError, match="needs tensors on a cuda device, got cpu"):
        ops.varlen_attention(q, k, v, QK, V, s, backend="cuda")
    x, w1, b1, w2, b2 = _ffn_inputs()
    with pytest.raises(RuntimeError, match="needs tensors on a cuda device"):
        ops.masked_ffn(x, w1, b1, w2, b2, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        ops.masked_ffn(x, w1, b1, w2, b2, backend="gpu")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        ops.importance_reduce_many([x], backend="gpu")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, s = _attn_inputs()
    with pytest.raises(RuntimeError, match="need CUDA tensors.*TRITON_INTERPRET=1"):
        ops.varlen_attention(q, k, v, QK, V, s, backend="triton")
    x, w1, b1, w2, b2 = _ffn_inputs()
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        ops.masked_ffn(x, w1, b1, w2, b2, backend="triton")
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        ops.importance_reduce_many([x], backend="triton")


def test_auto_follows_the_table(monkeypatch):
    pytest.importorskip("triton")
    # honest default: no GPU timings yet, so auto is the reference everywhere
    assert set(_dispatch.AUTO.values()) == {"torch"}
    q, k, v, s = _attn_inputs()
    calls = []
    real = torch.ops.pyengine.varlen_attention_triton

    class Spy:
        def __call__(self, *a):
            calls.append(len(a))
            return real(*a)

    monkeypatch.setattr(torch.ops.pyengine, "varlen_attention_triton", Spy())
    ops.varlen_attention(q, k, v, QK, V, s)
    assert calls == []
    monkeypatch.setitem(_dispatch.AUTO, ("varlen_attention", "cpu"), "triton")
    out = ops.varlen_attention(q, k, v, QK, V, s)
    assert calls == [6]
    torch.testing.assert_close(out, ops.varlen_attention_reference(q, k, v, QK, V, s),
                               rtol=1e-5, atol=1e-5)


def test_triton_custom_ops_pass_opcheck():
    pytest.importorskip("triton")
    q, k, v, s = _attn_inputs(B=1, N=5, grad=True)
    torch.library.opcheck(torch.ops.pyengine.varlen_attention_triton, (q, k, v, QK, V, s),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    x, w1, b1, w2, b2 = _ffn_inputs()
    args = [t.requires_grad_() for t in (x, w1, b1, w2, b2)]
    keep = torch.tensor([3, 0, 9], dtype=torch.int32)
    gate = torch.rand(20, requires_grad=True)
    torch.library.opcheck(torch.ops.pyengine.masked_ffn_triton,
                          (*args, keep, gate, "gelu"),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    torch.library.opcheck(torch.ops.pyengine.importance_reduce_many_triton,
                          ([x.detach(), w1.detach()], [None, torch.randn(20, 12)]))


def test_triton_flop_formula_matches_reference():
    pytest.importorskip("triton")
    from pyengine.cost.flop_count import count_flops
    q, k, v, s = _attn_inputs()
    counts = [count_flops(ops.varlen_attention, q, k, v, QK, V, s, backend=b)
              for b in ("triton", "torch")]
    assert counts[0] == counts[1] == 2 * 2 * 11 * 11 * (7 + 5 + 16 + 16)


class _Tiny(torch.nn.Module):
    """Attention + masked FFN through the Triton custom ops (what a gated block would run)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(12, 2 * sum(QK) + sum(V))
        self.w1, self.b1 = torch.nn.Parameter(torch.randn(20, 12) * 0.3), None
        self.w2 = torch.nn.Parameter(torch.randn(12, 20) * 0.2)
        self.b2 = torch.nn.Parameter(torch.zeros(12))
        self.gate = torch.nn.Parameter(torch.rand(20))
        self.register_buffer("keep", torch.tensor([0, 2, 3, 5, 8, 13, 19], dtype=torch.int32))

    def forward(self, x):
        q, k, v = self.qkv(x).split([sum(QK), sum(QK), sum(V)], dim=-1)
        a = ops.varlen_attention(q, k, v, QK, V, [0.4, 0.25, 1.0], backend="triton")
        x = x + torch.nn.functional.pad(a, (0, 12 - a.shape[-1]))
        return x + ops.masked_ffn(x, self.w1, self.b1, self.w2, self.b2, keep=self.keep,
                                  gate=self.gate, backend="triton")


def test_triton_ops_compile_fullgraph_and_export():
    pytest.importorskip("triton")
    m = _Tiny()
    x = torch.randn(2, 9, 12)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    # training through the compiled graph: the backward custom ops run
    out.square().sum().backward()
    got = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    eager.square().sum().backward()
    for a, b in zip(got, (p.grad for p in m.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    ep = torch.export.export(m, (x,))
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.pyengine.varlen_attention_triton.default in targets
    assert torch.ops.pyengine.masked_ffn_triton.default in targets
    x2 = torch.randn(2, 9, 12)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x2), m(x2), rtol=1e-5, atol=1e-5)
