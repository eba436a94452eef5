"""``pyengine compile``: apply a spec to a timm model, compile it, save the compact model."""
from __future__ import annotations

HELP = "apply a spec to a timm model, compile, save"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="timm model name")
    p.add_argument("--spec", required=True, help="spec.json (pyengine spec --model NAME > it)")
    p.add_argument("--out", required=True, help="output directory")


def run(a) -> int:
    import pyengine
    model = pyengine.create_model(a.model)
    dense_macs = pyengine.cost(model).macs
    pyengine.gate(model)
    pyengine.apply(model, pyengine.Spec.load(a.spec))
    compact = pyengine.compile(model)
    pyengine.save(compact, a.out)
    r = pyengine.cost(compact).macs / dense_macs
    print(f"wrote {a.out} (MAC ratio {r:.3f})")
    return 0
