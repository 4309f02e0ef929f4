"""Training dynamics of representations (Sharon & Dar 2024, arXiv 2405.17377; METHODS.md section 2).

For one training run (a checkpoint series, ``layerlab.runs``) and each analysed layer l:

* **CKA over training**: S_l(t1, t2) = CKA(H_l(t1), H_l(t2)), with H_l(t) the flattened layer-l features of a fixed
  probe set (same images, same order) under checkpoint t. Linear kernel, minibatch CKA with the unbiased HSIC_1
  estimator by default (Nguyen, Raghu, Kornblith 2021); the table says which estimator it holds.
* **Linear probes**: per (layer, checkpoint) a softmax probe (:mod:`layerlab.probes`) fitted on training-split
  features and scored on the test split. Probe features are the layer's map average-pooled to
  ``probe_pool x probe_pool`` (tokens: their mean), so a probe costs milliseconds; ``probe_pool=0`` flattens it all.
* **Decision-region similarity (DRS)**: per layer, the fraction of plane grid points (:mod:`layerlab.regions`) where
  the probes of two checkpoints agree (image -> layer-l features at t -> probe_t argmax), averaged over random
  triplets of training images; the network output (``layer == "output"``) gets the same matrix from the network's own
  argmax.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import runs
from .data import ImageData, load_data
from .errors import LayerlabError
from .features import OUTPUT_KEY, Extractor, as_input
from .layers import display_label, residual_blocks
from .models import load_model
from .probes import fit_probe
from .regions import grid_coords, iter_plane_batches, plane_basis, plane_coords, plane_points, sample_triplets
from .similarity import CKAAccumulator
from .store import Store, job_key

__all__ = [
    "DynamicsConfig",
    "TABLES",
    "compare",
    "decision_regions",
    "default_layers",
    "dynamics",
    "first_fit_epoch",
    "probe_features",
    "select_epochs",
    "training_curves",
]

#: table name -> store analysis name
TABLES = {"cka": "dynamics-cka", "probes": "dynamics-probes", "drs": "dynamics-drs"}
_MEMMAP_BYTES = 256 * 2**20


# --------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class DynamicsConfig:
    """Everything that shapes the dynamics tables (and hence their store keys)."""

    layers: tuple[str, ...] | None = None  # module names; None: stem and every residual block ("output" is always added)
    epochs: tuple[int, ...] | None = None  # checkpoints to analyse; None: all
    max_checkpoints: int | None = None  # keep at most this many (log-spaced, first and last always kept)
    images: int = 512  # CKA probe set: this many images of `split` (seeded), trimmed to whole batches
    batch_size: int = 64  # minibatch size of the CKA estimator
    split: str = "test"
    estimator: str = "unbiased"
    kernel: str = "linear"
    probe_method: str = "softmax"
    probe_l2: float = 1e-3
    probe_iter: int = 100
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
            (self.probe_pool >= 0, f"probe_pool: expected a pooled size >= 1, or 0 for no pooling, got {self.probe_pool}"),
            (self.max_checkpoints is None or self.max_checkpoints >= 2,
             f"max_checkpoints: expected >= 2 (a matrix needs two checkpoints), got {self.max_checkpoints}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise LayerlabError(msg)

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
    """Stem and every residual block (``layer3.1``, ``blocks.2``): the units Sharon & Dar follow.

    A final single-Linear head is left out: its output is the logits, which the ``"output"`` view always covers.
    """
    groups = residual_blocks(model)
    names = list(groups)
    modules = dict(model.named_modules())
    if len(names) > 1 and len(groups[names[-1]]) == 1 and isinstance(modules[names[-1]], nn.Linear):
        names = names[:-1]
    return names


def probe_features(t: torch.Tensor, pool: int = 2) -> torch.Tensor:
    """A layer's activation as probe features [N, d]: conv maps pooled to pool x pool, tokens averaged."""
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


def training_curves(run_dir: str | Path) -> pd.DataFrame:
    """metrics.csv of a run with ``run`` and ``first_fit_epoch`` (first epoch of 100% training accuracy) columns."""
    m = runs.run_metrics(run_dir)
    if m.empty:
        return m
    return m.assign(run=Path(run_dir).name, first_fit_epoch=first_fit_epoch(m))


def _label(name: str) -> str:
    return OUTPUT_KEY if name == OUTPUT_KEY else display_label(name)


def _load(path: Path, device: str | torch.device) -> nn.Module:
    return load_model(f"file:{path}", device=device).eval()


def _resolve_views(model: nn.Module, requested: Sequence[str] | None) -> list[str]:
    """Layer names to analyse (validated against the model), plus "output" last."""
    names = list(requested) if requested else default_layers(model)
    inner = [n for n in names if n != OUTPUT_KEY]
    if inner:
        Extractor(model, inner)  # unknown names raise with the closest valid ones
    return list(dict.fromkeys(inner)) + [OUTPUT_KEY]


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


def _features(model: nn.Module, layers: list[str], images: torch.Tensor, batch: int, device: str | torch.device,
              transform: Callable[[torch.Tensor], torch.Tensor], output: bool = False) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {}
    with Extractor(model, layers, pool=False, flatten=False, include_output=output, transform=transform) as ex:
        for start in range(0, images.shape[0], batch):
            with torch.inference_mode():
                feats = ex(as_input(images[start : start + batch].to(device)))
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
        feats = _features(model, inner, inputs.cka_images, inputs.cka_batch, device, gram, OUTPUT_KEY in cka_views)
        result["grams"] = {v: torch.stack(feats[v]) for v in cka_views}
    if probe_layers:
        view = lambda t: probe_features(t, cfg.probe_pool).float()  # noqa: E731
        tr = _features(model, probe_layers, inputs.probe_train.float(), 256, device, view)
        te = _features(model, probe_layers, inputs.probe_test.float(), 256, device, view)
        for layer in probe_layers:
            xtr, xte = torch.cat(tr[layer]), torch.cat(te[layer])
            p = fit_probe(xtr, inputs.probe_train.labels, num_classes=inputs.num_classes, method=cfg.probe_method,
                          l2=cfg.probe_l2, max_iter=cfg.probe_iter)
            w, b = p.fold(torch.float32)
            acc = lambda x, y: float(((x @ w + b).argmax(1) == y).double().mean())  # noqa: E731
            result["probes"][layer] = (p, acc(xtr, inputs.probe_train.labels), acc(xte, inputs.probe_test.labels), xtr.shape[1])
    if drs_views:
        result["preds"] = _plane_predictions(model, cfg, inputs, drs_views, result["probes"], device)
    return result


def _view_logits(model: nn.Module, layers: list[str], probes: dict[str, tuple], pool: int,
                 device: str | torch.device) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """images -> {view: logits}: each layer through its probe, and the network output."""
    folded = {l: probes[l][0].fold(torch.float32, device) for l in layers}
    ex = Extractor(model, layers, pool=False, flatten=False, include_output=True,
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
    fn = _view_logits(model, layers, probes, cfg.probe_pool, device)
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
    """Representation dynamics of one training run: ``{"cka", "probes", "drs", "training"}`` tidy tables.

    ``data``: data spec of the probe images (default: the run's own, from run.json). ``options``: the fields of
    :class:`DynamicsConfig` (``layers``, ``epochs``, ``max_checkpoints``, ``images``, ``batch_size``, ``triplets``,
    ``resolution``, ``probe_pool`` ...). With ``store`` every (table, layer) is one shard and existing shards are read,
    not recomputed.

    Tables (one row per observation):

    * cka: run, layer, label, epoch_a, epoch_b, cka, estimator, kernel, n, n_batches, batch_size
    * probes: run, layer, label, epoch, train_acc, test_acc, dim, method, l2, n_train, n_test
    * drs: run, layer, label, kind ("probe" or "network"), epoch_a, epoch_b, drs, drs_std, triplets, resolution, margin
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
    layers = [v for v in views if v != OUTPUT_KEY]
    run_name = run.name
    identity = _run_identity(run)

    def key_config(table: str, view: str) -> dict[str, Any]:
        c = cfg.to_dict()
        shared = {"layer": view, "epochs": epochs, "data": data}
        if table == "cka":
            return shared | {k: c[k] for k in ("images", "batch_size", "split", "estimator", "kernel", "seed")}
        probe = {k: c[k] for k in ("probe_method", "probe_l2", "probe_iter", "probe_pool", "probe_train", "seed")}
        if table == "probes":
            return shared | probe
        return shared | probe | {k: c[k] for k in ("triplets", "resolution", "margin")}

    wanted = {
        "cka": views if "cka" in cfg.tables else [],
        "probes": layers if "probes" in cfg.tables else [],
        "drs": views if "drs" in cfg.tables else [],
    }
    keys = {(t, v): job_key(identity, TABLES[t], key_config(t, v)) for t, vs in wanted.items() for v in vs}
    missing = {tv for tv, k in keys.items() if store is None or not store.has(TABLES[tv[0]], k)}

    computed: dict[tuple[str, str], pd.DataFrame] = {}
    if missing:
        computed = _compute(run, ckpts, epochs, cfg, data, missing, device, progress, first)
    frames: dict[str, list[pd.DataFrame]] = {t: [] for t in TABLES}
    for (table, view), key in keys.items():
        if (table, view) in computed:
            frame = computed[(table, view)].assign(run=run_name, layer=view, label=_label(view))
            frame = frame[["run", "layer", "label"] + [c for c in frame.columns if c not in ("run", "layer", "label")]]
            if store is not None:
                store.write(TABLES[table], key, frame, {"model": identity, "config": key_config(table, view)})
        else:
            frame = store.read_shard(TABLES[table], key)
        frames[table].append(frame)
    out = {t: (pd.concat(fs, ignore_index=True) if fs else pd.DataFrame()) for t, fs in frames.items()}
    out["training"] = training_curves(run)
    return out


def _compute(run: Path, ckpts: dict[int, Path], epochs: list[int], cfg: DynamicsConfig, data: str,
             missing: set[tuple[str, str]], device: str | torch.device, progress: bool,
             first: nn.Module) -> dict[tuple[str, str], pd.DataFrame]:
    cka_views = [v for (t, v) in sorted(missing) if t == "cka"]
    drs_views = [v for (t, v) in sorted(missing) if t == "drs"]
    probe_layers = sorted({v for (t, v) in missing if t in ("probes", "drs") and v != OUTPUT_KEY})
    # keep the model's layer order
    order = {n: i for i, (n, _) in enumerate(first.named_modules())}
    order[OUTPUT_KEY] = len(order)
    cka_views.sort(key=order.get)
    drs_views.sort(key=order.get)
    probe_layers.sort(key=order.get)

    cka_set, cka_batch = _trim(load_data(data, cfg.split, n=cfg.images, seed=cfg.seed), cfg.batch_size)
    need_probe = bool(probe_layers)
    probe_train = load_data(data, "train", n=cfg.probe_train, seed=cfg.seed) if need_probe else None
    probe_test = load_data(data, "test") if need_probe else None
    triplets = None
    if drs_views:
        pool = load_data(data, "train")
        rows = sample_triplets(pool.labels, cfg.triplets, seed=cfg.seed)
        triplets = pool.float()[rows]
    inputs = _Inputs(cka_set.float(), cka_batch, probe_train, probe_test, triplets, cka_set.num_classes)

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
                               "n_test": len(probe_test)})
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
    return out


def compare(
    spec_a: str,
    spec_b: str,
    data: str = "digits",
    *,
    layers_a: Sequence[str] | None = None,
    layers_b: Sequence[str] | None = None,
    images: int = 512,
    batch_size: int = 64,
    split: str = "test",
    estimator: str = "unbiased",
    kernel: str = "linear",
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> pd.DataFrame:
    """Layer x layer CKA between two models on the same images: model_a, model_b, layer_a, label_a, layer_b,
    label_b, cka, estimator, kernel, n, n_batches, batch_size (minibatch unbiased CKA by default).

    Layers default to each model's stem, residual blocks and output (the logits).
    """
    ma, mb = load_model(spec_a, device=device), load_model(spec_b, device=device)
    va, vb = _resolve_views(ma, layers_a), _resolve_views(mb, layers_b)
    probe, b = _trim(load_data(data, split, n=images, seed=seed), batch_size)
    acc = CKAAccumulator(len(va), len(vb), kernel=kernel, estimator=estimator, names_a=va, names_b=vb)
    gram = acc.gram
    x = probe.float()

    def grams(model: nn.Module, views: list[str]) -> dict[str, list[torch.Tensor]]:
        return _features(model, [v for v in views if v != OUTPUT_KEY], x, b, device, gram, OUTPUT_KEY in views)

    ga, gb = grams(ma, va), grams(mb, vb)
    for bi in range(len(ga[va[0]])):
        acc.update_grams([ga[v][bi] for v in va], [gb[v][bi] for v in vb])
    f = acc.to_frame()
    f.insert(0, "model_b", spec_b)
    f.insert(0, "model_a", spec_a)
    f.insert(f.columns.get_loc("layer_a") + 1, "label_a", f["layer_a"].map(_label))
    f.insert(f.columns.get_loc("layer_b") + 1, "label_b", f["layer_b"].map(_label))
    f["batch_size"] = b
    return f


def decision_regions(
    run_dir: str | Path,
    data: str | None = None,
    *,
    epochs: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
    triplet: int | Sequence[int] = 0,
    resolution: int = 100,
    margin: float = 0.1,
    temperature: float = 5.0,
    probe_method: str = "softmax",
    probe_l2: float = 1e-3,
    probe_iter: int = 100,
    probe_pool: int = 2,
    probe_train: int | None = 1000,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, pd.DataFrame]:
    """Decision regions on one plane for chosen checkpoints: the network and each layer's probe.

    ``triplet``: an index into the seeded triplet sample (as in the DRS), or three training-split row indices.
    Returns ``{"regions": run, epoch, layer, label, i, j, c1, c2, pred, confidence; "anchors": point, row, class,
    c1, c2}`` with confidence = max softmax(logits / temperature) (Somepalli et al. 2022 use temperature 5).
    """
    run = Path(run_dir)
    config_json = runs.run_config(run)
    ckpts = dict(runs.checkpoints(run))
    if not ckpts:
        raise LayerlabError(f"run {str(run)!r} has no checkpoints; train it with `layerlab train`")
    chosen = select_epochs(list(ckpts), epochs)
    data = data or config_json.get("data") or "digits"
    pool = load_data(data, "train")
    if isinstance(triplet, int):
        rows = sample_triplets(pool.labels, triplet + 1, seed=seed)[triplet]
    else:
        rows = torch.as_tensor(list(triplet), dtype=torch.long)
        if rows.numel() != 3 or len(set(pool.labels[rows].tolist())) != 3:
            raise LayerlabError(f"triplet: expected three training-split rows of three distinct classes, got {list(triplet)}")
    imgs = pool.float()[rows]
    basis = plane_basis(*imgs)
    c1, c2 = plane_coords(basis.anchors, resolution, margin)
    coords = grid_coords(c1, c2)
    points = plane_points(basis, coords, tuple(imgs.shape[1:]))
    cfg = DynamicsConfig(probe_method=probe_method, probe_l2=probe_l2, probe_iter=probe_iter, probe_pool=probe_pool,
                         probe_train=probe_train, seed=seed)
    probe_train_set = load_data(data, "train", n=probe_train, seed=seed)
    probe_test = load_data(data, "test")
    ii, jj = np.meshgrid(np.arange(resolution), np.arange(resolution))  # point index = j * R + i
    frames = []
    for epoch in chosen:
        model = _load(ckpts[epoch], device)
        views = _resolve_views(model, layers)
        inner = [v for v in views if v != OUTPUT_KEY]
        inputs = _Inputs(torch.zeros(0), 1, probe_train_set, probe_test, None, pool.num_classes)
        res = _checkpoint_pass(model, cfg, inputs, [], inner, [], device)
        fn = _view_logits(model, inner, res["probes"], probe_pool, device)
        logits: dict[str, list[torch.Tensor]] = {v: [] for v in views}
        for start in range(0, points.shape[0], 512):
            out = fn(points[start : start + 512])
            for v in views:
                logits[v].append(out[v].cpu())
        for v in views:
            lg = torch.cat(logits[v]).double()
            conf = torch.softmax(lg / temperature, dim=1).max(dim=1).values
            frames.append(pd.DataFrame({
                "run": run.name, "epoch": epoch, "layer": v, "label": _label(v), "i": ii.reshape(-1), "j": jj.reshape(-1),
                "c1": coords[:, 0].numpy(), "c2": coords[:, 1].numpy(), "pred": lg.argmax(1).numpy(),
                "confidence": conf.numpy(),
            }))
    anchors = pd.DataFrame({"point": ["x1", "x2", "x3"], "row": rows.numpy(), "class": pool.labels[rows].numpy(),
                            "c1": basis.anchors[:, 0].numpy(), "c2": basis.anchors[:, 1].numpy()})
    return {"regions": pd.concat(frames, ignore_index=True), "anchors": anchors}


# ==================================================================================================== demo
#: analysis settings of the demo step: small enough for a 2-core CPU, the same code path as the full study
DEMO_OPTIONS: dict[str, Any] = {"images": 256, "batch_size": 64, "triplets": 16, "resolution": 20,
                                "probe_train": 500, "probe_iter": 50}


def demo_layers(model: nn.Module, count: int = 4) -> list[str]:
    """About ``count`` blocks spread over the depth: the last block of each ResNet stage, or evenly spaced ViT blocks."""
    blocks = default_layers(model)[1:] or default_layers(model)
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
                             probe_train=DEMO_OPTIONS["probe_train"], probe_iter=DEMO_OPTIONS["probe_iter"],
                             device=ctx.device)
        paths += save_figure(plot_regions(r["regions"], r["anchors"]), fig_dir, f"dynamics_regions_{first}")
        cka = tables["cka"]
        off = cka[(cka["epoch_a"] == cka.groupby("run")["epoch_a"].transform("min")) &
                  (cka["epoch_b"] == cka.groupby("run")["epoch_b"].transform("max"))]
        summary = off.pivot_table(index="run", columns="label", values="cka", sort=False)
        print("CKA(first checkpoint, last checkpoint) per layer (unbiased minibatch, linear):")
        print(summary.to_string(float_format=lambda v: f"{v:.2f}"))
        fits = tables["training"].drop_duplicates("run").set_index("run")["first_fit_epoch"]
        print("first epoch of 100% training accuracy:", ", ".join(f"{k} {v}" for k, v in fits.items()))
        print(f"figures: {fig_dir} ({len(paths)} files)")


_register_demo_step()
