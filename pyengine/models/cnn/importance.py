"""The importance units of a block-structured CNN, for :mod:`pyengine.methods.criteria`: per
block, the units of its slot (every row and column of every layer that makes, maps or reads
the unit's channels, and its feature: the gated activation the slot's gate multiplies) and,
for a residual block, its whole branch (all its layers; its output before the add). What each
block type owns is its twin's ``units()`` (``models/<family>/blocks.py``)."""
from __future__ import annotations

from torch import nn

from pyengine.models.cnn.family import PrunableBlock
from pyengine.models.resnet.importance import ConvBlockScores

__all__ = ["BlockUnits"]


class BlockUnits:
    """The importance units of every block of a (dense or gated) model of ``family``."""

    channels_last = True  # conv features are [B, C, H, W]: calibration moves C last

    def __init__(self, model: nn.Module, family):
        self.blocks, self.views, self.infos = [], [], []
        for where, r in family.refs(model):
            blk = r.get()
            if isinstance(blk, PrunableBlock) and blk.gates is None:
                raise TypeError(f"{where} is compact; compact models cannot be scored (score the "
                                "dense or gated model)")
            t = family.twin(blk, where)
            info = blk.info if isinstance(blk, PrunableBlock) else t.describe(blk, where)
            view = blk if isinstance(blk, PrunableBlock) else (
                t.of(blk, info) if info.slot or info.removable else None)
            self.blocks.append(blk)
            self.views.append(view.units() if view is not None else ([], {}, []))
            self.infos.append(info)

    def hooks(self, i: int):
        return self.views[i][0]

    def layers(self, i: int):
        return self.views[i][1]

    def groups(self, i: int):
        return self.views[i][2]

    def assemble(self, i: int, values: dict) -> ConvBlockScores:
        info = self.infos[i]
        return ConvBlockScores({info.slot: values[info.slot]} if info.slot else {},
                               float(values.get("block", 0.0)))
