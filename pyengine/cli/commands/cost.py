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
    p.add_argument("--latency", action="store_true",
                   help="also predict the latency (ms per batch) from the latency table of "
                        "--latency-device (measured once and cached; ViTs and CNNs)")
    p.add_argument("--latency-device", default="cpu",
                   help="torch device whose latency table predicts --latency (default cpu)")


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
    out = c.as_dict()
    if a.latency:
        from pyengine.cost.dtypes import as_dtype
        lat = pyengine.latency(model, batch=a.batch, dtype=as_dtype(a.dtype),
                               device=a.latency_device,
                               log=lambda t: print(f"pyengine: {t}", flush=True))
        print(lat.table())
        out["latency"] = lat.as_dict()
    if a.json:
        write_json(out, a.json)
    return 0
