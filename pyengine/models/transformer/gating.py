"""Gate slots of a transformer block and the two-way mapping between hard gates and the
block's part of a spec.

Attention: ``block`` (scalar), ``head`` [H], ``qk`` [H, U] (one gate per q/k unit: a dim, or a
rotary pair; absent when q/k norm fixes the q/k dims) and ``v`` [H, Dh]. FFN: ``block`` and
``neuron`` [M] (a gated FFN's gate and value rows share their neuron's gate).
"""
from __future__ import annotations

from typing import Mapping

import torch

from pyengine.models.transformer.spec import BlockShape
from pyengine.structure.spec import Block, Head

__all__ = ["attn_shapes", "mlp_shapes", "qk_dim_gates", "unit_index", "block_of_masks",
           "masks_of_block"]


def attn_shapes(sh: BlockShape) -> dict[str, tuple[int, ...]]:
    out = {"block": (), "head": (sh.heads,)}
    if not sh.qk_fixed:
        out["qk"] = (sh.heads, sh.qk_units)
    out["v"] = (sh.heads, sh.head_dim)
    return out


def mlp_shapes(sh: BlockShape) -> dict[str, tuple[int, ...]]:
    return {"block": (), "neuron": (sh.hidden,)}


def unit_index(sh: BlockShape, device=None) -> torch.Tensor:
    """[Dh] long: the q/k unit each head dim belongs to."""
    return torch.tensor([sh.unit_of(d) for d in range(sh.head_dim)], dtype=torch.long,
                        device=device)


def qk_dim_gates(g: Mapping[str, torch.Tensor], sh: BlockShape, index: torch.Tensor
                 ) -> torch.Tensor | None:
    """Per-dim q/k gate values [H, Dh] from the unit gates (None: q/k dims are fixed)."""
    if "qk" not in g:
        return None
    qk = g["qk"]
    return qk if sh.qk_unit == 1 else qk.index_select(-1, index.to(qk.device))


def block_of_masks(attn: Mapping[str, torch.Tensor], mlp: Mapping[str, torch.Tensor],
                   sh: BlockShape) -> Block:
    """The spec block of consistent hard masks (see ``structure.gates._consistent``)."""
    heads = []
    if bool(attn["block"]):
        for h in range(sh.heads):
            if not bool(attn["head"][h]):
                continue
            if "qk" in attn:
                units = torch.nonzero(attn["qk"][h]).flatten().tolist()
                qk = sh.dims_of_units(units)
            else:
                qk = tuple(range(sh.head_dim))
            heads.append(Head(h, qk, tuple(torch.nonzero(attn["v"][h]).flatten().tolist())))
    neurons = (tuple(torch.nonzero(mlp["neuron"]).flatten().tolist())
               if bool(mlp["block"]) else ())
    return Block(tuple(heads), neurons)


def masks_of_block(b: Block, sh: BlockShape, device=None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Boolean masks per gate slot that fix the structure ``b`` (already checked against
    ``sh``)."""
    head = torch.zeros(sh.heads, dtype=torch.bool, device=device)
    v = torch.zeros(sh.heads, sh.head_dim, dtype=torch.bool, device=device)
    qk = torch.zeros(sh.heads, max(sh.qk_units, 0), dtype=torch.bool, device=device)
    for h in b.heads:
        head[h.index] = True
        v[h.index, list(h.v)] = True
        if not sh.qk_fixed:
            qk[h.index, sorted({sh.unit_of(d) for d in h.qk})] = True
    attn = {"block": torch.tensor(b.has_attn, device=device), "head": head, "v": v}
    if not sh.qk_fixed:
        attn["qk"] = qk
    neuron = torch.zeros(sh.hidden, dtype=torch.bool, device=device)
    neuron[list(b.mlp)] = True
    return attn, {"block": torch.tensor(b.has_mlp, device=device), "neuron": neuron}
