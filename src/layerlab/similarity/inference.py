"""Is a CKA value above chance, and how precise is it? A permutation null and a batch bootstrap from stored Grams.

Both work on the per-batch Gram matrices that minibatch CKA already holds (one [b, b] matrix per batch and layer,
the same images in the same order on both sides), so they cost no forward pass.

* Permutation null: each draw shuffles the rows and columns of every batch's L with an independent permutation
  (within the batch: image i of A is paired with image pi(i) of B) and recomputes the summed HSIC and CKA. Centring
  commutes with a permutation and HSIC(L, L) does not change, so only the cross term is recomputed:
  HSIC_ab(pi) = sum_k <C(K_k), P_k C(L_k) P_k^T> / norm, with C the estimator's centring. Its distribution is what
  CKA reaches at this N when the two representations are unrelated. One-sided p-value:
  (1 + #{null >= observed}) / (1 + permutations), the smallest possible being 1 / (1 + permutations).
* Bootstrap: a block bootstrap over batches. The batches' HSIC terms (HSIC_ab, HSIC_aa, HSIC_bb) are i.i.d. when
  the batches are disjoint random draws of images, and minibatch CKA is a smooth function of their sums, so each
  resample draws n_batches batches with replacement and recomputes the ratio of summed HSICs; the interval is the
  percentile interval. Rows are never resampled inside a batch: a duplicated image makes two rows of a Gram equal,
  and the HSIC estimators (the unbiased one assumes n distinct draws) then measure the duplicate as dependence.
  One batch gives nothing to resample, so the bootstrap refuses it; with few batches it is rough (the resampled
  variance is (B-1)/B of the plug-in one and only C(2B-1, B) distinct resamples exist: 35 for B = 4), so prefer
  8 or more batches (the unbiased estimator does not depend on the batch size; a smaller batch_size is free).

Randomness: streams ``cka/permutation`` and ``cka/bootstrap`` of :mod:`layerlab.seeds`; every layer pair of one
call shares the same draws (common random numbers), so a call is deterministic under ``seed``.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import seeds
from ..errors import LayerlabError, ShapeError, check_finite
from .cka import _as_tensor, _centre_grams, _check_n, _cka_compute, _estimator

__all__ = ["bootstrap_indices", "cka_bootstrap", "cka_inference", "cka_permutation_null", "pairwise_cka_inference",
           "permutation_indices"]

#: the statistics :func:`pairwise_cka_inference` adds, null ones first (the table's column order)
NULL_KEYS = ("null_mean", "null_high", "p_value")
BOOTSTRAP_KEYS = ("ci_low", "ci_high")
#: elements of one block of permuted Grams (float64, plus as many int64 indices): ~64 MiB each
_CHUNK = 2**23
#: a null draw within this of the observed CKA counts as reaching it (a conservative tie rule across float paths)
_TIE = 1e-12


# --------------------------------------------------------------------------------------------------------------
# the draws (exposed so that a reference implementation can reuse them)
# --------------------------------------------------------------------------------------------------------------
def _check_count(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise LayerlabError(f"{name}: expected an integer >= {minimum} (e.g. 200), got {value!r}")
    return int(value)


def permutation_indices(permutations: int, n_batches: int, batch: int, seed: int) -> torch.Tensor:
    """[permutations, n_batches, batch] int64: draw p permutes batch k's rows by ``out[p, k]`` (stream
    ``cka/permutation``); the draws :func:`cka_permutation_null` makes for the same arguments."""
    permutations = _check_count(permutations, "permutations", 1)
    g = seeds.generator("cka/permutation", seed)
    return torch.rand(permutations, n_batches, batch, generator=g, dtype=torch.float64).argsort(dim=-1)


def bootstrap_indices(resamples: int, n_batches: int, seed: int) -> torch.Tensor:
    """[resamples, n_batches] int64: the batches each resample draws with replacement (stream ``cka/bootstrap``);
    the draws :func:`cka_bootstrap` makes for the same arguments."""
    resamples = _check_count(resamples, "resamples", 1)
    if n_batches < 2:
        raise LayerlabError(
            f"bootstrap: resampling batches needs at least 2 batches, got {n_batches}; use a smaller batch_size "
            "(the unbiased estimator does not depend on it), e.g. 8 or more batches of the same images. Rows are "
            "not resampled inside a batch: duplicated images bias the HSIC estimates"
        )
    g = seeds.generator("cka/bootstrap", seed)
    return torch.randint(n_batches, (resamples, n_batches), generator=g)


# --------------------------------------------------------------------------------------------------------------
# the pure core, on centred stacks [L, n_batches, b, b]
# --------------------------------------------------------------------------------------------------------------
def _check_stack(grams: torch.Tensor | np.ndarray, name: str, ndim: int, unbiased: bool) -> torch.Tensor:
    """Validate Grams [(L,) n_batches, b, b] and return a float64 [L, n_batches, b, b] copy."""
    g = _as_tensor(grams, name)
    form = "[n_batches, b, b]" if ndim == 3 else "[layers, n_batches, b, b]"
    if g.ndim != ndim or g.shape[-1] != g.shape[-2] or 0 in g.shape:
        raise ShapeError(f"{name}: expected per-batch Gram matrices {form}, got shape {tuple(g.shape)}; "
                         "stack one [b, b] Gram per batch (e.g. from CKAAccumulator.gram)")
    _check_n(g.shape[-1], _estimator(unbiased), name)
    g = g.detach().to(torch.float64, copy=True)
    check_finite(g, what=f"Gram matrices {name}", hint="check the features they were built from")
    return g if ndim == 4 else g[None]


def _norm(b: int, unbiased: bool) -> float:
    return float(b * (b - 3)) if unbiased else float((b - 1) ** 2)


def _batch_hsic(ca: torch.Tensor, cb: torch.Tensor, norm: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centred [La, B, b, b] and [Lb, B, b, b] -> per-batch HSIC_ab [B, La, Lb], HSIC_aa [B, La], HSIC_bb [B, Lb]."""
    fa = ca.transpose(0, 1).flatten(2)  # [B, La, b*b]
    fb = cb.transpose(0, 1).flatten(2)
    return fa @ fb.transpose(1, 2) / norm, (fa * fa).sum(-1) / norm, (fb * fb).sum(-1) / norm


def _null_cka(ca: torch.Tensor, cb: torch.Tensor, idx: torch.Tensor, norm: float, symmetric: bool) -> torch.Tensor:
    """CKA [P, La, Lb] with each batch of every L row-shuffled by ``idx`` [P, B, b]; HSIC_aa, HSIC_bb unchanged.

    ``symmetric`` (cb is ca): only i <= j is computed and mirrored, so the null of (i, j) is that of (j, i).
    """
    la, nb, b = ca.shape[0], ca.shape[1], ca.shape[-1]
    aa = (ca * ca).sum(dim=(1, 2, 3)) / norm
    bb = (cb * cb).sum(dim=(1, 2, 3)) / norm
    flat_a = ca.reshape(la, -1)
    perms = idx.shape[0]
    ab = torch.empty(perms, la, cb.shape[0], dtype=torch.float64)
    step = max(1, _CHUNK // (nb * b * b))
    batch = torch.arange(nb)[None, :, None, None]
    for j in range(cb.shape[0]):
        rows = j + 1 if symmetric else la
        for s in range(0, perms, step):
            ix = idx[s:s + step]
            shuffled = cb[j][batch, ix[..., :, None], ix[..., None, :]]  # [p, B, b, b]: L_k[pi(r), pi(c)]
            ab[s:s + step, :rows, j] = shuffled.reshape(ix.shape[0], -1) @ flat_a[:rows].T / norm
        if symmetric:
            ab[:, j, :j] = ab[:, :j, j]
    return _cka_compute(ab, aa, bb)


def _bootstrap_cka(ab: torch.Tensor, aa: torch.Tensor, bb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-batch HSIC terms ([B, La, Lb], [B, La], [B, Lb]) and resampled batches ``idx`` [R, B] -> CKA [R, La, Lb]."""
    w = torch.zeros(idx.shape[0], ab.shape[0], dtype=torch.float64)
    w.scatter_add_(1, idx, torch.ones(idx.shape, dtype=torch.float64))  # how often resample r drew batch k
    return _cka_compute(torch.einsum("rk,kij->rij", w, ab), w @ aa, w @ bb)


def _summarise(observed: np.ndarray, null: np.ndarray | None, boot: np.ndarray | None,
               level: float) -> dict[str, np.ndarray]:
    """Observed CKA [La, Lb], null draws [P, La, Lb], bootstrap draws [R, La, Lb] -> the statistics, [La, Lb] each."""
    alpha = 1.0 - level
    out: dict[str, np.ndarray] = {}
    if null is not None:
        out["null_mean"] = null.mean(axis=0)
        out["null_high"] = np.quantile(null, level, axis=0)
        reached = (null >= observed[None] - _TIE).sum(axis=0)
        out["p_value"] = np.where(np.isnan(observed), np.nan, (1.0 + reached) / (1.0 + null.shape[0]))
    if boot is not None:
        out["ci_low"] = np.quantile(boot, alpha / 2, axis=0)
        out["ci_high"] = np.quantile(boot, 1 - alpha / 2, axis=0)
    if null is not None:
        out["distinguishable"] = out["p_value"] < alpha  # NaN (zero variance) compares False
    return out


# --------------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------------
def pairwise_cka_inference(
    grams_a: torch.Tensor | np.ndarray,
    grams_b: torch.Tensor | np.ndarray | None = None,
    *,
    permutations: int = 0,
    resamples: int = 0,
    seed: int = 0,
    unbiased: bool = True,
    level: float = 0.95,
) -> dict[str, np.ndarray]:
    """Null and interval of every layer pair: Grams [La, n_batches, b, b] and [Lb, n_batches, b, b] (None: grams_a,
    self-similarity) -> ``{"cka", "null_mean", "null_high", "p_value", "ci_low", "ci_high", "distinguishable"}``,
    each a float64 (bool) array [La, Lb]; the null keys only with ``permutations``, the interval only with
    ``resamples``. ``null_high`` is the ``level`` quantile of the null (what chance reaches at this N);
    ``distinguishable`` is ``p_value < 1 - level``. Every pair shares the same draws.
    """
    permutations = _check_count(permutations, "permutations", 0)
    resamples = _check_count(resamples, "resamples", 0)
    if not permutations and not resamples:
        raise LayerlabError("pairwise_cka_inference: ask for permutations (a null) or resamples (an interval), or both")
    if not (isinstance(level, float) and 0.0 < level < 1.0):
        raise LayerlabError(f"level: expected a confidence level strictly between 0 and 1 (e.g. 0.95), got {level!r}")
    if permutations and 1.0 / (1 + permutations) >= 1.0 - level:
        need = int(np.ceil(1.0 / (1.0 - level))) - 1
        raise LayerlabError(
            f"permutations: with {permutations} the smallest p-value is 1/{permutations + 1}, not below "
            f"{1 - level:.3g}, so no similarity could be told from chance; use at least {need + 1} (200 is typical)"
        )
    symmetric = grams_b is None
    ca = _centre_grams(_check_stack(grams_a, "grams_a", 4, unbiased), unbiased)
    cb = ca if symmetric else _centre_grams(_check_stack(grams_b, "grams_b", 4, unbiased), unbiased)
    if cb.shape[1:] != ca.shape[1:]:
        raise ShapeError(f"grams_a and grams_b must hold the same batches of the same images, got [n_batches, b, b] "
                         f"{tuple(ca.shape[1:])} and {tuple(cb.shape[1:])}")
    nb, b = ca.shape[1], ca.shape[-1]
    norm = _norm(b, unbiased)
    ab, aa, bb = _batch_hsic(ca, cb, norm)
    observed = _cka_compute(ab.sum(0), aa.sum(0), bb.sum(0)).numpy()
    null = boot = None
    if permutations:
        null = _null_cka(ca, cb, permutation_indices(permutations, nb, b, seed), norm, symmetric).numpy()
    if resamples:
        boot = _bootstrap_cka(ab, aa, bb, bootstrap_indices(resamples, nb, seed)).numpy()
    return {"cka": observed, **_summarise(observed, null, boot, level)}


def cka_permutation_null(grams_a: torch.Tensor | np.ndarray, grams_b: torch.Tensor | np.ndarray, *,
                         permutations: int, seed: int, unbiased: bool) -> torch.Tensor:
    """CKA of ``permutations`` row-shuffled pairings [permutations] (float64): the null of unrelated representations.

    grams_a, grams_b: per-batch Grams [n_batches, b, b] of the same images. Each draw shuffles the rows (and
    columns) of every batch of L with its own permutation (:func:`permutation_indices`) and recomputes minibatch
    CKA from the summed HSICs; HSIC(K, K) and HSIC(L, L) are left as they are.

    >>> x = torch.randn(2, 16, 5)
    >>> g = x @ x.transpose(1, 2)
    >>> cka_permutation_null(g, g, permutations=50, seed=0, unbiased=True).shape
    torch.Size([50])
    """
    ca = _centre_grams(_check_stack(grams_a, "grams_a", 3, unbiased), unbiased)
    cb = _centre_grams(_check_stack(grams_b, "grams_b", 3, unbiased), unbiased)
    if ca.shape != cb.shape:
        raise ShapeError(f"grams_a and grams_b must hold the same batches of the same images, got shapes "
                         f"{tuple(ca.shape[1:])} and {tuple(cb.shape[1:])}")
    idx = permutation_indices(permutations, ca.shape[1], ca.shape[-1], seed)
    return _null_cka(ca, cb, idx, _norm(ca.shape[-1], unbiased), symmetric=False)[:, 0, 0]


def cka_bootstrap(grams_a: torch.Tensor | np.ndarray, grams_b: torch.Tensor | np.ndarray, *,
                  resamples: int, seed: int, unbiased: bool) -> torch.Tensor:
    """Minibatch CKA of ``resamples`` batch-bootstrap resamples [resamples] (float64).

    A block bootstrap over batches (:func:`bootstrap_indices`): each resample draws n_batches of the batches
    [n_batches, b, b] with replacement and takes the ratio of the summed HSICs. The batches' HSIC terms are
    i.i.d. for disjoint random batches, which is what the bootstrap needs. Rows are not resampled inside a batch:
    duplicated images make equal Gram rows, which the HSIC estimators count as dependence (biased upwards). One
    batch cannot be resampled and raises; below ~8 batches the interval is rough (see the module docstring).
    """
    ca = _centre_grams(_check_stack(grams_a, "grams_a", 3, unbiased), unbiased)
    cb = _centre_grams(_check_stack(grams_b, "grams_b", 3, unbiased), unbiased)
    if ca.shape != cb.shape:
        raise ShapeError(f"grams_a and grams_b must hold the same batches of the same images, got shapes "
                         f"{tuple(ca.shape[1:])} and {tuple(cb.shape[1:])}")
    ab, aa, bb = _batch_hsic(ca, cb, _norm(ca.shape[-1], unbiased))
    return _bootstrap_cka(ab, aa, bb, bootstrap_indices(resamples, ca.shape[1], seed))[:, 0, 0]


def cka_inference(grams_a: torch.Tensor | np.ndarray, grams_b: torch.Tensor | np.ndarray, *, permutations: int,
                  resamples: int, seed: int, unbiased: bool, level: float = 0.95) -> dict[str, float | bool]:
    """One pair's CKA with its null and interval: Grams [n_batches, b, b] -> ``{"cka", "null_mean", "null_high",
    "p_value", "ci_low", "ci_high", "distinguishable"}`` (null keys only with ``permutations``, interval keys
    only with ``resamples``). See :func:`pairwise_cka_inference`; the draws are :func:`cka_permutation_null`'s
    and :func:`cka_bootstrap`'s.

    >>> x = torch.randn(4, 16, 5)
    >>> g = x @ x.transpose(1, 2)
    >>> r = cka_inference(g, g, permutations=99, resamples=50, seed=0, unbiased=True)
    >>> r["p_value"], r["distinguishable"], round(r["ci_low"], 6)
    (0.01, True, 1.0)
    """
    for name, g in (("grams_a", grams_a), ("grams_b", grams_b)):
        g = _as_tensor(g, name)
        if g.ndim != 3:
            raise ShapeError(f"{name}: expected per-batch Gram matrices [n_batches, b, b], got shape {tuple(g.shape)}")
    stats = pairwise_cka_inference(_as_tensor(grams_a, "grams_a")[None], _as_tensor(grams_b, "grams_b")[None],
                                   permutations=permutations, resamples=resamples, seed=seed, unbiased=unbiased,
                                   level=level)
    return {k: (bool(v[0, 0]) if k == "distinguishable" else float(v[0, 0])) for k, v in stats.items()}
