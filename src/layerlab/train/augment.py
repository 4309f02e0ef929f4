"""Per-sample augmentation with torchvision v2 on uint8 batches (v2 transforms draw one set of parameters
per call, so each image gets its own call), and batch-level mixup/cutmix."""
from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms import v2

from ..registry import Registry

AUGMENTATIONS: Registry[Callable[[int], Callable[[torch.Tensor], torch.Tensor] | None]] = Registry("augmentation")


@AUGMENTATIONS.register("none")
def _none(size: int):
    return None


@AUGMENTATIONS.register("crop")
def _crop(size: int):
    return v2.RandomCrop(size, padding=max(1, size // 8))


@AUGMENTATIONS.register("cropflip")
def _cropflip(size: int):
    return v2.Compose([v2.RandomCrop(size, padding=max(1, size // 8)), v2.RandomHorizontalFlip()])


@AUGMENTATIONS.register("randaugment")
def _randaugment(size: int):
    return v2.Compose([v2.RandomCrop(size, padding=max(1, size // 8)), v2.RandAugment()])


@AUGMENTATIONS.register("augmix")
def _augmix(size: int):
    return v2.Compose([v2.RandomCrop(size, padding=max(1, size // 8)), v2.AugMix()])


@AUGMENTATIONS.register("trivialaugment")
def _trivial(size: int):
    return v2.Compose([v2.RandomCrop(size, padding=max(1, size // 8)), v2.TrivialAugmentWide()])


def augmenter(name: str, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function uint8 [B, C, H, W] -> uint8 [B, C, H, W] applying the named augmentation per image."""
    t = AUGMENTATIONS.get(name)(size)
    if t is None:
        return lambda x: x
    return lambda x: torch.stack([t(img) for img in x])


def mixer(mixup: float, cutmix: float, num_classes: int) -> Callable | None:
    """Batch mixup/cutmix (torchvision v2) returning soft targets, or None when both are off."""
    ops = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + (
        [v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else []
    )
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
