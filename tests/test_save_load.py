"""save/load: safetensors + spec.json + config.json, exact round trip, no pickle."""
import json

import pytest
import timm
import torch

import pyengine

from _specs import random_spec


def test_round_trip_exact(tmp_path, monkeypatch):
    model = pyengine.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3,
                                  num_classes=7)
    pyengine.gate(model.eval())
    pyengine.apply(model, random_spec(pyengine.geometry(model), 5))
    compact = pyengine.compile(model).eval()
    pyengine.save(compact, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "manifest.json",
                                                          "model.safetensors", "spec.json"]
    assert json.loads((tmp_path / "config.json").read_text())["kwargs"]["depth"] == 3

    def no_pickle(*a, **k):
        raise AssertionError("pyengine.load must not unpickle anything")
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = pyengine.load(tmp_path)
    assert pyengine.spec(loaded) == pyengine.spec(compact)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), compact(x))
    sd_a, sd_b = compact.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_round_trip_plain_timm_model(tmp_path):
    # created by timm directly: the rebuild kwargs come from introspection, and save checks
    # that they really rebuild the same architecture
    model = pyengine.gate(timm.create_model("deit_tiny_patch16_224").eval())
    pyengine.apply(model, random_spec(pyengine.geometry(model), 9, model="deit_tiny_patch16_224"))
    pyengine.save(model, tmp_path)  # a gated model is compiled on the way
    loaded = pyengine.load(tmp_path)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), pyengine.compile(model).eval()(x))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        pyengine.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pyengine.load(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        pyengine.load(tmp_path / "file")
    with pytest.raises(NotADirectoryError, match="is a file"):
        pyengine.save(_compact(0), tmp_path / "file")
    with pytest.raises(ValueError, match="compact"):
        pyengine.save(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
                                        depth=1), tmp_path)


# ---- a model directory is written as a unit, checked on load (issue 19) ---------------------
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
import multiprocessing as mp  # noqa: E402

from pyengine.io import atomic  # noqa: E402
from pyengine.io.manifest import CorruptFileError  # noqa: E402


def _compact(seed, depth=2):
    torch.manual_seed(seed)
    model = pyengine.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
                                  depth=depth, num_classes=5)
    pyengine.gate(model.eval())
    pyengine.apply(model, random_spec(pyengine.geometry(model), seed))
    return pyengine.compile(model).eval()


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _temps(d):
    return [p.name for p in d.parent.iterdir() if p.name.startswith(f".{d.name}.pyengine-")]


def _save_forever(models, d, no_exchange, start=0):
    torch.set_num_threads(1)
    if no_exchange:
        atomic._exchange = lambda a, b: False
    i = start
    while True:
        pyengine.save(models[i % 2], d)
        i += 1


@pytest.mark.parametrize("no_exchange", [False, True], ids=["exchange", "two-renames"])
def test_sigkill_during_save_leaves_the_old_or_the_new_model(tmp_path, no_exchange):
    # a writer saves the other model, then both in turn, and is killed with SIGKILL at a
    # random moment; the directory then always loads as one of the two (never a mix), and
    # the writer's temporaries are gone after the next load
    models = [_compact(1), _compact(2, depth=3)]
    d = tmp_path / "model"
    t0 = time.perf_counter()
    pyengine.save(models[0], d)
    t_save = time.perf_counter() - t0
    (d / "notes.txt").write_text("kept across saves")
    ctx, rng, current, outcomes = mp.get_context("fork"), random.Random(0), 0, set()
    # at least 10 kills, until both outcomes were seen (a loaded machine starts the writer
    # late: the window widens every 5 kills)
    for kill in range(40):
        if kill >= 10 and outcomes == {"old", "new"}:
            break
        p = ctx.Process(target=_save_forever, args=(models, d, no_exchange, 1 - current),
                        daemon=True)
        p.start()
        time.sleep(rng.uniform(0.0, 3 * t_save * (1 + kill // 5)))
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        assert p.exitcode == -signal.SIGKILL
        loaded = pyengine.load(d)
        match = [i for i, m in enumerate(models) if _same(loaded, m)]
        assert len(match) == 1 and pyengine.spec(loaded) == pyengine.spec(models[match[0]])
        outcomes.add("new" if match[0] != current else "old")
        current = match[0]
        assert _temps(d) == [] and (d / "notes.txt").read_text() == "kept across saves"
    assert outcomes == {"old", "new"}  # kills landed before and after a save completed


def test_a_reader_sees_the_old_or_the_new_model_while_a_writer_saves(tmp_path):
    models = [_compact(1), _compact(2, depth=3)]
    d = tmp_path / "model"
    pyengine.save(models[0], d)
    p = mp.get_context("fork").Process(target=_save_forever, args=(models, d, False),
                                       daemon=True)
    p.start()
    try:
        t_end, seen = time.monotonic() + 3.0, set()
        while time.monotonic() < t_end:
            loaded = pyengine.load(d)
            seen |= {i for i, m in enumerate(models) if _same(loaded, m)}
            assert any(_same(loaded, m) for m in models)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join()
    assert seen == {0, 1}


def test_a_failing_save_keeps_the_previous_model_and_leaves_no_temporary(tmp_path, monkeypatch):
    a, b = _compact(1), _compact(2)
    d = tmp_path / "m"
    pyengine.save(a, d)
    calls = []

    def fail_on_spec(path, data):  # the spec write fails (disk full, ...)
        calls.append(path.name)
        if path.name == "spec.json":
            raise OSError(28, "No space left on device")
        return real(path, data)
    real = atomic.write_synced
    monkeypatch.setattr("pyengine.io.model_dir.write_synced", fail_on_spec)
    with pytest.raises(OSError, match="No space"):
        pyengine.save(b, d)
    monkeypatch.undo()
    assert "spec.json" in calls and _temps(d) == []
    assert _same(pyengine.load(d), a)


def test_stale_temporaries_of_dead_writers_are_cleaned_up(tmp_path):
    a = _compact(1)
    d = tmp_path / "m"
    pyengine.save(a, d)
    dead = mp.get_context("fork").Process(target=os._exit, args=(0,))
    dead.start()
    dead.join()  # a pid that no longer runs
    for kind in ("new", "old"):
        t = tmp_path / f".m.pyengine-{kind}-{dead.pid}-0123abcd"
        t.mkdir()
        (t / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / f".m.pyengine-new-{os.getppid()}-0123abcd"  # a live writer's: left alone
    live.mkdir()
    assert _same(pyengine.load(d), a)
    assert _temps(d) == [live.name]
    live.rmdir()
    # killed between the two renames of a swap without exchange: the directory is missing
    os.rename(d, tmp_path / f".m.pyengine-old-{dead.pid}-00000001")
    assert _same(pyengine.load(d), a) and _temps(d) == []


def test_corrupted_or_truncated_files_are_named(tmp_path):
    a = _compact(1)
    d = tmp_path / "m"
    pyengine.save(a, d)
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x01  # one flipped bit in the weights
    w.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"model\.safetensors is damaged: its SHA-256"):
        pyengine.load(d)
    w.write_bytes(bytes(data[:-100]))
    with pytest.raises(CorruptFileError, match=r"model\.safetensors is damaged: .* bytes"):
        pyengine.load(d)
    pyengine.save(a, d)
    (d / "spec.json").write_text((d / "spec.json").read_text().replace("[0", "[1", 1))
    with pytest.raises(CorruptFileError, match="spec.json is damaged"):
        pyengine.load(d)
    pyengine.save(a, d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="manifest.json: not valid JSON"):
        pyengine.load(d)


def _rewrite(d, name, text):
    """Edit a file and the manifest with it (what a crafted directory would do)."""
    from pyengine.io.manifest import manifest_bytes
    (d / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    files = {n: (d / n).read_bytes() for n in ("model.safetensors", "spec.json", "config.json")}
    (d / "manifest.json").write_bytes(manifest_bytes(files))


@pytest.mark.parametrize("kwargs, match", [
    ({"pretrained": True}, "'pretrained' is not a model setting"),
    ({"checkpoint_path": "/etc/passwd"}, "'checkpoint_path' is not a model setting"),
    ({"pretrained_cfg_overlay": {"file": "/tmp/w.bin"}}, "'pretrained_cfg_overlay' is not"),
    ({"depth": "2"}, "depth must be an integer"),
    ({"global_pool": "../../x"}, "global_pool must be a short name"),
    ({"mlp_ratio": float("nan")}, "mlp_ratio must be a finite number"),
])
def test_config_json_is_read_against_a_whitelist(tmp_path, kwargs, match, monkeypatch):
    d = tmp_path / "m"
    pyengine.save(_compact(1), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["kwargs"].update(kwargs)
    _rewrite(d, "config.json", json.dumps(cfg))
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("reached timm"))
    with pytest.raises(ValueError, match=match) as e:
        pyengine.load(d)
    assert "config.json: kwargs" in str(e.value)


def test_config_json_keys_and_types_are_named(tmp_path):
    d = tmp_path / "m"
    pyengine.save(_compact(1), d)
    cfg = json.loads((d / "config.json").read_text())
    for bad, match in [({**cfg, "extra": 1}, r"unknown key\(s\) \['extra'\]"),
                       ({**cfg, "kwargs": [1]}, "'kwargs' must be a JSON object"),
                       ({k: v for k, v in cfg.items() if k != "architecture"},
                        "'architecture' is missing"),
                       ({**cfg, "architecture": "no_such_net"}, "unknown model 'no_such_net'")]:
        _rewrite(d, "config.json", json.dumps(bad))
        with pytest.raises(ValueError, match=match) as e:
            pyengine.load(d)
        assert "config.json" in str(e.value)


def test_integer_or_nan_weights_are_refused_not_cast(tmp_path):
    from safetensors.torch import load_file, save as st_save
    a = _compact(1)
    d = tmp_path / "m"
    pyengine.save(a, d)
    state = load_file(str(d / "model.safetensors"))
    key = next(k for k in state if k.endswith("head.weight"))
    _rewrite(d, "model.safetensors", st_save({**state, key: state[key].to(torch.int32)}))
    with pytest.raises(ValueError, match=f"{key} is int32, the model needs float32"):
        pyengine.load(d)
    bad = state[key].clone()
    bad[0, 0] = float("nan")
    _rewrite(d, "model.safetensors", st_save({**state, key: bad}))
    with pytest.raises(ValueError, match=f"model.safetensors: tensor {key} holds NaN"):
        pyengine.load(d)
    with torch.no_grad():
        a.head.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="cannot save the model: tensor head.weight holds inf"):
        pyengine.save(a, tmp_path / "m2")
    assert not (tmp_path / "m2").exists()


def test_save_refuses_unknown_kwargs_and_keeps_other_files(tmp_path, monkeypatch):
    m = _compact(1)
    m.pyengine_config = {**m.pyengine_config,
                         "kwargs": {**m.pyengine_config["kwargs"], "cache_dir": "/tmp"}}
    with pytest.raises(ValueError, match="'cache_dir' is not a model setting"):
        pyengine.save(m, tmp_path / "m")
    d = tmp_path / "run"
    (d / "checkpoints").mkdir(parents=True)
    (d / "checkpoints" / "x.bin").write_bytes(b"123")
    pyengine.save(_compact(1), d, extra_files={"metrics.json": "{}"})
    assert (d / "checkpoints" / "x.bin").read_bytes() == b"123"
    assert json.loads((d / "manifest.json").read_text())["files"].keys() == {
        "config.json", "metrics.json", "model.safetensors", "spec.json"}
    monkeypatch.chdir(d)
    with pytest.raises(ValueError, match="current directory"):
        pyengine.save(_compact(1), ".")


def test_a_mount_point_is_replaced_file_by_file_with_a_warning(tmp_path, monkeypatch):
    # a mount point cannot be renamed: the files are replaced one by one (manifest last)
    a, b = _compact(1), _compact(2)
    d = tmp_path / "mnt"
    pyengine.save(a, d)
    real = os.path.ismount
    monkeypatch.setattr(atomic.os.path, "ismount", lambda p: str(p) == str(d) or real(p))
    with pytest.warns(UserWarning, match="mount point"):
        pyengine.save(b, d)
    assert _same(pyengine.load(d), b) and sorted(p.name for p in d.iterdir()) == [
        "config.json", "manifest.json", "model.safetensors", "spec.json"]
