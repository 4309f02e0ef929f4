"""Model against model: :func:`compare`, the layer x layer CKA of two models on the same images (minibatch CKA,
Nguyen, Raghu, Kornblith 2021; Kornblith et al. 2019), the cross-model view of Sharon & Dar 2024 (arXiv
2405.17377)."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import pandas as pd
import torch
from torch import nn

from ..data import Batches, DataLike, LoaderBatches, as_batches
from ..errors import DataError, LayerlabError
from ..features import OUTPUT_KEY, check_tokens, layer_labels
from ..models import load_model
from ..runtime import eval_mode, model_device, resolve_device
from ..similarity import CKAAccumulator, pairwise_cka_inference
from .views import _features, _resolve_views

__all__ = ["AUTO_IMAGES", "compare"]

ModelLike = nn.Module | str

#: images="auto": this many CKA probe images of indexable data, or all when it holds fewer
AUTO_IMAGES = 256


def _compare_model(model: ModelLike, device: str | torch.device | None, what: str) -> tuple[nn.Module, str]:
    """(module, name for the table): a spec loaded in eval mode on ``device`` (default the CPU), or the caller's
    module where it is (never moved; a ``device`` of another type is an error)."""
    if isinstance(model, str):
        return load_model(model, device=resolve_device(device)), model
    if not isinstance(model, nn.Module):
        raise LayerlabError(f"{what}: expected a model spec ('timm:resnet18', 'file:run/final.pt') or an nn.Module, "
                            f"got {type(model).__name__}")
    have = model_device(model) or torch.device("cpu")
    if device is not None and resolve_device(device).type != have.type:
        raise LayerlabError(f"{what} is on {have} but device={str(device)!r}; move it first with model.to(...) "
                            "(layerlab never moves a model it was handed) or leave device=None")
    return model, getattr(model, "layerlab_spec", None) or type(model).__name__


def _probe_batches(data: DataLike, images: int | str | None, batch_size: int, seed: int, split: str) -> Batches:
    """The probe images as batches (:func:`layerlab.data.as_batches`). ``images="auto"``: :data:`AUTO_IMAGES` of
    indexable data (a fixed seeded subset; all when it holds fewer), every image of a DataLoader."""
    if images != "auto":
        return as_batches(data, batch_size, images=images, seed=seed, split=split, arg="images=")
    try:
        source = as_batches(data, batch_size, images=AUTO_IMAGES, seed=seed, split=split, arg="images=")
    except DataError:  # fewer images than AUTO_IMAGES: take them all
        return as_batches(data, batch_size, images=None, seed=seed, split=split, arg="images=")
    if isinstance(source, LoaderBatches):  # a DataLoader's own images, not its first AUTO_IMAGES
        return as_batches(data, batch_size, images=None, seed=seed, split=split, arg="images=")
    return source


def _equal_batches(source: Batches) -> Iterator[torch.Tensor]:
    """The source's image batches of the first batch's size: minibatch CKA weighs every batch equally, so a short
    last batch is left out (the table's ``n`` counts the images used)."""
    size = None
    for x, _ in source.batches():
        size = size or x.shape[0]
        if x.shape[0] == size:
            yield x


def compare(
    model_a: ModelLike,
    model_b: ModelLike,
    data: DataLike = "digits",
    *,
    layers_a: str | Sequence[str] | None = None,
    layers_b: str | Sequence[str] | None = None,
    tokens: str = "flatten",
    images: int | str | None = "auto",
    batch_size: int = 64,
    split: str = "test",
    estimator: str = "unbiased",
    kernel: str = "linear",
    seed: int = 0,
    device: str | torch.device | None = None,
    null: int = 0,
    bootstrap: int = 0,
) -> pd.DataFrame:
    """Layer x layer CKA between two models on the same images: model_a, model_b, layer_a, label_a, layer_b,
    label_b, cka, estimator, kernel, n, n_batches, gram_dtype, batch_size, tokens (minibatch unbiased CKA by default),
    plus null_mean, null_high, p_value, distinguishable with ``null`` and ci_low, ci_high with ``bootstrap``.

    Args:
        model_a, model_b: model specs (``timm:resnet18``, ``file:run/final.pt``) or any ``nn.Module`` (used where
            it is, in eval mode for the call, never moved or modified).
        data: a data spec, an ImageData, a tensor, an ``(images, labels)`` pair, a Dataset or a DataLoader
            (:func:`layerlab.data.as_batches`; the user's own images are fed as given). ``images``: a fixed seeded
            subset of indexable data (``"auto"``: 256, or all when fewer; ``None``: all), the first N of a
            DataLoader (``"auto"``: all of it). Batches are ``batch_size`` images (a DataLoader's own batches); a
            batch smaller than the first (the short last one) is left out, so every batch weighs the same.
        layers_a, layers_b: :func:`layerlab.features.select_layers` items (module paths, labels, ``"blocks"``,
            ``"layers"``, ``"kind:Conv2d"``); default :func:`default_layers` (stem and blocks). The logits
            (``"output"``) are always added.
        tokens: how a token output [N, T, D] becomes features: ``"flatten"`` (all T x D values, the default),
            ``"cls"`` (token 0, the class token of timm/torchvision ViTs; refused for a model without one) or
            ``"mean"`` (the token average). Conv maps are always flattened whole.
        estimator, kernel: of :class:`~layerlab.similarity.CKAAccumulator`.
        device: where specs are loaded (default the CPU); a module computes where it is.
        null, bootstrap: is each similarity above chance at this N? ``null`` > 0 adds ``null_mean``, ``null_high``
            (95th percentile of the null: what chance reaches), ``p_value`` and ``distinguishable`` (p < 0.05) from
            that many row-shuffled pairings; ``bootstrap`` > 0 adds the 95% interval ``ci_low``, ``ci_high`` from
            that many resamples of the batches (needs >= 2 batches). Both reuse the stored Grams: no forward pass
            (:func:`layerlab.similarity.pairwise_cka_inference`, draws seeded by ``seed``). 0 (default): no column.

    Example:
        >>> net = lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        >>> f = compare(net(), net(), torch.rand(32, 1, 8, 8), layers_a="kind:Conv2d", layers_b="layers", batch_size=8)
        >>> f[["layer_a", "layer_b"]].apply(tuple, axis=1).tolist()
        [('0', '0'), ('0', '3'), ('0', 'output'), ('output', '0'), ('output', '3'), ('output', 'output')]
    """
    tokens = check_tokens(tokens)
    _check_draws(null, bootstrap, images, batch_size)
    (ma, name_a), (mb, name_b) = _compare_model(model_a, device, "model_a"), _compare_model(model_b, device, "model_b")
    va, vb = _resolve_views(ma, layers_a), _resolve_views(mb, layers_b)
    source = _probe_batches(data, images, batch_size, seed, split)
    acc = CKAAccumulator(len(va), len(vb), kernel=kernel, estimator=estimator, names_a=va, names_b=vb)

    def grams(model: nn.Module, views: list[str]) -> dict[str, list[torch.Tensor]]:
        inner = [v for v in views if v != OUTPUT_KEY]
        with eval_mode(model):
            return _features(model, inner, _equal_batches(source), model_device(model) or "cpu", acc.gram,
                             OUTPUT_KEY in views, tokens)

    ga, gb = grams(ma, va), grams(mb, vb)
    for bi in range(len(ga[va[0]])):
        acc.update_grams([ga[v][bi] for v in va], [gb[v][bi] for v in vb])
    f = acc.to_frame()
    f.insert(0, "model_b", name_b)
    f.insert(0, "model_a", name_a)
    f.insert(f.columns.get_loc("layer_a") + 1, "label_a", f["layer_a"].map(layer_labels(ma, va)))
    f.insert(f.columns.get_loc("layer_b") + 1, "label_b", f["layer_b"].map(layer_labels(mb, vb)))
    f["batch_size"] = int(ga[va[0]][0].shape[-1])
    f["tokens"] = tokens
    if null or bootstrap:
        stats = pairwise_cka_inference(_stacked(ga, va), _stacked(gb, vb), permutations=null, resamples=bootstrap,
                                       seed=seed, unbiased=estimator == "unbiased")
        for key, value in stats.items():
            if key != "cka":  # the accumulator's value stays the table's cka
                f[key] = value.reshape(-1)  # to_frame's rows: layer_a major, layer_b minor
    return f


def _stacked(grams: dict[str, list[torch.Tensor]], views: list[str]) -> torch.Tensor:
    """Per-view lists of batch Grams -> one [views, batches, b, b] stack."""
    return torch.stack([torch.stack(grams[v]) for v in views])


def _check_draws(null: int, bootstrap: int, images: int | str | None, batch_size: int) -> None:
    """Refuse a bad ``null``/``bootstrap`` before any forward pass (a bootstrap needs two batches to resample)."""
    for name, value in (("null", null), ("bootstrap", bootstrap)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise LayerlabError(f"{name}: expected a number of draws >= 0 (0: off, e.g. 200), got {value!r}")
    if null and null < 19:
        raise LayerlabError(f"null: with {null} shuffles the smallest p-value is 1/{null + 1}, not below 0.05; "
                            "use at least 19 (200 is typical)")
    if bootstrap and isinstance(images, int) and images // batch_size < 2:
        raise LayerlabError(f"bootstrap: {images} images in batches of {batch_size} make fewer than 2 batches to "
                            f"resample; use batch_size <= {images // 2} (8 or more batches give a steadier interval)")
