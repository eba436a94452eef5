"""Masked FFN: fc1 -> activation -> fc2 over only the kept neurons.

``masked_ffn(x, w1, b1, w2, b2, keep=None, gate=None)`` equals
``fc2((act(fc1(x)) * gate)[..., keep])`` written with dense weights: ``w1`` is
``[hidden, in]``, ``w2`` is ``[out, hidden]``, ``keep`` holds kept neuron indices (None: all)
and ``gate`` optional per-neuron multipliers over the full hidden width (soft gates during
training). The torch reference gathers the kept rows/columns; the Triton and CUDA kernels
(their own issues) fuse that gather into the GEMM loads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")
_ACTS = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu,
         "silu": F.silu}


def masked_ffn_reference(x, w1, b1, w2, b2, keep=None, gate=None, act: str = "gelu"):
    if act not in _ACTS:
        raise ValueError(f"masked_ffn: unknown activation {act!r}; choose from {sorted(_ACTS)}")
    if x.shape[-1] != w1.shape[1] or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"masked_ffn: shapes do not chain: x {tuple(x.shape)}, w1 "
                         f"{tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    if keep is not None:
        keep = torch.as_tensor(keep, dtype=torch.long, device=w1.device)
        w1, w2 = w1.index_select(0, keep), w2.index_select(1, keep)
        b1 = b1.index_select(0, keep) if b1 is not None else None
        gate = gate.index_select(-1, keep) if gate is not None else None
    h = _ACTS[act](F.linear(x, w1, b1))
    if gate is not None:
        h = h * gate
    return F.linear(h, w2, b2)


def masked_ffn(x, w1, b1, w2, b2, keep=None, gate=None, act: str = "gelu", backend: str = "auto"):
    if backend not in BACKENDS:
        raise ValueError(f"masked_ffn: unknown backend {backend!r}; choose from {BACKENDS}")
    if backend in ("auto", "torch"):
        return masked_ffn_reference(x, w1, b1, w2, b2, keep, gate, act)
    raise NotImplementedError(f"masked_ffn backend {backend!r} is not built yet (Triton: issue "
                              "#4, CUDA/C++: issue #5); use backend='torch' or 'auto'")
