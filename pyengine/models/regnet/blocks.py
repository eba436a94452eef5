"""timm RegNet blocks (:class:`timm.models.regnet.Bottleneck`, RegNetX and RegNetY): the gated /
compact twin.

Prunable: the bottleneck channels (slot ``mid``: ``conv1``'s outputs, the group conv
``conv2``'s inputs and outputs, the squeeze-excite's channels and ``conv3``'s inputs) in whole
groups of ``conv2`` (one gate per group: a group's outputs read only its own inputs, so a
whole group goes or stays and the conv keeps equal groups), gated after ``conv2``'s
activation and before the squeeze-excite; and the whole residual branch (``block``, before
the add). A removed block is ``act3(downsample(x))`` (the downsample conv+BN of a stage's
first block stays: its output has another shape), and the identity where the shortcut is the
identity and the block's input is a ReLU output anyway. Stage widths (residual streams), the
stem, the head and the squeeze-excite's reduced channels stay. Compiling folds group gate
values into the squeeze-excite's ``fc1`` and ``conv3``'s inputs, the block gate into
``conv3``'s BatchNorm.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from pyengine.models.cnn.family import BlockRef, Family, PrunableBlock, RemovedBlock, check
from pyengine.models.cnn.slicing import scale_in, scale_out, slice_in, slice_norm, slice_out
from pyengine.models.cnn.spec import SlotBlock
from pyengine.models.importance import Branch, Group, Hook, LayerView, Part

SUPPORTED = ("timm RegNetX / RegNetY models (regnetx_*, regnety_*) with post-activation "
             "Bottleneck blocks, BatchNorm and timm SEModule (not RegNetZ / pre-activation)")


def _kk(conv: nn.Conv2d) -> int:
    return conv.kernel_size[0] * conv.kernel_size[1]


def _cna(m, where: str, name: str) -> None:
    ok = (hasattr(m, "conv") and isinstance(m.conv, nn.Conv2d) and isinstance(m.bn, nn.BatchNorm2d)
          and m.bn.affine and m.bn.track_running_stats
          and isinstance(getattr(m, "aa", None), (type(None), nn.Identity)))
    check(ok, where, f"{name} must be a timm ConvNormAct (Conv2d + affine BatchNorm, no "
          "anti-aliasing)", SUPPORTED)


class PrunableBottleneck(PrunableBlock):
    """RegNet Bottleneck with timm's attribute names; gated (groups, block) or compact."""

    from timm.models.regnet import Bottleneck as TIMM
    NAMES = ("conv1", "conv2", "se", "conv3", "act3", "downsample", "drop_path")

    @classmethod
    def describe(cls, blk, where):
        from timm.layers.squeeze_excite import SEModule
        for n in ("conv1", "conv2", "conv3"):
            _cna(getattr(blk, n), where, n)
        c1, c2, c3 = blk.conv1.conv, blk.conv2.conv, blk.conv3.conv
        mid = c1.out_channels
        check(c1.groups == 1 and c3.groups == 1, where, "conv1/conv3 must not be grouped",
              SUPPORTED)
        check(c2.in_channels == c2.out_channels == mid, where, "conv2 must map the bottleneck "
              "width to itself", SUPPORTED)
        se = blk.se
        check(isinstance(se, nn.Identity) or (type(se) is SEModule and not se.add_maxpool),
              where, f"squeeze-excite {type(se).__name__} is not timm's SEModule (without "
              "add_maxpool)", SUPPORTED)
        return SlotBlock("mid", mid, mid // c2.groups, blk.downsample is not None)

    def forward(self, x):
        g = self.gate_values()
        shortcut = x
        x = self.conv2(self.conv1(x))
        if g is not None:
            x = x * self.unit_scale(g)[:, None, None]
        x = self.conv3(self.se(x))
        if self.downsample is not None:
            if g is not None:
                x = x * g["block"]
            x = self.drop_path(x) + self.downsample(shortcut)
        return self.act3(x)

    def _has_se(self) -> bool:
        return not isinstance(self.se, nn.Identity)

    @torch.no_grad()
    def fold(self):
        g = self.gates.values()
        s = self.unit_scale(g)
        if self._has_se():
            scale_in(self.se.fc1, s)
        scale_in(self.conv3.conv, s)
        if self.info.removable:
            scale_out(self.conv3.bn, g["block"])

    def compact(self, idx):
        c1, c2, c3 = self.conv1, self.conv2, self.conv3
        rep = {c1.conv: slice_out(c1.conv, idx), c1.bn: slice_norm(c1.bn, idx),
               c2.conv: slice_out(c2.conv, idx, grouped=True), c2.bn: slice_norm(c2.bn, idx),
               c3.conv: slice_in(c3.conv, idx)}
        if self._has_se():
            rep[self.se.fc1] = slice_in(self.se.fc1, idx)
            rep[self.se.fc2] = slice_out(self.se.fc2, idx)
        return self.twin_of(self.copies(rep))

    def removed(self, nonneg_input: bool) -> nn.Module:
        ds, act = self.downsample, self.act3
        if isinstance(ds, nn.Identity) and (isinstance(act, nn.Identity) or (
                nonneg_input and type(act) is nn.ReLU)):
            return nn.Identity()  # relu(x) == x: the input is a ReLU output
        return RemovedBlock(copy.deepcopy(ds), copy.deepcopy(act))

    def frozen_norms(self):
        return [self.conv3.bn]

    def units(self):
        c1, c2, c3, se = self.conv1, self.conv2, self.conv3, self.se
        hooks = [Hook("in", c1.conv, "input"), Hook("conv2.in", c2.conv, "input"),
                 Hook("conv3.in", c3.conv, "input"), Hook("feature", se, "input")]
        layers = {"conv1.conv": LayerView(c1.conv.weight, [c1.conv.bias], "in", _kk(c1.conv)),
                  "conv1.bn": LayerView(None, [c1.bn.weight, c1.bn.bias]),
                  "conv2.conv": LayerView(c2.conv.weight, [c2.conv.bias], "conv2.in",
                                          _kk(c2.conv), c2.conv.groups),
                  "conv2.bn": LayerView(None, [c2.bn.weight, c2.bn.bias])}
        G, gw = self.info.units, self.info.group
        c = torch.arange(self.info.channels).reshape(G, gw)
        rows = ["conv1.conv", "conv1.bn", "conv2.conv", "conv2.bn"]
        cols = []
        if self._has_se():
            hooks += [Hook("se.in", se.fc1, "input"), Hook("se.mid", se.fc2, "input")]
            layers["se.fc1"] = LayerView(se.fc1.weight, [se.fc1.bias], "se.in")
            layers["se.fc2"] = LayerView(se.fc2.weight, [se.fc2.bias], "se.mid")
            if isinstance(se.bn, nn.BatchNorm2d):
                layers["se.bn"] = LayerView(None, [se.bn.weight, se.bn.bias])
            rows.append("se.fc2")
            cols.append(("se.fc1", c))
        kk = _kk(c3.conv)
        cols.append(("conv3.conv", c[..., None] * kk + torch.arange(kk)))
        layers["conv3.conv"] = LayerView(c3.conv.weight, [c3.conv.bias], "conv3.in", kk)
        layers["conv3.bn"] = LayerView(None, [c3.bn.weight, c3.bn.bias])
        parts = [Part(n, "row", c) for n in rows] + [Part(n, "col", i) for n, i in cols]
        groups = [Group("mid", (G,), parts, [Part("feature", "feature", c)])]
        if self.info.removable:
            hooks.append(Hook("branch_out", c3, "output"))
            groups.append(Branch("block", tuple(layers), "branch_out"))
        return hooks, layers, groups


class RegNetFamily(Family):
    name = "regnet"
    supported = SUPPORTED
    block_types = (PrunableBottleneck,)

    def is_model(self, model: nn.Module) -> bool:
        from timm.models.regnet import RegNet
        return isinstance(model, RegNet)

    def stages(self, model: nn.Module) -> list[list[BlockRef]]:
        from timm.models.regnet import RegStage
        return [[BlockRef(st, name) for name, _ in st.named_children()]
                for _, st in model.named_children() if isinstance(st, RegStage)]

    def nonneg_input(self, model: nn.Module) -> bool:
        stem_act = getattr(getattr(getattr(model, "stem", None), "bn", None), "act", None)
        return type(stem_act) is nn.ReLU and all(
            type(getattr(r.get(), "act3", None)) is nn.ReLU for _, r in self.refs(model))
