"""TrAct vs vanilla training: the epochs-to-accuracy experiment of Petersen et al. (2024), at any scale.

For each optimiser, epoch budget and seed, train the same architecture twice (vanilla, TrAct on the first
layer) with a cosine schedule over that budget, and record the test accuracy per epoch. Runs are ordinary
training-lab runs under ``out`` (resumable); the result is one tidy table.

:func:`bn_recalibrated` re-scores each run's final weights with BatchNorm statistics recomputed on its training
subset. The training lab evaluates with BN's running averages (momentum 0.1, started at mean 0 / variance 1);
after the few dozen steps of a short budget they can still be far from the statistics of the final weights:
2-epoch Adam runs (32 steps) score chance with them although the same weights reach about 0.6 with recomputed
statistics (docs/tract.md, "Short budgets and BatchNorm").
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import runs
from .data import load_data, to_unit_float
from .models import load_model
from .runtime import resolve_device
from .train import evaluate, recipe, train

DEMO_ARCH = "timm:resnet18?channels=16,32,64,128"
OPTIMIZER_RECIPES = {"sgd": "baseline", "adam": "adam"}


def epochs_to_accuracy(out: str | Path, *, arch: str = DEMO_ARCH, data: str = "digits",
                       budgets: Sequence[int] = (2, 4, 8), seeds: Sequence[int] = (0, 1, 2),
                       optimizers: Sequence[str] = ("sgd", "adam"), lam: float = 0.1,
                       train_n: int | None = None, batch_size: int = 32, device: str = "cpu",
                       progress: bool = True) -> pd.DataFrame:
    """One row per (optimizer, method, budget, seed, epoch): test/train accuracy after that epoch.

    Small batches by default: the embedded data are small, and eval-mode BatchNorm needs enough steps (its
    running statistics lag the weights; :func:`bn_recalibrated` re-scores the final weights without that lag).
    """
    out = Path(out)
    rows = []
    grid = list(itertools.product(optimizers, budgets, seeds, ("vanilla", "tract")))
    for i, (opt, budget, seed, method) in enumerate(grid, 1):
        r = recipe(OPTIMIZER_RECIPES[opt], epochs=budget, batch_size=batch_size, tract=lam if method == "tract" else 0.0)
        run = run_dir(out, opt, method, budget, seed)
        if progress and not runs.is_done(run):
            print(f"  [{i}/{len(grid)}] {run.name}", flush=True)
        train(arch, data, r, run, seed=seed, checkpoints="final", device=device, train_n=train_n, progress=False)
        m = runs.run_metrics(run)
        rows += [{"optimizer": opt, "method": method, "budget": budget, "seed": seed, "epoch": int(e.epoch),
                  "test_acc": float(e.test_acc), "train_acc": float(e.train_acc), "seconds": float(e.seconds)}
                 for e in m.itertuples()]
    return pd.DataFrame(rows)


def run_dir(out: str | Path, optimizer: str, method: str, budget: int, seed: int) -> Path:
    """The run folder of one cell of the grid under ``out``."""
    return Path(out) / f"{optimizer}-{method}-e{budget}-s{seed}"


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, *, batch_size: int = 500) -> nn.Module:
    """``model`` (changed in place, returned) with every BatchNorm's running statistics replaced by their average
    over ``images`` (float, [N, C, H, W]) at the current weights ("precise BN"; exact mean and unbiased variance
    when ``batch_size >= N``). Only the BN layers run in training mode; everything else stays in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    device = next(model.parameters()).device
    for i in range(0, images.shape[0], batch_size):
        model(images[i : i + batch_size].to(device))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return model.eval()


def bn_recalibrated(curves: pd.DataFrame, out: str | Path, *, data: str = "digits", train_n: int | None = None,
                    device: str = "cpu") -> pd.DataFrame:
    """One row per run of ``curves`` (optimizer, method, budget, seed, epoch = budget): the final test accuracy
    with BN running statistics (``test_acc``, as trained) and with BN statistics recomputed on the run's own
    training subset at the final weights (``test_acc_bn``; ``train_acc_bn`` likewise). Summarise a column with
    ``summarize(table, value="test_acc_bn")``."""
    device = resolve_device(device)
    test_set = load_data(data, "test")
    rows = []
    for key in curves[["optimizer", "method", "budget", "seed"]].drop_duplicates().itertuples(index=False):
        model = load_model(f"file:{run_dir(out, *key) / 'final.pt'}", device=device)
        train_set = load_data(data, "train", images=train_n, seed=key.seed)  # the subset the run trained on
        _, acc = evaluate(model, test_set, device=device)
        recalibrate_bn(model, to_unit_float(train_set.images))
        _, acc_bn = evaluate(model, test_set, device=device)
        _, train_bn = evaluate(model, train_set, device=device)
        rows.append({**key._asdict(), "epoch": key.budget, "test_acc": acc, "test_acc_bn": acc_bn,
                     "train_acc_bn": train_bn})
    return pd.DataFrame(rows)


def summarize(curves: pd.DataFrame, value: str = "test_acc") -> pd.DataFrame:
    """Final ``value`` (test accuracy) per (optimizer, method, budget): mean, std (ddof=1) over seeds, and n seeds."""
    final = curves[curves["epoch"] == curves["budget"]]
    g = final.groupby(["optimizer", "method", "budget"])[value]
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
