"""Centred kernel alignment (CKA): a pure functional core and a streaming all-pairs accumulator.

CKA (Kornblith, Norouzi, Lee, Hinton 2019, "Similarity of Neural Network Representations Revisited") compares
two representations X [n, d1] and Y [n, d2] of the same n inputs through their Gram matrices K and L:

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) * HSIC(L, L))

with two HSIC estimators:

* biased (Gretton et al. 2005):  HSIC_0(K, L) = tr(K H L H) / (n - 1)^2,  H = I - 11^T / n;
* unbiased (Song et al. 2012), in its U-centred form (Szekely & Rizzo 2014):
  HSIC_1(K, L) = <U(K), U(L)> / (n (n - 3)), where U zeroes the diagonal and removes row/column effects.

Minibatch CKA (Nguyen, Raghu, Kornblith 2021, "Do Wide and Deep Networks Learn the Same Things?") sums HSIC_1
over batches before taking the ratio; it estimates the same population quantity as full-N unbiased CKA, so it
does not depend on the batch size beyond sampling noise. The biased estimator summed over batches *does* depend on
the batch size; with a single batch of all N inputs it is Kornblith's full-N CKA. Full-N biased and minibatch
unbiased CKA differ by up to 0.57 on a ResNet-18 (METHODS.md section 2): always report which one you used.

Numerics: linear features are centred (their batch mean subtracted) before the Gram matrix is formed, and
U-centring, HSIC and all sums run in float64; the accumulator's Gram matmul runs in the features' precision (at
least float32, see ``CKAAccumulator``), the functional API's in float64. Centring leaves both estimators
unchanged mathematically and removes the cancellation that makes the textbook formula on uncentred float32 ReLU
features lose several hundredths or return NaN.

Layout (torchmetrics habit): ``_hsic_update`` reduces a batch of Gram matrices to HSIC sums, ``_cka_compute``
turns sums into CKA; the functional API and :class:`CKAAccumulator` call the same two functions.

Return types: scalar functions (``linear_cka``, ``rbf_cka``, ``hsic_*``, ``cka_from_grams``) return a Python
``float`` and are not differentiable; ``gram_*`` return float64 tensors; ``CKAAccumulator.compute`` returns a
float64 CPU tensor. A representation with zero variance gives CKA = NaN (0 / 0), as in Kornblith et al.'s code.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from .errors import DataError, LayerlabError, NonFiniteError, ShapeError, check_finite

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "CKAAccumulator",
    "cka_from_grams",
    "gram_linear",
    "gram_rbf",
    "hsic_biased",
    "hsic_unbiased",
    "linear_cka",
    "rbf_cka",
]

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
    """CKA_ij = HSIC_ab[i, j] / sqrt(HSIC_aa[i] HSIC_bb[j]); NaN where a representation has zero variance."""
    denom = torch.sqrt(hsic_aa[:, None].clamp_min(0.0) * hsic_bb[None, :].clamp_min(0.0))
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


# --------------------------------------------------------------------------------------------------------------
# streaming accumulator
# --------------------------------------------------------------------------------------------------------------
TensorGroup = Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


class CKAAccumulator:
    """All-pairs CKA between n_a layers (model A) and n_b layers (model B), streamed over batches.

    Each :meth:`update` turns every layer's batch of features into its b x b Gram matrix (float64, linear
    features mean-centred), centres it (U-centring for the unbiased estimator, H K H for the biased one), and adds
    G_a G_b^T, diag(G_a G_a^T), diag(G_b G_b^T) to float64 sums, with G the stacked flattened centred Grams.
    Memory is O(L b^2): it depends neither on the layer widths nor on the number of inputs N.

    ``estimator='unbiased'`` (default) is minibatch CKA (Nguyen et al. 2021): sum_k HSIC_1(K_k, L_k) /
    sqrt(sum_k HSIC_1(K_k, K_k) sum_k HSIC_1(L_k, L_k)) over batches k; it does not depend on the batch size
    beyond sampling noise. Batches should have equal size (each batch gets equal weight), and at least 4 inputs.
    ``estimator='biased'`` sums the per-batch biased HSIC_0 the same way: this DEPENDS on the batch size (it
    is biased towards higher values for small batches); with one update of all N inputs it equals Kornblith et
    al.'s full-N CKA. ``kernel='rbf'`` takes its bandwidth from each batch's median distance.

    ``gram_dtype`` (linear kernel) sets the precision of the per-layer Gram matmul only; U-centring and all sums
    are float64 whatever it is. ``None`` (default, "auto") uses float32 for float32/16 features and float64 for
    float64 features: the features are mean-centred in float32 first, so the float32 Gram stays within ~2e-9 of
    the all-float64 result on ResNet-18 features (benchmarks/cka.py; tested to 1e-6 on offset ReLU features) at
    half the matmul cost and without a float64 copy of every activation. ``torch.float64`` forces float64.

    ``n_b=None`` means self-similarity: one group of features per update, Grams shared by both sides.
    Features may be given as a sequence (ordered like ``names_*``) or a mapping name -> tensor.

    >>> acc = CKAAccumulator(2, names_a=["x", "x2"])
    >>> for _ in range(4):
    ...     x = torch.randn(32, 8)
    ...     acc.update({"x": x, "x2": 2 * x})
    >>> acc.compute().shape
    torch.Size([2, 2])
    """

    def __init__(
        self,
        n_a: int,
        n_b: int | None = None,
        *,
        kernel: Kernel = "linear",
        estimator: Estimator = "unbiased",
        sigma: float = 0.8,
        names_a: Sequence[str] | None = None,
        names_b: Sequence[str] | None = None,
        gram_dtype: torch.dtype | None = None,
    ) -> None:
        if kernel not in _KERNELS:
            raise LayerlabError(f"kernel: expected one of {_KERNELS}, got {kernel!r}")
        if estimator not in _ESTIMATORS:
            raise LayerlabError(f"estimator: expected one of {_ESTIMATORS}, got {estimator!r}")
        for label, count in (("n_a", n_a), ("n_b", n_b)):
            if count is not None and (not isinstance(count, int) or count < 1):
                raise LayerlabError(f"{label}: expected a positive number of layers, got {count!r}")
        if n_b is None and names_b is not None:
            raise LayerlabError("names_b given without n_b: pass n_b=len(names_b) to compare two models")
        self.n_a = n_a
        self.n_b = n_b
        self.self_similarity = n_b is None
        self.kernel: str = kernel
        self.estimator: str = estimator
        if gram_dtype not in (None, torch.float64, torch.float32):
            raise LayerlabError(
                f"gram_dtype: expected None (auto: float32 for float32 features), torch.float32 or torch.float64, "
                f"got {gram_dtype!r}"
            )
        if gram_dtype == torch.float32 and kernel != "linear":
            raise LayerlabError(
                "gram_dtype=torch.float32 applies to the linear kernel only (RBF distances need float64); "
                "drop gram_dtype or use kernel='linear'"
            )
        self.sigma = sigma
        self.gram_dtype = gram_dtype
        self.names_a = self._check_names(names_a, n_a, "names_a")
        self.names_b = self.names_a if n_b is None else self._check_names(names_b, n_b, "names_b")
        self.reset()

    @staticmethod
    def _check_names(names: Sequence[str] | None, n: int, label: str) -> list[str] | None:
        if names is None:
            return None
        names = [str(s) for s in names]
        if len(names) != n:
            raise ShapeError(f"{label}: expected {n} names, got {len(names)}: {names}")
        if len(set(names)) != n:
            raise ShapeError(f"{label}: layer names must be unique, got {names}")
        return names

    def reset(self) -> None:
        """Forget all accumulated batches."""
        self._ab: torch.Tensor | None = None
        self._aa: torch.Tensor | None = None
        self._bb: torch.Tensor | None = None
        self.n_samples = 0
        self.n_batches = 0
        self.batch_sizes: set[int] = set()
        self.gram_dtypes: set[str] = set()  # precisions of the Gram matmuls run by gram() (for to_frame)

    # -- inputs ---------------------------------------------------------------------------------------------
    def gram(self, x: torch.Tensor) -> torch.Tensor:
        """This accumulator's kernel Gram matrix [b, b] (float64) of one layer's batch x [b, ...].

        Use it inside a forward hook (``Extractor(..., transform=acc.gram)``) so that only b x b matrices, never
        the full activations, outlive the layer; then call :meth:`update_grams`.
        """
        # finiteness is checked once per update on the HSIC sums (a NaN or inf anywhere reaches them)
        if self.kernel == "linear":
            x = _as_tensor(x, "x")  # validated once, inside _gram_linear
            dtype = _resolve_gram_dtype(x, self.gram_dtype)
            self.gram_dtypes.add(str(dtype).removeprefix("torch."))
            return _gram_linear(x, dtype=dtype)
        self.gram_dtypes.add("float64")
        return gram_rbf(x, self.sigma)

    def _ordered(self, group: TensorGroup | None, side: str) -> list[torch.Tensor]:
        expected = self.n_a if side == "a" else self.n_b
        if group is None:
            raise ShapeError(f"feats_{side}: expected {expected} tensors, got None")
        if isinstance(group, torch.Tensor):
            raise ShapeError(
                f"feats_{side}: expected a sequence or mapping of {expected} per-layer tensors, got one tensor of "
                f"shape {tuple(group.shape)}; wrap a single layer as [x]"
            )
        if isinstance(group, Mapping):
            keys = [str(k) for k in group]
            names = self.names_a if side == "a" else self.names_b
            if names is None:
                names = self._check_names(keys, expected, f"feats_{side} keys")
                if side == "a":
                    self.names_a = names
                    if self.self_similarity:
                        self.names_b = names
                else:
                    self.names_b = names
            if set(keys) != set(names):
                missing = sorted(set(names) - set(keys))
                extra = sorted(set(keys) - set(names))
                raise ShapeError(
                    f"feats_{side}: the layer names changed between updates; missing {missing}, unexpected {extra}"
                )
            return [group[k] for k in names]
        tensors = list(group)
        if len(tensors) != expected:
            raise ShapeError(
                f"feats_{side}: expected {expected} per-layer tensors (n_{side}={expected}), got {len(tensors)}"
            )
        return tensors

    def _stack(self, tensors: list[torch.Tensor], side: str, as_grams: bool) -> torch.Tensor:
        grams = []
        for i, t in enumerate(tensors):
            label = f"feats_{side}[{i}]"
            t = _as_tensor(t, label)
            grams.append(_check_gram(t, label, finite=False) if as_grams else self.gram(t))
        sizes = {g.shape[0] for g in grams}
        if len(sizes) != 1:
            raise ShapeError(
                f"feats_{side}: all layers of one update must hold the same batch of inputs; got batch sizes "
                f"{[g.shape[0] for g in grams]}"
            )
        return torch.stack(grams)

    def update(self, feats_a: TensorGroup, feats_b: TensorGroup | None = None) -> None:
        """Add one batch: per-layer features [b, ...] of model A (and model B, unless self-similarity)."""
        self._update(feats_a, feats_b, as_grams=False)

    def update_grams(self, grams_a: TensorGroup, grams_b: TensorGroup | None = None) -> None:
        """Add one batch given each layer's (uncentred) kernel Gram matrix [b, b], e.g. from :meth:`gram`."""
        self._update(grams_a, grams_b, as_grams=True)

    def _update(self, group_a: TensorGroup, group_b: TensorGroup | None, as_grams: bool) -> None:
        if self.self_similarity and group_b is not None:
            raise ShapeError(
                "feats_b given to a self-similarity accumulator (n_b=None); create CKAAccumulator(n_a, n_b) to "
                "compare two models"
            )
        ka = self._stack(self._ordered(group_a, "a"), "a", as_grams)
        kb = None if self.self_similarity else self._stack(self._ordered(group_b, "b"), "b", as_grams)
        n = ka.shape[-1]
        if kb is not None and kb.shape[-1] != n:
            raise ShapeError(
                f"feats_a and feats_b must hold the same batch of inputs, got batch sizes {n} and {kb.shape[-1]}"
            )
        _check_n(n, self.estimator, "CKAAccumulator.update")
        ab, aa, bb = _hsic_update(ka, kb, self.estimator == "unbiased")
        if not bool(torch.isfinite(ab).all()):  # one check per batch instead of one per layer
            self._raise_non_finite(ka, kb)
        if self._ab is None:
            self._ab, self._aa, self._bb = ab, aa, bb
        else:
            self._ab += ab.to(self._ab.device)
            self._aa += aa.to(self._aa.device)
            self._bb += bb.to(self._bb.device)
        self.n_samples += n
        self.n_batches += 1
        self.batch_sizes.add(n)

    def _raise_non_finite(self, ka: torch.Tensor, kb: torch.Tensor | None) -> None:
        bad = []
        for side, stack, names in (("a", ka, self.names_a), ("b", kb, self.names_b)):
            if stack is None:
                continue
            finite = torch.isfinite(stack.reshape(stack.shape[0], -1)).all(dim=1).tolist()
            bad += [f"{side}:{names[i] if names else i}" for i, ok in enumerate(finite) if not ok]
        raise NonFiniteError(
            f"CKAAccumulator.update: the Gram matrices of layers {bad or 'unknown'} hold NaN or inf (the batch was "
            "not added); check those features for NaN/inf or float64 overflow"
        )

    # -- outputs --------------------------------------------------------------------------------------------
    @property
    def gram_precision(self) -> str:
        """Precision of the Gram matmuls :meth:`gram` ran: "float32", "float64", both joined by "+", or "given"
        when every Gram came from the caller through :meth:`update_grams`."""
        return "+".join(sorted(self.gram_dtypes)) or "given"

    def compute(self) -> torch.Tensor:
        """CKA matrix [n_a, n_b] (float64, CPU) over all batches so far; symmetric for self-similarity."""
        if self._ab is None:
            raise LayerlabError("CKAAccumulator.compute: no batch has been added yet; call update() first")
        return _cka_compute(self._ab, self._aa, self._bb).cpu()

    def to_frame(self) -> "pd.DataFrame":
        """Tidy table, one row per layer pair: layer_a, layer_b, cka, estimator, kernel, n, n_batches, gram_dtype.

        ``n`` is the number of inputs seen; ``n_batches`` tells minibatch estimates (> 1) from full-N ones (1).
        ``gram_dtype`` is :attr:`gram_precision`.
        """
        import pandas as pd

        cka = self.compute().numpy()
        names_a = self.names_a or [str(i) for i in range(self.n_a)]
        names_b = self.names_b or [str(j) for j in range(cka.shape[1])]
        rows = [
            (a, b, float(cka[i, j]))
            for i, a in enumerate(names_a)
            for j, b in enumerate(names_b)
        ]
        frame = pd.DataFrame(rows, columns=["layer_a", "layer_b", "cka"])
        frame["estimator"] = self.estimator
        frame["kernel"] = self.kernel
        frame["n"] = self.n_samples
        frame["n_batches"] = self.n_batches
        frame["gram_dtype"] = self.gram_precision
        return frame

    def __repr__(self) -> str:
        shape = f"{self.n_a}x{self.n_a if self.n_b is None else self.n_b}"
        return (
            f"CKAAccumulator({shape}, kernel={self.kernel!r}, estimator={self.estimator!r}, "
            f"n={self.n_samples}, batches={self.n_batches})"
        )
