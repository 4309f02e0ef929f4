"""CKA: identities, invariances, independent float64 references, streaming == one-shot, numerics, errors."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from layerlab.errors import NonFiniteError, ShapeError
from layerlab.similarity import (
    CKAAccumulator,
    cka_from_grams,
    gram_linear,
    gram_rbf,
    hsic_biased,
    hsic_unbiased,
    linear_cka,
    rbf_cka,
)

ESTIMATORS = [False, True]


# ---------------------------------------------------------------- independent float64 references (numpy only)
def np_cka_textbook(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. (2019) with the centering matrix H: HSIC = tr(K H L H) / (n-1)^2, uncentred features."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def np_hsic_song(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC, METHODS.md section 2, written term by term."""
    n = k.shape[0]
    kt, lt = k.astype(np.float64).copy(), l.astype(np.float64).copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(n)
    term1 = np.trace(kt @ lt)
    term2 = (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one @ kt @ lt @ one)
    return (term1 + term2 - term3) / (n * (n - 3))


def np_gram(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return x @ x.T


def np_rbf_gram(x: np.ndarray, sigma: float) -> np.ndarray:
    """Kornblith et al.'s gram_rbf: bandwidth from the median of all squared distances."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * sigma**2 * np.median(d2)))


def np_cka_grams(k: np.ndarray, l: np.ndarray, unbiased: bool) -> float:
    if unbiased:
        return np_hsic_song(k, l) / np.sqrt(np_hsic_song(k, k) * np_hsic_song(l, l))
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    kc, lc = h @ k @ h, h @ l @ h
    return (kc * lc).sum() / np.sqrt((kc * kc).sum() * (lc * lc).sum())


def np_minibatch_cka(xs: list[np.ndarray], ys: list[np.ndarray]) -> float:
    """sum_k HSIC_1(K_k, L_k) / sqrt(sum_k HSIC_1(K_k, K_k) sum_k HSIC_1(L_k, L_k)) (Nguyen et al. 2021)."""
    ab = aa = bb = 0.0
    for x, y in zip(xs, ys):
        k, l = np_gram(x), np_gram(y)
        ab += np_hsic_song(k, l)
        aa += np_hsic_song(k, k)
        bb += np_hsic_song(l, l)
    return ab / np.sqrt(aa * bb)


# ---------------------------------------------------------------- fixtures
@pytest.fixture
def xy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(12, 9, generator=g, dtype=torch.float64)) + 0.3 * torch.randn(
        40, 9, generator=g, dtype=torch.float64
    )
    return x, y


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


# ---------------------------------------------------------------- identities and invariances
@pytest.mark.parametrize("unbiased", ESTIMATORS)
@pytest.mark.parametrize("fn", [linear_cka, rbf_cka])
def test_cka_of_x_with_itself_is_one(fn, unbiased, xy):
    x, y = xy
    assert fn(x, x, unbiased=unbiased) == pytest.approx(1.0, abs=1e-12)
    assert fn(x, y, unbiased=unbiased) < 0.99  # not a constant 1


@pytest.mark.parametrize("unbiased", ESTIMATORS)
@pytest.mark.parametrize("fn", [linear_cka, rbf_cka])
def test_invariant_to_orthogonal_transform_and_isotropic_scaling(fn, unbiased, xy):
    x, y = xy
    base = fn(x, y, unbiased=unbiased)
    q = random_orthogonal(x.shape[1], seed=1)
    assert fn(x @ q, y, unbiased=unbiased) == pytest.approx(base, abs=1e-10)
    assert fn(7.5 * x, 0.01 * y, unbiased=unbiased) == pytest.approx(base, abs=1e-10)
    # an anisotropic scaling is NOT an invariance: the check above can detect a change
    stretch = torch.linspace(0.05, 5.0, x.shape[1], dtype=torch.float64)
    assert abs(fn(x * stretch, y, unbiased=unbiased) - base) > 1e-3


def test_inputs_are_not_modified(xy):
    x, y = xy
    x0, y0 = x.clone(), y.clone()
    linear_cka(x, y, unbiased=True), rbf_cka(x, y), gram_linear(x)
    acc = CKAAccumulator(2)
    acc.update([x, y])
    assert torch.equal(x, x0) and torch.equal(y, y0)


def test_inputs_are_flattened(xy):
    x, y = xy
    assert linear_cka(x.reshape(40, 3, 2, 2), y) == pytest.approx(linear_cka(x, y), abs=1e-14)


# ---------------------------------------------------------------- independent references
def test_linear_cka_matches_textbook_numpy_with_centering_matrix(xy):
    x, y = xy
    x = x + 5.0  # uncentred features: the reference centres with H, we centre the features
    assert linear_cka(x, y) == pytest.approx(np_cka_textbook(x.numpy(), y.numpy()), abs=1e-12)
    k, l = np_gram(x.numpy()), np_gram(y.numpy())
    h = np.eye(40) - np.ones((40, 40)) / 40
    assert hsic_biased(k, l) == pytest.approx(np.trace(k @ h @ l @ h) / 39**2, rel=1e-10)


def test_unbiased_hsic_matches_song_formula(xy):
    x, y = xy
    k, l = np_gram(x.numpy() + 3.0), np_gram(y.numpy())  # uncentred Gram: U-centring must handle it
    assert hsic_unbiased(k, l) == pytest.approx(np_hsic_song(k, l), rel=1e-10)
    assert hsic_unbiased(k, k) == pytest.approx(np_hsic_song(k, k), rel=1e-10)
    assert linear_cka(x, y, unbiased=True) == pytest.approx(np_cka_grams(k, l, True), abs=1e-12)


@pytest.mark.parametrize("unbiased", ESTIMATORS)
def test_rbf_cka_matches_numpy_reference(unbiased, xy):
    x, y = xy
    k, l = np_rbf_gram(x.numpy(), 0.8), np_rbf_gram(y.numpy(), 0.8)
    np.testing.assert_allclose(gram_rbf(x, 0.8).numpy(), k, rtol=1e-10, atol=1e-12)
    assert rbf_cka(x, y, sigma=0.8, unbiased=unbiased) == pytest.approx(np_cka_grams(k, l, unbiased), abs=1e-10)
    assert rbf_cka(x, y, sigma=0.3) != pytest.approx(rbf_cka(x, y, sigma=2.0), abs=1e-3)


def test_cka_from_grams_matches_feature_api(xy):
    x, y = xy
    for unbiased in ESTIMATORS:
        assert cka_from_grams(gram_linear(x), gram_linear(y), unbiased) == pytest.approx(
            linear_cka(x, y, unbiased=unbiased), abs=1e-14
        )


# ---------------------------------------------------------------- streaming accumulator
def make_layers(n: int, seed: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Five related 'layers' of different widths and shapes, uncentred like ReLU features.

    float64 by default, so that the accumulator's automatic Gram precision is float64 and the estimator
    arithmetic can be compared with numpy to 1e-10 (float32 features get float32 Grams: tested separately).
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 16, generator=g)
    return [
        t.to(dtype)
        for t in (
            torch.relu(base @ torch.randn(16, 32, generator=g)) + 1.0,
            torch.relu(base @ torch.randn(16, 8, generator=g)).reshape(n, 2, 2, 2),
            base[:, :4] ** 2,
            torch.randn(n, 6, generator=g),
            base @ torch.randn(16, 3, generator=g) + 0.5 * torch.randn(n, 3, generator=g),
        )
    ]


def test_streaming_unbiased_equals_direct_sum_of_per_batch_u_statistics():
    """The accumulator over 4 batches of 25 equals sum_k HSIC_1 / sqrt(...) computed directly in numpy."""
    feats = make_layers(100, seed=3)
    batches = [[f[i : i + 25] for f in feats] for i in range(0, 100, 25)]
    acc = CKAAccumulator(len(feats))
    for b in batches:
        acc.update(b)
    got = acc.compute()
    assert got.dtype == torch.float64 and got.shape == (5, 5)
    for i in range(5):
        for j in range(5):
            want = np_minibatch_cka([b[i].numpy() for b in batches], [b[j].numpy() for b in batches])
            assert got[i, j].item() == pytest.approx(want, abs=1e-10), (i, j)
    # and it is not the full-N estimate: the batching is really reflected
    assert abs(got[0, 3].item() - linear_cka(feats[0], feats[3], unbiased=True)) > 1e-6


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_all_pairs_matrix_equals_pairwise_calls(estimator, kernel):
    feats = make_layers(60, seed=4)
    fn = linear_cka if kernel == "linear" else rbf_cka
    unbiased = estimator == "unbiased"
    acc = CKAAccumulator(5, kernel=kernel, estimator=estimator)
    acc.update(feats)
    got = acc.compute()
    for i in range(5):
        for j in range(5):
            assert got[i, j].item() == pytest.approx(fn(feats[i], feats[j], unbiased=unbiased), abs=1e-12)
    assert torch.allclose(got, got.T, atol=1e-14)


def test_two_model_accumulator_equals_pairwise_and_self_similarity_block():
    a, b = make_layers(48, seed=5), make_layers(48, seed=6)[:3]
    acc = CKAAccumulator(5, 3, names_a=list("abcde"), names_b=["x", "y", "z"])
    for s in range(0, 48, 16):
        acc.update([f[s : s + 16] for f in a], [f[s : s + 16] for f in b])
    ref = np.array(
        [[np_minibatch_cka(list(fa.split(16)), list(fb.split(16))) for fb in b] for fa in a]
    )
    np.testing.assert_allclose(acc.compute().numpy(), ref, atol=1e-10)


def test_biased_streaming_sums_per_batch_hsic_and_depends_on_batch_size():
    feats = make_layers(80, seed=7)
    one = CKAAccumulator(5, estimator="biased")
    one.update(feats)
    two = CKAAccumulator(5, estimator="biased")
    for s in (0, 40):
        two.update([f[s : s + 40] for f in feats])
    assert one.compute()[0, 4].item() == pytest.approx(linear_cka(feats[0], feats[4]), abs=1e-12)
    halves = [(f[:40].numpy(), f[40:].numpy()) for f in (feats[0], feats[4])]
    hs = lambda a, b: sum(hsic_biased(np_gram(p), np_gram(q)) for p, q in zip(a, b))  # noqa: E731
    want = hs(halves[0], halves[1]) / np.sqrt(hs(halves[0], halves[0]) * hs(halves[1], halves[1]))
    assert two.compute()[0, 4].item() == pytest.approx(want, abs=1e-12)
    assert abs(two.compute()[0, 4].item() - one.compute()[0, 4].item()) > 1e-4


def test_update_grams_path_equals_update_path():
    feats = make_layers(64, seed=8)
    names = [f"l{i}" for i in range(5)]
    direct, via_grams = CKAAccumulator(5, names_a=names), CKAAccumulator(5, names_a=names)
    for s in range(0, 64, 32):
        batch = {n: f[s : s + 32] for n, f in zip(names, feats)}
        direct.update(batch)
        via_grams.update_grams({n: via_grams.gram(t) for n, t in reversed(batch.items())})
    assert torch.equal(direct.compute(), via_grams.compute())


def test_to_frame_is_tidy_and_names_the_estimator():
    feats = make_layers(32, seed=9)
    acc = CKAAccumulator(5, estimator="unbiased", kernel="linear")
    acc.update({f"l{i}": f for i, f in enumerate(feats)})
    frame = acc.to_frame()
    assert isinstance(frame, pd.DataFrame) and len(frame) == 25
    assert {"layer_a", "layer_b", "cka", "estimator", "kernel", "n", "n_batches"} <= set(frame.columns)
    assert set(frame.estimator) == {"unbiased"} and set(frame.kernel) == {"linear"} and set(frame.n) == {32}
    assert set(frame.gram_dtype) == {"float64"} and set(frame.n_batches) == {1}
    row = frame[(frame.layer_a == "l0") & (frame.layer_b == "l3")].cka.item()
    assert row == pytest.approx(acc.compute()[0, 3].item())


# ---------------------------------------------------------------- numerics
def test_float32_relu_features_with_large_offsets_match_float64():
    g = torch.Generator().manual_seed(10)
    base = torch.randn(256, 64, generator=g)
    x = (torch.relu(torch.randn(256, 512, generator=g)) * 10 + 100).float()
    y = (torch.relu(base @ torch.randn(64, 300, generator=g)) * 10 + 100).float()
    x[:, :64] += 3 * torch.relu(base)  # some shared signal
    x64, y64 = x.double(), y.double()  # the same values, exactly, in float64
    for unbiased in ESTIMATORS:
        want = np_cka_grams(np_gram(x64.numpy() - x64.numpy().mean(0)), np_gram(y64.numpy()), unbiased)
        assert linear_cka(x, y, unbiased=unbiased) == pytest.approx(want, abs=1e-6)
    want = np_minibatch_cka(list(x64.numpy().reshape(4, 64, -1)), list(y64.numpy().reshape(4, 64, -1)))
    # auto (float32 Gram for float32 features), forced float32, forced float64
    for dtype, used in ((None, "float32"), (torch.float32, "float32"), (torch.float64, "float64")):
        acc = CKAAccumulator(2, gram_dtype=dtype)
        for s in range(0, 256, 64):
            acc.update([x[s : s + 64], y[s : s + 64]])
        assert acc.compute()[0, 1].item() == pytest.approx(want, abs=1e-6), dtype
        assert acc.gram_dtypes == {used} and set(acc.to_frame().gram_dtype) == {used}
    # the test is sensitive: the same estimator on uncentred float32 Grams is off by far more than 1e-6
    k32 = (x[:64] @ x[:64].T).numpy()
    l32 = (y[:64] @ y[:64].T).numpy()
    for m in (k32, l32):
        np.fill_diagonal(m, 0)

    def naive(a: np.ndarray, b: np.ndarray) -> np.float32:  # Song's formula, float32 throughout
        return (np.trace(a @ b) + a.sum() * b.sum() / (62 * 63) - 2 / 62 * (a @ b).sum()) / (64 * 61)

    naive_cka = naive(k32, l32) / np.sqrt(abs(naive(k32, k32) * naive(l32, l32)))
    exact = np_cka_grams(np_gram(x64[:64].numpy()), np_gram(y64[:64].numpy()), True)
    assert not abs(naive_cka - exact) < 1e-6


def test_gram_precision_follows_the_features_and_is_recorded():
    acc = CKAAccumulator(1)
    assert acc.gram(torch.randn(8, 5, dtype=torch.float64)).dtype == torch.float64
    assert acc.gram_dtypes == {"float64"}
    assert acc.gram(torch.randn(8, 5)).dtype == torch.float64  # float32 matmul, promoted [n, n] result
    assert acc.gram_dtypes == {"float32", "float64"}
    acc.update_grams([acc.gram(torch.randn(8, 5))])
    assert set(acc.to_frame().gram_dtype) == {"float32+float64"}
    given = CKAAccumulator(1)
    given.update_grams([gram_linear(torch.randn(8, 5))])
    assert set(given.to_frame().gram_dtype) == {"given"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gram_of_channels_last_maps_needs_no_copy_and_equals_the_nchw_gram(dtype):
    """The Gram does not depend on the order of the feature columns: a channels_last map is flattened as
    [n, H, W, C], a view of its memory, and gives the NCHW Gram up to rounding."""
    from layerlab.similarity.cka import _flat_rows

    x = torch.randn(16, 6, 5, 7, dtype=dtype) + 3.0
    cl = x.contiguous(memory_format=torch.channels_last)
    assert _flat_rows(cl).data_ptr() == cl.data_ptr() and _flat_rows(cl).is_contiguous()  # a view, no copy
    acc = CKAAccumulator(1)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert torch.allclose(acc.gram(cl), acc.gram(x), rtol=tol, atol=tol * 100)
    # the reordered flattening really is a different column order (the test above can fail)
    assert not torch.equal(_flat_rows(cl), x.reshape(16, -1))
    assert torch.allclose(acc.gram(cl), gram_linear(x.double()), rtol=tol, atol=tol * 100)


# ---------------------------------------------------------------- errors
def test_errors_name_expected_and_received():
    x = torch.randn(10, 3)
    with pytest.raises(ShapeError, match=r"same first dimension.*\(10, 3\).*\(9, 3\)"):
        linear_cka(x, torch.randn(9, 3))
    with pytest.raises(ShapeError, match=r"n >= 4.*n=3"):
        linear_cka(x[:3], x[:3], unbiased=True)
    with pytest.raises(ShapeError, match=r"\[n, \.\.\.\].*\(10,\)"):
        linear_cka(torch.randn(10), torch.randn(10))
    with pytest.raises(ShapeError, match="square Gram"):
        hsic_unbiased(torch.randn(5, 4), torch.randn(5, 5))
    acc = CKAAccumulator(2)
    with pytest.raises(ShapeError, match="expected 2 per-layer tensors.*got 3"):
        acc.update([x, x, x])
    with pytest.raises(ShapeError, match="self-similarity"):
        acc.update([x, x], [x, x])
    with pytest.raises(ShapeError, match=r"batch sizes \[10, 8\]"):
        acc.update([x, x[:8]])
    with pytest.raises(ShapeError, match="n >= 4"):
        acc.update([x[:3], x[:3]])
    named = CKAAccumulator(2, names_a=["conv", "fc"])
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"\['a:fc'\]"):
        named.update([x, bad])
    assert acc.n_batches == 0 and named.n_batches == 0


def test_zero_variance_layer_gives_nan_not_a_crash():
    x = torch.randn(16, 4)
    assert np.isnan(linear_cka(x, torch.ones(16, 4)))


# ---------------------------------------------------------------- is a similarity above chance? (null and interval)
def np_hsic(k: np.ndarray, l: np.ndarray, unbiased: bool) -> float:
    """HSIC_1 term by term (Song et al.) or HSIC_0 = tr(K H L H) / (n-1)^2 with the centering matrix."""
    if unbiased:
        return np_hsic_song(k, l)
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2


def np_minibatch_cka_of_grams(ks: list[np.ndarray], ls: list[np.ndarray], unbiased: bool) -> float:
    """Summed HSIC over batches, every term recomputed (HSIC(L, L) too, so a shuffle that changed it would show)."""
    ab = sum(np_hsic(k, l, unbiased) for k, l in zip(ks, ls))
    aa = sum(np_hsic(k, k, unbiased) for k in ks)
    bb = sum(np_hsic(l, l, unbiased) for l in ls)
    return ab / np.sqrt(aa * bb)


def batch_grams(x: torch.Tensor) -> torch.Tensor:
    """Features [n_batches, b, d] -> linear Grams [n_batches, b, b] (float64, uncentred: both estimators ignore it)."""
    x = x.to(torch.float64)
    return x @ x.transpose(1, 2)


def related_features(n_batches: int, b: int, seed: int, noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches, b, 12, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(12, 9, generator=g, dtype=torch.float64))
    return x, y + noise * torch.randn(y.shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("unbiased", ESTIMATORS)
def test_permutation_null_equals_a_loop_reference_on_the_same_draws(unbiased):
    from layerlab.similarity import cka_permutation_null, permutation_indices

    x, y = related_features(3, 12, seed=0)
    ka, kb = batch_grams(x), batch_grams(y)
    null = cka_permutation_null(ka, kb, permutations=30, seed=5, unbiased=unbiased)
    idx = permutation_indices(30, 3, 12, seed=5).numpy()
    assert null.dtype == torch.float64 and null.shape == (30,)
    assert all(sorted(p) == list(range(12)) for p in idx.reshape(-1, 12))  # every draw is a permutation
    assert len({tuple(p) for p in idx.reshape(-1, 12)}) == 90  # independent per batch and per draw
    ks, ls = ka.numpy(), kb.numpy()
    want = [np_minibatch_cka_of_grams(list(ks), [l[ix][:, ix] for l, ix in zip(ls, idx[p])], unbiased)
            for p in range(30)]
    np.testing.assert_allclose(null.numpy(), want, atol=1e-12)
    observed = np_minibatch_cka_of_grams(list(ks), list(ls), unbiased)
    assert np.mean(want) < observed - 0.1  # shuffling broke the relation the reference can see


@pytest.mark.parametrize("unbiased", ESTIMATORS)
def test_bootstrap_equals_a_loop_reference_on_the_same_draws(unbiased):
    from layerlab.similarity import bootstrap_indices, cka_bootstrap

    x, y = related_features(5, 10, seed=1)
    ka, kb = batch_grams(x), batch_grams(y)
    boot = cka_bootstrap(ka, kb, resamples=25, seed=3, unbiased=unbiased)
    idx = bootstrap_indices(25, 5, seed=3).numpy()
    assert idx.min() >= 0 and idx.max() <= 4 and any(len(set(r)) < 5 for r in idx)  # with replacement
    ks, ls = ka.numpy(), kb.numpy()
    want = [np_minibatch_cka_of_grams([ks[i] for i in r], [ls[i] for i in r], unbiased) for r in idx]
    np.testing.assert_allclose(boot.numpy(), want, atol=1e-12)


def test_null_of_unrelated_features_sits_at_chance_and_the_biased_chance_level_is_high():
    from layerlab.similarity import cka_inference

    g = torch.Generator().manual_seed(2)
    x, y = (torch.randn(4, 64, 50, generator=g, dtype=torch.float64) for _ in range(2))  # n = 256 in 4 batches
    unb = cka_inference(batch_grams(x), batch_grams(y), permutations=200, resamples=0, seed=0, unbiased=True)
    assert abs(unb["null_mean"]) < 0.05 and 0 < unb["null_high"] < 0.1
    assert unb["p_value"] > 0.05 and not unb["distinguishable"] and "ci_low" not in unb
    # the biased estimator's chance level at b = 64, d = 50 is far from 0: the null is what makes it readable
    bia = cka_inference(batch_grams(x), batch_grams(y), permutations=200, resamples=0, seed=0, unbiased=False)
    assert bia["null_mean"] > 0.3 and bia["cka"] > 0.3 and not bia["distinguishable"]


def test_identical_representations_reach_the_smallest_p_value_and_an_interval_at_one():
    from layerlab.similarity import cka_inference, cka_permutation_null

    x, _ = related_features(4, 32, seed=3)
    k = batch_grams(x)
    r = cka_inference(k, k.clone(), permutations=99, resamples=100, seed=0, unbiased=True)
    assert r["cka"] == pytest.approx(1.0, abs=1e-12)
    assert r["p_value"] == pytest.approx(1 / 100) and r["distinguishable"]
    assert r["ci_low"] == pytest.approx(1.0, abs=1e-12) and r["ci_high"] == pytest.approx(1.0, abs=1e-12)
    # a shuffle pairs X with a shuffled X: HSIC(K, K) and HSIC(L, L) stay, the cross term collapses
    null = cka_permutation_null(k, k, permutations=99, seed=0, unbiased=True)
    assert float(null.max()) < 0.5 and abs(float(null.mean())) < 0.05


def test_interval_holds_the_estimate_and_shrinks_with_more_batches():
    from layerlab.similarity import cka_inference

    widths = {}
    for n_batches in (4, 16):
        x, y = related_features(n_batches, 32, seed=4, noise=2.0)
        r = cka_inference(batch_grams(x), batch_grams(y), permutations=0, resamples=400, seed=0, unbiased=True)
        assert r["ci_low"] < r["cka"] < r["ci_high"], r
        widths[n_batches] = r["ci_high"] - r["ci_low"]
    assert widths[16] < 0.75 * widths[4], widths  # ~1/sqrt(batches): half as wide with four times the batches


def test_inference_is_deterministic_under_its_seed_and_pairwise_equals_single_pairs():
    from layerlab.similarity import cka_inference, pairwise_cka_inference

    x, y = related_features(4, 16, seed=5)
    stack = torch.stack([batch_grams(x), batch_grams(y), batch_grams(torch.tanh(y))])  # 3 layers
    opts = dict(permutations=50, resamples=40, unbiased=True)
    one = cka_inference(stack[0], stack[1], seed=7, **opts)
    assert one == cka_inference(stack[0], stack[1], seed=7, **opts)
    other = cka_inference(stack[0], stack[1], seed=8, **opts)
    assert other["cka"] == one["cka"] and other["null_high"] != one["null_high"] and other["ci_low"] != one["ci_low"]
    both = pairwise_cka_inference(stack, stack[:2], seed=7, **opts)
    assert both["cka"].shape == (3, 2) and list(both) == ["cka", "null_mean", "null_high", "p_value", "ci_low",
                                                          "ci_high", "distinguishable"]
    for i in range(3):
        for j in range(2):
            single = cka_inference(stack[i], stack[j], seed=7, **opts)
            for key, value in single.items():
                assert both[key][i, j] == pytest.approx(value, abs=1e-12), (i, j, key)
    self_sim = pairwise_cka_inference(stack, seed=7, **opts)  # self-similarity: a symmetric table
    for key in ("cka", "null_mean", "null_high", "p_value", "ci_low", "ci_high"):
        np.testing.assert_allclose(self_sim[key], self_sim[key].T, atol=1e-12, err_msg=key)
    upper = np.triu_indices(2)  # computed for i <= j (shuffling j's rows), mirrored below the diagonal
    np.testing.assert_allclose(self_sim["null_high"][:2, :2][upper], both["null_high"][:2][upper], atol=1e-12)


def test_inference_errors_teach():
    from layerlab.errors import LayerlabError
    from layerlab.similarity import cka_bootstrap, cka_inference

    x, _ = related_features(1, 16, seed=6)
    k = batch_grams(x)
    with pytest.raises(LayerlabError, match="at least 2 batches, got 1; use a smaller batch_size"):
        cka_bootstrap(k, k, resamples=10, seed=0, unbiased=True)
    with pytest.raises(LayerlabError, match=r"smallest p-value is 1/11.*use at least 20"):
        cka_inference(k, k, permutations=10, resamples=0, seed=0, unbiased=True)
    with pytest.raises(ShapeError, match=r"\[n_batches, b, b\].*\(16, 16\)"):
        cka_inference(k[0], k[0], permutations=50, resamples=0, seed=0, unbiased=True)
    with pytest.raises(ShapeError, match="same batches"):
        cka_inference(k, k[:, :8, :8], permutations=50, resamples=0, seed=0, unbiased=True)
    with pytest.raises(LayerlabError, match="permutations.*integer >= 0"):
        cka_inference(k, k, permutations=-1, resamples=0, seed=0, unbiased=True)
