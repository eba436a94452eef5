"""The importance units of a timm ViT block: which weights and features each prunable
structure owns, for the criteria of :mod:`pyengine.methods.criteria`.

A block with H heads of Dh dims (``qkv`` rows ordered (q|k|v, head, dim) as timm reshapes
them) and an FFN of M neurons:

* q/k dim (h, d): qkv rows ``h*Dh+d`` (q) and ``H*Dh + h*Dh+d`` (k); features q and k there.
* v dim (h, d):   qkv row ``2*H*Dh + h*Dh+d`` (v) and proj column ``h*Dh+d``; feature v there.
* head h:         all its q/k and v dims.
* neuron j:       fc1 row j and fc2 column j; feature = the activation fc2 reads (after act).
* attention / FFN branch: every weight and bias of the branch; feature = the branch output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pyengine.models.importance import Branch, Group, Hook, LayerView, Part

__all__ = ["BlockScores", "ViTUnits", "blocks"]


@dataclass
class BlockScores:
    """Scores of one transformer block (float64, CPU). Higher means more important."""

    head: torch.Tensor    # [H]
    qk: torch.Tensor      # [H, Dh]
    v: torch.Tensor       # [H, Dh]
    neuron: torch.Tensor  # [M]
    attn: float           # the whole attention branch
    mlp: float            # the whole FFN branch


def blocks(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(attention, mlp) of every block of a timm ViT, gated or not (they expose qkv/proj and
    fc1/fc2 either way)."""
    out = []
    for i, b in enumerate(getattr(model, "blocks", [])):
        attn, mlp = getattr(b, "attn", None), getattr(b, "mlp", None)
        if not all(hasattr(attn, a) for a in ("qkv", "proj", "num_heads", "head_dim")) or \
                not all(hasattr(mlp, a) for a in ("fc1", "fc2")):
            raise TypeError(f"blocks.{i} is not a standard (or gated) timm attention/Mlp block; "
                            "compact (compiled) models cannot be scored, score the gated one")
        out.append((attn, mlp))
    return out


class ViTUnits:
    """The importance units of every block of a timm ViT (gated or not)."""

    def __init__(self, model: nn.Module):
        self.blocks = blocks(model)

    def hooks(self, i: int) -> list[Hook]:
        attn, mlp = self.blocks[i]
        return [Hook("attn_in", attn.qkv, "input"), Hook("qkv_out", attn.qkv, "output"),
                Hook("proj_in", attn.proj, "input"), Hook("attn_out", attn, "output"),
                Hook("mlp_in", mlp.fc1, "input"), Hook("hidden", mlp.fc2, "input"),
                Hook("mlp_out", mlp, "output")]

    def layers(self, i: int) -> dict[str, LayerView]:
        attn, mlp = self.blocks[i]
        return {"qkv": LayerView(attn.qkv.weight, [attn.qkv.bias], "attn_in"),
                "proj": LayerView(attn.proj.weight, [attn.proj.bias], "proj_in"),
                "fc1": LayerView(mlp.fc1.weight, [mlp.fc1.bias], "mlp_in"),
                "fc2": LayerView(mlp.fc2.weight, [mlp.fc2.bias], "hidden")}

    def groups(self, i: int) -> list[Group | Branch]:
        """In the order the random criterion draws them: head, qk, v, neuron, attn, mlp."""
        attn, mlp = self.blocks[i]
        H, Dh, M = attn.num_heads, attn.head_dim, mlp.fc1.out_features
        hd = torch.arange(H * Dh).view(H, Dh)  # index of (head, dim) within q, k or v
        q, k, v = hd, H * Dh + hd, 2 * H * Dh + hd
        n = torch.arange(M)
        return [
            Group("head", (H,),
                  [Part("qkv", "row", q), Part("qkv", "row", k), Part("qkv", "row", v),
                   Part("proj", "col", hd)],
                  [Part("qkv_out", "feature", q), Part("qkv_out", "feature", k),
                   Part("qkv_out", "feature", v)]),
            Group("qk", (H, Dh), [Part("qkv", "row", q[..., None]),
                                  Part("qkv", "row", k[..., None])],
                  [Part("qkv_out", "feature", q[..., None]),
                   Part("qkv_out", "feature", k[..., None])]),
            Group("v", (H, Dh), [Part("qkv", "row", v[..., None]),
                                 Part("proj", "col", hd[..., None])],
                  [Part("qkv_out", "feature", v[..., None])]),
            Group("neuron", (M,), [Part("fc1", "row", n[:, None]), Part("fc2", "col", n[:, None])],
                  [Part("hidden", "feature", n[:, None])]),
            Branch("attn", ("qkv", "proj"), "attn_out"),
            Branch("mlp", ("fc1", "fc2"), "mlp_out"),
        ]

    def assemble(self, i: int, values: dict) -> BlockScores:
        return BlockScores(values["head"], values["qk"], values["v"], values["neuron"],
                           float(values["attn"]), float(values["mlp"]))
