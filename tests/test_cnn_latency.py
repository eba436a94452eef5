"""The CNN latency model (issue 15): per-block tables by kept width (interpolation against
hand-computed sums), real tiny measured tables (exact at the grid, monotone, a sanity factor
against measured structures), the cache, the one-shot allocation by predicted latency, the
CLI, and the errors."""
import dataclasses
import random

import numpy as np
import pytest
import torch

import pyengine
from pyengine.cost import cnn_latency_table as clt
from pyengine.cost.cnn_latency import CnnLatencyModel
from pyengine.cost.cnn_latency_table import (BlockGrid, CnnEntry, CnnLatencyTable, block_slots,
                                             block_removable, monotone)
from pyengine.cost.latency_table import LatencyTableError, device_key
from pyengine.errors import SettingError
from pyengine.measure import cnn_latency as measure_cnn
from pyengine.models.resnet.importance import ConvBlockScores
from pyengine.structure.solver import allocate
from pyengine.structure.spec import make_conv_block

IMG = 32
# the measured tables: few rounds (a sanity check of the mechanics, not a timing)
QUICK = dict(repeats=3, min_seconds=0.3, warmup=1, progress=False)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(name, img=IMG, **kw):
    return pyengine.create_model(name, num_classes=10, img_size=img, **kw).eval()


def random_structure(g, model, seed, p_remove=0.3):
    """Random kept widths (1 unit, a third, odd counts, all) and removed blocks."""
    rng = random.Random(seed)
    slots, rm, it = block_slots(g), block_removable(g), iter(range(len(block_slots(g))))
    stages = []
    for n in g.layers:
        st = []
        for _ in range(n):
            i = next(it)
            if rm[i] and rng.random() < p_remove:
                st.append(make_conv_block(False))
                continue
            ch = {}
            for name, c, grp in slots[i]:
                u = c // grp
                k = min(u, rng.choice((1, 3, max(1, u // 3), u, rng.randint(1, u))))
                ch[name] = [x * grp + j for x in sorted(rng.sample(range(u), k))
                            for j in range(grp)]
            st.append(make_conv_block(True, **ch))
        stages.append(tuple(st))
    return _spec_type(g)(tuple(stages), model=model, dense=g)


def _spec_type(g):
    from pyengine.models import adapter_for_geometry
    return adapter_for_geometry(g).spec_type


# ---- (a) interpolation against hand-computed numbers ------------------------------------------
def test_monotone_and_the_grid_rules_by_hand():
    # a dip from noise: the mean of the running max from below and the running min from above
    v = monotone(torch.tensor([1.0, 3.0, 2.0, 4.0], dtype=torch.float64))
    assert v.tolist() == [1.0, 2.5, 2.5, 4.0]
    same = torch.tensor([[1.0, 2.0], [3.0, 5.0]], dtype=torch.float64)
    assert torch.equal(monotone(same), same)
    g = BlockGrid(["conv1"], [[4.0, 8.0, 16.0]], [1.0, 3.0, 4.0])
    assert g([8]) == 3.0 and g([16]) == 4.0 and g([64]) == 4.0      # exact; clamped above
    assert g([6]) == pytest.approx(2.0) and g([12]) == pytest.approx(3.5)
    # below the first point: a point at width 1 on the first segment's line (1 - 3 * 0.5,
    # floored at 0), linear in between
    assert g([1]) == 0.0
    assert g([2]) == pytest.approx(1.0 / 3.0)
    g2 = BlockGrid(["conv1"], [[4.0, 8.0]], [2.0, 3.0])             # not floored: 2 - 3 / 4
    assert g2([1]) == pytest.approx(1.25) and g2([2]) == pytest.approx(1.5)
    assert BlockGrid([], [], [0.7])([]) == 0.7
    with pytest.raises(LatencyTableError, match="must not decrease"):
        BlockGrid(["conv1"], [[1.0, 2.0]], [2.0, 1.0])
    with pytest.raises(LatencyTableError, match="increase"):
        BlockGrid(["conv1"], [[2.0, 2.0]], [1.0, 1.0])
    with pytest.raises(LatencyTableError, match="2 widths"):
        g([1, 2])


def _fake_entry(g, fixed=0.3, seed=0):
    """A table entry whose 2-D grids are bilinear functions (interpolated exactly, extended to
    width 1 exactly) and whose 1-D grids are piecewise linear; returns (entry, reference)."""
    rng = random.Random(seed)
    blocks, refs = [], []
    for i, (sl, rm) in enumerate(zip(block_slots(g), block_removable(g))):
        removed = round(rng.uniform(0, 0.05), 6) if rm else None
        if len(sl) == 2:
            (_, c1, _), (_, c2, _) = sl
            a, b, c, d = (rng.uniform(0.05, 0.2), rng.uniform(0, 1e-3), rng.uniform(0, 1e-3),
                          rng.uniform(0, 1e-5))
            ax = [[c1 / 4, c1 / 2, 3 * c1 / 4, c1], [c2 / 4, c2 / 2, 3 * c2 / 4, c2]]

            def f(x, y, a=a, b=b, c=c, d=d):
                return a + b * x + c * y + d * x * y
            ms = [f(x, y) for x in ax[0] for y in ax[1]]
            blocks.append(BlockGrid([n for n, _, _ in sl], ax, ms, removed_ms=removed))
            refs.append(lambda w, f=f: f(*w))
        elif len(sl) == 1:
            (_, ch, grp), = sl
            xs = sorted({max(grp, round(f * ch / grp) * grp) for f in (0.125, 0.25, 0.5, 1.0)})
            ys = sorted(rng.uniform(0.01, 1.0) for _ in xs)
            blocks.append(BlockGrid([sl[0][0]], [[float(x) for x in xs]], ys,
                                    removed_ms=removed))
            # the reference: numpy's piecewise-linear interp (clamped), with the width-1 point
            if xs[0] > 1 and len(xs) > 1:
                y1 = max(0.0, ys[0] - (xs[0] - 1) * (ys[1] - ys[0]) / (xs[1] - xs[0]))
                px, py = [1.0] + xs, [y1] + ys
            else:
                px, py = xs, ys
            refs.append(lambda w, px=px, py=py: float(np.interp(w[0], px, py)))
        else:
            v = rng.uniform(0.01, 0.1)
            blocks.append(BlockGrid([], [], [v], removed_ms=removed))
            refs.append(lambda w, v=v: v)
    return CnnEntry(fixed, blocks), refs


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenetv3_small_100", "regnety_002"])
def test_prediction_is_the_hand_sum(name):
    g = pyengine.geometry(_model(name))
    entry, refs = _fake_entry(g)
    t = CnnLatencyTable(device_key("cpu"), "float32")
    t.add(g, name, 1, entry)
    lm = CnnLatencyModel(t, g, name, batch=1)
    slots = block_slots(g)
    for seed in range(4):
        s = random_structure(g, name, seed)
        want = 0.3
        for i, blk in enumerate(s.blocks):
            want += refs[i]([len(blk.kept(n)) for n, _, _ in slots[i]]) if blk.keep \
                else entry.blocks[i].removed_ms
        assert lm.spec_ms(s) == pytest.approx(want, rel=1e-9, abs=1e-12)
        lat = pyengine.latency(s, table=t)
        assert lat.ms == lm.spec_ms(s) and lat.rows[-1].name == "fixed"
        assert sum(r.ms for r in lat.rows) == pytest.approx(want, rel=1e-9)
        assert [r.kind for r in lat.rows[:-1]] == ["block" if b.keep else "removed"
                                                  for b in s.blocks]
        assert lat.rows[0].name == "stages.0.0"
    # the file round trip keeps every number
    t2 = CnnLatencyTable.from_dict(t.to_dict())
    s = random_structure(g, name, 9)
    assert CnnLatencyModel(t2, g, name).spec_ms(s) == lm.spec_ms(s)


# ---- (b, c) real tiny measured tables -------------------------------------------------------
@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Measured tables (batch 1, 32 px, few rounds) of resnet18 and convnext_atto."""
    path = tmp_path_factory.mktemp("cnn-latency") / "table.json"
    out = {}
    for name in ("resnet18", "convnext_atto"):
        g = pyengine.geometry(_model(name))
        t = clt.get_cnn_table(g, name, "cpu", torch.float32, 1, path=path, measure=True,
                              **QUICK)
        out[name] = (g, CnnLatencyModel(t, g, name, 1))
    return out


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_measured_table_is_exact_at_its_grid_and_monotone(measured, name):
    g, lm = measured[name]
    e = lm.entry
    full = _spec_type(g).full(g, name)
    assert lm.spec_ms(full) == e.fixed_ms + sum(b.ms[-1] for b in e.blocks) == lm.dense
    assert lm.spec_ms(full) == pyengine.latency(full, table=lm.table).ms
    for f in measure_cnn.FRACTIONS:
        s = measure_cnn.uniform_spec(g, name, (f,))
        want = e.fixed_ms
        for i, (b, blk) in enumerate(zip(e.blocks, s.blocks)):
            want += b.ms[b.axes[0].index(len(blk.kept(b.slots[0])))] if b.slots else b.ms[0]
        assert lm.spec_ms(s) == pytest.approx(want, rel=1e-12)
    gone = measure_cnn.removed_spec(g, name)
    assert lm.spec_ms(gone) == pytest.approx(e.fixed_ms + sum(
        b.removed_ms if b.removed_ms is not None else b.ms[-1] for b in e.blocks), rel=1e-12)
    # measured medians made monotone; the prediction never falls as a block widens
    for i, (b, sl) in enumerate(zip(e.blocks, block_slots(g))):
        assert all(x >= 0 for x in b.ms) and b.measured_ms is not None
        if not sl:
            continue
        (_, c, grp), = sl
        ys = [lm.block_ms(i, True, [k * grp]) for k in range(1, c // grp + 1)]
        assert all(b2 >= a for a, b2 in zip(ys, ys[1:])), (i, ys)
    assert e.info["repeats"] >= QUICK["repeats"]


def test_random_resnet_structures_are_priced_between_the_grid_ends(measured):
    """Random resnet18 structures (odd widths, removed blocks): the compiled model is priced as
    its spec, within [all blocks removed or narrowest, dense]. How close predictions come to
    measured times is a benchmark's question (bench/latency_prediction_cnn.py), not a unit
    test's: timings here would depend on the machine's load."""
    g, lm = measured["resnet18"]
    for seed in range(3):
        s = random_structure(g, "resnet18", seed)
        gated = pyengine.gate(_model("resnet18"))
        pyengine.apply(gated, s)
        compact = pyengine.compile(gated).eval()
        ms = lm.spec_ms(s)
        assert pyengine.latency(compact, table=lm.table).ms == ms
        assert lm.fixed < ms <= lm.dense


# ---- (d) the cache --------------------------------------------------------------------------
def test_cache_measures_once_per_model_size_and_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("PYENGINE_CACHE", str(tmp_path))
    monkeypatch.setenv("PYENGINE_LATENCY", "on")   # the test suite turns measuring off
    calls = []

    def fake(g, model, batch, device, dtype, **kw):
        calls.append((model, g.img_size, batch))
        entry, _ = _fake_entry(g, fixed=0.1 * batch, seed=batch)
        return entry
    monkeypatch.setattr(measure_cnn, "measure_blocks", fake)
    m = _model("resnet18")
    s = pyengine.spec(m)
    a = pyengine.latency(m)
    assert pyengine.latency(s).ms == a.ms
    assert CnnLatencyModel.for_model(m).dense == a.ms
    assert calls == [("resnet18", IMG, 1)]
    path = tmp_path / "latency" / f"cnn-{device_key('cpu')}-float32.json"
    assert path.is_file()
    pyengine.latency(m, batch=2)                        # another batch
    pyengine.latency(_model("resnet18", img=64))        # another input size
    pyengine.latency(_model("resnet34"))                # another model
    assert calls == [("resnet18", IMG, 1), ("resnet18", IMG, 2), ("resnet18", 64, 1),
                     ("resnet34", IMG, 1)]
    t = CnnLatencyTable.load(path)
    assert len(t.models) == 3
    # read back from the file (a new process): nothing measured, the same prediction
    monkeypatch.setenv("PYENGINE_LATENCY", "off")
    assert pyengine.latency(s).ms == a.ms
    assert len(calls) == 4
    with pytest.raises(LatencyTableError, match="PYENGINE_LATENCY=off"):
        pyengine.latency(s, batch=3)
    # a table of another torch is stale and measured again
    d = t.to_dict()
    d["env"]["torch"] = "0.0.0"
    path.write_text(__import__("json").dumps(d))
    monkeypatch.setenv("PYENGINE_LATENCY", "on")
    pyengine.latency(s)
    assert len(calls) == 5


def test_cost_command_prints_cnn_latency(tmp_path, monkeypatch, capsys):
    import json

    from pyengine.cli import main
    monkeypatch.setenv("PYENGINE_CACHE", str(tmp_path))
    monkeypatch.setenv("PYENGINE_LATENCY", "on")
    monkeypatch.setattr(measure_cnn, "measure_blocks",
                        lambda g, model, batch, device, dtype, **kw: _fake_entry(g)[0])
    m = _model("resnet18")
    s = random_structure(pyengine.geometry(m), "resnet18", 3)
    pyengine.apply(pyengine.gate(m), s)
    d = tmp_path / "m"
    pyengine.save(pyengine.compile(m), d)
    assert main(["cost", "--model", str(d), "--latency", "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "predicted latency" in out and "stages.0.0" in out and "fixed" in out
    rec = json.loads((tmp_path / "c.json").read_text())["latency"]
    assert rec["ms"] == pytest.approx(pyengine.latency(pyengine.load(d)).ms, rel=1e-9)


def test_latency_report_predicts_cnns_from_cached_tables(tmp_path, monkeypatch, measured):
    """metrics.json's report (pyengine prune): a CNN is timed at its input size and predicted
    where a table is cached (batch 1 here), null with a note where not (batch 2)."""
    from pyengine.measure.latency_report import latency_report
    g, lm = measured["resnet18"]
    monkeypatch.setenv("PYENGINE_CACHE", str(tmp_path))
    lm.table.save(clt.cnn_table_path("cpu", torch.float32))
    m = pyengine.gate(_model("resnet18"))
    s = random_structure(g, "resnet18", 5)
    pyengine.apply(m, s)
    rep = latency_report({"dense": _model("resnet18"), "pruned": pyengine.compile(m)}, "cpu",
                         (1, 2), warmup=0, repeats=2, rounds=1)
    assert rep["predicted_ms"]["dense"]["1"] == lm.dense
    assert rep["predicted_ms"]["pruned"]["1"] == lm.spec_ms(s)
    assert rep["predicted_ms"]["pruned"]["2"] is None and "batch 2" in rep["note"]
    assert rep["measured_ms"]["pruned"]["2"]["median_ms"] > 0


# ---- (e) allocation by predicted latency ----------------------------------------------------
def _scores(g, seed):
    gen = torch.Generator().manual_seed(seed)
    return [ConvBlockScores({n: torch.rand(c // grp, generator=gen, dtype=torch.float64)
                             for n, c, grp in sl}, float(torch.rand((), generator=gen)))
            for sl in block_slots(g)]


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
@pytest.mark.parametrize("mode,granularity", [("global", "channel"), ("uniform", "channel"),
                                              ("global", "block")])
def test_allocate_by_predicted_latency(measured, name, mode, granularity):
    g, lm = measured[name]
    if granularity == "block" and name == "convnext_atto":
        pytest.skip("convnext_atto: every block has a slot; block granularity is ResNet's here")
    # a target the smallest structure of the allocation can reach
    floor = lm.spec_ms(measure_cnn.uniform_spec(g, name, (1e-9,))) / lm.dense
    target = round(min(0.9, max(0.5, floor + 0.2)), 2)
    for seed in range(2):
        s = allocate(_scores(g, seed), g, target, mode=mode, granularity=granularity,
                     model=name, latency=lm)
        ms = lm.spec_ms(s)
        assert ms <= target * lm.dense * (1 + 1e-9), (ms, target * lm.dense)
        if granularity == "channel":  # whole blocks are big steps: only the budget holds
            assert ms >= (target - 0.15) * lm.dense, (ms / lm.dense, target)
        assert s.meta["budget"] == "latency" and s.meta["latency_ms"] == ms
        assert s.meta["dense_latency_ms"] == lm.dense


def test_oneshot_and_sss_take_a_cnn_latency_budget(tmp_path, monkeypatch, measured):
    """``--budget latency`` on a CNN with a one-shot method and SSS: the CNN latency model
    (here the measured resnet18 table, installed in the cache) prices the structures."""
    from torch.utils.data import DataLoader, TensorDataset

    from pyengine.methods.base import run_method
    g, lm = measured["resnet18"]
    monkeypatch.setenv("PYENGINE_CACHE", str(tmp_path))
    lm.table.save(clt.cnn_table_path("cpu", torch.float32))
    data = TensorDataset(torch.randn(8, 3, IMG, IMG), torch.randint(0, 10, (8,)))
    loader = DataLoader(data, batch_size=4)
    m = run_method(_model("resnet18"), "magnitude", loader, target=0.7, budget="latency",
                   progress=False, log=lambda t: None)
    ms = lm.spec_ms(pyengine.spec(m))
    assert 0.55 * lm.dense <= ms <= 0.7 * lm.dense * (1 + 1e-9)
    # SSS prices its threshold by the same prediction of hard structures
    m = run_method(_model("resnet18"), "sss", loader, target=0.7, budget="latency", epochs=1,
                   kd_alpha=0.0, progress=False, log=lambda t: None)
    assert lm.spec_ms(pyengine.spec(m)) <= 0.7 * lm.dense * 1.03


# ---- (f) errors -----------------------------------------------------------------------------
def test_errors_are_one_clear_line(tmp_path, monkeypatch, measured):
    from pyengine.methods.base import Budget, Training, resolve_latency_budget, run_method
    g, lm = measured["resnet18"]
    s = _spec_type(g).full(g, "resnet18")
    # no input size
    s0 = dataclasses.replace(s, dense=dataclasses.replace(g, img_size=0))
    with pytest.raises(LatencyTableError, match="img_size") as e:
        pyengine.latency(s0)
    assert "\n" not in str(e.value)
    with pytest.raises(LatencyTableError, match="--img-size"):
        CnnLatencyModel.for_model(s0)
    # bad batch
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            pyengine.latency(s, batch=bad, table=lm.table)
    with pytest.raises(ValueError, match="positive integer"):
        CnnLatencyModel(lm.table, g, "resnet18", batch=0)
    # a batch the table lacks, a ViT's layout
    with pytest.raises(LatencyTableError, match="batch 4"):
        CnnLatencyModel(lm.table, g, "resnet18", batch=4)
    with pytest.raises(ValueError, match="CNN has none"):
        pyengine.latency(s, layout="exact", table=lm.table)
    # HiAP needs a differentiable expected latency: refused before anything is measured
    monkeypatch.setenv("PYENGINE_CACHE", str(tmp_path))
    monkeypatch.setenv("PYENGINE_LATENCY", "on")
    monkeypatch.setattr(measure_cnn, "measure_blocks",
                        lambda *a, **k: pytest.fail("measured for a refused method"))
    with pytest.raises(SettingError, match="hiap .*differentiable expected latency") as e:
        run_method(_model("resnet18"), "hiap", None, target=0.5, budget="latency",
                   progress=False, log=lambda t: None)
    assert "\n" not in str(e.value)
    with pytest.raises(SettingError, match="CNNs do not have yet"):
        resolve_latency_budget(Budget(budget="latency"), Training(), _model("resnet18"),
                               method="hiap")


def test_latency_prediction_cnn_script_dry_run(tmp_path, monkeypatch):
    import json

    from _bench import load_bench
    monkeypatch.setenv("PYENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PYENGINE_LATENCY", "on")
    monkeypatch.setattr(measure_cnn, "measure_blocks",
                        lambda g, model, batch, device, dtype, **kw: _fake_entry(g, seed=batch)[0])
    mod = load_bench("latency_prediction_cnn")
    assert mod.main(["--model", "resnet18", "--img-size", str(IMG), "--structures", "2",
                     "--batches", "1,2", "--threads", "1", "--warmup", "0", "--repeats", "2",
                     "--rounds", "1", "--out", str(tmp_path / "pred")]) == 0
    doc = json.loads((tmp_path / "pred.json").read_text())
    assert len(doc["rows"]) == 4 and set(doc["summary"]) == {"1", "2", "all"}
    for r in doc["rows"]:
        assert r["rel_error"] == pytest.approx(r["predicted_ms"] / r["measured"]["median_ms"] - 1)
        assert r["measured"]["repeats"] == 2
    assert set(doc["tables"]) == {"1", "2"} and doc["env"]["threads"] == 1
    assert "median |error|" in (tmp_path / "pred.log").read_text()
