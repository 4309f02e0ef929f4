"""Training recipes: named presets of one dataclass, so a zoo differs in exactly the fields it names.

Each recipe is a training *method* of the kind the criticality zoo compares (Gavrikov et al. 2024): optimiser
(SGD, Adam), augmentation (crop/flip, RandAugment, AugMix, TrivialAugment), symmetric label noise, PGD
adversarial training (Linf, L2), an "improved" recipe (label smoothing, mixup/cutmix, EMA, longer schedule)
and TrAct (Petersen et al. 2024).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import SpecError
from ..registry import Registry

AUGMENTS = ("none", "cropflip", "crop", "randaugment", "augmix", "trivialaugment")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class Recipe:
    """Everything that defines how a model is trained (the architecture and data are not part of it)."""

    name: str = "baseline"
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 10
    batch_size: int = 128
    schedule: str = "cosine"
    warmup_epochs: int = 0
    augment: str = "none"
    label_noise: float = 0.0
    adversarial: str | None = None
    eps: float = 0.0
    pgd_steps: int = 3
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    ema: float = 0.0
    tract: float = 0.0

    def __post_init__(self) -> None:
        checks = [
            (self.optimizer in OPTIMIZERS, f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}"),
            (self.schedule in SCHEDULES, f"schedule {self.schedule!r} is not one of {SCHEDULES}"),
            (self.augment in AUGMENTS, f"augment {self.augment!r} is not one of {AUGMENTS}"),
            (self.adversarial in (None, "linf", "l2"), f"adversarial {self.adversarial!r} is not one of None, 'linf', 'l2'"),
            (0.0 <= self.label_noise < 1.0, f"label_noise must be in [0, 1), got {self.label_noise}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0.0 <= self.ema < 1.0, f"ema decay must be in [0, 1), got {self.ema}"),
            (self.tract >= 0, f"tract lambda must be >= 0 (0 = off), got {self.tract}"),
            (self.adversarial is None or self.eps > 0, "adversarial training needs eps > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise SpecError(f"recipe {self.name!r}: {msg}")

    def with_overrides(self, **overrides: Any) -> "Recipe":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise SpecError(f"recipe {self.name!r} has no field(s) {', '.join(unknown)}; fields: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPES: Registry[Callable[[], Recipe]] = Registry("recipe")


def recipe(name: str, **overrides: Any) -> Recipe:
    """The named recipe with ``overrides`` applied (``recipe('pgd-linf', eps=4/255)``)."""
    return RECIPES.get(name)().with_overrides(**overrides)


def _preset(name: str, category: str, **fields: Any) -> None:
    RECIPES.register(name)(lambda: Recipe(name=name, **fields))
    CATEGORIES[name] = category


CATEGORIES: dict[str, str] = {}
_preset("baseline", "baseline")
_preset("adam", "optimizer", optimizer="adam", lr=1e-3, weight_decay=0.0)
_preset("cropflip", "augmentation", augment="cropflip")
_preset("randaugment", "augmentation", augment="randaugment")
_preset("augmix", "augmentation", augment="augmix")
_preset("trivialaugment", "augmentation", augment="trivialaugment")
_preset("label-noise", "label noise", label_noise=0.2)
_preset("pgd-linf", "adversarial", adversarial="linf", eps=8 / 255)
_preset("pgd-l2", "adversarial", adversarial="l2", eps=0.5)
_preset("improved", "improved recipe", augment="crop", label_smoothing=0.1, mixup=0.2, cutmix=1.0, ema=0.99, epochs=15)
_preset("tract", "tract", tract=0.1)
