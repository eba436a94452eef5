"""``python -m pyengine.train --out FILE.json``: train the digits recipe and record the result
(:func:`pyengine.train.trainer.record_digits_recipe`)."""
from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> int:
    import torch

    from pyengine.train.trainer import record_digits_recipe
    p = argparse.ArgumentParser(prog="python -m pyengine.train", description=__doc__)
    p.add_argument("--out", required=True, help="result JSON path (written atomically)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--recipe", default="{}", help="JSON overrides of DIGITS_RECIPE")
    p.add_argument("--model", default="{}", help="JSON overrides of the digits_vit kwargs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    record_digits_recipe(args.out, json.loads(args.recipe), json.loads(args.model))
    return 0
