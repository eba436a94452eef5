"""Checkpoints: no pickle (safetensors + JSON only), atomic, exact resume after a crash."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from pyengine.train import checkpoint as ck
from pyengine.train.data import EpochSampler, digits
from pyengine.train.trainer import fit
from pyengine.models.zoo import digits_vit


def tiny_vit():
    return digits_vit(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                      drop_rate=0.1)  # dropout: the resumed run must replay the RNG too


def tiny_loader(n=96, batch=16, seed=0):
    ds = Subset(digits("train", img_size=16, augment=True), range(n))
    return DataLoader(ds, batch_size=batch, sampler=EpochSampler(n, seed), drop_last=True)


class Counter:
    """An extra_state object: must survive the checkpoint as well."""
    def __init__(self):
        self.calls = 0
        self.t = torch.zeros(3)

    def state_dict(self):
        return {"calls": self.calls, "t": self.t.clone()}

    def load_state_dict(self, st):
        self.calls, self.t = st["calls"], st["t"].clone()


class Crash(RuntimeError):
    pass


def run(ckdir, crash_at=None, resume=False, every=4, epochs=3):
    torch.manual_seed(0)
    model = tiny_vit()
    counter = Counter()

    def on_step(step, total):
        if crash_at is not None and step == crash_at:
            raise Crash(step)
        counter.calls += 1
        counter.t += torch.rand(3)  # consumes the global RNG, as gate noise would

    def extra(model, logits, x, y, step):
        reg = 1e-3 * model.head.weight.square().sum()
        return reg, {"reg": reg.item()}

    hist = fit(model, tiny_loader(), tiny_loader(48), epochs=epochs, lr=3e-3,
               checkpoint_dir=ckdir, checkpoint_every=every, resume=resume, on_step=on_step,
               extra_loss=extra, extra_state={"counter": counter}, seed=3, progress=False,
               warmup_steps=2, grad_clip=1.0)
    return model, hist, counter


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_flatten_roundtrip_no_pickle(tmp_path):
    state = {"a": torch.randn(3, 2), "opt": {"state": {0: {"step": torch.tensor(4.0)}},
                                             "param_groups": [{"betas": (0.9, 0.99),
                                                               "params": [0]}]},
             "np": np.arange(5, dtype=np.uint32), "none": None, "s": "x", "f": float("inf"),
             "bf": torch.ones(2, dtype=torch.bfloat16)}
    path = ck.save_checkpoint(tmp_path, 7, state)
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", ck.META, ck.TENSORS]
    json.loads((path / ck.META).read_text())  # plain JSON
    back = ck.load_checkpoint(path)
    assert torch.equal(back["a"], state["a"]) and back["bf"].dtype == torch.bfloat16
    assert back["opt"]["state"][0]["step"].item() == 4.0  # int keys come back as ints
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.99)  # tuples stay tuples
    assert back["np"].dtype == np.uint32 and back["np"].tolist() == [0, 1, 2, 3, 4]
    assert back["f"] == float("inf") and back["none"] is None
    with pytest.raises(TypeError, match="object"):
        ck.save_checkpoint(tmp_path, 8, {"bad": object()})
    assert ck.latest_checkpoint(tmp_path) == path  # the failed save left nothing behind


def test_keep_and_latest(tmp_path):
    for s in (1, 5, 12):
        ck.save_checkpoint(tmp_path, s, {"x": torch.tensor([s])}, keep=2)
    names = [p.name for p in ck.list_checkpoints(tmp_path)]
    assert names == ["step-00000005", "step-00000012"]
    (tmp_path / ".tmp-step-00000099-1").mkdir()  # a torn write is ignored
    assert ck.latest_checkpoint(tmp_path).name == "step-00000012"
    with pytest.raises(FileNotFoundError):
        ck.load_checkpoint(tmp_path / "nope")


def test_resume_after_crash_is_bit_identical(tmp_path):
    ref, hist_ref, cnt_ref = run(tmp_path / "a")
    # mid-epoch crash: 6 steps per epoch, checkpoints every 4 -> last one at step 8 (epoch 2)
    with pytest.raises(Crash):
        run(tmp_path / "b", crash_at=10)
    assert ck.latest_checkpoint(tmp_path / "b").name == "step-00000008"
    got, hist, cnt = run(tmp_path / "b", resume=True)
    same_state(ref, got)
    assert hist == hist_ref
    assert cnt.calls == cnt_ref.calls == 18 and torch.equal(cnt.t, cnt_ref.t)
    for d in (tmp_path / "a", tmp_path / "b"):  # only safetensors + JSON on disk
        files = [p for p in d.rglob("*") if p.is_file()]
        assert files and {p.suffix for p in files} == {".safetensors", ".json"}


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    ref, hist_ref, _ = run(tmp_path / "a", epochs=1)
    got, hist, _ = run(tmp_path / "b", epochs=1, resume=True)
    same_state(ref, got)
    assert hist == hist_ref


SCRIPT = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {here!r})
    from test_checkpoint import run
    ckdir, kill_at = sys.argv[1], int(sys.argv[2])
    def die(step):
        if step == kill_at:
            os.kill(os.getpid(), 9)   # SIGKILL: no cleanup, no finally blocks
    import test_checkpoint
    torch.set_num_threads(1)
    import pyengine.train.trainer as T
    real_fit = T.fit
    def fit(*a, on_step=None, **k):
        def hook(step, total):
            die(step)
            on_step(step, total)
        return real_fit(*a, on_step=hook, **k)
    test_checkpoint.fit = fit
    run(ckdir, resume=True)
""")


def test_resume_after_sigkill(tmp_path):
    script = tmp_path / "victim.py"
    script.write_text(SCRIPT.format(here=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "b"), "13"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert ck.latest_checkpoint(tmp_path / "b").name == "step-00000012"
    # the victim ran on 1 thread: so must the reference and the resumed run, since CPU
    # reductions split over a different number of threads round differently
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref, hist_ref, _ = run(tmp_path / "a")
        got, hist, _ = run(tmp_path / "b", resume=True)
    finally:
        torch.set_num_threads(threads)
    same_state(ref, got)
    assert hist == hist_ref
