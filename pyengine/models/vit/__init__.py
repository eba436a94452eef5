"""timm VisionTransformer models: adapter, gated and compact modules, padded baseline, cost."""
from pyengine.models.vit import adapter  # noqa: F401  (registers the adapter)
