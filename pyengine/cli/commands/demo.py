"""``pyengine demo``: the main job, end to end on a CPU in a few minutes (see
:mod:`pyengine.experiments.demo`)."""
from __future__ import annotations

import argparse

from pyengine.experiments.demo import DEMO

HELP = ("the main job: train a small ViT on digits, prune it with HiAP to 50%% MACs, compile, "
        "check, time dense vs compact on this CPU")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="pyengine-demo", help="output directory (report.json, "
                   "spec.json, the compact model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    p.add_argument("--target", type=float, default=None, help="kept fraction of dense MACs "
                   "(default 0.5)")
    p.add_argument("--epochs", type=int, default=None, help=f"HiAP epochs (default "
                   f"{DEMO['epochs']})")
    p.add_argument("--dense-epochs", type=int, default=None,
                   help=f"dense training epochs (default {DEMO['dense_epochs']})")
    p.add_argument("--finetune", type=int, default=None,
                   help=f"fine-tuning epochs of the compact model (default {DEMO['finetune']})")
    p.add_argument("--batch", type=int, default=None, help=f"timing batch (default "
                   f"{DEMO['batch']}; synthetic: 8)")
    p.add_argument("--repeats", type=int, default=None, help="timing repeats")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--overwrite", action="store_true", help="OUT may hold something other "
                   "than a previous demo: replace it")
    p.add_argument("--synthetic", action="store_true", help="the first demo: a random "
                   "heterogeneous structure on --model (no training)")
    p.add_argument("--model", default="deit_small_patch16_224", help="(--synthetic) timm model")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: seconds


def run(a) -> int:
    from pyengine.experiments.demo import run as demo_run
    from pyengine.experiments.demo import run_synthetic
    if a.synthetic:
        run_synthetic(a.out, a.model, a.target or 0.5, a.batch or 8, a.repeats or 10, a.seed)
        return 0
    demo_run(a.out, tiny=a.tiny, seed=a.seed, threads=a.threads, progress=a.progress,
             overwrite=a.overwrite,
             target=a.target, epochs=a.epochs, dense_epochs=a.dense_epochs, finetune=a.finetune,
             batch=a.batch, repeats=a.repeats)
    return 0
