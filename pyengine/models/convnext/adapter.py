"""The adapter of timm ConvNeXt models: per block, the inverted bottleneck's hidden channels
(``mlp``) and the whole residual branch (:mod:`.blocks`); everything else is
:mod:`pyengine.models.cnn`'s."""
from __future__ import annotations

from dataclasses import dataclass

from pyengine.models.base import register_adapter
from pyengine.models.cnn.adapter import BlockAdapter
from pyengine.models.cnn.spec import BlockGeometry, BlockSpec
from pyengine.models.convnext.blocks import SUPPORTED, ConvNeXtFamily
from pyengine.structure.spec import register_spec_type


@dataclass(frozen=True)
class ConvNeXtGeometry(BlockGeometry):
    """The dense shape of a timm ConvNeXt (see :class:`~pyengine.models.cnn.spec.BlockGeometry`)."""


@register_spec_type("convnext")
@dataclass(frozen=True)
class ConvNeXtSpec(BlockSpec):
    """What a pruned ConvNeXt keeps: per block its hidden channels ``mlp`` (or the block is
    removed). See :mod:`pyengine.models.cnn.spec` for the JSON form."""

    geometry_type = ConvNeXtGeometry


@register_adapter
class ConvNeXtAdapter(BlockAdapter):
    name = "convnext"
    family = ConvNeXtFamily()
    spec_type = ConvNeXtSpec
    spec_label = "ConvNeXt spec (stages, family 'convnext')"
    geometry_type = ConvNeXtGeometry
    supported = SUPPORTED
