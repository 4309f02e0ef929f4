"""Linear probes (layerlab.probes): separable data, agreement with scikit-learn, ridge algebra, bad input."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from layerlab.errors import LayerlabError, ShapeError, SpecError
from layerlab.probes import LinearProbe, ProbeConvergenceWarning, fit_probe, probe_logits, standardiser

torch.set_num_threads(1)


def _blobs(n_per: int, d: int, k: int, sep: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g, dtype=torch.float64) * sep
    y = torch.arange(k).repeat_interleave(n_per)
    x = centres[y] + torch.randn(k * n_per, d, generator=g, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("method", ["softmax", "ridge"])
def test_linearly_separable_features_reach_100_percent(method: str) -> None:
    x, y = _blobs(40, 6, 5, sep=12.0)
    x = x * torch.tensor([1e-3, 1.0, 50.0, 1.0, 1.0, 1e3], dtype=torch.float64) + 7.0  # badly scaled on purpose
    probe = LinearProbe(method).fit(x.float(), y)
    assert probe.score(x.float(), y) == 1.0
    assert probe.predict(x.float()).tolist() == y.tolist()


def test_softmax_probe_agrees_with_sklearn_logistic_regression() -> None:
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(1)
    n, d, k, l2 = 240, 7, 4, 1e-2
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 4.0, d, dtype=torch.float64) + 2.0
    w = torch.randn(d, k, generator=g, dtype=torch.float64)
    y = (x @ w + 0.7 * torch.randn(n, k, generator=g, dtype=torch.float64)).argmax(1)
    params = fit_probe(x, y, l2=l2, max_iter=300)
    # the same objective: mean CE + l2/2 |W|^2 on standardised features == sklearn's C = 1 / (l2 n)
    z = ((x - x.mean(0)) / x.std(0, unbiased=False)).numpy()
    sk = LogisticRegression(C=1.0 / (l2 * n), tol=1e-10, max_iter=10_000).fit(z, y.numpy())
    ours = torch.softmax(probe_logits(params, x), dim=1).numpy()
    np.testing.assert_allclose(ours, sk.predict_proba(z), atol=1e-4)
    np.testing.assert_allclose(params.weight.numpy(), sk.coef_.T, atol=1e-3)
    assert (ours.argmax(1) == sk.predict(z)).all()


def test_ridge_primal_and_dual_give_the_closed_form() -> None:
    g = torch.Generator().manual_seed(2)
    for n, d in ((50, 8), (12, 40)):  # d <= n: primal solve; d > n: dual solve
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (n,), generator=g)
        l2 = 0.1
        p = fit_probe(x, y, num_classes=3, method="ridge", l2=l2)
        z = (x - p.mean) / p.scale
        t = torch.nn.functional.one_hot(y, 3).double()
        expect = torch.linalg.inv(z.T @ z + l2 * n * torch.eye(d, dtype=torch.float64)) @ z.T @ (t - t.mean(0))
        torch.testing.assert_close(p.weight, expect, atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(p.bias, t.mean(0))


def test_folded_weights_match_probe_logits() -> None:
    x, y = _blobs(20, 5, 3, sep=2.0)
    p = fit_probe(x, y)
    w, b = p.fold(torch.float64)
    torch.testing.assert_close(x @ w + b, probe_logits(p, x))


def test_constant_feature_does_not_produce_nan() -> None:
    x, y = _blobs(20, 4, 3, sep=5.0)
    x[:, 2] = 3.0
    mean, scale = standardiser(x)
    assert scale[2] == 1.0
    probe = LinearProbe().fit(x, y)
    assert torch.isfinite(probe.decision_function(x)).all()


def test_bad_input_teaches() -> None:
    x, y = _blobs(10, 3, 3, sep=5.0)
    with pytest.raises(ShapeError, match=r"labels: .*shape \[30\]"):
        fit_probe(x, y[:-1])
    with pytest.raises(ShapeError, match=r"\[n, d\]"):
        fit_probe(x[:, :, None], y)
    with pytest.raises(SpecError, match="unknown probe method 'sofmax'.*did you mean 'softmax'"):
        LinearProbe("sofmax")
    with pytest.raises(LayerlabError, match="not fitted"):
        LinearProbe().predict(x)
    with pytest.raises(ShapeError, match="fitted on 3 features, got 4"):
        LinearProbe().fit(x, y).predict(torch.randn(2, 4))
    with pytest.raises(ShapeError, match="num_classes=2"):
        fit_probe(x, y, num_classes=2)


def _objective_gradient(x: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: np.ndarray, l2: float) -> float:
    """max |gradient| of mean CE + l2/2 |W|^2 on standardised features, by hand in numpy (float64)."""
    z = (x - x.mean(0)) / x.std(0)
    logits = z @ weight + bias
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    gw = z.T @ p / len(y) + l2 * weight
    gb = p.mean(0)
    return float(max(np.abs(gw).max(), np.abs(gb).max()))


def _hard_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """Nearly separable, correlated, badly conditioned classes: L-BFGS needs well over 5 iterations."""
    g = torch.Generator().manual_seed(3)
    n, d, k = 300, 40, 5
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(-2, 1, d, dtype=torch.float64))
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix
    y = (x @ torch.randn(d, k, generator=g, dtype=torch.float64)).argmax(1)
    return x, y


def test_a_capped_probe_records_it_and_warns_and_the_default_converges() -> None:
    x, y = _hard_problem()
    l2 = 1e-4
    with pytest.warns(ProbeConvergenceWarning, match=r"1 of 1 L-BFGS fit\(s\) did not converge.*max_iter=5"):
        capped = fit_probe(x, y, l2=l2, max_iter=5)
    assert capped.iterations == 5 and not capped.converged and capped.hit_cap
    # the recorded state is the truth, computed independently: the gradient at the capped point is far above tol
    g_capped = _objective_gradient(x.numpy(), y.numpy(), capped.weight.numpy(), capped.bias.numpy(), l2)
    assert g_capped > 100 * capped.tol
    assert capped.grad_max == pytest.approx(g_capped, rel=1e-6)

    with warnings.catch_warnings():
        warnings.simplefilter("error", ProbeConvergenceWarning)  # the default must not warn
        full = fit_probe(x, y, l2=l2)
    assert full.converged and not full.hit_cap and 5 < full.iterations < full.max_iter
    assert _objective_gradient(x.numpy(), y.numpy(), full.weight.numpy(), full.bias.numpy(), l2) <= full.tol


def test_converged_probe_matches_sklearn_at_a_tight_tolerance() -> None:
    """The default stop (max |grad| <= 1e-6) lands at sklearn's optimum (solved to 1e-10): with strong convexity
    l2, |W - W*| <= |grad| / l2, so probabilities agree to ~1e-4 and every prediction agrees."""
    from sklearn.linear_model import LogisticRegression

    x, y = _hard_problem()
    l2, n = 1e-3, len(y)
    p = fit_probe(x, y, l2=l2)
    z = ((x - x.mean(0)) / x.std(0, unbiased=False)).numpy()
    sk = LogisticRegression(C=1.0 / (l2 * n), tol=1e-10, max_iter=100_000).fit(z, y.numpy())
    ours = torch.softmax(probe_logits(p, x), 1).numpy()
    np.testing.assert_allclose(ours, sk.predict_proba(z), atol=1e-4)
    assert (ours.argmax(1) == sk.predict(z)).all()


def test_ridge_records_no_iterations() -> None:
    x, y = _blobs(10, 3, 3, sep=5.0)
    p = fit_probe(x, y, method="ridge")
    assert p.iterations == 0 and p.converged


def test_bad_tolerance_teaches() -> None:
    x, y = _blobs(10, 3, 3, sep=5.0)
    with pytest.raises(LayerlabError, match="tol"):
        fit_probe(x, y, tol=0.0)
