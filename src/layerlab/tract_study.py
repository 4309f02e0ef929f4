"""TrAct vs vanilla training: the epochs-to-accuracy experiment of Petersen et al. (2024), at any scale.

For each optimiser, epoch budget and seed, train the same architecture twice (vanilla, TrAct on the first
layer) with a cosine schedule over that budget, and record the test accuracy per epoch. Runs are ordinary
training-lab runs under ``out`` (resumable); the result is one tidy table.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from . import runs
from .train import recipe, train

DEMO_ARCH = "timm:resnet18?channels=16,32,64,128"
OPTIMIZER_RECIPES = {"sgd": "baseline", "adam": "adam"}


def epochs_to_accuracy(out: str | Path, *, arch: str = DEMO_ARCH, data: str = "digits",
                       budgets: Sequence[int] = (2, 4, 8), seeds: Sequence[int] = (0, 1, 2),
                       optimizers: Sequence[str] = ("sgd", "adam"), lam: float = 0.1,
                       train_n: int | None = None, batch_size: int = 32, device: str = "cpu",
                       progress: bool = True) -> pd.DataFrame:
    """One row per (optimizer, method, budget, seed, epoch): test/train accuracy after that epoch.

    Small batches by default: the embedded data are small, and eval-mode BatchNorm needs enough steps.
    """
    out = Path(out)
    rows = []
    grid = list(itertools.product(optimizers, budgets, seeds, ("vanilla", "tract")))
    for i, (opt, budget, seed, method) in enumerate(grid, 1):
        r = recipe(OPTIMIZER_RECIPES[opt], epochs=budget, batch_size=batch_size, tract=lam if method == "tract" else 0.0)
        run = out / f"{opt}-{method}-e{budget}-s{seed}"
        if progress and not runs.is_done(run):
            print(f"  [{i}/{len(grid)}] {run.name}", flush=True)
        train(arch, data, r, run, seed=seed, checkpoints="final", device=device, train_n=train_n, progress=False)
        m = runs.run_metrics(run)
        rows += [{"optimizer": opt, "method": method, "budget": budget, "seed": seed, "epoch": int(e.epoch),
                  "test_acc": float(e.test_acc), "train_acc": float(e.train_acc), "seconds": float(e.seconds)}
                 for e in m.itertuples()]
    return pd.DataFrame(rows)


def summarize(curves: pd.DataFrame) -> pd.DataFrame:
    """Final test accuracy per (optimizer, method, budget): mean, std (ddof=1) over seeds, and n seeds."""
    final = curves[curves["epoch"] == curves["budget"]]
    g = final.groupby(["optimizer", "method", "budget"])["test_acc"]
    return g.agg(mean="mean", std="std", seeds="count").reset_index()


def matching_budget(summary: pd.DataFrame) -> pd.DataFrame:
    """Per optimiser: vanilla's best mean accuracy (and its budget) and the smallest budget where TrAct reaches it."""
    rows = []
    for opt, s in summary.groupby("optimizer"):
        van, tr = s[s["method"] == "vanilla"], s[s["method"] == "tract"]
        best = van.loc[van["mean"].idxmax()]
        hit = tr[tr["mean"] >= best["mean"]]
        rows.append({"optimizer": opt, "vanilla_best": float(best["mean"]), "vanilla_best_budget": int(best["budget"]),
                     "tract_budget_to_match": int(hit["budget"].min()) if len(hit) else np.nan,
                     "tract_best": float(tr["mean"].max())})
    return pd.DataFrame(rows)
