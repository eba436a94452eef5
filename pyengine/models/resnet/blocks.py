"""timm ResNets (BasicBlock and Bottleneck): gated and compact residual blocks, their geometry,
and the spec/apply/compile machinery behind the public API for CNNs.

A gated block keeps the original conv/BN modules (same attribute names as timm, so a timm
state dict still loads) and multiplies in its gates: one value per output channel of each
inner conv, applied after that conv's activation (slots ``conv1`` and, for a Bottleneck,
``conv2``), and one ``block`` value on the residual branch output before the add (SSS's
residual-block factor, for adaptive depth). A gate of 0 therefore removes a channel exactly
(its BN shift included), and the next conv sees nothing from it.

Compiling folds the gate values into the following conv (channels) and into the last BN
(block), then slices conv and BatchNorm modules to the kept channels. A removed block (see
:mod:`pyengine.spec`) keeps its shortcut and final activation; without a downsample it is
``nn.Identity`` (a block's input in a ReLU ResNet is already >= 0).
"""
from __future__ import annotations

import copy
from typing import Callable, Mapping

import torch
from torch import nn

from pyengine.models.base import UnsupportedModuleError
from pyengine.structure.gates import Gates
from pyengine.structure.spec import CnnGeometry, CnnSpec, ConvBlock, SpecError, make_conv_block

SUPPORTED = ("timm ResNet models with BasicBlock/Bottleneck blocks, BatchNorm2d, no SE/attention, "
             "no anti-aliasing, cardinality 1 (resnet18/26/34/50/101/152 and their d/t variants)")

_BRANCH = {"basic": ("conv1", "bn1", "drop_block", "act1", "aa", "conv2", "bn2"),
           "bottleneck": ("conv1", "bn1", "act1", "conv2", "bn2", "drop_block", "act2", "aa",
                          "conv3", "bn3")}
_FINAL_ACT = {"basic": "act2", "bottleneck": "act3"}
# per gate slot: the conv whose output channels it gates, its BN, and the conv that reads them
_SLOT_LAYERS = {"conv1": ("conv1", "bn1", "conv2"), "conv2": ("conv2", "bn2", "conv3")}
_LAST_BN = {"basic": "bn2", "bottleneck": "bn3"}


def is_resnet(model: nn.Module) -> bool:
    from timm.models.resnet import ResNet
    return isinstance(model, ResNet)


def _kind(blk: nn.Module) -> str:
    from timm.models.resnet import BasicBlock, Bottleneck
    if isinstance(blk, ResBlock):
        return blk.kind
    if type(blk) is BasicBlock:
        return "basic"
    if type(blk) is Bottleneck:
        return "bottleneck"
    raise UnsupportedModuleError(f"{type(blk).__module__}.{type(blk).__name__} is not a timm "
                                 f"BasicBlock/Bottleneck; supported: {SUPPORTED}")


def _check_block(blk: nn.Module, where: str) -> str:
    kind = _kind(blk)
    if isinstance(blk, ResBlock):
        return kind

    def need(cond: bool, what: str):
        if not cond:
            raise UnsupportedModuleError(f"{where}: {what}; supported: {SUPPORTED}")
    need(getattr(blk, "se", None) is None, "squeeze-excitation/attention layers are not supported")
    need(isinstance(blk.aa, nn.Identity), "anti-aliased downsampling (aa_layer) is not supported")
    for name in _BRANCH[kind]:
        m = getattr(blk, name)
        if name.startswith("conv"):
            need(type(m) is nn.Conv2d and m.groups == 1, f"{name} must be a plain Conv2d with groups=1")
        if name.startswith("bn"):
            need(type(m) is nn.BatchNorm2d and m.affine, f"{name} must be an affine BatchNorm2d")
    return kind


def stages(model: nn.Module) -> list[nn.Sequential]:
    out = []
    i = 1
    while hasattr(model, f"layer{i}"):
        out.append(getattr(model, f"layer{i}"))
        i += 1
    if not out:
        raise UnsupportedModuleError(f"{type(model).__name__} has no layer1..; supported: {SUPPORTED}")
    return out


class ResBlock(nn.Module):
    """A residual block with timm's attribute names; gated when ``gates`` is set, compact when
    its convs have been sliced; ``kind`` is "basic" or "bottleneck"."""

    def __init__(self, kind: str, mods: Mapping[str, nn.Module], downsample, drop_path,
                 final_act: nn.Module, gates: Gates | None = None):
        super().__init__()
        self.kind = kind
        for name in _BRANCH[kind]:
            setattr(self, name, mods[name])
        self.downsample = downsample
        self.drop_path = drop_path
        setattr(self, _FINAL_ACT[kind], final_act)
        self.gates = gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gates.values() if self.gates is not None else None
        shortcut = x if self.downsample is None else self.downsample(x)
        if self.kind == "basic":
            h = self.act1(self.drop_block(self.bn1(self.conv1(x))))
            if g is not None:
                h = h * g["conv1"][:, None, None]
            h = self.bn2(self.conv2(self.aa(h)))
            act = self.act2
        else:
            h = self.act1(self.bn1(self.conv1(x)))
            if g is not None:
                h = h * g["conv1"][:, None, None]
            h = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(h)))))
            if g is not None:
                h = h * g["conv2"][:, None, None]
            h = self.bn3(self.conv3(h))
            act = self.act3
        if self.drop_path is not None:
            h = self.drop_path(h)
        if g is not None:
            h = h * g["block"]
        return act(h + shortcut)

    def extra_repr(self) -> str:
        return f"kind={self.kind}" + (f", gates={self.gates.kind}" if self.gates is not None else "")


class GatedResBlock(ResBlock):
    pass


class CompactResBlock(ResBlock):
    pass


class RemovedBlock(nn.Module):
    """A block whose residual branch is removed: ``act(downsample(x))``."""

    def __init__(self, downsample: nn.Module, act: nn.Module):
        super().__init__()
        self.downsample, self.act = downsample, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.downsample(x))


def _modules_of(blk: nn.Module, kind: str) -> tuple[dict, nn.Module | None, nn.Module | None, nn.Module]:
    mods = {n: getattr(blk, n) for n in _BRANCH[kind]}
    return mods, blk.downsample, getattr(blk, "drop_path", None), getattr(blk, _FINAL_ACT[kind])


def inner_channels(blk: nn.Module, kind: str) -> tuple[int, ...]:
    if isinstance(blk, GatedResBlock):
        return tuple(blk.gates.shapes[s][0] for s in _slots(kind))
    return tuple(getattr(blk, _SLOT_LAYERS[s][0]).out_channels for s in _slots(kind))


def _slots(kind: str) -> tuple[str, ...]:
    return ("conv1",) if kind == "basic" else ("conv1", "conv2")


# ---- the public-API pieces ---------------------------------------------------------------

def gate(model: nn.Module, make_gates: Callable[[Mapping], Gates]) -> nn.Module:
    """In place: every residual block becomes a :class:`GatedResBlock` (same parameters)."""
    new = []
    for s, st in enumerate(stages(model)):
        for b, blk in enumerate(st):
            kind = _check_block(blk, f"layer{s + 1}.{b}")
            if isinstance(blk, ResBlock):
                raise ValueError("model is already gated or compiled")
            mods, ds, dp, act = _modules_of(blk, kind)
            shapes = {"block": ()}
            shapes.update({sl: (getattr(blk, _SLOT_LAYERS[sl][0]).out_channels,)
                           for sl in _slots(kind)})
            new.append((st, b, GatedResBlock(kind, mods, ds, dp, act, make_gates(shapes))))
    for st, b, g in new:
        st[b] = g
    return model


def is_gated(model: nn.Module) -> bool:
    return any(isinstance(m, GatedResBlock) for m in model.modules())


def model_img_size(model: nn.Module) -> int:
    size = getattr(model, "pyengine_img_size", None)
    if size:
        return int(size)
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    inp = pcfg.get("input_size")
    return int(inp[-1]) if inp else 0


def geometry(model: nn.Module) -> CnnGeometry:
    """The dense geometry of a timm ResNet, gated or not (compact ones carry it in the spec)."""
    s = getattr(model, "pyengine_spec", None)
    if isinstance(s, CnnSpec) and s.dense is not None:
        return s.dense
    kinds, inner, ds, layers = [], [], [], []
    for si, st in enumerate(stages(model)):
        layers.append(len(st))
        for b, blk in enumerate(st):
            kind = _check_block(blk, f"layer{si + 1}.{b}")
            kinds.append(kind)
            inner.append(inner_channels(blk, kind))
            ds.append(blk.downsample is not None)
    if len(set(kinds)) != 1:
        raise UnsupportedModuleError(f"mixed block types {sorted(set(kinds))}; {SUPPORTED}")
    stem = model.conv1 if isinstance(model.conv1, nn.Conv2d) else model.conv1[0]
    return CnnGeometry(block=kinds[0], layers=tuple(layers), inner=tuple(inner),
                       downsample=tuple(ds), in_chans=stem.in_channels,
                       num_classes=model.num_classes, img_size=model_img_size(model))


def spec(model: nn.Module, name: str | None) -> CnnSpec:
    g = geometry(model)
    if not is_gated(model):
        return CnnSpec.full(g, model=name)
    out = []
    for st in stages(model):
        blocks = []
        for blk in st:
            h = blk.gates.hard()
            keep = bool(h["block"])
            blocks.append(make_conv_block(keep, **{sl: torch.nonzero(h[sl]).flatten().tolist()
                                                   for sl in _slots(blk.kind)}))
        out.append(tuple(blocks))
    return CnnSpec(tuple(out), model=name, dense=g)


def apply(model: nn.Module, s: CnnSpec, name: str | None) -> nn.Module:
    if not is_gated(model):
        raise ValueError("model is not gated: call pyengine.gate(model) first")
    g = geometry(model)
    s.check_geometry(g, name)
    if s.dense is not None and s.dense != g:
        raise SpecError(f"spec was made for a ResNet of geometry {s.dense}, this one is {g}")
    for st, sst in zip(stages(model), s.stages):
        for blk, b in zip(st, sst):
            dev = blk.conv1.weight.device
            masks = {"block": torch.tensor(b.keep, device=dev)}
            for sl, n in zip(_slots(blk.kind), inner_channels(blk, blk.kind)):
                m = torch.zeros(n, dtype=torch.bool, device=dev)
                m[list(b.kept(sl))] = True
                masks[sl] = m
            blk.gates.set_hard(masks)
    return model


@torch.no_grad()
def fold_gates(model: nn.Module) -> None:
    """In place: multiply every gated block's gate values into its weights (channel values
    into the conv that reads the channel, the block value into the last BN's affine), so the
    block computes the same with all gates at 1 on the kept units. Used on a copy by compile."""
    for m in model.modules():
        if not isinstance(m, GatedResBlock):
            continue
        g = m.gates.values()
        for sl in _slots(m.kind):
            reader = getattr(m, _SLOT_LAYERS[sl][2])
            reader.weight.mul_(g[sl].to(reader.weight.dtype)[None, :, None, None])
        bn = getattr(m, _LAST_BN[m.kind])
        bn.weight.mul_(g["block"])
        bn.bias.mul_(g["block"])


def _conv(conv: nn.Conv2d, out_idx, in_idx, copy_weights: bool) -> nn.Conv2d:
    new = nn.Conv2d(len(in_idx) if in_idx is not None else conv.in_channels,
                    len(out_idx) if out_idx is not None else conv.out_channels,
                    conv.kernel_size, conv.stride, conv.padding, conv.dilation, 1,
                    conv.bias is not None, conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    if copy_weights:
        w = conv.weight
        if out_idx is not None:
            w = w.index_select(0, torch.tensor(out_idx, dtype=torch.long, device=w.device))
        if in_idx is not None:
            w = w.index_select(1, torch.tensor(in_idx, dtype=torch.long, device=w.device))
        new.weight.copy_(w)
        if conv.bias is not None:
            b = conv.bias if out_idx is None else conv.bias[list(out_idx)]
            new.bias.copy_(b)
    return new


def _bn(bn: nn.BatchNorm2d, idx, copy_weights: bool) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(idx), bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         device=bn.weight.device, dtype=bn.weight.dtype)
    if copy_weights:
        i = torch.tensor(idx, dtype=torch.long, device=bn.weight.device)
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(bn, name)
            if t is not None:
                getattr(new, name).copy_(t.index_select(0, i))
        if bn.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


@torch.no_grad()
def compact_block(blk: nn.Module, b: ConvBlock, copy_weights: bool) -> nn.Module:
    """The compact twin of a (folded) gated or plain timm block for the block spec ``b``."""
    kind = _kind(blk)
    mods, ds, dp, act = _modules_of(blk, kind)
    if not b.keep:
        if ds is None and type(act) is nn.ReLU:
            return nn.Identity()
        return RemovedBlock(copy.deepcopy(ds) if ds is not None else nn.Identity(),
                            copy.deepcopy(act))
    new = {n: copy.deepcopy(m) for n, m in mods.items() if not n[:-1] in ("conv", "bn")}
    k1 = list(b.kept("conv1"))
    if kind == "basic":
        new["conv1"] = _conv(mods["conv1"], k1, None, copy_weights)
        new["bn1"] = _bn(mods["bn1"], k1, copy_weights)
        new["conv2"] = _conv(mods["conv2"], None, k1, copy_weights)
        new["bn2"] = copy.deepcopy(mods["bn2"])
    else:
        k2 = list(b.kept("conv2"))
        new["conv1"] = _conv(mods["conv1"], k1, None, copy_weights)
        new["bn1"] = _bn(mods["bn1"], k1, copy_weights)
        new["conv2"] = _conv(mods["conv2"], k2, k1, copy_weights)
        new["bn2"] = _bn(mods["bn2"], k2, copy_weights)
        new["conv3"] = _conv(mods["conv3"], None, k2, copy_weights)
        new["bn3"] = copy.deepcopy(mods["bn3"])
    out = CompactResBlock(kind, new, copy.deepcopy(ds), copy.deepcopy(dp), copy.deepcopy(act))
    out.train(blk.training)
    return out


def build(container: nn.Module, s: CnnSpec, copy_weights: bool) -> nn.Module:
    """Replace every block of ``container`` (a dense or folded gated ResNet) by its compact
    twin; ``container.pyengine_spec = s``."""
    for st, sst in zip(stages(container), s.stages):
        for b, bs in enumerate(sst):
            st[b] = compact_block(st[b], bs, copy_weights)
    container.pyengine_spec = s
    return container
