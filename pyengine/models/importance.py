"""The vocabulary in which a model family declares its importance units (what each prunable
structure owns), for the generic criteria of :mod:`pyengine.methods.criteria`.

Per block a family gives:

* hooks: the tensors calibration records (a module's input or output, or a residual branch's
  output), each under a key;
* layers: the weight matrices (viewed as 2-D ``[out, in * kernel]``) and bias-like vectors of the
  block, each with the key of its recorded input (for Wanda/RIA input norms);
* groups: the structure types (heads, dims, neurons, channels), each unit a sum of parts: rows
  or columns of a layer's weight (their contributions under a weight criterion) and channels
  of a recorded feature (under a feature criterion); and branches: a whole residual branch
  (all its layers; its output feature).

A criterion computes per-row/column contributions of every layer (or per-channel feature
contributions), the units sum their parts and the criterion finishes the sum (identity, sqrt,
abs). Nothing here names a criterion, and nothing in the criteria names a model family.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["Hook", "LayerView", "Part", "Group", "Branch"]


@dataclass
class Hook:
    """Record ``module``'s "input" or "output" under ``key`` ("branch_output": an output that
    the model then modifies in place; the family's forward gets a copy). ``channels_last``:
    whether calibration moves dim 1 last (None: the units' ``channels_last``; a CNN tensor
    that is NHWC already says False)."""

    key: str
    module: torch.nn.Module
    where: str
    channels_last: bool | None = None


@dataclass
class LayerView:
    """A layer's weight (any shape; rows = first dim), its bias-like vectors (one value per
    row, e.g. a Linear's bias or a BatchNorm's scale and shift) and the recorded input it
    reads (``input_key``; None for no weight); ``repeat``: weight columns per input channel
    (a conv's kh * kw); ``groups``: a grouped (or depthwise) conv's groups, whose row ``i``
    reads only the input channels of its own group."""

    weight: torch.Tensor | None
    biases: list[torch.Tensor | None] = field(default_factory=list)
    input_key: str | None = None
    repeat: int = 1
    groups: int = 1


@dataclass
class Part:
    """Entries of ``source`` (a layer's "row"s or "col"s, or a feature's channels) that make
    the units of a group: ``index`` has the group's shape plus any trailing dims, which are
    summed."""

    source: str
    kind: str  # "row" | "col" | "feature"
    index: torch.Tensor


@dataclass
class Group:
    """A structure type of ``shape`` units, with its weight parts and its feature parts."""

    name: str
    shape: tuple[int, ...]
    weight_parts: list[Part]
    feature_parts: list[Part]


@dataclass
class Branch:
    """A whole residual branch: every weight and bias of ``layers``; its output ``feature``."""

    name: str
    layers: tuple[str, ...]
    feature: str
