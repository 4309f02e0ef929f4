"""User-facing errors: one line that names the problem and the fix.

The CLI prints ``LayerlabError`` messages without a traceback and exits non-zero; anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations


class LayerlabError(Exception):
    """A problem with the user's input (spec, path, shape, data) that the user can fix."""


class SpecError(LayerlabError, ValueError):
    """An unknown or malformed model/data/recipe spec."""


class DataError(LayerlabError):
    """Missing, empty or malformed data."""


class ShapeError(LayerlabError, ValueError):
    """A tensor of the wrong shape at a public entry point."""


class NonFiniteError(LayerlabError, FloatingPointError):
    """A NaN or infinite loss, logit or metric."""


def check_images(x, *, name: str = "images") -> None:
    """Raise ShapeError unless ``x`` is a float image batch of shape [N, C, H, W]."""
    import torch

    if not isinstance(x, torch.Tensor):
        raise ShapeError(f"{name}: expected a torch.Tensor of shape [N, C, H, W], got {type(x).__name__}")
    if x.ndim != 4:
        raise ShapeError(
            f"{name}: expected a 4-D image batch [N, C, H, W], got shape {tuple(x.shape)}; "
            "add a batch dimension with x.unsqueeze(0) for a single image"
        )
    if x.shape[0] == 0:
        raise ShapeError(f"{name}: the batch is empty (shape {tuple(x.shape)})")


def check_finite(t, *, what: str, hint: str = "lower the learning rate or check the inputs") -> None:
    """Raise NonFiniteError when ``t`` holds NaN or inf."""
    import torch

    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{what} is not finite (NaN or inf); {hint}")
