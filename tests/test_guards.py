"""Nothing lost, nothing silently wrong (issue 19): runs that know what they are, data and NaN
guards, every flag checked before any work, one error line per failure.

Model directories written as a unit and checked on load are in test_save_load.py."""
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import pyengine
from pyengine.cli import main
from pyengine.io.manifest import CorruptFileError
from pyengine.train import checkpoint as ck
from pyengine.train.data import datasets

from test_data import make_png_folder

TINY = ["--model", "digits_vit", "--model-kwargs", '{"embed_dim": 16, "depth": 2, "num_heads": 2}',
        "--img-size", "8", "--batch-size", "128", "--no-progress", "--seed", "1"]


def _dense_file(tmp_path, nan=False, dtype=None):
    from pyengine.models.zoo import digits_vit
    torch.manual_seed(0)
    m = digits_vit(img_size=8, embed_dim=16, depth=2, num_heads=2)
    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    if nan:
        state["blocks.1.mlp.fc1.weight"][3, 2] = float("nan")
    if dtype is not None:
        state["head.weight"] = (state["head.weight"] * 100).to(dtype)
    f = tmp_path / f"dense{'_nan' if nan else ''}{'_' + str(dtype) if dtype else ''}.safetensors"
    save_file(state, str(f))
    return f


def _err(capsys):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err  # one line, no traceback
    return lines[0]


def _magnitude(ckpt, out, *extra):
    return ["prune", *TINY, "--checkpoint", str(ckpt), "--method", "magnitude",
            "--out", str(out), *extra]


# ---- 2. --out over a previous run ------------------------------------------------------------
def test_out_is_refused_when_not_empty_unless_overwrite(tmp_path, capsys):
    ckpt = _dense_file(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(_magnitude(ckpt, out)) == 1
    line = _err(capsys)
    assert "--out" in line and "not empty" in line and "--overwrite" in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    assert main(_magnitude(ckpt, tmp_path / "file")) == 1
    assert "--out" in _err(capsys)

    (out / "notes.txt").unlink()
    assert main(_magnitude(ckpt, out, "--target", "0.5")) == 0
    first = pyengine.spec(pyengine.load(out))
    assert main(_magnitude(ckpt, out, "--target", "0.7")) == 1  # a previous run: refused
    assert "not empty" in _err(capsys)
    assert json.loads((out / "metrics.json").read_text())["target"] == 0.5
    assert main(_magnitude(ckpt, out, "--target", "0.7", "--overwrite")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["target"] == 0.7 and pyengine.spec(pyengine.load(out)) != first
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert "metrics.json" in manifest  # the metrics are swapped in with their model
    assert json.loads((out / "checkpoints" / "run.json").read_text())["settings"]["budget"][
        "target"] == 0.7
    capsys.readouterr()
    assert main(_magnitude(ckpt, out, "--resume", "--overwrite")) == 1
    assert "contradict" in _err(capsys)


# ---- 3. --resume with other settings -----------------------------------------------------------
def test_resume_with_other_settings_is_refused_listing_the_differences(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["prune", *TINY, "--dense-epochs", "1", "--epochs", "1", "--target", "0.5",
            "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args[:-4], "--target", "0.3", "--lr", "0.001", "--out", str(out),
                 "--resume"]) == 1
    line = _err(capsys)
    assert "cannot resume" in line and "budget.target: 0.5 -> 0.3" in line
    assert "training.lr: 0.0005 -> 0.001" in line
    # damaged dense weights are named, not loaded
    dense = out / "checkpoints" / "dense.safetensors"
    good = dense.read_bytes()
    dense.write_bytes(good[:-3] + bytes([good[-3] ^ 0x10]) + good[-2:])
    assert main([*args, "--resume"]) == 1
    assert f"{dense} is damaged" in _err(capsys)
    dense.write_bytes(good)
    # the checkpoints themselves record the run: without the run record they still refuse
    (out / "checkpoints" / "run.json").unlink()
    assert main([*args[:-4], "--target", "0.3", "--out", str(out), "--resume"]) == 1
    warning, line = capsys.readouterr().err.splitlines()
    assert warning.startswith("pyengine prune: warning: ") and "records no run settings" in warning
    assert "hiap/step-" in line and "budget.target: 0.5 -> 0.3" in line
    assert main([*args, "--resume"]) == 0  # the same settings resume


def _tiny_fit(ckdir, epochs=1, resume=False, lr=3e-3):
    from torch.utils.data import DataLoader, TensorDataset

    from pyengine.train.trainer import fit
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    ds = TensorDataset(torch.randn(32, 12), torch.randint(0, 3, (32,)))
    fit(model, DataLoader(ds, batch_size=8), epochs=epochs, lr=lr, checkpoint_dir=ckdir,
        resume=resume, progress=False, run={"what": "tiny"})
    return model


def test_trainer_checkpoints_record_the_run_and_are_checked_on_resume(tmp_path):
    _tiny_fit(tmp_path, epochs=1)
    latest = ck.latest_checkpoint(tmp_path)
    assert ck.checkpoint_run(latest)["fit"]["epochs"] == 1
    with pytest.raises(ValueError, match=r"fit\.epochs: 1 -> 2; fit\.lr: 0\.003 -> 0\.01"):
        _tiny_fit(tmp_path, epochs=2, resume=True, lr=1e-2)
    _tiny_fit(tmp_path, epochs=1, resume=True)  # the same run: fine
    # a damaged checkpoint is named, not loaded
    t = latest / ck.TENSORS
    data = bytearray(t.read_bytes())
    data[-1] ^= 0x01
    t.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=f"{t} is damaged"):
        _tiny_fit(tmp_path, epochs=1, resume=True)
    (latest / ck.META).write_text("{broken")
    with pytest.raises(CorruptFileError, match="state.json"):
        ck.load_checkpoint(latest)
    (latest / ck.META).write_text(json.dumps({"format": "someone-else/1"}))
    (latest / "manifest.json").unlink()
    with pytest.raises(ValueError, match="state.json: format 'someone-else/1'"):
        ck.load_checkpoint(latest)


def test_stale_checkpoint_temporaries_are_cleaned(tmp_path):
    import multiprocessing as mp
    dead = mp.get_context("fork").Process(target=lambda: None)
    dead.start()
    dead.join()
    ck.save_checkpoint(tmp_path, 3, {"a": torch.ones(2)})
    (tmp_path / f".tmp-step-00000004-{dead.pid}").mkdir()
    # killed between moving a checkpoint aside and renaming its replacement in
    (tmp_path / "step-00000003").rename(tmp_path / f".old-step-00000003-{dead.pid}")
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003"]


# ---- 4. image folders --------------------------------------------------------------------------
def test_image_folder_class_checks(tmp_path):
    import shutil
    root = make_png_folder(tmp_path / "a", classes=("cat", "dog", "fox"))
    shutil.rmtree(root / "val" / "dog")  # val lacks a class: labels would shift
    with pytest.raises(ValueError, match=r"different classes \(only in train: \['dog'\]"):
        datasets(str(root), img_size=16)
    root = make_png_folder(tmp_path / "b", classes=("cat",))
    with pytest.raises(ValueError, match="one class .*at least two"):
        datasets(str(root), img_size=16)
    root = make_png_folder(tmp_path / "c")
    for p in (root / "val").rglob("*.png"):
        p.rename(p.with_suffix(".txt"))  # a split of non-images
    with pytest.raises(ValueError, match=r"val holds no images"):
        datasets(str(root), img_size=16)
    root = make_png_folder(tmp_path / "d")
    (root / "train" / "emu").mkdir()
    with pytest.raises(ValueError, match=r"class folder\(s\) \['emu'\] hold no images"):
        datasets(str(root), img_size=16)
    root = make_png_folder(tmp_path / "e")
    shutil.copy(next((root / "train" / "cat").iterdir()), root / "train" / "stray.png")
    with pytest.raises(ValueError, match="images outside class folders"):
        datasets(str(root), img_size=16)
    (tmp_path / "f" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="val is not a directory"):
        datasets(str(tmp_path / "f"))


def test_prune_on_a_bad_image_folder_is_one_line(tmp_path, capsys):
    import shutil
    root = make_png_folder(tmp_path / "imgs", classes=("cat", "dog", "fox"))
    shutil.rmtree(root / "val" / "fox")
    assert main(["prune", "--model", "digits_vit", "--data", str(root), "--dense-epochs", "1",
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    assert "only in train: ['fox']" in _err(capsys)


# ---- 5./7. non-finite weights, activations, statistics, scores -----------------------------
def test_nan_dense_weights_stop_a_one_shot_run_before_anything_is_saved(tmp_path, capsys):
    ckpt = _dense_file(tmp_path, nan=True)
    out = tmp_path / "o"
    assert main(_magnitude(ckpt, out)) == 1
    line = _err(capsys)
    assert f"dense weights of {ckpt}" in line and "blocks.1.mlp.fc1.weight holds NaN" in line
    assert not (out / "model.safetensors").exists()


def test_int32_weights_are_refused_not_cast(tmp_path, capsys):
    ckpt = _dense_file(tmp_path, dtype=torch.int32)
    assert main(_magnitude(ckpt, tmp_path / "o")) == 1
    assert "head.weight is int32" in _err(capsys)


def test_compact_vs_gated_does_not_report_zero_over_nan():
    from pyengine.methods.pipeline import compact_vs_gated

    class Const(torch.nn.Module):
        def __init__(self, v):
            super().__init__()
            self.v = v

        def forward(self, x):
            return torch.full((x.shape[0], 3), self.v)
    loader = [(torch.zeros(4, 3, 8, 8), None)] * 2
    assert compact_vs_gated(Const(1.0), Const(0.5), loader, "cpu") == 0.5
    assert np.isnan(compact_vs_gated(Const(float("nan")), Const(0.5), loader, "cpu"))


def _gated_vit():
    torch.manual_seed(0)
    m = pyengine.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2,
                              num_classes=4, embed_dim=24, num_heads=2)
    return pyengine.gate(m.eval())


def test_nan_calibration_data_activations_and_scores_are_named():
    from pyengine.methods.criteria import calibrate, score
    x = torch.randn(6, 3, 16, 16)
    y = torch.randint(0, 4, (6,))
    bad = x.clone()
    bad[2, 0, 1, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="calibration batch 2 holds NaN/inf inputs"):
        calibrate(_gated_vit(), [(x, y), (bad, y)], batches=2)
    m = _gated_vit()
    with torch.no_grad():
        m.blocks[1].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="loss of calibration batch 1 is nan"):
        calibrate(m, [(x, y)], batches=1)
    with pytest.raises(FloatingPointError, match=r"magnitude scores of block 1 \(neuron\)"):
        score(m, "magnitude")


# ---- 6. gradients through every backend, or a clear error --------------------------------------
def test_varlen_attention_cpu_backend_refuses_inputs_that_need_gradients():
    from pyengine import ops
    from pyengine.ops.dispatch import BackendNotAvailable
    qk, vd = [7, 16, 1], [5, 16, 3]
    q, k = (torch.randn(2, 9, sum(qk), requires_grad=True) for _ in range(2))
    v = torch.randn(2, 9, sum(vd), requires_grad=True)
    with pytest.raises(BackendNotAvailable, match="cpu.*has no backward and an input requires "
                                                  "grad"):
        ops.varlen_attention(q, k, v, qk, vd, 0.3, backend="cpu")
    out = ops.varlen_attention(q, k, v, qk, vd, 0.3)  # auto: a backend with gradients
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = torch.autograd.grad(ops.varlen_attention_reference(q, k, v, qk, vd, [0.3] * 3),
                              (q, k, v), g)
    for a, b in zip(grads, ref):
        assert a is not None and torch.allclose(a, b, atol=1e-5)
    with torch.no_grad():  # no gradients needed: the csrc kernel runs where it is built
        try:
            got = ops.varlen_attention(q, k, v, qk, vd, 0.3, backend="cpu")
        except BackendNotAvailable as e:
            assert "requires grad" not in str(e)
        else:
            assert torch.allclose(got, out, atol=1e-5)


# ---- degenerate runs -----------------------------------------------------------------------
def test_epochs_zero_warns_before_any_work(tmp_path, monkeypatch):
    import pyengine.train.data as data

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop
    monkeypatch.setattr(data, "loaders", stop)
    from pyengine.methods.pipeline import PruneJob, run
    from pyengine.methods.base import Training
    with pytest.warns(UserWarning, match="epochs is 0: hiap learns nothing"), \
            pytest.raises(Stop):
        run(PruneJob(model="digits_vit", out=str(tmp_path / "o"), training=Training(epochs=0)))


def test_gate_lists_every_kind():
    m = pyengine.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1)
    with pytest.raises(ValueError, match=r"available: \['hiap', 'mask', 'sss'\]"):
        pyengine.gate(m, method="nope")


# ---- every flag of every command, before any work ------------------------------------------------
BAD_FLAGS = [
    # prune: library settings (PruneJob.check) and the model's geometry
    (["prune", *TINY, "--epochs", "-1"], "--epochs must be an integer >= 0, got -1"),
    (["prune", *TINY, "--round-to", "-8"], "--round-to must be a positive integer, got -8"),
    (["prune", *TINY, "--kd-alpha", "2"], "--kd-alpha must be in [0, 1], got 2.0"),
    (["prune", *TINY, "--lr", "nan"], "--lr must be a finite number, got nan"),
    (["prune", *TINY, "--min-heads", "10", "--dense-epochs", "1"],
     "--min-heads must be at most the model's 2 heads per layer, got 10"),
    (["prune", *TINY, "--round-to", "4096", "--dense-epochs", "1"], "--round-to must be at most"),
    (["prune", *TINY, "--tau-start", "nan"], "--tau-start must be a finite number"),
    (["prune", *TINY, "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["prune", *TINY, "--finetune-lr", "inf"], "--finetune-lr must be a finite number > 0"),
    (["prune", *TINY, "--warmup-steps", "-3"], "--warmup-steps must be an integer >= 0"),
    (["prune", *TINY, "--seed", "-1"], "--seed must be an integer >= 0"),
    (["prune", *TINY, "--device", "cuda:7"], "--device 'cuda:7': "),
    (["prune", *TINY, "--device", "banana"], "--device 'banana': not a device"),
    (["prune", "--model", "vit_nope_net", "--no-progress"], "--model: unknown model 'vit_nope_net'"),
    (["prune", *TINY[:2], "--model-kwargs", '{"pretrained": true}'],
     "'pretrained' is not a model setting"),
    (["prune", *TINY, "--checkpoint", "missing.pt"], "--checkpoint missing.pt does not exist"),
    (["prune", *TINY, "--data", "no/such/dir"], "--data: data no/such/dir does not exist"),
    (["prune", *TINY, "--resume", "--overwrite"], "contradict"),
    # the other commands
    (["demo", "--threads", "0"], "--threads must be an integer >= 1, got 0"),
    (["demo", "--target", "1.5"], "--target must be in (0, 1], got 1.5"),
    (["demo", "--batch", "0"], "--batch must be an integer >= 1"),
    (["spec", "--model", "vit_nope_net"], "--model: unknown model 'vit_nope_net'"),
    (["compile", "--model", "deit_tiny_patch16_224", "--spec", "missing.json", "--out", "o"],
     "--spec missing.json does not exist"),
    (["cost", "--model", "deit_tiny_patch16_224", "--batch", "0"], "--batch must be an integer"),
    (["cost", "--model", "deit_tiny_patch16_224", "--dtype", "int32"],
     "--dtype 'int32' is not a dtype pyengine runs in"),
    (["cost", "--model", "deit_tiny_patch16_224", "--dtype", "banana"], "--dtype 'banana'"),
    (["cost", "--model", "deit_tiny_patch16_224", "--device", "tpu9"],
     "--device 'tpu9': no peak figures"),
    (["bench", "--model", "deit_tiny_patch16_224", "--repeats", "0"], "--repeats must be"),
    (["bench", "--model", "deit_tiny_patch16_224", "--dtype", "float64"], "--dtype 'float64'"),
    (["bench", "--model", "deit_tiny_patch16_224", "--device", "cuda"], "--device 'cuda': "),
    (["bench", "--model", "deit_tiny_patch16_224", "--batch", "1,x"], "--batch '1,x'"),
    (["bench", "--model", "deit_tiny_patch16_224", "--compare", "dense,nope"], "--compare"),
    (["bench", "--model", "deit_tiny_patch16_224", "--backend", "nope"], "--backend 'nope'"),
    (["bench", "--model", "deit_tiny_patch16_224", "--min-sample-ms", "nan"],
     "--min-sample-ms must be a finite number >= 0"),
    (["bench", "--model", "deit_tiny_patch16_224", "--target", "2"], "--target must be in (0, 1]"),
    (["bench", "--model", "deit_tiny_patch16_224", "--model-kwargs", "[1]"],
     "--model-kwargs must be a JSON object"),
    (["bench", "--model", "deit_tiny_patch16_224", "--graphs", "--device", "cpu"],
     "--graphs needs --device cuda"),
    (["profile", "--model", "deit_tiny_patch16_224", "--batch", "0"], "--batch must be"),
    (["profile", "--model", "deit_tiny_patch16_224", "--rows", "-1"], "--rows must be"),
    (["profile", "--model", "deit_tiny_patch16_224", "--copy-mib", "0"], "--copy-mib must be"),
    (["sweep", "--removed", "0.5", "1.5"], "--removed must be in [0, 1), got 1.5"),
    (["sweep", "--seeds", "0"], "--seeds must be an integer >= 1"),
    (["route", "--light-target", "1"], "--light-target must be in (0, 1), got 1.0"),
    (["route", "--finetune-lr", "nan"], "--finetune-lr must be a finite number > 0"),
    (["route", "--calib-batches", "0"], "--calib-batches must be"),
    (["limit", "--model", "digits_mlp", "--iters", "0"], "--iters must be"),
    (["limit", "--model", "digits_mlp", "--lr", "nan"], "--lr must be a finite number > 0"),
    (["limit", "--model", "digits_mlp", "--name", "a/b"], "--name must be a plain file name"),
    (["limit", "--model", "digits_mlp", "--data", "no/such"], "--data: data no/such does not"),
    (["limit", "--model", "vit_nope_net"], "--model: unknown model"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=lambda v: " ".join(v)[:60]
                         if isinstance(v, list) else None)
def test_every_bad_flag_is_one_line_before_any_work(argv, message, tmp_path, monkeypatch,
                                                    capsys):
    import pyengine.cli as cli
    import pyengine.train.data as data
    import pyengine.train.trainer as trainer
    if argv[0] == "prune":
        argv = [*argv, "--out", str(tmp_path / "o")]

    def no_work(*a, **k):
        raise AssertionError("work started before the flags were checked")
    for mod, name in ((data, "loaders"), (trainer, "fit")):
        if argv[0] != "prune" or name == "fit":
            monkeypatch.setattr(mod, name, no_work)
    if argv[0] != "prune":  # the command itself must not start
        real = cli.command

        def guarded(name):
            mod = real(name)
            monkeypatch.setattr(mod, "run", no_work)
            return mod
        monkeypatch.setattr(cli, "command", guarded)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    line = _err(capsys)
    assert line.startswith(f"pyengine {argv[0]}: error: ") and message in line, line


def test_output_paths_and_saved_models_as_flags(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    d = tmp_path / "d"
    d.mkdir()
    m = pyengine.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1,
                              num_classes=3)
    pyengine.gate(m)
    pyengine.save(m, tmp_path / "saved")
    cases = [
        (["cost", "--model", "deit_tiny_patch16_224", "--json", str(d)], "is a directory"),
        (["compile", "--model", "deit_tiny_patch16_224", "--spec", str(tmp_path / "f"),
          "--out", str(tmp_path / "f")], "--out"),
        (["compile", "--model", str(tmp_path / "saved"), "--spec", str(tmp_path / "f"),
          "--out", str(tmp_path / "o")],
         "is a saved compact model; this command takes the dense model's timm name "
         "(vit_tiny_patch16_224)"),
        (["spec", "--model", str(d)], "not a pyengine.save model directory"),
        (["spec", "--model", str(tmp_path / "f")], "is a file"),
        (["profile", "--model", "deit_tiny_patch16_224", "--plot", str(d)], "is a directory"),
        (["sweep", "--out", str(tmp_path / "f" / "x.json")], "is a file"),
        (["demo", "--out", str(tmp_path / "f")], "is a file"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        line = _err(capsys)
        assert message in line, (argv, line)


def test_error_boundary_debug_and_unexpected_errors(tmp_path, capsys, monkeypatch):
    # a damaged model directory: named, one line; --debug adds the traceback
    m = pyengine.gate(pyengine.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8,
                                            depth=1, num_classes=3))
    pyengine.save(m, tmp_path / "saved")
    w = tmp_path / "saved" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    assert main(["cost", "--model", str(tmp_path / "saved")]) == 1
    assert f"{w} is damaged" in _err(capsys)
    assert main(["cost", "--model", str(tmp_path / "saved"), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("pyengine cost: error:")
    assert main(["--debug", "spec", "--model", "vit_nope_net"]) == 1
    assert "Traceback" in capsys.readouterr().err
    # a bug (an unexpected exception type) still ends in one line, and says how to see more
    import pyengine.cli.commands.spec as spec_cmd

    def boom(a):
        raise KeyError("internal")
    monkeypatch.setattr(spec_cmd, "run", boom)
    assert main(["spec", "--model", "deit_tiny_patch16_224"]) == 1
    assert "(KeyError; run with --debug for the traceback)" in _err(capsys)


def test_corrupt_or_foreign_checkpoints_are_one_line(tmp_path, capsys):
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    assert main(_magnitude(garbage, tmp_path / "o")) == 1
    assert "not a readable safetensors file" in _err(capsys)
    other = tmp_path / "resnet.safetensors"
    r = pyengine.create_model("resnet18", num_classes=3)
    save_file({k: v.contiguous() for k, v in r.state_dict().items()}, str(other))
    assert main(_magnitude(other, tmp_path / "o")) == 1
    assert "does not fit the model" in _err(capsys)
    # right keys, wrong shapes
    state = load_file(str(_dense_file(tmp_path)))
    state["head.weight"] = torch.zeros(5, 5)
    bad = tmp_path / "shape.safetensors"
    save_file(state, str(bad))
    assert main(_magnitude(bad, tmp_path / "o")) == 1
    assert "size mismatch for head.weight" in _err(capsys)


def test_guards_do_not_trip_on_a_healthy_model():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = _gated_vit()
        from pyengine.methods.criteria import calibrate, score
        x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 4, (4,))
        assert len(score(m, "agf", calibrate(m, [(x, y)], batches=1))) == 2


def test_demo_replaces_a_previous_demo_but_not_other_directories(tmp_path, monkeypatch):
    import pyengine.methods.pipeline as pipeline
    from pyengine.experiments.demo import run as demo_run
    jobs = []

    class Stop(Exception):
        pass

    def capture(job, log=print):
        jobs.append(job)
        job.check()
        raise Stop
    monkeypatch.setattr(pipeline, "run", capture)
    out = tmp_path / "pyengine-demo"
    out.mkdir()
    (out / "report.json").write_text("{}")  # a previous demo: `pyengine demo` twice works
    with pytest.raises(Stop):
        demo_run(out, tiny=True, progress=False)
    assert jobs[-1].overwrite
    other = tmp_path / "mine"
    other.mkdir()
    (other / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty .*--overwrite"):
        demo_run(other, tiny=True, progress=False)
    with pytest.raises(Stop):
        demo_run(other, tiny=True, progress=False, overwrite=True)


def test_warnings_are_one_line_too(tmp_path, capsys, monkeypatch):
    import pyengine.cli.commands.spec as spec_cmd

    def warn(a):
        warnings.warn("something to know\nacross lines")
        return 0
    monkeypatch.setattr(spec_cmd, "run", warn)
    assert main(["spec", "--model", "deit_tiny_patch16_224"]) == 0
    assert capsys.readouterr().err == "pyengine spec: warning: something to know across lines\n"
