"""Adversarial inputs: untargeted PGD (Madry, Makelov, Schmidt, Tsipras, Vladu 2018) in the L-inf or L2 ball.

PGD maximises the cross-entropy of the model's logits from a random start inside the ball: each step moves the
perturbation along the gradient's sign (L-inf) or its per-image unit direction (L2), then projects it back into
the ball and the image into [0, 1]. The last iterate is returned. The model is only read: eval mode for the
attack (its own training flags back afterwards), gradients taken w.r.t. the input alone (no parameter ``.grad``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LayerlabError, ShapeError, check_images
from ..runtime import eval_mode, model_device
from ..seeds import derive_seed

__all__ = ["NORMS", "pgd"]

NORMS = ("linf", "l2")


def _per_image_norm(t: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each image [B, 1, 1, 1]."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.ndim - 1)))


def _project(delta: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """``delta`` back in the eps ball, then ``x + delta`` back in [0, 1] (which only shrinks delta)."""
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _per_image_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0, 1) - x


def random_start(x: torch.Tensor, norm: str, eps: float, seed: int, positions: torch.Tensor) -> torch.Tensor:
    """A start drawn uniformly from the eps ball around each image, from its own stream
    ``derive_seed("shift/pgd", seed, position)`` (drawn on the CPU, so the same on every device)."""
    parts = []
    for p in positions.tolist():
        g = torch.Generator().manual_seed(derive_seed("shift/pgd", seed, int(p)))
        if norm == "linf":
            parts.append((torch.rand(x.shape[1:], generator=g) * 2 - 1) * eps)
        else:  # a uniform direction, radius eps * U^(1/d): uniform in the ball
            d = torch.randn(x.shape[1:], generator=g)
            r = eps * torch.rand((), generator=g) ** (1.0 / d.numel())
            parts.append(d * (r / d.norm().clamp_min(1e-12)))
    return _project(torch.stack(parts).to(device=x.device, dtype=x.dtype), x, norm, eps)


def _check(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, norm: str, eps: float, steps: int) -> None:
    if not isinstance(model, nn.Module):
        raise LayerlabError(f"pgd: model must be a torch.nn.Module, got {type(model).__name__}")
    check_images(x, name="pgd: x")
    if not x.is_floating_point():
        raise ShapeError(f"pgd: x must be floating images in [0, 1], got dtype {x.dtype}")
    if labels.ndim != 1 or labels.shape[0] != x.shape[0]:
        raise ShapeError(f"pgd: labels must be [B] = [{x.shape[0]}] class indices (-1: unlabelled), got shape "
                         f"{tuple(labels.shape)}")
    if norm not in NORMS:
        raise LayerlabError(f"pgd: norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if not eps > 0:
        raise LayerlabError(f"pgd: eps must be > 0 (in [0, 1] image units, e.g. 2/255), got {eps!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise LayerlabError(f"pgd: steps must be a positive integer, got {steps!r}")


def pgd(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, *, norm: str, eps: float, steps: int = 10,
        step_size: float | None = None, seed: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Untargeted PGD images for ``x`` [B, C, H, W] in [0, 1]: within ``eps`` of ``x`` in ``norm`` ("linf" or
    "l2", eps in [0, 1] image units) and in [0, 1], same dtype and device as ``x``.

    ``labels`` below 0 (unlabelled) attack the model's own prediction on ``x``. ``step_size`` defaults to
    2.5 * eps / steps (Madry et al.'s choice: the walk can cross the ball). The random start of image i is drawn
    from stream ``derive_seed("shift/pgd", seed, positions[i])`` (``positions`` defaults to 0..B-1), so an
    image's attack does not depend on its batch. Runs on the model's device and works under the caller's
    ``torch.inference_mode`` / ``no_grad``; the model's parameters, gradients and training flags are untouched.
    """
    labels = torch.as_tensor(labels)
    _check(model, x, labels, norm, eps, steps)
    alpha = 2.5 * eps / steps if step_size is None else float(step_size)
    positions = torch.arange(x.shape[0]) if positions is None else torch.as_tensor(positions).reshape(-1)
    device = model_device(model) or x.device
    with torch.inference_mode(False), torch.enable_grad(), eval_mode(model):
        x0 = x.detach().to(device).clone().clamp_(0, 1)  # a clone outside inference mode: a normal tensor
        y = labels.detach().to(device=device, dtype=torch.long).clone()
        if bool((y < 0).any()):
            with torch.no_grad():
                y = torch.where(y < 0, model(x0).argmax(-1), y)
        delta = random_start(x0, norm, eps, seed, positions)
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model(x0 + delta), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                if norm == "linf":
                    step = grad.sign()
                else:
                    step = grad / _per_image_norm(grad).clamp_min(1e-12)
                delta = _project(delta.detach() + alpha * step, x0, norm, eps)
        out = (x0 + delta).clamp_(0, 1).detach()
    return out.to(device=x.device, dtype=x.dtype)
