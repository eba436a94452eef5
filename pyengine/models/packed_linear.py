"""A Linear layer that runs fp32 CPU inference on a weight prepacked for oneDNN (layers of at
least :data:`MIN_FEATURES` inputs and outputs, inputs of at least :data:`MIN_ROWS` rows).

``F.linear`` on the CPU hands the weight to the BLAS, which repacks it into its blocked layout
on every call; at the row counts of a ViT at small batch (197 tokens) that repacking is a
visible part of a layer's time. Inference does not change the weight, so the packed copy is
made once (per weight version) and reused: what torch.compile's freezing does, in eager.

Used where a compact model is built (:mod:`pyengine.models.vit.compact`). The state dict is a
plain Linear's; the packed copy is a cache (dropped on copy and pickling, rebuilt on use).
Anything else (training, autograd, other devices or dtypes, torch.compile tracing, a dispatch
mode such as FlopCounterMode, a torch without oneDNN) runs ``F.linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["PackedLinear", "available", "pack_mlp", "LINEAR_KIND"]


def available() -> bool:
    """oneDNN and its prepacked linear ops are in this torch build."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


_AVAILABLE = available()
# oneDNN's call costs more than the BLAS's: below these sizes the repacking it saves is worth
# less (on 2 cores a 128-wide layer ran slower packed, a 384 -> 1152 one faster)
MIN_FEATURES, MIN_ROWS = 256, 128
# what the compact models' linear layers run on the CPU; a latency table records it (a table
# measured on the other kind is stale: cost/latency_table.py)
LINEAR_KIND = f"onednn-packed-{MIN_FEATURES}-{MIN_ROWS}" if _AVAILABLE else "plain"


def _dispatch_mode_active() -> bool:
    """A TorchDispatchMode is on (FlopCounterMode, fake tensors, ...): it sees the linear it
    knows, not an opaque oneDNN op."""
    return _get_current_dispatch_mode() is not None


class PackedLinear(nn.Linear):
    """``nn.Linear`` whose fp32 CPU inference (no autograd) uses a prepacked weight."""

    def _eligible(self, x: torch.Tensor) -> bool:
        return (_AVAILABLE and min(self.in_features, self.out_features) >= MIN_FEATURES
                and x.numel() >= MIN_ROWS * x.shape[-1]
                and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and x.dim() >= 2 and x.numel() > 0
                and not torch.compiler.is_compiling() and not _dispatch_mode_active()
                and not (torch.is_grad_enabled()
                         and (x.requires_grad or self.weight.requires_grad
                              or (self.bias is not None and self.bias.requires_grad))))

    def _packed(self, rows: int) -> torch.Tensor:
        w = self.weight
        # an inference tensor has no version counter (made under inference_mode: weights
        # built there are not edited in place afterwards)
        key = (w.data_ptr(), -1 if w.is_inference() else w._version)
        cache = self.__dict__.get("_pack")
        if cache is None or cache[0] != key:
            # the row count is a hint for the packed layout (the first call's); the packed
            # weight is valid for any, so a new batch size does not repack
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows)
            self.__dict__["_pack"] = cache = (key, packed)
        return cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._eligible(x):
            return F.linear(x, self.weight, self.bias)
        packed = self._packed(x.numel() // x.shape[-1])
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

    def __getstate__(self):  # copies and pickles carry no cache (an opaque oneDNN tensor)
        state = self.__dict__.copy()
        state.pop("_pack", None)
        return state

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_pack", None)  # .to()/.half()/... : the weight is another tensor
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", packed for CPU inference"


def pack_mlp(mlp: nn.Module) -> nn.Module:
    """Give a timm ``Mlp`` PackedLinear ``fc1``/``fc2`` (same shapes, weights, device, dtype)."""
    for name in ("fc1", "fc2"):
        old = getattr(mlp, name)
        new = PackedLinear(old.in_features, old.out_features, bias=old.bias is not None,
                           device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        setattr(mlp, name, new)
    return mlp
