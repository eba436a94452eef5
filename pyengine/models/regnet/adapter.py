"""The adapter of timm RegNetX / RegNetY models: per block, the bottleneck channels in whole
groups of its group conv (``mid``) and the whole residual branch (:mod:`.blocks`); everything
else is :mod:`pyengine.models.cnn`'s."""
from __future__ import annotations

from dataclasses import dataclass

from pyengine.models.base import register_adapter
from pyengine.models.cnn.adapter import BlockAdapter
from pyengine.models.cnn.spec import BlockGeometry, BlockSpec
from pyengine.models.regnet.blocks import SUPPORTED, RegNetFamily
from pyengine.structure.spec import register_spec_type


@dataclass(frozen=True)
class RegNetGeometry(BlockGeometry):
    """The dense shape of a timm RegNet (see :class:`~pyengine.models.cnn.spec.BlockGeometry`;
    a block's ``group`` is its group conv's group width)."""


@register_spec_type("regnet")
@dataclass(frozen=True)
class RegNetSpec(BlockSpec):
    """What a pruned RegNet keeps: per block its bottleneck channels ``mid`` in whole groups,
    or the block is removed. See :mod:`pyengine.models.cnn.spec` for the JSON form."""

    geometry_type = RegNetGeometry


@register_adapter
class RegNetAdapter(BlockAdapter):
    name = "regnet"
    family = RegNetFamily()
    spec_type = RegNetSpec
    spec_label = "RegNet spec (stages, family 'regnet')"
    geometry_type = RegNetGeometry
    supported = SUPPORTED
