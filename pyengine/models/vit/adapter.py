"""The adapter of timm VisionTransformer models (vit_*, deit*, deit3, dinov2, flexivit, ...).

Structure units: per block, the heads of the attention branch with their q/k and value dims,
and the FFN neurons (:class:`~pyengine.structure.spec.Spec`). Gated modules are in
:mod:`.gated`, compact ones in :mod:`.compact`, costs in :mod:`.cost`, importance units in
:mod:`.importance`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pyengine.models.base import Adapter, UnsupportedModuleError, register_adapter
from pyengine.models.vit.compact import CompactBlock, compact_block, fold_gates
from pyengine.models.vit.gated import GatedAttention, GatedMlp
from pyengine.structure.spec import Block, Geometry, Head, Spec, SpecError

SUPPORTED = "timm VisionTransformer models (vit_*, deit_*, deit_*_distilled)"


def _is_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer
    return isinstance(model, VisionTransformer)


def geometry(model: nn.Module) -> Geometry:
    """The dense geometry of a timm ViT, gated or not (compact models carry theirs in the spec)."""
    spec = getattr(model, "pyengine_spec", None)
    if spec is not None and spec.dense is not None:
        return spec.dense
    if not _is_vit(model):
        raise UnsupportedModuleError(f"{type(model).__name__} is not a timm VisionTransformer; "
                                     f"supported: {SUPPORTED}")
    blk = model.blocks[0]
    attn, mlp = blk.attn, blk.mlp
    if not hasattr(attn, "num_heads") or not hasattr(mlp, "fc1"):
        raise UnsupportedModuleError(f"block 0 has {type(attn).__name__}/{type(mlp).__name__}; "
                                     f"supported: {SUPPORTED}")
    pe = model.patch_embed
    return Geometry(
        depth=len(model.blocks), embed_dim=model.embed_dim, num_heads=attn.num_heads,
        head_dim=attn.head_dim, mlp_hidden=mlp.fc1.out_features,
        num_tokens=pe.num_patches + model.num_prefix_tokens,
        num_patches=pe.num_patches, in_chans=pe.proj.in_channels,
        patch_size=tuple(pe.patch_size), num_classes=model.num_classes,
        qkv_bias=attn.qkv.bias is not None)


def gated_blocks(model: nn.Module) -> list[tuple[GatedAttention, GatedMlp]]:
    """``[(gated attention, gated FFN)]`` per block; ValueError if the model is not gated."""
    if not any(isinstance(m, (GatedAttention, GatedMlp)) for m in model.modules()):
        raise ValueError("model is not gated: call pyengine.gate(model) first")
    return [(b.attn, b.mlp) for b in model.blocks]


@register_adapter
class ViTAdapter(Adapter):
    name = "vit"
    spec_type = Spec
    spec_label = "ViT spec (blocks)"
    geometry_type = Geometry
    supported = SUPPORTED

    def supports(self, model: nn.Module) -> str | None:
        return None if _is_vit(model) else "not a timm VisionTransformer"

    def check(self, model: nn.Module) -> None:
        geometry(model)  # fails early, with a clear message, on unsupported blocks

    def geometry(self, model: nn.Module) -> Geometry:
        return geometry(model)

    def is_gated(self, model: nn.Module) -> bool:
        return any(isinstance(m, (GatedAttention, GatedMlp)) for m in model.modules())

    def is_compact(self, model: nn.Module) -> bool:
        return any(isinstance(m, CompactBlock) for m in model.modules())

    def gate(self, model: nn.Module, make_gates) -> None:
        from timm.models.vision_transformer import Block as TimmBlock
        # build all gated modules first, so an unsupported block leaves the model untouched
        new = []
        for i, blk in enumerate(model.blocks):
            if type(blk) is not TimmBlock:
                raise UnsupportedModuleError(
                    f"blocks.{i} is {type(blk).__module__}.{type(blk).__name__}; pyengine gates "
                    "timm's pre-norm vision_transformer.Block")
            new.append((GatedAttention(blk.attn, make_gates), GatedMlp(blk.mlp, make_gates)))
        for blk, (a, m) in zip(model.blocks, new):
            blk.attn, blk.mlp = a, m

    def gate_sets(self, model: nn.Module) -> list:
        return [g for attn, mlp in gated_blocks(model) for g in (attn.gates, mlp.gates)]

    def spec(self, model: nn.Module, name: str | None) -> Spec:
        g = geometry(model)
        if not self.is_gated(model):
            return Spec.full(g, model=name)
        blocks = []
        for attn, mlp in gated_blocks(model):
            a, m = attn.gates.hard(), mlp.gates.hard()
            heads = []
            if bool(a["block"]):
                for h in range(attn.num_heads):
                    if bool(a["head"][h]):
                        heads.append(Head(h, tuple(torch.nonzero(a["qk"][h]).flatten().tolist()),
                                          tuple(torch.nonzero(a["v"][h]).flatten().tolist())))
            mlp_idx = (tuple(torch.nonzero(m["neuron"]).flatten().tolist())
                       if bool(m["block"]) else ())
            blocks.append(Block(tuple(heads), mlp_idx))
        return Spec(tuple(blocks), model=name, dense=g)

    def apply(self, model: nn.Module, s: Spec, name: str | None) -> None:
        g = geometry(model)
        s.check_geometry(g, name)
        if s.dense is not None and s.dense != g:
            raise SpecError(f"spec was made for a model of geometry {s.dense}, this one is {g}")
        for (attn, mlp), b in zip(gated_blocks(model), s.blocks):
            dev = attn.qkv.weight.device
            H, Dh = attn.num_heads, attn.head_dim
            head = torch.zeros(H, dtype=torch.bool, device=dev)
            qk = torch.zeros(H, Dh, dtype=torch.bool, device=dev)
            v = torch.zeros(H, Dh, dtype=torch.bool, device=dev)
            for h in b.heads:
                head[h.index] = True
                qk[h.index, list(h.qk)] = True
                v[h.index, list(h.v)] = True
            attn.gates.set_hard({"block": torch.tensor(b.has_attn, device=dev), "head": head,
                                 "qk": qk, "v": v})
            neuron = torch.zeros(mlp.hidden, dtype=torch.bool, device=dev)
            neuron[list(b.mlp)] = True
            mlp.gates.set_hard({"block": torch.tensor(b.has_mlp, device=dev), "neuron": neuron})

    def fold_gates(self, model: nn.Module) -> None:
        fold_gates(model)

    def build(self, container: nn.Module, s: Spec, copy_weights: bool) -> nn.Module:
        from pyengine.models.vit.layout import layout_of
        layout = layout_of(s)  # the head layout pyengine.compile chose (None: exact)
        for i, b in enumerate(s.blocks):
            bl = layout.blocks[i] if layout is not None else None
            container.blocks[i] = compact_block(
                container.blocks[i], b, copy_weights, layout=bl,
                mode=layout.mode if layout is not None else "exact",
                planned_device=layout.device_type if layout is not None else None)
        container.pyengine_spec = s
        return container

    def plan_layout(self, s: Spec, layout: str, device, dtype, batches=None, log=None) -> Spec:
        from pyengine.models.vit.layout import plan
        return plan(s, layout, device=device, dtype=dtype, batches=batches, log=log)

    def rebuild_kwargs(self, model: nn.Module) -> dict[str, Any]:
        g = geometry(model)
        blk = model.blocks[0]
        from timm.layers import LayerScale
        kw: dict[str, Any] = dict(
            img_size=list(model.patch_embed.img_size), patch_size=list(g.patch_size),
            in_chans=g.in_chans, num_classes=g.num_classes, global_pool=model.global_pool,
            embed_dim=g.embed_dim, depth=g.depth, num_heads=g.num_heads,
            mlp_ratio=g.mlp_hidden / g.embed_dim, qkv_bias=g.qkv_bias,
            class_token=model.cls_token is not None, reg_tokens=model.num_reg_tokens,
            no_embed_class=model.no_embed_class,
            pre_norm=not isinstance(model.norm_pre, nn.Identity),
            fc_norm=not isinstance(model.fc_norm, nn.Identity),
            init_values=1.0 if isinstance(blk.ls1, LayerScale) else None,
            dynamic_img_size=getattr(model, "dynamic_img_size", False))
        return kw

    def cost(self, model_or_spec, rows, batch: int, **options) -> str:
        from pyengine.models.vit.cost import cost_rows
        return cost_rows(model_or_spec, rows, batch, **options)

    def ledger(self, g: Geometry, model: str | None, **constraints):
        from pyengine.models.vit.ledger import ViTLedger
        return ViTLedger(g, model, **constraints)

    def importance(self, model: nn.Module):
        from pyengine.models.vit.importance import ViTUnits
        return ViTUnits(model)

    def synthetic_spec(self, model: nn.Module, target: float, seed: int = 0,
                       name: str | None = None) -> Spec:
        from pyengine.structure.synthetic import heterogeneous_spec
        return heterogeneous_spec(geometry(model), float(target), seed=seed, model=name)

    def expected_macs(self, model: nn.Module, probs=None, batch: int = 1, transform=None):
        # blocks share one shape: stacked over blocks, a few big kernels per step
        from pyengine.cost.expected import (_distilled, expected_stacked_macs, gate_probs,
                                            stack_probs)
        g = geometry(model)
        pairs = gate_probs(model) if probs is None else list(zip(probs[0::2], probs[1::2]))
        attn, mlp = stack_probs(pairs)
        if transform is not None:
            attn = {k: transform(k, v) for k, v in attn.items()}
            mlp = {k: transform(k, v) for k, v in mlp.items()}
        return expected_stacked_macs(g, attn, mlp, batch=batch,
                                     distilled=_distilled(model, g.depth))

    def project(self, model: nn.Module, scores, target: float, **options):
        from pyengine.structure.solver import project
        return project(model, list(zip(scores[0::2], scores[1::2])), target, **options)


def is_gated(model: nn.Module) -> bool:
    return ViTAdapter().is_gated(model)
