"""The structure spec: what a pruned model keeps, per layer, as plain validated JSON.

Every other part of pyengine (gates, apply, compile, cost, save/load, CLI) reads structure
from a :class:`Spec` and from nothing else. Indices always refer to the dense model: head
index within the layer, dimension index within the head, neuron index within the FFN.

CNNs (timm ResNets: BasicBlock and Bottleneck) use :class:`CnnSpec`, the same JSON style with
their own units; ``Spec.from_json`` returns one when the object has ``stages``::

    {"format": "pyengine.spec/1", "model": "resnet50", "dense": {...},
     "stages": [
       [{"keep": true, "channels": {"conv1": [0, 5, 9], "conv2": [1, 2, 3]}},
        {"keep": false, "channels": {}}],
       ...
     ]}

``stages[s][b]`` is ``layer{s+1}[b]`` of the timm model. ``channels`` lists, per inner conv of
the block, the kept *output* channels of that conv (indices into the dense conv): ``conv1`` for
a BasicBlock; ``conv1`` and ``conv2`` for a Bottleneck (its conv3 output is the residual
stream, which is not pruned). A kept block must keep at least one channel of each inner conv.
``"keep": false`` removes the residual *branch* (every conv/BN before the add); the shortcut
stays: the identity, or the block's downsample conv+BN (its output has another shape, so it
cannot go), followed by the block's final activation. In a ReLU ResNet the input of a block
without downsample is already >= 0, so such a removed block is exactly the identity and
compiles to ``nn.Identity``. Channel lists of a removed block are ignored (stored empty).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping, Sequence

FORMAT = "pyengine.spec/1"


class SpecError(ValueError):
    """A spec that is malformed or does not fit the model it is used with."""


def _meta(d: Mapping[str, Any]) -> dict:
    """A spec's free-form ``meta``: a JSON object (or absent)."""
    meta = d.get("meta")
    if meta is not None and not isinstance(meta, Mapping):
        raise SpecError(f"meta: expected a JSON object, got {meta!r}")
    return dict(meta or {})


def dense_fields(cls, d: Any) -> dict[str, Any]:
    """A copy of ``d``, a spec's ``dense`` object for the geometry dataclass ``cls``, once its
    field names are checked."""
    if not isinstance(d, Mapping):
        raise SpecError(f"dense: expected an object, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise SpecError(f"dense: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    return dict(d)


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
        kw = dense_fields(cls, d)
        try:
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


# Spec types of further model families, by the "family" key their JSON carries; ViT specs
# (no key, "blocks") and ResNet specs (no key, "stages") are read without one.
SPEC_TYPES: dict[str, type] = {}


def register_spec_type(family: str):
    """Class decorator for a model family's own spec type (a frozen dataclass with
    ``from_dict``/``to_dict``/``to_json``/``check_geometry``/``full``): ``Spec.from_json`` and
    ``pyengine.load`` return it when the JSON says ``"family": family``; its ``to_dict`` must
    write that key."""
    def deco(cls):
        SPEC_TYPES[family] = cls
        cls.family = family
        return cls
    return deco


class _JsonFile:
    """Reading and writing a spec as JSON text or a file; ``from_dict`` validates."""

    @classmethod
    def from_json(cls, text: str):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"not valid JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())


class SpecBase(_JsonFile):
    """What every spec type shares: its top-level JSON (``format``, ``family``, ``model``,
    ``dense``, the structure list ``_body``, ``meta``) read with validation and written
    back, the structure one line per block. A subclass is a frozen dataclass with the
    fields (``_body``, model, dense, meta) and a ``check_geometry``."""

    family: str | None = None   # a registered family's key, written in its JSON (None: ViT, ResNet)
    geometry_type: Any = None   # the class of ``dense``
    _body = "blocks"            # the JSON key of the structure list ...
    _depth = 1                  # ... a list of blocks (1) or of stages of blocks (2)
    _body_help = "one entry per transformer block"
    _label: str | None = None   # what errors call a spec of this type without a family

    @classmethod
    def _kind(cls) -> str:
        name = cls.family or cls._label
        return f"a {name} spec" if name else "a spec"

    def _check_dense(self) -> None:
        if self.dense is None:
            return
        if self.geometry_type is not None and not isinstance(self.dense, self.geometry_type):
            raise SpecError(f"{self._kind()} needs a {self.geometry_type.__name__} as dense, "
                            f"got {type(self.dense).__name__}")
        self.check_geometry(self.dense)

    def _check_model(self, model: str | None) -> None:
        if model is not None and self.model is not None and \
                _base_name(model) != _base_name(self.model):
            raise SpecError(f"spec is for model {self.model!r}, not {model!r}")

    # ---- reading -----------------------------------------------------------------------
    @classmethod
    def _read(cls, d: Any) -> tuple[list, Any]:
        """Validate the top level of ``d``: its structure list and its dense geometry (or
        None)."""
        if not isinstance(d, Mapping):
            raise SpecError(f"a spec is a JSON object, got {type(d).__name__}")
        if cls.family is not None and d.get("family") != cls.family:
            raise SpecError(f"{cls._kind()} needs \"family\": \"{cls.family}\", got "
                            f"{d.get('family')!r}")
        fmt = d.get("format", FORMAT)
        if fmt != FORMAT:
            raise SpecError(f"unsupported spec format {fmt!r}; this pyengine reads {FORMAT!r}")
        known = {"format", "model", "dense", cls._body, "meta"}
        unknown = set(d) - known - ({"family"} if cls.family is not None else set())
        if unknown:
            raise SpecError(f"unknown top-level field(s) {sorted(unknown)} in {cls._kind()}")
        if not isinstance(d.get(cls._body), list):
            raise SpecError(f"{cls._kind()} needs a '{cls._body}' list ({cls._body_help})")
        dense = cls.geometry_type.from_dict(d["dense"]) if d.get("dense") is not None else None
        return d[cls._body], dense

    @classmethod
    def _make(cls, d: Mapping[str, Any], body: tuple, dense: Any):
        model = d.get("model")
        if model is not None and not isinstance(model, str):
            raise SpecError(f"model: expected a timm model name, got {model!r}")
        return cls(body, model=model, dense=dense, meta=_meta(d))

    # ---- output ------------------------------------------------------------------------
    def _body_json(self) -> list:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT}
        if self.family is not None:
            d["family"] = self.family
        d["model"] = self.model
        if self.dense is not None:
            d["dense"] = self.dense.to_dict()
        d[self._body] = self._body_json()
        if self.meta:
            d["meta"] = dict(self.meta)
        return d

    def to_json(self) -> str:
        """Readable JSON: one line per block, so a spec can be diffed and edited by hand."""
        d = self.to_dict()
        body = d.pop(self._body)
        lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in d.items()]
        lines.append(f"  {json.dumps(self._body)}: [")
        lines += _json_rows(body, "    ", self._depth)
        lines += ["  ]", "}"]
        return "\n".join(lines) + "\n"

    def with_dense(self, g, model: str | None = None):
        self.check_geometry(g, model)
        return type(self)(getattr(self, self._body), model=self.model or model, dense=g,
                          meta=self.meta)

    def __len__(self) -> int:
        return len(self.blocks)


def _json_rows(items: list, indent: str, depth: int) -> list[str]:
    """One line per item of ``items`` (a nested list of ``depth`` levels)."""
    out = []
    for i, x in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        if depth > 1:
            out += [indent + "[", *_json_rows(x, indent + "  ", depth - 1), indent + "]" + comma]
        else:
            out.append(indent + json.dumps(x) + comma)
    return out


class HeadSpecBase(SpecBase):
    """Specs of transformer blocks (``blocks``: kept heads with their q/k and value dims, and
    kept FFN neurons), ViT's :class:`Spec` and the EVA / BEiT / Swin families': their checks,
    JSON and summary. A subclass says how large each dense block is (:meth:`_sizes`)."""

    @classmethod
    def _sizes(cls, dense) -> list[tuple[int, int, int]]:
        """(heads, head_dim, FFN neurons) of every block of the dense model ``dense``."""
        raise NotImplementedError

    def __post_init__(self):
        object.__setattr__(self, "blocks", tuple(self.blocks))
        for b, blk in enumerate(self.blocks):
            if not isinstance(blk, Block):
                raise SpecError(f"blocks[{b}]: expected a Block, got {type(blk).__name__}")
            for h, head in enumerate(blk.heads):
                if len(head.v) == 0:
                    raise SpecError(
                        f"blocks[{b}].heads[{h}] (head {head.index}) keeps no value dims: it adds "
                        "nothing to the output; drop the head from the list instead")
            idx = [head.index for head in blk.heads]
            if len(set(idx)) != len(idx):
                raise SpecError(f"blocks[{b}].heads: duplicate head index in {idx}")
        self._check_dense()

    @classmethod
    def full(cls, dense, model: str | None = None):
        """The spec of the unpruned model: everything kept."""
        blocks = []
        for nh, hd, nm in cls._sizes(dense):
            dims = tuple(range(hd))
            blocks.append(Block(tuple(Head(h, dims, dims) for h in range(nh)),
                                tuple(range(nm))))
        return cls(tuple(blocks), model=model, dense=dense)

    @classmethod
    def _read_blocks(cls, items: list, sizes: list | None) -> tuple[Block, ...]:
        """The ``blocks`` list of a spec's JSON, checked against per-block ``sizes`` (see
        :meth:`_sizes`; None: unknown)."""
        blocks = []
        for b, bd in enumerate(items):
            where = f"blocks[{b}]"
            nh, hd, nm = sizes[b] if sizes is not None else (None, None, None)
            if not isinstance(bd, Mapping):
                raise SpecError(f"{where}: expected an object with 'heads' and 'mlp'")
            unknown = set(bd) - {"heads", "mlp"}
            if unknown:
                raise SpecError(f"{where}: unknown field(s) {sorted(unknown)}")
            if "heads" not in bd or "mlp" not in bd:
                raise SpecError(f"{where}: needs both 'heads' and 'mlp' ([] removes the branch)")
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
        return tuple(blocks)

    def _body_json(self) -> list:
        return [{"heads": [{"index": h.index, "qk": list(h.qk), "v": list(h.v)}
                           for h in b.heads], "mlp": list(b.mlp)} for b in self.blocks]

    def _check_sizes(self, g, model: str | None) -> None:
        """Raise :class:`SpecError` unless every index of this spec is inside the blocks of
        the dense model ``g``."""
        self._check_model(model)
        sizes = self._sizes(g)
        if len(self.blocks) != len(sizes):
            raise SpecError(f"spec has {len(self.blocks)} blocks, the model has {len(sizes)}")
        for b, (blk, (nh, hd, nm)) in enumerate(zip(self.blocks, sizes)):
            for h, head in enumerate(blk.heads):
                where = f"blocks[{b}].heads[{h}]"
                if head.index >= nh:
                    raise SpecError(f"{where}.index: {head.index} out of range [0, {nh})")
                for name in ("qk", "v"):
                    idx = getattr(head, name)
                    if idx and idx[-1] >= hd:
                        raise SpecError(f"{where}.{name}: index {idx[-1]} out of range "
                                        f"[0, {hd})")
            if blk.mlp and blk.mlp[-1] >= nm:
                raise SpecError(f"blocks[{b}].mlp: index {blk.mlp[-1]} out of range [0, {nm})")

    def summary(self) -> dict[str, int]:
        return {
            "heads": sum(len(b.heads) for b in self.blocks),
            "qk_dims": sum(sum(b.qk_dims) for b in self.blocks),
            "v_dims": sum(sum(b.v_dims) for b in self.blocks),
            "mlp_neurons": sum(len(b.mlp) for b in self.blocks),
            "attn_blocks": sum(b.has_attn for b in self.blocks),
            "mlp_blocks": sum(b.has_mlp for b in self.blocks),
        }


@dataclass(frozen=True)
class Spec(HeadSpecBase):
    """What a pruned ViT keeps. Build with :meth:`from_json`, :meth:`from_dict`, :meth:`full`
    or ``pyengine.spec(model)``; all of them validate."""

    blocks: tuple[Block, ...]
    model: str | None = None
    dense: Geometry | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    geometry_type = Geometry

    @classmethod
    def _sizes(cls, dense: Geometry) -> list[tuple[int, int, int]]:
        return [(dense.num_heads, dense.head_dim, dense.mlp_hidden)] * dense.depth

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Spec":
        """Validate a ViT spec; a CNN spec (it has ``stages``) comes back as a :class:`CnnSpec`,
        one with a ``family`` as that family's spec type."""
        if cls is Spec and isinstance(d, Mapping):
            family = d.get("family")
            if family is not None:
                if family not in SPEC_TYPES:
                    from pyengine.models.base import adapters
                    adapters()  # the families register their spec types on import
                if family not in SPEC_TYPES:
                    raise SpecError(f"unknown spec family {family!r}; known: "
                                    f"{', '.join(sorted(SPEC_TYPES))}")
                return SPEC_TYPES[family].from_dict(d)  # type: ignore[return-value]
            if "stages" in d:
                return CnnSpec.from_dict(d)  # type: ignore[return-value]
        items, dense = cls._read(d)
        if dense is not None and len(items) != dense.depth:
            raise SpecError(f"spec has {len(items)} blocks but dense.depth is {dense.depth}")
        sizes = cls._sizes(dense) if dense is not None else None
        return cls._make(d, cls._read_blocks(items, sizes), dense)

    def check_geometry(self, g: Geometry, model: str | None = None) -> None:
        """Raise :class:`SpecError` unless this spec fits a dense model of geometry ``g``."""
        self._check_sizes(g, model)


def _base_name(name: str) -> str:
    # timm names may carry a pretrained tag ("deit_small_patch16_224.fb_in1k")
    return name.split(".")[0]


def make_block(heads: Iterable[tuple[int, Sequence[int], Sequence[int]]], mlp: Sequence[int]) -> Block:
    """Convenience constructor: ``make_block([(0, qk, v), ...], mlp)`` with sorted tuples."""
    hs = tuple(sorted((Head(int(i), tuple(sorted(map(int, qk))), tuple(sorted(map(int, v))))
                       for i, qk, v in heads), key=lambda h: h.index))
    return Block(hs, tuple(sorted(map(int, mlp))))


# ------------------------------------------------------------------------------------------
# CNNs (timm ResNets)
# ------------------------------------------------------------------------------------------

CNN_BLOCK_SLOTS = {"basic": ("conv1",), "bottleneck": ("conv1", "conv2")}


@dataclass(frozen=True)
class CnnGeometry:
    """Shape of the dense ResNet a :class:`CnnSpec` refers to.

    ``inner[i]`` holds the dense channel counts of the prunable inner convs of block ``i``
    (blocks numbered stage by stage), ``downsample[i]`` whether it has a downsample shortcut;
    ``img_size`` is the input side the cost model assumes (0: unknown).
    """

    block: str
    layers: tuple[int, ...]
    inner: tuple[tuple[int, ...], ...]
    downsample: tuple[bool, ...]
    in_chans: int = 3
    num_classes: int = 0
    img_size: int = field(default=0, compare=False)  # a cost-model input, not architecture
    arch: str = "resnet"

    def __post_init__(self):
        if self.block not in CNN_BLOCK_SLOTS:
            raise SpecError(f"dense.block must be one of {sorted(CNN_BLOCK_SLOTS)}, got "
                            f"{self.block!r}")
        n = sum(self.layers)
        if len(self.inner) != n or len(self.downsample) != n:
            raise SpecError(f"dense: layers {list(self.layers)} make {n} blocks, but inner has "
                            f"{len(self.inner)} and downsample {len(self.downsample)} entries")
        k = len(CNN_BLOCK_SLOTS[self.block])
        for i, c in enumerate(self.inner):
            if len(c) != k or any(not isinstance(x, int) or x <= 0 for x in c):
                raise SpecError(f"dense.inner[{i}]: expected {k} positive channel counts, got "
                                f"{list(c)}")

    @property
    def slots(self) -> tuple[str, ...]:
        return CNN_BLOCK_SLOTS[self.block]

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "block": self.block, "layers": list(self.layers),
                "inner": [list(c) for c in self.inner], "downsample": list(self.downsample),
                "in_chans": self.in_chans, "num_classes": self.num_classes,
                "img_size": self.img_size}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CnnGeometry":
        kw = dense_fields(cls, d)
        try:
            kw["layers"] = tuple(int(x) for x in kw["layers"])
            kw["inner"] = tuple(tuple(int(x) for x in c) for c in kw["inner"])
            kw["downsample"] = tuple(bool(x) for x in kw["downsample"])
            return cls(**kw)
        except SpecError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise SpecError(f"dense: {e!r}") from None


@dataclass(frozen=True)
class ConvBlock:
    """One residual block: whether its branch survives, and the kept output channels of each
    inner conv (``channels`` is a tuple of ``(conv name, kept indices)``, sorted by name)."""

    keep: bool
    channels: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def kept(self, slot: str) -> tuple[int, ...]:
        return dict(self.channels).get(slot, ())


class StageSpecBase(SpecBase):
    """Specs of CNNs of residual-style blocks (``stages``: per block whether its branch stays
    and the kept channels of its prunable convs), the ResNet's :class:`CnnSpec` and the
    block-structured families': their checks, JSON and summary."""

    _body = "stages"
    _depth = 2
    _body_help = "one list of blocks per stage"

    def __post_init__(self):
        # a removed block keeps nothing: one spelling per structure
        stages = tuple(tuple(b if b.keep else ConvBlock(False, ()) for b in st)
                       for st in self.stages)
        object.__setattr__(self, "stages", stages)
        for s, st in enumerate(stages):
            for b, blk in enumerate(st):
                for name, idx in blk.channels:
                    if len(idx) == 0:
                        raise SpecError(
                            f"stages[{s}][{b}].channels.{name}: a kept block keeps at least "
                            "one channel of each prunable conv; set \"keep\": false to remove "
                            "its residual branch")
        self._check_dense()

    @property
    def blocks(self) -> tuple[ConvBlock, ...]:
        """All residual blocks, stage by stage."""
        return tuple(b for st in self.stages for b in st)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        items, dense = cls._read(d)
        stages = []
        for s, st in enumerate(items):
            if not isinstance(st, list):
                raise SpecError(f"stages[{s}]: expected a list of blocks, got "
                                f"{type(st).__name__}")
            blocks = []
            for b, bd in enumerate(st):
                where = f"stages[{s}][{b}]"
                if not isinstance(bd, Mapping):
                    raise SpecError(f"{where}: expected an object with 'keep' and 'channels'")
                unknown = set(bd) - {"keep", "channels"}
                if unknown:
                    raise SpecError(f"{where}: unknown field(s) {sorted(unknown)}")
                keep = bd.get("keep")
                if not isinstance(keep, bool):
                    raise SpecError(f"{where}.keep: expected true or false, got {keep!r}")
                ch = bd.get("channels", {})
                if not isinstance(ch, Mapping):
                    raise SpecError(f"{where}.channels: expected an object "
                                    "{conv name: [kept channels]}")
                chans = tuple((name, _index_list(ch[name], f"{where}.channels.{name}", None))
                              for name in sorted(ch)) if keep else ()
                blocks.append(ConvBlock(keep, chans))
            stages.append(tuple(blocks))
        return cls._make(d, tuple(stages), dense)

    def _body_json(self) -> list:
        return [[{"keep": b.keep, "channels": {n: list(i) for n, i in b.channels}}
                 for b in st] for st in self.stages]

    def _check_stages(self, g, model: str | None) -> None:
        """The checks every CNN spec makes first: the model name, blocks per stage."""
        self._check_model(model)
        if tuple(len(st) for st in self.stages) != tuple(g.layers):
            raise SpecError(f"spec has blocks per stage {[len(st) for st in self.stages]}, the "
                            f"model has {list(g.layers)}")

    def summary(self) -> dict[str, int]:
        out = {"blocks": sum(b.keep for b in self.blocks)}
        for b in self.blocks:
            for name, idx in b.channels:
                out[f"{name}_channels"] = out.get(f"{name}_channels", 0) + len(idx)
        return out


@dataclass(frozen=True)
class CnnSpec(StageSpecBase):
    """What a pruned ResNet keeps (see the module docstring for the JSON form)."""

    stages: tuple[tuple[ConvBlock, ...], ...]
    model: str | None = None
    dense: CnnGeometry | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    geometry_type = CnnGeometry
    _label = "CNN"

    @classmethod
    def full(cls, dense: CnnGeometry, model: str | None = None) -> "CnnSpec":
        it = iter(dense.inner)
        stages = tuple(
            tuple(make_conv_block(True, **{n: range(c) for n, c in zip(dense.slots, next(it))})
                  for _ in range(n))
            for n in dense.layers)
        return cls(stages, model=model, dense=dense)

    def check_geometry(self, g: CnnGeometry, model: str | None = None) -> None:
        """Raise :class:`SpecError` unless this spec fits a dense ResNet of geometry ``g``."""
        self._check_stages(g, model)
        for i, (s, b, blk) in enumerate((s, b, blk) for s, st in enumerate(self.stages)
                                        for b, blk in enumerate(st)):
            if not blk.keep:
                continue
            names = [n for n, _ in blk.channels]
            if sorted(names) != sorted(g.slots):
                raise SpecError(f"stages[{s}][{b}].channels: a {g.block} block has "
                                f"{list(g.slots)}, got {names}")
            for name, idx in blk.channels:
                c = g.inner[i][g.slots.index(name)]
                if idx and idx[-1] >= c:
                    raise SpecError(f"stages[{s}][{b}].channels.{name}: index {idx[-1]} out of "
                                    f"range [0, {c})")


def make_conv_block(keep: bool, **channels) -> ConvBlock:
    """``make_conv_block(True, conv1=[...], conv2=[...])``, index tuples sorted."""
    if not keep:
        return ConvBlock(False, ())
    return ConvBlock(True, tuple((n, tuple(sorted(map(int, channels[n])))) for n in sorted(channels)))
