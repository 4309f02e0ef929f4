"""Shifted data: any :class:`~layerlab.data.Batches` seen through a shift (:func:`shifted`), batch by batch.

The shifted source yields the same labels in the same order as the data it wraps; image i (counted from 0 in
stream order) is corrupted from its own random stream, so the shifted images do not depend on the batch size.
Adversarial images are computed against the model on the first pass and kept (on the CPU) for later passes: an
analysis reads its data many times, and an attack is costly and, on CUDA, not bit-reproducible.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch import nn

from ..data import UNIT_SLACK, Batches, DataLike, as_batches
from ..errors import DataError, LayerlabError
from ..runtime import model_fingerprint
from .adversarial import pgd
from .apply import corrupt
from .spec import ADVERSARIAL, Shift, parse_shift

__all__ = ["ShiftedBatches", "check_unit_images", "shifted"]


def check_unit_images(x: torch.Tensor, what: str) -> None:
    """DataError unless ``x`` lies in [0, 1] (up to UNIT_SLACK): corruptions and eps budgets assume such images."""
    lo, hi = float(x.min()), float(x.max())
    if not (-UNIT_SLACK <= lo and hi <= 1 + UNIT_SLACK):  # also false for NaN
        raise DataError(f"{what}: images lie in [{lo:.4g}, {hi:.4g}], but corruptions and PGD budgets are defined on "
                        "[0, 1] images; pass unnormalised images in [0, 1] and a model that normalises inside "
                        "(layerlab.models.Normalized)")


class ShiftedBatches(Batches):
    """``data`` under ``shift``: the same labels, order, indices and length, the images shifted on the fly.

    ``chunk`` bounds how many images are corrupted or attacked at once (None: each batch whole); the batches
    themselves are ``data``'s. Adversarial batches are cached per batch on the first pass (``cache=True``).
    """

    streamed = True

    def __init__(self, data: Batches, shift: Shift, *, seed: int = 0, model: nn.Module | None = None,
                 chunk: int | None = None, steps: int = 10, cache: bool = True) -> None:
        self.data, self.shift, self.seed, self.model = data, shift, int(seed), model
        self.chunk, self.steps, self.cache = chunk, int(steps), cache
        self.spec, self.split, self.classes = data.spec, data.split, data.classes
        self._adversarial: dict[int, torch.Tensor] = {}

    @property
    def indices(self) -> torch.Tensor:
        return self.data.indices

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def __len__(self) -> int:
        return len(self.data)

    def known_len(self) -> int | None:
        return self.data.known_len()

    def describe(self) -> str:
        return f"{self.data.describe()} under shift {self.shift}"

    def check_outputs(self, num_outputs: int, what: str) -> None:
        self.data.check_outputs(num_outputs, what)

    def fingerprint(self) -> str:
        """sha256 of the data's fingerprint, the shift and the seed (and for an attack the model and its steps)."""
        h = hashlib.sha256(f"shifted|{self.data.fingerprint()}|{self.shift}|{self.seed}".encode())
        if self.shift.adversarial:
            assert self.model is not None
            h.update(f"|{model_fingerprint(self.model)}|{self.steps}".encode())
        return h.hexdigest()[:16]

    def _apply(self, x: torch.Tensor, y: torch.Tensor, start: int) -> torch.Tensor:
        positions = torch.arange(start, start + x.shape[0])
        if not self.shift.adversarial:
            return corrupt(x, self.shift, seed=self.seed, positions=positions)
        assert self.model is not None
        return pgd(self.model, x, y, norm=ADVERSARIAL[self.shift.name], eps=self.shift.severity / 255,
                   steps=self.steps, seed=self.seed, positions=positions)

    def _shift(self, x: torch.Tensor, y: torch.Tensor, start: int) -> torch.Tensor:
        size = self.chunk or x.shape[0]
        parts = [self._apply(x[i : i + size], y[i : i + size], start + i) for i in range(0, x.shape[0], size)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def batches(self, device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start = 0
        for k, (x, y) in enumerate(self.data.batches(device)):
            if k == 0:
                check_unit_images(x, self.describe())
            if self.shift.adversarial and self.cache:
                if k not in self._adversarial:
                    self._adversarial[k] = self._shift(x, y, start).to("cpu", copy=True)
                out = self._adversarial[k].to(x.device, copy=True)
            else:
                out = self._shift(x, y, start)
            yield out, y
            start += x.shape[0]


def shifted(data: Batches | DataLike, shift: Shift | str, *, seed: int = 0, model: nn.Module | None = None,
            batch_size: int | None = None, steps: int = 10, cache: bool = True) -> Batches:
    """``data`` under ``shift`` as a :class:`~layerlab.data.Batches`: the same labels in the same order, images
    corrupted (``seed`` picks the random draws) or attacked (PGD against ``model``, ``steps`` steps, on the
    batches' device). A clean shift returns ``data`` itself. ``batch_size`` bounds the images shifted at once.

    >>> from layerlab.data import as_batches
    >>> data = as_batches(torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    >>> shifted(data, "clean") is data, shifted(data, "contrast:3").describe()
    (True, 'the data passed in (4 images) under shift contrast:3')
    """
    shift = parse_shift(shift)
    data = as_batches(data)
    if shift.clean:
        return data
    if shift.adversarial and model is None:
        raise LayerlabError(f"shift {shift}: adversarial images are computed against a model; pass model=")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise LayerlabError(f"shifted: batch_size must be a positive integer or None, got {batch_size!r}")
    return ShiftedBatches(data, shift, seed=seed, model=model, chunk=batch_size, steps=steps, cache=cache)
