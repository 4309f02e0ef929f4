"""Figures of layer criticality, drawn from the summary table (:func:`layerlab.criticality.summarize`).

Gavrikov, Agnihotri, Keuper, Keuper 2024 (arXiv 2410.14470): (1) :func:`heatmap` layers x models;
(2) :func:`vs_attribute` average criticality vs a numeric training attribute (attack budget); (3) :func:`vs_accuracy`
average criticality vs accuracy with Spearman's rho, coloured by training category; (4) :func:`diff_to_baseline`
(with a differences table: its bootstrap intervals, a dot where one excludes 0); (5) :func:`std_heatmap`, the spread
over trials. Zhang, Bengio, Singer 2022: :func:`checkpoint_heatmap`, test error
after resetting each layer (or block) to fresh weights and to each checkpoint.

Every function takes tables and returns a ``matplotlib.figure.Figure`` built without pyplot (no global state,
Agg canvas); :func:`save_all` writes every figure the tables support as PNG and SVG. These are figures of the clean,
final models (:func:`clean_final`); over training and under shift see :mod:`.criticality_studies`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..criticality import average_criticality
from ..criticality.tables import clean_final, spearman_rho
from ..errors import LayerlabError
from . import MIN_LINE_POINTS, colors_for, plot_series, save_figure

_SUMMARY_HINT = "pass the summary from layerlab.criticality.summarize(table) or DIR/criticality_summary.csv"


def _need(frame: pd.DataFrame, columns: Sequence[str], what: str, hint: str = _SUMMARY_HINT) -> None:
    if missing := [c for c in columns if c not in frame.columns]:
        raise LayerlabError(f"{what}: the table lacks columns {missing} (has {list(frame.columns)}); {hint}")


def _mode_rows(summary: pd.DataFrame, mode: str) -> pd.DataFrame:
    if "mode" not in summary.columns:
        return summary
    rows = summary[summary["mode"] == mode]
    if rows.empty:
        raise LayerlabError(f"the summary holds no rows of mode {mode!r}; it has {sorted(summary['mode'].unique())}")
    return rows


def layer_matrix(
    summary: pd.DataFrame, value: str = "criticality", *, mode: str = "randomize", models: Sequence[str] | None = None
) -> pd.DataFrame:
    """Pivot a summary to layers (rows, forward order, labelled) x models (columns, table order)."""
    _need(summary, ["model", "layer", "label", value], "layer_matrix")
    rows = _mode_rows(summary, mode)
    order = list(dict.fromkeys(rows["model"])) if models is None else list(models)
    if unknown := [m for m in order if m not in set(rows["model"])]:
        raise LayerlabError(f"models {unknown} are not in the summary; it has {sorted(set(rows['model']))}")
    return layer_pivot(rows, "model", value, order)


def layer_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """``layer`` and ``label`` of each layer once, in forward (``index``) order; label = layer where absent."""
    sort = ["index", "layer"] if "index" in rows.columns else ["layer"]
    layers = rows.sort_values(sort, kind="stable").drop_duplicates("layer")
    return pd.DataFrame({"layer": layers["layer"].tolist(),
                         "label": (layers["label"] if "label" in layers.columns else layers["layer"]).tolist()})


def layer_pivot(rows: pd.DataFrame, column: str, value: str, order: Sequence) -> pd.DataFrame:
    """Layers (rows, forward order, labelled) x ``column`` values in ``order``: the mean ``value`` per cell."""
    layers = layer_rows(rows)
    matrix = rows.pivot_table(index="layer", columns=column, values=value, aggfunc="mean", dropna=False)
    matrix = matrix.reindex(index=layers["layer"], columns=list(order))
    matrix.index = pd.Index(layers["label"].tolist(), name="layer")
    return matrix


def _short(name: str, width: int = 24) -> str:
    """Model names can be whole specs; keep tick labels readable (head ... tail)."""
    return name if len(name) <= width else name[: width // 2 - 1] + "..." + name[-(width // 2 - 2):]


def short_labels(names: Sequence[str], width: int = 24) -> list[str]:
    """:func:`_short` of every name, widened where two would read the same (two specs that differ only in the
    middle), up to the full names: distinct names keep distinct tick labels."""
    names = [str(n) for n in names]
    labels = [_short(n, width) for n in names]
    while len(set(labels)) < len(set(names)) and width < max(map(len, names)):
        width += 8
        seen = list(labels)
        labels = [_short(n, width) if seen.count(lab) > 1 else lab for n, lab in zip(names, labels)]
    return labels


def draw_panel(
    ax, matrix: pd.DataFrame, *, cmap: str, vmin: float | None, vmax: float | None, fmt: str = "{:.0f}",
    xlabels: Sequence[str] | None = None, rotation: float = 60,
):
    """One heatmap panel on ``ax``: the cells coloured, valued (when few enough) and the axes ticked with the
    matrix's labels (columns shortened unless ``xlabels`` are given); returns the image for a colour bar."""
    rows, cols = matrix.shape
    values = matrix.to_numpy(dtype=float)
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    xlabels = short_labels(matrix.columns) if xlabels is None else list(xlabels)
    ax.set_xticks(range(cols), xlabels, rotation=rotation, ha="right" if rotation else "center", fontsize=8)
    ax.set_yticks(range(rows), [str(r) for r in matrix.index], fontsize=7)
    if rows * cols <= 600:
        for (i, j), v in np.ndenumerate(values):
            if math.isfinite(v):
                r, g, b, _ = im.cmap(im.norm(v))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # text colour from the cell's luminance
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6, color="white" if dark else "black")
    return im


def _draw_matrix(
    matrix: pd.DataFrame, title: str, cbar: str, *, cmap: str, vmin: float | None, vmax: float | None,
    fmt: str = "{:.0f}", xlabels: Sequence[str] | None = None,
) -> Figure:
    rows, cols = matrix.shape
    fig = Figure(figsize=(max(4.5, 0.55 * cols + 3.2), max(3.0, 0.26 * rows + 1.6)), layout="constrained")
    ax = fig.add_subplot()
    im = draw_panel(ax, matrix, cmap=cmap, vmin=vmin, vmax=vmax, fmt=fmt, xlabels=xlabels)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=cbar, shrink=0.8)
    return fig


def heatmap(
    summary: pd.DataFrame, *, mode: str = "randomize", models: Sequence[str] | None = None, title: str | None = None
) -> Figure:
    """Fig. 1: criticality (%) of every layer (rows) in every model (columns)."""
    matrix = layer_matrix(summary, "criticality", mode=mode, models=models)
    return _draw_matrix(matrix, title or f"Layer criticality ({mode})", "criticality [%]", cmap="viridis",
                        vmin=0, vmax=100)


def std_heatmap(
    summary: pd.DataFrame, *, mode: str = "randomize", models: Sequence[str] | None = None, title: str | None = None
) -> Figure:
    """Fig. 5: standard deviation of criticality over trials (ddof=1), per layer and model."""
    matrix = layer_matrix(summary, "std", mode=mode, models=models)
    vmax = float(np.nanmax(matrix.to_numpy(dtype=float))) if np.isfinite(matrix.to_numpy(dtype=float)).any() else 1.0
    return _draw_matrix(matrix, title or "Criticality: std over trials", "std [% points]", cmap="magma",
                        vmin=0, vmax=max(vmax, 1e-9), fmt="{:.1f}")


def diff_to_baseline(
    summary: pd.DataFrame, baseline: str = "baseline", *, mode: str = "randomize", models: Sequence[str] | None = None,
    title: str | None = None, differences: pd.DataFrame | None = None,
) -> Figure:
    """Fig. 4: criticality minus the baseline model's, per layer (blue: less critical, red: more).

    With ``differences`` (:func:`layerlab.criticality.differences`) the cells are its differences (clean, final
    models), a dot marks each cell whose 95 % interval excludes 0, and a method averaged over several seeds says
    so in its column label; without it, the summary's criticality minus the baseline's.
    """
    if differences is not None:
        return _marked_diff(differences, baseline, mode=mode, models=models, title=title)
    matrix = layer_matrix(summary, "criticality", mode=mode, models=models)
    if baseline not in matrix.columns:
        full = layer_matrix(summary, "criticality", mode=mode)
        if baseline not in full.columns:
            raise LayerlabError(f"baseline model {baseline!r} is not in the summary; models: {list(full.columns)}")
        matrix[baseline] = full[baseline]
    diff = matrix.sub(matrix[baseline], axis=0).drop(columns=baseline)
    if diff.shape[1] == 0:
        raise LayerlabError("diff_to_baseline needs at least one model besides the baseline")
    finite = diff.to_numpy(dtype=float)
    lim = float(np.nanmax(np.abs(finite))) if np.isfinite(finite).any() else 1.0
    lim = max(lim, 1e-9)
    return _draw_matrix(diff, title or f"Criticality minus {baseline!r}", "difference [% points]", cmap="RdBu_r",
                        vmin=-lim, vmax=lim, fmt="{:+.0f}")


def _marked_diff(
    differences: pd.DataFrame, baseline: str, *, mode: str, models: Sequence[str] | None, title: str | None
) -> Figure:
    """The difference figure drawn from a differences table, distinguishable cells dotted."""
    _need(differences, ["model", "layer", "difference", "distinguishable"], "diff_to_baseline differences",
          "pass the table layerlab.criticality.differences(table, baseline) returns or DIR/criticality_differences.csv")
    rows = _final_diff(differences, mode)
    if rows.empty:
        raise LayerlabError(f"diff_to_baseline: the differences hold no clean final-model rows of mode {mode!r} "
                            "(shift 'clean', no analysed epoch); compute them from a table that has such rows")
    present = list(dict.fromkeys(rows["model"]))
    order = present if models is None else [m for m in models if m != baseline]
    if unknown := [m for m in order if m not in present]:
        raise LayerlabError(f"models {unknown} are not in the differences; they have {present}")
    rows = rows.assign(_marked=rows["distinguishable"].astype(bool).astype(float))
    diff = layer_pivot(rows, "model", "difference", order)
    marked = layer_pivot(rows, "model", "_marked", order).to_numpy(dtype=float) > 0.5
    seeds = rows.groupby("model")["seeds"].max() if "seeds" in rows.columns else pd.Series(dtype=float)
    labels = [s + (f" ({int(seeds[m])} seeds)" if seeds.get(m, 1) > 1 else "") for m, s in zip(order, short_labels(order))]
    finite = diff.to_numpy(dtype=float)
    lim = max(float(np.nanmax(np.abs(finite))) if np.isfinite(finite).any() else 1.0, 1e-9)
    has_ci = "ci_low" in rows.columns and bool(rows["ci_low"].notna().any())
    caption = (f"\u2022: 95 % interval excludes 0 ({int(marked.sum())} of {int(np.isfinite(finite).sum())} cells)"
               if has_ci else "no intervals (table stored without per-image values)")
    fig = _draw_matrix(diff, (title or f"Criticality minus {baseline!r}") + "\n" + caption, "difference [% points]",
                       cmap="RdBu_r", vmin=-lim, vmax=lim, fmt="{:+.0f}", xlabels=labels)
    i, j = np.nonzero(marked)
    if len(i):  # a dot in the cell's upper right corner, clear of its value
        fig.axes[0].scatter(j + 0.32, i - 0.28, s=10, c="black", edgecolors="white", linewidths=0.6, zorder=3,
                            gid="distinguishable")
    return fig


def _with_attrs(summary: pd.DataFrame, attrs: pd.DataFrame | None, mode: str) -> pd.DataFrame:
    avg = average_criticality(_mode_rows(summary, mode), mode=mode)
    if "base_accuracy" in summary.columns:
        base = _mode_rows(summary, mode).groupby("model", sort=False)["base_accuracy"].mean().reset_index()
        avg = avg.merge(base, on="model", how="left")
    if attrs is not None:
        _need(attrs, ["model"], "attrs")
        avg = avg.merge(attrs.drop(columns=[c for c in ("criticality",) if c in attrs.columns]), on="model", how="left")
    return avg


def _categories(table: pd.DataFrame, category: str) -> pd.Series:
    if category not in table.columns:
        return pd.Series("all", index=table.index)
    return table[category].fillna("other").astype(str)


def vs_attribute(
    summary: pd.DataFrame, attrs: pd.DataFrame, attribute: str = "budget", *, category: str = "category",
    mode: str = "randomize", title: str | None = None,
) -> Figure:
    """Fig. 2: average criticality vs a numeric training attribute (e.g. adversarial attack budget), one line per
    category in its colour (:mod:`.colors`); models without a value for the attribute are left out. A category
    with fewer than three values of the attribute is drawn as points, not a line, each labelled with its value."""
    _need(attrs, ["model", attribute], "vs_attribute attrs")
    table = _with_attrs(summary, attrs, mode)
    table = table[pd.to_numeric(table[attribute], errors="coerce").notna()].copy()
    if table.empty:
        raise LayerlabError(f"no model in the summary has a numeric {attribute!r} in attrs")
    table[attribute] = pd.to_numeric(table[attribute])
    cats = _categories(table, category)
    fig = Figure(figsize=(5.2, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for cat, colour in colors_for(cats).items():
        part = table[cats == cat].sort_values(attribute)
        line = plot_series(ax, part[attribute], part["criticality"], marker="o", color=colour, label=cat)
        dots = line.get_linestyle() == "None"
        for _, r in part.iterrows():
            text = f"{r['model']} ({r['criticality']:.0f} %)" if dots else str(r["model"])
            ax.annotate(text, (r[attribute], r["criticality"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    values = sorted(set(table[attribute]))
    if len(values) < 2 * MIN_LINE_POINTS:  # few values: tick each one, room for the labels at the right
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.margins(x=0.2)
    ax.set_xlabel(attribute)
    ax.set_ylabel("average criticality [%]")
    ax.set_title(title or f"Average criticality vs {attribute}", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def spearman(summary: pd.DataFrame, attrs: pd.DataFrame | None = None, accuracy: str = "accuracy", *,
             mode: str = "randomize", exclude: Sequence[str] = ()) -> tuple[float, float, int]:
    """Spearman's rho (and p) between average criticality and accuracy over models, leaving out categories
    ``exclude`` (the paper: -0.46 over all 50 models, -0.17 without the adversarially trained ones)."""
    table = _accuracy_table(summary, attrs, accuracy, mode)
    if exclude and "category" in table.columns:
        table = table[~table["category"].isin(list(exclude))]
    r = spearman_rho(table["criticality"], table["_acc"])
    return r["rho"], r["p"], r["n"]


def _accuracy_table(summary: pd.DataFrame, attrs: pd.DataFrame | None, accuracy: str, mode: str) -> pd.DataFrame:
    table = _with_attrs(summary, attrs, mode)
    if accuracy in table.columns and pd.to_numeric(table[accuracy], errors="coerce").notna().any():
        table["_acc"] = pd.to_numeric(table[accuracy], errors="coerce")
    elif "base_accuracy" in table.columns:
        table["_acc"] = table["base_accuracy"]
    else:
        raise LayerlabError(f"no accuracy: attrs lacks {accuracy!r} and the summary lacks base_accuracy")
    return table[table["_acc"].notna()]


def accuracy_scatter(table: pd.DataFrame, rho: pd.Series | dict, *, x: str = "accuracy", y: str = "mean_criticality",
                     category: str = "category", xlabel: str = "test accuracy", title: str | None = None,
                     size: tuple[float, float] = (5.2, 3.8)) -> Figure:
    """Mean criticality against accuracy, one point per model coloured by training category (by model where the
    table has no ``category``; colours of :mod:`.colors`), with Spearman's rho (a
    :func:`layerlab.criticality.tables.spearman_rho` row: n, rho, p) in the title."""
    cats = table[category].fillna("other").astype(str) if category in table.columns else table["model"].astype(str)
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot()
    for cat, colour in colors_for(cats).items():
        part = table[cats == cat]
        ax.scatter(part[x], part[y], color=colour, label=cat, s=28)
        for _, r in part.iterrows():
            ax.annotate(str(r["model"]), (r[x], r[y]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("average criticality [%]")
    n = int(rho["n"])
    rho_text = (f"Spearman rho = {rho['rho']:+.2f} (p = {rho['p']:.2g}, n = {n})" if math.isfinite(rho["rho"])
                else f"Spearman rho: n/a (n = {n})")
    ax.set_title(title or f"Average criticality vs accuracy\n{rho_text}", fontsize=10)
    if category in table.columns:  # coloured by model, the points' labels are the legend
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def vs_accuracy(
    summary: pd.DataFrame, attrs: pd.DataFrame | None = None, accuracy: str = "accuracy", *, category: str = "category",
    mode: str = "randomize", title: str | None = None,
) -> Figure:
    """Fig. 3: average criticality vs accuracy, coloured by training category (else by model), with Spearman's rho in the title.

    Accuracy comes from ``attrs[accuracy]`` when given, else from the summary's ``base_accuracy`` (the model's
    accuracy on the criticality images).
    """
    table = _accuracy_table(summary, attrs, accuracy, mode)
    rho = spearman_rho(table["criticality"], table["_acc"])
    return accuracy_scatter(table, rho, x="_acc", y="criticality", category=category, title=title,
                            xlabel=accuracy if accuracy in table.columns else "accuracy on the criticality images")


def checkpoint_matrix(summary: pd.DataFrame, model: str | None = None) -> pd.DataFrame:
    """Zhang et al.'s table: test error (%) after the reset, rows = units, columns = random then each epoch."""
    _need(summary, ["model", "layer", "label", "mode", "epoch", "accuracy"], "checkpoint_matrix")
    model = model or str(summary["model"].iloc[0])
    rows = summary[summary["model"] == model]
    if rows.empty:
        raise LayerlabError(f"model {model!r} is not in the summary; it has {sorted(set(summary['model']))}")
    if not rows["mode"].isin(["reinit", "checkpoint"]).any():
        raise LayerlabError(f"model {model!r} has no reinit/checkpoint rows; run with --mode checkpoint --run RUN_DIR")

    def column(r: pd.Series) -> str:
        if r["mode"] == "randomize":
            return "random"
        return f"epoch {int(r['epoch'])}" + (" (reinit)" if r["mode"] == "reinit" else "")

    rows = rows.assign(column=rows.apply(column, axis=1), error=100.0 * (1.0 - rows["accuracy"]))
    epochs = sorted({int(e) for e in rows["epoch"].dropna()})
    cols = ["random"] * bool((rows["mode"] == "randomize").any())
    for e in epochs:
        cols += [c for c in (f"epoch {e} (reinit)", f"epoch {e}") if c in set(rows["column"])]
    sort = ["index", "layer"] if "index" in rows.columns else ["layer"]
    units = rows.sort_values(sort, kind="stable").drop_duplicates("layer")[["layer", "label"]]
    matrix = rows.pivot_table(index="layer", columns="column", values="error", aggfunc="mean").reindex(
        index=units["layer"], columns=cols
    )
    matrix.index = pd.Index(units["label"].tolist(), name="layer")
    return matrix


def checkpoint_heatmap(summary: pd.DataFrame, model: str | None = None, *, title: str | None = None) -> Figure:
    """Zhang et al. 2022: test error (%) after resetting each unit to fresh weights ("random") or to each checkpoint."""
    matrix = checkpoint_matrix(summary, model)
    name = model or str(summary["model"].iloc[0])
    return _draw_matrix(matrix, title or f"Test error after reset: {name}", "test error [%]", cmap="viridis_r",
                        vmin=0, vmax=100)


def file_suffix(model: str) -> str:
    """``_<model>`` with every character but letters and digits as ``_``: one file per model in a folder."""
    return "_" + "".join(ch if ch.isalnum() else "_" for ch in model)


def save_all(
    summary: pd.DataFrame,
    out_dir: str | Path,
    attrs: pd.DataFrame | None = None,
    *,
    baseline: str = "baseline",
    attribute: str = "budget",
    formats: Sequence[str] = ("png", "svg"),
    differences: pd.DataFrame | None = None,
) -> list[Path]:
    """Every figure the tables support, as ``out_dir/criticality_<figure>.<fmt>``; returns the paths written.

    Heatmap and std heatmap always (given randomize rows); the difference figure when ``baseline`` is a model
    and there is another, or when ``differences`` (:func:`layerlab.criticality.differences`, then with its
    intervals) holds clean final-model rows; vs-attribute when ``attrs`` gives some model a numeric
    ``attribute``; vs-accuracy with at least two models; the checkpoint heatmap for every model with checkpoint
    rows. These figures are of the clean, final models: rows under shift or over training are left to
    :func:`layerlab.plots.criticality_studies.save_studies`.
    """
    out_dir = Path(out_dir)
    paths: list[Path] = []
    summary = clean_final(summary)
    if summary.empty:
        return paths
    modes = set(summary["mode"]) if "mode" in summary.columns else {"randomize"}
    models = list(dict.fromkeys(summary["model"]))
    if "randomize" in modes:
        paths += save_figure(heatmap(summary), out_dir / "criticality_heatmap", formats)
        paths += save_figure(std_heatmap(summary), out_dir / "criticality_std", formats)
        if differences is not None and len(_final_diff(differences)):
            fig = diff_to_baseline(summary, baseline, differences=differences)
            paths += save_figure(fig, out_dir / "criticality_diff", formats)
        elif baseline in models and len(models) > 1:
            paths += save_figure(diff_to_baseline(summary, baseline), out_dir / "criticality_diff", formats)
        if attrs is not None and attribute in attrs.columns:
            numeric = pd.to_numeric(attrs.loc[attrs["model"].isin(models), attribute], errors="coerce")
            if numeric.notna().any():
                fig = vs_attribute(summary, attrs, attribute)
                paths += save_figure(fig, out_dir / f"criticality_vs_{attribute}", formats)
        if len(models) > 1:
            paths += save_figure(vs_accuracy(summary, attrs), out_dir / "criticality_vs_accuracy", formats)
    if modes & {"reinit", "checkpoint"}:
        for m in models:
            rows = summary[summary["model"] == m]
            if rows["mode"].isin(["reinit", "checkpoint"]).any():
                suffix = "" if len(models) == 1 else file_suffix(m)
                fig = checkpoint_heatmap(summary, m)
                paths += save_figure(fig, out_dir / f"criticality_checkpoints{suffix}", formats)
    return paths


def _final_diff(differences: pd.DataFrame, mode: str = "randomize") -> pd.DataFrame:
    """The ``mode`` rows of a differences table about the clean, final models."""
    rows = clean_final(differences)
    return rows[rows["mode"] == mode] if "mode" in rows.columns else rows
