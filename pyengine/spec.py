"""The structure spec: what a pruned model keeps, per layer, as plain validated JSON.

Every other part of pyengine (gates, apply, compile, cost, save/load, CLI) reads structure
from a :class:`Spec` and from nothing else. Indices always refer to the dense model: head
index within the layer, dimension index within the head, neuron index within the FFN.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

FORMAT = "pyengine.spec/1"


class SpecError(ValueError):
    """A spec that is malformed or does not fit the model it is used with."""


@dataclass(frozen=True)
class Geometry:
    """Shape of the dense ViT a spec refers to (what index ranges and costs are checked against)."""

    depth: int
    embed_dim: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    num_tokens: int = 0  # sequence length the blocks see (patches + prefix tokens)
    num_patches: int = 0
    in_chans: int = 3
    patch_size: tuple[int, int] = (16, 16)
    num_classes: int = 0
    qkv_bias: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Geometry":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise SpecError(f"dense: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        try:
            kw = dict(d)
            if "patch_size" in kw:
                kw["patch_size"] = tuple(int(p) for p in kw["patch_size"])
            g = cls(**kw)
        except TypeError as e:
            raise SpecError(f"dense: {e}") from None
        for name in ("depth", "embed_dim", "num_heads", "head_dim", "mlp_hidden"):
            v = getattr(g, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise SpecError(f"dense.{name} must be a positive integer, got {v!r}")
        return g


@dataclass(frozen=True)
class Head:
    """One kept attention head: its dense index and its kept query/key and value dims."""

    index: int
    qk: tuple[int, ...]
    v: tuple[int, ...]


@dataclass(frozen=True)
class Block:
    """One transformer block: kept heads (empty removes attention) and kept FFN neurons
    (empty removes the FFN); the residual path always stays."""

    heads: tuple[Head, ...] = ()
    mlp: tuple[int, ...] = ()

    @property
    def has_attn(self) -> bool:
        return len(self.heads) > 0

    @property
    def has_mlp(self) -> bool:
        return len(self.mlp) > 0

    @property
    def qk_dims(self) -> list[int]:
        return [len(h.qk) for h in self.heads]

    @property
    def v_dims(self) -> list[int]:
        return [len(h.v) for h in self.heads]


def _index_list(value: Any, where: str, upper: int | None) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise SpecError(f"{where}: expected a list of integers, got {type(value).__name__}")
    seen: set[int] = set()
    for i in value:
        if not isinstance(i, int) or isinstance(i, bool):
            raise SpecError(f"{where}: expected integers, got {i!r}")
        if i < 0 or (upper is not None and i >= upper):
            rng = f"[0, {upper})" if upper is not None else ">= 0"
            raise SpecError(f"{where}: index {i} out of range {rng}")
        if i in seen:
            raise SpecError(f"{where}: duplicate index {i}")
        seen.add(i)
    return tuple(sorted(value))


@dataclass(frozen=True)
class Spec:
    """What a pruned ViT keeps. Build with :meth:`from_json`, :meth:`from_dict`, :meth:`full`
    or ``pyengine.spec(model)``; all of them validate."""

    blocks: tuple[Block, ...]
    model: str | None = None
    dense: Geometry | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if self.dense is not None:
            self.check_geometry(self.dense)
        for b, blk in enumerate(self.blocks):
            for h, head in enumerate(blk.heads):
                if len(head.v) == 0:
                    raise SpecError(
                        f"blocks[{b}].heads[{h}] (head {head.index}) keeps no value dims: it adds "
                        "nothing to the output; drop the head from the list instead")
            idx = [head.index for head in blk.heads]
            if len(set(idx)) != len(idx):
                raise SpecError(f"blocks[{b}].heads: duplicate head index in {idx}")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def full(cls, dense: Geometry, model: str | None = None) -> "Spec":
        """The spec of the unpruned model: everything kept."""
        dims = tuple(range(dense.head_dim))
        heads = tuple(Head(h, dims, dims) for h in range(dense.num_heads))
        blk = Block(heads, tuple(range(dense.mlp_hidden)))
        return cls((blk,) * dense.depth, model=model, dense=dense)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Spec":
        if not isinstance(d, Mapping):
            raise SpecError(f"a spec is a JSON object, got {type(d).__name__}")
        fmt = d.get("format", FORMAT)
        if fmt != FORMAT:
            raise SpecError(f"unsupported spec format {fmt!r}; this pyengine reads {FORMAT!r}")
        unknown = set(d) - {"format", "model", "dense", "blocks", "meta"}
        if unknown:
            raise SpecError(f"unknown top-level field(s) {sorted(unknown)}")
        if "blocks" not in d or not isinstance(d["blocks"], list):
            raise SpecError("a spec needs a 'blocks' list (one entry per transformer block)")
        dense = Geometry.from_dict(d["dense"]) if d.get("dense") is not None else None
        if dense is not None and len(d["blocks"]) != dense.depth:
            raise SpecError(f"spec has {len(d['blocks'])} blocks but dense.depth is {dense.depth}")
        nh = dense.num_heads if dense else None
        hd = dense.head_dim if dense else None
        nm = dense.mlp_hidden if dense else None
        blocks = []
        for b, bd in enumerate(d["blocks"]):
            where = f"blocks[{b}]"
            if not isinstance(bd, Mapping):
                raise SpecError(f"{where}: expected an object with 'heads' and 'mlp'")
            unknown = set(bd) - {"heads", "mlp"}
            if unknown:
                raise SpecError(f"{where}: unknown field(s) {sorted(unknown)}")
            if "heads" not in bd or "mlp" not in bd:
                raise SpecError(f"{where}: needs both 'heads' and 'mlp' ([] removes the block)")
            if not isinstance(bd["heads"], list):
                raise SpecError(f"{where}.heads: expected a list")
            heads = []
            for h, hdict in enumerate(bd["heads"]):
                hw = f"{where}.heads[{h}]"
                if not isinstance(hdict, Mapping) or set(hdict) != {"index", "qk", "v"}:
                    raise SpecError(f"{hw}: expected an object with exactly 'index', 'qk', 'v'")
                index = hdict["index"]
                if not isinstance(index, int) or isinstance(index, bool) or index < 0 or (
                        nh is not None and index >= nh):
                    raise SpecError(f"{hw}.index: {index!r} is not a head index in [0, {nh})")
                heads.append(Head(index, _index_list(hdict["qk"], f"{hw}.qk", hd),
                                  _index_list(hdict["v"], f"{hw}.v", hd)))
            heads.sort(key=lambda x: x.index)
            blocks.append(Block(tuple(heads), _index_list(bd["mlp"], f"{where}.mlp", nm)))
        model = d.get("model")
        if model is not None and not isinstance(model, str):
            raise SpecError(f"model: expected a timm model name, got {model!r}")
        return cls(tuple(blocks), model=model, dense=dense, meta=dict(d.get("meta") or {}))

    @classmethod
    def from_json(cls, text: str) -> "Spec":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"not valid JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def load(cls, path) -> "Spec":
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())

    # ---- output ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT, "model": self.model}
        if self.dense is not None:
            d["dense"] = self.dense.to_dict()
        d["blocks"] = [
            {"heads": [{"index": h.index, "qk": list(h.qk), "v": list(h.v)} for h in b.heads],
             "mlp": list(b.mlp)}
            for b in self.blocks]
        if self.meta:
            d["meta"] = dict(self.meta)
        return d

    def to_json(self) -> str:
        """Readable JSON: one line per block, so a spec can be diffed and edited by hand."""
        d = self.to_dict()
        blocks = d.pop("blocks")
        lines = ["{"]
        for k, v in d.items():
            lines.append(f"  {json.dumps(k)}: {json.dumps(v)},")
        lines.append('  "blocks": [')
        for i, b in enumerate(blocks):
            lines.append("    " + json.dumps(b) + ("," if i < len(blocks) - 1 else ""))
        lines.append("  ]")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())

    # ---- checks and helpers --------------------------------------------------------------
    def check_geometry(self, g: Geometry, model: str | None = None) -> None:
        """Raise :class:`SpecError` unless this spec fits a dense model of geometry ``g``."""
        if model is not None and self.model is not None and _base_name(model) != _base_name(self.model):
            raise SpecError(f"spec is for model {self.model!r}, not {model!r}")
        if len(self.blocks) != g.depth:
            raise SpecError(f"spec has {len(self.blocks)} blocks, the model has {g.depth}")
        for b, blk in enumerate(self.blocks):
            for h, head in enumerate(blk.heads):
                if head.index >= g.num_heads:
                    raise SpecError(f"blocks[{b}].heads[{h}].index: {head.index} out of range "
                                    f"[0, {g.num_heads})")
                for name in ("qk", "v"):
                    idx = getattr(head, name)
                    if idx and idx[-1] >= g.head_dim:
                        raise SpecError(f"blocks[{b}].heads[{h}].{name}: index {idx[-1]} out of "
                                        f"range [0, {g.head_dim})")
            if blk.mlp and blk.mlp[-1] >= g.mlp_hidden:
                raise SpecError(f"blocks[{b}].mlp: index {blk.mlp[-1]} out of range "
                                f"[0, {g.mlp_hidden})")

    def with_dense(self, g: Geometry, model: str | None = None) -> "Spec":
        self.check_geometry(g, model)
        return Spec(self.blocks, model=self.model or model, dense=g, meta=self.meta)

    def summary(self) -> dict[str, int]:
        return {
            "heads": sum(len(b.heads) for b in self.blocks),
            "qk_dims": sum(sum(b.qk_dims) for b in self.blocks),
            "v_dims": sum(sum(b.v_dims) for b in self.blocks),
            "mlp_neurons": sum(len(b.mlp) for b in self.blocks),
            "attn_blocks": sum(b.has_attn for b in self.blocks),
            "mlp_blocks": sum(b.has_mlp for b in self.blocks),
        }

    def __len__(self) -> int:
        return len(self.blocks)


def _base_name(name: str) -> str:
    # timm names may carry a pretrained tag ("deit_small_patch16_224.fb_in1k")
    return name.split(".")[0]


def make_block(heads: Iterable[tuple[int, Sequence[int], Sequence[int]]], mlp: Sequence[int]) -> Block:
    """Convenience constructor: ``make_block([(0, qk, v), ...], mlp)`` with sorted tuples."""
    hs = tuple(sorted((Head(int(i), tuple(sorted(map(int, qk))), tuple(sorted(map(int, v))))
                       for i, qk, v in heads), key=lambda h: h.index))
    return Block(hs, tuple(sorted(map(int, mlp))))
