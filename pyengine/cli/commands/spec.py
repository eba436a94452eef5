"""``pyengine spec``: print the structure spec of a model (the full spec of a dense timm model;
edit it, then ``pyengine compile --spec``)."""
from __future__ import annotations

HELP = "print the structure spec of a model (full for dense timm)"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="timm model name or pyengine.save directory")


def run(a) -> int:
    import pyengine
    from pyengine.models import load_model
    print(pyengine.spec(load_model(a.model)).to_json(), end="")
    return 0
