"""The command line, the demo and the synthetic structures behind them."""
import json

import pytest
import timm

import pyengine
from pyengine.cli import main
from pyengine.cost_model import total_macs
from pyengine.synthetic import heterogeneous_spec


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


def test_demo_report(tmp_path):
    from pyengine.demo import run
    r = run(tmp_path, model_name="deit_tiny_patch16_224", batch=2, repeats=2)
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("macs_ratio", "speedup", "max_abs_diff", "device", "dense_ms", "compact_ms", "env"):
        assert key in report
    assert report["max_abs_diff"] <= 1e-4
    assert abs(report["macs_ratio"] - 0.5) <= 0.03
    assert report["speedup"] > 0 and report["dense_ms"]["median_ms"] > 0
    assert pyengine.Spec.from_json((tmp_path / "spec.json").read_text()).model == r["model"]


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
    assert main(["bench"]) == 2
    assert "issue #9" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
