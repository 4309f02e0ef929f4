"""Projected gradient descent (Madry et al. 2018) in input space [0, 1], Linf or L2 budget."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _l2_normalise(g: torch.Tensor) -> torch.Tensor:
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.ndim - 1)))


def _project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).view(-1, *([1] * (delta.ndim - 1)))
    return delta * (eps / n.clamp_min(1e-12)).clamp(max=1.0)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, steps: int,
        alpha: float | None = None) -> torch.Tensor:
    """Adversarial examples within ``eps`` of ``x`` (clamped to [0, 1]) after ``steps`` ascent steps from a random start.

    ``alpha`` defaults to 2.5 * eps / steps. The model's train/eval mode is left as it was.
    """
    alpha = 2.5 * eps / steps if alpha is None else alpha
    if norm == "linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        delta = _project(_l2_normalise(torch.randn_like(x)) * eps * torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device), "l2", eps)
    delta = ((x + delta).clamp(0, 1) - x).detach()
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (g,) = torch.autograd.grad(loss, delta)
        step = g.sign() if norm == "linf" else _l2_normalise(g)
        delta = _project(delta.detach() + alpha * step, norm, eps)
        delta = ((x + delta).clamp(0, 1) - x).detach()
    return (x + delta).detach()
