"""timm BEiT (``timm.models.beit.Beit``): adapter and spec type (relative-position tables
follow the kept heads); the modules, cost and ledger are shared with EVA and Swin
(:mod:`pyengine.models.transformer`)."""
from pyengine.models.beit import adapter  # noqa: F401  (registers the adapter)
