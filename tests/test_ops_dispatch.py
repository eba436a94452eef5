"""Backend dispatch of the three ops: one rule for "auto" (priority lists, backends with reasons
skipped), the csrc route, errors that list every backend's reasons, the gradient guard,
available_backends, and the Triton custom ops under torch.library checks, torch.compile and
torch.export."""
import importlib.util
import os

import pytest
import torch

import pyengine.ops as ops
from pyengine.ops import _ext, priority
from pyengine.ops.importance_reduce import backends as imp_backends
from pyengine.ops.masked_ffn import backends as ffn_backends
from pyengine.ops.varlen_attention import backends as attn_backends

QK, V = [7, 16, 0], [5, 16, 3]
OPS = ("varlen_attention", "masked_ffn", "importance_reduce", "importance_reduce_many")


def _attn_inputs(B=2, N=11, grad=False):
    q = torch.randn(B, N, sum(QK), requires_grad=grad)
    k = torch.randn(B, N, sum(QK), requires_grad=grad)
    v = torch.randn(B, N, sum(V), requires_grad=grad)
    return q, k, v, [0.4, 0.25, 1.0]


def _ffn_inputs(grad=False):
    x = torch.randn(2, 5, 12, requires_grad=grad)
    w1, b1 = torch.randn(20, 12) * 0.3, torch.randn(20)
    w2, b2 = torch.randn(6, 20) * 0.2, torch.randn(6)
    return x, w1, b1, w2, b2


def _call(op, backend="auto", grad=False):
    """Run ``op`` on fresh inputs; (output, reference output, the inputs that require grad)."""
    if op == "varlen_attention":
        q, k, v, s = _attn_inputs(grad=grad)
        return (ops.varlen_attention(q, k, v, QK, V, s, backend=backend),
                ops.varlen_attention_reference(q, k, v, QK, V, s), [q, k, v])
    x, w1, b1, w2, b2 = _ffn_inputs(grad=grad)
    if op == "masked_ffn":
        return (ops.masked_ffn(x, w1, b1, w2, b2, keep=[1, 4], act="relu", backend=backend),
                ops.masked_ffn_reference(x, w1, b1, w2, b2, [1, 4], None, "relu"), [x])
    if op == "importance_reduce":
        return (ops.importance_reduce(x, backend=backend), ops.importance_reduce_reference(x),
                [x])
    return (ops.importance_reduce_many([x, w1], None, backend=backend),
            ops.importance_reduce_many_reference([x, w1]), [x])


def _listed(out):
    return out if isinstance(out, list) else [out]


_CSRC = {"varlen_attention": attn_backends._Csrc, "masked_ffn": ffn_backends._Csrc,
         "importance_reduce": imp_backends._Csrc, "importance_reduce_many": imp_backends._CsrcMany}


@pytest.fixture
def fake_csrc(monkeypatch):
    """The csrc backends of every op, built or not, replaced by recorders that answer with the
    references."""
    calls = []

    def varlen_attention(self, q, k, v, qk_dims, v_dims, scales):
        calls.append(("varlen_attention", self.name, qk_dims, v_dims, scales))
        return ops.varlen_attention_reference(q, k, v, qk_dims, v_dims, scales)

    def masked_ffn(self, x, w1, b1, w2, b2, keep, gate, act):
        calls.append(("masked_ffn", self.name, keep, act))
        return ops.masked_ffn_reference(x, w1, b1, w2, b2, keep, gate, act)

    def importance_reduce(self, x, g):
        calls.append(("importance_reduce", self.name))
        return ops.importance_reduce_reference(x, g)

    def importance_reduce_many(self, xs, gs):
        calls.append(("importance_reduce_many", self.name, len(xs)))
        return ops.importance_reduce_many_reference(xs, gs)

    for op, fn in (("varlen_attention", varlen_attention), ("masked_ffn", masked_ffn),
                   ("importance_reduce", importance_reduce),
                   ("importance_reduce_many", importance_reduce_many)):
        monkeypatch.setattr(_CSRC[op], "run", fn)
        monkeypatch.setattr(_CSRC[op], "unavailable", lambda self: None)
    return calls


def _no_extension(monkeypatch, error="pyengine._C not built (ImportError: nope)"):
    """Pretend pyengine._C failed to load."""
    monkeypatch.setattr(_ext, "_tried", True)
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_error", error)


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
    _no_extension(monkeypatch)
    q, k, v, s = _attn_inputs()
    with pytest.raises(RuntimeError, match="backend='cpu' is not available.*not built"):
        ops.varlen_attention(q, k, v, QK, V, s, backend="cpu")
    x, w1, b1, w2, b2 = _ffn_inputs()
    with pytest.raises(RuntimeError, match="masked_ffn: backend='cpu' is not available"):
        ops.masked_ffn(x, w1, b1, w2, b2, backend="cpu")
    with pytest.raises(RuntimeError, match="importance_reduce_many: backend='cpu' is not avail"):
        ops.importance_reduce_many([x], backend="cpu")
    with pytest.raises(ops.BackendNotAvailable, match="nope"):
        ops.importance_reduce(x, backend="cpu")
    # auto falls back on the reference when the csrc kernel is not built
    got = ops.importance_reduce_many([x])
    torch.testing.assert_close(got[0], ops.importance_reduce_reference(x))
    torch.testing.assert_close(ops.importance_reduce(x), ops.importance_reduce_reference(x))


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


def test_auto_follows_the_priority_list(monkeypatch):
    pytest.importorskip("triton")
    # honest default: no GPU timings yet, so auto is the reference for attention and the FFN
    # on CUDA; on the CPU attention runs the C++ kernel first (committed CPU timings)
    assert {priority.auto_order(op, "cuda") for op in ("varlen_attention", "masked_ffn")} \
        == {("torch",)}
    assert priority.auto_order("masked_ffn", "cpu") == ("torch",)
    assert priority.auto_order("varlen_attention", "cpu") == ("cpu", "torch")
    # every list ends with the reference, so auto always has a backend
    assert all(order[-1] == "torch" for lists in priority.PRIORITY.values()
               for order in lists.values())
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
    monkeypatch.setitem(priority.PRIORITY["varlen_attention"], "cpu", ("triton", "torch"))
    out = ops.varlen_attention(q, k, v, QK, V, s)
    assert calls == [6]
    torch.testing.assert_close(out, ops.varlen_attention_reference(q, k, v, QK, V, s),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", OPS)
def test_auto_is_one_rule_for_every_op(op, fake_csrc, monkeypatch):
    # the first backend of the list without reasons runs: cuda (tensors on cpu) is skipped
    monkeypatch.setitem(priority.PRIORITY, op, {"cpu": ("cuda", "cpu", "torch")})
    out, ref, _ = _call(op)
    assert [c[:2] for c in fake_csrc] == [(op, "cpu")]
    for a, b in zip(_listed(out), _listed(ref)):
        torch.testing.assert_close(a, b)
    # a backend that is not available is skipped the same way: on to the reference
    monkeypatch.setattr(_CSRC[op], "unavailable", lambda self: "not built here")
    fake_csrc.clear()
    _call(op)
    assert fake_csrc == []
    # the order of the list decides, not the order of the backends
    monkeypatch.setattr(_CSRC[op], "unavailable", lambda self: None)
    monkeypatch.setitem(priority.PRIORITY, op, {"cpu": ("torch", "cpu")})
    _call(op)
    assert fake_csrc == []
    # a device kind without a list runs the reference
    assert priority.auto_order(op, "mps") == ("torch",)


def test_no_backend_error_lists_every_backends_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _no_extension(monkeypatch)
    monkeypatch.setitem(priority.PRIORITY["varlen_attention"], "cpu", ("triton", "cuda", "cpu"))
    q, k, v, s = _attn_inputs()
    with pytest.raises(ops.BackendNotAvailable) as e:
        ops.varlen_attention(q, k, v, QK, V, s)
    msg = str(e.value)
    assert msg.startswith("varlen_attention: no backend for these inputs: ")
    assert "torch: not in auto's priority list for cpu (triton, cuda, cpu)" in msg
    assert "triton: the Triton kernels need CUDA tensors (got cpu)" in msg
    assert "cuda: needs tensors on a cuda device, got cpu, pyengine._C not built" in msg
    assert "cpu: pyengine._C not built (ImportError: nope)" in msg
    assert isinstance(e.value, RuntimeError)


def test_explicit_backend_error_lists_its_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, s = _attn_inputs()
    with pytest.raises(ops.BackendNotAvailable,
                       match=r"^varlen_attention: backend='triton' is not available: the Triton "
                             r"kernels need CUDA tensors \(got cpu\).*; takes float32, float16, "
                             r"bfloat16 tensors, got float64$"):
        ops.varlen_attention(q.double(), k.double(), v.double(), QK, V, s, backend="triton")
    # a backend that only fails on dtypes is also a TypeError, as the kernels raised before
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TypeError, match="takes float32, float16, bfloat16 tensors, got float64"):
        ops.varlen_attention(q.double(), k.double(), v.double(), QK, V, s, backend="triton")


@pytest.mark.parametrize("op", OPS)
def test_gradient_guard(op, monkeypatch):
    # an explicit backend without a backward refuses inputs that require grad, naming those
    # that have one, instead of returning an output whose gradients are silently None
    if not _ext.has_kernel(_CSRC[op].kernel, "cpu"):
        pytest.skip(f"pyengine._C has no cpu {_CSRC[op].kernel}: {_ext.load_error()}")
    grads = "torch, triton" if op in ("varlen_attention", "masked_ffn") else "torch"
    with pytest.raises(ops.BackendNotAvailable,
                       match=f"backend='cpu' is not available: has no backward and an input "
                             f"requires grad \\(backends with gradients: {grads}\\)"):
        _call(op, "cpu", grad=True)
    # without grad mode (inference) the same call runs the kernel
    with torch.no_grad():
        out, ref, _ = _call(op, "cpu", grad=True)
    for a, b in zip(_listed(out), _listed(ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # auto with a backward-less first choice runs the reference, and the gradients arrive
    monkeypatch.setitem(priority.PRIORITY, op, {"cpu": ("cpu", "torch")})
    out, ref, leaves = _call(op, grad=True)
    got = torch.autograd.grad(sum(o.sum() for o in _listed(out)), leaves)
    assert all(g is not None and torch.isfinite(g).all() for g in got)
    want = torch.autograd.grad(sum(r.sum() for r in _listed(ref)), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("op", OPS)
def test_available_backends_for_every_op(op, monkeypatch):
    kernel = _CSRC[op].kernel
    cpu = ops.available_backends(op, "cpu")
    assert cpu[0] == "torch"
    assert ("cpu" in cpu) == _ext.has_kernel(kernel, "cpu")
    assert "cuda" not in cpu
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    assert ("triton" in cpu) == (importlib.util.find_spec("triton") is not None and interpret)
    cuda = ops.available_backends(op, "cuda")
    assert "cpu" not in cuda and ("cuda" in cuda) == _ext.has_kernel(kernel, "cuda")
    report = ops.supported_backends(op, "cpu")
    assert list(report) == ["torch", "triton", "cuda", "cpu"]
    assert report["torch"] == [] and "needs tensors on a cuda device" in report["cuda"][0]
    # without the extension: only the reference (and Triton's interpreter, switched off here)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _no_extension(monkeypatch)
    assert ops.available_backends(op, "cpu") == ["torch"]
    assert ops.supported_backends(op, "cpu")["cpu"] == ["pyengine._C not built (ImportError: nope)"]
    with pytest.raises(ValueError, match="unknown op 'conv'"):
        ops.available_backends("conv")


def test_describe_reports_every_op():
    text = ops.describe()
    assert text.splitlines()[0].startswith("pyengine._C: ")
    for op in OPS:
        assert f"\n{op}\n  cpu: auto -> " in text
    assert "  cpu: auto -> torch" in text


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
