"""The nine common corruptions as pure tensor functions, one registration each (:data:`CORRUPTIONS`).

Each corruption is a function ``fn(x, c, draws) -> x'`` of an image batch ``x`` [B, C, H, W] in [0, 1] and its
parameter ``c`` at one severity; its random draws come from ``draws`` (:class:`Draws`: one generator per image),
so an image's corruption never depends on the batch it sits in. The result may step outside [0, 1]; the caller
(:func:`layerlab.shift.corrupt`) clamps. Levels are Hendrycks & Dietterich's CIFAR-10-C table (their parameters
for 32x32 images); the blur's sigma is in pixels of a 32-pixel side and grows with the image (ImageNet-sized
images then get ImageNet-C-like sigmas).
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import ShapeError
from ..registry import Registry

__all__ = ["CORRUPTIONS", "Corruption", "Draws", "corruption_id"]

#: the side length the severity table was made for (CIFAR-10-C); the blur scales with min(H, W) / REFERENCE_SIDE
REFERENCE_SIDE = 32


class Draws:
    """Random draws for a batch, one CPU generator per image (device-independent values), returned on ``device``
    in ``dtype`` as one [B, ...] tensor: image i's draws depend on its own generator only."""

    def __init__(self, generators: Sequence[torch.Generator], device: torch.device, dtype: torch.dtype) -> None:
        self.generators, self.device, self.dtype = list(generators), device, dtype

    def _stack(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(parts).to(device=self.device, dtype=self.dtype)

    def normal(self, shape: Sequence[int]) -> torch.Tensor:
        """Standard normal draws of ``shape`` per image."""
        return self._stack([torch.randn(tuple(shape), generator=g) for g in self.generators])

    def uniform(self, shape: Sequence[int]) -> torch.Tensor:
        """Uniform [0, 1) draws of ``shape`` per image."""
        return self._stack([torch.rand(tuple(shape), generator=g) for g in self.generators])

    def poisson(self, rates: torch.Tensor) -> torch.Tensor:
        """Poisson counts with the given rates [B, ...] (drawn in float64 on the CPU, per image)."""
        cpu = rates.detach().to("cpu", torch.float64)
        return self._stack([torch.poisson(r, generator=g) for r, g in zip(cpu, self.generators)])


CorruptionFn = Callable[[torch.Tensor, float, Draws], torch.Tensor]


@dataclass(frozen=True)
class Corruption:
    """One corruption: its function, its parameter ``c`` at severities 1..5, and whether it draws random numbers."""

    name: str
    levels: tuple
    fn: CorruptionFn
    random: bool

    def __call__(self, x: torch.Tensor, severity: int, draws: Draws) -> torch.Tensor:
        """``x`` corrupted at ``severity`` 1..5 (unclamped)."""
        return self.fn(x, self.levels[severity - 1], draws)


CORRUPTIONS: Registry[Corruption] = Registry("corruption")


def corruption_id(name: str) -> int:
    """A stable integer for ``name`` (CRC-32), the corruption's index in its random stream."""
    return zlib.crc32(name.encode())


def _register(name: str, levels: tuple, *, random: bool = False) -> Callable[[CorruptionFn], CorruptionFn]:
    def deco(fn: CorruptionFn) -> CorruptionFn:
        CORRUPTIONS.register(name)(Corruption(name, levels, fn, random))
        return fn

    return deco


# -- noise -------------------------------------------------------------------------------------------------------

@_register("gaussian-noise", (0.04, 0.06, 0.08, 0.09, 0.10), random=True)
def gaussian_noise(x: torch.Tensor, c: float, draws: Draws) -> torch.Tensor:
    """x + N(0, c^2), independently per pixel and channel."""
    return x + c * draws.normal(x.shape[1:])


@_register("shot-noise", (500, 250, 100, 75, 50), random=True)
def shot_noise(x: torch.Tensor, c: float, draws: Draws) -> torch.Tensor:
    """Poisson(x * c) / c: photon noise of an exposure collecting c photons at full intensity."""
    return draws.poisson(x * c) / c


@_register("impulse-noise", (0.01, 0.02, 0.03, 0.05, 0.07), random=True)
def impulse_noise(x: torch.Tensor, c: float, draws: Draws) -> torch.Tensor:
    """Salt and pepper: each value (pixel and channel) becomes 1 with probability c/2, 0 with probability c/2."""
    u = draws.uniform(x.shape[1:])
    return torch.where(u < c / 2, torch.ones_like(x), torch.where(u < c, torch.zeros_like(x), x))


# -- blur and resolution -----------------------------------------------------------------------------------------

def blur_kernel_size(sigma: float, side: int) -> int:
    """The odd kernel size 2 * ceil(3 sigma) + 1, capped so its reflect padding fits an image of ``side`` pixels."""
    size = 2 * math.ceil(3 * sigma) + 1
    return max(1, min(size, 2 * side - 1))


@_register("gaussian-blur", (0.4, 0.6, 0.7, 0.8, 1.0))
def gaussian_blur(x: torch.Tensor, c: float, draws: Draws) -> torch.Tensor:
    """Gaussian blur with sigma = c pixels at a 32-pixel side, c * min(H, W) / 32 pixels in general."""
    from torchvision.transforms.functional import gaussian_blur as blur

    side = min(x.shape[-2:])
    sigma = c * side / REFERENCE_SIDE
    k = blur_kernel_size(sigma, side)
    return blur(x, kernel_size=[k, k], sigma=[sigma, sigma])


def box_weights(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[n_out, n_in] box-filter resampling: output pixel i covers [i s, (i + 1) s) of the input (s = n_in / n_out)
    and averages the input pixels it overlaps, weighted by the overlap (PIL's BOX filter, down and up)."""
    s = n_in / n_out
    i = torch.arange(n_out, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(n_in, dtype=torch.float64).unsqueeze(0)
    overlap = (torch.minimum((i + 1) * s, j + 1) - torch.maximum(i * s, j)).clamp_min(0)
    return (overlap / s).to(device=device, dtype=dtype)


def box_resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``x`` [..., H, W] box-resampled to [..., h, w] (separable: rows, then columns)."""
    rows = box_weights(x.shape[-2], h, x.dtype, x.device)
    cols = box_weights(x.shape[-1], w, x.dtype, x.device)
    return rows @ x @ cols.T


def pixelate_to(x: torch.Tensor, c: float) -> torch.Tensor:
    """Box-average down to int(c H) x int(c W) pixels, then box-resample back to H x W (CIFAR-10-C's BOX both
    ways; at an integer factor 1/c every block is constant, its mean). An exact area resampling: the round trip
    does not shift the image, so the damage is the lost resolution and grows with 1 - c."""
    h, w = x.shape[-2:]
    return box_resize(box_resize(x, max(1, int(h * c)), max(1, int(w * c))), h, w)


@_register("pixelate", (0.95, 0.9, 0.85, 0.75, 0.65))
def pixelate(x: torch.Tensor, c: float, draws: Draws) -> torch.Tensor:
    """Down to c times the side and back up, both by box filtering: c is the fraction of the resolution kept."""
    return pixelate_to(x, c)


# -- colour ------------------------------------------------------------------------------------------------------

@_register("contrast", (0.75, 0.5, 0.4, 0.3, 0.15))
def contrast(x: torch.Tensor, c: float, draws: Draws) -> torch.Tensor:
    """(x - m) * c + m with m each image's mean over channels and pixels (the mean is kept)."""
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * c + m


def _rgb_only(x: torch.Tensor, name: str) -> None:
    if x.shape[1] not in (1, 3):
        raise ShapeError(f"{name}: an HSV corruption needs 1- or 3-channel images, got {x.shape[1]} channels")


@_register("brightness", (0.05, 0.1, 0.15, 0.2, 0.3))
def brightness(x: torch.Tensor, c: float, draws: Draws) -> torch.Tensor:
    """HSV value V' = clip(V + c, 0, 1) with hue and saturation kept: x * V' / V; black pixels become grey V'."""
    _rgb_only(x, "brightness")
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp(0, 1)
    black = v <= 0
    scale = v_new / torch.where(black, torch.ones_like(v), v)
    return torch.where(black, v_new.expand_as(x), x * scale)


@_register("saturate", ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2)))
def saturate(x: torch.Tensor, c: tuple[float, float], draws: Draws) -> torch.Tensor:
    """HSV saturation S' = clip(S * c1 + c2, 0, 1) with hue and value kept: V - (S'/S)(V - x); grey pixels
    (S = 0, no hue) stay as they are, so grey images are unchanged."""
    _rgb_only(x, "saturate")
    v = x.amax(dim=1, keepdim=True)
    chroma = v - x.amin(dim=1, keepdim=True)
    grey = chroma <= 0
    s = chroma / torch.where(grey, torch.ones_like(v), v)
    s_new = (s * c[0] + c[1]).clamp(0, 1)
    ratio = s_new / torch.where(grey, torch.ones_like(s), s)
    return torch.where(grey, x, v - ratio * (v - x))


# -- compression -------------------------------------------------------------------------------------------------

def jpeg_round_trip(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Each image saved as JPEG at ``quality`` (1..100) and read back, in 8 bits on the CPU with Pillow (as
    ImageNet-C; torchvision.io's JPEG codec is deprecated from torchvision 0.29)."""
    import io

    import numpy as np
    from PIL import Image

    if x.shape[1] not in (1, 3):
        raise ShapeError(f"jpeg: JPEG holds 1- or 3-channel images, got {x.shape[1]} channels")
    pixels = (x.detach().clamp(0, 1) * 255).round().to("cpu", torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for img in pixels:
        image = Image.fromarray(np.ascontiguousarray(img[..., 0] if img.shape[-1] == 1 else img))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(quality))
        buffer.seek(0)
        decoded = np.asarray(Image.open(buffer).convert(image.mode)).reshape(img.shape)
        out.append(torch.from_numpy(decoded.copy()))
    return torch.stack(out).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype) / 255


@_register("jpeg", (80, 65, 58, 50, 40))
def jpeg(x: torch.Tensor, c: int, draws: Draws) -> torch.Tensor:
    """A JPEG round trip at quality c (8-bit quantisation included)."""
    return jpeg_round_trip(x, c)
