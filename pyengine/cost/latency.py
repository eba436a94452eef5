"""The latency model of a structure on one device: predicted milliseconds from the measured
per-device latency table (:mod:`pyengine.cost.latency_table`), and the differentiable expected
latency of HiAP gate probabilities (the latency twin of :mod:`pyengine.cost.expected`) — for
ViTs here; CNNs (ResNet, ConvNeXt, EfficientNet / MobileNetV3, RegNet) have their own
measured per-model table of in-model block times (:mod:`pyengine.cost.cnn_latency_table`) and
model (:mod:`pyengine.cost.cnn_latency`), which :func:`latency` hands a CNN to.

    lat = pyengine.latency(compact, batch=1, dtype=torch.float32, device="cpu")
    lat.ms                      # predicted ms of one batch
    print(lat.table())          # stem, every kept attention / FFN branch, head
                                # (a CNN: every block, kept or removed, and the fixed rest)

Two predictions, for two uses:

* :func:`latency` (``pyengine.latency``, ``pyengine cost --latency``): what the compiled model
  runs. A spec with a head layout (a compact model's) is priced in that layout; a plain spec
  is first planned as :func:`pyengine.compile` would ("auto": the table's fastest grouping).
* :class:`LatencyModel` (budgets: HiAP, SSS target mode, one-shot allocation,
  ``--budget latency``; a CNN's is :class:`~pyengine.cost.cnn_latency.CnnLatencyModel`,
  for SSS and the one-shot allocation): per attention layer the faster of the exact and the
  padded layout (on each measured backend), plus the FFN, stem and head. It is cheap (no
  planner search), and the planner's choice is at most as slow as the exact layout (it keeps
  the exact one unless another is faster).

The expected latency (:meth:`LatencyModel.expected`) of independent keep probabilities:

* ``P(branch kept)`` times the fixed cost of a branch (norm + residual add) is exact;
* a 1-D grid (qkv, proj, FFN by width) is piecewise linear in the kept width ``W``, a sum of
  independent Bernoulli units: ``g(W) = y0 + sum_k ds_k * relu(W - x_k)``. ``E[relu(W - x)]`` is
  taken under the normal law with W's mean and variance (exact as the variance goes to 0, so
  0/1 probabilities give the prediction of the hard structure; the removed-branch case W = 0 is
  exact);
* the attention op (heads x width grid) is evaluated at the expected kept-head count and the
  expected padded width (the expected maximum of the heads' widths, normal order statistics).

So the smooth model prices a layer as :meth:`LatencyModel.smooth_layer_ms` does (the attention
op as one run at the widest head; a differentiable stand-in for the layout choice), and tests
check it against the mean of that over sampled structures (Monte Carlo). It drives HiAP's
gradient only: the final structure is projected onto the target by the hard prediction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from pyengine.cost.dtypes import as_dtype, dtype_name
from pyengine.cost.latency_table import (Grid, LatencyTable, LatencyTableError, TableShape,
                                         get_table, interpolate_batch)

__all__ = ["Latency", "LatencyRow", "LatencyModel", "latency", "table_for", "BUDGETS"]

BUDGETS = ("macs", "latency")


# --------------------------------------------------------------------------------------
# The table of a device, measured on first use
# --------------------------------------------------------------------------------------

def table_for(geometry, device="cpu", dtype=torch.float32, batches: Sequence[int] = (1,),
              log=None, progress: bool = True) -> LatencyTable:
    """The latency table of ``device``/``dtype`` holding ``geometry``'s shape at ``batches``
    (read from the cache, measured once if missing). A one-line error when there is none and
    measuring is off."""
    from pyengine.cost.latency_table import measuring_enabled
    dev = torch.device("cpu" if device is None else device)
    dt = as_dtype(dtype)
    t = get_table(geometry, dev, dt, sorted({int(b) for b in batches}), log=log,
                  progress=progress)
    if t is None:
        why = ("measuring is off (PYENGINE_LATENCY=off)" if not measuring_enabled()
               else "it could not be measured")
        raise LatencyTableError(
            f"no latency table for {dev.type} {dtype_name(dt)} and model shape "
            f"{TableShape.of(geometry).key}, and {why}: measure one with `pyengine "
            "latency-table`")
    return t


def _spec_of(x):
    from pyengine.structure.spec import Spec
    if isinstance(x, Spec):
        return x
    if hasattr(x, "blocks") and hasattr(x, "dense") and not hasattr(x, "forward"):
        raise LatencyTableError(f"the latency model covers ViTs; a {type(x).__name__} (CNN) "
                                "has no latency table yet")
    from pyengine.api import spec as spec_of
    s = spec_of(x)
    if not isinstance(s, Spec):
        raise LatencyTableError(f"the latency model covers ViTs; a {type(s).__name__} (CNN) "
                                "has no latency table yet")
    return s


def _plain(x) -> bool:
    """A model that is neither gated nor compact (dense timm)."""
    if not isinstance(x, torch.nn.Module):
        return False
    from pyengine.models import adapter_for
    a = adapter_for(x)
    return not (a.is_gated(x) or a.is_compact(x))


# --------------------------------------------------------------------------------------
# pyengine.latency: what the compiled model runs
# --------------------------------------------------------------------------------------

@dataclass
class LatencyRow:
    name: str       # "stem", "blocks.3.attn", "blocks.3.mlp", "head"; CNN: "stages.1.0", "fixed"
    kind: str       # "stem" | "attention" | "mlp" | "head"; CNN: "block" | "removed" | "fixed"
    ms: float
    detail: str = ""  # attention: buckets (heads x qk/v) and backend; FFN: width

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Latency:
    """Predicted latency of one batch: total ``ms`` and per-branch ``rows``."""

    ms: float
    batch: int
    device: str          # the table's device key
    dtype: str
    layout: str          # the layout priced ("auto", "exact", "padded", or the spec's)
    rows: list[LatencyRow] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"ms": self.ms, "batch": self.batch, "device": self.device, "dtype": self.dtype,
                "layout": self.layout, "rows": [r.as_dict() for r in self.rows]}

    def table(self) -> str:
        lines = [f"predicted latency {self.ms:.4f} ms (batch {self.batch}, {self.dtype}, "
                 f"{self.device}, layout {self.layout})",
                 f"{'layer':<20} {'kind':<10} {'ms':>10}  detail"]
        lines += [f"{r.name:<20} {r.kind:<10} {r.ms:>10.4f}  {r.detail}" for r in self.rows]
        return "\n".join(lines)


def latency(spec_or_model, batch: int = 1, dtype=torch.float32, device="cpu", *,
            layout: str | None = None, table: LatencyTable | None = None,
            log=None) -> Latency:
    """Predicted ms of one batch of ``batch`` images through the ViT ``spec_or_model`` (a
    Spec with dense geometry, a gated, compact or dense model) on ``device`` in ``dtype``,
    from the device's latency table (measured on first use, cached). ``layout``: how the
    attention heads run ("auto" as :func:`pyengine.compile` plans it, "exact", "padded");
    default: the spec's own layout (a compact model's), "exact" for a plain timm model (its
    own attention, on the torch path), else (a spec, a gated model) "auto".

    A CNN (a CnnSpec / BlockSpec with dense geometry, its input size and model name, or a
    dense, gated or compact CNN model) is priced by its own measured table instead
    (:mod:`pyengine.cost.cnn_latency`: one row per block, kept or removed, and the fixed
    rest); ``table`` is then a :class:`~pyengine.cost.cnn_latency_table.CnnLatencyTable`."""
    from pyengine.cost.cnn_latency import cnn_latency, cnn_spec_of
    from pyengine.models.vit.layout import layer_buckets, layout_of, plan, strip_layout
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    cnn = cnn_spec_of(spec_or_model)
    if cnn is not None:  # a CNN: its own measured table (cost/cnn_latency.py)
        if layout is not None:
            raise ValueError(f"layout {layout!r} is how a ViT's attention heads run; a CNN has "
                             "none")
        return cnn_latency(cnn, batch, dtype, device, table=table, log=log)
    s = _spec_of(spec_or_model)
    if layout is None and _plain(spec_or_model):
        layout = "exact"  # a plain timm model runs its own attention: one SDPA call per layer
    if s.dense is None:
        raise LatencyTableError("the latency model needs a spec with dense geometry "
                                "(pyengine.spec(model))")
    if table is None:
        table = table_for(s.dense, device, dtype, (batch,), log=log)
    if layout is not None or layout_of(s) is None:
        s = plan(strip_layout(s), layout or "auto", device=device, dtype=dtype, batches=[batch],
                 table=table)
    lay = layout_of(s)
    # a layout's planned backends apply on the device type it was planned for; elsewhere the
    # layers run "auto" (priced as the torch path)
    here = lay is None or lay.device_type in (None, torch.device(device or "cpu").type)
    rows = [LatencyRow("stem", "stem", table.stem_ms(s, batch))]
    for i, blk in enumerate(s.blocks):
        buckets, planned = layer_buckets(s, i, lay)
        be = planned if here and planned not in (None, "auto") else "torch"
        if buckets:
            desc = "+".join(f"{h}x{qk}/{v}" for h, qk, v in buckets) + f" [{be}]"
            rows.append(LatencyRow(f"blocks.{i}.attn", "attention",
                                   table.attention_ms(s, batch, buckets, be), desc))
        if len(blk.mlp):
            rows.append(LatencyRow(f"blocks.{i}.mlp", "mlp", table.mlp_ms(s, batch, len(blk.mlp)),
                                   f"width {len(blk.mlp)}"))
    rows.append(LatencyRow("head", "head", table.head_ms(s, batch)))
    return Latency(sum(r.ms for r in rows), batch, table.device, table.dtype,
                   lay.mode if lay is not None else "exact", rows)


# --------------------------------------------------------------------------------------
# Budgets: the latency of structures and of gate probabilities
# --------------------------------------------------------------------------------------

def _normal_relu(mu: torch.Tensor, sd: torch.Tensor, x: float) -> torch.Tensor:
    """E[relu(W - x)] for W ~ N(mu, sd^2) (sd > 0)."""
    z = (mu - x) / sd
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return (mu - x) * cdf + sd * pdf


def _expected_1d(grid: Grid, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """E[g(W)] of a 1-D grid's piecewise-linear function under N(mu, var)."""
    (xs,), ys = list(grid.axes.values()), grid.ms
    sd = torch.sqrt(var.clamp_min(0.0) + 1e-12)
    out = mu.new_full(mu.shape, float(ys[0]))
    prev = 0.0
    for k in range(len(xs) - 1):
        slope = (ys[k + 1] - ys[k]) / (xs[k + 1] - xs[k])
        if slope != prev:
            out = out + (slope - prev) * _normal_relu(mu, sd, xs[k])
        prev = slope
    return out


def _interp(grid: Grid, **coords: torch.Tensor) -> torch.Tensor:
    """The grid's multilinear interpolation at tensor coordinates (differentiable in them),
    with the table's rules outside the points (constant below, last segment above)."""
    spans = []
    for name, pts in grid.axes.items():
        x = coords[name]
        xv = float(x.detach())
        if len(pts) == 1 or xv <= pts[0]:
            spans.append(((0, x.new_ones(())),))
            continue
        i = next((j for j in range(1, len(pts)) if xv <= pts[j]), len(pts) - 1)
        t = (x - pts[i - 1]) / (pts[i] - pts[i - 1])
        spans.append(((i - 1, 1.0 - t), (i, t)))
    shape = [len(p) for p in grid.axes.values()]
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    total = None

    def walk(d, off, w):
        nonlocal total
        if d == len(spans):
            term = w * grid.ms[off]
            total = term if total is None else total + term
            return
        for idx, wt in spans[d]:
            walk(d + 1, off + idx * strides[d], w * wt)

    walk(0, 0, 1.0)
    return total


def _blom(k: torch.Tensor) -> torch.Tensor:
    """Expected maximum of ``k`` standard normals (Blom's approximation; 0 at k <= 1)."""
    k = k.clamp_min(1.0)
    p = (k - 0.375) / (k + 0.25)
    return math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0)


class LatencyModel:
    """Predicted ms of ViT structures of one model shape at one batch, from a table: the
    budget's unit when ``--budget latency``. See the module docstring."""

    def __init__(self, table: LatencyTable, geometry, batch: int = 1):
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"latency batch must be a positive integer, got {batch!r}")
        self.table, self.g, self.batch = table, getattr(geometry, "dense", None) or geometry, batch
        self.shape = TableShape.of(self.g)
        self.backends = table.candidates(self.shape) or ["torch"]
        self.core_backend = "torch" if "torch" in self.backends else self.backends[0]
        self.fixed = table.stem_ms(self.shape, batch) + table.head_ms(self.shape, batch)
        self._layer: dict[tuple, float] = {}
        g = self.g
        self.dense = self.fixed + g.depth * self.layer_ms([g.head_dim] * g.num_heads,
                                                          [g.head_dim] * g.num_heads,
                                                          g.mlp_hidden)

    @classmethod
    def for_model(cls, model_or_geometry, device="cpu", dtype=torch.float32, batch: int = 1,
                  log=None, progress: bool = True) -> "LatencyModel":
        from pyengine.models import geometry
        g = model_or_geometry
        if hasattr(g, "forward"):
            from pyengine.models import adapter_for
            if adapter_for(g).name != "vit":
                raise LatencyTableError(f"the latency budget covers ViTs; the "
                                        f"{adapter_for(g).name} family has no latency table yet")
            g = geometry(g)
        return cls(table_for(g, device, dtype, (batch,), log=log, progress=progress), g, batch)

    # ---- hard structures ---------------------------------------------------------------
    def attention_ms(self, qk: Sequence[int], v: Sequence[int]) -> float:
        """One attention branch of kept heads with q/k widths ``qk`` and v widths ``v``: the
        faster of the exact and the padded layout (0 without heads)."""
        heads = [(a, b) for a, b in zip(qk, v) if b > 0]
        if not heads:
            return 0.0
        groups: dict[tuple[int, int], int] = {}
        for s in heads:
            groups[s] = groups.get(s, 0) + 1
        exact = [(n, a, b) for (a, b), n in sorted(groups.items())]
        padded = [(len(heads), max(a for a, _ in heads), max(b for _, b in heads))]
        t, sh, b = self.table, self.shape, self.batch
        return min(t.attention_ms(sh, b, lay, be) for lay in (exact, padded)
                   for be in self.backends)

    def mlp_ms(self, width: int) -> float:
        return self.table.mlp_ms(self.shape, self.batch, int(width))

    def layer_ms(self, qk: Sequence[int], v: Sequence[int], m: int) -> float:
        key = (tuple(sorted(zip(qk, v))), int(m))
        if key not in self._layer:
            self._layer[key] = self.attention_ms(qk, v) + self.mlp_ms(m)
        return self._layer[key]

    def smooth_layer_ms(self, qk: Sequence[int], v: Sequence[int], m: int) -> float:
        """The layer as :meth:`expected` prices it (its hard counterpart, for Monte Carlo
        checks): qkv and proj at the kept widths, the attention op as one run of the kept
        heads at their widest q/k or v width (the padded op with equal widths), the FFN."""
        t, sh, b = self.table, self.shape, self.batch
        heads = [(a, c) for a, c in zip(qk, v) if c > 0]
        ms = self.mlp_ms(m)
        if heads:
            sq, sv = sum(a for a, _ in heads), sum(c for _, c in heads)
            w = max(max(a, c) for a, c in heads)
            ms += t.branch_ms(sh, b) + t.scale(sh, b, "attn") * (
                t.linear_ms(sh, b, "qkv", 2 * sq + sv)
                + t.value(sh, f"attn_eq/{self.core_backend}", b, heads=len(heads), width=w)
                + t.linear_ms(sh, b, "proj", sv))
        return ms

    def block_ms(self, block) -> float:
        return self.layer_ms(block.qk_dims, block.v_dims, len(block.mlp))

    def spec_ms(self, spec) -> float:
        return self.fixed + sum(self.block_ms(b) for b in spec.blocks)

    # ---- gate probabilities ------------------------------------------------------------
    def _grids(self, name: str) -> dict[int, Grid]:
        entry = self.table._entry(self.shape)
        out = {b: p["grids"][name] for b, p in entry["batches"].items() if name in p["grids"]}
        if not out:
            raise LatencyTableError(f"the {self.table.device} latency table has no grid {name!r}")
        return out

    def _batched(self, name: str, fn) -> torch.Tensor:
        return interpolate_batch({b: fn(g) for b, g in self._grids(name).items()}, self.batch)

    def _width_term(self, name: str, p_on, mu, var, p_zero) -> torch.Tensor:
        """E[1[W > 0] * grid(W)] * P(branch on): normal law for grid(W), the W = 0 atom exact."""
        def one(g):
            return _expected_1d(g, mu, var) - p_zero * float(g.ms[0])
        return p_on * self._batched(name, one)

    def expected_block(self, attn: Mapping[str, torch.Tensor],
                       mlp: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Expected ms of one block from keep probabilities {block, head, qk, v} and
        {block, neuron} (HiAP's gate slots; hard semantics of ``gates._consistent``)."""
        t, sh, b = self.table, self.shape, self.batch
        pb = attn["block"].double().reshape(())
        ph = attn["head"].double()
        qk, v = attn["qk"].double(), attn["v"].double()
        anyv = 1.0 - torch.prod(1.0 - v, dim=-1)
        q = ph * anyv                                       # head alive | block
        p_none = torch.prod(1.0 - q)                        # no head alive | block
        sq, sv = qk.sum(-1), v.sum(-1)
        varq, varv = (qk * (1 - qk)).sum(-1), (v * (1 - v)).sum(-1)
        # qkv width 2*Q + V and proj width V of alive heads, summed over heads
        ey = 2.0 * anyv * sq + sv
        vy = 4.0 * anyv * varq + varv
        mu_qkv = (ph * ey).sum()
        var_qkv = (q * vy + q * (1 - q) * (ey / anyv.clamp_min(1e-12)) ** 2).sum()
        ey_v = sv / anyv.clamp_min(1e-12)                   # E[V | V > 0] (approximately)
        mu_v = (ph * sv).sum()
        var_v = (q * varv + q * (1 - q) * ey_v ** 2).sum()
        total = self._width_term("qkv", pb, mu_qkv, var_qkv, p_none)
        total = total + self._width_term("proj", pb, mu_v, var_v, p_none)
        # the op: expected head count given any, at the expected padded width
        p_any = (1.0 - p_none).clamp_min(1e-12)
        k = q.sum() / p_any
        w_q = sq * anyv
        w_h = torch.maximum(w_q, sv) / anyv.clamp_min(1e-12)  # a kept head's wider width
        wq = q / q.sum().clamp_min(1e-12)
        mean = (wq * w_h).sum()
        spread = (wq * (torch.maximum(varq, varv) + (w_h - mean) ** 2)).sum()
        width = mean + torch.sqrt(spread + 1e-12) * _blom(k)
        width = width.clamp(max=float(self.g.head_dim))
        core = self._batched(f"attn_eq/{self.core_backend}",
                             lambda g: _interp(g, heads=k, width=width))
        total = total + pb * (1.0 - p_none) * core
        # in-model cost of the modules (calibrated tables), plus the branch's own
        total = (pb * (1.0 - p_none) * t.branch_ms(sh, b, "attn")
                 + t.scale(sh, b, "attn") * total)
        # the FFN
        pn = mlp["neuron"].double()
        pmb = mlp["block"].double().reshape(())
        pz = torch.prod(1.0 - pn)
        total = total + pmb * (1.0 - pz) * t.branch_ms(sh, b, "mlp")
        total = total + t.scale(sh, b, "mlp") * self._width_term(
            "mlp", pmb, pn.sum(), (pn * (1 - pn)).sum(), pz)
        return total

    def expected(self, probs: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """Expected ms of the whole model: ``probs`` per gate set (attention, FFN, block by
        block, as :func:`pyengine.methods.hiap.hiap_gate_sets`)."""
        if len(probs) != 2 * self.g.depth:
            raise ValueError(f"expected {2 * self.g.depth} gate sets of probabilities "
                             f"(attention and FFN of {self.g.depth} blocks), got {len(probs)}")
        total = sum(self.expected_block(a, m) for a, m in zip(probs[0::2], probs[1::2]))
        return total + self.fixed
