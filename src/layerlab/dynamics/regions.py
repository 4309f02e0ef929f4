"""Decision regions of a run's checkpoints on one plane through three of its training images: the network's and
each layer's probe (Somepalli et al. 2022, as used by Sharon & Dar 2024, arXiv 2405.17377). The geometry is
:mod:`layerlab.regions`; the figure is :func:`layerlab.plots.dynamics.decision_regions`, drawn by the caller."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import runs
from ..data import check_label_coverage, load_data
from ..errors import LayerlabError
from ..features import OUTPUT_KEY, layer_labels
from ..models import num_outputs
from ..probes import DEFAULT_MAX_ITER, DEFAULT_TOL
from ..regions import grid_coords, plane_basis, plane_coords, plane_points, sample_triplets
from .config import DynamicsConfig
from .passes import _checkpoint_pass, _Inputs, _view_logits, _warn_probe_rows
from .series import select_epochs
from .training import training_images, triplet_table
from .views import _load, _resolve_views

__all__ = ["decision_regions"]


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
