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

Is a value above chance? :mod:`~layerlab.similarity.inference` computes a permutation null (CKA of row-shuffled
pairings) and a batch bootstrap interval from the per-batch Grams, with no new forward pass.

Modules: :mod:`~layerlab.similarity.cka` (the pure functions), :mod:`~layerlab.similarity.accumulator`
(:class:`CKAAccumulator`, streamed over batches) and :mod:`~layerlab.similarity.inference` (null and interval).
Every public name is importable from ``layerlab.similarity``.
"""
from __future__ import annotations

from .accumulator import CKAAccumulator
from .accumulator import TensorGroup  # noqa: F401  (type aliases, importable as before)
from .cka import Estimator, Kernel  # noqa: F401
from .cka import cka_from_grams, gram_linear, gram_rbf, hsic_biased, hsic_unbiased, linear_cka, rbf_cka
from .inference import (
    bootstrap_indices, cka_bootstrap, cka_inference, cka_permutation_null, pairwise_cka_inference, permutation_indices,
)

__all__ = [
    "CKAAccumulator",
    "bootstrap_indices",
    "cka_bootstrap",
    "cka_from_grams",
    "cka_inference",
    "cka_permutation_null",
    "gram_linear",
    "gram_rbf",
    "hsic_biased",
    "hsic_unbiased",
    "linear_cka",
    "pairwise_cka_inference",
    "permutation_indices",
    "rbf_cka",
]
