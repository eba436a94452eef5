"""The backends of importance_reduce (run(x, g)) and importance_reduce_many (run(xs, gs)).

Arguments arrive checked (reference.check / check_many): ``gs`` is a list with None entries
and ``xs`` is not empty. None of these backends but torch has a backward: the statistics are
computed on detached activations and gradients.
"""
from __future__ import annotations

import torch

from ..bases import CsrcBackend, TorchBackend, TritonBackend
from . import library  # noqa: F401  (registers torch.ops.pyengine.importance_reduce_many_triton)
from .reference import importance_reduce_many_reference, importance_reduce_reference

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---- importance_reduce(x, g) --------------------------------------------------------------------
class _One:
    @staticmethod
    def tensors(x, g):
        return (x,) if g is None else (x, g)


class Torch(_One, TorchBackend):
    def run(self, x, g):
        return importance_reduce_reference(x, g)


class Triton(_One, TritonBackend):
    """The batched kernel (kernels/importance.py) on a one-tensor list."""

    supported_dtypes = _FLOATS

    def run(self, x, g):
        return torch.ops.pyengine.importance_reduce_many_triton([x], [g])[0]


class _Csrc(_One, CsrcBackend):
    """torch.ops.pyengine.importance_reduce (csrc/{cpu,cuda}/importance_reduce)."""

    kernel = "importance_reduce"

    def run(self, x, g):
        return self.op()(x, g)


class Cuda(_Csrc):
    name = "cuda"


class Cpu(_Csrc):
    name = "cpu"


# ---- importance_reduce_many(xs, gs) -------------------------------------------------------------
class _Many:
    @staticmethod
    def tensors(xs, gs):
        return [*xs, *(g for g in gs if g is not None)]


class TorchMany(_Many, TorchBackend):
    def run(self, xs, gs):
        return importance_reduce_many_reference(xs, gs)


class TritonMany(_Many, TritonBackend):
    """One Triton launch over pointer/offset tables (kernels/importance.py)."""

    supported_dtypes = _FLOATS

    def run(self, xs, gs):
        return list(torch.ops.pyengine.importance_reduce_many_triton(list(xs), gs))


class _CsrcMany(_Many, CsrcBackend):
    """torch.ops.pyengine.importance_reduce_many (csrc/{cpu,cuda}/importance_reduce_many): one
    packed float32 buffer, returned as a [3, C_i] view per tensor."""

    kernel = "importance_reduce_many"

    def run(self, xs, gs):
        packed = self.op()(list(xs), [] if all(g is None for g in gs) else list(gs))
        out, off = [], 0
        for x in xs:
            c = x.shape[-1] if x.dim() >= 1 else 0
            out.append(packed[off:off + 3 * c].view(3, c))
            off += 3 * c
        return out


class CudaMany(_CsrcMany):
    name = "cuda"


class CpuMany(_CsrcMany):
    name = "cpu"


BACKENDS = (Torch(), Triton(), Cuda(), Cpu())
MANY_BACKENDS = (TorchMany(), TritonMany(), CudaMany(), CpuMany())
