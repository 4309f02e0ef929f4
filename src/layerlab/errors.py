"""User-facing errors: one line that names the problem and the fix.

The CLI prints ``LayerlabError`` messages without a traceback and exits non-zero; anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
import warnings

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

class LayerlabError(Exception):
    """A problem with the user's input (spec, path, shape, data) that the user can fix."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the user's line: the first caller outside the layerlab package (and outside
    the standard library's contextlib/functools glue), so ``ll.criticality(...)`` in a notebook cell shows that
    cell, not ``layerlab/_api.py``. (``skip_file_prefixes`` does this from Python 3.12; 3.11 is supported.)"""
    frame, level = sys._getframe(1), 2  # stacklevel 2 is warn()'s caller, the frame getframe(1) returns
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE_DIR)
                                 or os.path.basename(frame.f_code.co_filename) in ("contextlib.py", "functools.py")):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


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


_MISMATCH_HINTS = ("channels", "shape", "size", "dimension")


def input_mismatch(error: Exception, what: str, shape: tuple[int, ...]) -> ShapeError | None:
    """The ShapeError to raise when a forward pass of ``what`` failed on images of ``shape`` [C, H, W] because
    they do not fit the model (wrong channel count or size), else None (a different failure: re-raise it).

    torch words these as "expected input[16, 3, 16, 16] to have 1 channels" or "mat1 and mat2 shapes cannot be
    multiplied": true, but naming neither the data nor the fix.
    """
    if not isinstance(error, RuntimeError):
        return None
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if not any(h in first for h in _MISMATCH_HINTS):
        return None
    return ShapeError(
        f"{what} cannot run on images of shape {tuple(shape)} (C, H, W): {first}; give the model images it was built "
        "for (e.g. 'digits?channels=1' or '?size=32' on a data spec, or a model with in_chans/img_size to match)"
    )
