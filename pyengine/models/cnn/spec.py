"""The spec of a CNN made of residual-style blocks with one prunable channel slot per block
(ConvNeXt, EfficientNet / MobileNetV3, RegNet): the ResNet :class:`~pyengine.structure.spec.
CnnSpec` style, with the family named in the JSON::

    {"format": "pyengine.spec/1", "family": "regnet", "model": "regnety_002", "dense": {...},
     "stages": [
       [{"keep": true, "channels": {"mid": [0, 1, 2, 3, 4, 5, 6, 7, 24, 25, ...]}},
        {"keep": false, "channels": {}}],
       ...
     ]}

``stages[s][b]`` is block ``b`` of stage ``s`` of the timm model (the family says which
modules those are). ``channels`` lists, for the block's one prunable slot, the kept channel
indices of the dense block (ConvNeXt ``mlp``: the hidden channels of ``mlp.fc1``;
EfficientNet ``mid``: the expanded channels; RegNet ``mid``: the bottleneck channels, in
whole groups of its group conv). A block without a prunable slot has ``"channels": {}``. A
kept block keeps at least one channel. ``"keep": false`` removes the block's residual
branch, which only a block with a residual connection allows (``dense.blocks[i].removable``).

``dense`` is the geometry of the dense model (:class:`BlockGeometry`): blocks per stage and,
per block, its slot, dense channels, channels per unit (``group``: a grouped conv keeps
whole groups) and whether it can be removed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from pyengine.structure.spec import (FORMAT, ConvBlock, SpecError, _base_name, _index_list,
                                     _JsonFile, make_conv_block)

__all__ = ["SlotBlock", "BlockGeometry", "BlockSpec"]


@dataclass(frozen=True)
class SlotBlock:
    """One dense block: its prunable channel slot (None: nothing to prune inside), the slot's
    dense channels, channels per unit (a grouped conv's group width, else 1), and whether its
    residual branch can be removed."""

    slot: str | None
    channels: int = 0
    group: int = 1
    removable: bool = False

    @property
    def units(self) -> int:
        """Prunable units of the slot (channels, or groups of a grouped conv)."""
        return self.channels // self.group if self.slot else 0

    def to_dict(self) -> dict[str, Any]:
        return {"slot": self.slot, "channels": self.channels, "group": self.group,
                "removable": self.removable}


@dataclass(frozen=True)
class BlockGeometry:
    """Shape of the dense model a :class:`BlockSpec` refers to. ``img_size`` (the cost
    model's input side; 0: unknown) and ``kwargs`` (the timm kwargs the cost model rebuilds
    the network with) are not architecture and do not take part in comparisons."""

    layers: tuple[int, ...]
    blocks: tuple[SlotBlock, ...]
    in_chans: int = 3
    num_classes: int = 0
    img_size: int = field(default=0, compare=False)
    kwargs: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        n = sum(self.layers)
        if len(self.blocks) != n:
            raise SpecError(f"dense: layers {list(self.layers)} make {n} blocks, but 'blocks' "
                            f"has {len(self.blocks)} entries")
        for i, b in enumerate(self.blocks):
            if b.slot is None:
                continue
            if not isinstance(b.channels, int) or b.channels <= 0 or not isinstance(
                    b.group, int) or b.group <= 0 or b.channels % b.group:
                raise SpecError(f"dense.blocks[{i}]: {b.channels} channels do not split into "
                                f"groups of {b.group}")

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "blocks": [b.to_dict() for b in self.blocks],
                "in_chans": self.in_chans, "num_classes": self.num_classes,
                "img_size": self.img_size, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BlockGeometry":
        if not isinstance(d, Mapping):
            raise SpecError(f"dense: expected an object, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise SpecError(f"dense: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        try:
            kw = dict(d)
            kw["layers"] = tuple(int(x) for x in kw["layers"])
            blocks = []
            for i, b in enumerate(kw["blocks"]):
                if not isinstance(b, Mapping) or set(b) - {"slot", "channels", "group",
                                                           "removable"}:
                    raise SpecError(f"dense.blocks[{i}]: expected an object with 'slot', "
                                    f"'channels', 'group', 'removable', got {b!r}")
                blocks.append(SlotBlock(b.get("slot"), int(b.get("channels", 0)),
                                        int(b.get("group", 1)), bool(b.get("removable"))))
            kw["blocks"] = tuple(blocks)
            kw["kwargs"] = dict(kw.get("kwargs") or {})
            return cls(**kw)
        except SpecError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise SpecError(f"dense: {e!r}") from None


@dataclass(frozen=True)
class BlockSpec(_JsonFile):
    """What a pruned block-structured CNN keeps (see the module docstring for the JSON form).
    Each family subclasses it (``family`` and ``geometry_type``) and registers it with
    :func:`pyengine.structure.spec.register_spec_type`."""

    stages: tuple[tuple[ConvBlock, ...], ...]
    model: str | None = None
    dense: BlockGeometry | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    family = "cnn"                 # set by register_spec_type
    geometry_type = BlockGeometry  # the family's geometry subclass

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
                            "one channel; set \"keep\": false to remove a residual block")
        if self.dense is not None:
            if not isinstance(self.dense, self.geometry_type):
                raise SpecError(f"a {self.family} spec needs a {self.geometry_type.__name__}, "
                                f"got {type(self.dense).__name__}")
            self.check_geometry(self.dense)

    @property
    def blocks(self) -> tuple[ConvBlock, ...]:
        """All blocks, stage by stage."""
        return tuple(b for st in self.stages for b in st)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def full(cls, dense: BlockGeometry, model: str | None = None) -> "BlockSpec":
        """The spec of the unpruned model: every block and channel kept."""
        it = iter(dense.blocks)
        stages = []
        for n in dense.layers:
            st = []
            for _ in range(n):
                b = next(it)
                st.append(make_conv_block(True, **({b.slot: range(b.channels)} if b.slot
                                                   else {})))
            stages.append(tuple(st))
        return cls(tuple(stages), model=model, dense=dense)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BlockSpec":
        if not isinstance(d, Mapping):
            raise SpecError(f"a spec is a JSON object, got {type(d).__name__}")
        fmt = d.get("format", FORMAT)
        if fmt != FORMAT:
            raise SpecError(f"unsupported spec format {fmt!r}; this pyengine reads {FORMAT!r}")
        if d.get("family", cls.family) != cls.family:
            raise SpecError(f"this is a {d.get('family')!r} spec, not a {cls.family!r} one")
        unknown = set(d) - {"format", "family", "model", "dense", "stages", "meta"}
        if unknown:
            raise SpecError(f"unknown top-level field(s) {sorted(unknown)} in a {cls.family} "
                            "spec")
        if not isinstance(d.get("stages"), list):
            raise SpecError(f"a {cls.family} spec needs a 'stages' list (one list of blocks "
                            "per stage)")
        dense = cls.geometry_type.from_dict(d["dense"]) if d.get("dense") is not None else None
        stages = []
        for s, st in enumerate(d["stages"]):
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
                    raise SpecError(f"{where}.channels: expected an object {{slot: [...]}}")
                chans = tuple((name, _index_list(ch[name], f"{where}.channels.{name}", None))
                              for name in sorted(ch)) if keep else ()
                blocks.append(ConvBlock(keep, chans))
            stages.append(tuple(blocks))
        model = d.get("model")
        if model is not None and not isinstance(model, str):
            raise SpecError(f"model: expected a timm model name, got {model!r}")
        return cls(tuple(stages), model=model, dense=dense, meta=dict(d.get("meta") or {}))

    # ---- output ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT, "family": self.family, "model": self.model}
        if self.dense is not None:
            d["dense"] = self.dense.to_dict()
        d["stages"] = [[{"keep": b.keep, "channels": {n: list(i) for n, i in b.channels}}
                        for b in st] for st in self.stages]
        if self.meta:
            d["meta"] = dict(self.meta)
        return d

    def to_json(self) -> str:
        """Readable JSON: one line per block."""
        d = self.to_dict()
        stages = d.pop("stages")
        lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in d.items()]
        lines.append('  "stages": [')
        for s, st in enumerate(stages):
            lines.append("    [")
            for b, blk in enumerate(st):
                lines.append("      " + json.dumps(blk) + ("," if b < len(st) - 1 else ""))
            lines.append("    ]" + ("," if s < len(stages) - 1 else ""))
        lines += ["  ]", "}"]
        return "\n".join(lines) + "\n"

    # ---- checks and helpers --------------------------------------------------------------
    def check_geometry(self, g: BlockGeometry, model: str | None = None) -> None:
        """Raise :class:`SpecError` unless this spec fits a dense model of geometry ``g``."""
        if model is not None and self.model is not None and \
                _base_name(model) != _base_name(self.model):
            raise SpecError(f"spec is for model {self.model!r}, not {model!r}")
        if tuple(len(st) for st in self.stages) != tuple(g.layers):
            raise SpecError(f"spec has blocks per stage {[len(st) for st in self.stages]}, the "
                            f"model has {list(g.layers)}")
        it = iter(g.blocks)
        for s, st in enumerate(self.stages):
            for b, blk in enumerate(st):
                info, where = next(it), f"stages[{s}][{b}]"
                if not blk.keep:
                    if not info.removable:
                        raise SpecError(f"{where}: this block has no residual connection, so it "
                                        "cannot be removed (\"keep\" must be true)")
                    continue
                names = [n for n, _ in blk.channels]
                want = [info.slot] if info.slot else []
                if names != want:
                    raise SpecError(f"{where}.channels: this block's prunable slots are {want}, "
                                    f"got {names}")
                for name, idx in blk.channels:
                    if idx[-1] >= info.channels:
                        raise SpecError(f"{where}.channels.{name}: index {idx[-1]} out of range "
                                        f"[0, {info.channels})")
                    if info.group > 1:
                        _check_groups(idx, info.group, f"{where}.channels.{name}")

    def with_dense(self, g: BlockGeometry, model: str | None = None) -> "BlockSpec":
        self.check_geometry(g, model)
        return type(self)(self.stages, model=self.model or model, dense=g, meta=self.meta)

    def summary(self) -> dict[str, int]:
        out = {"blocks": sum(b.keep for b in self.blocks)}
        for b in self.blocks:
            for name, idx in b.channels:
                out[f"{name}_channels"] = out.get(f"{name}_channels", 0) + len(idx)
        return out

    def __len__(self) -> int:
        return len(self.blocks)


def _check_groups(idx: tuple[int, ...], group: int, where: str) -> None:
    kept = set(idx)
    for c in idx:
        g = c // group
        whole = range(g * group, (g + 1) * group)
        if not kept.issuperset(whole):
            missing = sorted(set(whole) - kept)
            raise SpecError(f"{where}: group {g} (channels {whole.start}-{whole.stop - 1}) is "
                            f"kept only in part (missing {missing[:4]}); a grouped conv keeps "
                            "whole groups")
