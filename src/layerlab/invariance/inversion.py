"""Representation inversion and its cache (Merlin et al. 2023, arXiv 2307.06006; the inversion of STIR, Nanda et
al. 2022; METHODS.md section 4).

For a reference model m1, layer i and images X in [0, 1] (or in the model's ``input_range`` [lo, hi], mapped
affinely below), start from seeded Gaussian noise X'_0 = clamp(N(0, 1), 0, 1) and minimise, per image,

    loss(x') = |m1_i(x') - m1_i(x)|_2 / |m1_i(x)|_2                       (features flattened)

with normalised-gradient steps x' <- clamp(x' - s g / |g|_2, 0, 1), g = d loss / d x' (per image; s = 0.5),
(with ``input_range``: X'_0 = lo + (hi - lo) clamp(N(0, 1), 0, 1) and the clamp to [lo, hi], s in input units),
keeping each image's best iterate. The forward stops at layer i. The model is in eval mode, so images never
interact and the result does not depend on the batch size. The final (best) matching loss is reported per image:
deep layers may not converge, and a STIR value means little when its inversion did not.

X'_i depends only on (m1, i, X, seed, steps, step size), so :class:`InversionCache` computes each once, in memory
and on disk.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LayerlabError, NonFiniteError, check_images
from ..runtime import model_fingerprint, tensor_fingerprint
from ..seeds import generator
from ..store import atomic_write
from .inputs import (
    DEFAULT_RANGE,
    Bound,
    _autocast,
    _check_input_images,
    _check_range,
    _device,
    _features,
    _frozen,
    _is_default_range,
    _layer_names,
    _positive_int,
    _probe,
    _range_config,
)

__all__ = ["VERSION", "InversionCache", "initial_noise", "invert", "matching_loss"]

VERSION = 2  # bump when the numbers change; old shards and cached inversions are then recomputed
# 2: inversion starts and image subsets from purpose streams (layerlab.seeds)


# ================================================================================================ pure pieces


def initial_noise(shape: Sequence[int], seed: int = 0, input_range: Any = DEFAULT_RANGE) -> torch.Tensor:
    """The seeded start of every inversion: clamp(N(0, 1), 0, 1) of ``shape``, float32 on the CPU.

    Drawn on the CPU from its own stream (``seeds.generator("invariance/start", seed)``), so it depends neither
    on the device, the global RNG, the batch size nor any seed a model was trained with (the STIR reference's
    ``super-noise`` start, clamped to the image range).

    ``input_range=(lo, hi)`` (numbers or per-channel bounds, :func:`invert`): the same draw mapped into the
    range, lo + (hi - lo) * clamp(N(0, 1), 0, 1), so it lies in [lo, hi] and is exactly the normalised image of
    the [0, 1] start when the range is the image of [0, 1] under the model's normalisation (x - mean) / std. The
    default (0, 1) is bit-for-bit the plain clamp.
    """
    lo, hi = _check_range(input_range, int(shape[1]) if len(shape) >= 2 else None)
    gen = generator("invariance/start", int(seed))
    noise = torch.randn(tuple(shape), generator=gen, dtype=torch.float32).clamp_(0.0, 1.0)
    if _is_default_range(lo, hi):
        return noise
    return (noise * (hi - lo) + lo).clamp_(lo, hi)  # the final clamp only guards against rounding


def matching_loss(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample relative matching loss |f - t|_2 / |t|_2 [N] of features [N, ...] against targets [N, ...].

    A target of norm 0 (a dead layer) is divided by 1e-12 instead, so the loss stays finite.
    """
    f = features.reshape(features.shape[0], -1).float()
    t = target.reshape(target.shape[0], -1).float()
    return (f - t).norm(dim=1) / t.norm(dim=1).clamp_min(1e-12)


def _normalised_step(x: torch.Tensor, grad: torch.Tensor, step_size: float, lo: Bound = 0.0,
                     hi: Bound = 1.0) -> torch.Tensor:
    """x <- clamp(x - s g / |g|_2, lo, hi) with the L2 norm taken per sample (a zero gradient leaves x as is)."""
    norm = grad.reshape(grad.shape[0], -1).norm(dim=1).clamp_min(1e-12)
    return (x - step_size * grad / norm.view(-1, *([1] * (grad.ndim - 1)))).clamp_(lo, hi)


# ================================================================================================ inversion


def _invert_batch(model: nn.Module, layer: str, images: torch.Tensor, start: torch.Tensor, steps: int,
                  step_size: float, device: torch.device, lo: Bound = 0.0,
                  hi: Bound = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    amp = _autocast(device)
    with torch.no_grad(), amp:
        target = _features(model, layer, images).float()
    if not bool(torch.isfinite(target).all()):
        raise NonFiniteError(f"the features of layer {layer!r} on the original images hold NaN or inf; check the model")
    x = start.clone()
    best, best_loss = x.clone(), torch.full((x.shape[0],), math.inf, device=device)
    for i in range(steps + 1):
        last = i == steps
        x.requires_grad_(not last)
        with torch.set_grad_enabled(not last), amp:
            loss = matching_loss(_features(model, layer, x), target)
        with torch.no_grad():
            better = loss.detach() < best_loss
            best[better] = x.detach()[better]
            best_loss = torch.where(better, loss.detach(), best_loss)
        if last:
            break
        (grad,) = torch.autograd.grad(loss.sum(), x)
        with torch.no_grad():
            x = _normalised_step(x.detach(), grad, step_size, lo, hi)
    return best, best_loss


def invert(
    model: nn.Module,
    layer: str,
    images: torch.Tensor,
    steps: int = 500,
    step_size: float = 0.5,
    seed: int = 0,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    input_range: Any = DEFAULT_RANGE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert ``model``'s representation at ``layer``: images X' that ``layer`` sees like ``images`` (module doc).

    Args:
        model: any module taking images in [0, 1] (normalisation inside); never modified (eval mode and
            requires_grad=False only while inverting, every flag restored).
        layer: a module path (``layer2``, ``layer2.0.conv1``) or learnable-layer label (``[2.0] conv1``).
        images: float [N, C, H, W] in [0, 1].
        steps: normalised-gradient steps (the reference runs 500-1000); 0 returns the initial noise.
        step_size: L2 length s of each step in pixel space (reference: 0.5).
        seed: seed of the initial noise (:func:`initial_noise`); same seed, same X'.
        batch_size: images optimised together (memory only: the result does not depend on it).
        device: where to compute, default the model's (bf16 autocast on CUDA); the model is never moved.
        input_range: (lo, hi) of the inputs the model takes, default (0.0, 1.0); numbers or per-channel tensors
            ([C], [C, 1, 1] or [1, C, 1, 1]) for a model that takes normalised inputs, e.g. ImageNet
            ((0 - mean) / std, (1 - mean) / std) or (-1.0, 1.0). ``images`` must lie in it; the start noise is
            mapped into it (:func:`initial_noise`) and every step is clamped to it. ``step_size`` stays in input
            units: for inputs normalised by a common std, s / std is the step that matches s on [0, 1] images.

    Returns:
        (inverted images [N, C, H, W] float32 on the CPU in ``input_range``, final matching loss per image [N]).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        >>> x_inv, loss = invert(net, "0", torch.rand(8, 1, 8, 8), steps=20)
        >>> x_inv.shape, loss.shape, 0.0 <= float(x_inv.min()) <= float(x_inv.max()) <= 1.0
        (torch.Size([8, 1, 8, 8]), torch.Size([8]), True)
    """
    check_images(images)
    lo, hi = _check_range(input_range, int(images.shape[1]))
    _check_input_images(images, "images", lo, hi)
    steps = _positive_int(steps, "steps", minimum=0)
    batch_size = _positive_int(batch_size, "batch_size")
    if not (isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0):
        raise LayerlabError(f"step_size: expected a positive number (the reference uses 0.5), got {step_size!r}")
    (layer,) = _layer_names(model, [layer])
    dev = _device(model, device)
    start = initial_noise(images.shape, seed, (lo, hi))
    lo_d, hi_d = (b if isinstance(b, float) else b.to(dev) for b in (lo, hi))
    out_x, out_loss = [], []
    with _frozen(model), torch.inference_mode(False):
        _probe(model, layer, images, dev)
        for b in range(0, images.shape[0], batch_size):
            x, l = _invert_batch(model, layer, images[b : b + batch_size].to(dev).float(),
                                 start[b : b + batch_size].to(dev), steps, float(step_size), dev, lo_d, hi_d)
            out_x.append(x.float().cpu())
            out_loss.append(l.float().cpu())
    return torch.cat(out_x), torch.cat(out_loss)


def _losses(model: nn.Module, layer: str, candidates: torch.Tensor, images: torch.Tensor, batch_size: int,
            device: torch.device) -> torch.Tensor:
    """The matching loss of given candidate images (e.g. the initial noise) without optimising them."""
    out = []
    with _frozen(model), torch.no_grad(), _autocast(device):
        for b in range(0, images.shape[0], batch_size):
            t = _features(model, layer, images[b : b + batch_size].to(device))
            out.append(matching_loss(_features(model, layer, candidates[b : b + batch_size].to(device)), t).cpu())
    return torch.cat(out)


# ================================================================================================ cache


class InversionCache:
    """Each inversion computed once: in memory, and on disk under ``root`` as ``<key>.pt`` when given.

    The key hashes (model weights, layer, images, seed, steps, step size, precision, VERSION), the weights and
    images by :func:`layerlab.runtime.model_fingerprint` and :func:`~layerlab.runtime.tensor_fingerprint`; the batch
    size is not part of it because the result does not depend on it. Counters: ``computed`` (inversions actually run),
    ``memory_hits``, ``disk_hits``. Files are written atomically, so a killed run leaves no torn entry, and a
    re-run reads what is there.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else None
        self._memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.computed = 0
        self.memory_hits = 0
        self.disk_hits = 0

    @staticmethod
    def key(weights: str, layer: str, images: str, *, seed: int, steps: int, step_size: float, precision: str,
            input_range: Any = DEFAULT_RANGE) -> str:
        blob = f"v{VERSION}|{weights}|{layer}|{images}|{seed}|{steps}|{float(step_size)!r}|{precision}"
        extra = _range_config(*_check_range(input_range))
        if extra is not None:  # only a non-default range enters the key: default keys are unchanged
            blob += f"|range={extra!r}"
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def path(self, key: str) -> Path | None:
        return None if self.root is None else self.root / f"{key}.pt"

    def load(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(inverted images, final loss) of a key, from memory or disk; None when it was never computed."""
        if key in self._memory:
            return self._memory[key]
        p = self.path(key)
        if p is not None and p.exists():
            try:
                obj = torch.load(p, map_location="cpu", weights_only=True)
                entry = (obj["images"], obj["loss"])
            except Exception:  # unreadable entry: recompute it
                return None
            self._memory[key] = entry
            return entry
        return None

    def get(self, model: nn.Module, layer: str, images: torch.Tensor, *, steps: int, step_size: float = 0.5,
            seed: int = 0, batch_size: int = 128, device: str | torch.device | None = None,
            weights: str | None = None, images_key: str | None = None,
            input_range: Any = DEFAULT_RANGE) -> tuple[torch.Tensor, torch.Tensor, str]:
        """``invert(model, layer, images, ...)`` once per key; returns (images, loss, key)."""
        dev = _device(model, device)
        key = self.key(weights or model_fingerprint(model), layer, images_key or tensor_fingerprint(images), seed=seed,
                       steps=steps, step_size=step_size, precision="bf16" if dev.type == "cuda" else "fp32",
                       input_range=input_range)
        if key in self._memory:
            self.memory_hits += 1
            return (*self._memory[key], key)
        found = self.load(key)
        if found is not None:
            self.disk_hits += 1
            return (*found, key)
        x, loss = invert(model, layer, images, steps=steps, step_size=step_size, seed=seed, batch_size=batch_size,
                         device=dev, input_range=input_range)
        self.computed += 1
        self._memory[key] = (x, loss)
        p = self.path(key)
        if p is not None:
            payload = {"images": x, "loss": loss, "layer": layer, "steps": steps, "step_size": step_size, "seed": seed}
            atomic_write(p, lambda f: torch.save(payload, f))
        return x, loss, key

    def __repr__(self) -> str:
        return (f"InversionCache(root={str(self.root) if self.root else None!r}, computed={self.computed}, "
                f"memory_hits={self.memory_hits}, disk_hits={self.disk_hits})")
