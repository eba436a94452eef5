"""Analytical cost model: MACs, FLOPs, bytes and parameters of a (pruned) model, per layer.

Everything is computed from a spec whose ``dense`` geometry is known (or a model, whose spec is
taken), for a given batch size and dtype, and classified against a device roofline:

    c = pyengine.cost(compact, batch=64, dtype=torch.bfloat16, device="h100")
    c.macs, c.flops, c.bytes, c.params      # totals (flops == 2 * macs)
    print(c.table())                        # per-layer rows with intensity and bound

Units. ``macs`` are multiply-accumulates, the number ViT papers print as "FLOPs" (DeiT-S
4.6G); ``flops = 2 * macs``, the number ``torch.utils.flop_counter.FlopCounterMode`` reports
(it counts only matmul/conv/SDPA, so elementwise rows here have 0 MACs but real bytes; see
:func:`pyengine.cost.count_flops` for a count that does not depend on the attention kernel).

Bytes are what each layer must move at least once: its parameters (read once per call, not
per image) plus its input activations read and output activations written (per image), at
``dtype``'s element size. Which layers a model has and what each costs is its family's business
(``models/<family>/cost.py``, through the architecture adapter); this module holds the result
types, the row builder and the entry point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from pyengine.cost.dtypes import as_dtype, dtype_name
from pyengine.cost.peaks import Peaks, peaks_for

__all__ = ["Cost", "Layer", "Rows", "cost"]


# --------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------


@dataclass
class Layer:
    """One row of a cost profile."""

    name: str        # e.g. "blocks.3.attn.qkv", "blocks.3.mlp.act", "patch_embed", "head"
    kind: str        # "linear" | "attention" | "conv" | "norm" | "elementwise"
    macs: int
    bytes: int
    params: int = 0
    flops: int = 0           # 2 * macs
    intensity: float = 0.0   # flops / bytes
    bound: str = "memory"    # "memory" | "compute" on the device roofline
    time_s: float = 0.0      # roofline lower bound: max(flops / peak, bytes / bandwidth)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Cost:
    """Totals and per-layer rows. ``flops == 2 * macs``; ``bytes`` and ``params`` are sums of
    the rows; ``time_s`` is the roofline lower bound (sum of the per-layer bounds)."""

    macs: int
    flops: int
    bytes: int
    params: int
    layers: list[Layer]
    batch: int
    dtype: str
    peaks: Peaks
    attention: str = "fused"

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else math.inf

    @property
    def time_s(self) -> float:
        return sum(r.time_s for r in self.layers)

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    def layer(self, name: str) -> Layer:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(f"no layer {name!r}; layers are e.g. {[r.name for r in self.layers[:6]]}")

    def by_kind(self) -> dict[str, dict[str, float]]:
        """Totals per layer kind: {kind: {"macs", "flops", "bytes", "params", "time_s"}}."""
        out: dict[str, dict[str, float]] = {}
        for r in self.layers:
            d = out.setdefault(r.kind, {"macs": 0, "flops": 0, "bytes": 0, "params": 0,
                                        "time_s": 0.0})
            for k in d:
                d[k] += getattr(r, k)
        return out

    def ratio(self, other: "Cost", what: str = "macs") -> float:
        """``self.<what> / other.<what>`` (e.g. pruned over dense MACs)."""
        return getattr(self, what) / getattr(other, what)

    def as_dict(self) -> dict[str, Any]:
        return {
            "macs": self.macs, "flops": self.flops, "bytes": self.bytes, "params": self.params,
            "intensity": self.intensity, "time_s": self.time_s, "batch": self.batch,
            "dtype": self.dtype, "attention": self.attention,
            "device": {"name": self.peaks.name, "flops_per_s": self.peaks.flops_for(self.dtype),
                       "bytes_per_s": self.peaks.bytes_per_s},
            "layers": [r.as_dict() for r in self.layers],
        }

    def table(self, max_rows: int | None = None) -> str:
        """A fixed-width per-layer table with totals, for printing."""
        hdr = (f"{'layer':<24} {'kind':<11} {'MMACs':>10} {'MB':>9} {'FLOP/B':>8} "
               f"{'bound':>7} {'est us':>9}")
        lines = [f"cost: batch {self.batch}, {self.dtype}, attention={self.attention}, "
                 f"device {self.peaks.name} (ridge {self.peaks.ridge(self.dtype):.0f} FLOP/B)",
                 hdr, "-" * len(hdr)]
        rows = self.layers if max_rows is None else self.layers[:max_rows]
        for r in rows:
            lines.append(f"{r.name:<24} {r.kind:<11} {r.macs / 1e6:>10.2f} {r.bytes / 1e6:>9.3f} "
                         f"{r.intensity:>8.1f} {r.bound:>7} {r.time_s * 1e6:>9.2f}")
        if max_rows is not None and len(self.layers) > max_rows:
            lines.append(f"... {len(self.layers) - max_rows} more rows")
        lines.append("-" * len(hdr))
        lines.append(f"{'total':<24} {'':<11} {self.macs / 1e6:>10.2f} {self.bytes / 1e6:>9.3f} "
                     f"{self.intensity:>8.1f} {'':>7} {self.time_s * 1e6:>9.2f}")
        lines.append(f"GMACs {self.macs / 1e9:.4f}  GFLOPs {self.flops / 1e9:.4f}  "
                     f"params {self.params / 1e6:.3f}M")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (f"Cost(macs={self.macs}, flops={self.flops}, bytes={self.bytes}, "
                f"params={self.params}, batch={self.batch}, dtype={self.dtype!r}, "
                f"device={self.peaks.name!r}, layers=<{len(self.layers)} rows>)")



class Rows:
    """Collects the cost rows of one model: bytes = (weights + activations moved) * element
    size, roofline time ``max(flops / peak, bytes / bandwidth)`` and the bound it implies."""

    def __init__(self, dtype: torch.dtype, peaks: Peaks):
        self.itemsize = dtype.itemsize
        self.peaks = peaks
        self.peak_flops = peaks.flops_for(dtype)
        self.rows: list[Layer] = []

    def add(self, name: str, kind: str, macs: int, params: int, act_elems: int) -> None:
        """``act_elems``: activation elements read + written for the whole batch."""
        nbytes = (params + act_elems) * self.itemsize
        flops = 2 * macs
        inten = flops / nbytes if nbytes else 0.0
        ridge = self.peak_flops / self.peaks.bytes_per_s
        self.rows.append(Layer(
            name=name, kind=kind, macs=macs, bytes=nbytes, params=params, flops=flops,
            intensity=inten, bound="compute" if inten >= ridge else "memory",
            time_s=max(flops / self.peak_flops, nbytes / self.peaks.bytes_per_s)))

    __call__ = add


def cost(model_or_spec: Any, batch: int = 1, dtype: torch.dtype | str = torch.float32,
         device: Peaks | str | torch.device | None = None, attention: str = "fused",
         img_size: int | None = None) -> Cost:
    """Analytical cost of a pruned (or dense) model for ``batch`` images at ``dtype``.

    ``model_or_spec``: a spec with ``dense`` geometry, a compact model (it carries
    ``pyengine_spec``) or a gated/timm model (``pyengine.spec(model)`` is used).
    ``device``: see :func:`pyengine.cost.peaks_for`; it only affects the roofline labels and
    time estimates.
    ``attention`` (transformers): "fused" (one flash-style kernel; default) or "math" (scores
    and softmax materialised, separate rows); MACs are the same either way.
    ``img_size`` (CNNs): the input side (default: the spec's ``dense.img_size``); a ViT's input
    size is part of its geometry.
    """
    from pyengine.models import adapter_for, adapter_for_spec
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if isinstance(model_or_spec, torch.nn.Module):
        adapter = adapter_for(model_or_spec)
    else:
        adapter = adapter_for_spec(model_or_spec)
    dt = as_dtype(dtype)
    peaks = peaks_for(device)
    rows = Rows(dt, peaks)
    kind = adapter.cost(model_or_spec, rows, batch, attention=attention, img_size=img_size)
    macs = sum(r.macs for r in rows.rows)
    return Cost(macs=macs, flops=2 * macs, bytes=sum(r.bytes for r in rows.rows),
                params=sum(r.params for r in rows.rows), layers=rows.rows, batch=batch,
                dtype=dtype_name(dt), peaks=peaks, attention=kind)
