"""pyengine bench: the harness's statistics, the report's fields and values, the variants it
builds, and its errors (on a tiny ViT, CPU)."""
import json
import time

import numpy as np
import pytest
import torch

import pyengine
from pyengine.measure import bench as B
from pyengine.cli import main

NAME = "vit_tiny_patch16_224"
KW = {"depth": 2, "img_size": 32, "patch_size": 8}
ARGS = ["--model", NAME, "--model-kwargs", json.dumps(KW), "--dtype", "fp32",
        "--device", "cpu", "--warmup", "1", "--repeats", "4", "--rounds", "2"]


def test_summarize_matches_numpy():
    for n in (1, 2, 5, 50):
        t = (torch.rand(n, dtype=torch.float64) * 10).tolist()
        s = B.summarize(t)
        q1, q3 = np.percentile(t, [25, 75])
        assert s["median_ms"] == pytest.approx(float(np.median(t)))
        assert s["iqr_ms"] == pytest.approx(q3 - q1, abs=1e-12)
        assert s["min_ms"] == min(t) and s["repeats"] == n
        assert s["mean_ms"] == pytest.approx(float(np.mean(t)))
    with pytest.raises(ValueError):
        B.summarize([])


def test_time_callables_measures_what_runs():
    # sleeps last at least as long as asked: the harness must not report less
    calls = {"a": 0, "b": 0}

    def a():
        calls["a"] += 1
        time.sleep(0.004)

    def b():
        calls["b"] += 1
        time.sleep(0.001)

    st = B.time_callables({"a": a, "b": b}, torch.device("cpu"), warmup=2, repeats=7, rounds=3)
    assert calls == {"a": 2 + 1 + 7, "b": 2 + 1 + 7}   # warm-up, inner estimate, samples
    assert st["a"]["repeats"] == st["b"]["repeats"] == 7
    assert st["a"]["min_ms"] >= 4.0 and st["b"]["min_ms"] >= 1.0
    assert st["a"]["median_ms"] > st["b"]["median_ms"]
    assert all(s["iqr_ms"] >= 0 for s in st.values())
    # short calls are repeated inside one sample until it lasts min_sample_ms
    st = B.time_callables({"b": b}, torch.device("cpu"), warmup=0, repeats=2, rounds=1,
                          min_sample_ms=5.0)
    assert st["b"]["inner"] >= 2 and st["b"]["median_ms"] >= 1.0
    with pytest.raises(ValueError):
        B.time_callables({"b": b}, torch.device("cpu"), repeats=0)


def test_bench_cli_report(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", *ARGS, "--target", "0.5", "--batch", "1,3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "images/s" in printed and "torch-pruning" in printed
    rep = json.loads(out.read_text())
    for k in ("gpu", "driver", "torch", "triton", "cuda"):
        assert k in rep["env"]
    assert rep["env"]["torch"] == torch.__version__ and rep["env"]["gpu"] is None
    res = rep["results"]
    assert [(r["batch"], r["variant"]) for r in res] == [
        (b, v) for b in (1, 3) for v in ("dense", "compact", "padded", "torch-pruning")]
    # the same models, rebuilt, give the MACs the report claims
    v = B.build_variants(NAME, target=0.5, model_kwargs=KW)
    for r in res:
        for k in ("variant", "model", "batch", "dtype", "median_ms", "iqr_ms", "macs"):
            assert k in r
        assert r["model"] == NAME and r["dtype"] == "float32" and r["mode"] == "eager"
        assert r["median_ms"] > 0 and r["iqr_ms"] >= 0 and r["min_ms"] <= r["median_ms"]
        assert r["repeats"] == 4 and r["input_shape"] == [r["batch"], 3, 32, 32]
        assert r["macs"] == pyengine.cost(v.models[r["variant"]], batch=r["batch"]).macs
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["median_ms"] * 1e3)
        dense = next(d for d in res if d["batch"] == r["batch"] and d["variant"] == "dense")
        assert r["speedup"] == pytest.approx(dense["median_ms"] / r["median_ms"])
        assert r["macs_ratio"] == pytest.approx(r["macs"] / dense["macs"])
        assert r["speedup_per_mac_reduction"] == pytest.approx(r["speedup"] * r["macs_ratio"])
        # the speedup's spread: quartiles of the paired per-pass ratios dense / variant
        assert 0 < r["speedup_p25"] <= r["speedup_p75"]
        assert r["speedup_iqr"] == pytest.approx(r["speedup_p75"] - r["speedup_p25"])
    by = {r["variant"]: r for r in res if r["batch"] == 1}
    assert by["dense"]["speedup"] == 1.0
    assert by["dense"]["speedup_p25"] == by["dense"]["speedup_p75"] == 1.0
    assert by["compact"]["attention_backend"] == "auto"
    assert abs(by["compact"]["macs_ratio"] - 0.5) < 0.03
    assert by["padded"]["macs"] >= by["compact"]["macs"]
    assert abs(by["torch-pruning"]["macs"] / by["compact"]["macs"] - 1) < 0.05
    assert rep["checks"]["padded_vs_compact_rel_diff"] < 1e-5
    assert rep["config"]["torch_pruning"]["head_dim"] % 8 == 0
    assert rep["skipped"] == []


def test_bench_saved_dir_and_missing_peer(tmp_path, monkeypatch):
    gated = pyengine.gate(pyengine.create_model(NAME, **KW))
    from pyengine.structure.synthetic import heterogeneous_spec
    s = heterogeneous_spec(pyengine.geometry(gated), 0.6, seed=2, model=NAME)
    pyengine.apply(gated, s)
    pyengine.save(pyengine.compile(gated), tmp_path / "m")
    # Torch-Pruning missing (as it may be on a GPU box): skipped with the reason, not a crash
    monkeypatch.setattr("pyengine.baselines.torch_pruning_available",
                        lambda: (False, "torch_pruning is not importable (test)"))
    v = B.build_variants(str(tmp_path / "m"), ["dense", "padded", "torch-pruning"])
    assert list(v.models) == ["dense", "compact", "padded"]
    assert v.skipped == {"torch-pruning": "torch_pruning is not importable (test)"}
    assert v.model == NAME and pyengine.spec(v.models["compact"]).blocks == s.blocks
    rep = B.bench(v, [2], dtype="float32", device="cpu", warmup=0, repeats=2, rounds=1,
                  show=lambda s: None)
    assert rep["skipped"] == [{"variant": "torch-pruning",
                               "reason": "torch_pruning is not importable (test)"}]
    assert {r["variant"] for r in rep["results"]} == {"dense", "compact", "padded"}
    assert "skipped torch-pruning" in B.format_report(rep)


@pytest.mark.parametrize("extra,msg", [
    (["--compare", "dense,sparse"], "unknown variant"),
    (["--batch", "1,0", "--target", "0.5"], "positive integers"),
    (["--compare", "dense,padded"], "need a pruned model"),
    (["--target", "0.5", "--graphs", "--compare", "dense"], "CUDA"),
    (["--target", "0.5", "--spec", "x.json"], "not both"),
    (["--target", "0.5", "--backend", "magic"], "unknown attention backend"),
])
def test_bench_cli_errors(extra, msg, capsys):
    batch = [] if "--batch" in extra else ["--batch", "1"]
    assert main(["bench", *ARGS, *batch, *extra]) == 1
    assert msg in capsys.readouterr().err


def test_bench_dense_only_and_parsers():
    v = B.build_variants(NAME, ["dense"], model_kwargs=KW)
    assert list(v.models) == ["dense"]
    assert B.parse_batches("1, 8,64") == [1, 8, 64]
    assert B.parse_compare("dense, torch-pruning") == ["dense", "torch-pruning"]
    with pytest.raises(ValueError, match="'x'"):
        B.parse_batches("1,x")
    with pytest.raises(FileNotFoundError):
        B.load_models("no/such/dir")
    with pytest.raises(ValueError, match="neither"):
        B.load_models("no_such_timm_model_xyz")


def test_gpu_end_to_end_script_dry_run_on_cpu(tmp_path):
    # the GPU script cannot run here; its CPU dry run exercises every stage but CUDA graphs
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_end_to_end.py"
    spec = importlib.util.spec_from_file_location("gpu_end_to_end", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--device", "cpu", "--model", NAME, "--model-kwargs", json.dumps(KW),
                     "--dtype", "fp32", "--batches", "1,2", "--repeats", "3", "--warmup", "1",
                     "--rounds", "1", "--profile-batch", "2", "--copy-mib", "4",
                     "--gemm-n", "128", "--out", str(tmp_path)]) == 0
    js = sorted(tmp_path.glob("cpu-*.json"))
    assert len(js) == 1
    doc = json.loads(js[0].read_text())
    stem = js[0].stem
    for suffix in (".log", "-speedup.png", "-roofline.png"):
        assert (tmp_path / f"{stem}{suffix}").stat().st_size > 0
    assert "=== bench eager" in (tmp_path / f"{stem}.log").read_text()
    assert {r["variant"] for r in doc["results"]} == {"dense", "compact", "padded",
                                                      "torch-pruning"}
    assert {r["batch"] for r in doc["results"]} == {1, 2}
    assert doc["stages"]["graphs"]["skipped"].startswith("CUDA graphs")
    assert "error" not in json.dumps(doc["stages"])
    assert [p["variant"] for p in doc["profile"]["profiles"]] == ["dense", "compact"]
    eager = doc["summary"]["modes"]["eager"]
    assert set(eager["checks"]) == {"compact_at_batch_2_>=_0.9", "compact_>=_padded_every_batch",
                                    "compact_>=_torch-pruning_every_batch"}
    # padded is credited with the compact model's (useful) MACs
    assert eager["table"]["padded"]["1"]["useful_macs_ratio"] == \
        eager["table"]["compact"]["1"]["useful_macs_ratio"]


def test_bench_deadline_skips_late_batches():
    v = B.build_variants(NAME, ["dense"], model_kwargs=KW)
    rep = B.bench(v, [1, 2], dtype="float32", device="cpu", warmup=0, repeats=1, rounds=1,
                  show=lambda s: None, deadline=time.perf_counter() - 1)
    assert rep["results"] == [] and rep["config"]["skipped_batches"] == [1, 2]


def test_bench_layouts_modes_and_realized(tmp_path, capsys):
    # the compact model in the padded layout beside the exact one, two modes in one run
    out = tmp_path / "bench.json"
    assert main(["bench", *ARGS, "--target", "0.5", "--batch", "2", "--layout", "padded",
                 "--compare", "dense,exact,padded", "--modes", "eager,eager", "--json",
                 str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["config"]["modes"] == ["eager"]
    assert rep["config"]["layout"]["mode"] == "padded"
    res = {r["variant"]: r for r in rep["results"]}
    assert set(res) == {"dense", "compact", "exact", "padded"}
    assert res["compact"]["layout"]["mode"] == "padded" and res["exact"]["layout"]["mode"] == "exact"
    # realized: speedup on the pruned structure's MACs (the exact layout's), whatever the layout
    assert res["compact"]["structure_macs_ratio"] == pytest.approx(res["exact"]["macs_ratio"])
    assert res["compact"]["macs"] >= res["exact"]["macs"]
    for r in res.values():
        assert r["realized"] == pytest.approx(r["speedup"] * r["structure_macs_ratio"])
    assert res["dense"]["realized"] == 1.0
    assert rep["checks"]["exact_vs_compact_rel_diff"] < 1e-5
    assert rep["checks"]["padded_vs_compact_rel_diff"] < 1e-5
    assert "realized" in capsys.readouterr().out
    assert main(["bench", *ARGS, "--target", "0.5", "--batch", "1", "--modes", "fast"]) == 1
    assert "unknown mode" in capsys.readouterr().err
    assert main(["bench", *ARGS, "--target", "0.5", "--batch", "1", "--layout", "wide"]) == 1
    assert "--layout must be one of" in capsys.readouterr().err
