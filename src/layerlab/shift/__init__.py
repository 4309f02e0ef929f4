"""Distribution shifts: common corruptions and adversarial inputs, generated on the fly on [0, 1] image tensors.

Corruptions follow ImageNet-C (Hendrycks & Dietterich 2019, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations"), five severities each, with the parameters of their CIFAR-10-C table (made for
32x32 images, the size of layerlab's demo data). Adversarial inputs are untargeted PGD (Madry, Makelov, Schmidt,
Tsipras, Vladu 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks") against the unperturbed
model. A shift is written ``NAME:SEVERITY`` or ``clean`` (:func:`parse_shift`); severity 0 of any corruption is
the identity.

Corruption parameter c at severities 1..5 (x in [0, 1], per image; results clamped to [0, 1]):

================  ==================================  ===========================================
name              c at 1, 2, 3, 4, 5                  x' =
================  ==================================  ===========================================
gaussian-noise    .04  .06  .08  .09  .10             x + N(0, c^2) per pixel and channel
shot-noise        500  250  100  75   50              Poisson(x c) / c
impulse-noise     .01  .02  .03  .05  .07             each value -> 1 w.p. c/2, -> 0 w.p. c/2
gaussian-blur     .4   .6   .7   .8   1.0             Gaussian blur, sigma = c * min(H, W) / 32 px
                                                      (kernel 2 ceil(3 sigma) + 1, at most 2 min(H,W) - 1)
contrast          .75  .5   .4   .3   .15             (x - m) c + m, m = mean over C, H, W
brightness        .05  .1   .15  .2   .3              HSV: V' = clip(V + c); H, S kept
saturate          (.3,0) (.1,0) (1.5,0) (2,.1) (2.5,.2)  HSV: S' = clip(S c1 + c2); H, V kept; grey kept
jpeg              80   65   58   50   40              JPEG round trip at quality c (Pillow; 1 or 3 ch.)
pixelate          .95  .9   .85  .75  .65             box-resample to int(c H) x int(c W) and back
================  ==================================  ===========================================

Departures from ImageNet-C, on purpose: the contrast mean is taken over channels too (ImageNet-C: per channel;
the same on grey images); saturate leaves grey pixels grey (ImageNet-C's c2 > 0 tints them red, hue 0), so it is
the identity on grey images such as the demo's 3-channel digits; the blur is torchvision's kernel truncated at 3
sigma (skimage's at 4 in ImageNet-C) and its sigma grows with the image side. Pixelate resamples with an exact box
filter both ways (PIL's BOX, as CIFAR-10-C): nearest-neighbour upsampling at these near-1 factors shifts pixels by
up to half a pixel, a damage that does not grow with severity. Saturate's damage is not
monotone in severity by design (1-2 desaturate, 3-5 oversaturate).

Adversarial shifts: ``pgd-linf:EPS`` and ``pgd-l2:EPS`` with EPS in 1/255 units for both norms (``pgd-l2:64`` is
an L2 budget of 64/255 = 0.25 on the [0, 1] image), 10 steps of 2.5 eps / 10 from a seeded random start.

Random draws: image i of a stream (position i, counted from 0) draws its corruption from
``derive_seed("shift/corruption", seed, crc32(name), severity, i)`` and its PGD start from
``derive_seed("shift/pgd", seed, i)``, so an image is shifted the same in any batch.

Modules, in the order the data flows: :mod:`~layerlab.shift.corruptions` (the registry of corruption functions),
:mod:`~layerlab.shift.spec` (:class:`Shift` and its parsing), :mod:`~layerlab.shift.apply` (:func:`corrupt`),
:mod:`~layerlab.shift.adversarial` (:func:`pgd`), :mod:`~layerlab.shift.data` (:func:`shifted` data).
"""
from __future__ import annotations

from .adversarial import NORMS, pgd
from .apply import corrupt
from .corruptions import CORRUPTIONS, Corruption, Draws
from .data import ShiftedBatches, check_unit_images, shifted
from .spec import (
    ADVERSARIAL,
    SEVERITIES,
    Shift,
    known_shifts,
    parse_shift,
    parse_shifts,
)

#: the corruption registry under the name the criticality CLI uses
SHIFTS = CORRUPTIONS

__all__ = [
    "ADVERSARIAL", "CORRUPTIONS", "NORMS", "SEVERITIES", "SHIFTS", "Corruption", "Draws", "Shift", "ShiftedBatches",
    "check_unit_images", "corrupt", "known_shifts", "parse_shift", "parse_shifts", "pgd", "shifted",
]
