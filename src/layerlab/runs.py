"""The on-disk layout of a training run (a checkpoint series), shared by the training lab and the analyses.

::

    RUN/run.json                    the run's config: arch, data, recipe, seed, epochs, attrs
    RUN/checkpoints/epoch_0000.pt   layerlab checkpoints; epoch 0 is the initialisation (theta_0)
    RUN/final.pt                    the trained model (same as the last checkpoint)
    RUN/metrics.csv                 per epoch: train/test loss and accuracy, lr, seconds
    RUN/last.pt                     resume state (model + optimiser + RNG), removed when the run is done
    RUN/DONE                        written last: the run finished
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import LayerlabError

_EPOCH = re.compile(r"epoch_(\d+)\.pt$")


def checkpoint_path(run: str | Path, epoch: int) -> Path:
    return Path(run) / "checkpoints" / f"epoch_{epoch:04d}.pt"


def checkpoints(run: str | Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every checkpoint of a run, by epoch; epoch 0 is the initialisation."""
    run = Path(run)
    if not (run / "run.json").exists():
        raise LayerlabError(f"{str(run)!r} is not a training run (no run.json); make one with `layerlab train`")
    found = [(int(m.group(1)), p) for p in (run / "checkpoints").glob("epoch_*.pt") if (m := _EPOCH.search(p.name))]
    return sorted(found)


def run_config(run: str | Path) -> dict[str, Any]:
    p = Path(run) / "run.json"
    if not p.exists():
        raise LayerlabError(f"{str(run)!r} is not a training run (no run.json); make one with `layerlab train`")
    return json.loads(p.read_text())


def run_metrics(run: str | Path) -> pd.DataFrame:
    p = Path(run) / "metrics.csv"
    return pd.read_csv(p) if p.exists() else pd.DataFrame()


def is_done(run: str | Path) -> bool:
    return (Path(run) / "DONE").exists()
