"""The backends of masked_ffn: one class each, run(x, w1, b1, w2, b2, keep, gate, act).

``keep`` arrives as the caller gave it (None, a sequence of ints or an integer tensor); each
backend converts it to what its kernel takes.
"""
from __future__ import annotations

import torch

from ..bases import CsrcBackend, TorchBackend, TritonBackend
from . import library  # noqa: F401  (registers torch.ops.pyengine.masked_ffn_triton*)
from .reference import masked_ffn_reference


class _Inputs:
    """The tensors every masked_ffn backend is checked on (``keep`` holds indices, not data)."""

    @staticmethod
    def tensors(x, w1, b1, w2, b2, keep, gate, act):
        return [t for t in (x, w1, b1, w2, b2, gate) if t is not None]


class Torch(_Inputs, TorchBackend):
    def run(self, x, w1, b1, w2, b2, keep, gate, act):
        return masked_ffn_reference(x, w1, b1, w2, b2, keep, gate, act)


def _keep_tensor(keep, hidden: int, device) -> torch.Tensor:
    """``keep`` as an int32 index tensor on ``device`` (None: every neuron), range-checked.

    The Triton kernels gather and scatter through these indices, so an index outside
    [0, hidden) would touch foreign memory: lists are checked here, device tensors with an
    asynchronous device-side assert (no host sync).
    """
    if keep is None:
        return torch.arange(hidden, dtype=torch.int32, device=device)
    if not isinstance(keep, torch.Tensor):
        idx = [int(i) for i in keep]
        bad = [i for i in idx if not 0 <= i < hidden]
        if bad:
            raise ValueError(f"masked_ffn: keep indices {bad[:5]} out of range [0, {hidden})")
        return torch.tensor(idx, dtype=torch.int32, device=device)
    if keep.dim() != 1 or keep.dtype.is_floating_point or keep.dtype.is_complex or \
            keep.dtype == torch.bool:
        raise ValueError(f"masked_ffn: keep must be a 1-D list/tensor of neuron indices, got "
                         f"{keep.dtype} of shape {tuple(keep.shape)}")
    keep = keep.to(device=device, dtype=torch.int32)
    if keep.numel() and not torch.compiler.is_compiling():
        if keep.device.type == "cpu":
            lo, hi = int(keep.min()), int(keep.max())
            if lo < 0 or hi >= hidden:
                raise ValueError(f"masked_ffn: keep indices out of range [0, {hidden}): min "
                                 f"{lo}, max {hi}")
        else:
            torch._assert_async((keep.min() >= 0) & (keep.max() < hidden),
                                 "masked_ffn: keep index out of range")
    return keep


class Triton(_Inputs, TritonBackend):
    """kernels/masked_ffn.py through the custom op: the gather fused into the GEMM loads,
    differentiable in x, weights, biases and gate; ``keep`` must hold unique indices and
    ``gate`` be 1-D (the kernel raises otherwise)."""

    supports_autograd = True

    def run(self, x, w1, b1, w2, b2, keep, gate, act):
        keep_t = _keep_tensor(keep, w1.shape[0], x.device)
        return torch.ops.pyengine.masked_ffn_triton(x, w1, b1, w2, b2, keep_t, gate, act)[0]


class _Csrc(_Inputs, CsrcBackend):
    """torch.ops.pyengine.masked_ffn_fwd (csrc/{cpu,cuda}/masked_ffn); forward only. ``keep``:
    None, a sequence of ints or an integer tensor (CPU or x's device)."""

    kernel = "masked_ffn_fwd"

    def run(self, x, w1, b1, w2, b2, keep, gate, act):
        if keep is not None and not isinstance(keep, torch.Tensor):
            keep = torch.as_tensor(list(keep), dtype=torch.long)
        return self.op()(x, w1, b1, w2, b2, keep, gate, act)


class Cuda(_Csrc):
    name = "cuda"


class Cpu(_Csrc):
    name = "cpu"


BACKENDS = (Torch(), Triton(), Cuda(), Cpu())
