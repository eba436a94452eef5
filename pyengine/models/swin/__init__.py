"""timm Swin Transformer (``timm.models.swin_transformer.SwinTransformer``): adapter, spec
type over the blocks of all stages, compact shifted-window block, cost of patch merging; the
attention/FFN modules, ledger and importance units are shared with EVA and BEiT
(:mod:`pyengine.models.transformer`)."""
from pyengine.models.swin import adapter  # noqa: F401  (registers the adapter)
