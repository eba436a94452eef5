"""timm ResNets: adapter, gated / compact / removed residual blocks, cost."""
from pyengine.models.resnet import adapter  # noqa: F401  (registers the adapter)
