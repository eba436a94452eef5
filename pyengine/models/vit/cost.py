"""Cost of a (pruned) timm ViT: the MAC formulas and the per-layer rows of its Spec.

What is counted, per transformer block with N tokens, width D, kept heads h with q/k dims
``qk_h`` and value dims ``v_h``, and ``m`` kept FFN neurons (per image):

* attention (only if the block keeps a head): qkv Linear ``N*D*(2*sum qk_h + sum v_h)``,
  scores ``N*N*qk_h`` and P@V ``N*N*v_h`` for every head with ``qk_h > 0`` (a head with no
  q/k dims attends uniformly, a mean of V over tokens: 0 MACs), proj ``N*(sum v_h)*D``;
* FFN (only if the block keeps a neuron): fc1 ``N*D*m`` and fc2 ``N*m*D``;
* outside the blocks: patch-embedding conv ``P*D*C*ph*pw`` over P patches, and the classifier
  ``D*num_classes`` per image (twice for distilled DeiTs, which have a second head).

A compact model whose spec carries a head layout (``pyengine.compile``: heads zero-padded
inside buckets) is costed at its bucket widths, what it really computes; :func:`total_macs` of
a spec counts the pruned structure itself.

Attention is costed as one fused kernel (flash style: Q, K, V in, output out, the N x N scores
never reach memory) unless ``attention="math"``. The small ``*_macs`` functions are the
formulas themselves; the differentiable expected cost (:mod:`pyengine.cost.expected`) mirrors
them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from pyengine.structure.spec import Geometry, Spec

__all__ = ["qkv_macs", "attention_macs", "proj_macs", "attn_macs", "mlp_macs", "block_macs",
           "patch_embed_macs", "head_macs", "total_macs", "cost_rows", "is_distilled"]


def qkv_macs(g: Geometry, qk_dims: Sequence[int], v_dims: Sequence[int], batch: int = 1) -> int:
    """Fused qkv Linear D -> 2*sum(qk) + sum(v) over N tokens (0 if no head is kept)."""
    if len(v_dims) == 0:
        return 0
    return batch * g.num_tokens * g.embed_dim * (2 * sum(qk_dims) + sum(v_dims))


def attention_macs(g: Geometry, qk_dims: Sequence[int], v_dims: Sequence[int],
                   batch: int = 1) -> int:
    """Scores Q K^T (N*N*qk) plus P V (N*N*v) per head; a head with qk == 0 is a mean: 0."""
    n = g.num_tokens
    return batch * n * n * sum(qk + v for qk, v in zip(qk_dims, v_dims) if qk > 0)


def proj_macs(g: Geometry, v_dims: Sequence[int], batch: int = 1) -> int:
    """Output projection Linear sum(v) -> D over N tokens."""
    return batch * g.num_tokens * sum(v_dims) * g.embed_dim


def attn_macs(g: Geometry, qk_dims: Sequence[int], v_dims: Sequence[int], batch: int = 1) -> int:
    """The whole attention branch of one block."""
    return (qkv_macs(g, qk_dims, v_dims, batch) + attention_macs(g, qk_dims, v_dims, batch)
            + proj_macs(g, v_dims, batch))


def mlp_macs(g: Geometry, m: int, batch: int = 1) -> int:
    """fc1 D -> m and fc2 m -> D over N tokens (0 when the FFN is removed, m == 0)."""
    return 2 * batch * g.num_tokens * g.embed_dim * m


def block_macs(g: Geometry, qk_dims: Sequence[int], v_dims: Sequence[int], m: int,
               batch: int = 1) -> int:
    """One transformer block: attention branch + FFN branch."""
    return attn_macs(g, qk_dims, v_dims, batch) + mlp_macs(g, m, batch)


def patch_embed_macs(g: Geometry, batch: int = 1) -> int:
    """Patch-embedding conv (kernel = stride = patch size) over num_patches positions."""
    ph, pw = g.patch_size
    return batch * g.num_patches * g.embed_dim * g.in_chans * ph * pw


def head_macs(g: Geometry, batch: int = 1, num_heads: int = 1) -> int:
    """Classifier Linear D -> num_classes on the pooled token (num_heads=2: distilled DeiT)."""
    return batch * num_heads * g.embed_dim * g.num_classes


def total_macs(spec: Spec, batch: int = 1, distilled: bool | None = None) -> int:
    """Total MACs of ``spec`` (which must carry ``dense``) for ``batch`` images."""
    g = _geometry(spec)
    if distilled is None:
        distilled = _distilled_from_name(spec.model)
    return (patch_embed_macs(g, batch)
            + sum(block_macs(g, b.qk_dims, b.v_dims, len(b.mlp), batch) for b in spec.blocks)
            + head_macs(g, batch, 2 if distilled else 1))


def is_distilled(model: torch.nn.Module, depth: int) -> bool:
    """A distilled DeiT (a second classifier head, ``head_dist``)."""
    return _extras_from_model(model, depth).distilled


def _distilled_from_name(name: str | None) -> bool:
    return bool(name) and "distilled" in name


def _geometry(spec: Spec) -> Geometry:
    g = spec.dense
    if g is None:
        raise ValueError("cost needs the dense geometry: this Spec has no 'dense' field. Use "
                         "pyengine.spec(model) (which fills it) or spec.with_dense(geometry).")
    for name in ("num_tokens", "num_patches"):
        if getattr(g, name) <= 0:
            raise ValueError(f"cost needs dense.{name} (the spec's geometry has {name}="
                             f"{getattr(g, name)}); build the spec from a model or fill it in")
    return g


@dataclass
class _Extras:
    """Facts about the model outside the Spec (defaults: what the geometry implies)."""

    distilled: bool = False            # a second classifier head (head_dist)
    layer_scale: Sequence[bool] = ()   # per block: LayerScale after each branch
    pos_tokens: int | None = None      # tokens the position embedding covers
    norm_pre: bool = False             # LayerNorm before the blocks (CLIP-style ViTs)
    final_norm: bool = True            # LayerNorm over all tokens after the blocks
    fc_norm: bool = False              # LayerNorm on the pooled feature instead
    pool: str = "token"                # global_pool: "token" (a slice) or "avg" (a mean)


def _extras_from_model(model: torch.nn.Module, depth: int) -> _Extras:
    ex = _Extras()
    ex.distilled = isinstance(getattr(model, "head_dist", None), torch.nn.Linear)
    blocks = getattr(model, "blocks", None)
    if blocks is not None:
        try:
            ls = [hasattr(getattr(b, "ls1", None), "gamma")
                  or hasattr(getattr(b, "ls2", None), "gamma") for b in blocks]
            if len(ls) == depth:
                ex.layer_scale = ls
        except TypeError:
            pass
    pe = getattr(model, "pos_embed", None)
    if isinstance(pe, torch.Tensor) and pe.dim() == 3:
        ex.pos_tokens = int(pe.shape[1])

    def present(attr: str, default: bool) -> bool:
        if not hasattr(model, attr):
            return default
        mod = getattr(model, attr)
        return mod is not None and not isinstance(mod, torch.nn.Identity)

    ex.norm_pre = present("norm_pre", False)
    ex.final_norm = present("norm", True)
    ex.fc_norm = present("fc_norm", False)
    pool = getattr(model, "global_pool", "token")
    ex.pool = pool if isinstance(pool, str) and pool else "token"
    return ex


def _resolve(model_or_spec: Any) -> tuple[Spec, _Extras]:
    if isinstance(model_or_spec, Spec):
        spec = model_or_spec
        g = _geometry(spec)
        return spec, _Extras(distilled=_distilled_from_name(spec.model), pos_tokens=g.num_tokens)
    if not isinstance(model_or_spec, torch.nn.Module):
        raise TypeError("cost() takes a pyengine.Spec or a model, got "
                        f"{type(model_or_spec).__name__}")
    model = model_or_spec
    spec = getattr(model, "pyengine_spec", None)
    if spec is None:
        from pyengine.api import spec as _spec
        spec = _spec(model)
    if not isinstance(spec, Spec):
        raise TypeError(f"model.pyengine_spec must be a pyengine.Spec, got {type(spec).__name__}")
    g = _geometry(spec)
    ex = _extras_from_model(model, g.depth)
    if not ex.distilled:
        ex.distilled = _distilled_from_name(spec.model) and not hasattr(model, "head")
    return spec, ex


def cost_rows(model_or_spec: Any, row, batch: int, attention: str = "fused",
              img_size: int | None = None) -> str:
    """Add the rows of a ViT (a Spec with dense geometry, or a compact/gated/timm model) to
    ``row`` (a :class:`pyengine.cost.model.Rows`); returns the attention costing used."""
    if img_size is not None:
        raise ValueError("img_size is for CNNs; a ViT's input size is part of its geometry")
    if attention not in ("fused", "math"):
        raise ValueError(f"attention must be 'fused' or 'math', got {attention!r}")
    spec, ex = _resolve(model_or_spec)
    # a compact model's head layout pads heads inside buckets: count what it computes
    from pyengine.models.vit.layout import computed_spec
    spec = computed_spec(spec)
    g = _geometry(spec)
    B, N, D, P = batch, g.num_tokens, g.embed_dim, g.num_patches
    ph, pw = g.patch_size
    prefix = N - P
    tok = B * N * D  # one activation of the residual stream

    # ---- stem
    pe_w = D * g.in_chans * ph * pw + D
    row("patch_embed", "conv", patch_embed_macs(g, B), pe_w,
        B * P * g.in_chans * ph * pw + B * P * D)
    pos_tokens = ex.pos_tokens if ex.pos_tokens is not None else N
    # cat prefix tokens, add the position embedding: read patches, write the stream
    row("pos_embed", "elementwise", 0, pos_tokens * D + prefix * D, B * P * D + tok)

    if ex.norm_pre:
        row("norm_pre", "norm", 0, 2 * D, 2 * tok)

    # ---- blocks
    for i, blk in enumerate(spec.blocks):
        pre = f"blocks.{i}"
        ls = bool(ex.layer_scale[i]) if ex.layer_scale else False
        if blk.has_attn:
            qk, v = blk.qk_dims, blk.v_dims
            q_out = 2 * sum(qk) + sum(v)
            sv = sum(v)
            row(f"{pre}.norm1", "norm", 0, 2 * D, 2 * tok)
            row(f"{pre}.attn.qkv", "linear", qkv_macs(g, qk, v, B),
                D * q_out + (q_out if g.qkv_bias else 0), tok + B * N * q_out)
            if attention == "fused":
                row(f"{pre}.attn.sdpa", "attention", attention_macs(g, qk, v, B), 0,
                    B * N * q_out + B * N * sv)
            else:
                live = [(a, b) for a, b in zip(qk, v) if a > 0]
                hp = len(live)
                row(f"{pre}.attn.scores", "attention", B * N * N * sum(a for a, _ in live), 0,
                    B * N * 2 * sum(qk) + B * hp * N * N)
                row(f"{pre}.attn.softmax", "elementwise", 0, 0, 2 * B * hp * N * N)
                row(f"{pre}.attn.pv", "attention", B * N * N * sum(b for _, b in live), 0,
                    B * hp * N * N + 2 * B * N * sv)
            row(f"{pre}.attn.proj", "linear", proj_macs(g, v, B), sv * D + D, B * N * sv + tok)
            if ls:
                row(f"{pre}.ls1", "elementwise", 0, D, 2 * tok)
            row(f"{pre}.add1", "elementwise", 0, 0, 3 * tok)
        if blk.has_mlp:
            m = len(blk.mlp)
            row(f"{pre}.norm2", "norm", 0, 2 * D, 2 * tok)
            row(f"{pre}.mlp.fc1", "linear", B * N * D * m, D * m + m, tok + B * N * m)
            row(f"{pre}.mlp.act", "elementwise", 0, 0, 2 * B * N * m)
            row(f"{pre}.mlp.fc2", "linear", B * N * m * D, m * D + D, B * N * m + tok)
            if ls:
                row(f"{pre}.ls2", "elementwise", 0, D, 2 * tok)
            row(f"{pre}.add2", "elementwise", 0, 0, 3 * tok)

    # ---- final norm (over all tokens, as timm does), pooling, classifier(s)
    if ex.final_norm:
        row("norm", "norm", 0, 2 * D, 2 * tok)
    if ex.pool in ("avg", "avgmax", "max"):
        row("pool", "elementwise", 0, 0, B * P * D + B * D)
    if ex.fc_norm:
        row("fc_norm", "norm", 0, 2 * D, 2 * B * D)
    if g.num_classes > 0:
        c = g.num_classes
        row("head", "linear", head_macs(g, B, 1), D * c + c, B * D + B * c)
        if ex.distilled:
            row("head_dist", "linear", head_macs(g, B, 1), D * c + c, B * D + B * c)

    return attention
