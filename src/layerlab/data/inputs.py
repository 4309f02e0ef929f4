"""The user's own images and labels as tensors: validation and the model-input convention.

Analyses read images through one re-iterable, ordered source of batches (:func:`~layerlab.data.as_batches`): a
data spec or an ImageData (layerlab's convention: uint8 or [0, 1] floats, the model wrapper normalises), or the
user's own tensors, arrays, Dataset or DataLoader, whose images are fed to the model as given (their own
preprocessing; only uint8 is divided by 255). This module checks and converts those images and labels.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError, ShapeError


def as_model_input(images: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """User images as the model gets them: uint8 (0..255) is divided by 255, floating images are passed as they
    are (normalised, any range: the user's own preprocessing); other dtypes are an error."""
    if images.dtype == torch.uint8:
        return images.to(device).float().div_(255)
    if images.is_floating_point():
        return images.to(device)
    raise ShapeError(f"images: expected uint8 (0..255) or floating tensors, got dtype {images.dtype}")


def _as_tensor(x, what: str) -> torch.Tensor:
    """A torch tensor from a tensor, a numpy array or a PIL image (PIL: uint8 [C, H, W])."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if type(x).__module__.startswith("PIL."):
        from torchvision.transforms.v2 import functional as TF

        return TF.pil_to_tensor(x)
    raise ShapeError(f"{what}: expected a tensor, a numpy array or a PIL image, got {type(x).__name__}")


def _as_labels(y, n: int, what: str) -> torch.Tensor:
    """Integer class labels [n] (int64); -1 marks an unlabelled image."""
    if y is None:
        return torch.full((n,), -1, dtype=torch.long)
    t = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    if t.ndim != 1 or t.shape[0] != n or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ShapeError(f"{what}: expected integer class labels of shape ({n},), one per image, got dtype "
                         f"{t.dtype} and shape {tuple(t.shape)}; one-hot or soft labels: pass labels.argmax(1)")
    return t.to(torch.long)


def _check_images(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.ndim != 4:
        raise ShapeError(f"{what}: expected images [N, C, H, W], got shape {tuple(x.shape)}"
                         + ("; add a batch dimension with x.unsqueeze(0)" if x.ndim == 3 else ""))
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ShapeError(f"{what}: expected uint8 (0..255) or floating images, got dtype {x.dtype}")
    return x


def check_batch_labels(num_outputs: int, labels: torch.Tensor, what: str, data: str = "the data") -> None:
    """Raise DataError when a batch holds a label the model's ``num_outputs`` logits cannot predict."""
    if labels.numel() and int(labels.max()) >= num_outputs:
        needed = int(labels.max()) + 1
        raise DataError(
            f"{what} has {num_outputs} outputs but {data} has labels up to {needed - 1} ({needed} classes); use a model "
            f"with at least {needed} outputs, or pass only images of classes 0..{num_outputs - 1}"
        )

