"""The :class:`Normalized` wrapper: a classifier that expects normalised inputs, made to take images in [0, 1]."""
from __future__ import annotations

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalized(nn.Module):
    """Wraps a classifier that expects normalised inputs so that it takes images in [0, 1].

    Input normalisation belongs to the model (METHODS.md section 1), so every analysis feeds [0, 1] images.
    """

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def _mean_std(model: Normalized) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return tuple(model.mean.flatten().tolist()), tuple(model.std.flatten().tolist())
