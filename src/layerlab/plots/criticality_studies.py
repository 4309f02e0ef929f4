"""Figures of the criticality studies beyond the clean, final models: over training and under distribution shift.

:func:`over_training_heatmap` layers x analysed epochs, with the epoch at which each layer settles into its final
class (critical or auxiliary, :func:`layerlab.criticality.settling`); :func:`shift_heatmap` layers x severity of
each corruption (and x budget of each attack), clean as severity 0; :func:`critical_set_figure` how far the set of
critical layers moves under each shift (:func:`layerlab.criticality.critical_sets`). :func:`save_studies` writes
whichever of them the tables support. Like :mod:`.criticality`, every function takes tables and returns a
``matplotlib.figure.Figure`` built without pyplot.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from ..criticality import tables
from ..errors import LayerlabError
from . import save_figure
from .criticality import (
    _need,
    _short,
    draw_panel,
    file_suffix,
    layer_pivot,
    layer_rows,
)

CRITICAL = tables.CRITICAL  #: the default threshold, as the tables' (criticality >= it: a critical layer)

#: bar colours of the shift families in :func:`critical_set_figure` (shifts, not models: not :mod:`.colors`' names)
_SHIFT_COLOURS = (
    "#4477AA", "#EE6677", "#228833", "#CCBB44", "#66CCEE", "#AA3377", "#BBBBBB", "#000000", "#EE7733", "#009988",
)

#: outline colour of the cell where a layer settles, by the class it settles in
_SETTLE_COLOURS = {"critical": "#EE3377", "auxiliary": "#FFFFFF"}


def _models(rows: pd.DataFrame, model: str | None, what: str) -> list[str]:
    """The models to draw: all of ``rows`` in table order, or the one named (which must be there)."""
    present = list(dict.fromkeys(rows["model"]))
    if model is None:
        return present
    if model not in present:
        raise LayerlabError(f"{what}: model {model!r} is not in the table; it has {present}")
    return [model]


def _grid(n: int, ncols: int = 3) -> tuple[int, int]:
    cols = min(n, ncols)
    return math.ceil(n / cols), cols


def _epoch_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """Randomize rows on clean images at an analysed checkpoint (criticality over training), epoch as int."""
    rows = summary[summary["mode"] == "randomize"] if "mode" in summary.columns else summary
    if "shift" in rows.columns:
        rows = rows[rows["shift"].fillna("clean").eq("clean")]
    rows = rows[rows["epoch"].notna()]
    return rows.assign(epoch=rows["epoch"].astype(int))


def over_training_heatmap(
    summary: pd.DataFrame, model: str | None = None, *, settling: pd.DataFrame | None = None,
    threshold: float = CRITICAL,
) -> Figure:
    """Criticality (%) of each layer (rows, forward order) at each analysed epoch (columns), one panel per model
    (or the one named). With ``settling`` an outline marks the cell where each layer settles into its final class;
    the colour bar marks the critical threshold (``settling``'s own when it has one)."""
    _need(summary, ["model", "layer", "epoch", "criticality"], "over_training_heatmap")
    rows = _epoch_rows(summary)
    if rows.empty:
        raise LayerlabError("over_training_heatmap: the summary holds no randomize rows on clean images with an "
                            "epoch; summarize a table from criticality(..., over_training=True)")
    models = _models(rows, model, "over_training_heatmap")
    if settling is not None:
        _need(settling, ["model", "layer", "final", "settled_epoch"], "over_training_heatmap settling",
              "pass the table layerlab.criticality.settling(summary) returns")
        if "threshold" in settling.columns and len(settling):
            threshold = float(settling["threshold"].iloc[0])
    nrows, ncols = _grid(len(models))
    height = max(3.0, 0.26 * max(rows["layer"].nunique(), 1) + 1.8) * nrows
    width = max(4.5, sum(0.45 * rows.loc[rows["model"] == m, "epoch"].nunique() + 2.4 for m in models[:ncols]) + 1.2)
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    im = None
    for ax, m in zip(axes, models):
        part = rows[rows["model"] == m]
        epochs = sorted(set(part["epoch"]))
        im = draw_panel(ax, layer_pivot(part, "epoch", "criticality", epochs), cmap="viridis", vmin=0, vmax=100,
                        xlabels=[str(e) for e in epochs], rotation=0)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_title(_short(m, 40), fontsize=9)
        if settling is not None:
            _mark_settling(ax, settling, m, layer_rows(part)["layer"].tolist(), epochs)
    for ax in axes[len(models):]:
        ax.set_visible(False)
    bar = fig.colorbar(im, ax=list(axes[: len(models)]), label=f"criticality [%] (critical: \u2265 {threshold:g})",
                       shrink=0.8)
    bar.ax.axhline(threshold, color="#EE3377", lw=1.5)
    fig.suptitle("Layer criticality over training (randomize, clean images)", fontsize=10)
    if settling is not None:
        handles = [Patch(facecolor="#31688E", edgecolor=c, lw=1.6, label=f"settles: {k}")
                   for k, c in _SETTLE_COLOURS.items()]
        fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=7, frameon=False)
    return fig


def _mark_settling(ax, settling: pd.DataFrame, model: str, layers: list, epochs: list[int]) -> None:
    """Outline, per layer of ``model``, the cell of the epoch from which it stays in its final class."""
    rows = settling[settling["model"] == model]
    if "shift" in rows.columns:
        rows = rows[rows["shift"].fillna("clean").eq("clean")]
    for r in rows.itertuples():
        if r.layer in layers and int(r.settled_epoch) in epochs:
            i, j = layers.index(r.layer), epochs.index(int(r.settled_epoch))
            colour = _SETTLE_COLOURS.get(str(r.final), "#000000")
            ax.add_patch(Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False, edgecolor=colour, lw=1.6,
                                   zorder=3, gid=f"settled:{r.final}"))


def parse_shift(shift: str) -> tuple[str | None, float]:
    """``(name, severity)`` of a shift written ``NAME:SEVERITY`` (split at the last ``:``); ``clean`` is
    ``(None, 0)``."""
    if shift == "clean":
        return None, 0.0
    name, _, level = str(shift).rpartition(":")
    try:
        value = float(level)
    except ValueError:
        value = math.nan
    if not name or not math.isfinite(value):
        raise LayerlabError(f"shift {shift!r} is neither 'clean' nor NAME:SEVERITY (e.g. 'gaussian-noise:3', "
                            "'pgd-linf:8')")
    return name, value


def _level(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _latest(rows: pd.DataFrame) -> pd.DataFrame:
    """One analysed state per model: the final model's rows (no epoch) where there are any, else the last epoch's."""
    if "epoch" not in rows.columns or rows["epoch"].isna().all():
        return rows
    keep = []
    for _, part in rows.groupby("model", sort=False):
        final = part[part["epoch"].isna()]
        keep.append(final if len(final) else part[part["epoch"] == part["epoch"].max()])
    return pd.concat(keep)


def _shift_rows(summary: pd.DataFrame, mode: str) -> pd.DataFrame:
    """``mode`` rows of the latest state, with the shift split into ``_family`` (None: clean) and ``_level``."""
    rows = summary[summary["mode"] == mode] if "mode" in summary.columns else summary
    if rows.empty:
        raise LayerlabError(f"shift_heatmap: the summary holds no rows of mode {mode!r}")
    rows = _latest(rows)
    parsed = [parse_shift(s) for s in rows["shift"].fillna("clean")]
    return rows.assign(_family=[p[0] for p in parsed], _level=[p[1] for p in parsed])


def shift_heatmap(summary: pd.DataFrame, model: str | None = None, *, mode: str = "randomize") -> Figure:
    """Criticality (%) by layer (rows) and severity (columns), one panel per corruption (an attack's budget
    ``pgd-linf:EPS`` in 1/255 as its severity) with the clean images as severity 0 at the left; one row of
    panels per model (all, or the one named)."""
    _need(summary, ["model", "layer", "shift", "criticality"], "shift_heatmap")
    rows = _shift_rows(summary, mode)
    families = list(dict.fromkeys(rows["_family"].dropna()))
    if not families:
        raise LayerlabError("shift_heatmap: the summary holds only clean rows; summarize a table from "
                            "criticality(..., shift=[...])")
    models = _models(rows[rows["_family"].notna()], model, "shift_heatmap")
    rows = rows[rows["model"].isin(models)]
    clean = bool(rows["_family"].isna().any())
    levels = {f: [0.0] * clean + sorted(set(rows.loc[rows["_family"] == f, "_level"]) - {0.0}) for f in families}
    layers = max(rows.loc[rows["model"] == m, "layer"].nunique() for m in models)
    fig = Figure(figsize=(max(5.0, sum(0.42 * len(v) + 0.9 for v in levels.values()) + 2.6),
                          max(3.0, (0.26 * layers + 1.2) * len(models) + 0.8)), layout="constrained")
    axes = fig.subplots(len(models), len(families), squeeze=False,
                        gridspec_kw={"width_ratios": [len(v) for v in levels.values()]})
    im = None
    for r, m in enumerate(models):
        part = rows[rows["model"] == m]
        for c, f in enumerate(families):
            cells = part[(part["_family"] == f) | part["_family"].isna()]
            matrix = layer_pivot(cells, "_level", "criticality", levels[f])
            ax = axes[r, c]
            im = draw_panel(ax, matrix, cmap="viridis", vmin=0, vmax=100, xlabels=[_level(v) for v in levels[f]],
                            rotation=0)
            ax.tick_params(axis="y", labelleft=c == 0)
            ax.set_title(f, fontsize=8)
            ax.set_xlabel("eps [1/255]" if f.startswith("pgd") else "severity", fontsize=7)
        axes[r, 0].set_ylabel(_short(m, 40), fontsize=8)
    fig.colorbar(im, ax=list(axes.ravel()), label="criticality [%]", shrink=0.8)
    fig.suptitle(f"Layer criticality under shift ({mode}; 0 = clean)", fontsize=10)
    return fig


def _count(names) -> int:
    """How many layers a comma-separated list names (empty or missing: none)."""
    return 0 if not isinstance(names, str) or not names.strip() else len(names.split(","))


def critical_set_figure(critical_sets: pd.DataFrame, *, mode: str = "randomize") -> Figure:
    """Per model, the Jaccard similarity of the critical set under each shift with the clean one, each bar
    annotated with the layers gained (+) and lost (-): does the set of critical layers move under shift?"""
    _need(critical_sets, ["model", "shift", "critical", "jaccard", "gained", "lost"], "critical_set_figure",
          "pass the table layerlab.criticality.critical_sets(summary) returns or DIR/criticality_critical_sets.csv")
    rows = critical_sets[critical_sets["mode"] == mode] if "mode" in critical_sets.columns else critical_sets
    rows = _latest(rows)
    shifted = rows[rows["shift"].fillna("clean").ne("clean")]
    if shifted.empty:
        raise LayerlabError(f"critical_set_figure: the table holds no shifted rows of mode {mode!r}")
    models = list(dict.fromkeys(shifted["model"]))
    families = list(dict.fromkeys(parse_shift(s)[0] for s in shifted["shift"]))
    colours = {f: _SHIFT_COLOURS[k % len(_SHIFT_COLOURS)] for k, f in enumerate(families)}
    threshold = float(rows["threshold"].iloc[0]) if "threshold" in rows.columns else CRITICAL
    nrows, ncols = _grid(len(models), 2)
    width = max(4.0, min(shifted.groupby("model")["shift"].nunique().max() * 0.5 + 1.6, 7.0))
    fig = Figure(figsize=(width * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
    for ax, m in zip(axes, models):
        part = shifted[shifted["model"] == m]
        part = part.assign(_key=[(families.index(parse_shift(s)[0]), parse_shift(s)[1]) for s in part["shift"]])
        part = part.sort_values("_key", kind="stable")
        x = range(len(part))
        ax.bar(x, part["jaccard"], color=[colours[parse_shift(s)[0]] for s in part["shift"]], gid="jaccard")
        for k, r in enumerate(part.itertuples()):
            text = f"+{_count(r.gained)} \u2212{_count(r.lost)}" if math.isfinite(r.jaccard) else "no clean"
            ax.annotate(text, (k, r.jaccard if math.isfinite(r.jaccard) else 0.0), xytext=(0, 2),
                        textcoords="offset points", ha="center", fontsize=7, gid="gained-lost")
        ax.set_xticks(list(x), [str(s) for s in part["shift"]], rotation=45, ha="right", fontsize=7)
        ax.set_ylim(0, 1.15)
        ax.grid(axis="y", alpha=0.3)
        base = rows[(rows["model"] == m) & rows["shift"].fillna("clean").eq("clean")]["critical"]
        clean = f"clean: {int(base.iloc[0])} critical" if len(base) else "no clean rows"
        ax.set_title(f"{_short(m, 40)}\n{clean}", fontsize=8)
    axes[0].set_ylabel("Jaccard with the clean critical set")
    for ax in axes[len(models):]:
        ax.set_visible(False)
    fig.suptitle(f"Does the critical set move under shift? (critical: \u2265 {threshold:g} %; "
                 "+gained \u2212lost layers)", fontsize=9)
    return fig


def save_studies(
    summary: pd.DataFrame,
    out_dir: str | Path,
    *,
    table: pd.DataFrame | None = None,
    differences: pd.DataFrame | None = None,
    settling: pd.DataFrame | None = None,
    critical_sets: pd.DataFrame | None = None,
    threshold: float = CRITICAL,
    formats: Sequence[str] = ("png",),
) -> list[Path]:
    """The study figures the summary supports, as ``out_dir/<name>.<fmt>``; returns the paths written.

    ``criticality_over_training[_<model>]`` (one per model when several) when the summary holds clean randomize
    rows at several epochs, outlined with ``settling`` (computed at ``threshold`` when not given);
    ``criticality_shift[_<model>]`` and ``criticality_critical_sets`` (from ``critical_sets``, or computed) when
    it holds shifted rows. ``table`` and ``differences`` are accepted so that a caller can pass every table it has;
    the difference figure of the clean, final models is :func:`layerlab.plots.criticality.save_all`'s.
    """
    del table, differences  # no study figure draws them (yet)
    out_dir = Path(out_dir)
    paths: list[Path] = []
    if {"epoch", "criticality"} <= set(summary.columns):
        rows = _epoch_rows(summary)
        if rows["epoch"].nunique() > 1:
            settled = settling if settling is not None else tables.settling(summary, threshold)
            models = [m for m, part in rows.groupby("model", sort=False) if part["epoch"].nunique() > 1]
            for m in models:
                fig = over_training_heatmap(summary, m, settling=settled, threshold=threshold)
                paths += save_figure(fig, out_dir / f"criticality_over_training{_suffix(m, models)}", formats)
    if "shift" in summary.columns and summary["shift"].fillna("clean").ne("clean").any():
        models = list(dict.fromkeys(summary.loc[summary["shift"].fillna("clean").ne("clean"), "model"]))
        for m in models:
            paths += save_figure(shift_heatmap(summary, m), out_dir / f"criticality_shift{_suffix(m, models)}",
                                 formats)
        sets = critical_sets if critical_sets is not None else tables.critical_sets(summary, threshold)
        paths += save_figure(critical_set_figure(sets), out_dir / "criticality_critical_sets", formats)
    return paths


def _suffix(model: str, models: Sequence[str]) -> str:
    return "" if len(models) == 1 else file_suffix(model)
