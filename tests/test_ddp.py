"""DDP on CPU: two gloo processes launched like torchrun, per-rank batch b == one process 2b."""
import json
import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Subset

from pyengine.train.data import EpochSampler, ShardSampler, digits
from pyengine.train.trainer import evaluate, fit
from pyengine.models.zoo import digits_vit

N, B, EPOCHS, SEED = 64, 8, 2, 5  # 64 samples, per-rank batch 8: 4 steps per epoch


def tiny_vit():
    torch.manual_seed(0)  # same initial weights in every process
    return digits_vit(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)


def train_set():
    return Subset(digits("train", img_size=16, augment=True), range(N))


def val_set():
    return Subset(digits("val", img_size=16), range(45))  # odd size: shards differ in length


WORKER = textwrap.dedent("""
    import json, os, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {here!r})
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler
    from pyengine.train import distributed as dist
    from pyengine.train.data import ShardSampler
    from pyengine.train.trainer import fit, evaluate
    import test_ddp as T
    out = sys.argv[1]
    info = dist.init()  # torchrun's environment -> gloo process group on CPU
    model, ds = T.tiny_vit(), T.train_set()
    loader = DataLoader(ds, batch_size=T.B, sampler=DistributedSampler(ds, seed=T.SEED),
                        drop_last=True)
    hist = fit(model, loader, epochs=T.EPOCHS, lr=3e-3, seed=T.SEED, grad_clip=1.0,
               warmup_steps=2, progress=False, checkpoint_dir=os.path.join(out, "ckpt"))
    va = T.val_set()
    val = DataLoader(va, batch_size=7, sampler=ShardSampler(len(va), info.rank,
                                                            info.world_size))
    top1 = evaluate(model, val)
    save_file({{k: v.contiguous() for k, v in model.state_dict().items()}},
              os.path.join(out, f"rank{{info.rank}}.safetensors"))
    with open(os.path.join(out, f"rank{{info.rank}}.json"), "w") as f:
        json.dump({{"hist": hist, "top1": top1, "world": info.world_size,
                   "backend": info.backend, "shard": len(val.sampler)}}, f)
    dist.cleanup()
""")


def test_ddp_two_gloo_ranks_equal_single_process_double_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(here=os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == 2 and r0["backend"] == "gloo" and {r0["shard"], r1["shard"]} == {22, 23}
    s0, s1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    for k in s0:  # DDP keeps the replicas bit-identical
        assert torch.equal(s0[k], s1[k]), k
    assert r0["hist"] == r1["hist"]  # rows are reduced over ranks
    # only rank 0 wrote checkpoints, and they are complete
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["step-00000004", "step-00000008"]

    # one process, batch 2b, same seed: the same samples per step, the same mean gradient
    torch.set_num_threads(1)
    model, ds = tiny_vit(), train_set()
    loader = DataLoader(ds, batch_size=2 * B, sampler=EpochSampler(N, seed=SEED),
                        drop_last=True)
    hist = fit(model, loader, epochs=EPOCHS, lr=3e-3, seed=SEED, grad_clip=1.0,
               warmup_steps=2, progress=False, distributed=False)
    single = model.state_dict()
    worst = max((single[k] - s0[k]).abs().max().item() for k in s0)
    assert worst < 1e-5, worst
    moved = max((single[k] - tiny_vit().state_dict()[k]).abs().max().item() for k in s0)
    assert moved > 1e-3  # training did change the weights: the comparison is not vacuous
    for a, b in zip(hist, r0["hist"]):
        assert a["loss"] == __import__("pytest").approx(b["loss"], rel=1e-5)
        assert a["train_top1"] == b["train_top1"]
    va = val_set()
    whole = evaluate(model, DataLoader(va, batch_size=7))
    assert abs(whole - r0["top1"]) < 1e-9 and r0["top1"] == r1["top1"]
    assert len(ShardSampler(45, 0, 2)) + len(ShardSampler(45, 1, 2)) == 45
