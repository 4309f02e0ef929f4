"""The run's own side of a dynamics analysis (Sharon & Dar 2024, arXiv 2405.17377): the images and labels it was
trained on, rebuilt from run.json (the decision-region planes go through them), the table of each plane's anchors,
and the run's training curves."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import runs
from ..data import ImageData, load_data
from ..errors import LayerlabError
from .phases import first_fit_epoch

__all__ = ["TRIPLET_SOURCE", "TRIPLET_TABLE", "training_curves", "training_images", "triplet_table"]


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
    from ..train.loop import RNG_STREAMS, noisy_labels

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
