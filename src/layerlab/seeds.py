"""Random streams: one per purpose, seeded from (purpose, indices), never ``seed + t``.

Every random draw layerlab makes, in training and in the analyses, comes from a generator seeded by
:func:`derive_seed`: a 63-bit integer hashed from the purpose (a fixed string such as ``"criticality/fresh"``)
and the draw's indices (the user's base seed, the trial, the unit ...). Two purposes never share a stream, and
no derived seed sits on the small-integer line users train with. Why this matters: with ``seed + t``, trial 0
of layer criticality under seed 0 rebuilt a model trained under seed 0 with its own initial weights, so it
measured a reset to init (Zhang et al.) instead of a re-randomisation (Gavrikov et al.), and every test passed.

>>> derive_seed("criticality/fresh", 0, 0) == derive_seed("criticality/fresh", 0, 0)
True
>>> derive_seed("criticality/fresh", 0, 0) != derive_seed("train/init", 0)
True
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator

import torch

#: Every purpose layerlab draws randomness for. A purpose is a namespace: its draws are independent of every
#: other purpose's, whatever the user's seed. Adding a purpose is adding a line here.
PURPOSES = {
    # the training lab: four independent streams per run
    "train/init": "the model's initial weights",
    "train/order": "the order of training images in each epoch",
    "train/augment": "data augmentation, mixup/cutmix and adversarial starts (torch's global RNG)",
    "train/label-noise": "which labels symmetric label noise moves, and where",
    # analyses: draws compared against a trained model
    "data/subset": "the fixed subset of a split (training subsets and analysis subsets alike)",
    "criticality/fresh": "the fresh instance of the architecture for re-randomisation trial t",
    "criticality/noise": "module criticality's Gaussian perturbations of one unit",
    "criticality/bootstrap": "the image weights and trial draws of criticality's bootstrap intervals",
    "invariance/start": "the noise every representation inversion starts from",
    "dynamics/triplets": "the image triplets that span decision-region planes",
    "shift/corruption": "a corruption's random draws (noise, impulses) for one image at one severity",
    "shift/pgd": "the random start of one image's PGD attack inside its eps ball",
    "cka/permutation": "the within-batch row shuffles of a CKA permutation null",
    "cka/bootstrap": "the batches a CKA bootstrap resample draws (with replacement)",
}


def derive_seed(purpose: str, *indices: int) -> int:
    """A 63-bit seed for ``purpose`` and ``indices`` (SHA-256 of both; stable across runs, machines, versions)."""
    if purpose not in PURPOSES:
        raise KeyError(f"unknown random purpose {purpose!r}; add it to layerlab.seeds.PURPOSES")
    blob = "|".join([purpose, *(str(int(i)) for i in indices)]).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & (2**63 - 1)


def generator(purpose: str, *indices: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` (draw on the CPU: device-independent values)."""
    return torch.Generator().manual_seed(derive_seed(purpose, *indices))


@contextmanager
def global_seed(purpose: str, *indices: int, devices: list[torch.device] | None = None) -> Iterator[None]:
    """Seed torch's global RNG for code that takes no generator (model constructors), restoring it afterwards."""
    with torch.random.fork_rng(devices=devices or []):
        torch.manual_seed(derive_seed(purpose, *indices))
        yield
