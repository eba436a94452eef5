"""Gated drop-in replacements for timm's Attention and Mlp.

They keep the original parameter tensors (the same ``nn.Linear`` objects), so pretrained
weights and optimizer state carry over, and multiply in the gate values of their gate set.
q/k dimension gates multiply q and k alike, so the hard-gated operator is exactly the one a
compact model computes after ``pyengine.compile``.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pyengine.models.base import UnsupportedModuleError
from pyengine.structure.gates import Gates




def _require(cond: bool, module: nn.Module, what: str, supported: str) -> None:
    if not cond:
        raise UnsupportedModuleError(
            f"cannot gate {type(module).__module__}.{type(module).__name__}: {what}. "
            f"Supported: {supported}")


ATTN_SUPPORTED = ("timm.layers.Attention without qk_norm, scale_norm or gated output "
                  "(vit_*, deit_* models)")
MLP_SUPPORTED = "timm.layers.Mlp with nn.Linear layers and no hidden norm"


class GatedAttention(nn.Module):
    def __init__(self, attn: nn.Module, make_gates: Callable[[Mapping], Gates]):
        super().__init__()
        from timm.layers import Attention
        _require(type(attn) is Attention, attn, "not timm's standard Attention", ATTN_SUPPORTED)
        _require(isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity),
                 attn, "qk_norm normalizes over the whole head dim, so pruned dims change it",
                 ATTN_SUPPORTED)
        _require(isinstance(attn.norm, nn.Identity), attn, "scale_norm is not supported",
                 ATTN_SUPPORTED)
        _require(getattr(attn, "gate", None) is None, attn, "gated attention output is not "
                 "supported", ATTN_SUPPORTED)
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.scale = attn.scale
        self.qkv = attn.qkv
        self.attn_drop = attn.attn_drop
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop
        H, Dh = self.num_heads, self.head_dim
        self.gates = make_gates({"block": (), "head": (H,), "qk": (H, Dh), "v": (H, Dh)})

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        g = self.gates.values()
        B, N, _ = x.shape
        H, Dh = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
        qk = g["qk"][None, :, None, :]
        q, k = q * qk, k * qk
        v = v * (g["v"] * g["head"][:, None])[None, :, None, :]
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
            dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, H * Dh)))
        return x * g["block"]

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, gates={self.gates.kind}"


class GatedMlp(nn.Module):
    def __init__(self, mlp: nn.Module, make_gates: Callable[[Mapping], Gates]):
        super().__init__()
        from timm.layers import Mlp
        _require(type(mlp) is Mlp, mlp, "not timm's standard Mlp", MLP_SUPPORTED)
        _require(isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear), mlp,
                 "1x1-conv Mlp (use_conv=True)", MLP_SUPPORTED)
        _require(isinstance(mlp.norm, nn.Identity), mlp, "a norm over the hidden neurons changes "
                 "when neurons are pruned", MLP_SUPPORTED)
        self.fc1, self.act, self.drop1 = mlp.fc1, mlp.act, mlp.drop1
        self.fc2, self.drop2 = mlp.fc2, mlp.drop2
        self.hidden = mlp.fc1.out_features
        self.gates = make_gates({"block": (), "neuron": (self.hidden,)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gates.values()
        h = self.drop1(self.act(self.fc1(x))) * g["neuron"]
        return self.drop2(self.fc2(h)) * g["block"]

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, gates={self.gates.kind}"
