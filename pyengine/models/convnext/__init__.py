"""timm ConvNeXt: adapter, gated / compact blocks (hidden MLP channels, whole blocks)."""
from pyengine.models.convnext import adapter  # noqa: F401  (registers the adapter)
