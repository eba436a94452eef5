"""``pyengine prune``: learn (or score) a structure at a MAC target and write a compact model.

    pyengine prune --model digits_vit --data digits --method hiap --target 0.5 --epochs 10 \\
        --out runs/hiap50

DIR gets the compact model (``pyengine.save``: model.safetensors, config.json, spec.json),
metrics.json (dense and pruned top-1, MACs, params, target, achieved ratio, times) and
checkpoints/ (the dense weights and the trainer's checkpoints, for ``--resume``).
"""
from __future__ import annotations

import argparse
import json

from pyengine.methods.pipeline import METHODS, method_module

HELP = "learn or score a structure at a MAC target and write a compact model"
DESCRIPTION = __doc__


def _fraction(text: str) -> float:
    v = float(text)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return v


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
    g.add_argument("--method", default="hiap", choices=sorted(METHODS))
    g.add_argument("--target", type=_fraction, default=0.5,
                   help="kept fraction of dense MACs (default 0.5)")
    g.add_argument("--tolerance", type=float, default=0.03,
                   help="final MACs within target * (1 +- tolerance) (default 0.03)")
    g.add_argument("--epochs", type=int, default=10, help="epochs of structure learning")
    g.add_argument("--lr", type=float, default=5e-4, help="weight learning rate")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--grad-clip", type=float, default=None)
    g.add_argument("--kd-alpha", type=float, default=0.5,
                   help="distillation weight from the dense model (0: no teacher)")
    g.add_argument("--kd-temperature", type=float, default=4.0)
    g.add_argument("--min-heads", type=int, default=1,
                   help="minimum heads per layer (0 lets a whole attention block go)")
    g.add_argument("--min-head-dims", type=float, default=0.0,
                   help="minimum fraction of q/k and of v dims inside a kept head")
    g.add_argument("--min-ffn", type=float, default=0.0,
                   help="minimum kept fraction of each FFN (0 lets a whole FFN go)")
    g.add_argument("--round-to", type=int, default=None, metavar="K",
                   help="round kept dims per head and neurons per FFN to multiples of K "
                        "(e.g. 8 for tensor cores)")
    g.add_argument("--finetune", type=int, default=0,
                   help="epochs of fine-tuning the compact model with distillation")
    g.add_argument("--finetune-lr", type=float, default=None)

    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--resume", action="store_true",
                   help="continue from the checkpoints in OUT/checkpoints")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if "
                   "available)")
    g.add_argument("--amp", default=None, choices=["bf16", "fp16"])
    g.add_argument("--no-progress", dest="progress", action="store_false")

    seen = set()
    for method in sorted(METHODS):
        mod = method_module(method)
        if mod is not None and mod.__name__ not in seen and hasattr(mod, "add_arguments"):
            seen.add(mod.__name__)
            mod.add_arguments(p)


def run(args) -> int:
    import torch

    from pyengine.methods.pipeline import run as prune_run
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    prune_run(args)
    return 0
