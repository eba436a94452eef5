"""The command line, the demo and the synthetic structures behind them."""
import json

import pytest
import timm
import torch

import pyengine
from pyengine.cli import main
from pyengine.models.vit.cost import total_macs
from pyengine.structure.synthetic import heterogeneous_spec


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_small_patch16_224"])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.75])
def test_heterogeneous_spec_hits_target(name, target):
    g = pyengine.geometry(timm.create_model(name))
    full = total_macs(pyengine.Spec.full(g, model=name))
    for seed in range(3):
        s = heterogeneous_spec(g, target, seed, model=name)
        assert abs(total_macs(s) / full - target) < 0.01
        assert all(len(b.mlp) % 8 == 0 for b in s.blocks)
        assert len({(len(h.qk), len(h.v)) for b in s.blocks for h in b.heads}) >= 3
        assert pyengine.Spec.from_json(s.to_json()) == s


def test_synthetic_demo_report(tmp_path):
    from pyengine.experiments.demo import run_synthetic
    r = run_synthetic(tmp_path, model_name="deit_tiny_patch16_224", batch=2, repeats=2)
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("macs_ratio", "speedup", "max_abs_diff", "device", "dense_ms", "compact_ms", "env"):
        assert key in report
    assert report["max_abs_diff"] <= 1e-4
    assert abs(report["macs_ratio"] - 0.5) <= 0.03
    assert report["speedup"] > 0 and report["dense_ms"]["median_ms"] > 0
    assert pyengine.Spec.from_json((tmp_path / "spec.json").read_text()).model == r["model"]


@pytest.mark.parametrize("latency", ["off", "measured"])
def test_demo_cli_tiny_learned_run(tmp_path, capsys, monkeypatch, latency):
    """The real demo path (digits, dense training, HiAP, compile, check, timing) on a tiny
    model and schedule; "measured": as on a user's machine, compile measures this CPU's
    latency table and plans the head layout (and attention backend) from it."""
    if latency == "measured":
        monkeypatch.setenv("PYENGINE_LATENCY", "on")
        monkeypatch.setenv("PYENGINE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    try:
        assert main(["demo", "--tiny", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((out / "report.json").read_text())
    for key in ("dense_top1", "pruned_top1", "macs_ratio", "speedup", "max_abs_diff", "device",
                "env", "times", "spec_path", "dense_ms", "compact_ms"):
        assert key in report, key
    assert report["device"] == "cpu" and report["max_abs_diff"] <= 1e-4
    assert abs(report["macs_ratio"] - 0.5) <= 0.015  # within 3% of the target
    assert report["speedup"] > 0 and 0 <= report["pruned_top1"] <= 100
    compact = pyengine.load(out)
    s = pyengine.Spec.from_json((out / "spec.json").read_text())
    assert pyengine.spec(compact).blocks == s.blocks
    # the structure's MACs, and the compiled model's with its head layout (planned from this
    # machine's measured table: padded buckets compute more, whichever the timings chose)
    assert pyengine.cost(s).macs == report["compact_macs"] // report["batch"]
    assert pyengine.cost(compact).macs == report["compiled_macs"] // report["batch"]
    printed = capsys.readouterr().out
    assert "speedup" in printed and "top-1" in printed


def test_cli_spec_compile_cost_round_trip(tmp_path, capsys):
    name = "deit_tiny_patch16_224"
    assert main(["spec", "--model", name]) == 0
    full = pyengine.Spec.from_json(capsys.readouterr().out)
    assert len(full.blocks) == 12
    s = heterogeneous_spec(full.dense, 0.5, 1, model=name)
    s.save(tmp_path / "spec.json")
    assert main(["compile", "--model", name, "--spec", str(tmp_path / "spec.json"),
                 "--out", str(tmp_path / "out")]) == 0
    assert "MAC ratio 0.5" in capsys.readouterr().out
    assert pyengine.spec(pyengine.load(tmp_path / "out")).blocks == s.blocks
    assert main(["cost", "--model", str(tmp_path / "out"), "--batch", "4",
                 "--json", str(tmp_path / "cost.json")]) == 0
    assert "blocks.0.mlp.fc1" in capsys.readouterr().out
    c = json.loads((tmp_path / "cost.json").read_text())
    assert c["macs"] == pyengine.cost(s, batch=4).macs


def test_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"blocks": [{"heads": [], "mlp": [99999]}]}')
    assert main(["compile", "--model", "deit_tiny_patch16_224", "--spec", str(bad),
                 "--out", str(tmp_path / "o")]) == 1
    assert "error" in capsys.readouterr().err
    from pyengine.cli import COMMANDS, command
    for name in COMMANDS:  # every subcommand is one module with help, flags and a runner
        mod = command(name)
        assert mod.HELP and callable(mod.add_arguments) and callable(mod.run)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
