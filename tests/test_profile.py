"""pyengine profile: measured peaks, per-layer times attributed to the right rows, achieved
rates and bounds consistent with the cost model, JSON and the roofline plot (tiny ViT, CPU)."""
import json
import time

import pytest
import torch
from torch import nn

import pyengine
from pyengine.cli import main
from pyengine.measure.roofline import layer_times, measure_peaks, profile

NAME = "vit_tiny_patch16_224"
KW = {"depth": 2, "img_size": 32, "patch_size": 8}


def test_measure_peaks_cpu():
    peaks, raw = measure_peaks("cpu", torch.float32, copy_mib=4, gemm_n=128, repeats=3)
    assert peaks.flops_per_s > 0 and peaks.bytes_per_s > 0
    assert raw["flops_per_s"] == peaks.flops_for(torch.float32)
    assert raw["ridge_flop_per_byte"] == pytest.approx(peaks.ridge(torch.float32))
    assert raw["flops_per_s"] == pytest.approx(2 * 128 ** 3 / (raw["gemm_ms"] / 1e3))
    assert raw["bytes_per_s"] == pytest.approx(2 * 4 * 2 ** 20 / (raw["copy_ms"] / 1e3))
    with pytest.raises(ValueError):
        measure_peaks("cpu", torch.float32, copy_mib=-1)


class _Slow(nn.Module):
    def __init__(self, inner, seconds):
        super().__init__()
        self.inner, self.seconds = inner, seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return self.inner(x)


def test_layer_times_attribute_time_to_the_right_row():
    model = pyengine.create_model(NAME, **KW).eval()
    model.blocks[1].mlp.act = _Slow(model.blocks[1].mlp.act, 0.006)
    model.blocks[0].attn.fused_attn = False  # attention core in plain ops: still attributed
    names = [r.name for r in pyengine.cost(model, batch=2).layers]
    med, total, other = layer_times(model, torch.randn(2, 3, 32, 32), names, warmup=1,
                                    repeats=5)
    assert med["blocks.1.mlp.act"] >= 6.0
    assert total >= med["blocks.1.mlp.act"] and other >= 0
    # rows with a module of their name, and the attention cores, are timed; adds are not
    for r in ("patch_embed", "blocks.0.attn.qkv", "blocks.0.attn.sdpa", "blocks.1.mlp.fc2",
              "norm", "head"):
        assert r in med and med[r] >= 0
    assert "blocks.0.add1" not in med and "pos_embed" not in med
    # layer_stats: the harness's statistics of the same marks (median, IQR, ...)
    from pyengine.measure.roofline import layer_stats
    st, total_st, other_st = layer_stats(model, torch.randn(2, 3, 32, 32), names, warmup=0,
                                         repeats=3)
    assert set(st) == set(med) and total_st["repeats"] == other_st["repeats"] == 3
    assert st["blocks.1.mlp.act"]["median_ms"] >= 6.0
    assert all(v["iqr_ms"] >= 0 and v["min_ms"] <= v["median_ms"] for v in st.values())
    # hooks are removed afterwards
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_profile_cli_dense_and_compact(tmp_path, capsys):
    js, png = tmp_path / "p.json", tmp_path / "p.png"
    assert main(["profile", "--model", NAME, "--model-kwargs", json.dumps(KW), "--target", "0.5",
                 "--batch", "3", "--dtype", "fp32", "--device", "cpu", "--repeats", "3",
                 "--warmup", "1", "--copy-mib", "4", "--gemm-n", "128",
                 "--json", str(js), "--plot", str(png)]) == 0
    assert "TFLOP/s" in capsys.readouterr().out
    rep = json.loads(js.read_text())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    for k in ("gpu", "driver", "torch", "triton", "cuda"):
        assert k in rep["env"]
    pk = rep["peaks"]
    assert pk["flops_per_s"] > 0 and pk["bytes_per_s"] > 0
    ridge = pk["flops_per_s"] / pk["bytes_per_s"]
    assert [p["variant"] for p in rep["profiles"]] == ["dense", "compact"]
    dense, compact = rep["profiles"]
    assert compact["macs"] < dense["macs"]
    ref = pyengine.cost(pyengine.create_model(NAME, **KW), batch=3)
    assert dense["macs"] == ref.macs and dense["bytes"] == ref.bytes
    for p in rep["profiles"]:
        assert p["batch"] == 3 and p["dtype"] == "float32" and p["total_ms"] > 0
        rows = {r["name"]: r for r in p["layers"]}
        assert sum(r["flops"] for r in p["layers"]) == p["flops"] == 2 * p["macs"]
        for r in p["layers"]:
            if r["name"] == "other":
                assert r["measured_ms"] >= 0 and r["measured_iqr_ms"] >= 0
                continue
            if r["measured_ms"] is not None:
                assert r["measured_iqr_ms"] >= 0
            assert r["bound"] == ("compute" if r["intensity"] >= ridge else "memory")
            if r["measured_ms"] is not None and r["measured_ms"] > 0:
                t = r["measured_ms"] / 1e3
                assert r["achieved_tflops"] == pytest.approx(r["flops"] / t / 1e12)
                assert r["achieved_gbps"] == pytest.approx(r["bytes"] / t / 1e9)
        for name in ("blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.sdpa", "head"):
            assert rows[name]["measured_ms"] is not None
        assert rows["blocks.0.add1"]["measured_ms"] is None
    # the compact rows are the compact model's: fewer qkv FLOPs than dense
    d_rows = {r["name"]: r for r in dense["layers"]}
    c_rows = {r["name"]: r for r in compact["layers"]}
    assert c_rows["blocks.0.attn.qkv"]["flops"] < d_rows["blocks.0.attn.qkv"]["flops"]


def test_profile_errors():
    m = pyengine.create_model(NAME, **KW)
    with pytest.raises(ValueError, match="batch"):
        profile({"dense": m}, batch=0, dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="at least one"):
        profile({}, batch=1, dtype="float32", device="cpu")
