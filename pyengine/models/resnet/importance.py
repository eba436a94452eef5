"""The importance units of a timm ResNet block, for :mod:`pyengine.methods.criteria`.

A prunable channel of slot s (conv1, and conv2 in a Bottleneck) owns: the output filter of the
conv that makes it, its BN scale and shift, and the input slice of the conv that reads it; its
feature is what that reader sees (after the activation, where the gate multiplies). A residual
block's feature is its branch output (the last BN's output, before the add). A conv counts as a
Linear over (in channel, kh, kw) inputs whose input norm is that of the in channel over all
positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pyengine.models.importance import Branch, Group, Hook, LayerView, Part
from pyengine.models.resnet import blocks as resnet

__all__ = ["ConvBlockScores", "ResNetUnits", "blocks"]

_SLOT_LAYERS = {"conv1": ("conv1", "bn1", "conv2"), "conv2": ("conv2", "bn2", "conv3")}
_LAST_BN = {"basic": "bn2", "bottleneck": "bn3"}
_CONVS = {"basic": ("conv1", "conv2"), "bottleneck": ("conv1", "conv2", "conv3")}
_BNS = {"basic": ("bn1", "bn2"), "bottleneck": ("bn1", "bn2", "bn3")}
_INPUTS = {"conv1": "conv1.in", "conv2": "conv1.feature", "conv3": "conv2.feature"}


@dataclass
class ConvBlockScores:
    """Scores of one residual block: per prunable slot ("conv1", "conv2") a float64 [C] of
    channel scores, and the whole block's (its residual branch)."""

    channels: dict[str, torch.Tensor]
    block: float


def blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks of a timm ResNet (gated or not), stage by stage."""
    out = [b for st in resnet.stages(model) for b in st]
    for i, b in enumerate(out):
        if not hasattr(b, "conv1") or not hasattr(b, "conv2"):
            raise TypeError(f"residual block {i} ({type(b).__name__}) is not a timm BasicBlock/"
                            "Bottleneck or its gated form; compact models cannot be scored")
    return out


def _kind(blk: nn.Module) -> str:
    return blk.kind if hasattr(blk, "kind") else resnet._kind(blk)


class ResNetUnits:
    """The importance units of every residual block of a timm ResNet (gated or not)."""

    channels_last = True  # conv features are [B, C, H, W]: calibration moves C last

    def __init__(self, model: nn.Module):
        self.blocks = blocks(model)

    def hooks(self, i: int) -> list[Hook]:
        blk = self.blocks[i]
        kind = _kind(blk)
        out = []
        for sl in resnet._slots(kind):
            conv_out, _, conv_in = _SLOT_LAYERS[sl]
            out += [Hook(f"{sl}.in", getattr(blk, conv_out), "input"),
                    Hook(f"{sl}.feature", getattr(blk, conv_in), "input")]
        # timm adds the shortcut into the last BN's output in place: record a copy
        out.append(Hook("branch_out", getattr(blk, _LAST_BN[kind]), "branch_output"))
        return out

    def layers(self, i: int) -> dict[str, LayerView]:
        blk = self.blocks[i]
        kind = _kind(blk)
        out = {}
        for c in _CONVS[kind]:
            conv = getattr(blk, c)
            out[c] = LayerView(conv.weight, [], _INPUTS[c],
                               conv.kernel_size[0] * conv.kernel_size[1])
        for b in _BNS[kind]:
            bn = getattr(blk, b)
            out[b] = LayerView(None, [bn.weight, bn.bias])  # scale and shift act per channel
        return out

    def groups(self, i: int) -> list[Group | Branch]:
        """Per slot its channels (conv1, conv2), then the whole block."""
        blk = self.blocks[i]
        kind = _kind(blk)
        out: list[Group | Branch] = []
        for sl in resnet._slots(kind):
            conv_out, bn, conv_in = _SLOT_LAYERS[sl]
            C = getattr(blk, conv_out).out_channels
            kk = getattr(blk, conv_in).kernel_size
            kk = kk[0] * kk[1]
            c = torch.arange(C)
            out.append(Group(sl, (C,),
                             [Part(conv_out, "row", c[:, None]), Part(bn, "row", c[:, None]),
                              Part(conv_in, "col", (c[:, None] * kk + torch.arange(kk)))],
                             [Part(f"{sl}.feature", "feature", c[:, None])]))
        out.append(Branch("block", _CONVS[kind] + _BNS[kind], "branch_out"))
        return out

    def assemble(self, i: int, values: dict) -> ConvBlockScores:
        kind = _kind(self.blocks[i])
        return ConvBlockScores({sl: values[sl] for sl in resnet._slots(kind)},
                               float(values["block"]))
