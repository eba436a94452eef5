"""Differentiable expected MACs of a gated EVA / BEiT / Swin model from its gates' keep
probabilities (HiAP's budget term), term by term the formulas of :mod:`.cost`.

With independent Bernoulli gates and the hard semantics of ``structure.gates._consistent`` (a
head lives iff block * head * any(v); a branch without a live head or neuron costs nothing),
per block (rows R = W*n through qkv/proj, W sequences of n tokens, T FFN tokens, width D,
q/k units of u dims):

    pa_h   = p_block * p_head_h;   anyv_h = 1 - prod_j (1 - p_v[h, j])
    E qk_h = u * sum_i p_qk[h, i]  (the full head dim when q/k dims are fixed)
    qkv    = R*D * sum_h pa_h * (2 * anyv_h * E qk_h + sum_j p_v[h, j])
    core   = W*n*n * sum_h pa_h * (anyv_h * E qk_h + c_h * sum_j p_v[h, j])
             c_h = 1 with an additive scores bias, else anyq_h = 1 - prod_i (1 - p_qk[h, i])
    proj   = R*D * sum_h pa_h * sum_j p_v[h, j]
    FFN    = T*D*(3 gated | 2) * p_block_ffn * sum_k p_neuron[k]

Each term is a product of independent gates, so these are exact expectations: with 0/1
probabilities the value is the cost model's MACs of the hard structure.
"""
from __future__ import annotations

import functools
from typing import Mapping, Sequence

import torch

from pyengine.models.transformer.cost import block_macs
from pyengine.models.transformer.spec import BlockShape

__all__ = ["expected_block_macs", "expected_total_macs", "fixed_macs"]


def expected_block_macs(sh: BlockShape, attn: Mapping[str, torch.Tensor],
                        mlp: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Expected MACs of one block per image (float64)."""
    R, D, n2 = sh.attn_rows, sh.dim, sh.windows * sh.window * sh.window
    v = attn["v"].double()
    pa = attn["block"].double() * attn["head"].double()
    sv = v.sum(-1)
    anyv = 1.0 - torch.prod(1.0 - v, dim=-1)
    if "qk" in attn:
        qk = attn["qk"].double()
        sq = sh.qk_unit * qk.sum(-1)
        anyq = 1.0 - torch.prod(1.0 - qk, dim=-1)
    else:
        sq = torch.full_like(sv, float(sh.head_dim))
        anyq = torch.ones_like(sv)
    c = torch.ones_like(sv) if sh.attn_bias else anyq
    qkv = R * D * (pa * (2.0 * anyv * sq + sv)).sum()
    core = n2 * (pa * (anyv * sq + c * sv)).sum()
    proj = R * D * (pa * sv).sum()
    ffn = sh.tokens * D * (3 if sh.glu else 2) * mlp["block"].double() * \
        mlp["neuron"].double().sum()
    return qkv + core + proj + ffn


@functools.lru_cache(maxsize=64)
def _fixed(adapter_name: str, g) -> int:
    from pyengine.models import adapters
    a = next(x for x in adapters() if x.name == adapter_name)
    full = a.spec_type.full(g)
    return a.dense_macs(g) - sum(block_macs(sh, b) for sh, b in zip(g.shapes(), full.blocks))


def fixed_macs(adapter, g) -> int:
    """MACs outside the prunable blocks (stem, patch merging, head), per image."""
    return _fixed(adapter.name, g)


def expected_total_macs(adapter, g, probs: Sequence[Mapping[str, torch.Tensor]],
                        batch: int = 1) -> torch.Tensor:
    """Expected MACs of the whole model for ``batch`` images; ``probs`` per gate set
    (attention, FFN, attention, FFN, ... block by block)."""
    shapes = g.shapes()
    if len(probs) != 2 * len(shapes):
        raise ValueError(f"expected {2 * len(shapes)} gate sets of probabilities (attention and "
                         f"FFN of {len(shapes)} blocks), got {len(probs)}")
    total = sum(expected_block_macs(sh, probs[2 * i], probs[2 * i + 1])
                for i, sh in enumerate(shapes))
    return batch * (total + float(fixed_macs(adapter, g)))
