"""Image data in memory: :class:`ImageData`, the [0, 1] float convention and the fixed seeded subset.

Decoded images are a uint8 tensor [N, C, H, W] (or floats in [0, 1] for an ``ImageData`` built by hand);
:func:`to_unit_float` is the one conversion every model input goes through, :func:`subset_rows` the one seeded
choice of images (stream ``data/subset``) that ``load_data`` and :meth:`ImageData.sample` share.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .. import seeds
from ..errors import DataError, ShapeError

UNIT_SLACK = 1e-3  # float rounding of augmentations (AugMix blends) may step a hair outside [0, 1]


def to_unit_float(images: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """Images as a new float32 tensor in [0, 1] on ``device``: uint8 (0..255) is divided by 255, floating
    (0..1) is kept as is. The one conversion every model input goes through, so float images are never
    divided by 255 twice (which made every image near-black and every analysis number wrong)."""
    if images.dtype == torch.uint8:
        return images.to(device).float().div_(255)
    if images.is_floating_point():
        _check_unit_range(images, "images")
        return images.to(device=device, dtype=torch.float32, copy=True)
    raise ShapeError(f"images: expected uint8 (0..255) or floating (0..1) values, got dtype {images.dtype}; "
                     "convert with x.to(torch.uint8) or x.float() / 255")


def _check_unit_range(images: torch.Tensor, name: str) -> None:
    """Raise DataError unless floating ``images`` lie in [0, 1] (0-255 floats would be silently wrong)."""
    if images.numel() == 0:
        return
    lo, hi = float(images.min()), float(images.max())
    if not (-UNIT_SLACK <= lo and hi <= 1.0 + UNIT_SLACK):  # also false for NaN
        hint = ("images look like 0-255 floats: pass uint8 or divide by 255" if hi > 1.0 and lo >= 0.0 and hi <= 255.0
                else "normalised or non-finite images are not accepted: pass uint8 or floats in [0, 1]")
        raise DataError(f"{name}: floating images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; {hint}")


def subset_rows(count: int, n: int | None, seed: int, what: str, arg: str = "--images") -> torch.Tensor:
    """Sorted positions (int64) of a fixed seeded subset of ``n`` of ``count`` items (stream ``data/subset``).

    ``n=None`` or ``n == count`` means all, in order. Asking for more than ``count`` is an error, never a silent
    ``count``: ``what`` names the collection (e.g. "the test split of 'digits'") and ``arg`` the option to fix.
    """
    if n is None or n == count:
        return torch.arange(count)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"{arg.rstrip('=')}: expected a positive number of images, got {n!r}; omit it to use all {count} "
                        f"of {what}")
    if n > count:
        fix = f"{arg}{count}" if arg.endswith("=") else f"{arg} {count}"  # images=364 (Python) or --images 364 (CLI)
        raise DataError(f"asked for {n} images but {what} holds {count}; pass {fix} or fewer (or omit it for all)")
    perm = torch.randperm(count, generator=seeds.generator("data/subset", seed))
    return perm[:n].sort().values


def check_label_coverage(num_outputs: int, data: "ImageData", what: str) -> None:
    """Raise DataError when a model with ``num_outputs`` logits cannot predict every class of ``data``.

    Fewer outputs than classes made a 5-class model score ~0.06 on 10-class digits instead of failing; more
    outputs than classes (an ImageNet model on ``classes=0-4``) stays allowed.
    """
    needed = max(data.num_classes, int(data.labels.max()) + 1 if len(data) else 0)
    if num_outputs < needed:
        name = f"{data.spec!r}" if data.spec else "the data"
        raise DataError(
            f"{what} has {num_outputs} outputs but {name} has {needed} classes (labels 0..{needed - 1}); use a model "
            f"with at least {needed} outputs (finetune it: `layerlab finetune`), or restrict the data to its classes "
            f"with '?classes=0-{max(num_outputs - 1, 0)}'"
        )


@dataclass
class ImageData:
    """Decoded images [N, C, H, W], labels (int64 [N]) and the source indices they came from.

    ``images`` are uint8 (0..255; every loader makes these) or floating (0..1; an ImageData built by hand);
    read them through :meth:`float` / :meth:`batches`, which give float32 in [0, 1] either way.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    classes: list[str]
    spec: str = ""
    split: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Reject images a model would read wrongly: not [N, C, H, W], not uint8/floating, or floats outside [0, 1]."""
        x = self.images
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ShapeError(f"ImageData.images: expected a tensor [N, C, H, W], got {got}; "
                             "add a batch dimension with x.unsqueeze(0) or a channel one with x.unsqueeze(1)")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise ShapeError(f"ImageData.images: expected uint8 (0..255) or floating (0..1), got dtype {x.dtype}")
        if x.is_floating_point():
            _check_unit_range(x, "ImageData.images")
        n = x.shape[0]
        for name in ("labels", "indices"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n,):
                got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ShapeError(f"ImageData.{name}: expected a tensor of shape ({n},), one per image, got {got}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def float(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """Images as float32 in [0, 1] on ``device`` (:func:`to_unit_float`)."""
        return to_unit_float(self.images, device)

    def subset(self, rows: torch.Tensor | np.ndarray | list[int]) -> "ImageData":
        """The images at positions ``rows``, in that order (their source ``indices`` travel along)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return ImageData(self.images[rows], self.labels[rows], self.indices[rows], self.classes, self.spec, self.split, dict(self.meta))

    def sample(self, n: int | None, seed: int, arg: str = "--images") -> "ImageData":
        """A fixed seeded subset of ``n`` images (all for ``None``), the same choice ``load_data`` makes.

        ``n`` larger than the data is a DataError naming the size (``arg`` is the option the user set).
        """
        rows = subset_rows(len(self), n, seed, self.describe(), arg)
        if n is None or n == len(self):
            return self
        out = self.subset(rows)
        out.meta["seed"] = seed
        return out

    def describe(self) -> str:
        """'the test split of 'digits'' (or 'the in-memory data'): how error messages name this data."""
        if not self.spec:
            return f"the in-memory {self.split} data" if self.split else "the in-memory data"
        return f"the {self.split or 'chosen'} split of {self.spec!r}"

    def batches(self, batch_size: int, device: str | torch.device = "cpu"):
        """Yield (float images in [0, 1], labels) batches in order."""
        for i in range(0, len(self), batch_size):
            yield to_unit_float(self.images[i : i + batch_size], device), self.labels[i : i + batch_size].to(device)
