"""Confidence on every criticality number: a bootstrap over images and trials, the stopping rule of adaptive
sampling, and intervals on differences between models or training methods (groups of seeds).

The estimate of layer l is ``100 * (1 - mean_t mean_x s_tx)`` with s_tx the softmax cosine of image x under
trial t (:mod:`.metrics`); each per-trial row keeps its s_tx in ``per_image`` (the images in the order of
``table.attrs["indices"]``). Its 95 % interval is a two-stage percentile bootstrap (our choice; Gavrikov et al.
2024 report the std over 3 trials only):

1. images: Poisson(1) bootstrap weights w_bx, one row of weights per replicate b and image position x, drawn once
   per call under ``derive_seed("criticality/bootstrap", seed)``; the same weights serve every model, layer and
   trial, so replicates are paired across them (the images are shared) and a difference between two models is
   bootstrapped on the same resampled images. A trial evaluated on its first n_t images (adaptive sampling) uses
   the first n_t weights. The Poisson bootstrap (Hanley & MacGibbon 2006; Chamandy et al. 2012) is the
   multinomial one with a random total, and is the same for every prefix of the data;
2. trials: the T trials are resampled with replacement (their fresh instances are i.i.d. draws), and the
   replicate is the mean over the drawn trials of their weighted image means. The draws are the same for every
   model and layer (:func:`trial_draws`): trial t re-randomises with the same fresh instance in every model of an
   architecture, so trials are paired like images, and a model compared with itself differs by exactly 0.

``ci_low``/``ci_high`` are the 2.5 and 97.5 % points of the replicates. A layer whose re-randomisation cannot
change the output has s_tx = 1 for every image and trial, so every replicate and the interval are 0. With T = 3
the trial stage sees at most 10 distinct multisets of trials, so a trial spread dominated interval is coarse: the
paper's std over trials stays in the summary beside it.

Differences (:func:`difference_replicates`): model m minus the baseline per layer, both on the same image weights,
trials drawn independently. A group of models (one training method, several seeds: ``groups``) is a third,
outer stage: the seeds are resampled with replacement, so seed-to-seed spread widens the interval. A cell is
*distinguishable* from zero when its interval excludes 0.

Adaptive sampling (:func:`halfwidth`): a (model, layer, trial) stops taking images once the half-width of the
normal interval of its image mean, ``100 * 1.96 * sd(s_x) / sqrt(n)`` in points, is below the target (after at
least :data:`MIN_IMAGES` images). This is the image part of the interval; the trial part cannot shrink with more
images.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import LayerlabError
from ..seeds import derive_seed

__all__ = [
    "LEVEL", "MIN_IMAGES", "RESAMPLES", "criticality_replicates", "difference_replicates", "halfwidth",
    "image_weights", "percentile_interval", "trial_draws", "trial_means",
]

RESAMPLES = 1000  #: bootstrap replicates per interval
LEVEL = 0.95  #: interval coverage
MIN_IMAGES = 32  #: adaptive sampling never stops a trial on fewer images
Z95 = 1.959963984540054


def image_weights(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Poisson(1) bootstrap weights [resamples, n] for image positions 0..n-1 (float64), from their own stream."""
    if resamples < 1:
        raise LayerlabError(f"resamples must be positive, got {resamples}")
    rng = np.random.default_rng(derive_seed("criticality/bootstrap", seed))
    return rng.poisson(1.0, size=(resamples, n)).astype(np.float64)


def trial_means(per_image: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """[T, B]: each trial's weighted mean similarity under each replicate, on its own first n_t images.

    A replicate whose weights on those images sum to 0 (possible only for tiny n_t) takes the plain mean.
    """
    out = np.empty((len(per_image), weights.shape[0]))
    for t, s in enumerate(per_image):
        s = np.asarray(s, dtype=np.float64)
        if s.ndim != 1 or len(s) == 0 or len(s) > weights.shape[1]:
            raise LayerlabError(f"per-image similarities of trial {t}: expected 1..{weights.shape[1]} values, got {s.shape}")
        w = weights[:, : len(s)]
        total = w.sum(axis=1)
        mean = np.where(total > 0, (w @ s) / np.where(total > 0, total, 1.0), s.mean())
        out[t] = mean
    return out


def trial_draws(trials: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """[resamples, trials] trial indices drawn with replacement, the same for every model and layer with this many
    trials (trial t is the same fresh draw for every model of an architecture: paired, like the images)."""
    rng = np.random.default_rng(derive_seed("criticality/bootstrap", seed, 1, trials))
    return rng.integers(0, trials, size=(resamples, trials))


def criticality_replicates(per_image: Sequence[np.ndarray], weights: np.ndarray, seed: int = 0) -> np.ndarray:
    """[B] bootstrap replicates of one layer's criticality (%): images by ``weights``, trials by :func:`trial_draws`."""
    means = trial_means(per_image, weights)
    t, b = means.shape
    drawn = trial_draws(t, b, seed)
    return 100.0 * (1.0 - means[drawn, np.arange(b)[:, None]].mean(axis=1))


def percentile_interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap replicates (NaN for none)."""
    r = np.asarray(replicates, dtype=np.float64)
    r = r[np.isfinite(r)]
    if len(r) == 0:
        return math.nan, math.nan
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(r, [a, 1.0 - a])
    return float(lo), float(hi)


def difference_replicates(
    replicates: Mapping[str, np.ndarray], baseline: Sequence[str], models: Sequence[str], rng: np.random.Generator
) -> np.ndarray:
    """[B] replicates of mean(models) - mean(baseline): each side's seeds resampled with replacement per replicate.

    ``replicates`` maps model -> its [B] criticality replicates (all on the same image weights, so paired).
    """
    def side(names: Sequence[str]) -> np.ndarray:
        stack = np.stack([replicates[m] for m in names])  # [S, B]
        s, b = stack.shape
        if s == 1:
            return stack[0]
        drawn = rng.integers(0, s, size=(b, s))
        return stack[drawn, np.arange(b)[:, None]].mean(axis=1)

    return side(models) - side(baseline)


def halfwidth(sum_s: float, sum_s2: float, n: float) -> float:
    """Half-width in points of the 95 % normal interval of a mean similarity from its running sums (inf below 2)."""
    if n < 2:
        return math.inf
    var = max(sum_s2 - sum_s * sum_s / n, 0.0) / (n - 1)
    return 100.0 * Z95 * math.sqrt(var / n)


def per_image_arrays(rows: pd.DataFrame) -> list[np.ndarray] | None:
    """The ``per_image`` arrays of a group of per-trial rows, or None when any row lacks them (an older table)."""
    if "per_image" not in rows.columns:
        return None
    out = []
    for v in rows["per_image"]:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        out.append(np.asarray(v, dtype=np.float64))
    return out
