"""Fake latency tables for tests: grids filled from formulas instead of timings."""
import torch

from pyengine.models.packed_linear import LINEAR_KIND
from pyengine.cost.latency_table import (Grid, LatencyTable, TableShape, _extension_id,
                                         device_key)
from pyengine.measure.latency_grid import default_points, _grid_shape


def fake_table(geometry, batches=(1, 8), candidates=("torch",), attn=None, runs=None,
               linear=None, device=None, dtype="float32", calibration=None) -> LatencyTable:
    """A table of this machine's CPU key whose grids come from ``attn(backend, b, h, qk, v)``
    (qk == 0 for the attn0 grids), ``runs(backend, b, k)`` and ``linear(kind, b, width)``;
    defaults: cost proportional to the work, 0.05 ms per extra run. ``calibration(b)``: the
    in-context scalars {calib_attn, calib_mlp, attn_ctx, mlp_ctx} at batch b (default none)."""
    shape = TableShape.of(geometry)
    attn = attn or (lambda be, b, h, qk, v: 0.01 + 1e-5 * b * h * (qk + v))
    runs = runs or (lambda be, b, k: 0.05 * (k - 1))
    linear = linear or (lambda kind, b, w: 0.005 + 1e-5 * b * w)
    pts = default_points(shape)
    t = LatencyTable(device or device_key("cpu"), dtype,
                     {"note": "fake", "torch": torch.__version__, "extension_id": _extension_id(),
                      "linear": LINEAR_KIND})
    for b in batches:
        grids = {}
        for be in candidates:
            for kind in ("attn_eq", "attn_ne", "attn0"):
                axes = pts[kind]
                vals = [attn(be, b, p["heads"], p.get("qk", p.get("width", 0)),
                             p.get("v", p.get("width")))
                        for p in _grid_shape(axes)]
                grids[f"{kind}/{be}"] = Grid({k: [float(x) for x in v] for k, v in axes.items()},
                                             vals)
            ks = pts["runs"]["runs"]
            grids[f"runs/{be}"] = Grid({"runs": [float(k) for k in ks]},
                                       [runs(be, b, k) if k > 1 else 0.0 for k in ks])
        for kind in ("qkv", "proj", "mlp"):
            ws = pts[kind]["width"]
            grids[kind] = Grid({"width": [float(w) for w in ws]}, [linear(kind, b, w) for w in ws])
        for kind, v in (("branch", 0.002), ("stem", 0.1), ("head", 0.05)):
            grids[kind] = Grid({}, [v * b])
        t.add(shape, b, grids, list(candidates))
        if calibration is not None:
            cal = calibration(b)
            part = t.shapes[shape.key]["batches"][b]
            part["grids"].update({k: Grid({}, [float(v)]) for k, v in cal.items()})
            part["calibration"] = {"note": "fake", **cal}
    return t
