"""The pretrained x finetuned grid of STIR (Merlin et al. 2023, arXiv 2307.06006; METHODS.md section 4).

X'_i depends only on (m1, i, X, seed, steps, step size), so it is inverted once per (model, layer) and reused for
every evaluated model and layer: 2L inversions (3L with a scratch model) instead of 2L^2 per direction. Inversions
are cached in memory and on disk (:class:`~layerlab.invariance.InversionCache`). For every reference model r,
layer i, evaluated model m and layer j the table holds

* ``stir``  -- STIR(m_j | r_i);
* ``noise`` -- the un-optimised floor CKA(m_j(X), m_j(X'_0)) (X' = the initial noise, 0 steps); X'_0 is the same
  for every i, so this value depends on (m, j) only and is repeated along i for easy comparison;
* ``cka``   -- plain CKA(r_i(X), m_j(X)).

Per-layer summaries of the grid: :mod:`layerlab.invariance.summary`.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..data import ImageData, load_data, subset_rows
from ..errors import DataError, LayerlabError
from ..features import layer_labels
from ..models import load_model
from ..runtime import model_fingerprint, progress, resolve_device, tensor_fingerprint
from ..store import Store, job_key, resumed
from .inputs import (
    DEFAULT_RANGE,
    Bound,
    _check_input_images,
    _check_range,
    _device,
    _frozen,
    _layer_names,
    _positive_int,
    _probe,
    _range_config,
)
from .inversion import VERSION, InversionCache, _losses, initial_noise
from .measure import _check_estimator, _cka, _layer_grams
from .summary import summarize

__all__ = ["ANALYSIS", "INVERSIONS", "SUMMARY", "as_model_spec", "grid_images", "invariance_grid"]

ANALYSIS = "invariance"
INVERSIONS = "invariance-inversions"
SUMMARY = "invariance-summary"
DEFAULT_IMAGES = 128  # images="auto": this many, or all when the data holds fewer
ROLES = ("pretrained", "finetuned", "scratch")
METRICS = ("stir", "noise", "cka")

ModelLike = nn.Module | str
DataLike = ImageData | str | torch.Tensor


def _as_images(data: DataLike, images: int | str | None, seed: int, split: str,
               input_range: tuple[Bound, Bound] = DEFAULT_RANGE) -> tuple[torch.Tensor, list[int], str]:
    """(float images [N, C, H, W], source indices, description) of a fixed seeded subset: spec data in [0, 1], an
    image tensor as given (checked against ``input_range``).

    ``images="auto"``: DEFAULT_IMAGES, or every image when the data holds fewer; an explicit number larger
    than the data is an error (never silently fewer)."""
    if images == "auto":
        try:
            return _as_images(data, DEFAULT_IMAGES, seed, split, input_range)
        except DataError:
            return _as_images(data, None, seed, split, input_range)
    if isinstance(data, str):
        d = load_data(data, split, images=images, seed=seed)
        return d.float(), d.indices.tolist(), f"{data} [{split}]"
    if isinstance(data, ImageData):
        d = data.sample(images, seed)  # the same seeded choice load_data makes; too many is an error
        return d.float(), d.indices.tolist(), f"{data.spec or 'in-memory'} [{data.split}]"
    if isinstance(data, torch.Tensor):
        x = _check_input_images(data, "data", *input_range)
        rows = subset_rows(x.shape[0], images, seed, "the image tensor")
        return x[rows].detach().float().cpu(), rows.tolist(), "tensor"
    raise LayerlabError(
        f"data: expected a data spec such as 'digits', an ImageData or a float image tensor, got {type(data).__name__}"
    )


def grid_images(data: DataLike, images: int | str | None = "auto", seed: int = 0, split: str = "test",
                input_range: Any = DEFAULT_RANGE) -> torch.Tensor:
    """The images :func:`invariance_grid` uses for these arguments: float [N, C, H, W] (for figures); an image
    tensor must lie in ``input_range``, as there."""
    return _as_images(data, images, seed, split, _check_range(input_range))[0]


def as_model_spec(path_or_spec: str | Path) -> str:
    """A model spec as is (``timm:...``, ``file:...``); a bare checkpoint path becomes ``file:PATH``."""
    from ..models import MODEL_SOURCES

    s = str(path_or_spec)
    return s if s.split(":", 1)[0] in MODEL_SOURCES else f"file:{s}"


def _models(pretrained: ModelLike, finetuned: ModelLike, scratch: ModelLike | None,
            device: str | torch.device | None) -> dict[str, nn.Module]:
    named: dict[str, nn.Module] = {}
    for role, m in zip(ROLES, (pretrained, finetuned, scratch)):
        if m is None:
            continue
        if isinstance(m, (str, Path)):
            m = load_model(as_model_spec(m), device=resolve_device(device))
        if not isinstance(m, nn.Module):
            raise LayerlabError(f"{role}: expected a model spec (file:PATH, timm:...) or an nn.Module, got {type(m).__name__}")
        named[role] = m
    return named


def _row_base(ref: str, i: int, li: str, ev: str, j: int, lj: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"reference": ref, "ref_layer": li, "ref_label": labels[li], "ref_index": i,
            "evaluated": ev, "eval_layer": lj, "eval_label": labels[lj], "eval_index": j,
            "pair": f"{ev}|{ref}"}


def invariance_grid(
    pretrained: ModelLike,
    finetuned: ModelLike,
    scratch: ModelLike | None = None,
    data: DataLike = "digits",
    *,
    layers: Sequence[str] | None = None,
    images: int | str | None = "auto",
    steps: int = 500,
    step_size: float = 0.5,
    seed: int = 0,
    split: str = "test",
    estimator: str = "biased",
    batch_size: int = 128,
    device: str | torch.device | None = None,
    cache: InversionCache | None = None,
    cache_dir: str | Path | None = None,
    store: Store | str | Path | None = None,
    progress: bool = False,
    input_range: Any = DEFAULT_RANGE,
) -> dict[str, pd.DataFrame]:
    """STIR between a pretrained and a finetuned model (and a scratch control), every layer pair, both ways.

    Every given model is a reference (inverted at each layer: 2L inversions, 3L with ``scratch``) and an
    evaluated model (every layer j on every inversion), so the table holds STIR(ft_j | pt_i), STIR(pt_j | ft_i),
    the within-model grids STIR(pt | pt) and STIR(ft | ft), STIR(scratch | pt) etc., each beside its noise floor
    and plain CKA (module doc).

    Args:
        pretrained, finetuned, scratch: models or specs (``file:run/final.pt``; a bare path means ``file:``).
        data: a data spec, an ImageData or float images [N, C, H, W] in [0, 1]; ``images`` picks a fixed
            seeded subset (``seed``) of ``split``: ``"auto"`` (default) 128 images or all when fewer, ``None`` all.
        layers: module paths or labels, the same in every model; default :func:`default_layers` of ``pretrained``.
        steps, step_size, seed, input_range: the inversion (:func:`invert`); with a non-default
            ``input_range`` pass ``data`` as an image tensor already in that range (every model takes it).
        estimator: linear CKA estimator, ``biased`` (full N, default) or ``unbiased``.
        cache / cache_dir: share inversions across calls / persist them (default: ``STORE/cache/inversions``
            when ``store`` is given, else memory only).
        store: a :class:`Store` or its root: one shard per (reference model, layer) in ``invariance`` and
            ``invariance-inversions``, the summary in ``invariance-summary``; finished shards are read back.

    Returns:
        ``{"grid", "inversions", "summary"}``: grid rows (reference, ref_layer, ref_label, ref_index, evaluated,
        eval_layer, eval_label, eval_index, pair, metric, value, estimator, images, steps, step_size, seed);
        inversion rows (model, layer, label, index, loss_mean, loss_median, loss_p90, loss_max, initial_loss_mean,
        steps, step_size, seed, images, key); and :func:`summarize`'s table. ``attrs`` hold the image indices.

    Example (two tiny models, 8 images, 2 inversion steps):
        >>> def net():
        ...     return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        >>> res = invariance_grid(net(), net(), data=torch.rand(8, 1, 8, 8), layers=["0", "3"], steps=2)
        >>> sorted(res), res["grid"].shape, sorted(set(res["grid"]["metric"]))
        (['grid', 'inversions', 'summary'], (48, 16), ['cka', 'noise', 'stir'])
        >>> res["summary"][["label", "retention", "noise"]].shape
        (2, 3)
    """
    steps = _positive_int(steps, "steps", minimum=0)
    batch_size = _positive_int(batch_size, "batch_size")
    if images not in (None, "auto"):
        images = _positive_int(images, "images", minimum=4 if estimator == "unbiased" else 2)
    estimator = _check_estimator(estimator)
    models = _models(pretrained, finetuned, scratch, device)
    names = _layer_names(models["pretrained"], layers)
    labels = layer_labels(models["pretrained"], names)  # the structure's labels (ResNet: [3.1] conv2, layer3)
    for role, m in models.items():
        _layer_names(m, names)  # every model must have the layers
    devices = {role: _device(m, device) for role, m in models.items()}
    rng = _check_range(input_range)
    X, indices, described = _as_images(data, images, seed, split, rng)
    rng = _check_range(rng, int(X.shape[1]))
    _check_input_images(X, "data", *rng)
    for role, m in models.items():
        with _frozen(m):
            _probe(m, names[-1], X, devices[role])
    st = Store(store) if isinstance(store, (str, Path)) else store
    if cache is None:
        root = cache_dir if cache_dir is not None else (st.root / "cache" / "inversions" if st is not None else None)
        cache = InversionCache(root)

    weights = {role: model_fingerprint(m) for role, m in models.items()}
    images_key = tensor_fingerprint(X)
    precision = {role: "bf16" if d.type == "cuda" else "fp32" for role, d in devices.items()}
    base_cfg = {"version": VERSION, "weights": weights, "images": images_key, "n": int(X.shape[0]),
                "layers": names, "steps": steps, "step_size": float(step_size), "seed": seed,
                "estimator": estimator, "precision": precision}
    if (range_cfg := _range_config(*rng)) is not None:  # only when not the default: default keys are unchanged
        base_cfg["input_range"] = range_cfg
    common = {"estimator": estimator, "images": int(X.shape[0]), "steps": steps, "step_size": float(step_size),
              "seed": seed}

    def key_of(role: str, layer: str) -> str:
        return job_key(f"{role}:{weights[role]}", ANALYSIS, {**base_cfg, "reference": role, "layer": layer})

    jobs = [(role, i, layer) for role in models for i, layer in enumerate(names)]
    grid_parts: list[pd.DataFrame] = []
    inv_parts: list[pd.DataFrame] = []
    pending = []
    for role, i, layer in jobs:
        k = key_of(role, layer)
        if st is not None and st.has(ANALYSIS, k) and st.has(INVERSIONS, k):
            grid_parts.append(st.read_shard(ANALYSIS, k))
            inv_parts.append(st.read_shard(INVERSIONS, k))
        else:
            pending.append((role, i, layer))

    if st is not None:
        resumed(len(jobs) - len(pending), len(jobs), st.root, unit="invariance jobs (model x layer)")
    if pending:
        noise = initial_noise(X.shape, seed, rng)
        grams_x = {r: _layer_grams(m, names, X, batch_size, devices[r]) for r, m in models.items()}
        grams_0 = {r: _layer_grams(m, names, noise, batch_size, devices[r]) for r, m in models.items()}
        bar = _progress(len(pending), progress)
        try:
            for role, i, layer in pending:
                m1 = models[role]
                t0 = time.time()
                x_inv, loss, ckey = cache.get(m1, layer, X, steps=steps, step_size=step_size, seed=seed,
                                              batch_size=batch_size, device=devices[role], weights=weights[role],
                                              images_key=images_key, input_range=rng)
                seconds = time.time() - t0
                init = _losses(m1, layer, noise, X, batch_size, devices[role])
                rows = []
                for ev, m2 in models.items():
                    grams_inv = _layer_grams(m2, names, x_inv, batch_size, devices[ev])
                    for j, lj in enumerate(names):
                        base = _row_base(role, i, layer, ev, j, lj, labels)
                        values = {
                            "stir": _cka(grams_x[ev][lj], grams_inv[lj], estimator),
                            "noise": _cka(grams_x[ev][lj], grams_0[ev][lj], estimator),
                            "cka": _cka(grams_x[role][layer], grams_x[ev][lj], estimator),
                        }
                        rows.extend({**base, "metric": k, "value": v, **common} for k, v in values.items())
                grid_part = pd.DataFrame(rows)
                lossv = loss.double()
                inv_part = pd.DataFrame([{
                    "model": role, "layer": layer, "label": labels[layer], "index": i,
                    "loss_mean": float(lossv.mean()), "loss_median": float(lossv.median()),
                    "loss_p90": float(torch.quantile(lossv, 0.9)), "loss_max": float(lossv.max()),
                    "initial_loss_mean": float(init.double().mean()), **{k: v for k, v in common.items() if k != "estimator"},
                    "key": ckey,
                }])
                if st is not None:
                    k = key_of(role, layer)
                    meta = {"model": role, "config": {**base_cfg, "reference": role, "layer": layer},
                            "indices": indices, "data": described}
                    st.write(INVERSIONS, k, inv_part, {**meta, "seconds": seconds})
                    st.write(ANALYSIS, k, grid_part, meta)
                grid_parts.append(grid_part)
                inv_parts.append(inv_part)
                bar.update(1)
        finally:
            bar.close()

    role_order = {r: k for k, r in enumerate(ROLES)}
    metric_order = {m: k for k, m in enumerate(METRICS)}
    grid = pd.concat(grid_parts, ignore_index=True)
    grid = (grid.assign(_r=grid["reference"].map(role_order), _e=grid["evaluated"].map(role_order),
                        _m=grid["metric"].map(metric_order))
            .sort_values(["_r", "_e", "_m", "ref_index", "eval_index"], kind="stable")
            .drop(columns=["_r", "_e", "_m"]).reset_index(drop=True))
    inversions = pd.concat(inv_parts, ignore_index=True)
    inversions = (inversions.assign(_r=inversions["model"].map(role_order))
                  .sort_values(["_r", "index"], kind="stable").drop(columns="_r").reset_index(drop=True))
    summary = summarize(grid, inversions)
    if st is not None:
        st.write(SUMMARY, job_key("+".join(f"{r}:{w}" for r, w in weights.items()), SUMMARY, base_cfg), summary,
                 {"config": base_cfg, "indices": indices, "data": described})
    attrs = {"indices": indices, "data": described, "layers": names, "cache": repr(cache)}
    for frame in (grid, inversions, summary):
        frame.attrs = dict(attrs)
    return {"grid": grid, "inversions": inversions, "summary": summary}


def _progress(total: int, enabled: bool) -> Any:
    """A bar over the pending inversions (disabled unless ``enabled``)."""
    return progress(total=total, enabled=enabled, desc="invariance (inversions)", unit="inv")
