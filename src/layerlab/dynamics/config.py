"""The options of a dynamics analysis (Sharon & Dar 2024, arXiv 2405.17377): :class:`DynamicsConfig`, everything
that shapes the tables and hence their store keys, checked when it is made; and the store's table names."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import LayerlabError
from ..features import check_tokens
from ..probes import DEFAULT_MAX_ITER, DEFAULT_TOL

__all__ = ["PROBE_TOKENS", "TABLES", "DynamicsConfig"]

#: table name -> store analysis name
TABLES = {"cka": "dynamics-cka", "probes": "dynamics-probes", "drs": "dynamics-drs"}
#: ``tokens`` -> how the probes reduce a token output: a probe on all T x D tokens would be T times wider for nothing
#: (conv maps are pooled likewise, ``probe_pool``), so only ``cls`` changes what the probes see
PROBE_TOKENS = {"flatten": "mean", "mean": "mean", "cls": "cls"}


@dataclass(frozen=True)
class DynamicsConfig:
    """Everything that shapes the dynamics tables (and hence their store keys)."""

    layers: tuple[str, ...] | None = None  # module paths, labels, "blocks", "layers", "kind:Conv2d" (select_layers);
    # None: stem and every residual/transformer block (default_layers); "output" is always added
    tokens: str = "flatten"  # token outputs [N, T, D] for CKA: "flatten" (all), "cls" (token 0) or "mean"
    epochs: tuple[int, ...] | None = None  # checkpoints to analyse; None: all
    max_checkpoints: int | None = None  # keep at most this many (log-spaced, first and last always kept)
    images: int = 256  # CKA probe set: this many images of `split` (seeded), trimmed to whole batches; must not
    # exceed the split (load_data raises): 256 fits the embedded digits' 364 test images
    batch_size: int = 64  # minibatch size of the CKA estimator
    split: str = "test"
    estimator: str = "unbiased"
    kernel: str = "linear"
    probe_method: str = "softmax"
    probe_l2: float = 1e-3
    probe_iter: int = DEFAULT_MAX_ITER  # cap on L-BFGS iterations; each probe row records its count and convergence
    probe_tol: float = DEFAULT_TOL  # converged: max |gradient| of the probe objective <= probe_tol
    probe_pool: int = 2  # average-pool conv maps to s x s before the probe; 0 = flatten the whole map
    probe_train: int | None = 1000  # training-split images to fit probes on (None: all)
    triplets: int = 500
    resolution: int = 50
    margin: float = 0.1
    seed: int = 0
    tables: tuple[str, ...] = ("cka", "probes", "drs")
    null: int = 0  # CKA table: this many row-shuffled pairings per checkpoint pair -> null_mean, null_high, p_value,
    # distinguishable (0: none; a non-zero value enters the CKA keys, 0 leaves them as published)
    bootstrap: int = 0  # CKA table: this many resamples of the probe batches -> ci_low, ci_high (needs >= 2 batches)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tables) - set(TABLES))
        checks = [
            (not unknown, f"tables: unknown {unknown}; choose from {sorted(TABLES)}"),
            (self.images >= 4, f"images: need at least 4 probe images for CKA, got {self.images}"),
            (self.batch_size >= 4, f"batch_size: the unbiased CKA estimator needs batches of >= 4, got {self.batch_size}"),
            (self.triplets >= 1, f"triplets: expected >= 1, got {self.triplets}"),
            (self.resolution >= 2, f"resolution: expected >= 2 grid points per axis, got {self.resolution}"),
            (self.probe_iter >= 1, f"probe_iter: expected a positive L-BFGS iteration cap, got {self.probe_iter}"),
            (self.probe_tol > 0, f"probe_tol: expected a gradient tolerance > 0, got {self.probe_tol}"),
            (self.probe_pool >= 0, f"probe_pool: expected a pooled size >= 1, or 0 for no pooling, got {self.probe_pool}"),
            (self.max_checkpoints is None or self.max_checkpoints >= 2,
             f"max_checkpoints: expected >= 2 (a matrix needs two checkpoints), got {self.max_checkpoints}"),
            (self.null == 0 or self.null >= 19,
             f"null: expected 0 (off) or >= 19 shuffles (the smallest p-value is 1/(null+1)); 200 is typical, got {self.null}"),
            (self.bootstrap >= 0, f"bootstrap: expected 0 (off) or a number of resamples, got {self.bootstrap}"),
            (self.bootstrap == 0 or self.batch_size < 1 or self.images // self.batch_size >= 2,
             f"bootstrap: {self.images} images in batches of {self.batch_size} make fewer than 2 batches to resample; "
             f"use batch_size <= {self.images // 2} (8 or more batches give a steadier interval)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise LayerlabError(msg)
        check_tokens(self.tokens)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _config(**kwargs: Any) -> DynamicsConfig:
    known = {f.name for f in dataclasses.fields(DynamicsConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise LayerlabError(f"dynamics: unknown option(s) {', '.join(unknown)}; options: {', '.join(sorted(known))}")
    for k in ("layers", "epochs", "tables"):
        if kwargs.get(k) is not None:
            v = kwargs[k]
            kwargs[k] = (v,) if isinstance(v, (str, int)) else tuple(v)
    return DynamicsConfig(**kwargs)
