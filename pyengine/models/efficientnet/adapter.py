"""The adapter of timm EfficientNet and MobileNetV3 models (one adapter: both are built from
:mod:`timm.models._efficientnet_blocks`): per block, the expanded channels (``mid``) and the
whole residual branch of blocks with a skip connection (:mod:`.blocks`); everything else is
:mod:`pyengine.models.cnn`'s."""
from __future__ import annotations

from dataclasses import dataclass

from pyengine.models.base import register_adapter
from pyengine.models.cnn.adapter import BlockAdapter
from pyengine.models.cnn.spec import BlockGeometry, BlockSpec
from pyengine.models.efficientnet.blocks import SUPPORTED, EfficientNetFamily
from pyengine.structure.spec import register_spec_type


@dataclass(frozen=True)
class EfficientNetGeometry(BlockGeometry):
    """The dense shape of a timm EfficientNet / MobileNetV3 (see
    :class:`~pyengine.models.cnn.spec.BlockGeometry`)."""


@register_spec_type("efficientnet")
@dataclass(frozen=True)
class EfficientNetSpec(BlockSpec):
    """What a pruned EfficientNet / MobileNetV3 keeps: per block its expanded channels
    ``mid`` (blocks with an expansion), or the block is removed (blocks with a skip). See
    :mod:`pyengine.models.cnn.spec` for the JSON form."""

    geometry_type = EfficientNetGeometry


@register_adapter
class EfficientNetAdapter(BlockAdapter):
    name = "efficientnet"
    family = EfficientNetFamily()
    spec_type = EfficientNetSpec
    spec_label = "EfficientNet/MobileNetV3 spec (stages, family 'efficientnet')"
    geometry_type = EfficientNetGeometry
    supported = SUPPORTED
