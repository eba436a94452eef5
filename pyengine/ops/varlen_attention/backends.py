"""The backends of varlen_attention: one class each, run(q, k, v, qk_dims, v_dims, scales).

The public function normalizes the arguments (int dims, one float scale per head) before the
dispatcher calls ``not_supported_reasons`` and ``run`` with them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..bases import CsrcBackend, TorchBackend, TritonBackend
from . import library  # noqa: F401  (registers torch.ops.pyengine.varlen_attention_*)
from .reference import varlen_attention_reference


class _Inputs:
    """The tensors every varlen_attention backend is checked on."""

    @staticmethod
    def tensors(q, k, v, *rest):
        return (q, k, v)


class Torch(_Inputs, TorchBackend):
    def run(self, q, k, v, qk_dims, v_dims, scales):
        return varlen_attention_reference(q, k, v, qk_dims, v_dims, scales)


class Triton(_Inputs, TritonBackend):
    """kernels/varlen_attention.py through the custom op; differentiable (Triton backward)."""

    supports_autograd = True

    def run(self, q, k, v, qk_dims, v_dims, scales):
        return torch.ops.pyengine.varlen_attention_triton(q, k, v, qk_dims, v_dims, scales)[0]


def _last_dim_contiguous(t: Tensor) -> Tensor:
    # the kernels take any batch/token strides (e.g. q, k, v sliced out of one qkv projection)
    # but need stride 1 along the packed head dims
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


class _Csrc(_Inputs, CsrcBackend):
    """torch.ops.pyengine.varlen_attention_fwd (csrc/{cpu,cuda}/varlen_attention); forward only."""

    kernel = "varlen_attention_fwd"

    def run(self, q, k, v, qk_dims, v_dims, scales):
        return self.op()(_last_dim_contiguous(q), _last_dim_contiguous(k),
                         _last_dim_contiguous(v), qk_dims, v_dims, scales)


class Cuda(_Csrc):
    name = "cuda"


class Cpu(_Csrc):
    name = "cpu"


BACKENDS = (Torch(), Triton(), Cuda(), Cpu())
