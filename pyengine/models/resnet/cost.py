"""Cost of a (pruned) timm ResNet.

A ResNet's layer shapes follow from its (compact) modules and the input size, so the cost walks
the compact model once on the meta device (no memory, no arithmetic) with forward hooks, and
costs each layer from its input/output shapes: conv MACs = output elements * (C_in / groups) *
kh * kw, Linear MACs = output elements * in_features, exactly what FlopCounterMode counts (2
FLOPs per MAC). BatchNorm, activations, pools and the residual adds have 0 MACs but real bytes.
"""
from __future__ import annotations

from typing import Any, Sequence

import math

import torch


__all__ = ["conv_macs", "cost_rows"]


def conv_macs(out_elems: int, in_channels: int, groups: int, kernel: Sequence[int]) -> int:
    """Conv2d MACs for ``out_elems`` output elements (batch included)."""
    return out_elems * (in_channels // groups) * math.prod(kernel)


def _cnn_meta_model(obj: Any):
    """``(compact model on the meta device, CnnSpec)`` for a CnnSpec or a ResNet."""
    import copy

    from pyengine.models.resnet import blocks as resnet
    from pyengine.structure.spec import CnnSpec
    if isinstance(obj, CnnSpec):
        if obj.model is None or obj.dense is None:
            raise ValueError("cost of a CNN spec needs its 'model' name and 'dense' geometry "
                             "(pyengine.spec(model) fills both)")
        import timm
        with torch.device("meta"):
            m = timm.create_model(obj.model, pretrained=False, num_classes=obj.dense.num_classes,
                                  in_chans=obj.dense.in_chans)
        return resnet.build(m, obj, copy_weights=False), obj
    from pyengine.api import spec as _spec
    s = _spec(obj)
    m = copy.deepcopy(obj).to("meta")
    if not isinstance(getattr(obj, "pyengine_spec", None), CnnSpec):
        if resnet.is_gated(obj):
            resnet.fold_gates(m)
        m = resnet.build(m, s, copy_weights=False)
    return m, s


def cost_rows(model_or_spec: Any, row, batch: int, attention: str = "fused",
              img_size: int | None = None) -> str:
    """Add the rows of a (pruned) timm ResNet, a gated one or a :class:`CnnSpec` to ``row``."""
    from pyengine.models.resnet import blocks as resnet
    model, s = _cnn_meta_model(model_or_spec)
    size = img_size or (s.dense.img_size if s.dense is not None else 0)
    if not isinstance(size, int) or size <= 0:
        raise ValueError("cost of a CNN needs the input size: pass img_size=... (or set "
                         "model.pyengine_img_size before taking the spec)")
    from timm.models.resnet import BasicBlock, Bottleneck
    blocks = (resnet.ResBlock, BasicBlock, Bottleneck)
    skip = (torch.nn.Identity, torch.nn.Flatten, torch.nn.Dropout)

    def hook(name):
        def fn(mod, inp, out):
            x = inp[0]
            nparams = sum(p.numel() for p in mod.parameters(recurse=False))
            if isinstance(mod, blocks):
                row(f"{name}.add", "elementwise", 0, 0, 3 * out.numel())
            elif isinstance(mod, torch.nn.Conv2d):
                row(name, "conv", conv_macs(out.numel(), mod.in_channels, mod.groups,
                                            mod.kernel_size), nparams, x.numel() + out.numel())
            elif isinstance(mod, torch.nn.Linear):
                row(name, "linear", out.numel() * mod.in_features, nparams,
                    x.numel() + out.numel())
            elif isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                row(name, "norm", 0, nparams, x.numel() + out.numel())
            elif nparams:
                raise NotImplementedError(f"cost: no formula for {type(mod).__name__} ({name})")
            else:  # activations and pools
                row(name, "elementwise", 0, 0, x.numel() + out.numel())
        return fn

    handles = []
    for name, mod in model.named_modules():
        leaf = next(mod.children(), None) is None
        if isinstance(mod, blocks) or (leaf and name and not isinstance(mod, skip)
                                       and type(mod).__name__ != "DropPath"):
            handles.append(mod.register_forward_hook(hook(name)))
    try:
        model.eval()
        with torch.no_grad():
            model(torch.empty(batch, s.dense.in_chans if s.dense else 3, size, size,
                              device="meta", dtype=torch.float32))
    finally:
        for h in handles:
            h.remove()
    # hooks fire in completion order (a block after its insides): order rows by module order
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    rows = row.rows
    rows.sort(key=lambda r: order.get(r.name.removesuffix(".add"), 0)
              + (0.5 if r.name.endswith(".add") else 0))
    return "n/a"
