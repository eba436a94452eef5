"""In-context calibration of a latency table (:mod:`pyengine.cost.latency_table`).

The table's grids time each layer alone, over and over on the same inputs: its weights stay in
cache and nothing runs between the calls. Inside a whole model every layer starts cold (the
weights of the layer before pushed its own out) and each block adds work no grid times (the
block's Python, drop-path and layer-scale calls, the norms and residual adds on activations
that just left the cache). Summed over a model, that made the layer sums predict 10-35% too
little on a 2-core CPU (bench/results/cpu/issue15/).

So, per model shape and batch, a few real compact models of that shape (random weights, random
heterogeneous structures, head layouts planned from the just-measured grids, as
:func:`pyengine.compile` plans them) are timed whole, with every attention and FFN module
also timed in place (forward hooks, in separate passes from the whole-model timings so the
hooks cost the totals nothing). Per kind of branch, a line through the layers' (grid ms,
in-model ms) points gives a slope and an offset per layer (the module's own calls; below 0
when big layers suffer more from a cold cache than small ones); what
the lines leave of each whole model (its norms, residual adds, the blocks' and the forward's
own calls, and whatever timing modules in place added to them) is a cost per forward plus one
per kept branch, fitted over the models (one of which keeps half the branches). Five numbers,
kept as scalar grids of the table:

==============  ================================================================================
calib_attn      in-model ms per grid ms of the attention modules (qkv, the op, proj)
calib_mlp       the same for the FFN modules
attn_ctx        ms of a kept attention branch beside its grids: the line's offset plus the
                per-branch share of the rest (>= 0)
mlp_ctx         the same for a kept FFN branch
forward_ctx     ms per forward beside the stem, the head and the branches
==============  ================================================================================

Predictions then price a kept branch as ``<kind>_ctx + calib_<kind> * (its grids)`` and add
``forward_ctx`` to the head: still a sum over the
layers a structure keeps (so the planner, the budgets and the expected latency of gate
probabilities all take it the same way), now with the cost a layer has inside a model.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import statistics
from typing import Any, Mapping, Sequence

import torch

from pyengine.cost.latency_table import Grid, LatencyTable, LatencyTableError, TableShape
from pyengine.measure.timing import measure_in_place

__all__ = ["CALIBRATION_GRIDS", "calibration_vit", "measure_calibration"]

CALIBRATION_GRIDS = ("calib_attn", "calib_mlp", "attn_ctx", "mlp_ctx", "forward_ctx")

# MAC fractions of the structures timed; 1.0 keeps every head (random widths) and neuron.
# A negative target: that fraction with every other block's attention and FFN removed (fewer
# branches: what a forward costs apart from its branches is told from what each branch adds)
TARGETS = (1.0, 0.6, 0.35, -0.6)

MIN_SECONDS = 3.0        # the samples of small models span at least this long ...
MAX_ROUNDS_FACTOR = 10   # ... in at most this many times ``repeats`` rounds


def calibration_vit(shape: TableShape, depth: int | None = None) -> torch.nn.Module:
    """A timm VisionTransformer of ``shape`` (random weights, eval mode), ``depth`` blocks
    (default: the shape's: whether a model's weights stay in cache from one forward to the
    next depends on it)."""
    depth = shape.depth if depth is None else depth
    from timm.models.vision_transformer import VisionTransformer
    if shape.num_heads * shape.head_dim != shape.embed_dim:
        raise LatencyTableError(f"calibration builds timm ViTs with heads x head width == "
                                f"embed dim; shape {shape.key} has "
                                f"{shape.num_heads}x{shape.head_dim} != {shape.embed_dim}")
    P = shape.num_patches
    gh = int(math.isqrt(P))
    gh, gw = (gh, P // gh) if gh * (P // gh) == P else (P, 1)
    ph, pw = shape.patch_size
    prefix = shape.tokens - P
    if prefix < 0:
        raise LatencyTableError(f"shape {shape.key}: fewer tokens than patches")
    m = VisionTransformer(img_size=(gh * ph, gw * pw), patch_size=(ph, pw),
                          in_chans=shape.in_chans, num_classes=shape.num_classes,
                          global_pool="token" if prefix else "avg", embed_dim=shape.embed_dim,
                          depth=depth, num_heads=shape.num_heads,
                          mlp_ratio=shape.mlp_hidden / shape.embed_dim,
                          class_token=prefix >= 1, reg_tokens=max(prefix - 1, 0))
    return m.eval()


def _structures(vit: torch.nn.Module, table: LatencyTable, batch: int, device, dtype,
                targets: Sequence[float], seed: int):
    """``[(compact model, planned spec)]``: one per target, planned as compile plans."""
    import pyengine
    from pyengine.models import adapter_for
    from pyengine.models.vit.layout import plan
    from pyengine.structure.synthetic import heterogeneous_spec

    g = pyengine.geometry(vit)
    out = []
    for k, target in enumerate(targets):
        gated = pyengine.gate(copy.deepcopy(vit))
        spec = heterogeneous_spec(g, abs(target), seed=seed + k)
        if target < 0:
            spec = dataclasses.replace(spec, blocks=tuple(
                b if i % 2 == 0 else dataclasses.replace(b, heads=(), mlp=())
                for i, b in enumerate(spec.blocks)))
        pyengine.apply(gated, spec)
        s = plan(pyengine.spec(gated), "auto", device=device, dtype=dtype, batches=[batch],
                 table=table)
        a = adapter_for(gated)
        a.fold_gates(gated)
        compact = a.build(gated, s, copy_weights=False).to(device=device, dtype=dtype).eval()
        out.append((compact, s))
    return out


def _predicted(table: LatencyTable, shape: TableShape, batch: int, s) -> dict[str, Any]:
    """The grids' (uncalibrated) ms of every attention and FFN module of spec ``s``."""
    from pyengine.models.vit.layout import layer_buckets, layout_of
    lay = layout_of(s)
    attn, mlp = {}, {}
    for i, blk in enumerate(s.blocks):
        buckets, planned = layer_buckets(s, i, lay)
        if any(h > 0 and v > 0 for h, _, v in buckets):
            be = planned if planned not in (None, "auto") else "torch"
            attn[i] = table.attention_grids_ms(shape, batch, buckets, be)
        if len(blk.mlp):
            mlp[i] = table.value(shape, "mlp", batch, width=len(blk.mlp))
    return {"attn": attn, "mlp": mlp,
            "fixed": table.value(shape, "stem", batch) + table.value(shape, "head", batch)}


def measure_calibration(shape: TableShape, batch: int, device: torch.device | str,
                        dtype: torch.dtype, grids: Mapping[str, Grid],
                        candidates: Sequence[str], *, repeats: int = 7,
                        targets: Sequence[float] = TARGETS, depth: int | None = None,
                        seed: int = 0,
                        progress: bool = True) -> tuple[dict[str, Grid], dict[str, Any]]:
    """Time calibration models of ``shape`` at ``batch`` (see the module docstring) against
    the grids measured for it: ``({name: Grid} for CALIBRATION_GRIDS, info)``."""
    dev = torch.device(device)
    table = LatencyTable("calibration", dtype)
    table.add(shape, batch, grids, candidates)
    torch.manual_seed(seed)
    vit = calibration_vit(shape, depth).to(device=dev, dtype=dtype)
    x = torch.randn(batch, shape.in_chans, *vit.patch_embed.img_size, device=dev, dtype=dtype)
    models = _structures(vit, table, batch, dev, dtype, targets, seed)
    # per model: its attention and FFN modules, timed in place by name ("attn.3", "mlp.3")
    named = [{f"{kind}.{i}": getattr(blk, kind) for i, blk in enumerate(model.blocks)
              for kind in ("attn", "mlp") if getattr(blk, kind, None) is not None}
             for model, _ in models]
    totals, parts, rounds = measure_in_place(
        [(model, n) for (model, _), n in zip(models, named)], x, repeats=repeats,
        min_seconds=MIN_SECONDS, max_rounds_factor=MAX_ROUNDS_FACTOR, warmup=2, device=dev,
        progress=progress, desc=f"latency calibration b{batch}")
    points: dict[str, list[tuple[float, float]]] = {"attn": [], "mlp": []}  # (grid, in model)
    preds, per_model = [], []
    for m_i, (model, s) in enumerate(models):
        pred = _predicted(table, shape, batch, s)
        med = {k: statistics.median(v) for k, v in parts[m_i].items()}
        for kind in ("attn", "mlp"):
            points[kind] += [(ms, med[f"{kind}.{i}"]) for i, ms in pred[kind].items()]
        preds.append(pred)
        per_model.append({"target": targets[m_i], "total_ms": statistics.median(totals[m_i]),
                          "attn_ms": sum(v for k, v in med.items() if k[0] == "a"),
                          "attn_grid_ms": sum(pred["attn"].values()),
                          "mlp_ms": sum(v for k, v in med.items() if k[0] == "m"),
                          "mlp_grid_ms": sum(pred["mlp"].values()),
                          "fixed_grid_ms": pred["fixed"],
                          "branches": len(pred["attn"]) + len(pred["mlp"])})
    line = {kind: _fit(points[kind]) for kind in ("attn", "mlp")}
    # what the fitted modules leave of each whole model (timed without hooks): a cost per
    # forward plus one per kept branch, fitted over the models (which keep different counts);
    # the totals stay anchored even where timing the modules in place made them look dearer
    rest = []
    for pred, rec in zip(preds, per_model):
        inside = sum(line[k][1] + line[k][0] * ms for k in ("attn", "mlp")
                     for ms in pred[k].values())
        rest.append((float(rec["branches"]), rec["total_ms"] - pred["fixed"] - inside))
    per_branch, per_forward = _fit(rest, negative="slope")
    calib = {"calib_attn": line["attn"][0], "calib_mlp": line["mlp"][0],
             "attn_ctx": max(line["attn"][1] + per_branch, 0.0),
             "mlp_ctx": max(line["mlp"][1] + per_branch, 0.0),
             "forward_ctx": max(per_forward, 0.0)}
    info = {"depth": len(vit.blocks), "repeats": rounds,
            "models": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                       for r in per_model],
            "outside_per_branch_ms": round(per_branch, 5),
            **{k: round(v, 5) for k, v in calib.items()}}
    return {k: Grid({}, [v]) for k, v in calib.items()}, info


def _fit(points: Sequence[tuple[float, float]], negative: str = "intercept"
         ) -> tuple[float, float]:
    """``(slope, intercept)`` of a least-squares line through ``(x, y)`` points; ``negative``
    names the one that may fall below 0 ("intercept": a module line, whose in-model cost can
    grow faster than its time alone as its weights outgrow the cache; "slope": the rest per
    kept branch, a share other lines' intercepts may already hold). When the fit breaks that
    rule, or the x values barely differ, the line through the origin."""
    pts = [(x, y) for x, y in points if x > 0]
    if not pts:
        return (1.0 if negative == "intercept" else 0.0), 0.0
    sx, sy = sum(x for x, _ in pts), sum(y for _, y in pts)
    mx, my = sx / len(pts), sy / len(pts)
    vx = sum((x - mx) ** 2 for x, _ in pts)
    if len(pts) >= 2 and vx > (0.05 * mx) ** 2 * len(pts):
        slope = sum((x - mx) * (y - my) for x, y in pts) / vx
        fixed = my - slope * mx
        if (slope > 0 and negative == "intercept") or (fixed >= 0 and negative == "slope"):
            return slope, fixed
    return sum(x * y for x, y in pts) / sum(x * x for x, _ in pts), 0.0
