"""Analytical cost model: MACs, FLOPs, bytes and parameters of a (pruned) ViT, per layer.

Everything is computed from a :class:`~pyengine.spec.Spec` whose ``dense`` geometry is known,
for a given batch size and dtype, and classified against a device roofline:

    c = pyengine.cost(compact, batch=64, dtype=torch.bfloat16, device="h100")
    c.macs, c.flops, c.bytes, c.params      # totals (flops == 2 * macs)
    print(c.table())                        # per-layer rows with intensity and bound

Units. ``macs`` are multiply-accumulates, the number ViT papers print as "FLOPs" (DeiT-S
4.6G); ``flops = 2 * macs``, the number ``torch.utils.flop_counter.FlopCounterMode`` reports
(it counts only matmul/conv/SDPA, so elementwise rows here have 0 MACs but real bytes).

What is counted, per transformer block with N tokens, width D, kept heads h with q/k dims
``qk_h`` and value dims ``v_h``, and ``m`` kept FFN neurons (per image):

* attention (only if the block keeps a head): qkv Linear ``N*D*(2*sum qk_h + sum v_h)``,
  scores ``N*N*qk_h`` and P@V ``N*N*v_h`` for every head with ``qk_h > 0`` (a head with no
  q/k dims attends uniformly, a mean of V over tokens: 0 MACs), proj ``N*(sum v_h)*D``;
* FFN (only if the block keeps a neuron): fc1 ``N*D*m`` and fc2 ``N*m*D``;
* outside the blocks: patch-embedding conv ``P*D*C*ph*pw`` over P patches, and the classifier
  ``D*num_classes`` per image (twice for distilled DeiTs, which have a second head).

Bytes are what each layer must move at least once: its parameters (read once per call, not
per image) plus its input activations read and output activations written (per image), at
``dtype``'s element size. Attention is costed as one fused kernel (flash style: Q, K, V in,
output out, the N x N scores never reach memory) unless ``attention="math"``.

The small ``*_macs`` functions below are the formulas themselves; a differentiable expected
cost from gate probabilities should mirror them.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from pyengine.structure.spec import Geometry, Spec

__all__ = [
    "Cost", "Layer", "Peaks", "PEAKS", "cost", "peaks_for",
    "qkv_macs", "attention_macs", "proj_macs", "attn_macs", "mlp_macs", "block_macs",
    "patch_embed_macs", "head_macs", "total_macs",
]

# --------------------------------------------------------------------------------------
# Device peaks and the roofline
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peaks:
    """Peak compute and memory bandwidth of a device (dense, no sparsity).

    ``flops_per_s`` is the default (bf16 tensor-core for GPUs); ``flops_by_dtype`` refines it
    per dtype name ("bfloat16", "float16", "float32", "tf32", "float8").
    """

    name: str
    flops_per_s: float
    bytes_per_s: float
    flops_by_dtype: Mapping[str, float] = field(default_factory=dict, compare=False, hash=False)

    def flops_for(self, dtype: torch.dtype | str | None = None) -> float:
        """Peak FLOP/s for matmuls at ``dtype``. float32 counts as TF32 when PyTorch is
        allowed to use it (``torch.get_float32_matmul_precision() != "highest"``)."""
        if dtype is None or not self.flops_by_dtype:
            return self.flops_per_s
        if isinstance(dtype, str) and dtype in ("tf32", "float8"):
            return float(self.flops_by_dtype.get(dtype, self.flops_per_s))
        key = _dtype_name(_as_dtype(dtype))
        if key == "float32" and torch.get_float32_matmul_precision() != "highest" \
                and "tf32" in self.flops_by_dtype:
            key = "tf32"
        return float(self.flops_by_dtype.get(key, self.flops_per_s))

    def ridge(self, dtype: torch.dtype | str | None = None) -> float:
        """Arithmetic intensity (FLOP/byte) where the compute and memory roofs meet."""
        return self.flops_for(dtype) / self.bytes_per_s


_H100_SXM = {"bfloat16": 989e12, "float16": 989e12, "float8": 1979e12, "tf32": 495e12,
             "float32": 67e12}

#: Known devices (vendor data sheets, dense figures). Keys are what ``device="..."`` accepts.
PEAKS: dict[str, Peaks] = {
    "h100-sxm": Peaks("NVIDIA H100 SXM", 989e12, 3.35e12, _H100_SXM),
    "h100-pcie": Peaks("NVIDIA H100 PCIe", 756e12, 2.0e12,
                       {"bfloat16": 756e12, "float16": 756e12, "float8": 1513e12,
                        "tf32": 378e12, "float32": 51e12}),
    "h100-nvl": Peaks("NVIDIA H100 NVL", 835e12, 3.9e12,
                      {"bfloat16": 835e12, "float16": 835e12, "float8": 1671e12,
                       "tf32": 418e12, "float32": 60e12}),
    "h200": Peaks("NVIDIA H200", 989e12, 4.8e12, _H100_SXM),
    "a100": Peaks("NVIDIA A100 SXM 80GB", 312e12, 2.0e12,
                  {"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12, "float32": 19.5e12}),
    "cpu": Peaks("generic CPU (rough default: 2 cores x AVX2 FMA ~1e11 FLOP/s, ~2e10 B/s)",
                 1e11, 2e10),
}
_ALIASES = {"h100": "h100-sxm", "h100 sxm": "h100-sxm", "h100-sxm5": "h100-sxm",
            "h100 pcie": "h100-pcie", "h100 nvl": "h100-nvl", "a100-sxm": "a100",
            "a100 sxm": "a100"}


def _match_device_name(name: str) -> str | None:
    n = name.lower().strip()
    if n in PEAKS:
        return n
    if n in _ALIASES:
        return _ALIASES[n]
    if "h200" in n:
        return "h200"
    if "h100" in n:
        if "pcie" in n:
            return "h100-pcie"
        if "nvl" in n:
            return "h100-nvl"
        return "h100-sxm"
    if "a100" in n:
        return "a100"
    if n == "cpu":
        return "cpu"
    return None


def peaks_for(device: Peaks | str | torch.device | None = None) -> Peaks:
    """Resolve ``device`` to :class:`Peaks`.

    ``None``: the current CUDA device (matched by its name) if CUDA is available, else the
    rough CPU default. A string is a key of :data:`PEAKS` ("h100", "h200", "a100", "cpu", ...),
    a CUDA device name ("NVIDIA H100 80GB HBM3"), or "cuda"/"cuda:N". A :class:`Peaks` is used
    as is.
    """
    if isinstance(device, Peaks):
        return device
    if isinstance(device, torch.device):
        device = str(device)
    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        else:
            return PEAKS["cpu"]
    if not isinstance(device, str):
        raise TypeError(f"device must be None, a name, a torch.device or a Peaks, got {device!r}")
    if device.lower().startswith("cuda"):
        gpu = torch.cuda.get_device_name(torch.device(device)) if torch.cuda.is_available() else ""
        key = _match_device_name(gpu) if gpu else None
        if key is None:
            warnings.warn(f"no peak figures for GPU {gpu or '(none visible)'!r}; using H100 SXM "
                          "figures. Pass device=pyengine.cost.Peaks(...) for exact ones.")
            p = PEAKS["h100-sxm"]
            return Peaks(f"{gpu or 'unknown GPU'} (assumed H100 SXM peaks)", p.flops_per_s,
                         p.bytes_per_s, p.flops_by_dtype)
        return PEAKS[key]
    key = _match_device_name(device)
    if key is None:
        raise ValueError(f"unknown device {device!r}; known: {sorted(PEAKS)} (or pass "
                         "pyengine.cost.Peaks(name, flops_per_s, bytes_per_s))")
    return PEAKS[key]


# --------------------------------------------------------------------------------------
# Per-layer formulas (MACs for `batch` images). Keep these the single source of truth.
# --------------------------------------------------------------------------------------


def qkv_macs(g: Geometry, qk_dims: Sequence[int], v_dims: Sequence[int], batch: int = 1) -> int:
    """Fused qkv Linear D -> 2*sum(qk) + sum(v) over N tokens (0 if no head is kept)."""
    if len(v_dims) == 0:
        return 0
    return batch * g.num_tokens * g.embed_dim * (2 * sum(qk_dims) + sum(v_dims))


def attention_macs(g: Geometry, qk_dims: Sequence[int], v_dims: Sequence[int],
                   batch: int = 1) -> int:
    """Scores Q K^T (N*N*qk) plus P V (N*N*v) per head; a head with qk == 0 is a mean: 0."""
    n = g.num_tokens
    return batch * n * n * sum(qk + v for qk, v in zip(qk_dims, v_dims) if qk > 0)


def proj_macs(g: Geometry, v_dims: Sequence[int], batch: int = 1) -> int:
    """Output projection Linear sum(v) -> D over N tokens."""
    return batch * g.num_tokens * sum(v_dims) * g.embed_dim


def attn_macs(g: Geometry, qk_dims: Sequence[int], v_dims: Sequence[int], batch: int = 1) -> int:
    """The whole attention branch of one block."""
    return (qkv_macs(g, qk_dims, v_dims, batch) + attention_macs(g, qk_dims, v_dims, batch)
            + proj_macs(g, v_dims, batch))


def mlp_macs(g: Geometry, m: int, batch: int = 1) -> int:
    """fc1 D -> m and fc2 m -> D over N tokens (0 when the FFN is removed, m == 0)."""
    return 2 * batch * g.num_tokens * g.embed_dim * m


def block_macs(g: Geometry, qk_dims: Sequence[int], v_dims: Sequence[int], m: int,
               batch: int = 1) -> int:
    """One transformer block: attention branch + FFN branch."""
    return attn_macs(g, qk_dims, v_dims, batch) + mlp_macs(g, m, batch)


def patch_embed_macs(g: Geometry, batch: int = 1) -> int:
    """Patch-embedding conv (kernel = stride = patch size) over num_patches positions."""
    ph, pw = g.patch_size
    return batch * g.num_patches * g.embed_dim * g.in_chans * ph * pw


def head_macs(g: Geometry, batch: int = 1, num_heads: int = 1) -> int:
    """Classifier Linear D -> num_classes on the pooled token (num_heads=2: distilled DeiT)."""
    return batch * num_heads * g.embed_dim * g.num_classes


def total_macs(spec: Spec, batch: int = 1, distilled: bool | None = None) -> int:
    """Total MACs of ``spec`` (which must carry ``dense``) for ``batch`` images."""
    g = _geometry(spec)
    if distilled is None:
        distilled = _distilled_from_name(spec.model)
    return (patch_embed_macs(g, batch)
            + sum(block_macs(g, b.qk_dims, b.v_dims, len(b.mlp), batch) for b in spec.blocks)
            + head_macs(g, batch, 2 if distilled else 1))


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


# --------------------------------------------------------------------------------------
# Building the profile
# --------------------------------------------------------------------------------------

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                  "float": "float32", "fp64": "float64", "double": "float64"}


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = dtype.lower().replace("torch.", "")
        name = _DTYPE_ALIASES.get(name, name)
        d = getattr(torch, name, None)
        if isinstance(d, torch.dtype):
            return d
    raise TypeError(f"dtype must be a torch.dtype or a name like 'bfloat16', got {dtype!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    return "float8" if name.startswith("float8") else name


def _distilled_from_name(name: str | None) -> bool:
    return bool(name) and "distilled" in name


def _geometry(spec: Spec) -> Geometry:
    g = spec.dense
    if g is None:
        raise ValueError("cost needs the dense geometry: this Spec has no 'dense' field. Use "
                         "pyengine.spec(model) (which fills it) or spec.with_dense(geometry).")
    for name in ("num_tokens", "num_patches"):
        if getattr(g, name) <= 0:
            raise ValueError(f"cost needs dense.{name} (the spec's geometry has {name}="
                             f"{getattr(g, name)}); build the spec from a model or fill it in")
    return g


@dataclass
class _Extras:
    """Facts about the model outside the Spec (defaults: what the geometry implies)."""

    distilled: bool = False            # a second classifier head (head_dist)
    layer_scale: Sequence[bool] = ()   # per block: LayerScale after each branch
    pos_tokens: int | None = None      # tokens the position embedding covers
    norm_pre: bool = False             # LayerNorm before the blocks (CLIP-style ViTs)
    final_norm: bool = True            # LayerNorm over all tokens after the blocks
    fc_norm: bool = False              # LayerNorm on the pooled feature instead
    pool: str = "token"                # global_pool: "token" (a slice) or "avg" (a mean)


def _extras_from_model(model: torch.nn.Module, depth: int) -> _Extras:
    ex = _Extras()
    ex.distilled = isinstance(getattr(model, "head_dist", None), torch.nn.Linear)
    blocks = getattr(model, "blocks", None)
    if blocks is not None:
        try:
            ls = [hasattr(getattr(b, "ls1", None), "gamma")
                  or hasattr(getattr(b, "ls2", None), "gamma") for b in blocks]
            if len(ls) == depth:
                ex.layer_scale = ls
        except TypeError:
            pass
    pe = getattr(model, "pos_embed", None)
    if isinstance(pe, torch.Tensor) and pe.dim() == 3:
        ex.pos_tokens = int(pe.shape[1])

    def present(attr: str, default: bool) -> bool:
        if not hasattr(model, attr):
            return default
        mod = getattr(model, attr)
        return mod is not None and not isinstance(mod, torch.nn.Identity)

    ex.norm_pre = present("norm_pre", False)
    ex.final_norm = present("norm", True)
    ex.fc_norm = present("fc_norm", False)
    pool = getattr(model, "global_pool", "token")
    ex.pool = pool if isinstance(pool, str) and pool else "token"
    return ex


def _resolve(model_or_spec: Any) -> tuple[Spec, _Extras]:
    if isinstance(model_or_spec, Spec):
        spec = model_or_spec
        g = _geometry(spec)
        return spec, _Extras(distilled=_distilled_from_name(spec.model), pos_tokens=g.num_tokens)
    if not isinstance(model_or_spec, torch.nn.Module):
        raise TypeError("cost() takes a pyengine.Spec or a model, got "
                        f"{type(model_or_spec).__name__}")
    model = model_or_spec
    spec = getattr(model, "pyengine_spec", None)
    if spec is None:
        try:
            from pyengine.api import spec as _spec
        except ImportError as e:  # pragma: no cover - only before the API exists
            raise TypeError("cost(model) needs pyengine.spec, which is not available "
                            f"({e}); pass a Spec with dense geometry instead") from None
        spec = _spec(model)
    if not isinstance(spec, Spec):
        raise TypeError(f"model.pyengine_spec must be a pyengine.Spec, got {type(spec).__name__}")
    g = _geometry(spec)
    ex = _extras_from_model(model, g.depth)
    if not ex.distilled:
        ex.distilled = _distilled_from_name(spec.model) and not hasattr(model, "head")
    return spec, ex


def _layer(name: str, kind: str, macs: int, params: int, act_elems: int, itemsize: int,
           peaks: "Peaks", peak_flops: float) -> "Layer":
    """One cost row: bytes = weights + activations moved, roofline time and bound."""
    nbytes = (params + act_elems) * itemsize
    flops = 2 * macs
    inten = flops / nbytes if nbytes else 0.0
    ridge = peak_flops / peaks.bytes_per_s
    return Layer(name=name, kind=kind, macs=macs, bytes=nbytes, params=params, flops=flops,
                 intensity=inten, bound="compute" if inten >= ridge else "memory",
                 time_s=max(flops / peak_flops, nbytes / peaks.bytes_per_s))


def cost(model_or_spec: Any, batch: int = 1, dtype: torch.dtype | str = torch.float32,
         device: Peaks | str | torch.device | None = None, attention: str = "fused",
         img_size: int | None = None) -> Cost:
    """Analytical cost of a pruned (or dense) ViT for ``batch`` images at ``dtype``.

    ``model_or_spec``: a :class:`~pyengine.spec.Spec` with ``dense`` geometry, a compact model
    (it carries ``pyengine_spec``) or a gated/timm model (``pyengine.spec(model)`` is used).
    ``device``: see :func:`peaks_for`; it only affects the roofline labels and time estimates.
    ``attention``: "fused" (one flash-style kernel; default) or "math" (scores and softmax
    materialised, separate rows); MACs are the same either way.
    ``img_size``: input side for CNNs (timm ResNets; default: the spec's ``dense.img_size``);
    ViTs take theirs from the geometry.
    """
    if _is_cnn(model_or_spec):
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        return cnn_cost(model_or_spec, batch, dtype, device, img_size)
    if img_size is not None:
        raise ValueError("img_size is for CNNs; a ViT's input size is part of its geometry")
    if attention not in ("fused", "math"):
        raise ValueError(f"attention must be 'fused' or 'math', got {attention!r}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    spec, ex = _resolve(model_or_spec)
    g = _geometry(spec)
    dt = _as_dtype(dtype)
    es = dt.itemsize
    peaks = peaks_for(device)
    peak_flops = peaks.flops_for(dt)

    rows: list[Layer] = []

    def row(name: str, kind: str, macs: int, params: int, act_elems: int) -> None:
        """act_elems: activation elements read + written for the whole batch."""
        rows.append(_layer(name, kind, macs, params, act_elems, es, peaks, peak_flops))

    B, N, D, P = batch, g.num_tokens, g.embed_dim, g.num_patches
    ph, pw = g.patch_size
    prefix = N - P
    tok = B * N * D  # one activation of the residual stream

    # ---- stem
    pe_w = D * g.in_chans * ph * pw + D
    row("patch_embed", "conv", patch_embed_macs(g, B), pe_w,
        B * P * g.in_chans * ph * pw + B * P * D)
    pos_tokens = ex.pos_tokens if ex.pos_tokens is not None else N
    # cat prefix tokens, add the position embedding: read patches, write the stream
    row("pos_embed", "elementwise", 0, pos_tokens * D + prefix * D, B * P * D + tok)

    if ex.norm_pre:
        row("norm_pre", "norm", 0, 2 * D, 2 * tok)

    # ---- blocks
    for i, blk in enumerate(spec.blocks):
        pre = f"blocks.{i}"
        ls = bool(ex.layer_scale[i]) if ex.layer_scale else False
        if blk.has_attn:
            qk, v = blk.qk_dims, blk.v_dims
            q_out = 2 * sum(qk) + sum(v)
            sv = sum(v)
            row(f"{pre}.norm1", "norm", 0, 2 * D, 2 * tok)
            row(f"{pre}.attn.qkv", "linear", qkv_macs(g, qk, v, B),
                D * q_out + (q_out if g.qkv_bias else 0), tok + B * N * q_out)
            if attention == "fused":
                row(f"{pre}.attn.sdpa", "attention", attention_macs(g, qk, v, B), 0,
                    B * N * q_out + B * N * sv)
            else:
                live = [(a, b) for a, b in zip(qk, v) if a > 0]
                hp = len(live)
                row(f"{pre}.attn.scores", "attention", B * N * N * sum(a for a, _ in live), 0,
                    B * N * 2 * sum(qk) + B * hp * N * N)
                row(f"{pre}.attn.softmax", "elementwise", 0, 0, 2 * B * hp * N * N)
                row(f"{pre}.attn.pv", "attention", B * N * N * sum(b for _, b in live), 0,
                    B * hp * N * N + 2 * B * N * sv)
            row(f"{pre}.attn.proj", "linear", proj_macs(g, v, B), sv * D + D, B * N * sv + tok)
            if ls:
                row(f"{pre}.ls1", "elementwise", 0, D, 2 * tok)
            row(f"{pre}.add1", "elementwise", 0, 0, 3 * tok)
        if blk.has_mlp:
            m = len(blk.mlp)
            row(f"{pre}.norm2", "norm", 0, 2 * D, 2 * tok)
            row(f"{pre}.mlp.fc1", "linear", B * N * D * m, D * m + m, tok + B * N * m)
            row(f"{pre}.mlp.act", "elementwise", 0, 0, 2 * B * N * m)
            row(f"{pre}.mlp.fc2", "linear", B * N * m * D, m * D + D, B * N * m + tok)
            if ls:
                row(f"{pre}.ls2", "elementwise", 0, D, 2 * tok)
            row(f"{pre}.add2", "elementwise", 0, 0, 3 * tok)

    # ---- final norm (over all tokens, as timm does), pooling, classifier(s)
    if ex.final_norm:
        row("norm", "norm", 0, 2 * D, 2 * tok)
    if ex.pool in ("avg", "avgmax", "max"):
        row("pool", "elementwise", 0, 0, B * P * D + B * D)
    if ex.fc_norm:
        row("fc_norm", "norm", 0, 2 * D, 2 * B * D)
    if g.num_classes > 0:
        c = g.num_classes
        row("head", "linear", head_macs(g, B, 1), D * c + c, B * D + B * c)
        if ex.distilled:
            row("head_dist", "linear", head_macs(g, B, 1), D * c + c, B * D + B * c)

    macs = sum(r.macs for r in rows)
    return Cost(macs=macs, flops=2 * macs, bytes=sum(r.bytes for r in rows),
                params=sum(r.params for r in rows), layers=rows, batch=B,
                dtype=_dtype_name(dt), peaks=peaks, attention=attention)


# --------------------------------------------------------------------------------------
# CNNs (timm ResNets)
# --------------------------------------------------------------------------------------
#
# A ResNet's layer shapes follow from its (compact) modules and the input size, so the CNN
# cost walks the compact model once on the meta device (no memory, no arithmetic) with
# forward hooks, and costs each layer from its input/output shapes with the formulas below:
# conv MACs = output elements * (C_in / groups) * kh * kw, Linear MACs = output elements *
# in_features, exactly what FlopCounterMode counts (2 FLOPs per MAC). BatchNorm, activations,
# pools and the residual adds have 0 MACs but real bytes.


def conv_macs(out_elems: int, in_channels: int, groups: int, kernel: Sequence[int]) -> int:
    """Conv2d MACs for ``out_elems`` output elements (batch included)."""
    return out_elems * (in_channels // groups) * math.prod(kernel)


def _is_cnn(obj: Any) -> bool:
    from pyengine.structure.spec import CnnSpec
    if isinstance(obj, CnnSpec):
        return True
    if isinstance(obj, torch.nn.Module):
        from pyengine.models.resnet import blocks as resnet
        return resnet.is_resnet(obj)
    return False


def _cnn_meta_model(obj: Any):
    """``(compact model on the meta device, CnnSpec)`` for a CnnSpec or a ResNet."""
    import copy

    from pyengine.models.resnet import blocks as resnet
    from pyengine.structure.spec import CnnSpec
    if isinstance(obj, CnnSpec):
        if obj.model is None or obj.dense is None:
            raise ValueError("cost of a CNN spec needs its 'model' name and 'dense' geometry "
                             "(pyengine.spec(model) fills both)")
        import timm
        with torch.device("meta"):
            m = timm.create_model(obj.model, pretrained=False, num_classes=obj.dense.num_classes,
                                  in_chans=obj.dense.in_chans)
        return resnet.build(m, obj, copy_weights=False), obj
    from pyengine.api import spec as _spec
    s = _spec(obj)
    m = copy.deepcopy(obj).to("meta")
    if not resnet.is_compact(obj):
        if resnet.is_gated(obj):
            resnet.fold_gates(m)
        m = resnet.build(m, s, copy_weights=False)
    return m, s


def cnn_cost(model_or_spec: Any, batch: int = 1, dtype: torch.dtype | str = torch.float32,
             device: Peaks | str | torch.device | None = None,
             img_size: int | None = None) -> Cost:
    """Per-layer cost of a (pruned) timm ResNet, a gated one or a :class:`CnnSpec`."""
    from pyengine.models.resnet import blocks as resnet
    model, s = _cnn_meta_model(model_or_spec)
    size = img_size or (s.dense.img_size if s.dense is not None else 0)
    if not isinstance(size, int) or size <= 0:
        raise ValueError("cost of a CNN needs the input size: pass img_size=... (or set "
                         "model.pyengine_img_size before taking the spec)")
    dt = _as_dtype(dtype)
    es = dt.itemsize
    peaks = peaks_for(device)
    peak_flops = peaks.flops_for(dt)
    rows: list[Layer] = []

    def row(name: str, kind: str, macs: int, params: int, act_elems: int) -> None:
        """act_elems: activation elements read + written for the whole batch."""
        rows.append(_layer(name, kind, macs, params, act_elems, es, peaks, peak_flops))

    from timm.models.resnet import BasicBlock, Bottleneck
    blocks = (resnet.ResBlock, BasicBlock, Bottleneck)
    skip = (torch.nn.Identity, torch.nn.Flatten, torch.nn.Dropout)

    def hook(name):
        def fn(mod, inp, out):
            x = inp[0]
            nparams = sum(p.numel() for p in mod.parameters(recurse=False))
            if isinstance(mod, blocks):
                row(f"{name}.add", "elementwise", 0, 0, 3 * out.numel())
            elif isinstance(mod, torch.nn.Conv2d):
                row(name, "conv", conv_macs(out.numel(), mod.in_channels, mod.groups,
                                            mod.kernel_size), nparams, x.numel() + out.numel())
            elif isinstance(mod, torch.nn.Linear):
                row(name, "linear", out.numel() * mod.in_features, nparams,
                    x.numel() + out.numel())
            elif isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                row(name, "norm", 0, nparams, x.numel() + out.numel())
            elif nparams:
                raise NotImplementedError(f"cost: no formula for {type(mod).__name__} ({name})")
            else:  # activations and pools
                row(name, "elementwise", 0, 0, x.numel() + out.numel())
        return fn

    handles = []
    for name, mod in model.named_modules():
        leaf = next(mod.children(), None) is None
        if isinstance(mod, blocks) or (leaf and name and not isinstance(mod, skip)
                                       and type(mod).__name__ != "DropPath"):
            handles.append(mod.register_forward_hook(hook(name)))
    try:
        model.eval()
        with torch.no_grad():
            model(torch.empty(batch, s.dense.in_chans if s.dense else 3, size, size,
                              device="meta", dtype=torch.float32))
    finally:
        for h in handles:
            h.remove()
    # hooks fire in completion order (a block after its insides): order rows by module order
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    rows.sort(key=lambda r: order.get(r.name.removesuffix(".add"), 0) + (0.5 if r.name.endswith(".add") else 0))
    macs = sum(r.macs for r in rows)
    return Cost(macs=macs, flops=2 * macs, bytes=sum(r.bytes for r in rows),
                params=sum(r.params for r in rows), layers=rows, batch=batch,
                dtype=_dtype_name(dt), peaks=peaks, attention="n/a")
