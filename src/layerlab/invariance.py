"""Invariances under finetuning: representation inversion, STIR, and the pretrained x finetuned grid.

Merlin, Nanda, Rawal, Toneva 2023 ("What Happens During Finetuning of Vision Transformers: An Invariance Based
Investigation", arXiv 2307.06006) ask which invariances of a pretrained model survive finetuning, and where they
move. Their tool is STIR (Nanda et al. 2022, "Measuring Representational Robustness of Neural Networks Through
Shared Invariances"); METHODS.md section 4 pins down the details.

Representation inversion (:func:`invert`). For a reference model m1, layer i and images X in [0, 1] (or in the
model's ``input_range`` [lo, hi], mapped affinely below), start from seeded Gaussian noise
X'_0 = clamp(N(0, 1), 0, 1) and minimise, per image,

    loss(x') = |m1_i(x') - m1_i(x)|_2 / |m1_i(x)|_2                       (features flattened)

with normalised-gradient steps x' <- clamp(x' - s g / |g|_2, 0, 1), g = d loss / d x' (per image; s = 0.5),
(with ``input_range``: X'_0 = lo + (hi - lo) clamp(N(0, 1), 0, 1) and the clamp to [lo, hi], s in input units),
keeping each image's best iterate. The forward stops at layer i. The model is in eval mode, so images never
interact and the result does not depend on the batch size. The final (best) matching loss is reported per image:
deep layers may not converge, and a STIR value means little when its inversion did not.

STIR (:func:`stir`). STIR(m2_j | m1_i) = CKA(m2_j(X), m2_j(X'_i)): do inputs that m1's layer i cannot tell
apart also look alike to m2's layer j? Linear CKA from :mod:`layerlab.similarity`, computed ONCE over all N
images (the reference code's default kept only the last batch: a known bug). Default estimator: biased full-N
CKA (Kornblith et al. 2019), as in the STIR reference code; ``estimator="unbiased"`` uses HSIC_1. ``input_range``
says which inputs the evaluated model takes, as for :func:`invert`.

The grid (:func:`invariance_grid`). X'_i depends only on (m1, i, X, seed, steps, step size), so it is inverted
once per (model, layer) and reused for every evaluated model and layer: 2L inversions (3L with a scratch model)
instead of 2L^2 per direction. Inversions are cached in memory and on disk (:class:`InversionCache`). For every
reference model r, layer i, evaluated model m and layer j the table holds

* ``stir``  -- STIR(m_j | r_i);
* ``noise`` -- the un-optimised floor CKA(m_j(X), m_j(X'_0)) (X' = the initial noise, 0 steps); X'_0 is the same
  for every i, so this value depends on (m, j) only and is repeated along i for easy comparison;
* ``cka``   -- plain CKA(r_i(X), m_j(X)).

Summaries (:func:`summarize`; the toolkit's operationalisation, the paper's exact metric names were not
available):

* retention(l)   = STIR(ft_l | pt_l): how much of the pretrained layer's invariance the finetuned layer keeps;
* transfer(l)    = retention(l) - STIR(scratch_l | pt_l): the part a model trained from scratch on the
  downstream task does not have, i.e. what pretraining handed over;
* compression(i) = argmax_j STIR(ft_j | pt_i): the finetuned layer that best shares pretrained layer i's
  invariances; ``shift`` = position(argmax) - position(i) < 0 means the invariance moved to a shallower layer.

The paper's findings to check: pretraining induces transferable invariances in shallow layers (transfer > 0
there), and invariances of deep pretrained layers move towards shallower finetuned layers (shift < 0 there).
"""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn

from .data import ImageData, load_data, subset_rows
from .demo import DemoContext, step
from .errors import DataError, LayerlabError, NonFiniteError, ShapeError, check_images
from .features import forward_until, iter_features, layer_labels, select_layers
from .layers import list_layers as learnable_layers
from .models import load_model
from .runtime import eval_mode, resolve_device
from .seeds import generator
from .similarity import cka_from_grams, gram_linear
from .store import Store, atomic_write, job_key

__all__ = [
    "InversionCache",
    "as_model_spec",
    "default_layers",
    "example_inversions",
    "grid_images",
    "grid_matrix",
    "initial_noise",
    "invariance_grid",
    "invert",
    "matching_loss",
    "stir",
    "summarize",
]

ANALYSIS = "invariance"
INVERSIONS = "invariance-inversions"
SUMMARY = "invariance-summary"
DEFAULT_IMAGES = 128  # images="auto": this many, or all when the data holds fewer
VERSION = 2  # bump when the numbers change; old shards and cached inversions are then recomputed
# 2: inversion starts and image subsets from purpose streams (layerlab.seeds)
ESTIMATORS = ("biased", "unbiased")
ROLES = ("pretrained", "finetuned", "scratch")
METRICS = ("stir", "noise", "cka")

ModelLike = nn.Module | str
DataLike = ImageData | str | torch.Tensor
Bound = float | torch.Tensor  # a number, or per-channel bounds [1, C, 1, 1] (float32, CPU)
DEFAULT_RANGE = (0.0, 1.0)


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


def _as_bound(value: Any, name: str) -> Bound:
    """A number as a float; a tensor or sequence of numbers as float32 [1, C, 1, 1] on the CPU."""
    if isinstance(value, bool):
        raise LayerlabError(f"input_range: {name} must be a number or a per-channel tensor, got {value!r}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    try:
        t = torch.as_tensor(value).detach().to("cpu", torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise LayerlabError(
            f"input_range: {name} must be a number or a per-channel tensor, got {type(value).__name__}"
        ) from None
    if t.ndim == 0:
        return t.reshape(1, 1, 1, 1)
    if t.ndim == 1:
        t = t.reshape(1, -1, 1, 1)
    elif t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[0] != 1 or t.shape[2] != 1 or t.shape[3] != 1:
        raise LayerlabError(
            f"input_range: {name} of shape {tuple(torch.as_tensor(value).shape)} is not per-channel; pass a number "
            "or a tensor of shape [C], [C, 1, 1] or [1, C, 1, 1]"
        )
    return t.contiguous()


def _check_range(input_range: Any, channels: int | None = None) -> tuple[Bound, Bound]:
    """Validated (lo, hi): numbers as floats, per-channel bounds as float32 [1, C, 1, 1]; lo < hi everywhere."""
    if isinstance(input_range, (str, bytes)) or not isinstance(input_range, Sequence) or len(input_range) != 2:
        raise LayerlabError(
            f"input_range: expected (lo, hi), e.g. (0.0, 1.0) or per-channel tensors, got {input_range!r}"
        )
    lo, hi = _as_bound(input_range[0], "lo"), _as_bound(input_range[1], "hi")
    lt, ht = torch.as_tensor(lo).reshape(1, -1, 1, 1), torch.as_tensor(hi).reshape(1, -1, 1, 1)
    if lt.shape[1] != ht.shape[1] and 1 not in (lt.shape[1], ht.shape[1]):
        raise LayerlabError(f"input_range: lo has {lt.shape[1]} channels but hi has {ht.shape[1]}")
    for t, n in ((lt, "lo"), (ht, "hi")):
        if channels is not None and t.shape[1] not in (1, channels):
            raise LayerlabError(
                f"input_range: {n} holds {t.shape[1]} per-channel bounds but the images have {channels} channels"
            )
    if not bool(torch.isfinite(lt).all() and torch.isfinite(ht).all()):
        raise LayerlabError(f"input_range: bounds must be finite, got lo={_fmt(lo)}, hi={_fmt(hi)}")
    if not bool((lt < ht).all()):
        raise LayerlabError(f"input_range: expected lo < hi (in every channel), got lo={_fmt(lo)}, hi={_fmt(hi)}")
    return lo, hi


def _fmt(bound: Bound) -> str:
    if isinstance(bound, float):
        return f"{bound:.4g}"
    return "[" + ", ".join(f"{v:.4g}" for v in bound.reshape(-1).tolist()) + "]"


def _is_default_range(lo: Bound, hi: Bound) -> bool:
    return bool((torch.as_tensor(lo) == 0.0).all() and (torch.as_tensor(hi) == 1.0).all())


def _range_config(lo: Bound, hi: Bound) -> list[Any] | None:
    """The range as plain JSON-able values for cache keys and store configs; None for the default (0, 1)."""
    if _is_default_range(lo, hi):
        return None
    return [b if isinstance(b, float) else [float(v) for v in b.reshape(-1).tolist()] for b in (lo, hi)]


# ================================================================================================ validation


def _layer_names(model: nn.Module, requested: Sequence[str] | str | None) -> list[str]:
    """Module paths for the requested layers (:func:`layerlab.features.select_layers`: module paths, labels,
    ``blocks``, ``layers``, ``kind:Conv2d``), in depth order as given; each layer at most once."""
    if requested is None:
        return default_layers(model)
    if isinstance(requested, str):
        requested = [requested]
    out = [name for r in requested for name in select_layers(model, [r])]
    if not out:
        raise LayerlabError("layers: the list is empty; pass at least one layer name or None for the default")
    if len(set(out)) != len(out):
        raise LayerlabError(f"layers: each layer may appear once, got {list(requested)}")
    return out


def default_layers(model: nn.Module, k: int = 6) -> list[str]:
    """``k`` learnable layers (Conv2d/Linear) evenly spaced in forward order, first and last included."""
    names = [i.name for i in learnable_layers(model)]
    if not names:
        raise LayerlabError(f"{type(model).__name__} has no Conv2d/Linear layer; pass layers=[module paths]")
    if len(names) <= k:
        return names
    picks = np.unique(np.round(np.linspace(0, len(names) - 1, k)).astype(int))
    return [names[p] for p in picks]


def _check_input_images(images: Any, name: str = "images", lo: Bound = 0.0, hi: Bound = 1.0) -> torch.Tensor:
    check_images(images, name=name)
    if not _is_default_range(lo, hi):
        return _check_ranged_images(images, name, lo, hi)
    if not images.is_floating_point():
        raise ShapeError(
            f"{name}: expected float images in [0, 1], got dtype {images.dtype}; convert uint8 images with "
            "x.float() / 255 (or pass data.float() of an ImageData)"
        )
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0 or not math.isfinite(lo + hi):
        raise ShapeError(
            f"{name}: expected values in [0, 1] (normalisation belongs inside the model), got range [{lo:.3g}, "
            f"{hi:.3g}]; pass unnormalised images"
        )
    return images


def _check_ranged_images(images: torch.Tensor, name: str, lo: Bound, hi: Bound) -> torch.Tensor:
    """Float images within a non-default input range (per channel when the bounds are)."""
    if not images.is_floating_point():
        raise ShapeError(f"{name}: expected float images in input_range [{_fmt(lo)}, {_fmt(hi)}], got dtype "
                         f"{images.dtype}")
    x = images.detach()
    if not bool(torch.isfinite(x).all()):
        raise ShapeError(f"{name}: the images hold NaN or inf")
    per_channel = not (isinstance(lo, float) and isinstance(hi, float))
    if per_channel:
        mins, maxs = x.amin(dim=(0, 2, 3)).cpu().view(1, -1, 1, 1), x.amax(dim=(0, 2, 3)).cpu().view(1, -1, 1, 1)
    else:
        mins, maxs = x.min().cpu(), x.max().cpu()
    if not bool((mins >= torch.as_tensor(lo)).all() and (maxs <= torch.as_tensor(hi)).all()):
        got = (f"[{_fmt(mins.float())}, {_fmt(maxs.float())}] per channel" if per_channel
               else f"[{float(mins):.4g}, {float(maxs):.4g}]")
        raise ShapeError(
            f"{name}: values outside input_range [{_fmt(lo)}, {_fmt(hi)}], got {got}; pass images in the space "
            "the model takes (e.g. normalised with the same mean/std as the range) or fix input_range"
        )
    return images


def _device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """The model's own device (:func:`layerlab.runtime.resolve_device`); a different ``device`` is an error."""
    have = resolve_device(None, model)
    dev = resolve_device(device, model)
    if dev.type != have.type:
        raise LayerlabError(
            f"the model is on {have} but device={dev}; move it first with model.to({str(dev)!r}) (layerlab never "
            "moves a model it was handed)"
        )
    return have


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise LayerlabError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and requires_grad=False for the duration; every flag restored afterwards, even after errors."""
    grads = [(p, p.requires_grad) for p in model.parameters()]
    with eval_mode(model):
        try:
            for p, _ in grads:
                p.requires_grad_(False)
            yield
        finally:
            for p, flag in grads:
                p.requires_grad_(flag)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _features(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    out = forward_until(model, layer, x)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise LayerlabError(f"layer {layer!r} returned {type(out).__name__}, not a tensor; pick a module that outputs one")
    return out.reshape(out.shape[0], -1)


def _probe(model: nn.Module, layer: str, images: torch.Tensor, device: torch.device) -> None:
    """Run one image through to ``layer`` so a mismatch of image and model fails with a clear message."""
    try:
        with torch.no_grad():
            _features(model, layer, images[:1].to(device))
    except RuntimeError as e:
        raise ShapeError(
            f"images of shape {tuple(images.shape)} [N, C, H, W] do not fit {type(model).__name__} up to layer "
            f"{layer!r} ({str(e).splitlines()[0]}); check the channel count and size of the data spec (e.g. "
            "'digits?channels=3&size=32')"
        ) from None


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


# ================================================================================================ STIR


def _layer_grams(model: nn.Module, layers: Sequence[str], images: torch.Tensor, batch_size: int,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """Linear Gram matrices [N, N] (float64, features centred) of every layer over ALL N images."""
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    for feats in iter_features(model, layers, images, batch_size, device):
        for name in layers:
            parts[name].append(feats[name].float().cpu())
    return {name: gram_linear(torch.cat(chunks)) for name, chunks in parts.items()}


def _cka(k: torch.Tensor, l: torch.Tensor, estimator: str) -> float:
    return cka_from_grams(k, l, unbiased=estimator == "unbiased")


def _check_estimator(estimator: str) -> str:
    if estimator not in ESTIMATORS:
        raise LayerlabError(f"estimator: expected one of {ESTIMATORS} (linear CKA over all images), got {estimator!r}")
    return estimator


def stir(
    m2: nn.Module,
    layer_j: str,
    X: torch.Tensor,
    X_inv: torch.Tensor,
    *,
    estimator: str = "biased",
    batch_size: int = 256,
    device: str | torch.device | None = None,
    input_range: Any = DEFAULT_RANGE,
) -> float:
    """STIR(m2_j | m1_i) = linear CKA(m2_j(X), m2_j(X_inv)) over ALL images (X_inv: m1_i's inversions of X).

    ``estimator``: ``biased`` (full-N, Kornblith et al. 2019; the STIR reference) or ``unbiased`` (HSIC_1).
    Invariant to orthogonal transforms and isotropic scaling of m2_j's features; 1 when X_inv = X.
    ``input_range``: (lo, hi) of the inputs ``m2`` takes, numbers or per-channel (:func:`invert`); X and X_inv
    must lie in it (default [0, 1], normalisation inside the model).
    """
    check_images(X, name="X")
    lo, hi = _check_range(input_range, int(X.shape[1]))
    _check_input_images(X, "X", lo, hi)
    _check_input_images(X_inv, "X_inv", lo, hi)
    if X.shape != X_inv.shape:
        raise ShapeError(
            f"X and X_inv must hold the same images and their inversions, got shapes {tuple(X.shape)} and "
            f"{tuple(X_inv.shape)}; pass X_inv = invert(m1, layer_i, X)[0]"
        )
    estimator = _check_estimator(estimator)
    (layer_j,) = _layer_names(m2, [layer_j])
    dev = _device(m2, device)
    k = _layer_grams(m2, [layer_j], X, batch_size, dev)[layer_j]
    l = _layer_grams(m2, [layer_j], X_inv, batch_size, dev)[layer_j]
    return _cka(k, l, estimator)


# ================================================================================================ cache


def _fingerprint(model: nn.Module) -> str:
    """sha256 over the class, every parameter and every buffer (weights and BN statistics decide the features)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for kind, named in (("p", model.named_parameters()), ("b", model.named_buffers())):
        for name, t in named:
            t = t.detach().cpu().contiguous()
            h.update(f"{kind}:{name}:{t.dtype}:{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def _tensor_fingerprint(x: torch.Tensor) -> str:
    t = x.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


class InversionCache:
    """Each inversion computed once: in memory, and on disk under ``root`` as ``<key>.pt`` when given.

    The key hashes (model weights, layer, images, seed, steps, step size, precision, VERSION); the batch size is
    not part of it because the result does not depend on it. Counters: ``computed`` (inversions actually run),
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
        key = self.key(weights or _fingerprint(model), layer, images_key or _tensor_fingerprint(images), seed=seed,
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


# ================================================================================================ the grid


def _as_images(data: DataLike, images: int | str | None, seed: int, split: str,
               input_range: tuple[Bound, Bound] = DEFAULT_RANGE) -> tuple[torch.Tensor, list[int], str]:
    """(float images [N, C, H, W], source indices, description) of a fixed seeded subset: spec data in [0, 1], an
    image tensor as given (checked against ``input_range``).

    ``images="auto"``: DEFAULT_IMAGES, or every image when the data holds fewer; an explicit number larger
    than the data is an error (never silently fewer)."""
    if images == "auto":
        try:
            return _as_images(data, DEFAULT_IMAGES, seed, split, input_range)
        except DataError:
            return _as_images(data, None, seed, split, input_range)
    if isinstance(data, str):
        d = load_data(data, split, images=images, seed=seed)
        return d.float(), d.indices.tolist(), f"{data} [{split}]"
    if isinstance(data, ImageData):
        d = data.sample(images, seed)  # the same seeded choice load_data makes; too many is an error
        return d.float(), d.indices.tolist(), f"{data.spec or 'in-memory'} [{data.split}]"
    if isinstance(data, torch.Tensor):
        x = _check_input_images(data, "data", *input_range)
        rows = subset_rows(x.shape[0], images, seed, "the image tensor")
        return x[rows].detach().float().cpu(), rows.tolist(), "tensor"
    raise LayerlabError(
        f"data: expected a data spec such as 'digits', an ImageData or a float image tensor, got {type(data).__name__}"
    )


def grid_images(data: DataLike, images: int | str | None = "auto", seed: int = 0, split: str = "test",
                input_range: Any = DEFAULT_RANGE) -> torch.Tensor:
    """The images :func:`invariance_grid` uses for these arguments: float [N, C, H, W] (for figures); an image
    tensor must lie in ``input_range``, as there."""
    return _as_images(data, images, seed, split, _check_range(input_range))[0]


def as_model_spec(path_or_spec: str | Path) -> str:
    """A model spec as is (``timm:...``, ``file:...``); a bare checkpoint path becomes ``file:PATH``."""
    from .models import MODEL_SOURCES

    s = str(path_or_spec)
    return s if s.split(":", 1)[0] in MODEL_SOURCES else f"file:{s}"


def _models(pretrained: ModelLike, finetuned: ModelLike, scratch: ModelLike | None,
            device: str | torch.device | None) -> dict[str, nn.Module]:
    named: dict[str, nn.Module] = {}
    for role, m in zip(ROLES, (pretrained, finetuned, scratch)):
        if m is None:
            continue
        if isinstance(m, (str, Path)):
            m = load_model(as_model_spec(m), device=resolve_device(device))
        if not isinstance(m, nn.Module):
            raise LayerlabError(f"{role}: expected a model spec (file:PATH, timm:...) or an nn.Module, got {type(m).__name__}")
        named[role] = m
    return named


def _row_base(ref: str, i: int, li: str, ev: str, j: int, lj: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"reference": ref, "ref_layer": li, "ref_label": labels[li], "ref_index": i,
            "evaluated": ev, "eval_layer": lj, "eval_label": labels[lj], "eval_index": j,
            "pair": f"{ev}|{ref}"}


def invariance_grid(
    pretrained: ModelLike,
    finetuned: ModelLike,
    scratch: ModelLike | None = None,
    data: DataLike = "digits",
    *,
    layers: Sequence[str] | None = None,
    images: int | str | None = "auto",
    steps: int = 500,
    step_size: float = 0.5,
    seed: int = 0,
    split: str = "test",
    estimator: str = "biased",
    batch_size: int = 128,
    device: str | torch.device | None = None,
    cache: InversionCache | None = None,
    cache_dir: str | Path | None = None,
    store: Store | str | Path | None = None,
    progress: bool = False,
    input_range: Any = DEFAULT_RANGE,
) -> dict[str, pd.DataFrame]:
    """STIR between a pretrained and a finetuned model (and a scratch control), every layer pair, both ways.

    Every given model is a reference (inverted at each layer: 2L inversions, 3L with ``scratch``) and an
    evaluated model (every layer j on every inversion), so the table holds STIR(ft_j | pt_i), STIR(pt_j | ft_i),
    the within-model grids STIR(pt | pt) and STIR(ft | ft), STIR(scratch | pt) etc., each beside its noise floor
    and plain CKA (module doc).

    Args:
        pretrained, finetuned, scratch: models or specs (``file:run/final.pt``; a bare path means ``file:``).
        data: a data spec, an ImageData or float images [N, C, H, W] in [0, 1]; ``images`` picks a fixed
            seeded subset (``seed``) of ``split``: ``"auto"`` (default) 128 images or all when fewer, ``None`` all.
        layers: module paths or labels, the same in every model; default :func:`default_layers` of ``pretrained``.
        steps, step_size, seed, input_range: the inversion (:func:`invert`); with a non-default
            ``input_range`` pass ``data`` as an image tensor already in that range (every model takes it).
        estimator: linear CKA estimator, ``biased`` (full N, default) or ``unbiased``.
        cache / cache_dir: share inversions across calls / persist them (default: ``STORE/cache/inversions``
            when ``store`` is given, else memory only).
        store: a :class:`Store` or its root: one shard per (reference model, layer) in ``invariance`` and
            ``invariance-inversions``, the summary in ``invariance-summary``; finished shards are read back.

    Returns:
        ``{"grid", "inversions", "summary"}``: grid rows (reference, ref_layer, ref_label, ref_index, evaluated,
        eval_layer, eval_label, eval_index, pair, metric, value, estimator, images, steps, step_size, seed);
        inversion rows (model, layer, label, index, loss_mean, loss_median, loss_p90, loss_max, initial_loss_mean,
        steps, step_size, seed, images, key); and :func:`summarize`'s table. ``attrs`` hold the image indices.

    Example (two tiny models, 8 images, 2 inversion steps):
        >>> def net():
        ...     return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        >>> res = invariance_grid(net(), net(), data=torch.rand(8, 1, 8, 8), layers=["0", "3"], steps=2)
        >>> sorted(res), res["grid"].shape, sorted(set(res["grid"]["metric"]))
        (['grid', 'inversions', 'summary'], (48, 16), ['cka', 'noise', 'stir'])
        >>> res["summary"][["label", "retention", "noise"]].shape
        (2, 3)
    """
    steps = _positive_int(steps, "steps", minimum=0)
    batch_size = _positive_int(batch_size, "batch_size")
    if images not in (None, "auto"):
        images = _positive_int(images, "images", minimum=4 if estimator == "unbiased" else 2)
    estimator = _check_estimator(estimator)
    models = _models(pretrained, finetuned, scratch, device)
    names = _layer_names(models["pretrained"], layers)
    labels = layer_labels(models["pretrained"], names)  # the structure's labels (ResNet: [3.1] conv2, layer3)
    for role, m in models.items():
        _layer_names(m, names)  # every model must have the layers
    devices = {role: _device(m, device) for role, m in models.items()}
    rng = _check_range(input_range)
    X, indices, described = _as_images(data, images, seed, split, rng)
    rng = _check_range(rng, int(X.shape[1]))
    _check_input_images(X, "data", *rng)
    for role, m in models.items():
        with _frozen(m):
            _probe(m, names[-1], X, devices[role])
    st = Store(store) if isinstance(store, (str, Path)) else store
    if cache is None:
        root = cache_dir if cache_dir is not None else (st.root / "cache" / "inversions" if st is not None else None)
        cache = InversionCache(root)

    weights = {role: _fingerprint(m) for role, m in models.items()}
    images_key = _tensor_fingerprint(X)
    precision = {role: "bf16" if d.type == "cuda" else "fp32" for role, d in devices.items()}
    base_cfg = {"version": VERSION, "weights": weights, "images": images_key, "n": int(X.shape[0]),
                "layers": names, "steps": steps, "step_size": float(step_size), "seed": seed,
                "estimator": estimator, "precision": precision}
    if (range_cfg := _range_config(*rng)) is not None:  # only when not the default: default keys are unchanged
        base_cfg["input_range"] = range_cfg
    common = {"estimator": estimator, "images": int(X.shape[0]), "steps": steps, "step_size": float(step_size),
              "seed": seed}

    def key_of(role: str, layer: str) -> str:
        return job_key(f"{role}:{weights[role]}", ANALYSIS, {**base_cfg, "reference": role, "layer": layer})

    jobs = [(role, i, layer) for role in models for i, layer in enumerate(names)]
    grid_parts: list[pd.DataFrame] = []
    inv_parts: list[pd.DataFrame] = []
    pending = []
    for role, i, layer in jobs:
        k = key_of(role, layer)
        if st is not None and st.has(ANALYSIS, k) and st.has(INVERSIONS, k):
            grid_parts.append(st.read_shard(ANALYSIS, k))
            inv_parts.append(st.read_shard(INVERSIONS, k))
        else:
            pending.append((role, i, layer))

    if pending:
        noise = initial_noise(X.shape, seed, rng)
        grams_x = {r: _layer_grams(m, names, X, batch_size, devices[r]) for r, m in models.items()}
        grams_0 = {r: _layer_grams(m, names, noise, batch_size, devices[r]) for r, m in models.items()}
        bar = _progress(len(pending), progress)
        try:
            for role, i, layer in pending:
                m1 = models[role]
                t0 = time.time()
                x_inv, loss, ckey = cache.get(m1, layer, X, steps=steps, step_size=step_size, seed=seed,
                                              batch_size=batch_size, device=devices[role], weights=weights[role],
                                              images_key=images_key, input_range=rng)
                seconds = time.time() - t0
                init = _losses(m1, layer, noise, X, batch_size, devices[role])
                rows = []
                for ev, m2 in models.items():
                    grams_inv = _layer_grams(m2, names, x_inv, batch_size, devices[ev])
                    for j, lj in enumerate(names):
                        base = _row_base(role, i, layer, ev, j, lj, labels)
                        values = {
                            "stir": _cka(grams_x[ev][lj], grams_inv[lj], estimator),
                            "noise": _cka(grams_x[ev][lj], grams_0[ev][lj], estimator),
                            "cka": _cka(grams_x[role][layer], grams_x[ev][lj], estimator),
                        }
                        rows.extend({**base, "metric": k, "value": v, **common} for k, v in values.items())
                grid_part = pd.DataFrame(rows)
                lossv = loss.double()
                inv_part = pd.DataFrame([{
                    "model": role, "layer": layer, "label": labels[layer], "index": i,
                    "loss_mean": float(lossv.mean()), "loss_median": float(lossv.median()),
                    "loss_p90": float(torch.quantile(lossv, 0.9)), "loss_max": float(lossv.max()),
                    "initial_loss_mean": float(init.double().mean()), **{k: v for k, v in common.items() if k != "estimator"},
                    "key": ckey,
                }])
                if st is not None:
                    k = key_of(role, layer)
                    meta = {"model": role, "config": {**base_cfg, "reference": role, "layer": layer},
                            "indices": indices, "data": described}
                    st.write(INVERSIONS, k, inv_part, {**meta, "seconds": seconds})
                    st.write(ANALYSIS, k, grid_part, meta)
                grid_parts.append(grid_part)
                inv_parts.append(inv_part)
                bar.update(1)
        finally:
            bar.close()

    role_order = {r: k for k, r in enumerate(ROLES)}
    metric_order = {m: k for k, m in enumerate(METRICS)}
    grid = pd.concat(grid_parts, ignore_index=True)
    grid = (grid.assign(_r=grid["reference"].map(role_order), _e=grid["evaluated"].map(role_order),
                        _m=grid["metric"].map(metric_order))
            .sort_values(["_r", "_e", "_m", "ref_index", "eval_index"], kind="stable")
            .drop(columns=["_r", "_e", "_m"]).reset_index(drop=True))
    inversions = pd.concat(inv_parts, ignore_index=True)
    inversions = (inversions.assign(_r=inversions["model"].map(role_order))
                  .sort_values(["_r", "index"], kind="stable").drop(columns="_r").reset_index(drop=True))
    summary = summarize(grid, inversions)
    if st is not None:
        st.write(SUMMARY, job_key("+".join(f"{r}:{w}" for r, w in weights.items()), SUMMARY, base_cfg), summary,
                 {"config": base_cfg, "indices": indices, "data": described})
    attrs = {"indices": indices, "data": described, "layers": names, "cache": repr(cache)}
    for frame in (grid, inversions, summary):
        frame.attrs = dict(attrs)
    return {"grid": grid, "inversions": inversions, "summary": summary}


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="invariance (inversions)", disable=not enabled, unit="inv", leave=False)


# ================================================================================================ summaries


def grid_matrix(grid: pd.DataFrame, reference: str, evaluated: str, metric: str = "stir") -> pd.DataFrame:
    """One grid as a matrix: rows = reference layer i, columns = evaluated layer j (labels in depth order)."""
    sel = grid[(grid["reference"] == reference) & (grid["evaluated"] == evaluated) & (grid["metric"] == metric)]
    if sel.empty:
        have = sorted(set(grid["pair"])) if "pair" in grid else []
        raise LayerlabError(f"no {metric!r} rows for {evaluated}|{reference}; the grid holds pairs {have}")
    mat = sel.pivot_table(index=["ref_index", "ref_label"], columns=["eval_index", "eval_label"], values="value")
    mat = mat.sort_index(axis=0).sort_index(axis=1)
    mat.index = mat.index.get_level_values(1)
    mat.columns = mat.columns.get_level_values(1)
    return mat


def summarize(grid: pd.DataFrame, inversions: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per pretrained layer l: retention, transfer, compression (module doc), with their context.

    Columns: layer, label, index, retention = STIR(ft_l | pt_l), reverse = STIR(pt_l | ft_l), ceiling =
    STIR(pt_l | pt_l) (what a perfect match of the inversion reaches), noise = the floor of ft_l, cka =
    CKA(pt_l, ft_l); with a scratch model scratch = STIR(scratch_l | pt_l) and transfer = retention - scratch;
    compression: best_layer / best_label / best_index = argmax_j STIR(ft_j | pt_l), best_stir, shift =
    best_index - index (< 0: the invariance sits shallower after finetuning), and the scratch control
    scratch_best_label / scratch_shift; inversion_loss = mean final matching loss of pt's inversion at l.

    Shallow layers have higher noise floors (even unrelated inputs look alike to them), which pulls a raw argmax
    shallower for any model, the scratch control included. ``best_label_above_noise`` / ``shift_above_noise`` /
    ``scratch_shift_above_noise`` take the argmax of the floor-normalised STIR (STIR - noise_j) / (1 - noise_j)
    instead; read a shift as real when it holds there too and the scratch control does not show it.
    """
    need = {"reference", "evaluated", "metric", "value", "ref_layer", "eval_layer", "ref_index", "eval_index"}
    if not need <= set(grid.columns):
        raise LayerlabError(f"summarize: expected a grid from invariance_grid with columns {sorted(need)}")
    g = grid.set_index(["reference", "evaluated", "metric", "ref_index", "eval_index"])["value"]
    refs = (grid[grid["reference"] == "pretrained"][["ref_index", "ref_layer", "ref_label"]]
            .drop_duplicates().sort_values("ref_index"))
    labels = dict(zip(grid["eval_index"], grid["eval_label"]))
    layer_names = dict(zip(grid["eval_index"], grid["eval_layer"]))
    has_scratch = "scratch" in set(grid["evaluated"])

    def val(ref: str, ev: str, metric: str, i: int, j: int) -> float:
        try:
            return float(g.loc[(ref, ev, metric, i, j)])
        except KeyError:
            return float("nan")

    rows = []
    for _, r in refs.iterrows():
        i = int(r["ref_index"])
        row: dict[str, Any] = {"layer": r["ref_layer"], "label": r["ref_label"], "index": i,
                               "retention": val("pretrained", "finetuned", "stir", i, i),
                               "reverse": val("finetuned", "pretrained", "stir", i, i),
                               "ceiling": val("pretrained", "pretrained", "stir", i, i),
                               "noise": val("pretrained", "finetuned", "noise", i, i),
                               "cka": val("pretrained", "finetuned", "cka", i, i)}
        if has_scratch:
            row["scratch"] = val("pretrained", "scratch", "stir", i, i)
            row["transfer"] = row["retention"] - row["scratch"]
        for ev in ("finetuned", "scratch"):
            if ev == "scratch" and not has_scratch:
                continue
            js = sorted(labels)
            line = pd.Series([val("pretrained", ev, "stir", i, j) for j in js], index=js)
            floor = pd.Series([val("pretrained", ev, "noise", i, j) for j in js], index=js)
            if line.isna().all():
                continue
            j = int(line.idxmax())
            above = (line - floor) / (1.0 - floor)
            ja = int(above.idxmax()) if not above.isna().all() else j
            if ev == "finetuned":
                row.update({"best_layer": layer_names[j], "best_label": labels[j], "best_index": j,
                            "best_stir": float(line[j]), "shift": j - i,
                            "best_label_above_noise": labels[ja], "shift_above_noise": ja - i})
            else:
                row.update({"scratch_best_label": labels[j], "scratch_shift": j - i,
                            "scratch_shift_above_noise": ja - i})
        if inversions is not None and not inversions.empty:
            hit = inversions[(inversions["model"] == "pretrained") & (inversions["index"] == i)]
            row["inversion_loss"] = float(hit["loss_mean"].iloc[0]) if not hit.empty else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def example_inversions(cache: InversionCache, inversions: pd.DataFrame, k: int = 6) -> dict[tuple[str, str], torch.Tensor]:
    """The first ``k`` inverted images of every (model, layer) row of ``inversions`` still in ``cache``."""
    out = {}
    for _, r in inversions.iterrows():
        found = cache.load(str(r["key"]))
        if found is not None:
            out[(str(r["model"]), str(r["label"]))] = found[0][:k]
    return out


# ================================================================================================ demo step

DEMO_ARCH = "timm:resnet18?channels=16,32,64,128&stem_width=8&stem_type=deep&in_chans=1"
DEMO_DATA = "digits?size=16&channels=1"
DEMO_LAYERS = ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"]


@step("invariance")
def demo_invariance(ctx: DemoContext) -> None:
    """Pretrain on digits 0-4, finetune on 5-9, train a scratch control on 5-9, and run the STIR grid."""
    threads = torch.get_num_threads()
    # Tiny convolutions gain nothing from intra-op threads, and on an oversubscribed CPU two OpenMP threads made
    # this step ~10x slower (measured); one thread for the step, the caller's setting restored afterwards.
    torch.set_num_threads(1)
    try:
        _demo(ctx)
    finally:
        torch.set_num_threads(threads)


def _demo(ctx: DemoContext) -> None:
    from .plots.invariance import save_all
    from .train import recipe, train

    root = ctx.out / "invariance"
    kw = {"checkpoints": "final", "device": ctx.device, "progress": ctx.progress}
    pt = train(DEMO_ARCH, f"{DEMO_DATA}&classes=0-4", recipe("baseline", epochs=6), root / "pretrained", **kw)
    ft = train(DEMO_ARCH, f"{DEMO_DATA}&classes=5-9", recipe("baseline", epochs=5, lr=0.02), root / "finetuned",
               init=str(pt / "final.pt"), **kw)
    # the control gets more epochs than the finetuning, so it is a trained model, not a weak straw man
    sc = train(DEMO_ARCH, f"{DEMO_DATA}&classes=5-9", recipe("baseline", epochs=10), root / "scratch", **kw)
    data = f"{DEMO_DATA}&classes=5-9"
    cache = InversionCache(ctx.out / "cache" / "inversions")
    res = invariance_grid(pt / "final.pt", ft / "final.pt", sc / "final.pt", data, layers=DEMO_LAYERS, images=128,
                          steps=100, cache=cache, store=ctx.store, device=ctx.device, progress=ctx.progress)
    save_all(res, ctx.out / "figures" / "invariance", originals=grid_images(data, 128)[:6],
             examples=example_inversions(cache, res["inversions"], k=6))
    s = res["summary"]
    cols = ["label", "retention", "scratch", "transfer", "ceiling", "noise", "best_label", "shift_above_noise",
            "scratch_shift_above_noise"]
    print(s[cols].round(3).to_string(index=False), flush=True)
