"""Training checkpoints without pickle: every tensor in one safetensors file, the rest in JSON.

A checkpoint is a directory ``step-00000123/`` holding ``state.safetensors`` and
``state.json``. Nested states (model, optimizer, scheduler, grad scaler, RNGs, anything with
``state_dict()``) are flattened: tensors go to safetensors under a path-like key, and the JSON
keeps the structure with ``{"__tensor__": key}`` where each tensor was. Dicts with non-string
keys (optimizer state is keyed by int) and tuples are tagged so they come back as they were.

Writes are atomic: the directory is written under a temporary name and renamed, so a kill
at any moment leaves either the previous checkpoint or the new one, never a torn one. A
``manifest.json`` (size and SHA-256 of both files) is checked on load, and ``run`` (the
settings that define the run) is recorded so that a resume with other settings is refused.
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
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pyengine.io.atomic import fsync_dir, write_synced
from pyengine.io.manifest import MANIFEST, CorruptFileError, manifest_bytes, read_manifest, \
    read_verified

FORMAT = "pyengine.checkpoint/1"
TENSORS, META = "state.safetensors", "state.json"
_NAME = re.compile(r"^step-(\d{8,})$")
_TEMP = re.compile(r"^\.(?P<kind>tmp|old)-(?P<name>step-\d{8,})-(?P<pid>\d+)$")


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


def _cleanup(root: Path) -> None:
    """Remove what writers killed mid-save left (a half-written ``.tmp-*``); put back a
    checkpoint a writer had moved aside (``.old-*``) when its replacement never arrived."""
    from pyengine.io.atomic import _alive
    for p in list(root.iterdir()):
        m = _TEMP.match(p.name)
        if not m or _alive(int(m.group("pid"))):
            continue
        final = root / m.group("name")
        try:
            if m.group("kind") == "old" and not final.exists():
                os.rename(p, final)
            else:
                shutil.rmtree(p)
        except OSError:
            pass


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary directories ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    _cleanup(root)
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / TENSORS).is_file() and (p / META).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(root: str | Path, step: int, state: dict[str, Any], keep: int = 2,
                    run: dict | None = None) -> Path:
    """Write ``state`` (nested dict) as ``root/step-<step>/`` atomically; keep the newest ``keep``.

    ``run``: the settings that define the run (JSON), recorded for :func:`check_run`.
    Returns the checkpoint directory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    meta = {"format": FORMAT, "step": int(step), "state": flatten(state, tensors)}
    if run is not None:
        meta["run"] = run
    files = {TENSORS: st_save(tensors, metadata={"format": FORMAT}),
             META: json.dumps(meta, indent=1).encode()}
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, data in files.items():
        write_synced(tmp / name, data)
    write_synced(tmp / MANIFEST, manifest_bytes(files))
    fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    fsync_dir(root)
    if keep > 0:
        for p in list_checkpoints(root)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def _read_meta(path: Path) -> tuple[dict, dict | None]:
    """(state.json parsed and checked, the manifest) of checkpoint ``path``."""
    if not (path / META).is_file() or not (path / TENSORS).is_file():
        raise FileNotFoundError(f"{path} is not a pyengine checkpoint (needs {META} and {TENSORS})")
    files = read_manifest(path)
    raw = read_verified(path / META, None if files is None else files.get(META))
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path / META}: not valid JSON ({e}); delete {path} to resume "
                               "from the checkpoint before it") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path / META}: format {got!r}, expected {FORMAT!r} (not a pyengine "
                         "training checkpoint)")
    if "state" not in meta:
        raise CorruptFileError(f"{path / META}: no 'state' entry")
    return meta, files


def checkpoint_run(path: str | Path) -> dict | None:
    """The run settings recorded in checkpoint ``path`` (None if it has none)."""
    return _read_meta(Path(path))[0].get("run")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def run_differences(recorded: dict, current: dict) -> list[str]:
    """``"key: recorded -> current"`` for every setting that differs (nested settings by
    dotted key; a setting only one side has shows as <unset> on the other)."""
    a, b = _flat(recorded), _flat(current)
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]


def check_run(path: str | Path, run: dict | None, what: str = "resume") -> None:
    """Refuse to continue from checkpoint ``path`` with settings ``run`` other than those it
    was written with; the message lists every difference."""
    if run is not None:
        _compare(Path(path), checkpoint_run(path), run, what)


def _compare(path: Path, recorded: dict | None, run: dict, what: str = "resume") -> None:
    if recorded is None:
        import warnings
        warnings.warn(f"{path} records no run settings (an older checkpoint); cannot check "
                      f"that this {what} has the same settings", stacklevel=3)
        return
    diff = run_differences(recorded, _jsonable(run))
    if diff:
        raise ValueError(f"cannot {what} from {path}: it was written by a run with other "
                         f"settings ({'; '.join(diff)}); use the same settings, or start over")


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def load_checkpoint(path: str | Path, run: dict | None = None) -> dict[str, Any]:
    """The nested state saved by :func:`save_checkpoint` (tensors on CPU), after checking its
    files against the manifest (and ``run`` against the recorded settings)."""
    path = Path(path)
    meta, files = _read_meta(path)
    if run is not None:
        _compare(path, meta.get("run"), run)
    raw = read_verified(path / TENSORS, None if files is None else files.get(TENSORS))
    try:
        tensors = st_load(raw)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CorruptFileError(f"{path / TENSORS}: not a readable safetensors file ({e})") \
            from None
    try:
        return unflatten(meta["state"], tensors)
    except KeyError as e:
        raise CorruptFileError(f"{path / META} refers to tensor {e} that {path / TENSORS} does "
                               "not hold") from None
