"""Streaming all-pairs CKA over batches (:class:`CKAAccumulator`): a stateful skin over the pure core.

Each update reduces every layer's batch to centred Gram matrices and adds their HSIC terms to float64 sums
(:func:`~layerlab.similarity.cka._hsic_update`); :meth:`~CKAAccumulator.compute` turns the sums into CKA
(Kornblith et al. 2019; minibatch CKA of Nguyen et al. 2021). Memory does not depend on layer widths or N.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from ..errors import LayerlabError, NonFiniteError, ShapeError
from .cka import (
    _ESTIMATORS, _KERNELS, Estimator, Kernel, _as_tensor, _check_gram, _check_n, _cka_compute, _gram_linear,
    _hsic_update, _resolve_gram_dtype, gram_rbf,
)

if TYPE_CHECKING:
    import pandas as pd

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
