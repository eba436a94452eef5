"""Masked FFN: fc1 -> activation -> fc2 over only the kept neurons.

``masked_ffn(x, w1, b1, w2, b2, keep=None, gate=None)`` equals
``fc2((act(fc1(x)) * gate)[..., keep])`` written with dense weights: ``w1`` is
``[hidden, in]``, ``w2`` is ``[out, hidden]``, ``keep`` holds kept neuron indices (None: all)
and ``gate`` optional per-neuron multipliers over the full hidden width (soft gates during
training).

Here: the public function (this file), the torch reference (reference.py), the backends
(backends.py: torch, triton = kernels/masked_ffn.py, cuda/cpu = csrc kernels) and their
torch.library registrations (library.py).
"""
from __future__ import annotations

from ..dispatch import Op, dispatch, register
from .backends import BACKENDS as _BACKENDS
from .reference import check_inputs, masked_ffn_reference

__all__ = ["masked_ffn", "masked_ffn_reference", "OP"]

OP = register(Op("masked_ffn", _BACKENDS))


def masked_ffn(x, w1, b1, w2, b2, keep=None, gate=None, act: str = "gelu", backend: str = "auto"):
    """``fc2((act(fc1(x)) * gate)[..., keep])`` with dense weights; see the module docstring.

    ``backend``: "torch" (reference), "triton" (differentiable in x, weights, biases and gate;
    ``keep`` must hold unique indices and ``gate`` be 1-D), "cuda"/"cpu" (csrc kernels, forward
    only) or "auto" (pyengine/ops/priority.py: torch until GPU timings show a faster backend).
    """
    OP.check_backend(backend)
    check_inputs(x, w1, w2, act)
    return dispatch(OP, backend, x, w1, b1, w2, b2, keep, gate, act)
