"""The per-device latency table: interpolation, the file format and cache, what is measured
(structure only: no timing asserts), the predictions built on it, and the CLI command."""
import json
import random

import pytest
import torch

import pyengine
from pyengine.cost import latency_table as lt
from pyengine.cost.latency_table import Grid, LatencyTable, LatencyTableError, TableShape
from pyengine.measure import latency_calibration, latency_grid
from pyengine.structure.spec import Spec

from _latency import fake_table
from _specs import random_spec

KW = dict(img_size=32, patch_size=8, depth=2, num_heads=3, num_classes=5)


def _geometry():
    return pyengine.geometry(pyengine.create_model("vit_tiny_patch16_224", **KW))


def test_grid_is_multilinear_and_exact_on_multilinear_functions():
    rng = random.Random(0)
    axes = {"heads": [1.0, 2.0, 4.0, 6.0], "qk": [8.0, 16.0, 64.0], "v": [8.0, 32.0, 64.0]}

    def f(h, qk, v):  # multilinear: interpolation (and extrapolation above) is exact
        return 0.3 + 0.02 * h + 0.001 * qk * h + 0.004 * v + 1e-5 * h * qk * v

    vals = [f(h, q, v) for h in axes["heads"] for q in axes["qk"] for v in axes["v"]]
    g = Grid(axes, vals)
    for _ in range(50):
        h, q, v = rng.uniform(1, 9), rng.uniform(8, 90), rng.uniform(8, 64)
        assert g(heads=h, qk=q, v=v) == pytest.approx(f(h, q, v), rel=1e-9)
    # below the first point the first value holds
    assert g(heads=1, qk=1, v=8) == pytest.approx(f(1, 8, 8))
    assert Grid({}, [2.5])() == 2.5
    with pytest.raises(LatencyTableError, match="evaluated at"):
        g(heads=1, qk=8)
    with pytest.raises(LatencyTableError, match="must increase"):
        Grid({"w": [2.0, 1.0]}, [1.0, 2.0])
    with pytest.raises(LatencyTableError, match="needs 2 finite values"):
        Grid({"w": [1.0, 2.0]}, [1.0, float("nan")])


def test_batch_interpolation():
    vals = {1: 1.0, 8: 4.5}
    assert lt.interpolate_batch(vals, 1) == 1.0
    assert lt.interpolate_batch(vals, 4) == pytest.approx(1.0 + 3 / 7 * 3.5)
    assert lt.interpolate_batch(vals, 64) == pytest.approx(4.5 * 8)   # throughput-bound above
    assert lt.interpolate_batch({2: 3.0}, 1) == 3.0


def test_device_keys_and_candidates():
    assert lt.device_key_for("cpu", "AMD EPYC 7B13 64-Core Processor", 2) == \
        "cpu-amd-epyc-7b13-64-core-2t"
    assert lt.device_key_for("cuda", "NVIDIA H100 80GB HBM3") == "cuda-nvidia-h100-80gb-hbm3"
    with pytest.raises(ValueError, match="thread count"):
        lt.device_key_for("cpu", "x", 0)
    with pytest.raises(ValueError, match="cpu or cuda"):
        lt.device_key_for("mps", "x")
    assert lt.device_key("cpu").endswith(f"-{torch.get_num_threads()}t")
    # the GPU table measures SDPA (the torch reference path) and both kernels
    assert latency_grid.CANDIDATES["cuda"] == ("torch", "triton", "cuda")
    from pyengine.ops import available_backends
    cands = latency_grid.candidate_backends("cpu", torch.float32)
    assert cands[0] == "torch"
    assert ("cpu" in cands) == ("cpu" in available_backends("varlen_attention", "cpu"))
    assert "triton" not in cands   # never the interpreter on a CPU
    if torch.cuda.is_available():
        assert latency_grid.candidate_backends("cuda")[0] == "torch"


def test_file_round_trip_and_errors(tmp_path):
    g = _geometry()
    t = fake_table(g, candidates=("torch", "cpu"))
    p = t.save(tmp_path / "t.json")
    back = LatencyTable.load(p)
    assert back.to_dict() == t.to_dict()
    assert back.candidates(g) == ["torch", "cpu"] and back.batches(g) == [1, 8]
    d = json.loads(p.read_text())
    d["format"] = "pyengine.latency/0"
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(LatencyTableError, match="bad.json: format"):
        LatencyTable.load(tmp_path / "bad.json")
    d = json.loads(p.read_text())
    key = next(iter(d["shapes"]))
    d["shapes"][key]["batches"]["1"]["grids"]["qkv"]["ms"].pop()
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(LatencyTableError, match=r"grids\['qkv'\]"):
        LatencyTable.load(tmp_path / "bad.json")
    with pytest.raises(LatencyTableError, match="no entry for shape"):
        t.stem_ms(pyengine.geometry(pyengine.create_model("vit_tiny_patch16_224")), 1)


def test_predictions_add_up():
    g = _geometry()
    t = fake_table(g)
    b = 3
    buckets = [(2, 16, 32), (1, 0, 8), (3, 24, 24)]
    core = (t.value(g, "attn_ne/torch", b, heads=2, qk=16, v=32)
            + t.value(g, "attn0/torch", b, heads=1, v=8)
            + t.value(g, "attn_eq/torch", b, heads=3, width=24)
            + t.value(g, "runs/torch", b, runs=3))
    assert t.core_ms(g, b, buckets) == pytest.approx(core)
    sqk, sv = 2 * 16 + 3 * 24, 2 * 32 + 8 + 3 * 24
    assert t.attention_ms(g, b, buckets) == pytest.approx(
        t.branch_ms(g, b) + t.linear_ms(g, b, "qkv", 2 * sqk + sv) + core
        + t.linear_ms(g, b, "proj", sv))
    assert t.attention_ms(g, b, []) == 0.0 and t.mlp_ms(g, b, 0) == 0.0
    s = random_spec(g, 1, model="vit_tiny_patch16_224")
    want = t.stem_ms(g, b) + t.head_ms(g, b)
    for blk in s.blocks:
        shapes = {}
        for h in blk.heads:
            shapes[(len(h.qk), len(h.v))] = shapes.get((len(h.qk), len(h.v)), 0) + 1
        want += t.attention_ms(g, b, [(n, q, v) for (q, v), n in sorted(shapes.items())])
        want += t.mlp_ms(g, b, len(blk.mlp))
    assert t.spec_ms(s, b) == pytest.approx(want)
    # a padded layout is priced at its padded widths
    from pyengine.models.vit.layout import plan
    sp = plan(s, "padded")
    assert t.spec_ms(sp, b) == pytest.approx(t.spec_ms(lt_computed(sp), b))


def lt_computed(spec):
    from pyengine.models.vit.layout import computed_spec
    return computed_spec(spec)


def test_cache_is_read_completed_and_renewed(tmp_path, monkeypatch):
    monkeypatch.setenv("PYENGINE_CACHE", str(tmp_path))
    monkeypatch.setenv("PYENGINE_LATENCY", "on")   # the test suite turns measuring off
    g = _geometry()
    dt = torch.float32
    path = lt.table_path("cpu", dt)
    assert path.parent == tmp_path / "latency"
    assert lt.get_table(g, "cpu", dt, measure=False) is None
    calls = []

    def fake_measure(shape, batch, device, dtype, candidates, **kw):
        calls.append(batch)
        one = fake_table(g, batches=(batch,), candidates=candidates)
        return one.shapes[shape.key]["batches"][batch]["grids"], {"seconds": 0.0}

    monkeypatch.setattr(latency_grid, "measure_grids", fake_measure)
    calibrated = []

    def fake_calibration(shape, batch, device, dtype, grids, candidates, **kw):
        assert "mlp" in grids and candidates
        calibrated.append(batch)
        return ({"calib_attn": Grid({}, [1.2]), "calib_mlp": Grid({}, [1.1]),
                 "attn_ctx": Grid({}, [0.01]), "mlp_ctx": Grid({}, [0.02]),
                 "forward_ctx": Grid({}, [0.03])}, {"fake": True})

    monkeypatch.setattr(latency_calibration, "measure_calibration", fake_calibration)
    t = lt.get_table(g, "cpu", dt, batches=(1, 8), progress=False)
    assert calls == [1, 8] and path.is_file()
    assert calibrated == [1, 8] and t.calibrated(g) and t.scale(g, 4, "mlp") == 1.1
    # cached: nothing is measured again; a new batch is added to the same file
    assert lt.get_table(g, "cpu", dt, batches=(8, 1), progress=False).to_dict() == t.to_dict()
    lt.get_table(g, "cpu", dt, batches=(2,), progress=False)
    assert calls == [1, 8, 2] and lt.load_table("cpu", dt).batches(g) == [1, 2, 8]
    assert calibrated == [1, 8, 2]
    # a table measured before calibration existed is calibrated, its grids kept
    d = json.loads(path.read_text())
    for part in d["shapes"][TableShape.of(g).key]["batches"].values():
        del part["calibration"]
    path.write_text(json.dumps(d))
    lt.get_table(g, "cpu", dt, batches=(1,), progress=False)
    assert calls == [1, 8, 2] and calibrated == [1, 8, 2, 1, 2, 8]
    # a table from another torch is stale and measured again
    d = json.loads(path.read_text())
    d["env"]["torch"] = "0.0.1"
    path.write_text(json.dumps(d))
    lt.get_table(g, "cpu", dt, batches=(1,), progress=False)
    assert calls[-1] == 1 and lt.load_table("cpu", dt).env["torch"] == torch.__version__
    # ... and so is one whose linear layers were timed unlike the compact models run them
    from pyengine.models.packed_linear import LINEAR_KIND
    d = json.loads(path.read_text())
    assert d["env"]["linear"] == LINEAR_KIND
    d["env"]["linear"] = "something else"
    path.write_text(json.dumps(d))
    lt.get_table(g, "cpu", dt, batches=(1,), progress=False)
    assert len(calls) == 5 and lt.load_table("cpu", dt).env["linear"] == LINEAR_KIND
    # measuring off: what the cache has is used, nothing is measured
    monkeypatch.setenv("PYENGINE_LATENCY", "off")
    assert lt.get_table(g, "cpu", dt, batches=(1,)) is not None
    assert lt.get_table(g, "cpu", dt, batches=(64,)) is None
    assert len(calls) == 5


def test_measured_grids_have_the_documented_shape():
    # a tiny grid on a tiny shape: the structure of what is measured, not its values
    g = _geometry()
    shape = TableShape.of(g)
    pts = {"attn_eq": {"heads": [1, 3], "width": [8, 64]},
           "attn_ne": {"heads": [1, 3], "qk": [8, 64], "v": [16]}, "attn0": {"heads": [3], "v": [8]},
           "runs": {"runs": [1, 2, 3]}, "qkv": {"width": [32, 576]}, "proj": {"width": [192]},
           "mlp": {"width": [16, 768]}}
    grids, info = latency_grid.measure_grids(shape, 2, "cpu", torch.float32, ["torch"],
                                             points=pts, repeats=2, min_sample_ms=0.0,
                                             progress=False)
    assert set(grids) == {"attn_eq/torch", "attn_ne/torch", "attn0/torch", "runs/torch", "qkv",
                          "proj", "mlp", "branch", "stem", "head"}
    assert grids["attn_ne/torch"].axes == {"heads": [1.0, 3.0], "qk": [8.0, 64.0], "v": [16.0]}
    assert len(grids["attn_ne/torch"].ms) == 4 and grids["runs/torch"].ms[0] == 0.0
    assert grids["attn_eq/torch"].axes == {"heads": [1.0, 3.0], "width": [8.0, 64.0]}
    for name, gr in grids.items():
        if not name.startswith("runs"):
            assert all(v > 0 for v in gr.ms), name
    assert info["repeats"] == 2 and info["seconds"] >= 0
    # default axes cover the model's widths
    d = latency_grid.default_points(shape)
    assert d["attn_eq"]["width"] == [8, 16, 24, 32, 40, 48, 56, 64]
    assert d["attn_eq"]["heads"] == [1, 2, 3]
    # the unequal grid has no point with equal widths
    assert not set(d["attn_ne"]["qk"]) & set(d["attn_ne"]["v"])
    assert d["qkv"]["width"][-1] == 576 and d["mlp"]["width"][-1] == 768


def test_calibration_line_fit():
    fit = latency_calibration._fit
    # exact points on a line: slope and intercept recovered, the intercept of either sign for
    # a module line (big layers may lose more to a cold cache than small ones)
    pts = [(x, 1.4 * x + 0.2) for x in (0.5, 1.0, 2.0, 3.5)]
    assert fit(pts) == pytest.approx((1.4, 0.2))
    pts = [(x, 2.0 * x - 0.5) for x in (1.0, 2.0, 3.0)]
    assert fit(pts) == pytest.approx((2.0, -0.5))
    # a falling module line is not a cost model: the least-squares line through the origin
    pts = [(1.0, 3.0), (2.0, 2.0)]
    assert fit(pts) == (pytest.approx((3.0 + 4.0) / 5.0), 0.0)
    # layers of (nearly) one grid time: no line through them, the line through the origin
    assert fit([(1.0, 1.5), (1.0, 1.7)]) == (pytest.approx(1.6), 0.0)
    assert fit([]) == (1.0, 0.0)
    # the rest per kept branch may be negative (other lines' intercepts absorb it); the cost
    # per forward stays >= 0
    assert fit([(24, 1.0 - 0.01 * 24), (12, 1.0 - 0.01 * 12)], negative="slope") == \
        (pytest.approx(-0.01), pytest.approx(1.0))
    slope, fixed = fit([(24.0, 2.5), (12.0, 0.5)], negative="slope")
    assert fixed == 0.0 and slope == pytest.approx((60 + 6) / (24 ** 2 + 12 ** 2))
    assert fit([], negative="slope") == (0.0, 0.0)


def test_calibration_times_whole_models_of_the_shape():
    """Real (tiny) calibration: compact models of the shape built and timed; the four scalars
    and per-model records come back, and the table prices with them."""
    g = _geometry()
    shape = TableShape.of(g)
    t = fake_table(g, batches=(2,))
    part = t.shapes[shape.key]["batches"][2]
    grids, info = latency_calibration.measure_calibration(
        shape, 2, "cpu", torch.float32, part["grids"], ["torch"], repeats=2, depth=2,
        targets=(1.0, 0.4, -0.6), progress=False)
    assert set(grids) == set(latency_calibration.CALIBRATION_GRIDS)
    for name, gr in grids.items():
        v = gr()
        assert v >= 0 and v == v, name
    assert grids["calib_attn"]() > 0 and grids["calib_mlp"]() > 0
    assert [m["target"] for m in info["models"]] == [1.0, 0.4, -0.6]
    assert all(m["total_ms"] > 0 and m["branches"] >= 1 for m in info["models"])
    # the negative target keeps every other block's branches only
    assert [m["branches"] for m in info["models"]] == [4, 4, 2]
    # the model built for it has the shape's tokens, widths and classes
    vit = latency_calibration.calibration_vit(shape, depth=2)
    assert TableShape.of(pyengine.geometry(vit)) == shape
    part["grids"].update(grids)
    part["calibration"] = info
    assert t.calibrated(g) and t.calibration_done(g)
    # a shape no timm ViT has (heads x width != embed dim) is refused by name
    odd = TableShape(17, 100, 3, 64, 200, 16)
    with pytest.raises(LatencyTableError, match="heads x head width"):
        latency_calibration.calibration_vit(odd)


def test_cli_latency_table(tmp_path, capsys):
    from pyengine.cli import main
    out = tmp_path / "table.json"
    pts = {"attn_eq": {"heads": [3], "width": [64]}, "attn_ne": {"heads": [3], "qk": [64],
                                                               "v": [32]},
           "attn0": {"heads": [3], "v": [64]},
           "runs": {"runs": [1, 3]}, "qkv": {"width": [576]}, "proj": {"width": [192]},
           "mlp": {"width": [768]}}
    argv = ["latency-table", "--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(KW),
            "--repeats", "2", "--points", json.dumps(pts), "--out", str(out), "--no-progress"]
    assert main(argv + ["--batch", "1,2"]) == 0
    text = capsys.readouterr().out
    t = LatencyTable.load(out)
    g = _geometry()
    assert t.batches(g) == [1, 2] and "torch" in t.candidates(g)
    assert "dense model" in text and f"wrote {out}" in text
    assert main(argv + ["--batch", "0"]) == 1
    assert "batch sizes must be positive" in capsys.readouterr().err
