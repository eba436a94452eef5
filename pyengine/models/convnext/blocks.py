"""timm ConvNeXt blocks (:class:`timm.models.convnext.ConvNeXtBlock`): the gated / compact twin.

Prunable: the hidden channels of the inverted bottleneck (``mlp.fc1`` outputs = ``mlp.fc2``
inputs; the slot ``mlp``), gated after the activation, and the whole residual branch (the
depthwise conv, norm, MLP and layer scale; ``block``, a scalar on the branch before the add).
The residual stream (stage widths, the depthwise conv's channels) stays. A removed block is
its shortcut (the identity in timm's ConvNeXt). Compiling folds the hidden gates into
``mlp.fc2``'s input columns and the block gate into ``mlp.fc2``'s output (weight and bias),
then slices ``fc1`` rows and ``fc2`` columns. Both MLP forms run: 1x1 convs on NCHW
(``conv_mlp=True``, atto..nano) and Linear layers on NHWC (tiny and larger).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from pyengine.models.cnn.family import BlockRef, Family, PrunableBlock, check
from pyengine.models.cnn.slicing import scale_in, scale_out, slice_in, slice_out
from pyengine.models.cnn.spec import SlotBlock
from pyengine.models.importance import Branch, Group, Hook, LayerView, Part

SUPPORTED = ("timm ConvNeXt models (convnext_atto ... convnext_xxlarge: ConvNeXtBlock with a "
             "timm Mlp, 1x1-conv or Linear; not ConvNeXt-V2's GRN MLP)")


def _is_fc(m: nn.Module) -> bool:
    return type(m) is nn.Linear or (type(m) is nn.Conv2d and m.kernel_size == (1, 1)
                                    and m.groups == 1 and m.stride == (1, 1))


def _width(fc: nn.Module) -> int:
    return fc.out_features if isinstance(fc, nn.Linear) else fc.out_channels


class PrunableConvNeXtBlock(PrunableBlock):
    """ConvNeXtBlock with timm's attribute names; gated (hidden channels, block) or compact."""

    from timm.models.convnext import ConvNeXtBlock as TIMM
    NAMES = ("conv_dw", "norm", "mlp", "gamma", "shortcut", "drop_path")
    FLAGS = ("use_conv_mlp",)

    @classmethod
    def describe(cls, blk: nn.Module, where: str) -> SlotBlock:
        from timm.layers import Mlp
        check(type(blk.mlp) is Mlp, where, f"the MLP is a {type(blk.mlp).__name__} (ConvNeXt-V2's "
              "GlobalResponseNorm mixes the hidden channels, so they cannot be pruned exactly)",
              SUPPORTED)
        check(isinstance(blk.mlp.norm, nn.Identity), where, "a norm inside the MLP mixes the "
              "hidden channels", SUPPORTED)
        check(_is_fc(blk.mlp.fc1) and _is_fc(blk.mlp.fc2), where, "mlp.fc1/fc2 must be Linear "
              "or 1x1 Conv2d layers", SUPPORTED)
        return SlotBlock("mlp", _width(blk.mlp.fc1), 1, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_values()
        shortcut = x
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self._mlp(self.norm(x), g, True)
        else:
            x = self._mlp(self.norm(x.permute(0, 2, 3, 1)), g, False).permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        if g is not None:
            x = x * g["block"]
        return self.drop_path(x) + self.shortcut(shortcut)

    def _mlp(self, x: torch.Tensor, g, nchw: bool) -> torch.Tensor:
        m = self.mlp
        h = m.drop1(m.act(m.fc1(x)))
        if g is not None:
            h = h * (g["mlp"][:, None, None] if nchw else g["mlp"])
        return m.drop2(m.fc2(m.norm(h)))

    @torch.no_grad()
    def fold(self) -> None:
        g = self.gates.values()
        scale_in(self.mlp.fc2, g["mlp"])
        scale_out(self.mlp.fc2, g["block"])

    def compact(self, channels):
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        return self.twin_of(self.copies({fc1: slice_out(fc1, channels),
                                         fc2: slice_in(fc2, channels)}))

    def removed(self, nonneg_input: bool) -> nn.Module:
        if isinstance(self.shortcut, nn.Identity):
            return nn.Identity()
        return copy.deepcopy(self.shortcut)

    def units(self):
        m, dw = self.mlp, self.conv_dw
        H = _width(m.fc1)
        # a Linear MLP runs on NHWC tensors: their channels are last already
        last = None if self.use_conv_mlp else False
        hooks = [Hook("in", dw, "input"), Hook("mlp.in", m.fc1, "input", last),
                 Hook("mlp.feature", m.fc2, "input", last),
                 Hook("branch_out", m.fc2, "output", last)]
        layers = {"conv_dw": LayerView(dw.weight, [dw.bias], "in",
                                       dw.kernel_size[0] * dw.kernel_size[1], dw.groups),
                  "norm": LayerView(None, [self.norm.weight, self.norm.bias]),
                  "mlp.fc1": LayerView(m.fc1.weight, [m.fc1.bias], "mlp.in"),
                  "mlp.fc2": LayerView(m.fc2.weight, [m.fc2.bias], "mlp.feature")}
        if self.gamma is not None:
            layers["gamma"] = LayerView(None, [self.gamma])
        c = torch.arange(H)[:, None]
        groups = [Group("mlp", (H,), [Part("mlp.fc1", "row", c), Part("mlp.fc2", "col", c)],
                        [Part("mlp.feature", "feature", c)]),
                  Branch("block", tuple(layers), "branch_out")]
        return hooks, layers, groups


class ConvNeXtFamily(Family):
    name = "convnext"
    supported = SUPPORTED
    block_types = (PrunableConvNeXtBlock,)

    def is_model(self, model: nn.Module) -> bool:
        from timm.models.convnext import ConvNeXt
        return isinstance(model, ConvNeXt)

    def stages(self, model: nn.Module) -> list[list[BlockRef]]:
        return [[BlockRef(st.blocks, i) for i in range(len(st.blocks))] for st in model.stages]
