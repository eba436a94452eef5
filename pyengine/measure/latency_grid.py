"""Measuring the grids of a latency table (:mod:`pyengine.cost.latency_table`) on one device,
with the one timing harness (:func:`pyengine.measure.timing.measure`).

Every grid is timed as one interleaved set: all its points take their samples in round-robin
passes (so that drift and other load hit them alike), and the median of each point is kept
with its IQR. Inputs are made once per grid at the largest width and sliced, so memory stays
that of one layer. The default grid (:func:`default_points`) takes about a minute for batch 1
and 8 of deit_small on a 2-core CPU.

Attention candidates (:func:`candidate_backends`): on a CPU the torch reference (one SDPA call
per run of equal head shapes) and the C++ kernel of pyengine._C when built; on a GPU also the
Triton and CUDA kernels. A candidate that cannot run the dtype here is left out.
"""
from __future__ import annotations

import math
import statistics
import time
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from pyengine.cost.latency_table import Grid, TableShape
from pyengine.models.packed_linear import PackedLinear, pack_mlp
from pyengine.measure.timing import measure

__all__ = ["CANDIDATES", "candidate_backends", "default_points", "measure_grids"]

LINEAR_PASSES = 3  # passes over the qkv, proj and FFN widths (median of their medians)

# the attention backends a table measures, per device type, in this order
CANDIDATES: dict[str, tuple[str, ...]] = {"cpu": ("torch", "cpu"),
                                          "cuda": ("torch", "triton", "cuda")}


def _probe(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    from pyengine.ops.dispatch import BackendNotAvailable, select
    from pyengine.ops.varlen_attention import OP
    q = torch.zeros(1, 2, 2, device=device, dtype=dtype)
    try:
        select(OP, backend, (q, q, q, [1, 1], [1, 1], [1.0, 1.0]))
    except BackendNotAvailable:
        return False
    return True


def candidate_backends(device: torch.device | str, dtype=torch.float32) -> list[str]:
    """The varlen_attention backends a table measures on ``device`` at ``dtype``: those of
    :data:`CANDIDATES` that can run here (built, right device, dtype supported)."""
    dev = torch.device(device)
    names = CANDIDATES.get(dev.type)
    if names is None:
        raise ValueError(f"latency tables are per cpu or cuda device, got {str(dev)!r}")
    return [n for n in names if _probe(n, dev, dtype)]


def _upto(points: Sequence[int], top: int) -> list[int]:
    return sorted({p for p in points if 1 <= p < top} | {top})


def default_points(shape: TableShape) -> dict[str, dict[str, list[int]]]:
    """The default grid of ``shape``: axes of every grid (see the table's module docstring)."""
    H, Dh, D, M = shape.num_heads, shape.head_dim, shape.embed_dim, shape.mlp_hidden
    heads = _upto((1, 2, 3, 4, 6, 8, 12, 16), H)
    step = 8 if Dh <= 64 else 16 if Dh <= 128 else 32
    equal = _upto(range(step, Dh + 1, step), Dh)
    qk = _upto((8, 16, 32, 48, 64, 96, 128, 192, 256), Dh)
    # v between the qk points: no point of the unequal grid has equal widths
    v = sorted({(a + b) // 2 for a, b in zip(qk, qk[1:]) if (a + b) // 2 not in qk}) or \
        [max(1, qk[0] // 2)]
    geo = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144)

    def widths(top: int) -> list[int]:
        # small widths geometric, then steps of top/16 (multiples of 8): GEMM time bends
        # with cache and blocking, and one odd point must not bend a long segment
        step = max(8, (top // 16 + 7) // 8 * 8)
        return _upto(tuple(w for w in geo if w < 2 * step) + tuple(range(step, top, step)),
                     top)
    return {"attn_eq": {"heads": heads, "width": equal},
            "attn_ne": {"heads": heads, "qk": qk, "v": v},
            "attn0": {"heads": heads, "v": equal},
            "runs": {"runs": heads},
            "qkv": {"width": widths(3 * H * Dh)},
            "proj": {"width": widths(H * Dh)},
            "mlp": {"width": widths(M)},
            "branch": {}, "stem": {}, "head": {}}


def _grid_shape(points: Mapping[str, Sequence[int]]) -> list[dict[str, int]]:
    """Every point of a grid, in C order."""
    out: list[dict[str, int]] = [{}]
    for name, pts in points.items():
        out = [{**o, name: int(p)} for o in out for p in pts]
    return out


def _time(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
          min_sample_ms: float) -> tuple[dict[str, float], dict[str, float]]:
    s = measure(fns, warmup=1, repeats=repeats, device=device, rounds=repeats,
                min_sample_ms=min_sample_ms).stats()
    return ({k: v["median_ms"] for k, v in s.items()}, {k: v["iqr_ms"] for k, v in s.items()})


def _attention_fns(shape: TableShape, batch: int, device, dtype, backend: str,
                   points: Mapping[str, Sequence[int]], zero_qk: bool):
    scale = shape.head_dim ** -0.5
    grid = _grid_shape(points)

    def dims(p):  # (heads, qk, v) of a grid point of attn_eq, attn_ne or attn0
        if "width" in p:
            return p["heads"], p["width"], p["width"]
        return p["heads"], 0 if zero_qk else p["qk"], p["v"]

    width = max(2 * h * qk + h * v for h, qk, v in map(dims, grid))
    buf = torch.randn(batch, shape.tokens, width, device=device, dtype=dtype)
    fns = {}
    for i, p in enumerate(grid):
        h, qk, v = dims(p)
        q, k, vv, _ = buf.split([h * qk, h * qk, h * v, width - h * (2 * qk + v)], dim=-1)
        fns[str(i)] = _op_call(backend, q, k, vv, [qk] * h, [v] * h, scale)
    return grid, fns


def _op_call(backend: str, q, k, v, qk_dims, v_dims, scale):
    """The op on these inputs as a compact layer runs it: the backend picked once, then its
    ``run`` called directly (pyengine.models.vit.compact.CompactAttention._runner)."""
    from pyengine.ops.dispatch import select
    from pyengine.ops.varlen_attention import OP
    scales = [scale] * len(qk_dims)
    b = select(OP, backend, (q, k, v, qk_dims, v_dims, scales))
    return lambda: b.run(q, k, v, qk_dims, v_dims, scales)


def _runs_fns(shape: TableShape, batch: int, device, dtype, backend: str, runs: Sequence[int]):
    """Runs of one head each, two shapes alternating (so neighbours never merge; q/k 8 and 16
    wide, v half a head): the op called once with ``k`` runs, and each run shape on its own."""
    scale = shape.head_dim ** -0.5
    Dh = shape.head_dim
    v = max(1, Dh // 2)
    pair = ((8, v), (16, v)) if Dh >= 16 else ((Dh, v), (Dh - 1, v)) if Dh >= 2 else \
        ((1, 1), (0, 1))
    shapes = [pair[i % 2] for i in range(max(runs))]
    width = max(sum(2 * a + b for a, b in shapes), sum(2 * a + b for a, b in pair))
    buf = torch.randn(batch, shape.tokens, width, device=device, dtype=dtype)

    def call(shs):
        sq, sv = sum(a for a, _ in shs), sum(b for _, b in shs)
        q, k, vv, _ = buf.split([sq, sq, sv, width - 2 * sq - sv], dim=-1)
        qd, vd = [a for a, _ in shs], [b for _, b in shs]
        return _op_call(backend, q, k, vv, qd, vd, scale)

    fns = {"a": call([pair[0]]), "b": call([pair[1]])}
    for k in runs:
        if k > 1:
            fns[f"k{k}"] = call(shapes[:k])
    return shapes, fns


def _linear_fns(shape: TableShape, batch: int, device, dtype, which: str,
                widths: Sequence[int]):
    D, N = shape.embed_dim, shape.tokens
    fns = {}
    if which == "qkv":
        x = torch.randn(batch, N, D, device=device, dtype=dtype)
        for w in widths:
            lin = PackedLinear(D, w).to(device=device, dtype=dtype)
            fns[str(w)] = (lambda lin=lin: lin(x))
    elif which == "proj":
        for w in widths:
            lin = PackedLinear(w, D).to(device=device, dtype=dtype)
            xw = torch.randn(batch, N, w, device=device, dtype=dtype)
            fns[str(w)] = (lambda lin=lin, xw=xw: lin(xw))
    else:  # mlp
        from timm.layers import Mlp
        x = torch.randn(batch, N, D, device=device, dtype=dtype)
        for w in widths:
            m = pack_mlp(Mlp(D, w).to(device=device, dtype=dtype).eval())
            fns[str(w)] = (lambda m=m: m(x))
    return fns


def _fixed_fns(shape: TableShape, batch: int, device, dtype):
    D, N, P = shape.embed_dim, shape.tokens, shape.num_patches
    ph, pw = shape.patch_size
    gh = int(math.isqrt(P))
    gh, gw = (gh, P // gh) if gh * (P // gh) == P else (P, 1)
    x = torch.randn(batch, N, D, device=device, dtype=dtype)
    ln = nn.LayerNorm(D).to(device=device, dtype=dtype)
    img = torch.randn(batch, shape.in_chans, gh * ph, gw * pw, device=device, dtype=dtype)
    conv = nn.Conv2d(shape.in_chans, D, (ph, pw), (ph, pw)).to(device=device, dtype=dtype)
    prefix = torch.zeros(1, max(N - P, 0), D, device=device, dtype=dtype)
    pos = torch.zeros(1, N, D, device=device, dtype=dtype)
    head = nn.Linear(D, shape.num_classes).to(device=device, dtype=dtype) \
        if shape.num_classes > 0 else nn.Identity()

    def stem():
        t = conv(img).flatten(2).transpose(1, 2)
        if prefix.shape[1]:
            t = torch.cat([prefix.expand(batch, -1, -1), t], dim=1)
        return t + pos

    return {"branch": lambda: x + ln(x), "stem": stem, "head": lambda: head(ln(x)[:, 0])}


def measure_grids(shape: TableShape, batch: int, device: torch.device | str,
                  dtype: torch.dtype, candidates: Sequence[str],
                  points: Mapping[str, Mapping[str, Sequence[int]]] | None = None,
                  repeats: int = 7, min_sample_ms: float | None = None,
                  progress: bool = True) -> tuple[dict[str, Grid], dict[str, Any]]:
    """Measure every grid of ``shape`` at ``batch`` on ``device``: ``({name: Grid}, info)``.

    ``points``: the axes per grid kind (default :func:`default_points`; a kind left out of a
    given dict takes its default). ``repeats``: samples per point (medians of interleaved
    passes). ``min_sample_ms``: a sample repeats short calls until it lasts this long (default
    2 ms on a CPU, 0.5 ms on a GPU).
    """
    from tqdm import tqdm

    dev = torch.device(device)
    pts = {**default_points(shape), **(points or {})}
    if min_sample_ms is None:
        min_sample_ms = 0.5 if dev.type == "cuda" else 2.0
    jobs: list[tuple[str, int]] = []
    for be in candidates:
        jobs += [(f"{k}/{be}", math.prod(len(v) for v in pts[k].values()))
                 for k in ("attn_eq", "attn_ne", "attn0")]
        jobs.append((f"runs/{be}", len(pts["runs"]["runs"]) + 2))
    jobs += [(k, len(pts[k]["width"])) for k in ("qkv", "proj", "mlp")] + [("fixed", 3)]
    t0 = time.perf_counter()
    bar = tqdm(total=sum(n for _, n in jobs), unit="pt", disable=not progress, leave=False,
               desc=f"latency table b{batch}")
    grids: dict[str, Grid] = {}
    with torch.inference_mode():
        for name, n in jobs:
            bar.set_postfix_str(name)
            kind, _, be = name.partition("/")
            if kind in ("attn_eq", "attn_ne", "attn0"):
                axes = pts[kind]
                grid, fns = _attention_fns(shape, batch, dev, dtype, be, axes, kind == "attn0")
                med, iq = _time(fns, dev, repeats, min_sample_ms)
                grids[name] = Grid({k: [float(x) for x in v] for k, v in axes.items()},
                                   [med[str(i)] for i in range(len(grid))],
                                   [iq[str(i)] for i in range(len(grid))])
            elif kind == "runs":
                runs = list(pts["runs"]["runs"])
                shapes, fns = _runs_fns(shape, batch, dev, dtype, be, runs)
                med, iq = _time(fns, dev, repeats, min_sample_ms)
                ms = []
                for k in runs:
                    if k == 1:
                        ms.append(0.0)
                        continue
                    singles = sum(med["a"] if i % 2 == 0 else med["b"] for i in range(k))
                    ms.append(med[f"k{k}"] - singles)
                grids[name] = Grid({"runs": [float(k) for k in runs]}, ms)
            elif kind in ("qkv", "proj", "mlp"):
                widths = list(pts[kind]["width"])
                # passes with fresh layers, the widths in another order each time: what runs
                # before a layer (whose weights it evicts) changes its time; the median over
                # passes is the typical one
                passes = []
                for k in range(LINEAR_PASSES):
                    order = widths[k % 2::2] + widths[1 - k % 2::2] if k else widths
                    fns = _linear_fns(shape, batch, dev, dtype, kind, order)
                    passes.append(_time(fns, dev, repeats, min_sample_ms))
                grids[kind] = Grid(
                    {"width": [float(w) for w in widths]},
                    [statistics.median(m[str(w)] for m, _ in passes) for w in widths],
                    [statistics.median(q[str(w)] for _, q in passes) for w in widths])
            else:
                med, iq = _time(_fixed_fns(shape, batch, dev, dtype), dev, repeats,
                                min_sample_ms)
                for k in ("branch", "stem", "head"):
                    grids[k] = Grid({}, [med[k]], [iq[k]])
            bar.update(n)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    bar.close()
    info = {"seconds": round(time.perf_counter() - t0, 2), "repeats": repeats,
            "min_sample_ms": min_sample_ms,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return grids, info
