"""The pure functional core of centred kernel alignment (Kornblith et al. 2019): Gram matrices, HSIC and CKA.

``gram_linear``/``gram_rbf`` build Gram matrices; ``_hsic_update`` reduces a stack of them to HSIC sums and
``_cka_compute`` turns sums into CKA (the torchmetrics habit), so the functional API here and the streaming
:class:`~layerlab.similarity.CKAAccumulator` share one implementation. The estimators and the numerics are
described in :mod:`layerlab.similarity`.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from ..errors import DataError, LayerlabError, ShapeError, check_finite

Kernel = Literal["linear", "rbf"]
Estimator = Literal["unbiased", "biased"]
_KERNELS = ("linear", "rbf")
_ESTIMATORS = ("unbiased", "biased")
_MIN_N = {"unbiased": 4, "biased": 2}


# --------------------------------------------------------------------------------------------------------------
# validation and Gram matrices
# --------------------------------------------------------------------------------------------------------------
def _as_tensor(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ShapeError(f"{name}: expected a torch.Tensor or numpy array of shape [n, ...], got {type(x).__name__}")
    if x.is_complex():
        raise ShapeError(f"{name}: expected real-valued features, got dtype {x.dtype}")
    return x


def _check_features(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """Validate features [n, ...] (n inputs, at least one feature each) and return them as a tensor."""
    x = _as_tensor(x, name)
    if x.ndim < 2:
        raise ShapeError(
            f"{name}: expected features of shape [n, ...] (one row per input), got shape {tuple(x.shape)}; "
            "for n scalar features pass x[:, None]"
        )
    if x.shape[0] == 0 or x[0].numel() == 0:
        raise ShapeError(f"{name}: expected at least one input and one feature, got shape {tuple(x.shape)}")
    return x


def _centred_features(x: torch.Tensor | np.ndarray, name: str = "x") -> torch.Tensor:
    """[n, ...] -> [n, d] float64 with the column mean subtracted (computed in float64)."""
    x = _check_features(x, name).detach()
    # a private float64 copy (never the caller's tensor), centred in place: two cheap passes, no extra buffer
    xc = x.reshape(x.shape[0], -1).to(dtype=torch.float64, copy=True)
    return xc.sub_(xc.mean(dim=0, keepdim=True))


def _check_pair(x: torch.Tensor, y: torch.Tensor, names: tuple[str, str] = ("x", "y")) -> None:
    if x.shape[0] != y.shape[0]:
        raise ShapeError(
            f"{names[0]} and {names[1]} must describe the same inputs (same first dimension n), got "
            f"{names[0]}.shape={tuple(x.shape)} and {names[1]}.shape={tuple(y.shape)}; pass features of the same "
            "batch, in the same order"
        )


def _check_n(n: int, estimator: str, what: str) -> None:
    need = _MIN_N[estimator]
    if n < need:
        hint = (
            "; use batches of at least 4 inputs (e.g. drop a short last batch) or estimator='biased'"
            if estimator == "unbiased"
            else "; pass at least 2 inputs"
        )
        raise ShapeError(f"{what}: the {estimator} HSIC estimator needs n >= {need} inputs, got n={n}{hint}")


def _check_gram(k: torch.Tensor | np.ndarray, name: str, finite: bool = True) -> torch.Tensor:
    k = _as_tensor(k, name)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ShapeError(
            f"{name}: expected a square Gram matrix [n, n], got shape {tuple(k.shape)}; "
            "build one with gram_linear(x) or gram_rbf(x)"
        )
    k = k.detach().to(torch.float64)
    if finite:
        check_finite(k, what=f"Gram matrix {name}", hint="check the features it was built from")
    return k


def _flat_rows(x: torch.Tensor) -> torch.Tensor:
    """[n, ...] -> [n, d] in whatever feature order the memory already has.

    A Gram matrix does not depend on the order of the feature columns, so a channels_last conv map
    [n, C, H, W] is flattened as [n, H, W, C] (a view) instead of being copied into NCHW order.
    """
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        x = x.permute(0, 2, 3, 1)
    return x.reshape(x.shape[0], -1)


def _resolve_gram_dtype(x: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """None ('auto'): float64 Grams for float64 features, float32 Grams for everything else."""
    if dtype is not None:
        return dtype
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _gram_linear(
    x: torch.Tensor | np.ndarray, name: str = "x", dtype: torch.dtype | None = torch.float64
) -> torch.Tensor:
    """Centred linear Gram [n, n], returned in float64.

    dtype=float64: centring and matmul in float64. dtype=float32: centring and matmul in float32, only the
    [n, n] result is promoted (half the matmul cost, no float64 copy of the features). dtype=None picks float32
    for float32/16 features and float64 for float64 ones. The centred float32 Gram stays within ~1e-9 of the
    float64 one in CKA terms: the batch mean is subtracted first (so no large offset cancels later) and any
    rounding in that mean is a constant shift, which both estimators ignore.
    """
    x = _check_features(x, name).detach()
    dtype = _resolve_gram_dtype(x, dtype)
    if dtype == torch.float64:
        xc = _flat_rows(x).to(dtype=torch.float64, copy=True)  # a private copy, centred in place
        xc.sub_(xc.mean(dim=0, keepdim=True))
        return xc @ xc.T
    x = _flat_rows(x).to(dtype)
    xc = x - x.mean(dim=0, keepdim=True)  # a correctly rounded difference: float32-accurate centred features
    return (xc @ xc.T).to(torch.float64)


def gram_linear(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Linear-kernel Gram matrix K = Xc Xc^T [n, n] in float64, of features x [n, ...] flattened to [n, d].

    Xc = X - mean(X) over the n rows. Centring does not change CKA (H K H is the same either way) but keeps
    float32 ReLU features with large offsets accurate.

    >>> gram_linear(torch.randn(8, 3, 4, 4)).shape
    torch.Size([8, 8])
    """
    k = _gram_linear(x)
    check_finite(k, what="the linear Gram matrix", hint="the features hold NaN or inf (or overflow float64)")
    return k


def _median(v: torch.Tensor) -> torch.Tensor:
    """numpy-style median of a 1-D tensor (mean of the two middle values for even length)."""
    m = v.numel()
    lo = torch.kthvalue(v, (m + 1) // 2).values
    if m % 2:
        return lo
    return (lo + torch.kthvalue(v, m // 2 + 1).values) / 2


def gram_rbf(x: torch.Tensor | np.ndarray, sigma: float = 0.8) -> torch.Tensor:
    """RBF-kernel Gram matrix K_ij = exp(-|x_i - x_j|^2 / (2 (sigma * m)^2)) [n, n] in float64.

    m^2 is the median of the squared pairwise distances over all n^2 entries (zero diagonal included), so
    ``sigma`` is a fraction of the median distance, as in Kornblith et al. (2019), whose experiments use 0.8.
    With a data-relative bandwidth, RBF CKA is invariant to isotropic scaling.

    >>> gram_rbf(torch.randn(8, 5), sigma=0.8).diagonal().tolist() == [1.0] * 8
    True
    """
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise LayerlabError(f"sigma: expected a positive fraction of the median distance (e.g. 0.8), got {sigma!r}")
    xc = _centred_features(x, "x")
    sq = (xc * xc).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (xc @ xc.T)).clamp_min_(0.0)
    d2.diagonal().zero_()
    check_finite(d2, what="the pairwise distances", hint="the features hold NaN or inf (or overflow float64)")
    med = float(_median(d2.reshape(-1)))
    if med <= 0.0:
        raise DataError(
            f"gram_rbf: the median squared pairwise distance of the {xc.shape[0]} inputs is 0 (more than half the "
            "pairs are identical), so the bandwidth is undefined; remove duplicate inputs or use gram_linear"
        )
    return torch.exp(d2 / (-2.0 * sigma * sigma * med))


# --------------------------------------------------------------------------------------------------------------
# the pure core: _hsic_update / _cka_compute
# --------------------------------------------------------------------------------------------------------------
def _centre_grams(grams: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """Centre a stack of Gram matrices [L, n, n] (float64, consumed in place) for the chosen estimator.

    unbiased: U-centring. K~ = K with zero diagonal, s = K~ 1, r_i = s_i/(n-2) - sum(s)/(2(n-1)(n-2)),
    U_ij = K~_ij - r_i - r_j off the diagonal, 0 on it; then HSIC_1(K, L) = <U(K), U(L)> / (n(n-3)).
    biased: double centring H K H (row and column means removed); HSIC_0(K, L) = <HKH, HLH> / (n-1)^2.
    """
    n = grams.shape[-1]
    if unbiased:
        grams.diagonal(dim1=-2, dim2=-1).zero_()
        s = grams.sum(dim=-1)
        r = s / (n - 2) - s.sum(dim=-1, keepdim=True) / (2.0 * (n - 1) * (n - 2))
        grams.sub_(r[..., :, None]).sub_(r[..., None, :])
        grams.diagonal(dim1=-2, dim2=-1).zero_()
    else:
        row = grams.mean(dim=-1, keepdim=True)
        col = grams.mean(dim=-2, keepdim=True)
        total = grams.mean(dim=(-2, -1), keepdim=True)
        grams.sub_(row).sub_(col).add_(total)
    return grams


def _hsic_update(
    grams_a: torch.Tensor, grams_b: torch.Tensor | None, unbiased: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of Gram matrices -> (HSIC_ab [La, Lb], HSIC_aa [La], HSIC_bb [Lb]) in float64.

    grams_a [La, n, n] and grams_b [Lb, n, n] (or None for self-similarity, which reuses grams_a) are float64
    and are overwritten. Each layer's centred Gram is flattened into one row of G, so every pair's HSIC comes from
    one matrix product G_a G_b^T.
    """
    n = grams_a.shape[-1]
    norm = float(n * (n - 3)) if unbiased else float((n - 1) ** 2)
    ga = _centre_grams(grams_a, unbiased).reshape(grams_a.shape[0], -1)
    if grams_b is None:
        ab = (ga @ ga.T) / norm
        aa = ab.diagonal().clone()
        return ab, aa, aa.clone()
    gb = _centre_grams(grams_b, unbiased).reshape(grams_b.shape[0], -1)
    ab = (ga @ gb.T) / norm
    aa = (ga * ga).sum(dim=1) / norm
    bb = (gb * gb).sum(dim=1) / norm
    return ab, aa, bb


def _cka_compute(hsic_ab: torch.Tensor, hsic_aa: torch.Tensor, hsic_bb: torch.Tensor) -> torch.Tensor:
    """CKA_ij = HSIC_ab[i, j] / sqrt(HSIC_aa[i] HSIC_bb[j]); NaN where a representation has zero variance.

    Leading dimensions broadcast (HSIC_ab [..., La, Lb], HSIC_aa [..., La], HSIC_bb [..., Lb]), so a stack of
    resampled sums is turned into CKA in one call."""
    denom = torch.sqrt(hsic_aa[..., :, None].clamp_min(0.0) * hsic_bb[..., None, :].clamp_min(0.0))
    out = hsic_ab / denom
    return torch.where(denom > 0, out, torch.full_like(out, float("nan")))


def _scalar_cka(k: torch.Tensor, l: torch.Tensor, unbiased: bool) -> float:
    ab, aa, bb = _hsic_update(k[None], l[None], unbiased)
    return float(_cka_compute(ab, aa, bb)[0, 0])


# --------------------------------------------------------------------------------------------------------------
# functional API
# --------------------------------------------------------------------------------------------------------------
def _estimator(unbiased: bool) -> str:
    return "unbiased" if unbiased else "biased"


def hsic_biased(K: torch.Tensor | np.ndarray, L: torch.Tensor | np.ndarray) -> float:
    """Biased HSIC_0(K, L) = tr(K H L H) / (n - 1)^2 of two Gram matrices [n, n] (Gretton et al. 2005)."""
    k, l = _check_gram(K, "K"), _check_gram(L, "L")
    _check_pair(k, l, ("K", "L"))
    _check_n(k.shape[0], "biased", "hsic_biased")
    ab, _, _ = _hsic_update(k[None].clone(), l[None].clone(), unbiased=False)
    return float(ab[0, 0])


def hsic_unbiased(K: torch.Tensor | np.ndarray, L: torch.Tensor | np.ndarray) -> float:
    """Unbiased HSIC_1(K, L) = <U(K), U(L)> / (n (n - 3)) of two Gram matrices [n, n], n >= 4.

    This U-centred form equals Song et al. (2012)'s
    [tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3)) (K~, L~: zero diagonal)
    without its cancelling large terms.
    """
    k, l = _check_gram(K, "K"), _check_gram(L, "L")
    _check_pair(k, l, ("K", "L"))
    _check_n(k.shape[0], "unbiased", "hsic_unbiased")
    ab, _, _ = _hsic_update(k[None].clone(), l[None].clone(), unbiased=True)
    return float(ab[0, 0])


def cka_from_grams(K: torch.Tensor | np.ndarray, L: torch.Tensor | np.ndarray, unbiased: bool = False) -> float:
    """CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) of two Gram matrices [n, n], with HSIC_1 or HSIC_0."""
    k, l = _check_gram(K, "K"), _check_gram(L, "L")
    _check_pair(k, l, ("K", "L"))
    _check_n(k.shape[0], _estimator(unbiased), "cka_from_grams")
    return _scalar_cka(k.clone(), l.clone(), unbiased)


def linear_cka(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, *, unbiased: bool = False) -> float:
    """Linear CKA of features x [n, ...] and y [n, ...] (flattened to [n, d]), computed in float64.

    biased (default): Kornblith et al. (2019), ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F).
    unbiased: with HSIC_1 (Nguyen et al. 2021), n >= 4. CKA(X, X) = 1; invariant to orthogonal transforms and
    isotropic scaling of either argument.

    >>> x = torch.randn(64, 10)
    >>> round(linear_cka(x, 3.0 * x @ torch.linalg.qr(torch.randn(10, 10))[0]), 6)
    1.0
    """
    x, y = _check_features(x, "x"), _check_features(y, "y")
    _check_pair(x, y)
    _check_n(x.shape[0], _estimator(unbiased), "linear_cka")
    return _scalar_cka(gram_linear(x), gram_linear(y), unbiased)


def rbf_cka(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    *,
    sigma: float = 0.8,
    unbiased: bool = False,
) -> float:
    """RBF-kernel CKA of x [n, ...] and y [n, ...], bandwidth ``sigma`` x the median pairwise distance (float64).

    Kornblith et al. (2019). CKA(X, X) = 1; invariant to orthogonal transforms and isotropic scaling.

    >>> x = torch.randn(32, 5)
    >>> round(rbf_cka(x, 2.0 * x), 6)
    1.0
    """
    x, y = _check_features(x, "x"), _check_features(y, "y")
    _check_pair(x, y)
    _check_n(x.shape[0], _estimator(unbiased), "rbf_cka")
    return _scalar_cka(gram_rbf(x, sigma), gram_rbf(y, sigma), unbiased)

