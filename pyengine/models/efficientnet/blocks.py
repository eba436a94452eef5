"""timm EfficientNet / MobileNetV3 blocks (:mod:`timm.models._efficientnet_blocks`): gated and
compact twins of InvertedResidual (MBConv), EdgeResidual (FusedMBConv), DepthwiseSeparableConv
and ConvBnAct.

Prunable: the expanded channels of an InvertedResidual / EdgeResidual (slot ``mid``: the
expansion conv's outputs, the depthwise conv, the squeeze-excite's input and output channels
and the projection conv's inputs, together), gated after the activation (and anti-aliasing)
and before the squeeze-excite; and the whole residual branch (``block``, before the add) of
every block with a skip connection (``has_skip``). A removed block is the identity. The
residual stream (every block's input and output width), the stem and head, the
squeeze-excite's reduced channels and the depthwise-separable blocks' channels (they are
the block's input channels) stay.

Squeeze-excite with gates: a zero channel contributes 0 to the squeeze mean and stays 0 after
the excitation, so slicing is exact. Compiling folds a channel's gate value into the
squeeze-excite's reduce conv (its mean input) and into the projection conv (its output), and
the block gate into the last BatchNorm's affine.
"""
from __future__ import annotations

import torch
from torch import nn

from pyengine.models.cnn.family import BlockRef, Family, PrunableBlock, check
from pyengine.models.cnn.slicing import scale_in, scale_out, slice_in, slice_norm, slice_out
from pyengine.models.cnn.spec import SlotBlock
from pyengine.models.importance import Branch, Group, Hook, LayerView, Part

SUPPORTED = ("timm EfficientNet and MobileNetV3 models (efficientnet_*, tf_efficientnet*, "
             "efficientnetv2*, mobilenetv2*, mobilenetv3*, mnasnet*, ...) built from "
             "InvertedResidual, EdgeResidual, DepthwiseSeparableConv and ConvBnAct blocks with "
             "BatchNorm, timm SqueezeExcite and no anti-aliasing or space-to-depth")


def _conv(m) -> bool:
    return isinstance(m, nn.Conv2d)


def _bn(m) -> bool:
    return isinstance(m, nn.BatchNorm2d) and m.affine and m.track_running_stats


def _kk(conv: nn.Conv2d) -> int:
    return conv.kernel_size[0] * conv.kernel_size[1]


def _se_ok(blk, where: str) -> None:
    from timm.models._efficientnet_blocks import SqueezeExcite
    se = blk.se
    check(isinstance(se, nn.Identity) or type(se) is SqueezeExcite, where,
          f"squeeze-excite {type(se).__name__} is not timm's _efficientnet_blocks.SqueezeExcite",
          SUPPORTED)


def _common(blk, where: str, convs: tuple[str, ...], bns: tuple[str, ...]) -> None:
    check(getattr(blk, "conv_s2d", None) is None, where, "space-to-depth (s2d) blocks are not "
          "supported", SUPPORTED)
    check(isinstance(getattr(blk, "aa", nn.Identity()), nn.Identity), where, "anti-aliased "
          "downsampling (aa_layer) is not supported", SUPPORTED)
    for c in convs:
        check(_conv(getattr(blk, c)), where, f"{c} is a {type(getattr(blk, c)).__name__}, not a "
              "Conv2d (mixed / conditional convs are not supported)", SUPPORTED)
    for b in bns:
        check(_bn(getattr(blk, b)), where, f"{b} must be an affine BatchNorm2d with running "
              "statistics", SUPPORTED)
    _se_ok(blk, where)


class _Twin(PrunableBlock):
    """Shared pieces: the squeeze-excite, the residual add, the unit groups."""

    def _has_se(self) -> bool:
        return not isinstance(self.se, nn.Identity)

    def _add(self, x: torch.Tensor, shortcut: torch.Tensor, g) -> torch.Tensor:
        if not self.info.removable:
            return x
        if g is not None:
            x = x * g["block"]
        return self.drop_path(x) + shortcut

    def _se_slices(self, idx) -> dict:
        if not self._has_se():
            return {}
        se = self.se
        return {se.conv_reduce: slice_in(se.conv_reduce, idx),
                se.conv_expand: slice_out(se.conv_expand, idx)}

    def _se_units(self):
        """(hooks, layers, weight parts of channel c) of the squeeze-excite."""
        if not self._has_se():
            return [], {}, []
        se = self.se
        hooks = [Hook("se.in", se.conv_reduce, "input"), Hook("se.mid", se.conv_expand, "input")]
        layers = {"se.conv_reduce": LayerView(se.conv_reduce.weight, [se.conv_reduce.bias],
                                              "se.in"),
                  "se.conv_expand": LayerView(se.conv_expand.weight, [se.conv_expand.bias],
                                              "se.mid")}
        return hooks, layers, [("se.conv_reduce", "col"), ("se.conv_expand", "row")]

    def _mid_units(self, hooks, layers, rows, cols_of, out_norm, width):
        """The slot's group and the branch: ``rows`` are (layer, kind) parts per channel,
        ``cols_of`` the reading conv's name and kernel size."""
        se_hooks, se_layers, se_parts = self._se_units()
        hooks = hooks + se_hooks + [Hook("feature", self.se, "input")]
        layers = {**layers, **se_layers}
        c = torch.arange(width)[:, None]
        parts = [Part(name, kind, c) for name, kind in rows + se_parts]
        reader, kk = cols_of
        parts.append(Part(reader, "col", c * kk + torch.arange(kk)))
        groups = [Group("mid", (width,), parts, [Part("feature", "feature", c)])]
        if self.info.removable:
            hooks.append(Hook("branch_out", out_norm, "output"))
            groups.append(Branch("block", tuple(layers), "branch_out"))
        return hooks, layers, groups


class PrunableInvertedResidual(_Twin):
    """InvertedResidual (MBConv): expansion 1x1, depthwise, squeeze-excite, projection."""

    from timm.models._efficientnet_blocks import InvertedResidual as TIMM
    NAMES = ("conv_pw", "bn1", "conv_dw", "bn2", "aa", "se", "conv_pwl", "bn3", "drop_path")

    @classmethod
    def describe(cls, blk, where):
        _common(blk, where, ("conv_pw", "conv_dw", "conv_pwl"), ("bn1", "bn2", "bn3"))
        mid, dw = blk.conv_pw.out_channels, blk.conv_dw
        check(blk.conv_pw.groups == 1 and blk.conv_pwl.groups == 1, where, "grouped "
              "expansion / projection convs are not supported", SUPPORTED)
        check(dw.groups == dw.in_channels == dw.out_channels == mid, where, "conv_dw must be "
              "depthwise (groups == channels)", SUPPORTED)
        return SlotBlock("mid", mid, 1, bool(blk.has_skip))

    def forward(self, x):
        g = self.gate_values()
        shortcut = x
        x = self.bn1(self.conv_pw(x))
        x = self.aa(self.bn2(self.conv_dw(x)))
        if g is not None:
            x = x * self.unit_scale(g)[:, None, None]
        x = self.bn3(self.conv_pwl(self.se(x)))
        return self._add(x, shortcut, g)

    @torch.no_grad()
    def fold(self):
        g = self.gates.values()
        s = self.unit_scale(g)
        if self._has_se():
            scale_in(self.se.conv_reduce, s)
        scale_in(self.conv_pwl, s)
        if self.info.removable:
            scale_out(self.bn3, g["block"])

    def compact(self, idx):
        return self.twin_of(self.copies({
            self.conv_pw: slice_out(self.conv_pw, idx), self.bn1: slice_norm(self.bn1, idx),
            self.conv_dw: slice_out(self.conv_dw, idx, grouped=True),
            self.bn2: slice_norm(self.bn2, idx), self.conv_pwl: slice_in(self.conv_pwl, idx),
            **self._se_slices(idx)}))

    def frozen_norms(self):
        return [self.bn3]

    def units(self):
        hooks = [Hook("in", self.conv_pw, "input"), Hook("dw.in", self.conv_dw, "input"),
                 Hook("pwl.in", self.conv_pwl, "input")]
        layers = {"conv_pw": LayerView(self.conv_pw.weight, [self.conv_pw.bias], "in",
                                       _kk(self.conv_pw)),
                  "bn1": LayerView(None, [self.bn1.weight, self.bn1.bias]),
                  "conv_dw": LayerView(self.conv_dw.weight, [self.conv_dw.bias], "dw.in",
                                       _kk(self.conv_dw), self.conv_dw.groups),
                  "bn2": LayerView(None, [self.bn2.weight, self.bn2.bias]),
                  "conv_pwl": LayerView(self.conv_pwl.weight, [self.conv_pwl.bias], "pwl.in",
                                        _kk(self.conv_pwl)),
                  "bn3": LayerView(None, [self.bn3.weight, self.bn3.bias])}
        rows = [("conv_pw", "row"), ("bn1", "row"), ("conv_dw", "row"), ("bn2", "row")]
        return self._mid_units(hooks, layers, rows, ("conv_pwl", _kk(self.conv_pwl)),
                               self.bn3, self.info.channels)


class PrunableEdgeResidual(_Twin):
    """EdgeResidual (FusedMBConv): a full expansion conv, squeeze-excite, projection."""

    from timm.models._efficientnet_blocks import EdgeResidual as TIMM
    NAMES = ("conv_exp", "bn1", "aa", "se", "conv_pwl", "bn2", "drop_path")

    @classmethod
    def describe(cls, blk, where):
        _common(blk, where, ("conv_exp", "conv_pwl"), ("bn1", "bn2"))
        check(blk.conv_exp.groups == 1 and blk.conv_pwl.groups == 1, where, "grouped "
              "expansion / projection convs are not supported", SUPPORTED)
        return SlotBlock("mid", blk.conv_exp.out_channels, 1, bool(blk.has_skip))

    def forward(self, x):
        g = self.gate_values()
        shortcut = x
        x = self.aa(self.bn1(self.conv_exp(x)))
        if g is not None:
            x = x * self.unit_scale(g)[:, None, None]
        x = self.bn2(self.conv_pwl(self.se(x)))
        return self._add(x, shortcut, g)

    @torch.no_grad()
    def fold(self):
        g = self.gates.values()
        s = self.unit_scale(g)
        if self._has_se():
            scale_in(self.se.conv_reduce, s)
        scale_in(self.conv_pwl, s)
        if self.info.removable:
            scale_out(self.bn2, g["block"])

    def compact(self, idx):
        return self.twin_of(self.copies({
            self.conv_exp: slice_out(self.conv_exp, idx), self.bn1: slice_norm(self.bn1, idx),
            self.conv_pwl: slice_in(self.conv_pwl, idx), **self._se_slices(idx)}))

    def frozen_norms(self):
        return [self.bn2]

    def units(self):
        hooks = [Hook("in", self.conv_exp, "input"), Hook("pwl.in", self.conv_pwl, "input")]
        layers = {"conv_exp": LayerView(self.conv_exp.weight, [self.conv_exp.bias], "in",
                                        _kk(self.conv_exp)),
                  "bn1": LayerView(None, [self.bn1.weight, self.bn1.bias]),
                  "conv_pwl": LayerView(self.conv_pwl.weight, [self.conv_pwl.bias], "pwl.in",
                                        _kk(self.conv_pwl)),
                  "bn2": LayerView(None, [self.bn2.weight, self.bn2.bias])}
        return self._mid_units(hooks, layers, [("conv_exp", "row"), ("bn1", "row")],
                               ("conv_pwl", _kk(self.conv_pwl)), self.bn2, self.info.channels)


class PrunableDepthwiseSeparable(_Twin):
    """DepthwiseSeparableConv: its channels are its input's, so only the whole block (when it
    has a skip connection) is prunable."""

    from timm.models._efficientnet_blocks import DepthwiseSeparableConv as TIMM
    NAMES = ("conv_dw", "bn1", "aa", "se", "conv_pw", "bn2", "drop_path")

    @classmethod
    def describe(cls, blk, where):
        _common(blk, where, ("conv_dw", "conv_pw"), ("bn1", "bn2"))
        return SlotBlock(None, 0, 1, bool(blk.has_skip))

    def forward(self, x):
        g = self.gate_values()
        shortcut = x
        x = self.se(self.aa(self.bn1(self.conv_dw(x))))
        return self._add(self.bn2(self.conv_pw(x)), shortcut, g)

    @torch.no_grad()
    def fold(self):
        scale_out(self.bn2, self.gates.values()["block"])

    def compact(self, idx):
        return self.twin_of(self.copies())

    def units(self):
        se_hooks, se_layers, _ = self._se_units()
        hooks = [Hook("in", self.conv_dw, "input"), Hook("pw.in", self.conv_pw, "input"),
                 Hook("branch_out", self.bn2, "output")] + se_hooks
        layers = {"conv_dw": LayerView(self.conv_dw.weight, [self.conv_dw.bias], "in",
                                       _kk(self.conv_dw), self.conv_dw.groups),
                  "bn1": LayerView(None, [self.bn1.weight, self.bn1.bias]), **se_layers,
                  "conv_pw": LayerView(self.conv_pw.weight, [self.conv_pw.bias], "pw.in",
                                       _kk(self.conv_pw)),
                  "bn2": LayerView(None, [self.bn2.weight, self.bn2.bias])}
        return hooks, layers, [Branch("block", tuple(layers), "branch_out")]


class PrunableConvBnAct(_Twin):
    """ConvBnAct: one conv; only the whole block (when it has a skip) is prunable."""

    from timm.models._efficientnet_blocks import ConvBnAct as TIMM
    NAMES = ("conv", "bn1", "aa", "drop_path")

    @classmethod
    def describe(cls, blk, where):
        check(isinstance(blk.aa, nn.Identity), where, "anti-aliased downsampling (aa_layer) is "
              "not supported", SUPPORTED)
        check(_conv(blk.conv) and _bn(blk.bn1), where, "conv/bn1 must be Conv2d/BatchNorm2d",
              SUPPORTED)
        return SlotBlock(None, 0, 1, bool(blk.has_skip))

    def forward(self, x):
        g = self.gate_values()
        return self._add(self.aa(self.bn1(self.conv(x))), x, g)

    @torch.no_grad()
    def fold(self):
        scale_out(self.bn1, self.gates.values()["block"])

    def compact(self, idx):
        return self.twin_of(self.copies())

    def units(self):
        hooks = [Hook("in", self.conv, "input"), Hook("branch_out", self.bn1, "output")]
        layers = {"conv": LayerView(self.conv.weight, [self.conv.bias], "in", _kk(self.conv),
                                    self.conv.groups),
                  "bn1": LayerView(None, [self.bn1.weight, self.bn1.bias])}
        return hooks, layers, [Branch("block", tuple(layers), "branch_out")]


class EfficientNetFamily(Family):
    name = "efficientnet"
    supported = SUPPORTED
    block_types = (PrunableInvertedResidual, PrunableEdgeResidual, PrunableDepthwiseSeparable,
                   PrunableConvBnAct)

    def is_model(self, model: nn.Module) -> bool:
        from timm.models.efficientnet import EfficientNet
        from timm.models.mobilenetv3 import MobileNetV3
        return isinstance(model, (EfficientNet, MobileNetV3))

    def stages(self, model: nn.Module) -> list[list[BlockRef]]:
        return [[BlockRef(st, i) for i in range(len(st))] for st in model.blocks]
