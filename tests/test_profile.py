"""pyengine profile: the roof is an upper bound (maxima over the probes tried), a layer above it
is reported and the roof raised, the dtype defaults per device, per-row times go to the right
rows by module name (any family), and the JSON and plot carry what the issue asks (tiny ViT,
CPU; no timing asserts beyond structural ones)."""
import copy
import json
import time

import pytest
import torch
from torch import nn

import pyengine
from pyengine.cli import main
from pyengine.cost import PEAKS
from pyengine.measure.roof import (Probe, Roof, default_dtype, gemm_probes, ladder, llc_bytes,
                                   stream_probes)
from pyengine.measure.roofline import (RowTimer, analyse, format_profile, layer_stats,
                                       layer_times, measure_peaks, plot, profile)

NAME = "vit_tiny_patch16_224"
KW = {"depth": 2, "img_size": 32, "patch_size": 8}
FAST = dict(gemm_sizes=[32, 64], copy_mib=1, repeats=2, warmup=1)


# --------------------------------------------------------------------------------------
# dtype per device
# --------------------------------------------------------------------------------------

def test_default_dtype_per_device(monkeypatch):
    # a CPU with avx512_bf16 dot products but no matrix units (this machine): fp32
    dt, why = default_dtype("cpu", flags={"avx2", "avx512f", "avx512_bf16"})
    assert dt == torch.float32 and "without bf16 matrix units" in why
    assert default_dtype("cpu", flags=set())[0] == torch.float32
    # AMX-BF16: bf16
    dt, why = default_dtype("cpu", flags={"avx512f", "amx_tile", "amx_bf16", "amx_int8"})
    assert dt == torch.bfloat16 and "AMX" in why
    # GPUs: bf16 where the tensor cores have it, else fp16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert default_dtype("cuda")[0] == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert default_dtype("cuda")[0] == torch.float16


# --------------------------------------------------------------------------------------
# The roof: maxima over the probes tried
# --------------------------------------------------------------------------------------

def _probe(name, kind, work, footprint=0, stream=""):
    return Probe(name, kind, work, lambda: None, footprint, stream)


def test_roof_is_the_max_over_probes_and_samples():
    probes = [_probe("gemm a", "compute", 2e9), _probe("layer fc1", "compute", 3e9),
              _probe("gemm b", "compute", 1e9),
              _probe("copy 1 MiB", "memory", 2 ** 20, 2 ** 20, "copy"),
              _probe("read 1 MiB", "memory", 2 ** 20, 2 ** 20, "read"),
              _probe("copy 4 MiB", "memory", 4 * 2 ** 20, 4 * 2 ** 20, "copy"),
              _probe("read 4 MiB", "memory", 4 * 2 ** 20, 4 * 2 ** 20, "read"),
              _probe("copy 64 MiB", "memory", 64 * 2 ** 20, 64 * 2 ** 20, "copy"),
              _probe("read 64 MiB", "memory", 64 * 2 ** 20, 64 * 2 ** 20, "read")]
    times = {"gemm a": [40.0, 20.0, 30.0],          # best 20 ms: 100 GFLOP/s
             "layer fc1": [25.0, 60.0, 20.0],       # best 20 ms: 150 GFLOP/s  <- the max
             "gemm b": [5.0, 9.0, 12.0],            # best 5 ms: 200 ... no: 1e9 / 5e-3 = 200
             "copy 1 MiB": [0.05, 0.04, 0.08], "read 1 MiB": [0.02, 0.03, 0.05],
             "copy 4 MiB": [0.4, 0.3, 0.5], "read 4 MiB": [0.2, 0.6, 0.5],
             "copy 64 MiB": [9.0, 8.0, 10.0], "read 64 MiB": [6.0, 7.0, 9.0]}
    llc = (16 * 2 ** 20, "test")
    roof = Roof.measured(probes, times, "test device", torch.float32, llc, 64 * 2 ** 20)
    rates = {p["name"]: p["rate"] for p in roof.probes}
    for p in probes:
        assert rates[p.name] == pytest.approx(p.work / (min(times[p.name]) / 1e3))
    assert roof.flops_per_s == pytest.approx(max(rates[n] for n in ("gemm a", "layer fc1",
                                                                    "gemm b")))
    assert roof.flops_per_s == pytest.approx(1e9 / 5e-3)
    # each footprint's ceiling is the better of its copy and read; DRAM: the largest stream
    ceil = dict(roof.ceilings)
    for fp in (2 ** 20, 4 * 2 ** 20, 64 * 2 ** 20):
        mib = fp // 2 ** 20
        assert ceil[fp] == pytest.approx(max(rates[f"copy {mib} MiB"], rates[f"read {mib} MiB"]))
    assert roof.dram_bytes_per_s == pytest.approx(ceil[64 * 2 ** 20])
    # a layer's memory roof: the best ceiling above B/4, never below DRAM
    assert roof.bandwidth(4 * 2 ** 20) == pytest.approx(ceil[4 * 2 ** 20])
    assert roof.bandwidth(3 * 2 ** 20) == pytest.approx(ceil[2 ** 20])   # in cache: faster
    assert roof.bandwidth(7 * 2 ** 20) == pytest.approx(ceil[4 * 2 ** 20])
    assert roof.bandwidth(1e12) == pytest.approx(roof.dram_bytes_per_s)
    assert roof.bandwidth(1000) == pytest.approx(max(ceil[2 ** 20], roof.dram_bytes_per_s))
    # an unlucky probe (every sample preempted) does not pull a smaller footprint's roof
    # below a larger footprint's
    unlucky = dict(times, **{"copy 4 MiB": [40.0, 50.0], "read 4 MiB": [45.0, 60.0]})
    r2 = Roof.measured(probes, unlucky, "test device", torch.float32, llc, 64 * 2 ** 20)
    assert r2.bandwidth(4 * 2 ** 20) == pytest.approx(dict(r2.ceilings)[64 * 2 ** 20])
    assert r2.bandwidth(4 * 2 ** 20) > dict(r2.ceilings)[4 * 2 ** 20]
    assert "best of 3 GEMMs" in roof.method["compute"] and "layer fc1" not in roof.method["memory"]
    # bound and time at the roof
    assert roof.bound(0, 10 ** 6) == "memory" and roof.bound(10 ** 12, 1) == "compute"
    assert roof.time_s(1e9, 2 ** 20) == pytest.approx(max(1e9 / roof.flops_per_s,
                                                          2 ** 20 / roof.bandwidth(2 ** 20)))


def test_ladder_covers_every_footprint():
    fps = [5_000, 123_456, 7 * 2 ** 20, 40 * 2 ** 20]
    lad = ladder(fps, llc=32 * 2 ** 20)
    assert max(lad) == 128 * 2 ** 20          # the DRAM stream: 4x the last-level cache
    assert min(lad) >= 16 * 2 ** 10
    for b in fps:
        if b >= 4 * min(lad):
            assert any(b / 4 < s <= b for s in lad), b
    assert ladder([10 ** 6], llc=2 ** 20, top=3 * 2 ** 20)[-1] == 3 * 2 ** 20


def test_llc_from_sysfs(tmp_path):
    for i, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"),
                                             (2, "Unified", "2048K"), (3, "Unified", "266240K")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    size, src = llc_bytes("cpu", sysfs=str(tmp_path))
    assert size == 266240 * 1024 and "L3" in src
    size, src = llc_bytes("cpu", sysfs=str(tmp_path / "missing"))
    assert size > 0 and src  # sysconf, or the assumed safe size, named as such


def test_measure_peaks_real_probes_are_maxima():
    roof = measure_peaks("cpu", torch.float32, gemm_sizes=[16, 48], copy_mib=1,
                         footprints=[64 * 2 ** 10, 2 ** 20], repeats=3, warmup=1)
    comp = [p for p in roof.probes if p["kind"] == "compute"]
    assert {p["name"] for p in comp} == {"gemm 16x16x16", "gemm 48x48x48"}
    assert roof.flops_per_s == max(p["rate"] for p in comp) > 0
    for p in roof.probes:
        assert p["samples"] == 3 and p["best_ms"] <= p["median_ms"]
        assert p["rate"] == pytest.approx(p["work"] / (p["best_ms"] / 1e3))
    mem = [p for p in roof.probes if p["kind"] == "memory"]
    assert {p["stream"] for p in mem} == {"copy", "read"}
    assert max(p["footprint"] for p in mem) == 2 * 2 ** 20      # --copy-mib 1: 1 MiB -> 1 MiB
    assert roof.dram_bytes_per_s == max(p["rate"] for p in mem
                                        if p["footprint"] == 2 * 2 ** 20)
    assert roof.dtype == "float32"
    with pytest.raises(ValueError, match="copy_mib"):
        measure_peaks("cpu", torch.float32, copy_mib=-1)
    with pytest.raises(ValueError, match="GEMM sizes"):
        gemm_probes([0], torch.float32, torch.device("cpu"))


def test_stream_probes_move_what_they_say():
    probes = stream_probes([64 * 2 ** 10, 2 ** 20], torch.device("cpu"))
    for p in probes:
        assert p.work == p.footprint
        out = p.fn()
        if p.stream == "read":
            assert out.numel() == 1
        else:
            assert out.numel() * out.element_size() * 2 == p.footprint


def test_vendor_peaks_have_sources():
    for key, pk in PEAKS.items():
        assert pk.source, key
    roof = Roof.vendor(PEAKS["h100-sxm"], torch.bfloat16)
    assert roof.flops_per_s == 989e12 and roof.dram_bytes_per_s == 3.35e12
    assert "data sheet" in roof.method["compute"] and roof.source == "vendor"
    assert roof.bandwidth(10) == roof.bandwidth(10 ** 10) == 3.35e12


# --------------------------------------------------------------------------------------
# Above the roof: reported, roof raised, never silently (made-up times)
# --------------------------------------------------------------------------------------

def _fake_report(rows_ms):
    c = pyengine.cost(pyengine.create_model(NAME, **KW), batch=2)
    layers = []
    for r in c.layers:
        d = {"name": r.name, "kind": r.kind, "macs": r.macs, "flops": r.flops,
             "bytes": r.bytes, "params": r.params, "intensity": r.intensity,
             "measured_ms": rows_ms.get(r.name), "timed_as": "module"}
        layers.append(d)
    layers.append({"name": "other", "kind": "other", "macs": 0, "flops": 0, "bytes": 0,
                   "params": 0, "intensity": 0.0, "measured_ms": 0.5})
    prof = {"variant": "dense", "model": NAME, "batch": 2, "dtype": "float32",
            "total_ms": 10.0, "total_iqr_ms": 0.1, "macs": c.macs, "flops": c.flops,
            "bytes": c.bytes, "params": c.params, "layers": layers}
    compact = copy.deepcopy(prof)
    compact["variant"] = "compact"
    compact["layers"] = [r for r in compact["layers"] if r["name"] != "blocks.1.mlp.fc2"]
    return {"env": {"cpu": "test", "threads": 1, "gpu": None},
            "config": {"model": NAME, "batch": 2, "dtype": "float32", "device": "cpu",
                       "dtype_source": "test", "input_shape": [2, 3, 32, 32]},
            "profiles": [prof, compact]}, c


def _roof():
    return Roof(device="test", dtype="float32", flops_per_s=1e11, dram_bytes_per_s=1e10,
                ceilings=[(2 ** 16, 5e10), (2 ** 18, 4e10), (2 ** 20, 3e10), (2 ** 26, 1e10)],
                dram_footprint=2 ** 26, source="measured",
                method={"dtype": "float32", "compute": "made up", "memory": "made up"})


def test_layer_above_the_roof_is_reported_and_the_roof_raised(tmp_path):
    roof = _roof()
    c = pyengine.cost(pyengine.create_model(NAME, **KW), batch=2)
    fc1, norm = c.layer("blocks.0.mlp.fc1"), c.layer("blocks.0.norm1")
    t_fc1 = roof.time_s(fc1.flops, fc1.bytes) * 1e3
    t_norm = roof.time_s(norm.flops, norm.bytes) * 1e3
    rows = {"blocks.0.mlp.fc1": t_fc1 / 2,      # 2x above the compute roof
            "blocks.0.norm1": t_norm / 1.5,      # 1.5x above its memory ceiling
            "blocks.0.mlp.fc2": t_fc1 * 2,       # under it
            "blocks.1.mlp.act": 1.0}
    report, _ = _fake_report(rows)
    report = analyse(report, roof)
    chk = report["checks"]
    assert chk["roof_raised"] and chk["max_roof_fraction"] == pytest.approx(2.0)
    assert chk["max_roof_layer"] == "dense: blocks.0.mlp.fc1"
    hit = {e["layer"]: e for e in chk["above_roof"]}
    assert set(hit) == {"dense: blocks.0.mlp.fc1", "dense: blocks.0.norm1",
                        "compact: blocks.0.mlp.fc1", "compact: blocks.0.norm1"} or \
        {"dense: blocks.0.mlp.fc1", "dense: blocks.0.norm1"} <= set(hit)
    e = hit["dense: blocks.0.mlp.fc1"]
    assert e["times_above"] == pytest.approx(2.0) and e["compute_to"] == pytest.approx(2e11)
    assert hit["dense: blocks.0.norm1"]["bandwidth_to"] == pytest.approx(
        norm.bytes / (t_norm / 1.5 / 1e3))
    # the final roof holds every layer; the fraction against the measured roof is kept
    assert report["roof"]["flops_per_s"] == pytest.approx(2e11)
    assert report["roof"]["measured_flops_per_s"] == pytest.approx(1e11)
    for p in report["profiles"]:
        for r in p["layers"]:
            if r.get("roof_fraction") is not None:
                assert r["roof_fraction"] <= 1 + 1e-9
        rows_ = {r["name"]: r for r in p["layers"]}
        assert rows_["blocks.0.mlp.fc1"]["above_roof"] and \
            rows_["blocks.0.mlp.fc1"]["roof_fraction_measured"] == pytest.approx(2.0)
        assert rows_["blocks.0.norm1"]["above_roof"]
        assert not rows_["blocks.0.mlp.fc2"].get("above_roof", False)
    text = format_profile(report)
    assert "WARNING" in text and "blocks.0.mlp.fc1" in text and "raised" in text
    assert "ABOVE" in text
    plot(report, tmp_path / "above.png")
    assert (tmp_path / "above.png").read_bytes()[:4] == b"\x89PNG"


def test_no_layer_above_the_roof_says_so():
    roof = _roof()
    c = pyengine.cost(pyengine.create_model(NAME, **KW), batch=2)
    rows = {r.name: roof.time_s(r.flops, r.bytes) * 1e3 * 1.25 for r in c.layers}
    report, _ = _fake_report(rows)
    report = analyse(report, roof)
    assert not report["checks"]["above_roof"] and not report["checks"]["roof_raised"]
    assert report["checks"]["max_roof_fraction"] == pytest.approx(0.8)
    assert "no layer above the measured roof" in format_profile(report)
    assert report["roof"]["flops_per_s"] == 1e11
    # dense vs compact: the removed row is named; kinds are totalled
    cmp = report["comparison"][0]
    verdicts = {r["name"]: r["verdict"] for r in cmp["layers"]}
    assert verdicts["blocks.1.mlp.fc2"] == "removed" and verdicts["blocks.0.mlp.fc1"] == "same"
    assert {k["kind"] for k in cmp["by_kind"]} >= {"linear", "attention", "norm", "elementwise"}


# --------------------------------------------------------------------------------------
# Per-row time by module name, for any family
# --------------------------------------------------------------------------------------

class _Slow(nn.Module):
    def __init__(self, inner, seconds):
        super().__init__()
        self.inner, self.seconds = inner, seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return self.inner(x)


class _Mixer(nn.Module):
    """Two timed Linear rows and work of its own (a row with no module: its "core")."""

    def __init__(self, d, seconds):
        super().__init__()
        self.lin1, self.lin2, self.seconds = nn.Linear(d, d), nn.Linear(d, d), seconds

    def forward(self, x):
        x = self.lin1(x)
        time.sleep(self.seconds)
        return self.lin2(x)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = _Mixer(8, 0.004)
        self.pair = nn.Sequential(nn.Linear(8, 8), nn.GELU())
        self.outer = _Slow(nn.Linear(8, 8), 0.003)

    def forward(self, x):
        x = self.mix(x)
        x = x + self.pair(x)
        return self.outer(x)


def test_row_timer_matches_rows_to_modules_by_name():
    m = _Toy().eval()
    rows = ["mix.lin1", "mix.core", "mix.lin2",             # core: the rest of "mix"
            "pair.0", "pair.1", "pair.add", "pair.scale",   # two module-less rows: untimed
            "outer", "outer.inner",                         # nested rows: exclusive times
            "embed"]                                        # top level, no module: untimed
    timer = RowTimer(m, rows, torch.device("cpu"))
    assert timer.timed_as("mix.core") == "rest of mix"
    assert timer.timed_as("mix.lin1") == timer.timed_as("outer") == "module"
    assert timer.timed_as("pair.add") is None and timer.timed_as("embed") is None
    assert set(timer.untimed) == {"pair.add", "pair.scale", "embed"}
    x = torch.randn(4, 8)
    with timer:
        for _ in range(3):
            timer.run(x)
        m(x)  # a call outside run() records nothing
    assert len(timer.passes) == 3
    got, totals, rest = timer.times()
    assert set(got) == {"mix.lin1", "mix.core", "mix.lin2", "pair.0", "pair.1", "outer",
                        "outer.inner"}
    assert min(got["mix.core"]) >= 4.0 and min(got["outer"]) >= 3.0
    assert max(got["outer.inner"]) < min(got["outer"])    # the sleep is outer's own
    for i in range(3):
        assert totals[i] >= sum(v[i] for v in got.values()) - 1e-6 and rest[i] >= 0
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())


def test_layer_times_on_a_vit():
    model = pyengine.create_model(NAME, **KW).eval()
    model.blocks[1].mlp.act = _Slow(model.blocks[1].mlp.act, 0.006)
    model.blocks[0].attn.fused_attn = False  # attention core in plain ops: still attributed
    names = [r.name for r in pyengine.cost(model, batch=2).layers]
    med, total, other = layer_times(model, torch.randn(2, 3, 32, 32), names, warmup=1,
                                    repeats=3)
    assert med["blocks.1.mlp.act"] >= 6.0
    assert total >= med["blocks.1.mlp.act"] and other >= 0
    for r in ("patch_embed", "blocks.0.attn.qkv", "blocks.0.attn.sdpa", "blocks.1.mlp.fc2",
              "norm", "head"):
        assert r in med and med[r] >= 0
    assert "blocks.0.add1" not in med and "pos_embed" not in med
    st, total_st, other_st = layer_stats(model, torch.randn(2, 3, 32, 32), names, warmup=0,
                                         repeats=3)
    assert set(st) == set(med) and total_st["repeats"] == other_st["repeats"] == 3
    assert all(v["iqr_ms"] >= 0 and v["min_ms"] <= v["median_ms"] for v in st.values())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --------------------------------------------------------------------------------------
# The whole command: JSON fields, plot, header
# --------------------------------------------------------------------------------------

def test_profile_cli_dense_and_compact(tmp_path, capsys):
    js, png = tmp_path / "p.json", tmp_path / "p.png"
    assert main(["profile", "--model", NAME, "--model-kwargs", json.dumps(KW), "--target", "0.5",
                 "--batch", "3", "--device", "cpu", "--repeats", "2", "--warmup", "1",
                 "--copy-mib", "1", "--gemm-n", "32,64", "--no-progress",
                 "--json", str(js), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    rep = json.loads(js.read_text())
    # the header names the dtype (the device default: fp32 on this CPU) and how the roof was
    # measured
    dt, why = default_dtype("cpu")
    assert rep["config"]["dtype"] == str(dt).replace("torch.", "")
    assert f"dtype: {rep['config']['dtype']} (default on this device" in out
    assert "roof, compute: best of" in out and "roof, memory: best of" in out
    assert "roof check:" in out and "by kind" in out and "dense vs compact" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    for k in ("gpu", "driver", "torch", "triton", "cuda", "cpu", "threads"):
        assert k in rep["env"]
    roof = rep["roof"]
    comp = [p for p in roof["probes"] if p["kind"] == "compute"]
    names = {p["name"] for p in comp}
    assert {"gemm 32x32x32", "gemm 64x64x64"} <= names
    # the models' own layer shapes are probes too, dense and compact
    assert any(n.startswith("layer dense blocks.0.mlp.fc1") for n in names)
    assert any(n.startswith("layer compact ") for n in names)
    assert roof["flops_per_s"] >= max(p["rate"] for p in comp)   # raised only upwards
    assert roof["measured_flops_per_s"] == pytest.approx(max(p["rate"] for p in comp))
    assert roof["method"]["dtype"].startswith(rep["config"]["dtype"])
    assert rep["peaks"]["flops_per_s"] == roof["flops_per_s"]
    assert rep["peaks"]["bytes_per_s"] == roof["dram_bytes_per_s"]
    assert set(rep["checks"]) >= {"max_roof_fraction", "max_roof_layer", "above_roof",
                                  "roof_raised"}
    assert [p["variant"] for p in rep["profiles"]] == ["dense", "compact"]
    dense, compact = rep["profiles"]
    assert compact["macs"] < dense["macs"]
    ref = pyengine.cost(pyengine.create_model(NAME, **KW), batch=3)
    assert dense["macs"] == ref.macs and dense["bytes"] == ref.bytes
    fields = {"name", "kind", "flops", "bytes", "intensity", "measured_ms", "achieved_tflops",
              "achieved_gbps", "roof_tflops", "roof_gbps", "roof_ms", "roof_fraction",
              "roof_fraction_measured", "above_roof", "bound", "timed_as"}
    for p in rep["profiles"]:
        assert p["batch"] == 3 and p["total_ms"] > 0 and p["roof_ms"] > 0
        assert sum(r["flops"] for r in p["layers"]) == p["flops"] == 2 * p["macs"]
        rows = {r["name"]: r for r in p["layers"]}
        for name in ("blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.sdpa", "head",
                     "blocks.0.norm1", "blocks.0.mlp.act"):
            assert fields <= set(rows[name]), name
        for r in p["layers"]:
            if r["kind"] == "other":
                assert r["measured_ms"] >= 0
                continue
            # the bound follows the roof at the layer's own intensity and footprint
            bw = r["roof_gbps"] * 1e9
            want = "compute" if r["flops"] and r["flops"] / roof["flops_per_s"] >= \
                r["bytes"] / bw else "memory"
            assert r["bound"] == want, r["name"]
            if r["kind"] in ("norm", "elementwise"):
                assert r["bound"] == "memory", r["name"]   # LayerNorm, GELU, adds
            if r["measured_ms"]:
                t = r["measured_ms"] / 1e3
                assert r["achieved_tflops"] == pytest.approx(r["flops"] / t / 1e12)
                assert r["achieved_gbps"] == pytest.approx(r["bytes"] / t / 1e9)
                assert r["roof_fraction"] == pytest.approx(r["roof_ms"] / r["measured_ms"])
                assert r["roof_fraction"] <= 1 + 1e-9            # after any raise
        assert rows["blocks.0.add1"]["measured_ms"] is None
        assert rows["blocks.0.attn.sdpa"]["timed_as"] == "rest of blocks.0.attn"
        for k in ("linear", "attention", "norm", "elementwise"):
            assert {"flops", "bytes", "measured_ms", "achieved_tflops", "achieved_gbps",
                    "roof_fraction", "share_of_time"} <= set(p["by_kind"][k])
    cmp = rep["comparison"][0]
    assert cmp["base"] == "dense" and cmp["variant"] == "compact"
    c_rows = {r["name"]: r for r in cmp["layers"]}
    assert c_rows["blocks.0.attn.qkv"]["flops_ratio"] < 1
    assert c_rows["blocks.0.mlp.fc1"]["verdict"] in ("faster", "same", "slower")
    assert {"base_ms", "ms", "speedup", "roof_speedup", "base_roof_fraction",
            "roof_fraction"} <= set(c_rows["blocks.0.mlp.fc1"])


def test_profile_vendor_peaks_and_explicit_dtype(tmp_path):
    m = pyengine.create_model(NAME, **KW)
    rep = profile({"dense": m}, batch=1, dtype="fp32", device="cpu", peaks="h100-sxm",
                  repeats=2, warmup=1)
    assert rep["roof"]["source"] == "vendor" and rep["roof"]["probes"] == []
    assert rep["config"]["dtype_source"] == "--dtype" and rep["config"]["peaks"] == \
        "NVIDIA H100 SXM"
    assert "data sheet" in rep["roof"]["method"]["compute"]
    assert "comparison" not in rep
    assert "dtype: float32 (--dtype" in format_profile(rep)
    plot(rep, tmp_path / "one.png")   # one variant: the last panel shows % of roof per layer
    assert (tmp_path / "one.png").stat().st_size > 10_000


def test_profile_errors(capsys):
    m = pyengine.create_model(NAME, **KW)
    with pytest.raises(ValueError, match="batch"):
        profile({"dense": m}, batch=0, dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="at least one"):
        profile({}, batch=1, dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="--peaks"):
        profile({"dense": m}, batch=1, dtype="float32", device="cpu", peaks="tpu-v9")
    assert main(["profile", "--model", NAME, "--gemm-n", "12,x"]) == 1
    assert "--gemm-n" in capsys.readouterr().err
