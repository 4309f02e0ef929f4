"""STIR, the measure (Nanda et al. 2022, "Measuring Representational Robustness of Neural Networks Through Shared
Invariances"; as used by Merlin et al. 2023, arXiv 2307.06006; METHODS.md section 4).

STIR(m2_j | m1_i) = CKA(m2_j(X), m2_j(X'_i)): do inputs that m1's layer i cannot tell apart (X'_i, its inversions
of X, :mod:`layerlab.invariance.inversion`) also look alike to m2's layer j? Linear CKA from
:mod:`layerlab.similarity`, computed ONCE over all N images (the reference code's default kept only the last batch:
a known bug). Default estimator: biased full-N CKA (Kornblith et al. 2019), as in the STIR reference code;
``estimator="unbiased"`` uses HSIC_1. ``input_range`` says which inputs the evaluated model takes, as for
:func:`~layerlab.invariance.invert`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import LayerlabError, ShapeError, check_images
from ..features import iter_features
from ..similarity import cka_from_grams, gram_linear
from .inputs import DEFAULT_RANGE, _check_input_images, _check_range, _device, _layer_names

__all__ = ["ESTIMATORS", "stir"]

ESTIMATORS = ("biased", "unbiased")


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
