"""timm RegNetX / RegNetY: adapter, gated / compact blocks (group-aligned bottleneck channels,
whole residual blocks)."""
from pyengine.models.regnet import adapter  # noqa: F401  (registers the adapter)
