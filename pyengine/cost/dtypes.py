"""dtype names as users type them ("bf16", "float32", torch.bfloat16) and as reports print them."""
from __future__ import annotations

import torch

__all__ = ["as_dtype", "dtype_name"]

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                  "float": "float32", "fp64": "float64", "double": "float64"}


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = dtype.lower().replace("torch.", "")
        name = _DTYPE_ALIASES.get(name, name)
        d = getattr(torch, name, None)
        if isinstance(d, torch.dtype):
            return d
    raise TypeError(f"dtype must be a torch.dtype or a name like 'bfloat16', got {dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    return "float8" if name.startswith("float8") else name

