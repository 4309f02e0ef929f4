"""Batches: one re-iterable, ordered source of ``(inputs, labels)`` for every analysis (:func:`as_batches`).

Any image data (a spec, an :class:`~layerlab.data.ImageData`, tensors, arrays, a torch ``Dataset`` or a
``DataLoader``) becomes a :class:`Batches` that yields the same images in the same order on every pass; a
streamed source is checked pass against pass (:func:`batch_checksum`) and keyed by a fingerprint of its content.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError, ShapeError
from .images import ImageData, check_label_coverage, subset_rows, to_unit_float
from .inputs import _as_labels, _as_tensor, _check_images, as_model_input, check_batch_labels
from .specs import load_data


class Batches(ABC):
    """A re-iterable, ordered source of ``(inputs, labels)`` batches: what an analysis reads its images from.

    Every pass yields the same images in the same order. ``inputs`` are what the model is fed (float; spec data in
    [0, 1]); ``labels`` are int64, -1 where an image has no label. ``len()`` and ``indices`` (the position of each
    image in the data the user passed, or its source index for spec data) are known up front for in-memory data
    and indexable datasets, and after the first pass for a DataLoader.
    """

    spec: str = ""
    split: str = ""
    classes: list[str] | None = None
    streamed = False  # True: images are produced batch by batch and never all held

    @abstractmethod
    def batches(self, device: str | torch.device = "cpu"):
        """Yield ``(inputs, labels)`` on ``device``, the same images in the same order on every pass."""

    def __iter__(self):
        return self.batches()

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    @abstractmethod
    def indices(self) -> torch.Tensor:
        """Each image's position in the data the user passed (its source index for spec data)."""

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else 0

    def known_len(self) -> int | None:
        """The number of images when known without reading the data (a DataLoader's only after a full pass)."""
        return len(self)

    @abstractmethod
    def describe(self) -> str:
        """How error messages name this data."""

    def check_outputs(self, num_outputs: int, what: str) -> None:
        """Up-front label check where all labels are known (in-memory data); streams check batch by batch."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A store key for these images and labels."""


class TensorBatches(Batches):
    """Images held in memory (an ImageData, a tensor or an ``(images, labels)`` pair), cut into batches."""

    def __init__(self, data: ImageData | None = None, *, images: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, indices: torch.Tensor | None = None, batch_size: int = 128,
                 what: str = "the in-memory images") -> None:
        self.data, self.batch_size, self.what = data, int(batch_size), what
        if data is not None:  # layerlab's convention: uint8 or [0, 1] floats, through to_unit_float
            self.images, self.labels, self._indices = data.images, data.labels, data.indices
            self.spec, self.split, self.classes = data.spec, data.split, data.classes
        else:  # the user's own images, fed as given
            assert images is not None and labels is not None and indices is not None
            self.images, self.labels, self._indices = images, labels, indices

    @property
    def indices(self) -> torch.Tensor:
        return self._indices

    def describe(self) -> str:
        return self.data.describe() if self.data is not None else self.what

    def batches(self, device: str | torch.device = "cpu"):
        convert = to_unit_float if self.data is not None else as_model_input
        for i in range(0, len(self.labels), self.batch_size):
            yield convert(self.images[i : i + self.batch_size], device), self.labels[i : i + self.batch_size].to(device)

    def check_outputs(self, num_outputs: int, what: str) -> None:
        if self.data is not None:
            check_label_coverage(num_outputs, self.data, what)
        else:
            check_batch_labels(num_outputs, self.labels, what, self.what)

    def fingerprint(self) -> str:
        import hashlib

        if self.data is not None:  # as criticality has always keyed ImageData (store keys stay valid)
            d = self.data
            h = hashlib.sha256(f"{d.spec}|{d.split}|{tuple(d.images.shape)}".encode())
            h.update(d.indices.cpu().contiguous().numpy().tobytes())
            if not d.spec:  # an in-memory data set: hash the pixels themselves
                h.update(d.images.cpu().contiguous().numpy().tobytes())
            h.update(d.labels.cpu().contiguous().numpy().tobytes())
            return h.hexdigest()[:16]
        h = hashlib.sha256(f"tensor|{tuple(self.images.shape)}|{self.images.dtype}".encode())
        h.update(self._indices.numpy().tobytes())
        x = self.images.detach().cpu().contiguous()
        h.update(x.reshape(-1).view(torch.uint8).numpy())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()[:16]


class DatasetBatches(Batches):
    """A map-style torch ``Dataset`` (items ``(image, label, ...)`` or ``image``), read lazily at ``rows``."""

    streamed = True

    def __init__(self, dataset, rows: torch.Tensor, batch_size: int = 128) -> None:
        self.dataset, self.rows, self.batch_size = dataset, rows, int(batch_size)
        self.classes = list(getattr(dataset, "classes", []) or []) or None

    @property
    def indices(self) -> torch.Tensor:
        return self.rows

    def describe(self) -> str:
        return f"the {type(self.dataset).__name__}"

    def batches(self, device: str | torch.device = "cpu"):
        rows = self.rows.tolist()
        for i in range(0, len(rows), self.batch_size):
            xs, ys = [], []
            for r in rows[i : i + self.batch_size]:
                item = self.dataset[r]
                if isinstance(item, (tuple, list)):  # (image, label, ...) or (image,)
                    x, y = item[0], (item[1] if len(item) >= 2 else None)
                else:
                    x, y = item, None
                x = _as_tensor(x, f"{self.describe()}[{r}]")
                if x.ndim != 3:
                    raise ShapeError(f"{self.describe()}[{r}]: expected an image [C, H, W], got shape {tuple(x.shape)}")
                xs.append(x)
                try:
                    ys.append(-1 if y is None else int(y))
                except (TypeError, ValueError, RuntimeError):
                    raise ShapeError(f"{self.describe()}[{r}]: expected an integer class label, got {type(y).__name__}"
                                     f"{' of shape ' + str(tuple(y.shape)) if hasattr(y, 'shape') else ''}") from None
            try:
                x = torch.stack(xs)
            except RuntimeError:
                raise DataError(f"{self.describe()}: images of different shapes ({sorted({tuple(t.shape) for t in xs})[:3]}); "
                                "add a Resize/CenterCrop transform to the dataset") from None
            yield as_model_input(_check_images(x, self.describe()), device), torch.tensor(ys, dtype=torch.long).to(device)

    def fingerprint(self) -> str:
        return _stream_fingerprint(self, f"dataset|{type(self.dataset).__name__}|{len(self.rows)}")


def batch_checksum(x: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, int]:
    """(sum, sum of squares, label sum) of one batch in float64: what the same batch must give on a later pass."""
    xd = x.detach().double()
    return float(xd.sum()), float(xd.square().sum()), int(labels.sum())


def changed_between_passes(source: str, batch: int) -> DataError:
    """The error for data that yielded different images on another pass (shuffling, random augmentation)."""
    return DataError(f"{source} yielded different images on another pass (batch {batch}): an analysis reads its data "
                     "several times and needs the same images in the same order; turn off shuffling and random "
                     "augmentation")


class LoaderBatches(Batches):
    """A ``DataLoader`` (or any re-iterable of batches): its batches in the order it yields them, the first
    ``limit`` images (all when None). Batches are ``images``, ``(images, labels, ...)`` or a dict with an image and a
    label key. Every pass must yield the same images in the same order (no shuffling, no random augmentation):
    a batch that differs from the first pass is a DataError."""

    streamed = True
    IMAGE_KEYS = ("image", "images", "pixel_values", "input", "x")
    LABEL_KEYS = ("label", "labels", "target", "targets", "y")

    def __init__(self, loader, limit: int | None = None) -> None:
        from torch.utils.data import DataLoader, RandomSampler

        if isinstance(loader, DataLoader) and isinstance(loader.sampler, RandomSampler):
            raise DataError("the DataLoader shuffles (shuffle=True): an analysis needs the same images in the same "
                            "order on every pass; build it with shuffle=False")
        self.loader, self.limit = loader, limit
        dataset = getattr(loader, "dataset", None)
        self.classes = list(getattr(dataset, "classes", []) or []) or None
        self._count: int | None = None
        self._sums: list[tuple[float, float, int]] | None = None

    @property
    def indices(self) -> torch.Tensor:
        if self._count is None:
            for _ in self.batches():  # one pass to count (also records the checksums later passes must match)
                pass
        return torch.arange(self._count)  # type: ignore[arg-type]

    def known_len(self) -> int | None:
        return self._count

    def describe(self) -> str:
        return f"the {type(self.loader).__name__}"

    def _split(self, batch) -> tuple[torch.Tensor, object]:
        if isinstance(batch, dict):
            x = next((batch[k] for k in self.IMAGE_KEYS if k in batch), None)
            if x is None:
                raise ShapeError(f"{self.describe()} yields dicts without an image key ({', '.join(self.IMAGE_KEYS)}); "
                                 f"got keys {sorted(batch)[:6]}")
            return x, next((batch[k] for k in self.LABEL_KEYS if k in batch), None)
        if isinstance(batch, (tuple, list)):
            if not batch:
                raise ShapeError(f"{self.describe()} yields empty batches")
            return batch[0], batch[1] if len(batch) >= 2 else None
        return batch, None

    def batches(self, device: str | torch.device = "cpu"):
        seen, sums = 0, []
        for k, batch in enumerate(self.loader):
            if self.limit is not None and seen >= self.limit:
                break
            x, y = self._split(batch)
            x = _check_images(_as_tensor(x, self.describe()), self.describe())
            labels = _as_labels(y, x.shape[0], f"{self.describe()} labels")
            if self.limit is not None and seen + x.shape[0] > self.limit:
                x, labels = x[: self.limit - seen], labels[: self.limit - seen]
            check = batch_checksum(x, labels)
            if self._sums is not None and (k >= len(self._sums) or self._sums[k] != check):
                raise changed_between_passes(self.describe(), k)
            sums.append(check)
            seen += x.shape[0]
            yield as_model_input(x, device), labels.to(device)
        if self._sums is not None and len(sums) != len(self._sums):
            raise DataError(f"{self.describe()} yielded {len(sums)} batches on this pass, {len(self._sums)} before; "
                            "it must yield the same images every pass")
        if seen == 0:
            raise DataError(f"{self.describe()} yielded no images")
        if self.limit is not None and seen < self.limit:  # never silently fewer than asked for
            raise DataError(f"asked for {self.limit} images but {self.describe()} yields {seen}; pass images={seen} "
                            "or fewer (or omit it for all)")
        self._sums, self._count = sums, seen

    def fingerprint(self) -> str:
        return _stream_fingerprint(self, f"loader|{type(self.loader).__name__}|{self.limit}")


#: what :func:`as_batches` accepts
DataLike = Union[str, ImageData, torch.Tensor, np.ndarray, tuple, Dataset, DataLoader, Batches, Iterable]


def _stream_fingerprint(source: Batches, head: str) -> str:
    """sha256 over every batch's inputs and labels (one pass): a store key for data that is not held."""
    import hashlib

    h = hashlib.sha256(head.encode())
    n = 0
    for x, y in source.batches():
        t = x.detach().cpu().contiguous()
        h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
        h.update(y.numpy().tobytes())
        n += t.shape[0]
    h.update(str(n).encode())
    return h.hexdigest()[:16]


def as_batches(
    data: DataLike,
    batch_size: int = 128,
    *,
    images: int | None = None,
    seed: int = 0,
    split: str = "test",
    arg: str = "--images",
) -> Batches:
    """Any image data as one re-iterable, ordered source of ``(inputs, labels)`` batches (:class:`Batches`).

    ``data`` may be

    * a data spec (``"digits"``): ``load_data(data, split, images, seed)``, images in [0, 1];
    * an :class:`ImageData`: its seeded subset of ``images`` (``ImageData.sample``), images in [0, 1];
    * a tensor ``[N, C, H, W]`` (unlabelled) or an ``(images, labels)`` pair of tensors or numpy arrays;
    * a map-style torch ``Dataset`` whose items are ``(image, label, ...)`` or ``image`` (tensor, array or PIL);
    * a ``DataLoader`` (or any re-iterable of batches: ``images``, ``(images, labels, ...)`` or dicts).

    The user's own images (all but the first two) are fed to the model as given: floating images keep their own
    preprocessing (normalised, any range) and only uint8 is divided by 255. For indexable data (a spec, ImageData,
    tensors, arrays, a Dataset) ``images``/``seed`` pick the same fixed seeded subset as :func:`load_data`
    (``indices`` are the chosen positions, in order); a DataLoader yields its batches in its own order and
    ``images=N`` takes the first N images it yields (``seed`` does not apply). ``batch_size`` does not apply to a
    DataLoader either: its batches are its own.
    """
    import inspect

    from torch.utils.data import IterableDataset

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(data, Batches):
        return data
    if isinstance(data, str):
        return TensorBatches(load_data(data, split, images, seed, arg=arg), batch_size=batch_size)
    if isinstance(data, ImageData):
        return TensorBatches(data.sample(images, seed, arg), batch_size=batch_size)
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return _in_memory(data, None, images, seed, arg, batch_size)
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(d, (torch.Tensor, np.ndarray, list)) for d in data):
        return _in_memory(data[0], data[1], images, seed, arg, batch_size)
    if inspect.isgenerator(data) or inspect.isgeneratorfunction(data):
        raise DataError("data: a generator can be read only once, and an analysis reads its data several times; "
                        "pass a DataLoader, a Dataset or tensors")
    if isinstance(data, IterableDataset):
        data = DataLoader(data, batch_size=batch_size)
    if isinstance(data, DataLoader) or (not isinstance(data, Dataset) and hasattr(data, "__iter__")
                                        and not hasattr(data, "__getitem__")):
        if images is not None and (isinstance(images, bool) or not isinstance(images, int) or images < 1):
            raise DataError(f"{arg.rstrip('=')}: expected a positive number of images, got {images!r}")
        return LoaderBatches(data, images)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (dict, bytes)):
        count = len(data)
        rows = subset_rows(count, images, seed, f"the {type(data).__name__} ({count} items)", arg)
        return DatasetBatches(data, rows, batch_size)
    raise DataError(
        f"data: expected a data spec such as 'digits', an ImageData, a tensor [N, C, H, W], an (images, labels) pair, "
        f"a torch Dataset or a DataLoader, got {type(data).__name__}"
    )


def _in_memory(x, y, images: int | None, seed: int, arg: str, batch_size: int) -> TensorBatches:
    x = _check_images(_as_tensor(x, "images"), "images")
    labels = _as_labels(y, x.shape[0], "labels")
    what = f"the data passed in ({x.shape[0]} images)"
    rows = subset_rows(x.shape[0], images, seed, what, arg)
    if images is not None and images != x.shape[0]:
        x, labels = x[rows], labels[rows]
    return TensorBatches(images=x, labels=labels, indices=rows, batch_size=batch_size, what=what)
