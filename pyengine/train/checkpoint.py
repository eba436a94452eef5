"""Training checkpoints without pickle: every tensor in one safetensors file, the rest in JSON.

A checkpoint is a directory ``step-00000123/`` holding ``state.safetensors`` and
``state.json``. Nested states (model, optimizer, scheduler, grad scaler, RNGs, anything with
``state_dict()``) are flattened: tensors go to safetensors under a path-like key, and the JSON
keeps the structure with ``{"__tensor__": key}`` where each tensor was. Dicts with non-string
keys (optimizer state is keyed by int) and tuples are tagged so they come back as they were.

Writes are atomic: the directory is written under a temporary name and renamed, so a kill
at any moment leaves either the previous checkpoint or the new one, never a torn one.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT = "pyengine.checkpoint/1"
TENSORS, META = "state.safetensors", "state.json"
_NAME = re.compile(r"^step-(\d{8,})$")


# ---------------------------------------------------------------------------- flattening
def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """JSON-able structure of ``obj``; its tensors are moved into ``tensors`` by key."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "_"
        if key in tensors:
            raise ValueError(f"duplicate tensor key {key!r} while flattening a checkpoint")
        # clone: safetensors refuses tensors that share storage (tied weights, views)
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: flatten(v, tensors, f"{prefix}.{k}" if prefix else k)
                    for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"cannot store a dict key of type {type(k).__name__} ({k!r})")
            items.append([k, flatten(v, tensors, f"{prefix}.{k}" if prefix else str(k))])
        return {"__items__": items}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store an object of type {type(obj).__name__} at {prefix!r} in a "
                    f"checkpoint (only tensors, arrays, numbers, strings, lists, tuples, dicts)")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {k: unflatten(v, tensors) for k, v in obj["__items__"]}
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and every CUDA device) random states."""
    py = random.getstate()
    st: dict[str, Any] = {"python": [py[0], list(py[1]), py[2]],
                          "numpy": list(np.random.get_state()),
                          "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = list(torch.cuda.get_rng_state_all())
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    v, internal, gauss = st["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(st["torch"].to(torch.uint8))
    if "cuda" in st and torch.cuda.is_available():
        states = st["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in states])


# ---------------------------------------------------------------------------- files
def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary directories ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / TENSORS).is_file() and (p / META).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(root: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` (nested dict) as ``root/step-<step>/`` atomically; keep the newest ``keep``.

    Returns the checkpoint directory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    meta = {"format": FORMAT, "step": int(step), "state": flatten(state, tensors)}
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
    with open(tmp / META, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    if keep > 0:
        for p in list_checkpoints(root)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The nested state saved by :func:`save_checkpoint` (tensors on CPU)."""
    path = Path(path)
    if not (path / META).is_file() or not (path / TENSORS).is_file():
        raise FileNotFoundError(f"{path} is not a pyengine checkpoint (needs {META} and {TENSORS})")
    with open(path / META) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / META}: format {meta.get('format')!r}, expected {FORMAT!r}")
    tensors = load_file(str(path / TENSORS), device="cpu")
    return unflatten(meta["state"], tensors)
