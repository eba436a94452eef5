"""Model directories: ``pyengine.save`` / ``pyengine.load`` (safetensors + spec.json +
config.json + manifest.json; nothing is ever unpickled).

A directory is written as a unit (:func:`pyengine.io.atomic.replace_directory`: a temporary
sibling, fsynced, swapped in with renames), so every reader sees the previous model or the new
one. ``manifest.json`` holds each file's size and SHA-256; ``load`` checks them, reads
config.json against a whitelist of keys and types (nothing in it reaches timm unchecked), and
refuses weights of the wrong kind (integer where floats belong, NaN/inf) with the file named.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from pyengine.api import compile, is_compact, is_gated
from pyengine.io.atomic import cleanup_stale, replace_directory, wait_for_writer, write_synced
from pyengine.io.manifest import MANIFEST, CorruptFileError, manifest_bytes, parse_manifest, verify
from pyengine.models import adapter_for, create_model
from pyengine.models.factory import check_model_kwargs, check_model_name
from pyengine.structure.spec import Spec

MODEL_FORMAT = "pyengine.model/1"
WEIGHTS, SPEC, CONFIG = "model.safetensors", "spec.json", "config.json"
# config.json: every key and its type (a key that is not here is an error, not ignored)
CONFIG_KEYS = {"format": str, "architecture": str, "kwargs": dict, "torch": str}
_REQUIRED = ("format", "architecture", "kwargs")

__all__ = ["save", "load", "read_config", "MODEL_FORMAT", "WEIGHTS", "SPEC", "CONFIG",
           "MANIFEST", "CONFIG_KEYS", "CorruptFileError"]


def _finite_state(state: Mapping[str, torch.Tensor], where: str) -> None:
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            what = "NaN" if bool(torch.isnan(v).any()) else "inf"
            raise ValueError(f"{where}: tensor {k} holds {what} values")


def save(model: nn.Module, directory, extra_files: Mapping[str, bytes | str] | None = None
         ) -> Path:
    """Write ``model.safetensors`` + ``spec.json`` + ``config.json`` + ``manifest.json`` (no
    pickle) to ``directory``, as a unit: the previous contents stay readable until the new
    ones replace them at once (other entries of the directory are kept).

    A gated model is compiled first. ``extra_files`` (name -> contents, e.g. a run's
    metrics.json) are written in the same unit and listed in the manifest.
    """
    from safetensors.torch import save as st_save

    if not is_compact(model):
        if not is_gated(model):
            raise ValueError("save expects a compact (pyengine.compile) or gated model")
        model = compile(model)
    cfg = getattr(model, "pyengine_config", None)
    if cfg is None:
        raise ValueError("cannot tell which timm model this is; create it with "
                         "pyengine.create_model(name, **kwargs) so it can be rebuilt on load")
    check_model_kwargs(cfg["kwargs"], f"cannot save {cfg['architecture']}: model kwargs")
    rebuilt = _skeleton(cfg["architecture"], cfg["kwargs"], model.pyengine_spec)
    if repr(rebuilt) != repr(model):
        raise ValueError(
            f"timm.create_model({cfg['architecture']!r}, **{cfg['kwargs']}) does not rebuild this "
            "model's architecture; create it with pyengine.create_model(name, **kwargs)")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _finite_state(state, "cannot save the model")
    config = {"format": MODEL_FORMAT, "architecture": cfg["architecture"],
              "kwargs": cfg["kwargs"], "torch": torch.__version__}
    files = {WEIGHTS: st_save(state, metadata={"format": MODEL_FORMAT}),
             SPEC: model.pyengine_spec.to_json().encode(),
             CONFIG: (json.dumps(config, indent=2) + "\n").encode()}
    for name, data in (extra_files or {}).items():
        if name in files or name == MANIFEST or Path(name).name != name or name.startswith("."):
            raise ValueError(f"extra file name {name!r} is not allowed (a plain file name other "
                             f"than {', '.join([*files, MANIFEST])})")
        files[name] = data.encode() if isinstance(data, str) else bytes(data)
    d = Path(directory)
    with replace_directory(d) as tmp:
        for name, data in files.items():
            write_synced(tmp / name, data)
        write_synced(tmp / MANIFEST, manifest_bytes(files))  # written last
    return d


def _skeleton(architecture: str, kwargs: dict, s) -> nn.Module:
    """The compact model's modules, randomly initialised, rebuilt from its config and spec."""
    model = create_model(architecture, **kwargs)
    a = adapter_for(model)
    if not isinstance(s, a.spec_type):
        raise ValueError(f"spec.json holds a {type(s).__name__}, but {architecture} needs a "
                         f"{a.spec_type.__name__}")
    s = a.skeleton_spec(s, a.geometry(model), architecture)
    return a.build(model, s, copy_weights=False)


def read_config(path: str | Path, data: bytes | None = None) -> dict:
    """config.json checked against :data:`CONFIG_KEYS` and the model-kwargs whitelist; every
    error names the file and the key."""
    path = Path(path)
    if data is None:
        data = path.read_bytes()
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(CONFIG_KEYS)}")
    for key, typ in CONFIG_KEYS.items():
        if key not in config:
            if key in _REQUIRED:
                raise ValueError(f"{path}: {key!r} is missing")
            continue
        if not isinstance(config[key], typ):
            raise ValueError(f"{path}: {key!r} must be a JSON {typ.__name__.replace('dict', 'object')}"
                             f", got {config[key]!r}")
    if config["format"] != MODEL_FORMAT:
        raise ValueError(f"{path}: format {config['format']!r}, expected {MODEL_FORMAT!r}")
    check_model_name(config["architecture"], f"{path}: architecture")
    check_model_kwargs(config["kwargs"], f"{path}: kwargs")
    return config


def _read_files(d: Path) -> tuple[dict | None, dict[str, bytes]]:
    """(manifest or None, contents of the model files), all read from one version of ``d``
    (through a descriptor of the directory), each checked against the manifest."""
    fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        def read(name: str) -> bytes | None:
            try:
                f = os.open(name, os.O_RDONLY, dir_fd=fd)
            except FileNotFoundError:
                return None
            with os.fdopen(f, "rb") as fh:
                return fh.read()

        raw = read(MANIFEST)
        files = None if raw is None else parse_manifest(raw, d / MANIFEST)
        out = {}
        for name in (WEIGHTS, SPEC, CONFIG):
            if files is not None and name not in files:
                raise CorruptFileError(f"{d / MANIFEST} does not list {name}; the directory is "
                                       "damaged")
            data = read(name)
            if data is None:
                raise FileNotFoundError(f"{d / name} is missing; not a pyengine.save directory")
            out[name] = verify(d / name, data, None if files is None else files[name])
        return files, out
    finally:
        os.close(fd)


def _read_consistent(d: Path) -> dict[str, bytes]:
    """:func:`_read_files`, again if a writer swapped the directory while it was being read."""
    for attempt in range(3):
        ino = os.stat(d).st_ino
        try:
            return _read_files(d)[1]
        except (CorruptFileError, FileNotFoundError):
            if attempt == 2 or os.stat(d).st_ino == ino:
                raise


def _check_weights(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Same keys, shapes and kinds of tensor as the rebuilt model; no NaN/inf; integer
    weights are refused where floats belong, not cast."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{where} does not fit the model of config.json + spec.json: missing "
                         f"{missing[:6]}{'...' if len(missing) > 6 else ''}, unexpected "
                         f"{unexpected[:6]}{'...' if len(unexpected) > 6 else ''}")
    for k, v in state.items():
        want = own[k]
        if tuple(v.shape) != tuple(want.shape):
            raise ValueError(f"{where}: tensor {k} has shape {tuple(v.shape)}, the model "
                             f"needs {tuple(want.shape)}")
        if v.is_floating_point() != want.is_floating_point() or (
                not v.is_floating_point() and v.dtype != want.dtype):
            raise ValueError(f"{where}: tensor {k} is {str(v.dtype).replace('torch.', '')}, the "
                             f"model needs {str(want.dtype).replace('torch.', '')} (weights are "
                             "not cast between integer and floating point)")
    _finite_state(state, str(where))


def load(directory, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a compact model saved by :func:`save` (timm container + spec + safetensors),
    after checking every file against the manifest."""
    from safetensors.torch import load as st_load

    d = Path(directory)
    cleanup_stale(d)  # temporaries of killed writers (best effort)
    wait_for_writer(d)
    if not d.exists():
        raise FileNotFoundError(f"{d} does not exist")
    if not d.is_dir():
        raise NotADirectoryError(f"{d} is a file; pyengine.load takes the directory that "
                                 "pyengine.save wrote")
    raw = _read_consistent(d)
    config = read_config(d / CONFIG, raw[CONFIG])
    try:
        s = Spec.from_json(raw[SPEC].decode())
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{d / SPEC}: not text ({e})") from None
    except ValueError as e:
        raise ValueError(f"{d / SPEC}: {e}") from None
    model = _skeleton(config["architecture"], config["kwargs"], s)
    try:
        state = st_load(raw[WEIGHTS])
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CorruptFileError(f"{d / WEIGHTS}: not a readable safetensors file ({e})") from None
    _check_weights(model, state, d / WEIGHTS)
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:  # a model saved in bf16 comes back in bf16
        model = model.to(dtypes.pop())
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
