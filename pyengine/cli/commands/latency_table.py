"""``pyengine latency-table``: measure (or complete) the latency table of a device."""
from __future__ import annotations

import json

HELP = "measure the per-device latency table that layout='auto' and latency budgets read"
DESCRIPTION = (
    "Time the layers a ViT is made of on this device (attention by head count and q/k, v "
    "widths for every attention backend that runs here, qkv/proj/FFN by width, stem, head, "
    "per batch size) with the one timing harness, and store the medians in the device's "
    "cached table (PYENGINE_CACHE, default ~/.cache/pyengine/latency/) or in --out. Entries "
    "already measured are kept; pyengine.compile(layout='auto') measures missing ones itself.")


def add_arguments(p) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32, bf16, fp16")
    p.add_argument("--batch", default="1,8", help="batch sizes, comma list (default 1,8)")
    p.add_argument("--model", default="deit_small_patch16_224",
                   help="timm model name or pyengine.save directory whose shape to measure")
    p.add_argument("--model-kwargs", default=None, type=json.loads,
                   help='JSON kwargs for timm.create_model, e.g. \'{"img_size": 64}\'')
    p.add_argument("--out", default=None, help="write the table here instead of the cache")
    p.add_argument("--repeats", type=int, default=7, help="samples per grid point (median)")
    p.add_argument("--points", default=None, type=json.loads,
                   help='grid axes to use instead of the default, per grid kind, e.g. '
                        '\'{"attn": {"heads": [1, 6], "qk": [16, 64], "v": [16, 64]}}\'')
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (part of a CPU table's device key)")
    p.add_argument("--redo", action="store_true",
                   help="measure every asked batch again, even if the table has it")
    p.add_argument("--no-progress", action="store_true")


def run(a) -> int:
    import torch

    from pyengine.cost import latency_table as lt
    from pyengine.cost.dtypes import as_dtype
    from pyengine.measure.bench import parse_batches, resolve_device
    from pyengine.models import geometry, load_model

    if a.threads:
        torch.set_num_threads(a.threads)
    batches = parse_batches(a.batch)
    dev = resolve_device(a.device)
    try:
        dt = as_dtype(a.dtype)
    except TypeError as e:
        raise ValueError(f"--dtype: {e}") from None
    if a.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {a.repeats}")
    if a.points is not None and not isinstance(a.points, dict):
        raise ValueError("--points must be a JSON object {grid kind: {axis: [points]}}")
    model = load_model(a.model, **(a.model_kwargs or {}))
    g = geometry(model)
    shape = lt.TableShape.of(g)
    path = a.out or lt.table_path(dev, dt)
    if a.redo:
        t = lt.load_table(dev, dt, path)
        if t is not None and shape.key in t.shapes:
            for b in batches:
                t.shapes[shape.key]["batches"].pop(b, None)
            t.save(path)
    table = lt.get_table(shape, dev, dt, batches, path=path, measure=True,
                         progress=not a.no_progress, log=print, repeats=a.repeats,
                         points=a.points)
    print(format_summary(table, g, batches))
    print(f"wrote {path}")
    return 0


def format_summary(table, g, batches) -> str:
    """A few entries per batch: the dense layers and the whole dense model, predicted."""
    from pyengine.structure.spec import Spec
    H, Dh, M = g.num_heads, g.head_dim, g.mlp_hidden
    from pyengine.cost.latency_table import TableShape
    lines = [f"latency table {table.device} {table.dtype}: shape {TableShape.of(g).key}",
             f"{'batch':>5} {'backend':<8} {'attn H heads':>13} {'qkv':>8} {'mlp':>8} "
             f"{'stem':>8} {'head':>8} {'dense model':>12}   (ms)"]
    full = Spec.full(g)
    for b in batches:
        for be in table.candidates(g):
            lines.append(
                f"{b:>5} {be:<8} {table.core_ms(g, b, [(H, Dh, Dh)], be):>13.3f} "
                f"{table.linear_ms(g, b, 'qkv', 3 * H * Dh):>8.3f} {table.mlp_ms(g, b, M):>8.3f} "
                f"{table.stem_ms(g, b):>8.3f} {table.head_ms(g, b):>8.3f} "
                f"{table.spec_ms(full, b, be):>12.3f}")
    if table.calibrated(g):
        for b in batches:
            lines.append(f"in a model, batch {b}: attention {table.scale(g, b, 'attn'):.3f} x "
                         f"its grids + {table.branch_ms(g, b, 'attn'):.3f} ms, FFN "
                         f"{table.scale(g, b, 'mlp'):.3f} x + {table.branch_ms(g, b, 'mlp'):.3f}"
                         f" ms per kept branch, {table.value(g, 'forward_ctx', b):.3f} ms per"
                         " forward (whole-model calibration)")
    return "\n".join(lines)
