"""The spec of the EVA, BEiT and Swin families: per block the kept heads (with their q/k and
value dims) and FFN neurons, as in the ViT's :class:`~pyengine.structure.spec.Spec`, checked
against the dense shape of every block (:class:`BlockShape`; Swin's stages differ in width,
heads and tokens). The JSON names its family::

    {"format": "pyengine.spec/1", "family": "swin", "model": "swin_tiny_patch4_window7_224",
     "dense": {...the family's geometry...},
     "blocks": [{"heads": [{"index": 0, "qk": [0, 1, 5], "v": [2, 3]}], "mlp": [0, 4, 9]}, ...]}

Indices refer to the dense block: head index, dimension within the head, FFN neuron. Two
family rules are checked here: with rotary position embedding (EVA02) a q/k dim is kept only
with its rotary partner (a pair is rotated together, so it is one unit), and with q/k norm
(a LayerNorm over the whole head dim) a kept head keeps all its q/k dims.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping

from pyengine.structure.spec import Block, HeadSpecBase, SpecError, dense_fields

__all__ = ["BlockShape", "TransformerGeometry", "TransformerSpec"]

QKV_BIAS = ("qkv", "qv", "none")


@dataclass(frozen=True)
class BlockShape:
    """The dense shape of one transformer block, all that structure, cost and gates need.

    ``tokens``: rows of the residual stream (and of the FFN) per image. Attention runs over
    ``windows`` sequences of ``window`` tokens per image (one sequence of all tokens in a ViT;
    Swin's padded windows), so ``windows * window`` rows go through qkv and proj.
    """

    dim: int
    heads: int
    head_dim: int
    hidden: int
    tokens: int
    windows: int = 1
    window: int = 0
    qk_unit: int = 1              # q/k dims per prunable unit: 2 for a rotary pair
    rope_half: bool = False       # rotary pairs (i, i + Dh/2) instead of (2i, 2i + 1)
    qk_fixed: bool = False        # q/k norm: a kept head keeps all its q/k dims
    glu: bool = False             # gated FFN: fc1 makes a gate and a value row per neuron
    qkv_bias: str = "qkv"         # which of q, k, v have a bias ("qv": BEiT/EVA, k has none)
    attn_bias: bool = False       # an additive bias (relative position) in the scores
    bias_rows: int = 0            # rows of the block's own relative-position table per head
    layer_scale: tuple[bool, bool] = (False, False)  # per-channel scale after attn / FFN

    def __post_init__(self):
        for name in ("dim", "heads", "head_dim", "hidden", "tokens", "windows", "window"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise SpecError(f"block shape: {name} must be a positive integer, got {v!r}")
        if self.qk_unit not in (1, 2) or self.head_dim % self.qk_unit:
            raise SpecError(f"block shape: qk_unit {self.qk_unit} does not divide head_dim "
                            f"{self.head_dim}")
        if self.qkv_bias not in QKV_BIAS:
            raise SpecError(f"block shape: qkv_bias must be one of {QKV_BIAS}, got "
                            f"{self.qkv_bias!r}")

    @property
    def qk_units(self) -> int:
        """Prunable q/k units per head (0 when q/k dims are fixed)."""
        return 0 if self.qk_fixed else self.head_dim // self.qk_unit

    @property
    def attn_rows(self) -> int:
        return self.windows * self.window

    def unit_dims(self, u: int) -> tuple[int, ...]:
        """The head dims of q/k unit ``u`` (a rotary pair, or one dim)."""
        if self.qk_unit == 1:
            return (u,)
        if self.rope_half:
            return (u, u + self.head_dim // 2)
        return (2 * u, 2 * u + 1)

    def unit_of(self, d: int) -> int:
        if self.qk_unit == 1:
            return d
        return d % (self.head_dim // 2) if self.rope_half else d // 2

    def dims_of_units(self, units) -> tuple[int, ...]:
        return tuple(sorted(d for u in units for d in self.unit_dims(u)))


@functools.lru_cache(maxsize=256)
def _shapes(g) -> tuple[BlockShape, ...]:
    return tuple(g.block_shapes())


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


class TransformerGeometry:
    """Base of the families' dense geometries (frozen dataclasses): JSON in and out, and the
    per-block shapes (``shapes()``) everything else reads."""

    _POSITIVE: tuple[str, ...] = ()

    def block_shapes(self) -> tuple[BlockShape, ...]:
        """Every block's shape, in spec order (subclasses compute it)."""
        raise NotImplementedError

    def shapes(self) -> tuple[BlockShape, ...]:
        return _shapes(self)

    def to_dict(self) -> dict[str, Any]:
        def plain(v):
            return [plain(x) for x in v] if isinstance(v, tuple) else v
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}  # type: ignore

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        kw = dense_fields(cls, d)
        try:
            g = cls(**{k: _tuples(v) for k, v in kw.items()})
        except TypeError as e:
            raise SpecError(f"dense: {e}") from None
        for name in cls._POSITIVE:
            v = getattr(g, name)
            for x in (v if isinstance(v, tuple) else (v,)):
                if not isinstance(x, int) or isinstance(x, bool) or x <= 0:
                    raise SpecError(f"dense.{name} must be positive integers, got {v!r}")
        try:
            g.shapes()
        except (TypeError, ValueError, IndexError) as e:
            raise SpecError(f"dense: inconsistent geometry: {e}") from None
        return g


@dataclass(frozen=True)
class TransformerSpec(HeadSpecBase):
    """What a pruned EVA / BEiT / Swin keeps; each family subclasses it with its geometry
    type and registers it under its ``family`` key (see the module docstring)."""

    blocks: tuple[Block, ...]
    model: str | None = None
    dense: Any = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    geometry_type: ClassVar[Any] = None   # each family's subclass sets its geometry class
    family = "transformer"      # set by structure.spec.register_spec_type

    @classmethod
    def _sizes(cls, dense) -> list[tuple[int, int, int]]:
        return [(sh.heads, sh.head_dim, sh.hidden) for sh in dense.shapes()]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        items, dense = cls._read(d)
        sizes = cls._sizes(dense) if dense is not None else None
        if sizes is not None and len(items) != len(sizes):
            raise SpecError(f"spec has {len(items)} blocks but the dense model has "
                            f"{len(sizes)}")
        return cls._make(d, cls._read_blocks(items, sizes), dense)

    def check_geometry(self, g, model: str | None = None) -> None:
        """Raise :class:`SpecError` unless this spec fits a dense model of geometry ``g``:
        every index in range, rotary pairs kept whole, all q/k dims of a head under q/k
        norm."""
        if not isinstance(g, self.geometry_type):
            raise SpecError(f"a {self.family} spec does not fit a {type(g).__name__}")
        self._check_sizes(g, model)
        for b, (blk, sh) in enumerate(zip(self.blocks, g.shapes())):
            for h, head in enumerate(blk.heads):
                where = f"blocks[{b}].heads[{h}]"
                if sh.qk_fixed and len(head.qk) != sh.head_dim:
                    raise SpecError(f"{where}.qk: this model normalizes q and k over the whole "
                                    f"head (qk_norm), so a kept head keeps all {sh.head_dim} q/k "
                                    f"dims; got {len(head.qk)}")
                if sh.qk_unit > 1:
                    kept = set(head.qk)
                    for d in head.qk:
                        partner = [x for x in sh.unit_dims(sh.unit_of(d)) if x != d][0]
                        if partner not in kept:
                            raise SpecError(f"{where}.qk: rotary pairs are kept whole: dim {d} "
                                            f"is kept without its pair {partner}")
