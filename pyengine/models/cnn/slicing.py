"""Slicing conv, linear and norm layers to kept channels, and folding per-channel gate values
into the layers that read them. Each slice is a copy of the layer (its class, padding mode,
activation inside a timm BatchNormAct2d, ...) with smaller parameters, so any subclass of
``nn.Conv2d`` / ``nn.BatchNorm2d`` keeps its own forward."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

__all__ = ["index", "slice_out", "slice_in", "slice_norm", "scale_in", "scale_out"]


def index(idx: Sequence[int], device) -> torch.Tensor:
    return torch.as_tensor(list(idx), dtype=torch.long, device=device)


def _replace(new: nn.Module, orig: nn.Module, name: str, t: torch.Tensor | None) -> None:
    """Give ``new`` the tensor ``t`` under ``name``, a parameter where ``orig`` has one."""
    old = getattr(orig, name, None)
    if old is None:
        return
    if isinstance(old, nn.Parameter):
        setattr(new, name, nn.Parameter(t.detach().clone(), requires_grad=old.requires_grad))
    else:
        setattr(new, name, t.detach().clone())


def _copy(mod: nn.Module) -> nn.Module:
    """A copy of ``mod`` without its own parameters and buffers (they are replaced next)."""
    memo = {id(t): None for t in list(mod.parameters(recurse=False)) +
            list(mod.buffers(recurse=False))}
    return copy.deepcopy(mod, memo)


@torch.no_grad()
def slice_out(layer: nn.Module, idx: Sequence[int], grouped: bool = False) -> nn.Module:
    """``layer`` (Conv2d or Linear) keeping output channels ``idx``. ``grouped``: a grouped or
    depthwise conv whose kept outputs come with their groups' inputs (the caller keeps whole
    groups), so the groups shrink with them."""
    i = index(idx, layer.weight.device)
    new = _copy(layer)
    _replace(new, layer, "weight", layer.weight.index_select(0, i))
    _replace(new, layer, "bias", None if layer.bias is None else layer.bias.index_select(0, i))
    if isinstance(layer, nn.Linear):
        new.out_features = len(idx)
        return new
    per_group = layer.out_channels // layer.groups
    if grouped:
        if len(idx) % per_group:
            raise ValueError(f"{len(idx)} kept outputs are not whole groups of {per_group}")
        new.groups = len(idx) // per_group
        new.in_channels = new.groups * (layer.in_channels // layer.groups)
    elif layer.groups != 1:
        raise ValueError("slicing the outputs of a grouped conv needs grouped=True")
    new.out_channels = len(idx)
    return new


@torch.no_grad()
def slice_in(layer: nn.Module, idx: Sequence[int]) -> nn.Module:
    """``layer`` (Conv2d with groups=1, or Linear) reading only input channels ``idx``."""
    i = index(idx, layer.weight.device)
    new = _copy(layer)
    _replace(new, layer, "weight", layer.weight.index_select(1, i))
    _replace(new, layer, "bias", layer.bias)
    if isinstance(layer, nn.Linear):
        new.in_features = len(idx)
    else:
        if layer.groups != 1:
            raise ValueError("slice_in reads whole inputs of a conv with groups=1 only")
        new.in_channels = len(idx)
    return new


@torch.no_grad()
def slice_norm(norm: nn.Module, idx: Sequence[int]) -> nn.Module:
    """A BatchNorm (timm BatchNormAct2d included) keeping channels ``idx``."""
    i = index(idx, norm.weight.device if norm.weight is not None else norm.running_mean.device)
    new = _copy(norm)
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(norm, name, None)
        _replace(new, norm, name, None if t is None else t.index_select(0, i))
    _replace(new, norm, "num_batches_tracked", getattr(norm, "num_batches_tracked", None))
    new.num_features = len(idx)
    return new


@torch.no_grad()
def scale_in(layer: nn.Module, scale: torch.Tensor) -> None:
    """In place: multiply input channel ``j`` of ``layer`` (Conv2d groups=1 or Linear) by
    ``scale[j]``."""
    w = layer.weight
    shape = [1, -1] + [1] * (w.dim() - 2)
    w.mul_(scale.to(w.dtype).reshape(shape))


@torch.no_grad()
def scale_out(layer: nn.Module, scale: torch.Tensor) -> None:
    """In place: multiply output channel ``i`` of ``layer`` (weight and bias; a BatchNorm's
    affine) by ``scale`` (a scalar or one value per channel)."""
    s = scale.to(layer.weight.dtype)
    shape = [-1] + [1] * (layer.weight.dim() - 1) if s.dim() else []
    layer.weight.mul_(s.reshape(shape) if shape else s)
    if layer.bias is not None:
        layer.bias.mul_(s)
