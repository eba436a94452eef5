"""Differentiable expected MACs of a gated ViT from its gate keep-probabilities.

It mirrors :mod:`pyengine.cost_model` term by term (HiAP's C1/C2/C3 ledger, extended with q/k
dims). With independent Bernoulli gates (probabilities ``p``) and the hard semantics of
:func:`pyengine.gates._consistent` (a head is alive iff block * head * any(v); a block whose
heads or neurons are all off costs nothing), per block with N tokens and width D:

    pa_h   = p_block * p_head_h                         (macro)
    anyv_h = 1 - prod_j (1 - p_v[h, j]),  anyq_h likewise over p_qk[h, :]
    qkv    = N*D * sum_h (2 * pa_h * anyv_h * sum_j p_qk[h, j] + pa_h * sum_j p_v[h, j])
    scores + P@V = N*N * sum_h pa_h * (anyv_h * sum_j p_qk[h, j] + anyq_h * sum_j p_v[h, j])
    proj   = N*D * sum_h pa_h * sum_j p_v[h, j]
    FFN    = 2*N*D * p_block_ffn * sum_k p_neuron[k]

plus the patch embedding and classifier(s), which are fixed. These are exact expectations
(each term is a product of independent gates, and ``sum_j p_v > 0`` already implies any(v)),
so with probabilities exactly 0/1 the value equals ``cost_model.total_macs`` of the hard spec.
Everything is computed in float64 so that equality is exact for real model sizes.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from pyengine.models.vit.cost import _extras_from_model, head_macs, patch_embed_macs
from pyengine.structure.spec import Geometry

__all__ = ["expected_block_macs", "expected_total_macs", "expected_stacked_macs", "stack_probs",
           "expected_macs", "dense_macs", "gate_probs"]


def expected_block_macs(g: Geometry, attn: Mapping[str, torch.Tensor],
                        mlp: Mapping[str, torch.Tensor], batch: int = 1) -> torch.Tensor:
    """Expected MACs of one block from keep probabilities ``attn`` {block, head, qk, v} and
    ``mlp`` {block, neuron} (the gate slots)."""
    n, d = g.num_tokens, g.embed_dim
    qk, v = attn["qk"].double(), attn["v"].double()
    pa = attn["block"].double() * attn["head"].double()          # [H]
    anyv = 1.0 - torch.prod(1.0 - v, dim=-1)
    anyq = 1.0 - torch.prod(1.0 - qk, dim=-1)
    sq, sv = qk.sum(-1), v.sum(-1)
    qkv = n * d * (2.0 * (pa * anyv * sq).sum() + (pa * sv).sum())
    attention = n * n * (pa * (anyv * sq + anyq * sv)).sum()
    proj = n * d * (pa * sv).sum()
    ffn = 2.0 * n * d * mlp["block"].double() * mlp["neuron"].double().sum()
    return batch * (qkv + attention + proj + ffn)


def stack_probs(probs: Sequence[tuple[Mapping, Mapping]]) -> tuple[dict, dict]:
    """Per-block slot dicts -> one dict per branch of tensors with a leading block axis."""
    attn = {k: torch.stack([a[k] for a, _ in probs]) for k in ("block", "head", "qk", "v")}
    mlp = {k: torch.stack([m[k] for _, m in probs]) for k in ("block", "neuron")}
    return attn, mlp


def expected_stacked_macs(g: Geometry, attn: Mapping[str, torch.Tensor],
                          mlp: Mapping[str, torch.Tensor], batch: int = 1,
                          distilled: bool = False) -> torch.Tensor:
    """:func:`expected_total_macs` over stacked probabilities (block axis first): the same
    formulas as :func:`expected_block_macs`, for all blocks in a few kernels."""
    if attn["head"].shape[0] != g.depth:
        raise ValueError(f"expected {g.depth} blocks of gate probabilities, got "
                         f"{attn['head'].shape[0]}")
    n, d = g.num_tokens, g.embed_dim
    qk, v = attn["qk"].double(), attn["v"].double()               # [L, H, Dh]
    pa = attn["block"].double()[:, None] * attn["head"].double()  # [L, H]
    anyv = 1.0 - torch.prod(1.0 - v, dim=-1)
    anyq = 1.0 - torch.prod(1.0 - qk, dim=-1)
    sq, sv = qk.sum(-1), v.sum(-1)
    qkv = n * d * (2.0 * (pa * anyv * sq).sum() + (pa * sv).sum())
    attention = n * n * (pa * (anyv * sq + anyq * sv)).sum()
    proj = n * d * (pa * sv).sum()
    ffn = 2.0 * n * d * (mlp["block"].double() * mlp["neuron"].double().sum(-1)).sum()
    fixed = patch_embed_macs(g, batch) + head_macs(g, batch, 2 if distilled else 1)
    return batch * (qkv + attention + proj + ffn) + float(fixed)


def expected_total_macs(g: Geometry, probs: Sequence[tuple[Mapping, Mapping]], batch: int = 1,
                        distilled: bool = False) -> torch.Tensor:
    """Expected MACs of the whole model: fixed stem and classifier(s) + the blocks."""
    if len(probs) != g.depth:
        raise ValueError(f"expected {g.depth} blocks of gate probabilities, got {len(probs)}")
    return expected_stacked_macs(g, *stack_probs(probs), batch=batch, distilled=distilled)


def gate_probs(model: nn.Module) -> list[tuple[dict, dict]]:
    """Keep probabilities of every gate slot of a gated model.

    Gate kinds with a ``probs()`` method (HiAP) report them; any other kind reports its
    current hard masks as 0/1."""
    from pyengine.models.vit.adapter import gated_blocks as _gated_blocks
    out = []
    for attn, mlp in _gated_blocks(model):
        pair = []
        for gates in (attn.gates, mlp.gates):
            if hasattr(gates, "probs"):
                pair.append(gates.probs())
            else:
                pair.append({k: v.double() for k, v in gates.hard().items()})
        out.append(tuple(pair))
    return out


def _distilled(model: nn.Module, depth: int) -> bool:
    return _extras_from_model(model, depth).distilled


def expected_macs(model: nn.Module, batch: int = 1,
                  probs: Sequence[tuple[Mapping, Mapping]] | None = None) -> torch.Tensor:
    """Differentiable expected MACs (float64 scalar) of a gated ``model`` for ``batch`` images;
    ``probs`` overrides the gates' own probabilities (e.g. with rescaled gradients)."""
    from pyengine.models.vit.adapter import geometry
    g = geometry(model)
    if probs is None:
        probs = gate_probs(model)
    return expected_total_macs(g, probs, batch, _distilled(model, g.depth))


def dense_macs(model: nn.Module, batch: int = 1) -> int:
    """MACs of the unpruned model (everything kept), from the cost model."""
    from pyengine.models.vit.cost import total_macs
    from pyengine.structure.spec import Spec
    from pyengine.models.vit.adapter import geometry
    from pyengine.models.factory import model_name
    g = geometry(model)
    return total_macs(Spec.full(g, model=model_name(model)), batch,
                      distilled=_distilled(model, g.depth))
