"""``pyengine compile``: apply a spec to a timm model, compile it, save the compact model."""
from __future__ import annotations

HELP = "apply a spec to a timm model, compile, save"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="timm model name")
    p.add_argument("--spec", required=True, help="spec.json (pyengine spec --model NAME > it)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layout", default="auto",
                   help="head layout: auto (planned with the device's latency table), exact, "
                        "padded")
    p.add_argument("--device", default=None,
                   help="device layout auto plans for: cpu or cuda (default cpu)")


def run(a) -> int:
    import pyengine
    model = pyengine.create_model(a.model)
    dense_macs = pyengine.cost(model).macs
    pyengine.gate(model)
    pyengine.apply(model, pyengine.Spec.load(a.spec))
    from pyengine.models.vit.layout import layout_of
    compact = pyengine.compile(model, layout=a.layout, device=a.device)
    pyengine.save(compact, a.out)
    r = pyengine.cost(pyengine.spec(model)).macs / dense_macs
    lay = layout_of(compact.pyengine_spec) if isinstance(compact.pyengine_spec, pyengine.Spec) \
        else None
    extra = ""
    if lay is not None:
        computed = pyengine.cost(compact).macs / dense_macs
        extra = f", layout {lay.mode}: computes {computed:.3f}"
    print(f"wrote {a.out} (MAC ratio {r:.3f}{extra})")
    return 0
