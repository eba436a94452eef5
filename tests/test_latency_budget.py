"""Budgets in milliseconds (issue 15): pyengine.latency against a hand sum on a hand-made table,
the expected latency of gate probabilities against sampled structures (Monte Carlo), HiAP /
allocate / SSS reaching a latency target, and bad budgets rejected."""
import math

import pytest
import torch

import pyengine
from pyengine.cli import main
from pyengine.cost.latency import LatencyModel, latency
from pyengine.cost.latency_table import Grid, LatencyTableError, TableShape, table_path
from pyengine.errors import SettingError
from pyengine.methods.base import Budget, Training, check_config, resolve_latency_budget
from pyengine.methods.criteria import BlockScores
from pyengine.methods.hiap import HiAPLoss, TemperatureSchedule, finalize, gate_parameters, \
    hiap_gates
from pyengine.structure.solver import allocate
from pyengine.structure.spec import Block, Head, Spec
from pyengine.train.trainer import fit

from _bench import load_bench
from _latency import fake_table

NAME = "vit_tiny_patch16_224"


def _vit(**kw):
    kw = {"depth": 3, "img_size": 32, "patch_size": 8, "num_classes": 7, **kw}
    return pyengine.create_model(NAME, **kw)   # 17 tokens, 3 heads of 64, FFN 768


def _fixed(table, g, stem, head):
    """Set the stem and head grids (fake_table's are large next to a tiny model's blocks)."""
    for b, part in table._entry(g)["batches"].items():
        part["grids"]["stem"] = Grid({}, [stem * b])
        part["grids"]["head"] = Grid({}, [head * b])
    return table


def _install(table, monkeypatch, tmp_path):
    monkeypatch.setenv("PYENGINE_CACHE", str(tmp_path))
    table.save(table_path("cpu", table.dtype))


# ---- pyengine.latency ------------------------------------------------------------------------
def _hand_ms(b):
    """The spec of test_latency_is_the_hand_sum on fake_table's default formulas."""
    attn = lambda h, qk, v: 0.01 + 1e-5 * b * h * (qk + v)  # noqa: E731
    lin = lambda w: 0.005 + 1e-5 * b * w  # noqa: E731
    br = 0.002 * b
    blk0 = (br + lin(3 * (16 + 16 + 40)) + attn(2, 16, 16) + attn(1, 40, 40) + 0.05 * (2 - 1)
            + lin(16 + 16 + 40) + br + lin(300))
    blk1 = br + lin(768)
    blk2 = br + lin(3 * 64) + attn(1, 64, 64) + lin(64)
    return 0.1 * b + 0.05 * b + blk0 + blk1 + blk2


def _hand_spec(g):
    r = lambda n: tuple(range(n))  # noqa: E731
    return Spec((Block((Head(0, r(16), r(16)), Head(1, r(16), r(16)), Head(2, r(40), r(40))),
                       r(300)),
                 Block((), r(768)),
                 Block((Head(1, r(64), r(64)),), ())), model=NAME, dense=g)


def test_latency_is_the_hand_sum(tmp_path, monkeypatch):
    g = pyengine.geometry(_vit())
    t = fake_table(g)
    s = _hand_spec(g)
    lat = latency(s, batch=1, layout="exact", table=t)
    assert lat.ms == pytest.approx(_hand_ms(1), rel=1e-9)
    assert lat.ms == pytest.approx(sum(r.ms for r in lat.rows), rel=1e-12)
    assert [r.name for r in lat.rows] == ["stem", "blocks.0.attn", "blocks.0.mlp",
                                          "blocks.1.mlp", "blocks.2.attn", "head"]
    assert "2x16/16+1x40/40" in lat.rows[1].detail
    assert latency(s, batch=8, layout="exact", table=t).ms == pytest.approx(_hand_ms(8),
                                                                            rel=1e-9)
    # between measured batches: linear
    assert latency(s, batch=4, layout="exact", table=t).ms == pytest.approx(
        _hand_ms(1) + (_hand_ms(8) - _hand_ms(1)) * 3 / 7, rel=1e-9)
    # the cached table of this machine's CPU: pyengine.latency finds it (no measuring)
    _install(t, monkeypatch, tmp_path)
    assert pyengine.latency(s, layout="exact").ms == pytest.approx(_hand_ms(1), rel=1e-9)
    # a compiled model is priced in its own layout (padded here)
    model = pyengine.gate(_vit())
    pyengine.apply(model, s)
    compact = pyengine.compile(model, layout="padded")
    lat_c = pyengine.latency(compact)
    assert lat_c.layout == "padded"
    assert lat_c.ms == pytest.approx(latency(s, layout="padded", table=t).ms, rel=1e-12)
    # the planner's choice is never slower than the exact layout
    assert pyengine.latency(model).ms <= lat.ms * (1 + 1e-9)


def test_latency_without_a_table_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PYENGINE_CACHE", str(tmp_path))
    with pytest.raises(LatencyTableError, match="PYENGINE_LATENCY=off"):
        pyengine.latency(_vit())
    with pytest.raises(ValueError, match="batch"):
        pyengine.latency(_vit(), batch=0)


def test_latency_of_a_cnn_is_a_clear_error():
    # a CNN has its own measured table (tests/test_cnn_latency.py): none cached and measuring
    # off is one line saying so
    m = pyengine.create_model("resnet18", num_classes=5)
    with pytest.raises(LatencyTableError, match="no CNN latency table.*PYENGINE_LATENCY=off"):
        pyengine.latency(m)
    with pytest.raises(LatencyTableError, match="no CNN latency table.*PYENGINE_LATENCY=off"):
        pyengine.latency(pyengine.spec(m))


def test_cost_command_prints_and_records_latency(tmp_path, monkeypatch, capsys):
    import json
    m = _vit()
    _install(fake_table(pyengine.geometry(m)), monkeypatch, tmp_path)
    d = tmp_path / "m"
    pyengine.save(pyengine.compile(pyengine.gate(m), layout="exact"), d)
    assert main(["cost", "--model", str(d), "--latency", "--json", str(tmp_path / "c.json")]) == 0
    assert "predicted latency" in capsys.readouterr().out
    rec = json.loads((tmp_path / "c.json").read_text())["latency"]
    assert rec["ms"] == pytest.approx(pyengine.latency(pyengine.load(d)).ms, rel=1e-9)


def test_a_calibrated_table_prices_kept_branches_in_context(tmp_path, monkeypatch):
    """A calibrated table: a kept branch is <kind>_ctx + calib_<kind> * (its grids); stem and
    head as measured, plus forward_ctx once; removed branches cost nothing."""
    g = pyengine.geometry(_vit())
    b = 2
    t = fake_table(g, batches=(1, 4), calibration=_calibration)
    assert t.calibrated(g)
    # between measured batches the scalars are interpolated (ms grids and factors alike)
    a, m = _calibration(1), _calibration(4)
    w = (b - 1) / 3
    mix = {k: a[k] * (1 - w) + m[k] * w for k in a}
    attn = lambda h, qk, v: 0.01 + 1e-5 * b * h * (qk + v)  # noqa: E731
    lin = lambda w: 0.005 + 1e-5 * b * w  # noqa: E731
    blk0 = (mix["attn_ctx"] + mix["calib_attn"] * (
        lin(3 * (16 + 16 + 40)) + attn(2, 16, 16) + attn(1, 40, 40) + 0.05 + lin(72))
        + mix["mlp_ctx"] + mix["calib_mlp"] * lin(300))
    blk1 = mix["mlp_ctx"] + mix["calib_mlp"] * lin(768)
    blk2 = mix["attn_ctx"] + mix["calib_attn"] * (lin(3 * 64) + attn(1, 64, 64) + lin(64))
    want = 0.1 * b + 0.05 * b + mix["forward_ctx"] + blk0 + blk1 + blk2
    got = latency(_hand_spec(g), batch=b, table=t, layout="exact")
    assert got.ms == pytest.approx(want, rel=1e-9)
    # the same table without its calibration prices branches as timed alone (cheaper here)
    for part in t.shapes[TableShape.of(g).key]["batches"].values():
        for k in _calibration(1):
            del part["grids"][k]
    assert not t.calibrated(g)
    assert latency(_hand_spec(g), batch=b, table=t, layout="exact").ms < want


# ---- the expected latency of gate probabilities ------------------------------------------------
def _curved(g, **kw):
    """A table with curvature, an eq/ne step, run overheads and off-grid widths (nonlinear)."""
    return fake_table(g, attn=lambda be, b, h, qk, v: 0.01 + 1e-4 * b * h ** 0.7 * (qk + v) ** 1.2
                      + (0.003 if qk != v else 0.0),
                      runs=lambda be, b, k: 0.02 * (k - 1),
                      linear=lambda kind, b, w: 0.005 + 1e-5 * b * w + 0.002 * (w % 64 != 0),
                      **kw)


def _sample_ms(lm, probs, gen):
    """The smooth latency model's price of one structure sampled from ``probs`` (HiAP's hard
    semantics: a head counts iff block * head * any(v); an FFN iff block * any neuron)."""
    total = lm.fixed
    for a, f in zip(probs[0::2], probs[1::2]):
        bern = lambda p: torch.bernoulli(p.double(), generator=gen)  # noqa: E731
        on, hd, q, v = bern(a["block"]), bern(a["head"]), bern(a["qk"]), bern(a["v"])
        alive = [h for h in range(hd.numel()) if on and hd[h] and v[h].sum() > 0]
        mb = bern(f["block"])
        width = int(bern(f["neuron"]).sum()) if mb else 0
        total += lm.smooth_layer_ms([int(q[h].sum()) for h in alive],
                                    [int(v[h].sum()) for h in alive], width)
    return total


def _calibration(b):
    """In-context scalars of a calibrated fake table (pyengine.measure.latency_calibration)."""
    return {"calib_attn": 1.3 + 0.01 * b, "calib_mlp": 0.9, "attn_ctx": 0.03 * b,
            "mlp_ctx": 0.02 * b, "forward_ctx": 0.07 + 0.01 * b}


@pytest.mark.parametrize("batch,calibrated", [(1, False), (5, False), (3, True)])
def test_expected_latency_matches_sampled_structures(batch, calibrated):
    torch.manual_seed(batch)
    g = pyengine.geometry(_vit())
    lm = LatencyModel(_curved(g, calibration=_calibration if calibrated else None), g,
                      batch=batch)
    H, Dh, M = g.num_heads, g.head_dim, g.mlp_hidden
    probs = []
    for _ in range(g.depth):
        probs.append({"block": torch.tensor(0.9), "head": torch.rand(H) * 0.6 + 0.4,
                      "qk": torch.rand(H, Dh), "v": torch.rand(H, Dh) * 0.8 + 0.2})
        probs.append({"block": torch.tensor(0.85), "neuron": torch.rand(M)})
    exact = lm.expected(probs).item()
    gen = torch.Generator().manual_seed(7)
    n = 1200
    mc = [_sample_ms(lm, probs, gen) for _ in range(n)]
    mean = sum(mc) / n
    sem = (sum((x - mean) ** 2 for x in mc) / (n - 1) / n) ** 0.5
    assert abs(exact - mean) <= max(4 * sem, 0.005 * mean), (exact, mean, sem)


@pytest.mark.parametrize("calibrated", [False, True])
def test_expected_latency_of_hard_probabilities_is_the_prediction(calibrated):
    """0/1 probabilities: the expectation is the latency model's prediction of that structure
    (heads of one width per layer: the op's surrogate is then exact too)."""
    g = pyengine.geometry(_vit())
    lm = LatencyModel(_curved(g, calibration=_calibration if calibrated else None), g, batch=1)
    H, Dh, M = g.num_heads, g.head_dim, g.mlp_hidden
    probs, blocks = [], []
    for i, (heads, w, m) in enumerate([((0, 2), 24, 300), ((), 0, 768), ((1,), 64, 0)]):
        hp = torch.zeros(H)
        dims = torch.zeros(H, Dh)
        for h in heads:
            hp[h] = 1
            dims[h, :w] = 1
        neu = torch.zeros(M)
        neu[:m] = 1
        probs += [{"block": torch.tensor(1.0 if heads else 0.0), "head": hp, "qk": dims,
                   "v": dims.clone()},
                  {"block": torch.tensor(1.0 if m else 0.0), "neuron": neu}]
        blocks.append(Block(tuple(Head(h, tuple(range(w)), tuple(range(w))) for h in heads),
                            tuple(range(m))))
    want = lm.spec_ms(Spec(tuple(blocks), model=NAME, dense=g))
    assert lm.expected(probs).item() == pytest.approx(want, rel=1e-6)
    ones = [{k: torch.ones_like(v) for k, v in p.items()} for p in probs]
    assert lm.expected(ones).item() == pytest.approx(lm.dense, rel=1e-6)


def test_expected_latency_gradients_are_finite_and_point_down():
    g = pyengine.geometry(_vit())
    # curved attention, FFN time increasing in width (the sign checked below needs that)
    lm = LatencyModel(fake_table(g, attn=lambda be, b, h, qk, v: 0.01 + 1e-4 * b * h ** 0.7
                                 * (qk + v) ** 1.2, linear=lambda kind, b, w: 0.005 + 1e-5 * b * w
                                 + 1e-8 * w * w, calibration=_calibration), g, batch=1)
    model = pyengine.gate(_vit(), method="hiap")
    sets = [gs for pair in hiap_gates(model) for gs in pair]
    e = lm.expected([gs.probs() for gs in sets])
    e.backward()
    for gs in sets:
        for k, p in gs.logits.items():
            assert torch.isfinite(p.grad).all(), k
    # keeping more FFN neurons costs more
    assert sets[1].logits["neuron"].grad.sum() > 0


# ---- methods reach a latency target ----------------------------------------------------------
def _budget_table(g):
    t = fake_table(g, attn=lambda be, b, h, qk, v: 0.002 + 1e-4 * b * h * (qk + v),
                   linear=lambda kind, b, w: 0.001 + 1e-3 * b * w,
                   runs=lambda be, b, k: 0.001 * (k - 1))
    return _fixed(t, g, 0.005, 0.002)


def _loaders(n=96, classes=4, seed=0):
    from torch.utils.data import DataLoader, TensorDataset
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=gen)
    y = ((x[:, 0, :8].mean((1, 2)) > 0).long() + 2 * (x[:, 1, 8:].mean((1, 2)) > 0).long())
    ds = TensorDataset(x, y % classes)
    return (DataLoader(ds, batch_size=16, shuffle=True, generator=gen, drop_last=True),
            DataLoader(ds, batch_size=32))


def _small(depth=2, **kw):
    return pyengine.create_model(NAME, img_size=16, patch_size=8, embed_dim=32, depth=depth,
                                 num_heads=4, mlp_ratio=4.0, num_classes=4, **kw)


def _flat(depth, attn, linear):
    """The geometry of ``_small(depth)`` and a latency model whose attention op and linear
    layers cost ``attn`` / ``linear`` ms each, barely more with width (a CPU at batch 1)."""
    g = pyengine.geometry(_small(depth))
    t = fake_table(g, attn=lambda be, b, h, qk, v: attn + 1e-6 * h * (qk + v),
                   linear=lambda kind, b, w: linear + 1e-6 * w, runs=lambda be, b, k: 0.0)
    return g, LatencyModel(_fixed(t, g, 0.005, 0.002), g, batch=1)


def test_hiap_reaches_a_latency_budget_in_a_short_run():
    torch.manual_seed(0)
    model = pyengine.gate(_small(), method="hiap", init=2.0)
    g = pyengine.geometry(model)
    lm = LatencyModel(_budget_table(g), g, batch=1)
    loss = HiAPLoss(target=0.5, budget_weight=20.0, latency=lm)
    gates = gate_parameters(model)
    ids = {id(p) for p in gates}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids]},
              {"params": gates, "lr": 0.1, "weight_decay": 0.0}]
    train, _ = _loaders()
    hist = fit(model, train, None, epochs=15, lr=1e-3, param_groups=groups, extra_loss=loss,
               on_step=TemperatureSchedule(model), progress=False)
    assert hist[-1]["elat"] < hist[0]["elat"]
    sets = [gs for pair in hiap_gates(model) for gs in pair]
    ratio = lm.expected([gs.probs() for gs in sets]).item() / lm.dense
    assert abs(ratio - 0.5) < 0.05, hist[-1]
    model.eval()
    s = finalize(model, 0.5, tolerance=0.03, latency=lm)
    assert abs(lm.spec_ms(s) / lm.dense - 0.5) <= 0.03 * 0.5 + 1e-12
    assert pyengine.spec(model) == s


def _scores(g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return [BlockScores(r(g.num_heads), r(g.num_heads, g.head_dim), r(g.num_heads, g.head_dim),
                        r(g.mlp_hidden), float(r(1)), float(r(1))) for _ in range(g.depth)]


@pytest.mark.parametrize("mode,granularity", [("global", "dim"), ("global", "head"),
                                              ("uniform", "dim")])
def test_allocate_by_latency_hits_the_target(mode, granularity):
    g = pyengine.geometry(_small())
    lm = LatencyModel(_budget_table(g), g, batch=1)
    s = allocate(_scores(g), g, 0.5, mode=mode, granularity=granularity, latency=lm)
    ms = lm.spec_ms(s)
    assert ms <= 0.5 * lm.dense * (1 + 1e-9)
    assert ms >= 0.5 * lm.dense * (0.9 if granularity == "dim" else 0.75), ms / lm.dense
    assert s.meta["budget"] == "latency" and s.meta["latency_ms"] == pytest.approx(ms)
    # the MAC budget of the same fraction is another structure
    assert allocate(_scores(g), g, 0.5, mode=mode, granularity=granularity) != s


def test_allocate_by_latency_gives_back_what_fits(monkeypatch):
    """Branch costs that barely depend on width (CPU at batch 1): removing units by score
    strips many before a branch goes; what still fits the budget is given back, so no removed
    neuron of a kept FFN would still fit and the result is within one branch of the target."""
    from pyengine.structure import solver
    g, lm = _flat(6, attn=0.01, linear=0.005)
    branch = max(lm.layer_ms([8] * 4, [8] * 4, 0), lm.layer_ms([], [], g.mlp_hidden))
    got = []
    for seed in range(3):
        s = allocate(_scores(g, seed), g, 0.5, mode="global", granularity="dim", min_heads=0,
                     latency=lm)
        ms = lm.spec_ms(s)
        got.append(ms)
        assert 0.5 * lm.dense - branch <= ms <= 0.5 * lm.dense * (1 + 1e-9), ms / lm.dense
        for i, blk in enumerate(s.blocks):
            gone = sorted(set(range(g.mlp_hidden)) - set(blk.mlp))
            if blk.mlp and gone:
                wider = Block(blk.heads, tuple(sorted(blk.mlp + (gone[-1],))))
                s2 = Spec(s.blocks[:i] + (wider,) + s.blocks[i + 1:], model=s.model, dense=g)
                assert lm.spec_ms(s2) > 0.5 * lm.dense, (seed, i)
    # without giving back, the ranking alone lands lower (the overshoot this fixes)
    monkeypatch.setattr(solver._LatencyLedger, "refill", lambda self, budget: None)
    plain = [lm.spec_ms(allocate(_scores(g, seed), g, 0.5, mode="global", granularity="dim",
                                 min_heads=0, latency=lm)) for seed in range(3)]
    assert all(a >= b for a, b in zip(got, plain)) and sum(got) > sum(plain), (got, plain)


def test_project_exchanges_steps_when_no_single_step_lands_in_the_band(monkeypatch):
    """Branch costs that barely depend on width: from the gates' structure no single step
    lands in the band (removing or restoring a branch is a big step); one step exchanged for
    another in a second layer does, and the projection finds it."""
    from pyengine.structure import solver
    g, lm = _flat(4, attn=0.05, linear=0.02)

    def scores(seed):
        gen = torch.Generator().manual_seed(seed)
        r = lambda *s: 4 * torch.randn(*s, generator=gen)  # noqa: E731
        return [({"block": r(()), "head": r(g.num_heads), "qk": r(g.num_heads, g.head_dim),
                  "v": r(g.num_heads, g.head_dim)}, {"block": r(()), "neuron": r(g.mlp_hidden)})
                for _ in range(g.depth)]

    def land(seed):
        model = pyengine.gate(_small(4), method="hiap")
        s = solver.project(model, scores(seed), 0.5, tolerance=0.03, min_heads=0, latency=lm)
        return lm.spec_ms(s) / lm.dense

    landed = [land(seed) for seed in range(6)]
    assert all(abs(x - 0.5) <= 0.03 * 0.5 + 1e-12 for x in landed), landed
    # the exchange is what gets (some of) them there: single steps alone stop outside
    monkeypatch.setattr(solver, "_exchange", lambda *a: None)
    alone = [land(seed) for seed in range(6)]
    assert any(abs(x - 0.5) > 0.03 * 0.5 for x in alone), alone


def test_sss_and_oneshot_take_the_latency_budget(tmp_path, monkeypatch):
    from pyengine.methods.base import run_method
    train, _ = _loaders()
    m = _small()
    g = pyengine.geometry(m)
    _install(_budget_table(g), monkeypatch, tmp_path)
    lm = LatencyModel(_budget_table(g), g, batch=1)
    sss = run_method(m, "sss", train, target=0.6, budget="latency", epochs=1, progress=False,
                     kd_alpha=0.0, log=lambda t: None)
    ms = lm.spec_ms(pyengine.spec(sss))
    assert ms <= 0.6 * lm.dense * 1.03
    agf = run_method(_small(), "magnitude", train, target=0.6, budget="latency",
                     progress=False, log=lambda t: None)
    ms = lm.spec_ms(pyengine.spec(agf))
    assert 0.5 * lm.dense <= ms <= 0.6 * lm.dense * (1 + 1e-9)
    # an absolute budget: target_ms
    agf = run_method(_small(), "magnitude", train, target_ms=0.7 * lm.dense, budget="latency",
                     progress=False, log=lambda t: None)
    assert lm.spec_ms(pyengine.spec(agf)) <= 0.7 * lm.dense * (1 + 1e-9)


# ---- bad budgets -----------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    ({"budget": "flops"}, "budget"),
    ({"target_ms": 5.0}, "--budget latency"),
    ({"budget": "latency", "target_ms": 0.0}, "target_ms"),
    ({"budget": "latency", "target_ms": -1.0}, "target_ms"),
    ({"budget": "latency", "target_ms": math.nan}, "target_ms"),
    ({"budget": "latency", "latency_batch": 0}, "latency_batch"),
])
def test_bad_budgets_are_rejected(kw, match):
    with pytest.raises(SettingError, match=match):
        check_config(Budget(**kw), Training())


def test_target_ms_outside_the_predictable_range_is_rejected(tmp_path, monkeypatch):
    m = _small()
    g = pyengine.geometry(m)
    lm = LatencyModel(_budget_table(g), g, batch=1)
    _install(_budget_table(g), monkeypatch, tmp_path)
    with pytest.raises(SettingError, match="floor"):
        resolve_latency_budget(Budget(budget="latency", target_ms=lm.fixed), Training(), m)
    with pytest.raises(SettingError, match="above the dense"):
        resolve_latency_budget(Budget(budget="latency", target_ms=2 * lm.dense), Training(), m)
    b, got = resolve_latency_budget(Budget(budget="latency", target_ms=0.5 * lm.dense),
                                    Training(), m)
    assert b.target == pytest.approx(0.5) and got.dense == pytest.approx(lm.dense)
    monkeypatch.setenv("PYENGINE_CACHE", str(tmp_path / "empty"))
    with pytest.raises(SettingError, match="no latency table"):
        resolve_latency_budget(Budget(budget="latency"), Training(), m)


def test_prune_cli_rejects_bad_budgets_in_one_line(tmp_path, capsys):
    base = ["prune", "--model", "digits_vit", "--no-progress", "--out", str(tmp_path / "o")]
    for args, text in ((["--budget", "macs", "--target-ms", "3"], "--budget latency"),
                       (["--budget", "latency", "--target-ms", "nan"], "--target-ms"),
                       (["--budget", "latency", "--target-ms", "-2"], "--target-ms")):
        assert main(base + args) == 1
        err = capsys.readouterr().err.strip()
        assert text in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


# ---- bench and prune report predicted beside measured ----------------------------------------
def test_bench_reports_predicted_beside_measured(tmp_path, monkeypatch, capsys):
    import json
    kw = {"depth": 2, "img_size": 32, "patch_size": 8}
    g = pyengine.geometry(pyengine.create_model(NAME, **kw))
    _install(fake_table(g), monkeypatch, tmp_path / "cache")
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", NAME, "--model-kwargs", json.dumps(kw), "--dtype", "fp32",
                 "--device", "cpu", "--warmup", "1", "--repeats", "2", "--rounds", "1",
                 "--target", "0.5", "--compare", "dense,exact", "--layout", "exact",
                 "--batch", "1,2", "--json", str(out)]) == 0
    assert "pred ms" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    for r in rep["results"]:
        assert r["predicted_ms"] is not None, r["variant"]
        assert r["predicted_error"] == pytest.approx(r["predicted_ms"] / r["median_ms"] - 1)
    dense = next(r for r in rep["results"] if r["variant"] == "dense" and r["batch"] == 2)
    assert dense["predicted_ms"] == pytest.approx(
        latency(Spec.full(g, model=NAME), batch=2, table=fake_table(g)).ms, rel=1e-9)


def test_prune_with_a_latency_budget_records_predicted_and_measured(tmp_path, monkeypatch):
    import json
    kw = {"embed_dim": 16, "depth": 2, "num_heads": 2}
    m = pyengine.create_model("digits_vit", img_size=8, num_classes=10, **kw)
    g = pyengine.geometry(m)
    t = fake_table(g, batches=(1, 2), attn=lambda be, b, h, qk, v: 0.002 + 1e-3 * b * h * (qk + v),
                   linear=lambda kind, b, w: 0.001 + 1e-3 * b * w, runs=lambda be, b, k: 0.0)
    _install(_fixed(t, g, 0.002, 0.001), monkeypatch, tmp_path / "cache")
    lm = LatencyModel(t, g, batch=1)
    out = tmp_path / "run"
    assert main(["prune", "--model", "digits_vit", "--model-kwargs", json.dumps(kw),
                 "--img-size", "8", "--batch-size", "256", "--no-progress", "--dense-epochs", "1",
                 "--method", "magnitude", "--budget", "latency", "--target-ms",
                 str(0.6 * lm.dense), "--latency-batches", "1,2", "--out", str(out)]) == 0
    met = json.loads((out / "metrics.json").read_text())
    assert met["budget"] == "latency" and met["target"] == pytest.approx(0.6)
    assert met["dense_predicted_ms"] == pytest.approx(lm.dense)
    assert met["pruned_predicted_ms"] <= 0.6 * lm.dense * (1 + 1e-9)
    # a target below the predicted floor (stem + head) fails before the dense model trains
    rc = main(["prune", "--model", "digits_vit", "--model-kwargs", json.dumps(kw),
               "--img-size", "8", "--no-progress", "--budget", "latency", "--target-ms",
               str(lm.fixed / 2), "--out", str(tmp_path / "low")])
    assert rc == 1 and not (tmp_path / "low" / "checkpoints" / "dense.safetensors").exists()
    lat = met["latency"]
    for name in ("dense", "pruned"):
        for b in ("1", "2"):
            assert lat["predicted_ms"][name][b] > 0 and lat["measured_ms"][name][b]["median_ms"] > 0
    assert lat["predicted_ms"]["pruned"]["1"] < lat["predicted_ms"]["dense"]["1"]


# ---- the acceptance scripts: dry runs on tiny shapes (numbers meaningless) ----------------------
@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_latency_prediction_script_dry_run(tmp_path, monkeypatch, threads):
    import json
    kw = {"depth": 2, "img_size": 32, "patch_size": 8}
    g = pyengine.geometry(pyengine.create_model(NAME, **kw))
    torch.set_num_threads(1)  # the script's threads: part of the CPU's table key
    _install(fake_table(g, batches=(1, 2)), monkeypatch, tmp_path / "cache")
    mod = load_bench("latency_prediction")
    assert mod.main(["--model", NAME, "--model-kwargs", json.dumps(kw), "--structures", "2",
                     "--batches", "1,2", "--threads", "1", "--warmup", "0", "--repeats", "2",
                     "--rounds", "1", "--out", str(tmp_path / "pred")]) == 0
    doc = json.loads((tmp_path / "pred.json").read_text())
    assert len(doc["rows"]) == 4 and set(doc["summary"]) == {"1", "2", "all"}
    for r in doc["rows"]:
        assert r["rel_error"] == pytest.approx(r["predicted_ms"] / r["measured"]["median_ms"] - 1)
        assert r["measured"]["repeats"] == 2
    assert doc["env"]["threads"] == 1
    assert "median |error|" in (tmp_path / "pred.log").read_text()


def test_latency_budget_digits_script_dry_run(tmp_path, monkeypatch, threads):
    import json
    kw = {"embed_dim": 16, "depth": 2, "num_heads": 2}
    g = pyengine.geometry(pyengine.create_model("digits_vit", img_size=8, num_classes=10, **kw))
    torch.set_num_threads(1)  # the script's threads: part of the CPU's table key
    t = fake_table(g, batches=(1, 2), attn=lambda be, b, h, qk, v: 0.002 + 1e-3 * b * h * (qk + v),
                   linear=lambda kind, b, w: 0.001 + 1e-3 * b * w, runs=lambda be, b, k: 0.0)
    _install(_fixed(t, g, 0.002, 0.001), monkeypatch, tmp_path / "cache")
    mod = load_bench("latency_budget_digits")
    out = tmp_path / "lb"
    assert mod.main(["--model-kwargs", json.dumps(kw), "--img-size", "8", "--seeds", "0",
                     "--methods", "hiap,magnitude", "--latency-targets", "0.5",
                     "--mac-targets", "0.3,0.9", "--epochs", "1", "--dense-epochs", "1",
                     "--batch-size", "256", "--latency-batches", "1,2", "--threads", "1",
                     "--out", str(out)]) == 0
    doc = json.loads((tmp_path / "lb.json").read_text())
    assert len(doc["runs"]) == 6
    assert {(r["method"], r["budget"]) for r in doc["runs"]} == {
        ("hiap", "latency"), ("hiap", "macs"), ("magnitude", "latency"), ("magnitude", "macs")}
    for r in doc["runs"]:
        assert r["measured_ratio_b1"] == pytest.approx(r["measured_ms_b1"] / r["dense_ms_b1"])
    assert len(doc["summary"]["budget_check"]) == 2
    assert set(doc["summary"]["equal_latency"]) == {"hiap", "magnitude"}
    assert (tmp_path / "lb.png").stat().st_size > 0 and (tmp_path / "lb.log").is_file()
