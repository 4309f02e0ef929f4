"""Linear probes: a softmax (or ridge) classifier on frozen features, fitted in a fraction of a second.

A probe asks how linearly decodable the classes are from one layer's features (Alain & Bengio 2016); Sharon &
Dar (2024) fit one per (layer, checkpoint) to follow a layer's representation over training (METHODS.md section 2).

Two fitting methods, one registry (``PROBE_METHODS``), both on features standardised with the training set's
mean and standard deviation (features of zero variance keep scale 1), in float64:

* ``"softmax"`` (default): multinomial logistic regression, minimising

      mean_i CE(W^T z_i + b, y_i) + l2 / 2 * ||W||_F^2        (the bias is not penalised)

  with L-BFGS (strong-Wolfe line search) from zero. This is scikit-learn's ``LogisticRegression(C=1 / (l2 * n))``
  on the standardised features, the same objective and hence the same unique optimum. It runs until the largest
  gradient entry is at most ``tol`` (default 1e-6: converged) or ``max_iter`` iterations (default 1000: the cap).
  Every fit records its iteration count and whether it converged (:attr:`ProbeParams.iterations`,
  :attr:`ProbeParams.converged`); a fit that stops unconverged warns (:class:`ProbeConvergenceWarning`), because an
  unconverged probe under-reports accuracy (measured on the demo: 0.5275 at a cap of 50 vs 0.5440 converged).
* ``"ridge"``: closed-form least squares to one-hot targets, ``W = (Z^T Z + l2 n I)^-1 Z^T (Y - mean(Y))``
  (the dual ``Z^T (Z Z^T + l2 n I)^-1 (Y - mean(Y))`` when there are more features than samples), ``b = mean(Y)``.
  One solve; no iterations.

Layout (the torchmetrics habit): pure functions (:func:`standardiser`, :func:`fit_probe`, :func:`probe_logits`)
over an immutable :class:`ProbeParams`, and :class:`LinearProbe` as a thin fit/predict/score wrapper.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple


import numpy as np
import torch
import torch.nn.functional as F

from . import runtime
from .errors import LayerlabError, ShapeError, check_finite, warn
from .registry import Registry

__all__ = ["DEFAULT_MAX_ITER", "DEFAULT_TOL", "LinearProbe", "PROBE_METHODS", "ProbeConvergenceWarning", "ProbeFit",
           "ProbeParams", "fit_probe", "probe_logits", "standardiser", "warn_unconverged"]

#: L-BFGS defaults of the softmax probe: stop when max |gradient| <= DEFAULT_TOL, at most DEFAULT_MAX_ITER iterations
DEFAULT_TOL = 1e-6
DEFAULT_MAX_ITER = 1000


class ProbeConvergenceWarning(UserWarning):
    """A softmax probe stopped before its gradient reached the tolerance (usually at the iteration cap)."""


class ProbeFit(NamedTuple):
    """What a fitting method returns: weight [d, C], bias [C] (float64), iterations run, and convergence."""

    weight: torch.Tensor
    bias: torch.Tensor
    iterations: int
    converged: bool
    grad_max: float  # largest |gradient| entry of the objective at the returned point (0 for closed forms)


Fitter = Callable[[torch.Tensor, torch.Tensor, int, float, int, float], ProbeFit]
PROBE_METHODS: Registry[Fitter] = Registry("probe method")


@dataclass(frozen=True)
class ProbeParams:
    """A fitted probe. ``logits(x) = ((x - mean) / scale) @ weight + bias``; all float64 [D], [D], [D, C], [C].

    ``fold()`` gives the same map as one affine layer (weight / scale, bias - (mean / scale) @ weight) for fast
    prediction in the features' own dtype. ``iterations``: L-BFGS iterations run (0 for the closed-form ridge);
    ``converged``: the final max |gradient| (``grad_max``) is at most the tolerance ``tol``; ``max_iter``: the cap.
    """

    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    method: str
    l2: float
    iterations: int = 0
    converged: bool = True
    max_iter: int = DEFAULT_MAX_ITER
    tol: float = DEFAULT_TOL
    grad_max: float = 0.0

    @property
    def hit_cap(self) -> bool:
        """True when the fit ran out of iterations (``iterations == max_iter``) without converging."""
        return not self.converged and self.iterations >= self.max_iter

    @property
    def dim(self) -> int:
        return int(self.weight.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[1])

    def fold(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(W', b') with ``logits = x @ W' + b'``, cast to ``dtype`` on ``device``."""
        w = self.weight / self.scale[:, None]
        b = self.bias - (self.mean / self.scale) @ self.weight
        return w.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------- validation
def _as_features(x: torch.Tensor | np.ndarray, name: str = "features") -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ShapeError(f"{name}: expected a tensor or array of shape [n, d], got {type(x).__name__}")
    if x.ndim != 2:
        raise ShapeError(
            f"{name}: expected features of shape [n, d] (one row per input), got shape {tuple(x.shape)}; "
            "flatten them with x.reshape(len(x), -1)"
        )
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ShapeError(f"{name}: expected at least one input and one feature, got shape {tuple(x.shape)}")
    return x


def _as_labels(y: torch.Tensor | np.ndarray, n: int) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    if y.ndim != 1 or y.shape[0] != n:
        raise ShapeError(f"labels: expected integer class labels of shape [{n}] (one per feature row), got shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ShapeError(f"labels: expected integer class labels, got dtype {y.dtype}")
    if int(y.min()) < 0:
        raise ShapeError(f"labels: class labels must be >= 0, got {int(y.min())}")
    return y.long()


# ----------------------------------------------------------------------------------------------- pure core
def standardiser(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, scale) of features [n, d] in float64; scale = population std, or 1 where a feature is constant."""
    x = x.double()
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    tiny = 1e-12 * max(1.0, float(mean.abs().max()))
    return mean, torch.where(std > tiny, std, torch.ones_like(std))


@PROBE_METHODS.register("ridge")
def _fit_ridge(z: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int, tol: float) -> ProbeFit:
    """Closed-form ridge to one-hot targets on centred, standardised z [n, d] (float64); no iterations."""
    n, d = z.shape
    targets = F.one_hot(y, num_classes).double()
    bias = targets.mean(dim=0)
    t = targets - bias
    lam = max(l2, 1e-10) * n
    if d <= n:
        gram = z.T @ z
        gram.diagonal().add_(lam)
        weight = torch.linalg.solve(gram, z.T @ t)
    else:
        gram = z @ z.T
        gram.diagonal().add_(lam)
        weight = z.T @ torch.linalg.solve(gram, t)
    return ProbeFit(weight, bias, 0, True, 0.0)


@PROBE_METHODS.register("softmax")
def _fit_softmax(z: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int, tol: float) -> ProbeFit:
    """Multinomial logistic regression by L-BFGS in float64: mean CE + l2/2 ||W||^2 (bias unpenalised).

    Stops when max |gradient| <= ``tol`` or after ``max_iter`` iterations; converged means the gradient test holds
    at the returned point (checked after the run, whatever made L-BFGS stop).
    """
    d = z.shape[1]
    weight = torch.zeros(d, num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    # max_eval well above max_iter, so the iteration count (recorded and capped) is what binds, not line-search calls
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=4 * max_iter, history_size=20,
                            tolerance_grad=tol, tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight + bias, y) + 0.5 * l2 * (weight * weight).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
        closure()  # the gradient at the returned point
    grad_max = float(torch.maximum(weight.grad.abs().max(), bias.grad.abs().max()))
    iterations = int(opt.state[weight].get("n_iter", 0))
    return ProbeFit(weight.detach(), bias.detach(), iterations, grad_max <= tol, grad_max)


def _one_thread() -> Any:
    """Run many tiny float64 ops on one intra-op thread: L-BFGS on a [n, d] x [d, C] problem is dominated by
    thread synchronisation otherwise (measured 60x slower with 2 threads on a busy 2-core machine)."""
    return runtime.threads(1)


def fit_probe(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    *,
    num_classes: int | None = None,
    method: str = "softmax",
    l2: float = 1e-3,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    warn: bool = True,
) -> ProbeParams:
    """Fit a linear probe on features x [n, d] with integer labels y [n]; returns the frozen :class:`ProbeParams`.

    ``method``: a name in ``PROBE_METHODS`` ("softmax" or "ridge"); ``l2``: the penalty per sample (see the
    module docstring); ``max_iter``: the cap on L-BFGS iterations and ``tol``: the convergence test (max |gradient|
    of the objective) for "softmax" (both ignored by "ridge"). The result records ``iterations`` and ``converged``;
    with ``warn`` an unconverged fit raises a one-line :class:`ProbeConvergenceWarning` (callers fitting many probes
    pass ``warn=False`` and report them together with :func:`warn_unconverged`).

    >>> x = torch.randn(200, 5); y = (x[:, 0] > 0).long()
    >>> p = fit_probe(x, y)
    >>> p.weight.shape, p.converged
    (torch.Size([5, 2]), True)
    """
    fitter = PROBE_METHODS.get(method)
    x = _as_features(x, "x")
    y = _as_labels(y, x.shape[0])
    if l2 < 0:
        raise LayerlabError(f"l2: expected a penalty >= 0, got {l2}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise LayerlabError(f"max_iter: expected a positive number of L-BFGS iterations, got {max_iter!r}")
    if not tol > 0:
        raise LayerlabError(f"tol: expected a gradient tolerance > 0, got {tol!r}")
    k = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if int(y.max()) >= k:
        raise ShapeError(f"labels: found class {int(y.max())} but num_classes={k}; pass num_classes > max label")
    if k < 2:
        raise LayerlabError(f"a probe needs at least 2 classes, got num_classes={k}")
    check_finite(x, what="probe features", hint="the layer's activations overflowed; check the checkpoint")
    xd = x.detach().to("cpu", torch.float64)
    with _one_thread():
        mean, scale = standardiser(xd)
        fit = fitter((xd - mean) / scale, y.cpu(), k, float(l2), max_iter, float(tol))
    params = ProbeParams(mean, scale, fit.weight, fit.bias, method, float(l2), fit.iterations, bool(fit.converged),
                         max_iter, float(tol), fit.grad_max)
    if warn:
        warn_unconverged([params])
    return params


def warn_unconverged(fits: Sequence[ProbeParams], what: str = "linear probe", stacklevel: int | None = None) -> int:
    """One :class:`ProbeConvergenceWarning` line for every unconverged fit among ``fits``; returns their number.
    The warning points at the caller's own line (``stacklevel`` is accepted and ignored: :func:`errors.warn`)."""
    bad = [p for p in fits if not p.converged]
    if bad:
        capped = sum(p.hit_cap for p in bad)
        worst = max(bad, key=lambda p: p.grad_max)
        caps = sorted({p.max_iter for p in bad})
        warn(
            f"{what}: {len(bad)} of {len(fits)} L-BFGS fit(s) did not converge ({capped} stopped at the iteration cap "
            f"max_iter={'/'.join(map(str, caps))}; worst max |gradient| {worst.grad_max:.1e} > tol {worst.tol:g}); "
            "their accuracies are biased low: raise the iteration cap (probe_iter / max_iter)",
            ProbeConvergenceWarning,
        )
    return len(bad)


def probe_logits(params: ProbeParams, x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Probe logits [n, C] (float64) of features x [n, d]."""
    x = _as_features(x, "x")
    if x.shape[1] != params.dim:
        raise ShapeError(f"x: the probe was fitted on {params.dim} features, got {x.shape[1]} (shape {tuple(x.shape)})")
    return ((x.detach().to("cpu", torch.float64) - params.mean) / params.scale) @ params.weight + params.bias


# -------------------------------------------------------------------------------------------- stateful skin
class LinearProbe:
    """fit / predict / score around :func:`fit_probe` (sklearn-style).

    >>> x = torch.randn(300, 4); y = (x[:, 0] + x[:, 1] > 0).long()
    >>> LinearProbe().fit(x, y).score(x, y) > 0.95
    True
    """

    def __init__(self, method: str = "softmax", l2: float = 1e-3, max_iter: int = DEFAULT_MAX_ITER,
                 tol: float = DEFAULT_TOL) -> None:
        PROBE_METHODS.get(method)  # fail early on a typo
        self.method, self.l2, self.max_iter, self.tol = method, l2, max_iter, tol
        self.params: ProbeParams | None = None

    def fit(self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, num_classes: int | None = None) -> "LinearProbe":
        self.params = fit_probe(x, y, num_classes=num_classes, method=self.method, l2=self.l2, max_iter=self.max_iter,
                                tol=self.tol)
        return self

    def _fitted(self) -> ProbeParams:
        if self.params is None:
            raise LayerlabError("this LinearProbe is not fitted yet; call .fit(features, labels) first")
        return self.params

    def decision_function(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Logits [n, C] (float64)."""
        return probe_logits(self._fitted(), x)

    def predict_proba(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        return torch.softmax(self.decision_function(x), dim=1)

    def predict(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        return self.decision_function(x).argmax(dim=1)

    def score(self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
        """Top-1 accuracy on (x, y)."""
        x = _as_features(x, "x")
        y = _as_labels(y, x.shape[0])
        return float((self.predict(x) == y.cpu()).double().mean())

    def __repr__(self) -> str:
        state = f"dim={self.params.dim}, classes={self.params.num_classes}" if self.params is not None else "unfitted"
        return f"LinearProbe(method={self.method!r}, l2={self.l2}, {state})"
