"""TrAct figures (Petersen et al. 2024): test accuracy over epochs, vanilla vs TrAct, from the tract study's table
(:func:`layerlab.tract_study.epochs_to_accuracy`)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from . import colors_for, plot_series, save_figure

__all__ = ["plot_curves"]


def plot_curves(curves: pd.DataFrame, path: Path) -> Path:
    """Test accuracy vs epoch, mean +- std over seeds, vanilla vs TrAct in their colours (:mod:`.colors`), one panel
    per (optimizer, budget): a line and a band through three epochs or more, points with error bars through fewer."""
    keys = sorted(curves[["optimizer", "budget"]].drop_duplicates().itertuples(index=False))
    colours = colors_for(["vanilla", "tract"])
    fig = Figure(figsize=(4 * len(keys), 3.2), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, (opt, budget) in zip(axes[0], keys):
        sub = curves[(curves["optimizer"] == opt) & (curves["budget"] == budget)]
        for method, colour in colours.items():
            g = sub[sub["method"] == method].groupby("epoch")["test_acc"]
            mean, std = g.mean(), g.std().fillna(0)
            line = plot_series(ax, mean.index, mean.values, marker="o", ms=3, color=colour,
                               label=f"{method} (n={sub[sub['method'] == method]['seed'].nunique()})")
            if line.get_linestyle() == "None":
                ax.errorbar(mean.index, mean.values, yerr=std.values, fmt="none", ecolor=colour, capsize=3)
            else:
                ax.fill_between(mean.index, mean - std, mean + std, color=colour, alpha=0.2)
        ax.set(title=f"{opt.upper()}, {budget} epochs", xlabel="epoch", ylabel="test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("TrAct (first layer, lambda=0.1) vs vanilla: mean +- std over seeds")
    return save_figure(fig, path, dpi=110)[0]
