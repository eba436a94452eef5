"""Trained weights kept for reuse: one safetensors file holding the weights and, in its
metadata, the record of how they were trained (recipe, history, times). The prune pipeline,
the sweeps and the bench scripts train a dense model once and reuse it through these two
functions."""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

__all__ = ["save_trained", "load_trained"]


def save_trained(model: nn.Module, path: str | Path, record: dict | None = None) -> Path:
    """Write ``model``'s weights to ``path`` atomically, with ``record`` in the metadata."""
    from safetensors.torch import save

    from pyengine.io.atomic import write_bytes
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return write_bytes(Path(path), save(state, metadata={"pyengine": json.dumps(record or {})}))


def load_trained(model: nn.Module, path: str | Path) -> dict | None:
    """Load the weights at ``path`` into ``model`` (strict) and return their record; None when
    there is no such file."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    p = Path(path)
    if not p.is_file():
        return None
    model.load_state_dict(load_file(str(p)), strict=True)
    with safe_open(str(p), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("pyengine", "{}"))
