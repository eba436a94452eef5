"""``pyengine prune``: learn (or score) a structure at a MAC target and write a compact model.

    pyengine prune --model digits_vit --data digits --method hiap --target 0.5 --epochs 10 \\
        --out runs/hiap50

DIR gets the compact model (``pyengine.save``: model.safetensors, config.json, spec.json,
manifest.json), metrics.json (dense and pruned top-1, MACs, params, target, achieved ratio,
times) and checkpoints/ (the run's settings, the dense weights and the trainer's checkpoints,
for ``--resume``). A non-empty DIR is refused unless --overwrite or --resume is given.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from pyengine.cli.flags import add_dataclass_flags, dataclass_from_flags
from pyengine.methods.base import Budget, Training, methods
from pyengine.methods.pipeline import PruneJob

HELP = "learn or score a structure at a MAC target and write a compact model"
DESCRIPTION = __doc__


def _json_dict(text: str) -> dict:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text}")
    return d


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True,
                   help="timm model name (e.g. deit_small_patch16_224) or digits_vit")
    g.add_argument("--model-kwargs", type=_json_dict, default=None, metavar="JSON",
                   help="extra timm.create_model kwargs, e.g. '{\"depth\": 4}'")
    g.add_argument("--checkpoint", default=None, help="dense weights: .safetensors, or a "
                   ".pth/.pt state_dict (read with weights_only=True)")
    g.add_argument("--data", default="digits",
                   help="'digits' (embedded) or an ImageNet-layout folder DIR/{train,val}")
    g.add_argument("--img-size", type=int, default=None,
                   help="input size (default: the digits recipe's, else the model's 224)")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--workers", type=int, default=0)
    g.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no training augmentation")
    g.add_argument("--dense-epochs", type=int, default=None, help="train the dense model for "
                   "this many epochs first (default on digits without --checkpoint: the recipe)")

    g = p.add_argument_group("pruning")
    g.add_argument("--method", default="hiap", choices=sorted(methods()))
    add_dataclass_flags(g, Budget)
    g.add_argument("--finetune", type=int, default=0,
                   help="epochs of fine-tuning the compact model with distillation")
    g.add_argument("--finetune-lr", type=float, default=None)

    g = p.add_argument_group("training")
    add_dataclass_flags(g, Training, skip=("device", "progress", "checkpoint_dir", "resume",
                                           "seed", "amp"))

    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--resume", action="store_true",
                   help="continue from the checkpoints in OUT/checkpoints (refused if they were "
                        "written with other settings)")
    g.add_argument("--overwrite", action="store_true",
                   help="OUT may hold a previous run: replace it (its model stays until the "
                        "new one is written)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--latency-batches", type=_batches, default=(1, 64), metavar="B,B",
                   help="metrics.json: predicted and measured latency of the dense and pruned "
                        "models at these batch sizes on --device (default 1,64; '' for none)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if "
                   "available)")
    g.add_argument("--amp", default=None, choices=["bf16", "fp16"])
    g.add_argument("--no-progress", dest="progress", action="store_false")

    seen = set()
    for name, method in sorted(methods().items()):
        if method.Config in seen or not dataclasses.fields(method.Config):
            continue
        seen.add(method.Config)
        users = sorted(n for n, m in methods().items() if m.Config is method.Config)
        add_dataclass_flags(p.add_argument_group(f"{', '.join(users)} (--method {users[0]}"
                                                 f"{', ...' if len(users) > 1 else ''})"),
                            method.Config)


def _batches(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of batch sizes, got "
                                         f"{text!r}") from None
    if any(b < 1 for b in out):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return out


def job_from_flags(args) -> PruneJob:
    """The PruneJob the flags describe."""
    import torch
    method = methods()[args.method]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return PruneJob(
        model=args.model, out=args.out, method=args.method, data=args.data,
        model_kwargs=args.model_kwargs, checkpoint=args.checkpoint, img_size=args.img_size,
        batch_size=args.batch_size, workers=args.workers, augment=args.augment,
        dense_epochs=args.dense_epochs, finetune=args.finetune, finetune_lr=args.finetune_lr,
        budget=dataclass_from_flags(Budget, args),
        training=dataclass_from_flags(Training, args, device=device, checkpoint_dir=None),
        method_config=dataclass_from_flags(method.Config, args), overwrite=args.overwrite,
        latency_batches=tuple(args.latency_batches))


def run(args) -> int:
    from pyengine.methods.pipeline import run as prune_run
    prune_run(job_from_flags(args))
    return 0
