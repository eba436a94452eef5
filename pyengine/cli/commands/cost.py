"""``pyengine cost``: analytical MACs, bytes and roofline label per layer."""
from __future__ import annotations

HELP = "analytical MACs / bytes / roofline per layer"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="timm model name or pyengine.save directory")
    p.add_argument("--spec", help="spec.json to apply to a timm model first")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", help="float32, bf16, fp16")
    p.add_argument("--device", default=None,
                   help="peaks to classify against: cpu, h100, h200, a100")
    p.add_argument("--json", help="also write the cost as JSON here")


def run(a) -> int:
    import pyengine
    from pyengine.io.atomic import write_json
    from pyengine.models import load_model
    model = load_model(a.model)
    if a.spec:
        pyengine.gate(model)
        pyengine.apply(model, pyengine.Spec.load(a.spec))
    c = pyengine.cost(model, batch=a.batch, dtype=a.dtype, device=a.device)
    print(c.table())
    if a.json:
        write_json(c.as_dict(), a.json)
    return 0
