"""The numbers of one swap, as pure functions of the original and the swapped logits of the same images: the
cosine similarity of their softmaxes (Gavrikov, Agnihotri, Keuper, Keuper 2024), top-1 agreement, top-1 accuracy
after the swap (Zhang, Bengio, Singer 2022) and KL(original || swapped).

Streaming and one-shot agree by construction: :func:`_stats_update` reduces a batch to sufficient statistics,
:func:`_stats_compute` turns their sum over batches into a row's numbers, and :func:`layer_criticality` is both
at once.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ShapeError

__all__ = ["kl_divergence", "layer_criticality", "softmax_cosine"]


def _check_logits(reference: torch.Tensor, other: torch.Tensor) -> None:
    if reference.ndim != 2 or reference.shape != other.shape:
        raise ShapeError(
            f"logits: expected two [N, classes] tensors of the same shape, got {tuple(reference.shape)} and "
            f"{tuple(other.shape)}; pass the model outputs of one batch before and after the swap"
        )


def softmax_cosine(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity of softmax(reference) and softmax(other), float64 [N] (Gavrikov et al. 2024).

    >>> softmax_cosine(torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 0.0]]))
    tensor([1.], dtype=torch.float64)
    """
    _check_logits(reference, other)
    p = torch.softmax(reference.double(), dim=-1)
    q = torch.softmax(other.double(), dim=-1)
    return F.cosine_similarity(p, q, dim=-1)


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-row KL(softmax(reference) || softmax(other)) in nats, float64 [N]."""
    _check_logits(reference, other)
    logp = torch.log_softmax(reference.double(), dim=-1)
    logq = torch.log_softmax(other.double(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def _stats_update(reference: torch.Tensor, other: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """One batch -> sufficient statistics [sum cos, sum agree, sum correct, n labelled, sum kl, n, sum cos^2]
    (float64)."""
    return _batch_stats(reference, other, labels)[0]


def _batch_stats(
    reference: torch.Tensor, other: torch.Tensor, labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch -> (sufficient statistics as :func:`_stats_update`, the per-image cosines [N] float64 on the CPU)."""
    cos = softmax_cosine(reference, other)
    kl = kl_divergence(reference, other)
    pred = other.argmax(dim=-1)
    agree = (reference.argmax(dim=-1) == pred).sum()
    if labels is None:
        correct = labelled = torch.zeros((), dtype=torch.long)
    else:
        has = labels >= 0
        correct, labelled = ((pred == labels) & has).sum(), has.sum()
    n = torch.tensor(reference.shape[0], device=cos.device)
    stats = torch.stack([cos.sum(), agree.double(), correct.double(), labelled.double(), kl.sum(), n.double(),
                         (cos * cos).sum()])
    return stats.cpu(), cos.cpu()


def _stats_compute(stats: torch.Tensor) -> dict[str, float]:
    """Sufficient statistics -> similarity, criticality (%), agreement, accuracy (NaN without labels), kl."""
    s = stats.tolist()
    n = s[5]
    similarity = s[0] / n
    return {
        "similarity": similarity,
        "criticality": 100.0 * (1.0 - similarity),
        "agreement": s[1] / n,
        "accuracy": s[2] / s[3] if s[3] > 0 else math.nan,
        "kl": s[4] / n,
    }


def layer_criticality(
    reference: torch.Tensor, other: torch.Tensor, labels: torch.Tensor | None = None
) -> dict[str, float]:
    """All per-(layer, trial) numbers from the original and the swapped logits of the same images.

    >>> layer_criticality(torch.zeros(4, 10), torch.zeros(4, 10))["criticality"]
    0.0
    """
    return _stats_compute(_stats_update(reference, other, labels))
