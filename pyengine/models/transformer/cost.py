"""MACs, parameters and cost rows of one EVA / BEiT / Swin block from its shape and its part
of the spec; the families add their stem and head rows (``models/<family>/cost.py``).

Per image, a block of width D with kept heads h (q/k dims ``qk_h``, value dims ``v_h``) whose
attention runs over W sequences of n tokens (R = W*n rows; one sequence of all tokens outside
Swin) and an FFN of m kept neurons over T tokens:

* qkv Linear ``R*D*(2*sum qk_h + sum v_h)``; proj ``R*(sum v_h)*D``;
* scores ``W*n*n*qk_h`` and P@V ``W*n*n*v_h`` per head; a head without q/k dims costs no
  scores, and its P@V only when the scores have an additive bias (relative position: the
  softmax of the bias weighs the values; without a bias it is a mean, 0 MACs);
* FFN ``T*D*m`` (fc1; twice that for a gated FFN's gate and value rows) + ``T*m*D`` (fc2).

This is what :func:`pyengine.cost.count_flops` counts (2 FLOPs per MAC) for the compact model.
"""
from __future__ import annotations

from typing import Sequence

from pyengine.models.transformer.spec import BlockShape
from pyengine.structure.spec import Block

__all__ = ["attn_macs", "mlp_macs", "block_macs", "core_macs", "block_rows"]


def core_macs(sh: BlockShape, qk: Sequence[int], v: Sequence[int]) -> int:
    """Scores and P@V of the kept heads (per image)."""
    n2 = sh.windows * sh.window * sh.window
    return n2 * sum(a + (b if (a > 0 or sh.attn_bias) else 0) for a, b in zip(qk, v))


def attn_macs(sh: BlockShape, qk: Sequence[int], v: Sequence[int]) -> int:
    """The attention branch (0 when no head is kept), per image."""
    if len(v) == 0:
        return 0
    R, D = sh.attn_rows, sh.dim
    return R * D * (2 * sum(qk) + sum(v)) + core_macs(sh, qk, v) + R * sum(v) * D


def mlp_macs(sh: BlockShape, m: int) -> int:
    return sh.tokens * sh.dim * m * (3 if sh.glu else 2)


def block_macs(sh: BlockShape, b: Block) -> int:
    return attn_macs(sh, b.qk_dims, b.v_dims) + mlp_macs(sh, len(b.mlp))


def block_rows(row, pre: str, sh: BlockShape, b: Block, batch: int, attention: str = "fused",
               rope: bool = False, qk_norm: bool = False) -> None:
    """Add the cost rows of one block (module names of the compact model under ``pre``)."""
    B, D, T = batch, sh.dim, sh.tokens
    tok = B * T * D
    if b.has_attn:
        qk, v = b.qk_dims, b.v_dims
        sq, sv, hk = sum(qk), sum(v), len(v)
        out = 2 * sq + sv
        R, n, W = B * sh.attn_rows, sh.window, B * sh.windows
        bias = {"qkv": out, "qv": sq + sv, "none": 0}[sh.qkv_bias]
        row(f"{pre}.norm1", "norm", 0, 2 * D, 2 * tok)
        row(f"{pre}.attn.qkv", "linear", R * D * out, D * out + bias, tok + R * out)
        if qk_norm:
            row(f"{pre}.attn.qk_norm", "norm", 0, 4 * sh.head_dim, 4 * R * sq)
        if rope:
            row(f"{pre}.attn.rope", "elementwise", 0, 0, 4 * R * sq)
        if sh.attn_bias:
            row(f"{pre}.attn.bias", "elementwise", 0, sh.bias_rows * hk, hk * n * n)
        core = B * core_macs(sh, qk, v)
        if attention == "fused":
            row(f"{pre}.attn.sdpa", "attention", core, 0, R * out + R * sv)
        else:
            live = [(a, c) for a, c in zip(qk, v) if a > 0 or sh.attn_bias]
            hp = len(live)
            row(f"{pre}.attn.scores", "attention", W * n * n * sum(a for a, _ in live), 0,
                R * 2 * sq + W * hp * n * n)
            row(f"{pre}.attn.softmax", "elementwise", 0, 0, 2 * W * hp * n * n)
            row(f"{pre}.attn.pv", "attention", W * n * n * sum(c for _, c in live), 0,
                W * hp * n * n + 2 * R * sv)
        row(f"{pre}.attn.proj", "linear", R * sv * D, sv * D + D, R * sv + tok)
        if sh.layer_scale[0]:
            row(f"{pre}.gamma_1", "elementwise", 0, D, 2 * tok)
        row(f"{pre}.add1", "elementwise", 0, 0, 3 * tok)
    if b.has_mlp:
        m = len(b.mlp)
        k = 2 if sh.glu else 1
        row(f"{pre}.norm2", "norm", 0, 2 * D, 2 * tok)
        row(f"{pre}.mlp.fc1", "linear", B * T * D * m * k, k * (D * m + m), tok + B * T * m * k)
        row(f"{pre}.mlp.act", "elementwise", 0, 0, (k + 1) * B * T * m)
        row(f"{pre}.mlp.fc2", "linear", B * T * m * D, m * D + D, B * T * m + tok)
        if sh.layer_scale[1]:
            row(f"{pre}.gamma_2", "elementwise", 0, D, 2 * tok)
        row(f"{pre}.add2", "elementwise", 0, 0, 3 * tok)
