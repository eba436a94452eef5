"""Cost of a (pruned) block-structured CNN: the ResNet way (:mod:`pyengine.models.resnet.cost`),
for any family. The compact model is walked once on the meta device (no memory, no
arithmetic) with forward hooks, and each layer is costed from its input/output shapes: conv
MACs = output elements * (C_in / groups) * kh * kw, Linear MACs = output elements *
in_features, which is what FlopCounterMode counts (2 FLOPs per MAC). Norms, activations,
pools, squeeze-excite means and products and the residual adds have 0 MACs but real bytes;
a block's own parameters (ConvNeXt's layer scale) are counted on its ``.add`` row.
"""
from __future__ import annotations

import copy
import functools
import json
from typing import Any

import torch
from torch import nn

from pyengine.models.cnn.family import PrunableBlock
from pyengine.models.cnn.spec import BlockSpec
from pyengine.models.resnet.cost import conv_macs

__all__ = ["meta_dense", "meta_compact", "cost_rows"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
_SKIP = (nn.Identity, nn.Flatten, nn.Dropout)


def meta_dense(s: BlockSpec) -> nn.Module:
    """The dense timm model of spec ``s`` on the meta device (its ``model`` name, its dense
    geometry's classes, input channels and timm kwargs); a fresh copy per call."""
    if s.model is None or s.dense is None:
        raise ValueError(f"cost of a {s.family} spec needs its 'model' name and 'dense' "
                         "geometry (pyengine.spec(model) fills both)")
    key = json.dumps([s.model, s.dense.num_classes, s.dense.in_chans, dict(s.dense.kwargs)],
                     sort_keys=True, default=str)
    return copy.deepcopy(_meta_dense(key))


@functools.lru_cache(maxsize=16)
def _meta_dense(key: str) -> nn.Module:
    # timm's weight init runs slowly on the meta device: build each model once
    import timm

    from pyengine.models import zoo  # noqa: F401  (pyengine's models are in timm's registry)
    model, num_classes, in_chans, kwargs = json.loads(key)
    with torch.device("meta"):
        return timm.create_model(model, pretrained=False, num_classes=num_classes,
                                 in_chans=in_chans, **kwargs)


def meta_compact(adapter, obj: Any) -> tuple[nn.Module, BlockSpec]:
    """``(compact model on the meta device, spec)`` for a spec or a (dense, gated or compact)
    model of ``adapter``'s family."""
    if isinstance(obj, BlockSpec):
        return adapter.build(meta_dense(obj), obj, copy_weights=False), obj
    from pyengine.api import spec as _spec
    s = _spec(obj)
    m = copy.deepcopy(obj).to("meta")
    if not adapter.is_compact(obj):
        if adapter.is_gated(obj):
            adapter.fold_gates(m)
        m = adapter.build(m, s, copy_weights=False)
    return m, s


def cost_rows(adapter, model_or_spec: Any, row, batch: int, attention: str = "fused",
              img_size: int | None = None) -> str:
    """Add the rows of a (pruned) model, a gated one or a spec of ``adapter``'s family."""
    model, s = meta_compact(adapter, model_or_spec)
    size = img_size or (s.dense.img_size if s.dense is not None else 0)
    if not isinstance(size, int) or size <= 0:
        raise ValueError("cost of a CNN needs the input size: pass img_size=... (or create the "
                         "model with pyengine.create_model(name, img_size=...))")

    def own_params(mod: nn.Module) -> int:
        return sum(p.numel() for p in mod.parameters(recurse=False))

    def hook(name):
        def fn(mod, inp, out):
            x = inp[0]
            nparams = own_params(mod)
            if isinstance(mod, PrunableBlock):
                row(f"{name}.add", "elementwise", 0, nparams,
                    (3 * out.numel()) if mod.residual else 0)
            elif isinstance(mod, nn.Conv2d):
                row(name, "conv", conv_macs(out.numel(), mod.in_channels, mod.groups,
                                            mod.kernel_size), nparams, x.numel() + out.numel())
            elif isinstance(mod, nn.Linear):
                row(name, "linear", out.numel() * mod.in_features, nparams,
                    x.numel() + out.numel())
            elif isinstance(mod, _NORMS):
                row(name, "norm", 0, nparams, x.numel() + out.numel())
            elif nparams:
                raise NotImplementedError(f"cost: no formula for {type(mod).__name__} ({name})")
            else:  # activations, pools
                row(name, "elementwise", 0, 0, x.numel() + out.numel())
        return fn

    handles = []
    for name, mod in model.named_modules():
        leaf = next(mod.children(), None) is None
        if isinstance(mod, PrunableBlock) or own_params(mod) or (
                leaf and name and not isinstance(mod, _SKIP)
                and type(mod).__name__ != "DropPath"):
            handles.append(mod.register_forward_hook(hook(name)))
    try:
        model.eval()
        with torch.no_grad():
            model(torch.empty(batch, s.dense.in_chans, size, size, device="meta",
                              dtype=torch.float32))
    finally:
        for h in handles:
            h.remove()
    # hooks fire in completion order (a block after its insides): order rows by module order,
    # a block's residual add after its last layer
    order, last = {}, {}
    for i, (n, _) in enumerate(model.named_modules()):
        order[n] = i
        parts = n.split(".")
        for k in range(1, len(parts) + 1):
            last[".".join(parts[:k])] = i
    row.rows.sort(key=lambda r: last.get(r.name[:-4], 0) + 0.5 if r.name.endswith(".add")
                  else order.get(r.name, 0))
    return "n/a"
