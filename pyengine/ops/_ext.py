"""Lazy, safe loader of the compiled extension ``pyengine._C``.

Importing ``pyengine._C`` runs its static registrations: the op schemas
(``torch.ops.pyengine.*``) and their CPU (and, in the CUDA variant, CUDA) kernels. pyengine must
import and work without it (the torch reference backends are always there), so nothing here
raises: :func:`available` says whether the extension loaded and :func:`load_error` why not.

    from pyengine.ops import _ext
    if _ext.available(): ...
    _ext.has_cuda_kernels()   # the build contains csrc/cuda kernels
    _ext.load_error()         # None, or the ImportError text
    _ext.why_no_kernel("masked_ffn_fwd", "cuda")   # None, or why that kernel is missing

Set ``PYENGINE_DISABLE_EXT=1`` to pretend the extension is not built (tests of the fallbacks).
"""
from __future__ import annotations

import importlib
import os
import threading
from types import ModuleType

_lock = threading.Lock()
_tried = False
_module: ModuleType | None = None
_error: str | None = None

BUILD_HINT = ('build it from the repository root with: '
              'pip install --no-build-isolation -e ".[test]"')


def _load() -> ModuleType | None:
    global _tried, _module, _error
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        if os.environ.get("PYENGINE_DISABLE_EXT") == "1":
            _error = "pyengine._C disabled by PYENGINE_DISABLE_EXT=1"
        else:
            try:
                import torch  # noqa: F401  (libtorch must be loaded before the extension)

                _module = importlib.import_module("pyengine._C")
            except ImportError as e:  # not built, or built against another torch
                _module = None
                _error = f"pyengine._C could not be imported ({type(e).__name__}: {e}); {BUILD_HINT}"
            except OSError as e:  # a shared library that fails to load
                _module = None
                _error = f"pyengine._C could not be loaded (OSError: {e}); {BUILD_HINT}"
        _tried = True
        return _module


def extension() -> ModuleType | None:
    """The loaded ``pyengine._C`` module, or None when it is not available."""
    return _load()


def available() -> bool:
    """True when ``pyengine._C`` loaded (its ops are in ``torch.ops.pyengine``)."""
    return _load() is not None


def has_cuda_kernels() -> bool:
    """True when the loaded extension was built with its CUDA kernels (csrc/cuda)."""
    mod = _load()
    if mod is None:
        return False
    try:
        return bool(mod.has_cuda())
    except AttributeError:
        return False


def load_error() -> str | None:
    """Why the extension is not available (the ImportError text), or None when it is."""
    _load()
    return _error


def has_op(name: str) -> bool:
    """True when the extension is loaded and defines ``torch.ops.pyengine.<name>``."""
    if _load() is None:
        return False
    import torch

    try:
        getattr(torch.ops.pyengine, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def has_kernel(name: str, device_type: str) -> bool:
    """True when ``torch.ops.pyengine.<name>`` has a kernel for ``device_type`` ("cpu", "cuda")."""
    if not has_op(name):
        return False
    import torch

    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"pyengine::{name}", key))
    except (AttributeError, RuntimeError):  # private API moved: fall back on the build flag
        return device_type == "cpu" or (device_type == "cuda" and has_cuda_kernels())


def why_no_kernel(name: str, device_type: str) -> str | None:
    """Why ``torch.ops.pyengine.<name>`` has no ``device_type`` kernel here; None when it has.

    The one "not built" message of pyengine: the csrc backends of every op report it.
    """
    if has_kernel(name, device_type):
        return None
    if not available():
        return load_error()
    if device_type == "cuda" and not has_cuda_kernels():
        return ("this build of pyengine._C has no CUDA kernels (built C++ only: no CUDA toolkit "
                "matching torch.version.cuda, a CPU build of torch, or PYENGINE_NO_CUDA=1)")
    return f"pyengine._C has no {device_type} kernel for pyengine::{name} (rebuild it)"


def describe() -> str:
    """One line for logs and CLI: whether the extension is built and with which kernels."""
    if not available():
        return f"pyengine._C: not available ({load_error()})"
    return f"pyengine._C: loaded ({'C++ + CUDA' if has_cuda_kernels() else 'C++ only'} kernels)"
