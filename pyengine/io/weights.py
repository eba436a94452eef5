"""Dense weights from a local checkpoint: safetensors, or a torch file read with
``weights_only=True`` (a pickle that needs code to load is refused)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["load_checkpoint"]


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local checkpoint (safetensors, or a torch .pth/.pt/.bin read with
    ``weights_only=True``) into a timm ``model``; strict, with a clear error."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            state = load_file(str(p))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"checkpoint {p} is not a readable safetensors file ({e})") \
                from None
    else:
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickles with code are refused on purpose
            raise ValueError(f"cannot read checkpoint {p} with weights_only=True ({e}); convert "
                             "it to safetensors or a plain state_dict") from None
    for key in ("state_dict", "model", "model_state", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {p} does not hold a state_dict of tensors")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    own = model.state_dict()
    for k, v in state.items():  # integer weights where floats belong: refused, not cast
        if k in own and own[k].is_floating_point() and not v.is_floating_point():
            raise ValueError(f"checkpoint {p}: tensor {k} is {str(v.dtype).replace('torch.', '')}"
                             f", the model needs floating point (weights are not cast from "
                             "integers)")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise ValueError(f"checkpoint {p} does not fit the model: "
                         f"{'; '.join(lines[:3]) or e}") from None
    if missing or unexpected:
        raise ValueError(f"checkpoint {p} does not fit the model: missing {sorted(missing)[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected "
                         f"{sorted(unexpected)[:8]}{'...' if len(unexpected) > 8 else ''}")
    return model
