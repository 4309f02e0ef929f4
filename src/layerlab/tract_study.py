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


def plot_curves(curves: pd.DataFrame, path: Path):
    """Test accuracy vs epoch, mean +- std over seeds, vanilla vs TrAct, one panel per (optimizer, budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(curves[["optimizer", "budget"]].drop_duplicates().itertuples(index=False))
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, (opt, budget) in zip(axes[0], keys):
        sub = curves[(curves["optimizer"] == opt) & (curves["budget"] == budget)]
        for method, colour in (("vanilla", "tab:gray"), ("tract", "tab:red")):
            g = sub[sub["method"] == method].groupby("epoch")["test_acc"]
            mean, std = g.mean(), g.std().fillna(0)
            ax.plot(mean.index, mean.values, "-o", ms=3, color=colour, label=f"{method} (n={sub[sub['method'] == method]['seed'].nunique()})")
            ax.fill_between(mean.index, mean - std, mean + std, color=colour, alpha=0.2)
        ax.set(title=f"{opt.upper()}, {budget} epochs", xlabel="epoch", ylabel="test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("TrAct (first layer, lambda=0.1) vs vanilla: mean +- std over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".png", ".svg"):
        fig.savefig(path.with_suffix(suffix), dpi=110)
    plt.close(fig)
    return path.with_suffix(".png")
