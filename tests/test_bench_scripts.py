"""The bench/ scripts are thin callers of pyengine.measure: each loads, and the ones that can
run on a CPU do, on tiny shapes (numbers meaningless), writing the harness's statistics and
environment record. (bench/gpu_end_to_end.py's dry run is in test_bench.py; the timing of
bench/cpu_compact_speedup.py is the demo's compact_vs_dense, run in test_cli_demo.py.)"""
import json

import pytest
import torch

from _bench import BENCH, load_bench as load
from pyengine.ops import _ext

STATS = {"median_ms", "iqr_ms", "min_ms", "mean_ms", "repeats", "inner"}


@pytest.mark.parametrize("name", sorted(p.stem for p in BENCH.glob("*.py")))
def test_every_bench_script_loads(name):
    assert load(name).__doc__


@pytest.fixture
def threads():
    """The scripts set torch's thread count; put it back afterwards."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_cpu_csrc_dry_run(tmp_path, threads):
    mod = load("cpu_csrc")
    mod.main(["--batch", "1", "--repeats", "2", "--warmup", "0", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "cpu_csrc.json").read_text())
    assert doc["env"]["device"] == "cpu" and doc["env"]["threads"] == 1
    assert len(doc["rows"]) == 6
    for r in doc["rows"]:
        assert STATS <= set(r) and r["repeats"] == 2
        if r["backend"] == "cpu":
            assert r["speedup_vs_torch"]["pairs"] == 2
    assert "speedup cpu vs torch" in (tmp_path / "cpu_csrc.log").read_text()


@pytest.mark.skipif(not _ext.available(), reason="pyengine._C is not built")
def test_cpu_varlen_attention_dry_run(tmp_path, threads):
    mod = load("cpu_varlen_attention")
    assert mod.main(["--batch", "1", "--dtypes", "float32,bfloat16", "--threads", "1",
                     "--tokens", "17", "--widths", "40", "--model", "vit_tiny_patch16_224",
                     "--model-kwargs", json.dumps({"depth": 2, "img_size": 32, "patch_size": 8}),
                     "--repeats", "2", "--warmup", "0", "--min-sample-ms", "0",
                     "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "cpu_varlen_attention.json").read_text())
    assert doc["env"]["device"] == "cpu" and doc["env"]["threads"] == 1
    rows = doc["rows"]
    # per dtype: uniform 10x40 (sdpa, torch, cpu), mix6, two_runs, the model's layers (torch,
    # cpu each), the model (torch, cpu)
    assert len(rows) == 2 * (3 + 3 * 2 + 2)
    assert all(STATS <= set(r) and r["repeats"] == 2 for r in rows)
    for r in rows:
        if r["contender"] == "cpu":
            assert r["torch_over_cpu"]["pairs"] == 2
            assert r["max_abs_diff"] < (1e-4 if r["dtype"] == "float32" else 5e-2)
            assert ("sdpa_over_cpu" in r) == (r["section"] == "uniform")
    uniform = next(r for r in rows if r["section"] == "uniform")
    assert uniform["flops"] == 2 * 17 * 17 * 10 * (40 + 40)  # count_flops of the reference
    assert "torch_over_cpu" in (tmp_path / "cpu_varlen_attention.log").read_text()


def test_bench_ops_dry_run(tmp_path, threads):
    mod = load("bench_ops")
    assert mod.main(["--batch", "1", "--repeats", "2", "--warmup", "0", "--threads", "1",
                     "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "bench_ops.json").read_text())
    assert doc["env"]["device"] == "cpu"
    assert {(r["op"], r["backend"]) for r in doc["rows"]} >= {
        ("varlen_attention", "torch"), ("masked_ffn", "torch"),
        ("importance_reduce_many", "torch")}
    assert all(STATS <= set(r) for r in doc["rows"])
    assert {s["backend"] for s in doc["skipped"]} >= {"triton", "cuda"}   # no GPU here


def test_hiap_step_time_dry_run_on_cpu(tmp_path, threads):
    mod = load("hiap_step_time")
    assert mod.main(["--device", "cpu", "--model", "vit_tiny_patch16_224", "--model-kwargs",
                     json.dumps({"depth": 1, "img_size": 32, "patch_size": 8}),
                     "--batch", "2", "--steps", "2", "--warmup", "0",
                     "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "hiap_step_time_vit_tiny_patch16_224_b2.json").read_text())
    assert set(doc["variants"]) == {"plain", "hiap", "hiap_kd"}
    assert all(STATS <= set(v) and v["repeats"] == 2 for v in doc["variants"].values())
    assert doc["hiap_over_plain"] == doc["hiap_over_plain_spread"]["ratio"]
    assert doc["env"]["device"] == "cpu"


def test_gpu_ops_timings_on_cpu_interpreter(threads):
    # the Triton interpreter (conftest sets TRITON_INTERPRET=1): correctness of the script, not
    # speed; each comparison goes through the harness, interleaved
    mod = load("gpu_ops")
    mod.TIMING.update(warmup=0, repeats=1)
    cpu = torch.device("cpu")
    r = mod.time_ffn(32, 64, 40, 0.5, torch.float32, cpu)
    assert set(r["stats_fwd_bwd"]) == {"dense", "triton", "torch_ref"}
    assert r["triton_fwd_bwd_ms"] == r["stats_fwd_bwd"]["triton"]["median_ms"]
    qk, vd = [16, 8], [8, 16]
    r = mod.time_attention("t", qk, vd, 1, 5, torch.float32, cpu, with_sdpa=False)
    assert set(r["stats_fwd"]) == {"triton", "triton_launch_per_bucket", "torch_ref"}
    assert r["torch_ref_fwd_ms"] == r["stats_fwd"]["torch_ref"]["median_ms"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_gpu_only_scripts_refuse_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["gpu_csrc.py", "--out", str(tmp_path)])
    assert load("gpu_csrc").main() == 2
    assert load("hiap_step_time").main(["--out", str(tmp_path)]) == 2


def test_hiap_deit_small_spec_dry_run(tmp_path, threads, monkeypatch):
    # the recipe on a tiny ViT for one short epoch: a valid spec of the benched geometry
    from pyengine.structure.spec import Spec
    mod = load("hiap_deit_small_spec")
    out = tmp_path / "spec.json"
    kw = {"depth": 2, "patch_size": 8, "embed_dim": 32, "num_heads": 2}
    assert mod.main(["--out", str(out), "--model", "vit_tiny_patch16_224", "--model-kwargs",
                     json.dumps(kw), "--img-size", "16", "--dense-epochs", "1", "--epochs", "1",
                     "--batch-size", "256"]) == 0
    s = Spec.load(out)
    assert s.model == "vit_tiny_patch16_224" and s.dense.num_tokens == 28 * 28 + 1
    assert s.meta["made_by"] == "bench/hiap_deit_small_spec.py"
    assert abs(s.meta["macs_ratio"] - 0.5) <= 0.03 * 0.5 + 1e-9
