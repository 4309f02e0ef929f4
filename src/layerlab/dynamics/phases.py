"""Reading training phases off the dynamics tables (Sharon & Dar 2024, arXiv 2405.17377): the epoch of the fit
(100% training accuracy) and how clearly a checkpoint x checkpoint matrix splits into consecutive phases. Pure
functions of tables."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from ..errors import LayerlabError

__all__ = ["first_fit_epoch", "fit_summary", "phase_contrast", "phase_table"]


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
