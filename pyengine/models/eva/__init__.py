"""timm EVA / EVA02 (``timm.models.eva.Eva``): adapter, spec type (rotary pairs as q/k units,
SwiGLU neurons); the modules, cost and ledger are shared with BEiT and Swin
(:mod:`pyengine.models.transformer`)."""
from pyengine.models.eva import adapter  # noqa: F401  (registers the adapter)
