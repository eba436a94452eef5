"""The three kinds of backends every op has, with what decides their availability.

* :class:`TorchBackend`: the PyTorch reference; any device and dtype, differentiable.
* :class:`TritonBackend`: a kernel from the top-level kernels/ folder (``pyengine.kernels``)
  behind a torch.library custom op; needs Triton and CUDA tensors, or CPU tensors when Triton's
  interpreter is on (TRITON_INTERPRET=1).
* :class:`CsrcBackend`: a kernel of the compiled extension ``pyengine._C`` (csrc/), run as
  ``torch.ops.pyengine.<kernel>``; "cpu" and "cuda" each need that kernel in this build.

An op's backends (pyengine/ops/<op>/backends.py) mix one of these with the op's input class,
which names the op's tensors. The availability probes are marked constant for torch.compile:
they depend on the installation, not on the inputs, and dynamo cannot trace them.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from . import _ext
from .dispatch import Backend


@torch.compiler.assume_constant_result
def _triton_missing() -> str:
    return _triton_missing_cached()


@functools.lru_cache(maxsize=None)
def _triton_missing_cached() -> str:
    # find_spec walks sys.path; the answer does not change while the process runs
    return "" if importlib.util.find_spec("triton") is not None else \
        "Triton is not installed (pip install triton)"


@torch.compiler.assume_constant_result
def triton_interpret() -> bool:
    """True when Triton's CPU interpreter is on (read per call: tests switch it)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@torch.compiler.assume_constant_result
def _csrc_missing(kernel: str, device_type: str) -> str:
    return _ext.why_no_kernel(kernel, device_type) or ""


class TorchBackend(Backend):
    name = "torch"
    supports_autograd = True


class TritonBackend(Backend):
    name = "triton"
    supported_dtypes = (torch.float32, torch.float16, torch.bfloat16)

    @property
    def supported_devices(self) -> tuple[str, ...]:
        return ("cuda", "cpu") if triton_interpret() else ("cuda",)

    def unavailable(self) -> str | None:
        return _triton_missing() or None

    def device_reason(self, device: torch.device) -> str | None:
        if device.type in self.supported_devices:
            return None
        if device.type == "cpu":
            return (f"the Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 "
                    f"before importing pyengine to run them in Triton's CPU interpreter")
        return f"the Triton kernels need CUDA tensors, got {device}"


class CsrcBackend(Backend):
    """``name`` is the device kind ("cpu" or "cuda"); ``kernel`` the op in torch.ops.pyengine."""

    kernel: str = ""
    supported_dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

    @property
    def supported_devices(self) -> tuple[str, ...]:
        return (self.name,)

    def unavailable(self) -> str | None:
        return _csrc_missing(self.kernel, self.name) or None

    def op(self):
        return getattr(torch.ops.pyengine, self.kernel)


def csrc_kernels() -> list[str]:
    """The names in torch.ops.pyengine of every csrc kernel the registered ops run."""
    from .dispatch import OPS

    return sorted({b.kernel for op in OPS.values() for b in op.backends
                   if isinstance(b, CsrcBackend)})
