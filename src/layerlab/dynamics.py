"""Training dynamics of representations (Sharon & Dar 2024, arXiv 2405.17377; METHODS.md section 2).

For one training run (a checkpoint series, ``layerlab.runs``) and each analysed layer l:

* **CKA over training**: S_l(t1, t2) = CKA(H_l(t1), H_l(t2)), with H_l(t) the flattened layer-l features of a fixed
  probe set (same images, same order) under checkpoint t (a token output [N, T, D]: all tokens, the class token or
  the token mean, ``tokens``). Linear kernel, minibatch CKA with the unbiased HSIC_1
  estimator by default (Nguyen, Raghu, Kornblith 2021); the table says which estimator it holds.
* **Linear probes**: per (layer, checkpoint) a softmax probe (:mod:`layerlab.probes`) fitted on training-split
  features and scored on the test split. Probe features are the layer's map average-pooled to
  ``probe_pool x probe_pool`` (tokens: their mean, or the class token with ``tokens="cls"``), so a probe costs
  milliseconds; ``probe_pool=0`` flattens a conv map whole.
* **Decision-region similarity (DRS)**: per layer, the fraction of plane grid points (:mod:`layerlab.regions`) where
  the probes of two checkpoints agree (image -> layer-l features at t -> probe_t argmax), averaged over random
  triplets of the run's own training images (:func:`training_images`: the ``train_n`` subset of run.json, with the
  labels it was trained with, noisy ones included); the network output (``layer == "output"``) gets the same matrix
  from the network's own argmax. The ``triplets`` table names every plane's three images by data-set index.

How it is computed. One pass over the checkpoints loads each checkpoint once and, per layer, keeps only what the
all-pairs results need: the b x b Gram matrix of every probe-set batch (formed inside the forward hook, so memory is
K * V * N * b * 8 bytes for K checkpoints, V views, N probe images and batch size b, independent of layer width), the
fitted probe (a d x C matrix) and the predicted class of every plane point (one byte per point; a disk-backed array
beyond 256 MiB). After the pass, one :class:`~layerlab.similarity.CKAAccumulator` per layer sums the HSIC terms of
all K x K checkpoint pairs batch by batch, and the DRS matrix compares the stored predictions. No feature map is
recomputed per checkpoint pair.

Results are tidy tables; with a :class:`~layerlab.store.Store` each (run, table, layer, config) is one shard, so a
killed analysis resumes and a repeated call computes nothing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import runs, structure
from .data import Batches, DataLike, ImageData, LoaderBatches, as_batches, check_label_coverage, load_data
from .errors import DataError, LayerlabError, warn
from .features import OUTPUT_KEY, Extractor, as_input, check_tokens, layer_labels, select_layers
from .models import load_model, num_outputs
from .probes import DEFAULT_MAX_ITER, DEFAULT_TOL, fit_probe
from .regions import grid_coords, iter_plane_batches, plane_basis, plane_coords, plane_points, sample_triplets
from .runtime import eval_mode, model_device, resolve_device
from .similarity import CKAAccumulator
from .store import Store, job_key

__all__ = [
    "PROBE_TOKENS",
    "TABLES",
    "DynamicsConfig",
    "compare",
    "decision_regions",
    "default_layers",
    "dynamics",
    "first_fit_epoch",
    "fit_summary",
    "phase_contrast",
    "phase_table",
    "probe_features",
    "select_epochs",
    "training_curves",
    "training_images",
    "triplet_table",
]

#: table name -> store analysis name
TABLES = {"cka": "dynamics-cka", "probes": "dynamics-probes", "drs": "dynamics-drs"}
_MEMMAP_BYTES = 256 * 2**20
#: ``tokens`` -> how the probes reduce a token output: a probe on all T x D tokens would be T times wider for nothing
#: (conv maps are pooled likewise, ``probe_pool``), so only ``cls`` changes what the probes see
PROBE_TOKENS = {"flatten": "mean", "mean": "mean", "cls": "cls"}
ModelLike = nn.Module | str


# --------------------------------------------------------------------------------------------------- config
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


# ---------------------------------------------------------------------------------------------- pure helpers
def select_epochs(available: Sequence[int], epochs: Sequence[int] | None = None, max_checkpoints: int | None = None) -> list[int]:
    """The checkpoints to analyse: ``epochs`` (all must exist) or all, thinned to ``max_checkpoints`` log-spaced ones.

    >>> select_epochs(range(31), max_checkpoints=6)
    [0, 1, 3, 7, 15, 30]
    """
    available = sorted(int(e) for e in available)
    if epochs is not None:
        missing = sorted(set(int(e) for e in epochs) - set(available))
        if missing:
            raise LayerlabError(f"no checkpoint for epoch(s) {missing}; this run has epochs {available}")
        chosen = sorted(set(int(e) for e in epochs))
    else:
        chosen = available
    if max_checkpoints is not None and len(chosen) > max_checkpoints:
        # log-spaced positions in the sorted list (1 + position), first and last always kept
        pos = np.unique(np.round(np.geomspace(1, len(chosen), max_checkpoints)).astype(int) - 1)
        extra = [i for i in range(len(chosen)) if i not in set(pos)]
        while len(pos) < max_checkpoints and extra:  # geomspace collided at the start: fill evenly
            pos = np.unique(np.append(pos, extra.pop(len(extra) // 2)))
        chosen = [chosen[i] for i in pos]
    if len(chosen) < 1:
        raise LayerlabError("no checkpoints to analyse")
    return chosen


def default_layers(model: nn.Module) -> list[str]:
    """The stem and every residual/transformer block: the units Sharon & Dar follow, on any model.

    Blocks are :func:`layerlab.structure.find_blocks`'s (``layer3.1``, ``blocks.2``, ``stages.1.blocks.0``); the stem
    is every learnable layer registered before the first block (``conv1``, ``patch_embed.proj``). A model without
    blocks gets every learnable layer but a final Linear head, whose output is the logits that the ``"output"`` view
    always covers.

    >>> default_layers(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2)))
    ['0', '2']
    """
    blocks = structure.find_blocks(model)
    layers = [i.name for i in structure.learnable_layers(model)]
    if blocks:
        order = {name: k for k, (name, _) in enumerate(model.named_modules())}
        return [n for n in layers if order[n] < order[blocks[0]]] + blocks
    if len(layers) > 1 and isinstance(model.get_submodule(layers[-1]), nn.Linear):
        layers = layers[:-1]
    return layers


def probe_features(t: torch.Tensor, pool: int = 2) -> torch.Tensor:
    """A layer's activation as probe features [N, d]: conv maps pooled to pool x pool, tokens averaged (the
    dynamics pass hands it the class token instead with ``tokens="cls"``, :data:`PROBE_TOKENS`)."""
    if t.ndim == 4:
        if pool and (t.shape[-2] > pool or t.shape[-1] > pool):  # never up-sample a small map
            t = F.adaptive_avg_pool2d(t, (min(pool, t.shape[-2]), min(pool, t.shape[-1])))
        return t.flatten(1)
    if t.ndim == 3:
        return t.mean(dim=1)
    return t.reshape(t.shape[0], -1)


def first_fit_epoch(metrics: pd.DataFrame, column: str = "train_acc", threshold: float = 1.0) -> int | None:
    """The first epoch whose ``column`` reaches ``threshold`` (100% training accuracy), or None."""
    if metrics.empty or column not in metrics:
        return None
    hit = metrics.loc[metrics[column] >= threshold - 1e-12, "epoch"]
    return int(hit.iloc[0]) if len(hit) else None


def phase_contrast(matrix: np.ndarray, blocks: int = 2, min_size: int = 2) -> tuple[float, tuple[int, ...]]:
    """How clearly an epoch x epoch similarity matrix [K, K] splits into ``blocks`` consecutive training phases.

    Over every split of the K checkpoints into ``blocks`` consecutive runs of at least ``min_size``: mean similarity
    within a block (off the diagonal) minus mean similarity across blocks; returns the largest and the positions
    where its blocks 2.. start. 0 for a uniform matrix; near 1 for sharp blocks. (Our operationalisation of
    "training phases", for comparing runs; Sharon & Dar read the phases off the matrices by eye.)

    >>> m = np.full((4, 4), 0.2); m[:2, :2] = m[2:, 2:] = 0.9
    >>> c, starts = phase_contrast(m)
    >>> round(c, 6), starts
    (0.7, (2,))
    """
    import itertools

    m = np.asarray(matrix, dtype=np.float64)
    k = m.shape[0]
    if m.ndim != 2 or m.shape[1] != k or k < blocks * min_size:
        raise LayerlabError(f"phase_contrast: need a square matrix with >= {blocks * min_size} checkpoints, got {m.shape}")
    off = ~np.eye(k, dtype=bool)
    best: tuple[float, tuple[int, ...]] = (-np.inf, ())
    for cuts in itertools.combinations(range(min_size, k - min_size + 1), blocks - 1):
        edges = (0, *cuts, k)
        if any(edges[i + 1] - edges[i] < min_size for i in range(blocks)):
            continue
        block = np.repeat(np.arange(blocks), np.diff(edges))
        same = block[:, None] == block[None, :]
        c = float(m[same & off].mean() - m[~same].mean())
        if c > best[0]:
            best = (c, tuple(int(x) for x in cuts))
    return best


def phase_table(cka: pd.DataFrame, blocks: int = 2, value: str = "cka") -> pd.DataFrame:
    """:func:`phase_contrast` of every (run, layer) matrix of a dynamics table: run, layer, label, contrast, and
    phase_starts (the epochs where blocks 2.. start)."""
    rows = []
    for (run, layer), g in cka.groupby(["run", "layer"], sort=False):
        m = g.pivot_table(index="epoch_a", columns="epoch_b", values=value)
        c, starts = phase_contrast(m.to_numpy(), blocks)
        rows.append({"run": run, "layer": layer, "label": g["label"].iloc[0], "contrast": c,
                     "phase_starts": [int(m.index[i]) for i in starts]})
    return pd.DataFrame(rows)


def training_curves(run_dir: str | Path) -> pd.DataFrame:
    """metrics.csv of a run with ``run`` and ``first_fit_epoch`` (first epoch of 100% training accuracy) columns."""
    m = runs.run_metrics(run_dir)
    if m.empty:
        return m
    return m.assign(run=Path(run_dir).name, first_fit_epoch=first_fit_epoch(m))


#: how the decision-region triplets are drawn (part of the DRS store keys): from the run's own training set
TRIPLET_SOURCE = "run-training-set/trained-labels"
TRIPLET_TABLE = "dynamics-triplets"


def training_images(run: str | Path) -> ImageData:
    """The images a run trained on, with the labels it trained on, rebuilt from its run.json.

    The training loop (:func:`layerlab.train.train`) trains on ``load_data(data, "train", images=train_n, seed=seed)`` with
    the recipe's symmetric label noise applied by :func:`layerlab.train.loop.noisy_labels`; this calls the same two
    functions with the values run.json records. In the result, ``labels`` are the labels the network was trained
    with (the noisy ones included), ``meta["clean_labels"]`` the data set's own labels, ``meta["noisy"]`` a bool mask
    of the moved ones, and ``indices`` the data-set indices of the images (as for every :class:`ImageData`).

    Runs trained before the training lab's random streams (no ``rng`` in run.json, or another version) drew their
    subset and noise differently; they cannot be rebuilt when they used either, and this raises.
    """
    from .train.loop import RNG_STREAMS, noisy_labels

    config = runs.run_config(run)
    data = config.get("data")
    if not data:
        raise LayerlabError(f"{str(run)!r}: run.json records no 'data', so its training images cannot be rebuilt")
    recipe = config.get("recipe") or {}
    noise = float(recipe.get("label_noise") or 0.0)
    train_n, seed = config.get("train_n"), int(config.get("seed") or 0)
    rng = config.get("rng")
    if rng != RNG_STREAMS and (rng is not None or noise > 0 or train_n is not None):
        raise LayerlabError(
            f"{str(run)!r} was trained with random streams {rng or 'seed + k (before layerlab.seeds)'}, not "
            f"{RNG_STREAMS!r}: its training subset (train_n={train_n}) and noisy labels (label_noise={noise}) cannot be "
            "rebuilt by this version; retrain it (`layerlab train`, or delete the zoo folder and re-run the demo)"
        )
    train = load_data(data, "train", images=train_n, seed=seed)
    trained = noisy_labels(train.labels, noise, train.num_classes, seed)
    meta = dict(train.meta, clean_labels=train.labels.clone(), noisy=trained != train.labels, label_noise=noise,
                run=str(run))
    return ImageData(train.images, trained, train.indices, train.classes, train.spec, train.split, meta)


def triplet_table(train: ImageData, rows: torch.Tensor) -> pd.DataFrame:
    """One row per plane anchor: triplet, point (x1/x2/x3), row (in ``train``), index (data-set index), label (the
    label trained with), clean_label, noisy."""
    rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1, 3)
    flat = rows.reshape(-1)
    clean = train.meta.get("clean_labels", train.labels)
    noisy = train.meta.get("noisy", torch.zeros(len(train), dtype=torch.bool))
    return pd.DataFrame({
        "triplet": np.repeat(np.arange(rows.shape[0]), 3), "point": np.tile(["x1", "x2", "x3"], rows.shape[0]),
        "row": flat.numpy(), "index": train.indices[flat].numpy(), "label": train.labels[flat].numpy(),
        "clean_label": clean[flat].numpy(), "noisy": noisy[flat].numpy().astype(bool),
    })


def _warn_probe_rows(frame: pd.DataFrame, what: str) -> None:
    """One warning line when any probe row of ``frame`` did not converge (ProbeConvergenceWarning)."""
    if frame is None or frame.empty or "probe_converged" not in frame:
        return
    bad = frame[~frame["probe_converged"].astype(bool)]
    if bad.empty:
        return
    from .probes import ProbeConvergenceWarning

    capped = int((bad["probe_iterations"] >= bad["probe_max_iter"]).sum())
    where = ", ".join(f"{l}@{int(e)}" for l, e in list(zip(bad["layer"], bad["epoch"]))[:4])
    where += ", ..." if len(bad) > 4 else ""
    warn(
        f"{what}: {len(bad)} of {len(frame)} linear probes did not converge ({capped} stopped at the L-BFGS cap "
        f"probe_iter={'/'.join(str(int(v)) for v in sorted(set(bad['probe_max_iter'])))}: {where}); their accuracies "
        "are biased low; raise probe_iter (rows: probe_converged == False)",
        ProbeConvergenceWarning,
    )


def _load(path: Path, device: str | torch.device) -> nn.Module:
    return load_model(f"file:{path}", device=device).eval()


def _resolve_views(model: nn.Module, requested: str | Sequence[str] | None) -> list[str]:
    """The module paths to analyse (:func:`layerlab.features.select_layers`, default :func:`default_layers`), plus
    "output" (the logits) last."""
    requested = [requested] if isinstance(requested, str) else list(requested or [])
    if not requested:
        return default_layers(model) + [OUTPUT_KEY]
    inner = [r for r in requested if r != OUTPUT_KEY]  # ["output"] alone: the logits only
    return [n for n in (select_layers(model, inner) if inner else []) if n != OUTPUT_KEY] + [OUTPUT_KEY]


def _trim(data: ImageData, batch_size: int) -> tuple[ImageData, int]:
    """Keep whole batches only (minibatch CKA weighs every batch equally); one batch if fewer images."""
    n = len(data)
    b = min(batch_size, n)
    keep = (n // b) * b
    return (data.subset(torch.arange(keep)) if keep < n else data), b


def _run_identity(run: Path) -> str:
    blob = (run / "run.json").read_bytes()
    return f"run:{run.resolve()}#{hashlib.sha256(blob).hexdigest()[:12]}"


# --------------------------------------------------------------------------------------------- one pass
@dataclass
class _Inputs:
    cka_images: torch.Tensor  # float [N, C, H, W]
    cka_batch: int
    probe_train: ImageData | None
    probe_test: ImageData | None
    triplets: torch.Tensor | None  # float [T, 3, C, H, W]
    num_classes: int


def _slices(images: torch.Tensor, batch: int) -> Iterator[torch.Tensor]:
    return (images[start : start + batch] for start in range(0, images.shape[0], batch))


def _features(model: nn.Module, layers: list[str], batches: Iterable[torch.Tensor], device: str | torch.device,
              transform: Callable[[torch.Tensor], torch.Tensor], output: bool = False,
              tokens: str = "flatten") -> dict[str, list[torch.Tensor]]:
    """``{view: [transform(features) per batch]}`` over image batches, computed inside the forward hooks."""
    out: dict[str, list[torch.Tensor]] = {}
    with Extractor(model, layers, pool=False, flatten=False, include_output=output, transform=transform,
                   tokens=tokens) as ex:
        for x in batches:
            with torch.inference_mode():
                feats = ex(as_input(x.to(device)))
            for k, v in feats.items():
                out.setdefault(k, []).append(v.cpu())
    return out


def _checkpoint_pass(model: nn.Module, cfg: DynamicsConfig, inputs: _Inputs, cka_views: list[str],
                     probe_layers: list[str], drs_views: list[str], device: str | torch.device,
                     gram: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Everything one checkpoint contributes: Gram matrices (formed by ``gram`` inside the hooks), fitted probes
    and their scores, plane predictions."""
    result: dict[str, Any] = {"grams": {}, "probes": {}, "preds": {}}
    if cka_views:
        inner = [v for v in cka_views if v != OUTPUT_KEY]
        feats = _features(model, inner, _slices(inputs.cka_images, inputs.cka_batch), device, gram,
                          OUTPUT_KEY in cka_views, cfg.tokens)
        result["grams"] = {v: torch.stack(feats[v]) for v in cka_views}
    if probe_layers:
        view = lambda t: probe_features(t, cfg.probe_pool).float()  # noqa: E731
        tokens = PROBE_TOKENS[cfg.tokens]
        tr = _features(model, probe_layers, _slices(inputs.probe_train.float(), 256), device, view, tokens=tokens)
        te = _features(model, probe_layers, _slices(inputs.probe_test.float(), 256), device, view, tokens=tokens)
        for layer in probe_layers:
            xtr, xte = torch.cat(tr[layer]), torch.cat(te[layer])
            p = fit_probe(xtr, inputs.probe_train.labels, num_classes=inputs.num_classes, method=cfg.probe_method,
                          l2=cfg.probe_l2, max_iter=cfg.probe_iter, tol=cfg.probe_tol, warn=False)
            w, b = p.fold(torch.float32)
            acc = lambda x, y: float(((x @ w + b).argmax(1) == y).double().mean())  # noqa: E731
            result["probes"][layer] = (p, acc(xtr, inputs.probe_train.labels), acc(xte, inputs.probe_test.labels), xtr.shape[1])
    if drs_views:
        result["preds"] = _plane_predictions(model, cfg, inputs, drs_views, result["probes"], device)
    return result


def _view_logits(model: nn.Module, layers: list[str], probes: dict[str, tuple], pool: int,
                 device: str | torch.device, tokens: str = "flatten") -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """images -> {view: logits}: each layer through its probe, and the network output."""
    folded = {l: probes[l][0].fold(torch.float32, device) for l in layers}
    ex = Extractor(model, layers, pool=False, flatten=False, include_output=True, tokens=PROBE_TOKENS[tokens],
                   transform=lambda t: probe_features(t, pool).float()) if layers else None

    def fn(x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = as_input(x.to(device))
        with torch.inference_mode():
            if ex is None:
                return {OUTPUT_KEY: model(x).float()}
            feats = ex(x)
            out = {l: feats[l] @ folded[l][0] + folded[l][1] for l in layers}
            out[OUTPUT_KEY] = feats[OUTPUT_KEY].float()
            return out

    return fn


def _plane_predictions(model: nn.Module, cfg: DynamicsConfig, inputs: _Inputs, views: list[str],
                       probes: dict[str, tuple], device: str | torch.device) -> dict[str, np.ndarray]:
    layers = [v for v in views if v != OUTPUT_KEY]
    fn = _view_logits(model, layers, probes, cfg.probe_pool, device, cfg.tokens)
    chunks: dict[str, list[np.ndarray]] = {v: [] for v in views}
    for pts in iter_plane_batches(inputs.triplets, cfg.resolution, cfg.margin, batch_size=512):
        logits = fn(pts)
        for v in views:
            chunks[v].append(logits[v].argmax(1).to("cpu", torch.uint8).numpy())
    return {v: np.concatenate(chunks[v]) for v in views}


# -------------------------------------------------------------------------------------------- assembling
def _cka_frame(grams: list[torch.Tensor], epochs: list[int], cfg: DynamicsConfig, gram_dtype: str) -> pd.DataFrame:
    """grams: per checkpoint [n_batches, b, b] -> tidy epoch x epoch CKA table."""
    acc = CKAAccumulator(len(epochs), kernel=cfg.kernel, estimator=cfg.estimator, names_a=[str(e) for e in epochs])
    for bi in range(grams[0].shape[0]):
        acc.update_grams([g[bi].clone() for g in grams])
    f = acc.to_frame().rename(columns={"layer_a": "epoch_a", "layer_b": "epoch_b"})
    f["epoch_a"] = f["epoch_a"].astype(int)
    f["epoch_b"] = f["epoch_b"].astype(int)
    f["batch_size"] = int(grams[0].shape[-1])
    f["gram_dtype"] = gram_dtype
    return f


def _drs_frame(preds: np.ndarray, epochs: list[int], n_triplets: int) -> pd.DataFrame:
    """preds [K, T * P] (uint8) -> mean and std over triplets of the per-triplet agreement, every epoch pair."""
    k = preds.shape[0]
    p = preds.reshape(k, n_triplets, -1)
    rows = []
    for i in range(k):
        agree = (np.asarray(p[i])[None] == p).mean(axis=2)  # [K, T]
        for j in range(k):
            rows.append((epochs[i], epochs[j], float(agree[j].mean()), float(agree[j].std(ddof=1)) if n_triplets > 1 else 0.0))
    return pd.DataFrame(rows, columns=["epoch_a", "epoch_b", "drs", "drs_std"])


def _pred_array(k: int, n_views: int, points: int) -> np.ndarray:
    nbytes = k * n_views * points
    if nbytes <= _MEMMAP_BYTES:
        return np.empty((k, n_views, points), dtype=np.uint8)
    tmp = tempfile.NamedTemporaryFile(prefix="layerlab-drs-", suffix=".npy", delete=False)
    tmp.close()
    return np.lib.format.open_memmap(tmp.name, mode="w+", dtype=np.uint8, shape=(k, n_views, points))


def _progress(items: list, on: bool, desc: str):
    if not on:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="ckpt", leave=False)


# ------------------------------------------------------------------------------------------------ public
def dynamics(
    run_dir: str | Path,
    data: str | None = None,
    *,
    store: Store | str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    **options: Any,
) -> dict[str, pd.DataFrame]:
    """Representation dynamics of one training run: ``{"cka", "probes", "drs", "triplets", "training"}`` tidy tables.

    ``data``: data spec of the CKA probe set and of the linear probes' images (default: the run's own, from
    run.json); the decision-region planes always go through the run's own training images (:func:`training_images`).
    ``options``: the fields of :class:`DynamicsConfig` (``layers``, ``epochs``, ``max_checkpoints``, ``images``,
    ``batch_size``, ``triplets``, ``resolution``, ``probe_pool``, ``probe_iter`` ...). With ``store`` every
    (table, layer) is one shard and existing shards are read, not recomputed. A probe that stops at the L-BFGS cap
    before converging is recorded (``probe_converged`` False) and reported in one ``ProbeConvergenceWarning``.

    Tables (one row per observation):

    * cka: run, layer, label, epoch_a, epoch_b, cka, estimator, kernel, n, n_batches, batch_size
    * probes: run, layer, label, epoch, train_acc, test_acc, dim, method, l2, n_train, n_test, probe_iterations,
      probe_converged, probe_max_iter
    * drs: run, layer, label, kind ("probe" or "network"), epoch_a, epoch_b, drs, drs_std, triplets, resolution, margin
    * triplets (with drs): run, triplet, point, row, index (data-set index), label (trained with), clean_label, noisy:
      the three training images of every plane, drawn by the label the network was trained with
    * training: the run's metrics.csv plus run and first_fit_epoch (first epoch of 100% training accuracy)
    """
    run = Path(run_dir)
    cfg = _config(**options)
    config_json = runs.run_config(run)  # raises a teaching error when run.json is missing
    ckpts = dict(runs.checkpoints(run))
    if not ckpts:
        raise LayerlabError(f"run {str(run)!r} has no checkpoints (checkpoints/epoch_XXXX.pt); train it with `layerlab train`")
    epochs = select_epochs(list(ckpts), cfg.epochs, cfg.max_checkpoints)
    if "cka" in cfg.tables or "drs" in cfg.tables:
        if len(epochs) < 2:
            raise LayerlabError(f"an epoch x epoch matrix needs at least 2 checkpoints, got epochs {epochs}")
    data = data or config_json.get("data") or "digits"
    store = Store(store) if isinstance(store, (str, Path)) else store
    first = _load(ckpts[epochs[0]], device)
    views = _resolve_views(first, cfg.layers)
    labels = layer_labels(first, views)
    layers = [v for v in views if v != OUTPUT_KEY]
    run_name = run.name
    identity = _run_identity(run)

    def key_config(table: str, view: str) -> dict[str, Any]:
        # a token choice enters a key only where it is not the default, so every earlier key stays valid
        c = cfg.to_dict()
        shared = {"layer": view, "epochs": epochs, "data": data}
        if table == "cka":
            tokens = {"tokens": cfg.tokens} if cfg.tokens != "flatten" else {}
            return shared | {k: c[k] for k in ("images", "batch_size", "split", "estimator", "kernel", "seed")} | tokens
        probe = {k: c[k] for k in ("probe_method", "probe_l2", "probe_iter", "probe_tol", "probe_pool", "probe_train",
                                   "seed")}
        if PROBE_TOKENS[cfg.tokens] != "mean":
            probe["tokens"] = PROBE_TOKENS[cfg.tokens]
        if table == "probes":
            return shared | probe
        return shared | probe | {k: c[k] for k in ("triplets", "resolution", "margin")} | {"triplet_source": TRIPLET_SOURCE}

    wanted = {
        "cka": views if "cka" in cfg.tables else [],
        "probes": layers if "probes" in cfg.tables else [],
        "drs": views if "drs" in cfg.tables else [],
    }
    keys = {(t, v): job_key(identity, TABLES[t], key_config(t, v)) for t, vs in wanted.items() for v in vs}
    missing = {tv for tv, k in keys.items() if store is None or not store.has(TABLES[tv[0]], k)}

    # the planes: triplets of the run's own training images (stored, so a cached call needs no data)
    triplet_key = job_key(identity, TRIPLET_TABLE, {"triplets": cfg.triplets, "seed": cfg.seed, "source": TRIPLET_SOURCE})
    triplet_frame, triplet_images = None, None
    if wanted["drs"]:
        drs_missing = any(t == "drs" for t, _ in missing)
        if drs_missing or store is None or not store.has(TRIPLET_TABLE, triplet_key):
            train = training_images(run)
            check_label_coverage(num_outputs(first, train.float()[:1]), train, f"run {run_name!r}")
            rows = sample_triplets(train.labels, cfg.triplets, seed=cfg.seed)
            triplet_images = train.float()[rows]
            triplet_frame = triplet_table(train, rows).assign(run=run_name)
            triplet_frame = triplet_frame[["run"] + [c for c in triplet_frame.columns if c != "run"]]
            if store is not None:
                store.write(TRIPLET_TABLE, triplet_key, triplet_frame,
                            {"model": identity, "config": {"triplets": cfg.triplets, "seed": cfg.seed,
                                                           "source": TRIPLET_SOURCE}})
        else:
            triplet_frame = store.read_shard(TRIPLET_TABLE, triplet_key)

    computed: dict[tuple[str, str], pd.DataFrame] = {}
    fitted = pd.DataFrame()
    if missing:
        computed, fitted = _compute(run, ckpts, epochs, cfg, data, missing, device, progress, first, triplet_images)
    frames: dict[str, list[pd.DataFrame]] = {t: [] for t in TABLES}
    for (table, view), key in keys.items():
        if (table, view) in computed:
            frame = computed[(table, view)].assign(run=run_name, layer=view, label=labels[view])
            frame = frame[["run", "layer", "label"] + [c for c in frame.columns if c not in ("run", "layer", "label")]]
            if store is not None:
                store.write(TABLES[table], key, frame, {"model": identity, "config": key_config(table, view)})
        else:
            frame = store.read_shard(TABLES[table], key)
        frames[table].append(frame)
    out = {t: (pd.concat(fs, ignore_index=True) if fs else pd.DataFrame()) for t, fs in frames.items()}
    # one warning for every unconverged probe of the table, or of the probes fitted only for the DRS
    _warn_probe_rows(out["probes"] if not out["probes"].empty else fitted, f"dynamics {run_name}")
    out["triplets"] = triplet_frame if triplet_frame is not None else pd.DataFrame()
    out["training"] = training_curves(run)
    return out


def _compute(run: Path, ckpts: dict[int, Path], epochs: list[int], cfg: DynamicsConfig, data: str,
             missing: set[tuple[str, str]], device: str | torch.device, progress: bool, first: nn.Module,
             triplets: torch.Tensor | None) -> tuple[dict[tuple[str, str], pd.DataFrame], pd.DataFrame]:
    cka_views = [v for (t, v) in sorted(missing) if t == "cka"]
    drs_views = [v for (t, v) in sorted(missing) if t == "drs"]
    probe_layers = sorted({v for (t, v) in missing if t in ("probes", "drs") and v != OUTPUT_KEY})
    # keep the model's layer order
    order = {n: i for i, (n, _) in enumerate(first.named_modules())}
    order[OUTPUT_KEY] = len(order)
    cka_views.sort(key=order.get)
    drs_views.sort(key=order.get)
    probe_layers.sort(key=order.get)

    cka_images, cka_batch = torch.zeros(0), 1
    if cka_views:
        cka_set, cka_batch = _trim(load_data(data, cfg.split, images=cfg.images, seed=cfg.seed), cfg.batch_size)
        cka_images = cka_set.float()
    need_probe = bool(probe_layers)
    probe_train = load_data(data, "train", images=cfg.probe_train, seed=cfg.seed) if need_probe else None
    probe_test = load_data(data, "test") if need_probe else None
    # the model must be able to predict every class of the data it is analysed on
    analysed = ([cka_set] if cka_views else []) + ([probe_train, probe_test] if need_probe else [])
    if analysed:
        n_out = num_outputs(first, analysed[0].float()[:1])
        for d in analysed:
            check_label_coverage(n_out, d, f"run {run.name!r}")
    num_classes = probe_train.num_classes if need_probe else 0
    inputs = _Inputs(cka_images, cka_batch, probe_train, probe_test, triplets, num_classes)

    k = len(epochs)
    points = cfg.triplets * cfg.resolution**2
    preds = _pred_array(k, len(drs_views), points) if drs_views else None
    grams: dict[str, list[torch.Tensor]] = {v: [] for v in cka_views}
    grammer = CKAAccumulator(1, kernel=cfg.kernel)  # only its gram(), which also records the precision used
    probe_rows: list[dict[str, Any]] = []
    for i, epoch in enumerate(_progress(epochs, progress, f"dynamics {run.name}")):
        model = first if i == 0 else _load(ckpts[epoch], device)
        res = _checkpoint_pass(model, cfg, inputs, cka_views, probe_layers, drs_views, device, grammer.gram)
        for v in cka_views:
            grams[v].append(res["grams"][v])
        for layer, (p, tr_acc, te_acc, dim) in res["probes"].items():
            probe_rows.append({"layer": layer, "epoch": epoch, "train_acc": tr_acc, "test_acc": te_acc, "dim": dim,
                               "method": cfg.probe_method, "l2": cfg.probe_l2, "n_train": len(probe_train),
                               "n_test": len(probe_test), "probe_iterations": p.iterations,
                               "probe_converged": p.converged, "probe_max_iter": p.max_iter})
        for j, v in enumerate(drs_views):
            preds[i, j] = res["preds"][v]
        del model, res

    out: dict[tuple[str, str], pd.DataFrame] = {}
    for v in cka_views:
        out[("cka", v)] = _cka_frame(grams[v], epochs, cfg, grammer.gram_precision)
    probes = pd.DataFrame(probe_rows)
    for (t, v) in missing:
        if t == "probes":
            out[(t, v)] = probes[probes["layer"] == v].drop(columns="layer").reset_index(drop=True)
    for j, v in enumerate(drs_views):
        f = _drs_frame(preds[:, j], epochs, cfg.triplets)
        f.insert(0, "kind", "network" if v == OUTPUT_KEY else "probe")
        out[("drs", v)] = f.assign(triplets=cfg.triplets, resolution=cfg.resolution, margin=cfg.margin)
    if isinstance(preds, np.memmap):
        name = preds.filename
        del preds
        Path(name).unlink(missing_ok=True)
    return out, probes


#: images="auto": this many CKA probe images of indexable data, or all when it holds fewer
AUTO_IMAGES = 256


def _compare_model(model: ModelLike, device: str | torch.device | None, what: str) -> tuple[nn.Module, str]:
    """(module, name for the table): a spec loaded in eval mode on ``device`` (default the CPU), or the caller's
    module where it is (never moved; a ``device`` of another type is an error)."""
    if isinstance(model, str):
        return load_model(model, device=resolve_device(device)), model
    if not isinstance(model, nn.Module):
        raise LayerlabError(f"{what}: expected a model spec ('timm:resnet18', 'file:run/final.pt') or an nn.Module, "
                            f"got {type(model).__name__}")
    have = model_device(model) or torch.device("cpu")
    if device is not None and resolve_device(device).type != have.type:
        raise LayerlabError(f"{what} is on {have} but device={str(device)!r}; move it first with model.to(...) "
                            "(layerlab never moves a model it was handed) or leave device=None")
    return model, getattr(model, "layerlab_spec", None) or type(model).__name__


def _probe_batches(data: DataLike, images: int | str | None, batch_size: int, seed: int, split: str) -> Batches:
    """The probe images as batches (:func:`layerlab.data.as_batches`). ``images="auto"``: :data:`AUTO_IMAGES` of
    indexable data (a fixed seeded subset; all when it holds fewer), every image of a DataLoader."""
    if images != "auto":
        return as_batches(data, batch_size, images=images, seed=seed, split=split, arg="images=")
    try:
        source = as_batches(data, batch_size, images=AUTO_IMAGES, seed=seed, split=split, arg="images=")
    except DataError:  # fewer images than AUTO_IMAGES: take them all
        return as_batches(data, batch_size, images=None, seed=seed, split=split, arg="images=")
    if isinstance(source, LoaderBatches):  # a DataLoader's own images, not its first AUTO_IMAGES
        return as_batches(data, batch_size, images=None, seed=seed, split=split, arg="images=")
    return source


def _equal_batches(source: Batches) -> Iterator[torch.Tensor]:
    """The source's image batches of the first batch's size: minibatch CKA weighs every batch equally, so a short
    last batch is left out (the table's ``n`` counts the images used)."""
    size = None
    for x, _ in source.batches():
        size = size or x.shape[0]
        if x.shape[0] == size:
            yield x


def compare(
    model_a: ModelLike,
    model_b: ModelLike,
    data: DataLike = "digits",
    *,
    layers_a: str | Sequence[str] | None = None,
    layers_b: str | Sequence[str] | None = None,
    tokens: str = "flatten",
    images: int | str | None = "auto",
    batch_size: int = 64,
    split: str = "test",
    estimator: str = "unbiased",
    kernel: str = "linear",
    seed: int = 0,
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Layer x layer CKA between two models on the same images: model_a, model_b, layer_a, label_a, layer_b,
    label_b, cka, estimator, kernel, n, n_batches, gram_dtype, batch_size, tokens (minibatch unbiased CKA by default).

    Args:
        model_a, model_b: model specs (``timm:resnet18``, ``file:run/final.pt``) or any ``nn.Module`` (used where
            it is, in eval mode for the call, never moved or modified).
        data: a data spec, an ImageData, a tensor, an ``(images, labels)`` pair, a Dataset or a DataLoader
            (:func:`layerlab.data.as_batches`; the user's own images are fed as given). ``images``: a fixed seeded
            subset of indexable data (``"auto"``: 256, or all when fewer; ``None``: all), the first N of a
            DataLoader (``"auto"``: all of it). Batches are ``batch_size`` images (a DataLoader's own batches); a
            batch smaller than the first (the short last one) is left out, so every batch weighs the same.
        layers_a, layers_b: :func:`layerlab.features.select_layers` items (module paths, labels, ``"blocks"``,
            ``"layers"``, ``"kind:Conv2d"``); default :func:`default_layers` (stem and blocks). The logits
            (``"output"``) are always added.
        tokens: how a token output [N, T, D] becomes features: ``"flatten"`` (all T x D values, the default),
            ``"cls"`` (token 0, the class token of timm/torchvision ViTs; refused for a model without one) or
            ``"mean"`` (the token average). Conv maps are always flattened whole.
        estimator, kernel: of :class:`~layerlab.similarity.CKAAccumulator`.
        device: where specs are loaded (default the CPU); a module computes where it is.

    Example:
        >>> net = lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        >>> f = compare(net(), net(), torch.rand(32, 1, 8, 8), layers_a="kind:Conv2d", layers_b="layers", batch_size=8)
        >>> f[["layer_a", "layer_b"]].apply(tuple, axis=1).tolist()
        [('0', '0'), ('0', '3'), ('0', 'output'), ('output', '0'), ('output', '3'), ('output', 'output')]
    """
    tokens = check_tokens(tokens)
    (ma, name_a), (mb, name_b) = _compare_model(model_a, device, "model_a"), _compare_model(model_b, device, "model_b")
    va, vb = _resolve_views(ma, layers_a), _resolve_views(mb, layers_b)
    source = _probe_batches(data, images, batch_size, seed, split)
    acc = CKAAccumulator(len(va), len(vb), kernel=kernel, estimator=estimator, names_a=va, names_b=vb)

    def grams(model: nn.Module, views: list[str]) -> dict[str, list[torch.Tensor]]:
        inner = [v for v in views if v != OUTPUT_KEY]
        with eval_mode(model):
            return _features(model, inner, _equal_batches(source), model_device(model) or "cpu", acc.gram,
                             OUTPUT_KEY in views, tokens)

    ga, gb = grams(ma, va), grams(mb, vb)
    for bi in range(len(ga[va[0]])):
        acc.update_grams([ga[v][bi] for v in va], [gb[v][bi] for v in vb])
    f = acc.to_frame()
    f.insert(0, "model_b", name_b)
    f.insert(0, "model_a", name_a)
    f.insert(f.columns.get_loc("layer_a") + 1, "label_a", f["layer_a"].map(layer_labels(ma, va)))
    f.insert(f.columns.get_loc("layer_b") + 1, "label_b", f["layer_b"].map(layer_labels(mb, vb)))
    f["batch_size"] = int(ga[va[0]][0].shape[-1])
    f["tokens"] = tokens
    return f


def decision_regions(
    run_dir: str | Path,
    data: str | None = None,
    *,
    epochs: Sequence[int] | None = None,
    layers: str | Sequence[str] | None = None,
    tokens: str = "flatten",
    triplet: int | Sequence[int] = 0,
    resolution: int = 100,
    margin: float = 0.1,
    temperature: float = 5.0,
    probe_method: str = "softmax",
    probe_l2: float = 1e-3,
    probe_iter: int = DEFAULT_MAX_ITER,
    probe_tol: float = DEFAULT_TOL,
    probe_pool: int = 2,
    probe_train: int | None = 1000,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, pd.DataFrame]:
    """Decision regions on one plane for chosen checkpoints: the network and each layer's probe.

    The plane goes through three of the run's own training images (:func:`training_images`). ``triplet``: an index
    into the seeded triplet sample (as in the DRS: triplet k here is plane k there), or three rows of the run's
    training set with three distinct training labels. ``data``: the images the probes are fitted and scored on
    (default: the run's own). Returns ``{"regions": run, epoch, layer, label, i, j, c1, c2, pred, confidence;
    "anchors": point, row, index, class, clean_class, noisy, c1, c2; "probes": run, epoch, layer, train_acc,
    test_acc, probe_iterations, probe_converged, probe_max_iter}`` with confidence = max softmax(logits /
    temperature) (Somepalli et al. 2022 use temperature 5); ``class`` is the label the network was trained with,
    ``clean_class`` the data set's, ``index`` the data-set index. ``layers``: :func:`layerlab.features.select_layers`
    items (default :func:`default_layers`); ``tokens="cls"`` fits the probes of token layers on the class token
    (else the token mean, :data:`PROBE_TOKENS`).
    """
    run = Path(run_dir)
    config_json = runs.run_config(run)
    ckpts = dict(runs.checkpoints(run))
    if not ckpts:
        raise LayerlabError(f"run {str(run)!r} has no checkpoints; train it with `layerlab train`")
    chosen = select_epochs(list(ckpts), epochs)
    data = data or config_json.get("data") or "digits"
    pool = training_images(run)
    if isinstance(triplet, int):
        rows = sample_triplets(pool.labels, triplet + 1, seed=seed)[triplet]
    else:
        rows = torch.as_tensor(list(triplet), dtype=torch.long)
        if rows.numel() != 3 or not bool(((rows >= 0) & (rows < len(pool))).all()) or len(set(pool.labels[rows].tolist())) != 3:
            raise LayerlabError(f"triplet: expected three rows (0..{len(pool) - 1}) of the run's training set with three "
                                f"distinct training labels, got {list(triplet)}")
    imgs = pool.float()[rows]
    basis = plane_basis(*imgs)
    c1, c2 = plane_coords(basis.anchors, resolution, margin)
    coords = grid_coords(c1, c2)
    points = plane_points(basis, coords, tuple(imgs.shape[1:]))
    cfg = DynamicsConfig(probe_method=probe_method, probe_l2=probe_l2, probe_iter=probe_iter, probe_tol=probe_tol,
                         probe_pool=probe_pool, probe_train=probe_train, seed=seed, tokens=tokens)
    probe_train_set = load_data(data, "train", images=probe_train, seed=seed)
    probe_test = load_data(data, "test")
    ii, jj = np.meshgrid(np.arange(resolution), np.arange(resolution))  # point index = j * R + i
    frames, probe_rows = [], []
    for epoch in chosen:
        model = _load(ckpts[epoch], device)
        if epoch == chosen[0]:  # the model must be able to predict every class of the images it is shown
            n_out = num_outputs(model, imgs[:1])
            for d in (pool, probe_train_set, probe_test):
                check_label_coverage(n_out, d, f"run {run.name!r}")
        views = _resolve_views(model, layers)
        labels = layer_labels(model, views)
        inner = [v for v in views if v != OUTPUT_KEY]
        inputs = _Inputs(torch.zeros(0), 1, probe_train_set, probe_test, None, probe_train_set.num_classes)
        res = _checkpoint_pass(model, cfg, inputs, [], inner, [], device)
        for layer, (p, tr_acc, te_acc, _) in res["probes"].items():
            probe_rows.append({"run": run.name, "epoch": epoch, "layer": layer, "train_acc": tr_acc, "test_acc": te_acc,
                               "probe_iterations": p.iterations, "probe_converged": p.converged,
                               "probe_max_iter": p.max_iter})
        fn = _view_logits(model, inner, res["probes"], probe_pool, device, tokens)
        logits: dict[str, list[torch.Tensor]] = {v: [] for v in views}
        for start in range(0, points.shape[0], 512):
            out = fn(points[start : start + 512])
            for v in views:
                logits[v].append(out[v].cpu())
        for v in views:
            lg = torch.cat(logits[v]).double()
            conf = torch.softmax(lg / temperature, dim=1).max(dim=1).values
            frames.append(pd.DataFrame({
                "run": run.name, "epoch": epoch, "layer": v, "label": labels[v], "i": ii.reshape(-1), "j": jj.reshape(-1),
                "c1": coords[:, 0].numpy(), "c2": coords[:, 1].numpy(), "pred": lg.argmax(1).numpy(),
                "confidence": conf.numpy(),
            }))
    probes = pd.DataFrame(probe_rows)
    _warn_probe_rows(probes, f"decision_regions {run.name}")
    anchors = triplet_table(pool, rows[None]).drop(columns="triplet").rename(
        columns={"label": "class", "clean_label": "clean_class"})
    anchors["c1"], anchors["c2"] = basis.anchors[:, 0].numpy(), basis.anchors[:, 1].numpy()
    return {"regions": pd.concat(frames, ignore_index=True), "anchors": anchors, "probes": probes}


# ==================================================================================================== demo
#: analysis settings of the demo step: small enough for a 2-core CPU, the same code path as the full study
DEMO_OPTIONS: dict[str, Any] = {"images": 256, "batch_size": 64, "triplets": 16, "resolution": 20,
                                "probe_train": 500}  # probes: the library's L-BFGS defaults (run to convergence)


def fit_summary(training: pd.DataFrame, checkpoint_epochs: dict[str, list[int]]) -> pd.DataFrame:
    """Per run: first epoch of 100% training accuracy, the learning rate then (and its fraction of the peak), the
    checkpoints after it and the last epoch (is the phase after the fit long enough to show?)."""
    rows = []
    for run, m in training.groupby("run", sort=False):
        fit = first_fit_epoch(m)
        at = m.loc[m["epoch"] == fit] if fit is not None else m.iloc[0:0]
        lr = float(at["lr"].iloc[0]) if len(at) and "lr" in m else float("nan")
        peak = float(m["lr"].max()) if "lr" in m else float("nan")
        after = [e for e in checkpoint_epochs.get(run, []) if fit is not None and e > fit]
        low = float(m.loc[m["epoch"] >= fit, "train_acc"].min()) if fit is not None else float("nan")
        rows.append({"run": run, "first_fit_epoch": fit, "epochs": int(m["epoch"].max()), "lr_at_fit": lr,
                     "lr_fraction_of_peak": lr / peak if peak else float("nan"), "checkpoints_after_fit": len(after),
                     "train_acc_after_fit_min": low})
    return pd.DataFrame(rows)


def demo_layers(model: nn.Module, count: int = 4) -> list[str]:
    """About ``count`` blocks spread over the depth: the last block of each ResNet stage, or evenly spaced ViT blocks."""
    blocks = structure.find_blocks(model) or default_layers(model)
    stages: dict[str, str] = {}
    for b in blocks:
        stages[b.rsplit(".", 1)[0]] = b  # keeps the last block of each stage
    picked = list(stages.values()) if len(stages) > 1 else blocks
    if len(picked) > count:
        picked = [picked[int(i)] for i in np.round(np.linspace(0, len(picked) - 1, count))]
    return picked


def _register_demo_step() -> None:
    from .demo import step

    @step("dynamics")
    def dynamics_step(ctx) -> None:
        """Sharon & Dar at small scale: ResNet and ViT, SGD and Adam, 20% label noise, trained past 100% train
        accuracy; CKA, probe accuracy and decision-region similarity over training, four runs side by side."""
        from .plots.dynamics import decision_regions as plot_regions
        from .plots.dynamics import save_dynamics, save_figure
        from .train import load_zoo, train_zoo

        zoo = load_zoo("dynamics")
        zoo_dir = ctx.out / "dynamics-zoo"
        train_zoo(zoo, zoo_dir, device=ctx.device, progress=ctx.progress)
        parts = []
        for entry in zoo.entries:
            run = zoo_dir / entry.name
            layers = demo_layers(_load(runs.checkpoints(run)[0][1], "cpu"))
            parts.append(dynamics(run, store=ctx.store, device=ctx.device, layers=layers, **DEMO_OPTIONS))
        tables = {k: pd.concat([p[k] for p in parts], ignore_index=True) for k in parts[0]}
        fig_dir = ctx.out / "figures" / "dynamics"
        paths = save_dynamics(tables, fig_dir)
        first = zoo.entries[0].name
        ckpt_epochs = [e for e, _ in runs.checkpoints(zoo_dir / first)]
        fit = tables["training"].loc[tables["training"]["run"] == first, "first_fit_epoch"].iloc[0]
        middle = min(ckpt_epochs, key=lambda e: abs(e - fit)) if pd.notna(fit) else ckpt_epochs[len(ckpt_epochs) // 2]
        shown = sorted({ckpt_epochs[0], ckpt_epochs[2], ckpt_epochs[len(ckpt_epochs) // 2], middle, ckpt_epochs[-1]})
        layers = demo_layers(_load(runs.checkpoints(zoo_dir / first)[0][1], "cpu"))
        r = decision_regions(zoo_dir / first, epochs=shown, layers=layers, resolution=50,
                             probe_train=DEMO_OPTIONS["probe_train"], device=ctx.device)
        paths += save_figure(plot_regions(r["regions"], r["anchors"]), fig_dir, f"dynamics_regions_{first}")
        cka = tables["cka"]
        off = cka[(cka["epoch_a"] == cka.groupby("run")["epoch_a"].transform("min")) &
                  (cka["epoch_b"] == cka.groupby("run")["epoch_b"].transform("max"))]
        summary = off.pivot_table(index="run", columns="label", values="cka", sort=False)
        print("CKA(first checkpoint, last checkpoint) per layer (unbiased minibatch, linear):")
        print(summary.to_string(float_format=lambda v: f"{v:.2f}"))
        fits = fit_summary(tables["training"], {e.name: [c for c, _ in runs.checkpoints(zoo_dir / e.name)]
                                                 for e in zoo.entries})
        print("the fit (first epoch of 100% training accuracy on the labels trained with) and what follows it:")
        print(fits.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        phases = phase_table(cka[cka["layer"] != OUTPUT_KEY])
        print("phase contrast of the layers' CKA matrices (2 blocks; within - across, mean [min, max] over layers):")
        print(", ".join(f"{r} {g.mean():.2f} [{g.min():.2f}, {g.max():.2f}]"
                        for r, g in phases.groupby("run", sort=False)["contrast"]))
        anchors = pd.concat([p["triplets"] for p in parts], ignore_index=True)
        print(f"decision-region planes: {len(anchors)} anchors, all from the runs' own training sets "
              f"({int(anchors['noisy'].sum())} with a noisy training label)")
        print(f"figures: {fig_dir} ({len(paths)} files)")


_register_demo_step()
