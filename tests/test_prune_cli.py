"""`pyengine prune` end to end on a tiny config, the method plug-in contract, checkpoints."""
import argparse
import json

import pytest
import torch
from safetensors.torch import save_file

import pyengine
from pyengine.io.weights import load_checkpoint
from pyengine.cli import build_parser, main
from pyengine.models.vit.cost import total_macs

TINY = ["--model", "digits_vit", "--model-kwargs", '{"embed_dim": 16, "depth": 2, "num_heads": 2}',
        "--img-size", "8", "--batch-size", "128", "--no-progress", "--seed", "1"]


def _files(d):
    return {p.name for p in d.iterdir()}


def test_prune_end_to_end_writes_a_loadable_compact_model(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["prune", *TINY, "--dense-epochs", "1", "--epochs", "2", "--finetune", "1",
               "--target", "0.5", "--round-to", "4", "--out", str(out)])
    assert rc == 0
    assert {"metrics.json", "spec.json", "model.safetensors", "config.json"} <= _files(out)
    m = json.loads((out / "metrics.json").read_text())
    for k in ("dense_top1", "pruned_top1", "dense_macs", "pruned_macs", "dense_params",
              "pruned_params", "target", "macs_ratio", "method", "epochs", "times"):
        assert k in m, k
    assert m["method"] == "hiap" and m["target"] == 0.5 and m["epochs"] == 2
    assert abs(m["macs_ratio"] - 0.5) <= 0.015
    assert m["pruned_macs"] < m["dense_macs"] and m["pruned_params"] < m["dense_params"]
    assert m["max_abs_diff"] <= 1e-4
    compact = pyengine.load(out)
    s = pyengine.Spec.from_json((out / "spec.json").read_text())
    assert pyengine.spec(compact).blocks == s.blocks
    assert pyengine.cost(compact).macs == total_macs(s) == m["pruned_macs"]
    for b in s.blocks:
        for h in b.heads:
            assert len(h.qk) % 4 == 0 and len(h.v) % 4 == 0
        assert len(b.mlp) % 4 == 0
    # the saved model reproduces the reported accuracy
    from pyengine.train.data import loaders
    from pyengine.train.trainer import evaluate
    _, val, _ = loaders("digits", 8, 128, seed=1)
    assert evaluate(compact, val) == pytest.approx(m["pruned_top1"])
    assert "pruned top-1" in capsys.readouterr().out

    # --resume: the dense model and the structure come from the checkpoints, same result
    (out / "metrics.json").unlink()
    assert main(["prune", *TINY, "--dense-epochs", "1", "--epochs", "2", "--finetune", "1",
                 "--target", "0.5", "--round-to", "4", "--out", str(out), "--resume"]) == 0
    m2 = json.loads((out / "metrics.json").read_text())
    assert "resumed from" in capsys.readouterr().out
    for k in ("dense_top1", "pruned_top1", "pruned_macs", "macs_ratio"):
        assert m2[k] == m[k], k
    assert pyengine.Spec.from_json((out / "spec.json").read_text()).blocks == s.blocks


def _dense(tmp_path):
    from pyengine.models.zoo import digits_vit
    torch.manual_seed(0)
    return digits_vit(img_size=8, embed_dim=16, depth=2, num_heads=2)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_checkpoint_loads_into_the_timm_model(tmp_path, fmt):
    dense = _dense(tmp_path)
    if fmt == "safetensors":
        ckpt = tmp_path / "dense.safetensors"
        save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(ckpt))
    else:
        ckpt = tmp_path / "dense.pth"
        torch.save({"model": {f"module.{k}": v for k, v in dense.state_dict().items()}}, ckpt)
    out = tmp_path / "o"
    args = list(TINY)
    if fmt == "pth":  # the same network by its timm name
        from pyengine.models.zoo import DIGITS_VIT
        kw = {k: v for k, v in DIGITS_VIT.items() if k not in ("img_size", "num_classes")}
        kw.update(embed_dim=16, depth=2, num_heads=2)
        args[1:4] = ["vit_tiny_patch16_224", "--model-kwargs", json.dumps(kw)]
    assert main(["prune", *args, "--checkpoint", str(ckpt), "--epochs", "1", "--target", "0.6",
                 "--out", str(out), "--kd-alpha", "0"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    from pyengine.train.data import loaders
    from pyengine.train.trainer import evaluate
    _, val, _ = loaders("digits", 8, 128, seed=1)
    assert m["dense_top1"] == pytest.approx(evaluate(dense, val))
    assert abs(m["macs_ratio"] - 0.6) <= 0.018
    assert m["model"] == args[1]
    # the saved config names the model as given (the digits models are in timm's registry)
    assert json.loads((out / "config.json").read_text())["architecture"] == args[1]


def test_bad_checkpoints_are_clear_errors(tmp_path, capsys):
    other = tmp_path / "other.safetensors"
    save_file({"nope": torch.zeros(2)}, str(other))
    assert main(["prune", *TINY, "--checkpoint", str(other), "--epochs", "1",
                 "--out", str(tmp_path / "o")]) == 1
    assert "does not fit the model" in capsys.readouterr().err
    assert main(["prune", *TINY, "--checkpoint", str(tmp_path / "missing.pt"), "--epochs", "1",
                 "--out", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err
    pickled = tmp_path / "code.pt"
    torch.save({"model": argparse.Namespace(a=1)}, pickled)  # needs unpickling code
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(_dense(tmp_path), pickled)
    # an image folder without weights and without --dense-epochs
    assert main(["prune", "--model", "digits_vit", "--data", str(tmp_path), "--out",
                 str(tmp_path / "o2"), "--no-progress"]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_method_contract():
    from pyengine.methods.base import Method, get_method, methods
    from pyengine.methods.hiap import HiAP
    from pyengine.methods.oneshot import OneShot
    from pyengine.methods.sss import SSS
    known = methods()
    assert isinstance(known["hiap"], HiAP) and isinstance(known["sss"], SSS)
    for m in ("agf", "taylor", "wanda", "ria", "magnitude", "random"):
        assert isinstance(known[m], OneShot) and known[m].criterion == m
    assert all(isinstance(m, Method) and m.name == n for n, m in known.items())
    with pytest.raises(ValueError, match="unknown pruning method"):
        get_method("nope")


def test_a_registered_method_gets_its_flags_and_options(monkeypatch):
    from dataclasses import dataclass, field

    from pyengine.methods import base
    from pyengine.methods.base import Method, register_method, run_method

    monkeypatch.setattr(base, "_METHODS", dict(base._METHODS))  # undone after the test
    seen = {}

    @register_method("later")
    class Later(Method):
        @dataclass
        class Config:
            strength: float = field(default=1.0, metadata={"help": "how hard"})

        def prune(self, model, config, ctx):
            seen.update(strength=config.strength, target=ctx.budget.target,
                        epochs=ctx.training.epochs)
            return pyengine.gate(model)

    a = build_parser().parse_args(["prune", "--model", "m", "--out", "o", "--method", "later",
                                   "--strength", "2.5"])
    assert a.method == "later" and a.strength == 2.5
    run_method(_dense(None), "later", target=0.4, epochs=3, strength=0.5)
    assert seen == {"strength": 0.5, "target": 0.4, "epochs": 3}
    with pytest.raises(TypeError, match="unknown option 'nope'"):
        run_method(_dense(None), "later", nope=1)
    with pytest.raises(ValueError, match="target"):
        run_method(_dense(None), "later", target=1.5)


def test_parser_has_common_and_method_flags():
    p = build_parser()
    a = p.parse_args(["prune", "--model", "m", "--out", "o", "--tau-start", "3",
                      "--round-to", "8", "--min-heads", "0"])
    assert a.method == "hiap" and a.target == 0.5 and a.tau_start == 3.0
    assert a.round_to == 8 and a.min_heads == 0 and a.tolerance == 0.03
    for field in ("method", "target", "epochs", "lr", "batch_size", "img_size", "seed", "device",
                  "amp", "finetune", "out", "min_heads", "round_to", "workers", "resume"):
        assert hasattr(a, field), field
    with pytest.raises(SystemExit):
        p.parse_args(["prune", "--model", "m", "--out", "o", "--target", "1.5"])
