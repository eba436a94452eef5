"""timm EfficientNet and MobileNetV3: adapter, gated / compact blocks (expanded channels,
whole residual blocks)."""
from pyengine.models.efficientnet import adapter  # noqa: F401  (registers the adapter)
