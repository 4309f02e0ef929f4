"""The boundary of the invariance analysis (Merlin et al. 2023, arXiv 2307.06006): input ranges, image, layer and
device checks, and the guarded forward pass to one layer that inversion, STIR and the grid all run.

A model takes images in [0, 1] (normalisation inside the model) unless an ``input_range`` (lo, hi) says otherwise:
numbers, or per-channel bounds [1, C, 1, 1] (float32, CPU). Every check names the argument, what it expected, what
it got, and the fix.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..errors import LayerlabError, ShapeError, check_images
from ..features import forward_until, select_layers
from ..layers import list_layers as learnable_layers
from ..runtime import eval_mode, resolve_device

__all__ = ["DEFAULT_RANGE", "Bound", "default_layers"]

Bound = float | torch.Tensor  # a number, or per-channel bounds [1, C, 1, 1] (float32, CPU)
DEFAULT_RANGE = (0.0, 1.0)


# ================================================================================================ input ranges


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


def _autocast(device: torch.device) -> AbstractContextManager[Any]:
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
