"""Head layouts (pyengine.compile(layout=...)): every layout computes what the hard-gated model
computes, the planner follows the latency table, save/load keeps the layout, and the cost model
counts what the padded buckets compute."""
import json
import random

import pytest
import torch

import pyengine
from pyengine.cost.flop_count import count_flops
from pyengine.cost.latency_table import table_path
from pyengine.models.vit.compact import CompactAttention
from pyengine.models.vit.cost import total_macs
from pyengine.models.vit.layout import (Bucket, BlockLayout, _partitions, computed_spec,
                                        exact_block, layout_of, padded_block, plan, plan_block,
                                        strip_layout)
from pyengine.models.vit.padded import pad_heads
from pyengine.structure.spec import Spec, SpecError, make_block

from _latency import fake_table
from _specs import random_spec

NAME = "vit_tiny_patch16_224"
KW = dict(depth=4, img_size=32, patch_size=8, num_classes=7)   # 17 tokens, 3 heads of 64


def _gated(dtype=torch.float64, **kw):
    model = pyengine.create_model(NAME, **{**KW, **kw}).eval().to(dtype)
    return pyengine.gate(model)


def _attn_layers(model):
    return [b.attn for b in model.blocks if isinstance(b.attn, CompactAttention)]


# tables that make the planner's choice plain
def merge_favoured(g, **kw):     # runs are expensive: one bucket per layer wins
    return fake_table(g, runs=lambda be, b, k: 5.0 * (k - 1), **kw)


def exact_favoured(g, **kw):     # runs are free, only work costs: the exact layout wins
    return fake_table(g, runs=lambda be, b, k: 0.0,
                      attn=lambda be, b, h, qk, v: 1e-4 * b * h * (qk + v + 1), **kw)


def _install(table, monkeypatch, tmp_path):
    """Make ``table`` the cached CPU float64 table (what compile reads)."""
    monkeypatch.setenv("PYENGINE_CACHE", str(tmp_path))
    table.save(table_path("cpu", table.dtype))


@pytest.mark.parametrize("seed", range(5))
def test_every_layout_equals_the_hard_gated_model(seed, tmp_path, monkeypatch):
    gated = _gated(num_heads=6)   # head dim 32
    g = pyengine.geometry(gated)
    # head dims 1, 7, 16, 32, q/k dims 0, blocks without attention or FFN
    s = random_spec(g, seed, model=NAME, p_head=0.8)
    pyengine.apply(gated, s)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = gated(x)
    _install(merge_favoured(g, dtype="float64"), monkeypatch, tmp_path)
    compacts = {lay: pyengine.compile(gated, layout=lay).eval()
                for lay in ("exact", "padded", "auto")}
    for lay, c in compacts.items():
        with torch.no_grad():
            got = c(x)
        assert (got - want).abs().max().item() <= 1e-10, lay
        assert layout_of(c.pyengine_spec).mode == lay
        assert pyengine.spec(c) == s    # the structure is the spec's, whatever the layout
        # the cost model counts what the padded buckets compute, as torch counts it
        assert pyengine.cost(c, batch=3).flops == count_flops(c, x), lay
    # exact pads nothing; padded runs one bucket per layer at the layer maxima
    for a in _attn_layers(compacts["exact"]):
        assert a.qk_dims == a.kept_qk and a.v_dims == a.kept_v
    for a in _attn_layers(compacts["padded"]):
        assert len(set(a.qk_dims)) == 1 and len(set(a.v_dims)) == 1
        assert a.qk_dims[0] == max(a.kept_qk) and a.v_dims[0] == max(a.kept_v)
    # with runs this expensive, auto merges every layer into one bucket too
    for a in _attn_layers(compacts["auto"]):
        assert len(a.layout.buckets) == 1
    macs = {lay: pyengine.cost(c).macs for lay, c in compacts.items()}
    assert macs["exact"] == total_macs(s) <= macs["auto"]


def test_auto_keeps_the_exact_layout_when_runs_cost_nothing(tmp_path, monkeypatch):
    gated = _gated()
    g = pyengine.geometry(gated)
    s = random_spec(g, 3, model=NAME, p_head=1.0, p_no_attn=0.0)
    pyengine.apply(gated, s)
    _install(exact_favoured(g, dtype="float64"), monkeypatch, tmp_path)
    c = pyengine.compile(gated)
    assert [a.layout.buckets for a in _attn_layers(c)] == \
        [exact_block(b).buckets for b in s.blocks if b.has_attn]
    assert pyengine.cost(c).macs == total_macs(s)


def test_off_without_a_table_is_exact_and_says_so():
    gated = _gated()
    s = random_spec(pyengine.geometry(gated), 1, model=NAME)
    pyengine.apply(gated, s)
    c = pyengine.compile(gated)   # PYENGINE_LATENCY=off in the test suite, empty cache
    lay = layout_of(c.pyengine_spec)
    assert lay.mode == "auto" and "measuring is off" in lay.note
    assert list(lay.blocks) == [exact_block(b) for b in s.blocks]


def test_planner_finds_the_best_grouping():
    # every grouping of <= 7 shapes is tried: compare with brute force on a random objective
    rng = random.Random(0)
    block = make_block([(0, range(3), range(5)), (1, range(7), range(2)),
                        (2, range(3), range(5)), (3, range(1), range(9)), (4, (), range(4))], [])
    cost = {}

    def objective(shapes, backend):
        key = (tuple(sorted(shapes)), backend)
        if key not in cost:
            cost[key] = rng.random()
        return cost[key]

    bl, val = plan_block(block, 16, objective, ["torch"], "torch", min_gain=0.0, grow=False)
    groups = {}
    for h in block.heads:
        groups.setdefault((len(h.qk), len(h.v)), []).append(h.index)
    items = [(len(v), qk, vv) for (qk, vv), v in groups.items()]
    best = float("inf")
    for part in _partitions(items):
        shapes = {}
        for p in part:
            k = (max(i[1] for i in p), max(i[2] for i in p))
            shapes[k] = shapes.get(k, 0) + sum(i[0] for i in p)
        best = min(best, objective(tuple((n, q, v) for (q, v), n in shapes.items()), "torch"))
    assert val == pytest.approx(best)
    assert sorted(bl.order) == [0, 1, 2, 3, 4]


def test_planner_margin_backends_and_widths():
    block = make_block([(0, range(24), range(24)), (1, range(40), range(40))], [])

    def objective(shapes, backend):
        # a width of 24 or 40 is slow, 32 and 64 are fast; backend "cpu" is 10% faster
        fast = (32, 64)
        t = sum(n * (1.0 if q in fast and v in fast else 3.0) for n, q, v in shapes)
        t += 0.5 * len(shapes)
        return t * (0.9 if backend == "cpu" else 1.0)

    bl, _ = plan_block(block, 64, objective, ["torch", "cpu"], "torch", widths=[8, 32, 64])
    assert bl.backend == "cpu"
    assert {(b.qk, b.v) for b in bl.buckets} <= {(32, 32), (64, 64)}
    assert all(b.qk >= 24 for b in bl.buckets)
    # unequal q/k and v widths are slow (no fused kernel): the planner pads to equal ones
    one = make_block([(0, range(24), range(32))], [])
    bl, _ = plan_block(one, 64, lambda sh, b: sum(n * (q + v) * (1 if q == v else 3)
                                                  for n, q, v in sh), ["torch"], "torch")
    assert [(b.qk, b.v) for b in bl.buckets] == [(32, 32)]
    # below the margin the exact layout on the baseline backend stays
    bl, _ = plan_block(block, 64, lambda s, b: 1.0 - 0.01 * (len(s) == 1), ["torch"], "torch",
                       min_gain=0.02)
    assert bl.buckets == exact_block(block).buckets and bl.backend == "torch"


def test_greedy_planner_on_many_shapes():
    # 10 distinct shapes: greedy merging; never worse than exact or one bucket
    heads = [(i, range(1 + i), range(10 - i)) for i in range(10)]
    block = make_block(heads, [])

    def objective(shapes, backend):
        return sum(n * (q + v) for n, q, v in shapes) * 0.01 + len(shapes) * 0.3

    bl, val = plan_block(block, 16, objective, ["torch"], "torch", min_gain=0.0)
    assert sorted(bl.order) == list(range(10))
    exact = objective(tuple(exact_block(block).shapes), "torch")
    one = objective(tuple(padded_block(block).shapes), "torch")
    assert val <= min(exact, one) + 1e-12


def test_planned_backend_runs_only_where_it_was_planned(tmp_path, monkeypatch):
    gated = _gated()
    g = pyengine.geometry(gated)
    s = random_spec(g, 2, model=NAME, p_head=1.0, p_no_attn=0.0)
    pyengine.apply(gated, s)
    # a table where the "cpu" backend is much faster
    t = fake_table(g, candidates=("torch", "cpu"), dtype="float64",
                   attn=lambda be, b, h, qk, v: (0.1 if be == "cpu" else 1.0) * h * (qk + v + 1))
    spec = plan(pyengine.spec(gated), "auto", "cpu", torch.float64, table=t)
    assert all(bl.backend == "cpu" for bl in layout_of(spec).blocks if bl is not None)
    _install(t, monkeypatch, tmp_path)
    c = pyengine.compile(gated).eval()
    from pyengine.ops import available_backends
    cpu_ok = "cpu" in available_backends("varlen_attention", "cpu")
    for a in _attn_layers(c):
        assert a.planned_backend == "cpu" and a.planned_device == "cpu"
        assert a.run_backend("cpu") == ("cpu" if cpu_ok else "auto")
        assert a.run_backend("cuda") == "auto"   # planned for the CPU only
        assert "planned_backend=cpu on cpu" in repr(a)
        a.backend = "torch"                        # an explicit backend wins
        assert a.run_backend("cpu") == "torch"


def test_save_load_keeps_the_layout(tmp_path, monkeypatch):
    gated = _gated(torch.float32)
    g = pyengine.geometry(gated)
    s = random_spec(g, 4, model=NAME, p_head=1.0)
    pyengine.apply(gated, s)
    _install(merge_favoured(g), monkeypatch, tmp_path / "cache")
    c = pyengine.compile(gated).eval()
    assert any(a.qk_dims != a.kept_qk or a.v_dims != a.kept_v for a in _attn_layers(c))
    pyengine.save(c, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "spec.json").read_text())
    assert saved["meta"]["layout"]["mode"] == "auto"
    loaded = pyengine.load(tmp_path / "m")
    assert repr(loaded) == repr(c)
    assert layout_of(loaded.pyengine_spec) == layout_of(c.pyengine_spec)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), c(x))
    assert pyengine.cost(loaded).macs == pyengine.cost(c).macs
    # a hand-edited layout that does not fit the structure is refused with its place named
    i = next(i for i, b in enumerate(saved["meta"]["layout"]["blocks"]) if b)
    saved["meta"]["layout"]["blocks"][i]["buckets"][0]["qk"] = 0 if \
        max(len(h["qk"]) for h in saved["blocks"][i]["heads"]) else 99
    # (the manifest rewritten with it, or load would refuse the edited file as damaged)
    from pyengine.io.manifest import manifest_bytes
    d = tmp_path / "m"
    (d / "spec.json").write_text(json.dumps(saved))
    (d / "manifest.json").write_bytes(manifest_bytes(
        {n: (d / n).read_bytes() for n in ("model.safetensors", "spec.json", "config.json")}))
    with pytest.raises(SpecError, match=rf"meta.layout.blocks\[{i}\].buckets\[0\]"):
        pyengine.load(tmp_path / "m")


def test_layout_validation_and_helpers():
    g = pyengine.geometry(_gated())
    s = random_spec(g, 6, model=NAME, p_head=1.0, p_no_attn=0.0)
    sp = plan(s, "padded")
    assert strip_layout(sp).meta.get("layout") is None and strip_layout(sp) == s
    cs = computed_spec(sp)
    for b, pb in zip(cs.blocks, sp.blocks):
        assert {h.index for h in b.heads} == {h.index for h in pb.heads}
        assert len({(len(h.qk), len(h.v)) for h in b.heads}) <= 1
    assert pyengine.cost(sp).macs == total_macs(cs) >= total_macs(s)
    with pytest.raises(ValueError, match="layout must be one of"):
        plan(s, "fast")
    with pytest.raises(ValueError, match="layout must be one of"):
        pyengine.compile(pyengine.apply(_gated(), s), layout="fast")
    bad = sp.to_dict()
    blk = next(i for i, b in enumerate(bad["meta"]["layout"]["blocks"]) if b)
    bad["meta"]["layout"]["blocks"][blk]["buckets"][0]["heads"].pop()
    with pytest.raises(SpecError, match="each exactly once"):
        layout_of(Spec.from_dict(bad))
    bad["meta"]["layout"]["blocks"] = []
    with pytest.raises(SpecError, match="one per block"):
        layout_of(Spec.from_dict(bad))


def test_padded_baseline_of_a_planned_model(tmp_path, monkeypatch):
    # the bench's padded peer is built from a planned compact model: still the same function,
    # costed at what it computes
    gated = _gated()
    g = pyengine.geometry(gated)
    s = random_spec(g, 8, model=NAME)
    pyengine.apply(gated, s)
    t = fake_table(g, dtype="float64", runs=lambda be, b, k: 2.0 * (k - 1),
                   attn=lambda be, b, h, qk, v: h * (1 if qk in (0, 8, 64) else 5) * (1 + v / 64))
    _install(t, monkeypatch, tmp_path)
    c = pyengine.compile(gated).eval()
    p = pad_heads(c).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert (p(x) - c(x)).abs().max().item() <= 1e-10
    assert pyengine.cost(p, batch=2).flops == count_flops(p, x)


def test_bucket_layout_round_trip():
    bl = BlockLayout((Bucket((2, 0), 8, 16), Bucket((1,), 64, 64)), "torch")
    assert bl.order == [2, 0, 1] and bl.qk_dims == [8, 8, 64] and bl.v_dims == [16, 16, 64]
    assert bl.shapes == [(2, 8, 16), (1, 64, 64)] and bl.describe() == "2x8/16+1x64/64"


@pytest.mark.skipif(not __import__("pyengine.ops._ext", fromlist=["x"]).available(),
                    reason="pyengine._C is not built")
def test_a_planned_inference_backend_gives_way_while_training():
    # a layout planned for the C++ CPU kernel (forward only) must not stop fine-tuning or an
    # evaluation with gradients on: training runs an autograd backend, with the same gradients
    gated = _gated(torch.float32)
    pyengine.apply(gated, random_spec(pyengine.geometry(gated), 3, model=NAME, p_head=1.0))
    planned = pyengine.compile(gated, layout="exact").train()
    plain = pyengine.compile(gated, layout="exact").train()
    for a in _attn_layers(planned):
        a.planned_backend, a.planned_device = "cpu", "cpu"
        assert a.run_backend("cpu") == "cpu" and a.run_backend("cpu", True) == "auto"
    x = torch.randn(2, 3, 32, 32)
    planned(x).square().sum().backward()
    plain(x).square().sum().backward()
    for (n, p), q in zip(planned.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    with torch.no_grad():  # inference keeps the planned kernel
        torch.testing.assert_close(planned.eval()(x), plain.eval()(x), rtol=1e-4, atol=1e-5)


def test_compact_attention_picks_its_backend_once_per_kind_of_input():
    """The layer checks its inputs and picks the op's backend once per device, dtype, shape,
    grad mode and backend setting, then calls it directly: outputs and gradients stay those of
    the torch reference whatever was picked before."""
    from pyengine.ops import available_backends
    from pyengine.ops.varlen_attention import varlen_attention_reference
    from pyengine.structure.spec import Head
    torch.manual_seed(0)
    dims = [(1, 7), (7, 1), (40, 40), (0, 5)]          # odd widths, a zero-q/k head
    heads = [Head(i, tuple(range(a)), tuple(range(b))) for i, (a, b) in enumerate(dims)]
    m = CompactAttention(48, heads, 0.3).double()

    def reference(x):
        q, k, v = m.qkv(x).split(m.splits, dim=-1)
        return m.proj(varlen_attention_reference(q, k, v, m.qk_dims, m.v_dims, 0.3))

    x = torch.randn(2, 9, 48, dtype=torch.float64)
    with torch.no_grad():
        want = reference(x)
        for _ in range(2):
            torch.testing.assert_close(m(x), want, rtol=1e-9, atol=1e-9)
        assert len(m._runners) == 1
        x3 = torch.randn(3, 5, 48, dtype=torch.float64)
        torch.testing.assert_close(m(x3), reference(x3), rtol=1e-9, atol=1e-9)
        assert len(m._runners) == 2
        m.backend = "torch"                             # a new setting is honoured
        torch.testing.assert_close(m(x), want, rtol=1e-9, atol=1e-9)
        assert len(m._runners) == 3
    m.backend = "auto"
    xg = x.clone().requires_grad_(True)
    m(xg).square().sum().backward()
    xr = x.clone().requires_grad_(True)
    reference(xr).square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-9, atol=1e-9)
    if "cpu" in available_backends("varlen_attention", "cpu"):
        m.backend = "cpu"                               # forward only: refused with grads on
        with pytest.raises(Exception, match="backward"):
            m(xg)
