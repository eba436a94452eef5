"""The torch reference of masked_ffn and its argument checks (the ground truth of tests).

The reference gathers the kept rows/columns of the dense weights and runs two linears.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTS = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu,
        "silu": F.silu}


def check_inputs(x, w1, w2, act: str) -> None:
    if act not in ACTS:
        raise ValueError(f"masked_ffn: unknown activation {act!r}; choose from {sorted(ACTS)}")
    if x.shape[-1] != w1.shape[1] or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"masked_ffn: shapes do not chain: x {tuple(x.shape)}, w1 "
                         f"{tuple(w1.shape)}, w2 {tuple(w2.shape)}")


def masked_ffn_reference(x, w1, b1, w2, b2, keep=None, gate=None, act: str = "gelu"):
    check_inputs(x, w1, w2, act)
    if keep is not None:
        keep = torch.as_tensor(keep, dtype=torch.long, device=w1.device)
        w1, w2 = w1.index_select(0, keep), w2.index_select(1, keep)
        b1 = b1.index_select(0, keep) if b1 is not None else None
        gate = gate.index_select(-1, keep) if gate is not None else None
    h = ACTS[act](F.linear(x, w1, b1))
    if gate is not None:
        h = h * gate
    return F.linear(h, w2, b2)
