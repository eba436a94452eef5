"""Predicted and measured latency of models side by side (``pyengine prune``'s metrics.json,
``pyengine bench``): measured with the one timing harness (:mod:`pyengine.measure.timing`,
interleaved), predicted by :func:`pyengine.latency` from the device's latency table.

    rep = latency_report({"dense": dense, "pruned": compact}, device="cpu", batches=(1, 64))
    rep["predicted_ms"]["pruned"]["64"], rep["measured_ms"]["pruned"]["64"]["median_ms"]

Predictions read the cached table only (measuring one is `pyengine latency-table`'s or a
latency budget's job); without one they are null and ``note`` says why.
"""
from __future__ import annotations

import statistics
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["predict", "latency_report"]


def predict(models: Mapping[str, nn.Module], batches: Sequence[int], device="cpu",
            dtype=torch.float32, measure: bool = False,
            log: Callable[[str], None] | None = None) -> tuple[dict, str | None]:
    """``({name: {str(batch): ms or None}}, note)``: pyengine.latency of each model at each
    batch; ``measure``: measure the table's missing batches (else the cache only)."""
    import pyengine
    from pyengine.cost.latency_table import LatencyTableError, TableShape, get_table, load_table
    out: dict[str, dict[str, float | None]] = {k: {str(b): None for b in batches}
                                               for k in models}
    notes = []
    tables: dict[str, Any] = {}
    for name, m in models.items():
        try:
            s = pyengine.spec(m)
            if _cnn_predict(s, batches, device, dtype, out[name], notes, name):
                continue
            if getattr(s, "dense", None) is None or not hasattr(s.dense, "num_tokens"):
                raise LatencyTableError("the latency model covers ViTs")
            key = TableShape.of(s.dense).key
            if key not in tables:
                if measure:
                    tables[key] = get_table(s.dense, device, dtype, list(batches), log=log)
                else:  # the cache only; batches it lacks are interpolated / extrapolated
                    t = load_table(device, dtype)
                    tables[key] = t if t is not None and t.batches(s.dense) else None
            t = tables[key]
            if t is None:
                raise LatencyTableError("no cached latency table for this device, dtype and "
                                        "model shape (`pyengine latency-table` measures one)")
            for b in batches:
                out[name][str(b)] = pyengine.latency(s, batch=int(b), dtype=dtype, device=device,
                                                     table=t).ms
        except (LatencyTableError, ValueError, TypeError, AttributeError) as e:
            notes.append(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return out, ("; ".join(notes) or None)


def _cnn_predict(s, batches, device, dtype, out: dict, notes: list, name: str) -> bool:
    """A CNN's predictions from its cached tables (one per batch; measuring a CNN's table at
    a large batch takes minutes, so only a latency budget's batch is measured, by the
    budget): False when ``s`` is not a CNN spec."""
    import pyengine
    from pyengine.cost.cnn_latency import cnn_spec_of
    from pyengine.cost.cnn_latency_table import get_cnn_table
    if cnn_spec_of(s) is None:
        return False
    missing = []
    for b in batches:
        t = get_cnn_table(s.dense, s.model, device, dtype, int(b), measure=False)
        if t is None:
            missing.append(str(b))
            continue
        out[str(b)] = pyengine.latency(s, batch=int(b), dtype=dtype, device=device, table=t).ms
    if missing:
        notes.append(f"{name}: no cached CNN latency table at batch {', '.join(missing)}")
    return True


def latency_report(models: Mapping[str, nn.Module], device="cpu", batches: Sequence[int] = (1, 64),
                   dtype=torch.float32, img_shape: Sequence[int] | None = None,
                   warmup: int = 3, repeats: int = 10, rounds: int = 5,
                   measure_table: bool = False,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Predicted and measured ms of every model at every batch on ``device`` (the models are
    timed interleaved per batch, on copies moved to ``device``/``dtype``). ``measure_table``:
    measure the latency table's missing batches first (else the cached table predicts, batches
    it lacks interpolated or extrapolated)."""
    from pyengine.measure.timing import measure
    dev = torch.device(device)
    moved = {k: _copy(m, dev, dtype) for k, m in models.items()}
    shape = tuple(img_shape) if img_shape is not None else _image_shape(next(iter(moved.values())))
    predicted, note = predict(moved, batches, dev, dtype, measure=measure_table, log=log)
    measured: dict[str, dict[str, Any]] = {k: {} for k in moved}
    for b in batches:
        x = torch.randn(int(b), *shape, device=dev, dtype=dtype)
        samples = measure({k: (lambda m=m: m(x)) for k, m in moved.items()}, warmup=warmup,
                          repeats=repeats, device=dev, rounds=rounds)
        for k, st in samples.stats().items():
            measured[k][str(b)] = {"median_ms": st["median_ms"], "iqr_ms": st["iqr_ms"]}
    rep: dict[str, Any] = {"device": str(dev), "dtype": str(dtype).replace("torch.", ""),
                           "batches": [int(b) for b in batches], "predicted_ms": predicted,
                           "measured_ms": measured, "repeats": repeats}
    if note:
        rep["note"] = note
    return rep


def _copy(m: nn.Module, dev, dtype) -> nn.Module:
    import copy
    c = copy.deepcopy(m).to(device=dev, dtype=dtype).eval()
    for k in ("pyengine_spec", "pyengine_config", "pyengine_method"):
        if hasattr(m, k):
            setattr(c, k, getattr(m, k))
    return c


def _image_shape(model: nn.Module) -> tuple[int, ...]:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    chans = getattr(getattr(pe, "proj", None), "in_channels", 3)
    if size is None:  # a CNN: the input size its geometry records (the cost model's)
        import pyengine
        g = pyengine.geometry(model)
        if getattr(g, "img_size", 0):
            return (int(g.in_chans), int(g.img_size), int(g.img_size))
        raise ValueError("pass img_shape: the model has no patch_embed.img_size")
    return (int(chans), int(size[0]), int(size[1]))


def prediction_summary(rows: Sequence[Mapping[str, Any]], batches: Sequence[int],
                       say: Callable[[str], None], seconds: float) -> dict[str, Any]:
    """Median and max |predicted - measured| / measured of the prediction benches' ``rows``
    ({"batch", "rel_error", "rel_error_vs_min"}) per batch and over all, said as it goes."""
    summary: dict[str, Any] = {}
    for b in batches:
        errs = [abs(r["rel_error"]) for r in rows if r["batch"] == b]
        mins = [abs(r["rel_error_vs_min"]) for r in rows if r["batch"] == b]
        summary[str(b)] = {"median_abs_rel_error": statistics.median(errs),
                           "max_abs_rel_error": max(errs), "n": len(errs),
                           "vs_min_median_abs_rel_error": statistics.median(mins),
                           "vs_min_max_abs_rel_error": max(mins)}
        say(f"batch {b}: median |error| {summary[str(b)]['median_abs_rel_error']:.1%}, max "
            f"{summary[str(b)]['max_abs_rel_error']:.1%} over {len(errs)} structures (against "
            f"the fastest sample instead of the median: median "
            f"{summary[str(b)]['vs_min_median_abs_rel_error']:.1%}, max "
            f"{summary[str(b)]['vs_min_max_abs_rel_error']:.1%})")
    errs = [abs(r["rel_error"]) for r in rows]
    summary["all"] = {"median_abs_rel_error": statistics.median(errs),
                      "max_abs_rel_error": max(errs), "n": len(errs)}
    say(f"all: median |error| {summary['all']['median_abs_rel_error']:.1%}, max "
        f"{summary['all']['max_abs_rel_error']:.1%}; {seconds:.0f} s")
    return summary
