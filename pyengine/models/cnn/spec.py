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

from dataclasses import dataclass, field
from typing import Any, Mapping

from pyengine.structure.spec import (ConvBlock, SpecError, StageSpecBase, dense_fields,
                                     make_conv_block)

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
        kw = dense_fields(cls, d)
        try:
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
class BlockSpec(StageSpecBase):
    """What a pruned block-structured CNN keeps (see the module docstring for the JSON form).
    Each family subclasses it (``family`` and ``geometry_type``) and registers it with
    :func:`pyengine.structure.spec.register_spec_type`."""

    stages: tuple[tuple[ConvBlock, ...], ...]
    model: str | None = None
    dense: BlockGeometry | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    family = "cnn"                 # set by register_spec_type
    geometry_type = BlockGeometry  # the family's geometry subclass

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

    def check_geometry(self, g: BlockGeometry, model: str | None = None) -> None:
        """Raise :class:`SpecError` unless this spec fits a dense model of geometry ``g``."""
        self._check_stages(g, model)
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
