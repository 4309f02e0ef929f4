"""Block-removal figures: accuracy against the pruning budget, one line per criterion, before and after healing,
from :func:`layerlab.prune.prune`'s table (mean over models per seed, then mean +- std over seeds)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from ..errors import LayerlabError
from ..prune.tables import long_form
from . import colors_for, plot_series, save_figure

__all__ = ["figures", "plot_prune"]

_TITLES = {"pruned": "after removal", "healed": "after healing"}


def _x_label(table: pd.DataFrame) -> str:
    kinds = set(table["budget_kind"]) if "budget_kind" in table.columns else {"blocks"}
    if kinds == {"params"}:
        return "budget (fraction of parameters removed)"
    return "budget (fraction of blocks removed)" if kinds == {"blocks"} else "budget (fraction of blocks or parameters)"


def plot_prune(table: pd.DataFrame, *, value: str = "accuracy") -> Figure:
    """Accuracy (or ``value="agreement"``) against the budget per criterion: one panel after removal and, where
    jobs healed, one after healing; the unpruned models' mean accuracy as a dotted line. Magnitude pruning sits at
    the blocks budget whose parameter count it prunes."""
    if table.empty:
        raise LayerlabError("plot_prune: the table is empty; run layerlab.prune(...) first")
    long = long_form(table)
    stages = [s for s in _TITLES if s in set(long["stage"])]
    criteria = list(dict.fromkeys(long["criterion"]))
    colours = colors_for(criteria)
    fig = Figure(figsize=(max(4.6 * len(stages), 6.4), 3.8), layout="constrained")
    axes = fig.subplots(1, len(stages), squeeze=False, sharey=True)[0]
    for ax, stage in zip(axes, stages):
        part = long[long["stage"] == stage]
        per_seed = part.groupby(["criterion", "budget_fraction", "seed"])[value].mean().reset_index()
        for criterion in criteria:
            g = per_seed[per_seed["criterion"] == criterion].groupby("budget_fraction")[value]
            if not len(g):
                continue
            mean, std, seeds = g.mean(), g.std(ddof=1).fillna(0.0), g.size().max()
            line = plot_series(ax, list(mean.index), list(mean.values), marker="o", ms=4, color=colours[criterion],
                               label=f"{criterion} (seeds={seeds})")
            if line.get_linestyle() == "None":
                ax.errorbar(mean.index, mean.values, yerr=std.values, fmt="none", ecolor=colours[criterion], capsize=3)
            else:
                ax.fill_between(mean.index, mean - std, mean + std, color=colours[criterion], alpha=0.15)
        if value == "accuracy" and "accuracy_base" in table.columns:
            ax.axhline(table.drop_duplicates("model")["accuracy_base"].mean(), color="#555555", linestyle=":",
                       linewidth=1, label="unpruned")
        models = part["model"].nunique()
        ax.set(title=f"{_TITLES[stage]} ({models} model{'s' if models != 1 else ''})", xlabel=_x_label(table),
               ylabel=f"test {value}" if value == "accuracy" else "top-1 agreement with the unpruned model")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Block removal by criterion: {value}\n(mean +- std over seeds of the model average)", fontsize=10)
    return fig


def figures(tables: Mapping[str, pd.DataFrame], folder: str | Path) -> list[Path]:
    """The analysis contract's figures: accuracy and agreement against the budget (PNG and SVG) in ``folder``."""
    table = tables.get("prune")
    if table is None or table.empty:
        return []
    paths: list[Path] = []
    for value in ("accuracy", "agreement"):
        paths += save_figure(plot_prune(table, value=value), Path(folder) / f"prune_{value}")
    return paths
