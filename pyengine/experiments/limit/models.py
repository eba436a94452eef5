"""Small digits models for the pruning-limit experiments (the Hessian must stay affordable)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class DigitsMLP(nn.Module):
    """A ReLU MLP over one channel of the digits image (the loaders repeat the grey image
    over 3 channels; reading one avoids three copies of every input weight)."""

    def __init__(self, img_size: int = 8, hidden: Sequence[int] = (128, 128),
                 num_classes: int = 10):
        super().__init__()
        if img_size < 1 or any(h < 1 for h in hidden) or num_classes < 2:
            raise ValueError(f"DigitsMLP: bad sizes img_size={img_size}, hidden={list(hidden)}, "
                             f"num_classes={num_classes}")
        self.img_size = img_size
        dims = [img_size * img_size, *hidden, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x[:, 0]
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def digits_mlp(img_size: int = 8, hidden: Sequence[int] = (128, 128),
               num_classes: int = 10) -> DigitsMLP:
    return DigitsMLP(img_size, hidden, num_classes)


from pyengine.models.zoo import DIGITS_VIT_SMALL, digits_vit_small  # noqa: E402,F401
