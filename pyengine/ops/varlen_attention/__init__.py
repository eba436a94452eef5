"""Varlen-head attention: the heads of one layer, each with its own q/k and v width.

Layout: ``q`` and ``k`` are ``[B, N, sum(qk_dims)]`` and ``v`` is ``[B, N, sum(v_dims)]``, the
heads packed contiguously in order; the result is ``[B, N, sum(v_dims)]`` in the same order.
Head ``h`` computes ``softmax(q_h k_h^T * scale_h) v_h``. A head with ``qk_dim == 0`` sees
all-zero scores, so its attention is uniform (the mean of ``v_h`` over keys).

Here: the public function (this file), the torch reference (reference.py), the backends
(backends.py: torch, triton = kernels/varlen_attention.py, cuda/cpu = csrc kernels) and their
torch.library registrations (library.py).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..dispatch import Op, dispatch, register
from .backends import BACKENDS as _BACKENDS
from .reference import check_inputs, scales_list, varlen_attention_reference

__all__ = ["varlen_attention", "varlen_attention_reference", "OP"]

OP = register(Op("varlen_attention", _BACKENDS))


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     qk_dims: Sequence[int], v_dims: Sequence[int],
                     scale: float | Sequence[float], backend: str = "auto") -> torch.Tensor:
    """Attention over heads of different widths in one call; see the module docstring.

    ``backend``: "torch" (reference), "triton" (differentiable), "cuda"/"cpu" (csrc kernels,
    forward only) or "auto" (pyengine/ops/priority.py: torch until GPU timings show a faster
    correct backend). pyengine.ops.describe() lists what this installation can run.
    """
    OP.check_backend(backend)
    qk_dims, v_dims = [int(d) for d in qk_dims], [int(d) for d in v_dims]
    if not torch.compiler.is_compiling():
        check_inputs(q, k, v, qk_dims, v_dims)
    return dispatch(OP, backend, q, k, v, qk_dims, v_dims, scales_list(scale, len(qk_dims)))
