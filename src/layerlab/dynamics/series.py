"""The checkpoint-series analysis: :func:`dynamics`, representations of one training run over its checkpoints
(Sharon & Dar 2024, arXiv 2405.17377; METHODS.md section 2).

How it is computed. One pass over the checkpoints loads each checkpoint once and, per layer, keeps only what the
all-pairs results need (:mod:`layerlab.dynamics.passes`): the b x b Gram matrix of every probe-set batch (formed
inside the forward hook, so memory is K * V * N * b * 8 bytes for K checkpoints, V views, N probe images and batch
size b, independent of layer width), the fitted probe (a d x C matrix) and the predicted class of every plane point
(one byte per point; a disk-backed array beyond 256 MiB). After the pass, one
:class:`~layerlab.similarity.CKAAccumulator` per layer sums the HSIC terms of all K x K checkpoint pairs batch by
batch, and the DRS matrix compares the stored predictions. No feature map is recomputed per checkpoint pair.

Results are tidy tables; with a :class:`~layerlab.store.Store` each (run, table, layer, config) is one shard, so a
killed analysis resumes and a repeated call computes nothing.
"""
from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import runs
from ..data import ImageData, check_label_coverage, load_data
from ..errors import LayerlabError
from ..features import OUTPUT_KEY, layer_labels
from ..models import num_outputs
from ..regions import sample_triplets
from ..similarity import CKAAccumulator, pairwise_cka_inference
from ..runtime import progress
from ..store import Store, job_key, resumed
from .config import PROBE_TOKENS, TABLES, DynamicsConfig, _config
from .passes import _checkpoint_pass, _Inputs, _warn_probe_rows
from .training import TRIPLET_SOURCE, TRIPLET_TABLE, training_curves, training_images, triplet_table
from .views import _load, _resolve_views

__all__ = ["dynamics", "select_epochs"]

_MEMMAP_BYTES = 256 * 2**20


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


def _trim(data: ImageData, batch_size: int) -> tuple[ImageData, int]:
    """Keep whole batches only (minibatch CKA weighs every batch equally); one batch if fewer images."""
    n = len(data)
    b = min(batch_size, n)
    keep = (n // b) * b
    return (data.subset(torch.arange(keep)) if keep < n else data), b


def _run_identity(run: Path) -> str:
    blob = (run / "run.json").read_bytes()
    return f"run:{run.resolve()}#{hashlib.sha256(blob).hexdigest()[:12]}"


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
    if cfg.null or cfg.bootstrap:  # from the same Grams: no forward pass; symmetric like the CKA matrix
        stats = pairwise_cka_inference(torch.stack(grams), permutations=cfg.null, resamples=cfg.bootstrap,
                                       seed=cfg.seed, unbiased=cfg.estimator == "unbiased")
        for key, value in stats.items():
            if key != "cka":
                f[key] = value.reshape(-1)  # to_frame's rows: epoch_a major, epoch_b minor
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


def _progress(items: list, on: bool, desc: str) -> Iterable[Any]:
    return progress(items, enabled=on, desc=desc, unit="ckpt") if on else items


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

    * cka: run, layer, label, epoch_a, epoch_b, cka, estimator, kernel, n, n_batches, batch_size; with ``null`` also
      null_mean, null_high, p_value, distinguishable, with ``bootstrap`` ci_low, ci_high (see :func:`compare`)
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
            # so do null and bootstrap (0 adds no column)
            tokens = {"tokens": cfg.tokens} if cfg.tokens != "flatten" else {}
            draws = {k: c[k] for k in ("null", "bootstrap") if c[k]}
            return (shared | {k: c[k] for k in ("images", "batch_size", "split", "estimator", "kernel", "seed")}
                    | tokens | draws)
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
    if store is not None:
        resumed(len(keys) - len(missing), len(keys), store.root, unit=f"dynamics results (table x layer) of {run_name}",
                doing="computing")

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
