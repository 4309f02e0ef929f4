"""Figures of representation dynamics (Sharon & Dar 2024), drawn from the tables of :func:`layerlab.dynamics.dynamics`.

* :func:`matrix_grid`: epoch x epoch heatmaps (CKA or decision-region similarity) as small multiples, one row per
  run and one column per layer, on one colour scale, with the first epoch of 100% training accuracy marked;
* :func:`probe_accuracy`: linear-probe test accuracy over training, one line per layer, one panel per run;
* :func:`accuracy_curves`: train (noisy labels), train (clean labels) and test accuracy, first 100% epoch marked,
  each run in its colour (:mod:`layerlab.plots.colors`);
* :func:`decision_regions`: a plane through three of the run's training images coloured by predicted class, opacity =
  max softmax(logits / 5), for chosen checkpoints (columns) and the network output and each probe (rows); anchors
  whose training label is noisy get a red ring;
* :func:`layer_heatmap`: the layer x layer CKA of :func:`layerlab.dynamics.compare`.

Every function takes tables and returns a ``matplotlib.figure.Figure`` built without pyplot (Agg canvas);
:func:`save_figure` writes PNG and SVG, :func:`save_dynamics` writes the standard set.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..errors import LayerlabError
from . import colors_for, plot_series
from . import save_figure as _save

__all__ = ["accuracy_curves", "decision_regions", "layer_heatmap", "matrix_grid", "probe_accuracy", "save_dynamics",
           "save_figure"]

_CLASS_COLOURS = colormaps["tab10"].colors + colormaps["Set3"].colors


def _need(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    if frame is None or frame.empty:
        raise LayerlabError(f"{what}: the table is empty; run layerlab.dynamics.dynamics(...) first")
    if missing := [c for c in columns if c not in frame.columns]:
        raise LayerlabError(f"{what}: the table lacks columns {missing} (has {list(frame.columns)}); pass the "
                            "matching table from layerlab.dynamics.dynamics(...)")


def _fit_epochs(training: pd.DataFrame | None) -> dict[str, int]:
    if training is None or training.empty or "first_fit_epoch" not in training:
        return {}
    firsts = training.dropna(subset=["first_fit_epoch"]).drop_duplicates("run")
    return {r: int(e) for r, e in zip(firsts["run"], firsts["first_fit_epoch"])}


def _order(values: pd.Series) -> list:
    return list(dict.fromkeys(values))


def save_figure(fig: Figure, out_dir: str | Path, name: str, formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Write ``fig`` as ``out_dir/name.<fmt>`` for each format (atomically, :func:`layerlab.plots.save_figure`)."""
    return _save(fig, Path(out_dir) / name, formats)


def matrix_grid(
    frame: pd.DataFrame,
    value: str = "cka",
    *,
    training: pd.DataFrame | None = None,
    runs: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
    title: str | None = None,
    cmap: str = "magma",
) -> Figure:
    """Epoch x epoch matrices of ``value`` (cka or drs): one row per run, its layers (table order) across.

    Runs of different architectures may have different layers: column i is each run's i-th layer, titled per panel.
    Dotted lines mark each run's first epoch of 100% training accuracy (from ``training``). Checkpoint axes are
    indexed by position and labelled with their epochs (log-spaced checkpoints get equal cells).
    """
    _need(frame, ["run", "layer", "label", "epoch_a", "epoch_b", value], "matrix_grid")
    run_names = list(runs) if runs is not None else _order(frame["run"])
    per_run = {r: (list(layers) if layers is not None else _order(frame.loc[frame["run"] == r, "layer"])) for r in run_names}
    labels = dict(zip(frame["layer"], frame["label"]))
    fits = _fit_epochs(training)
    nr, nc = len(run_names), max(len(v) for v in per_run.values())
    fig = Figure(figsize=(1.8 * nc + 1.3, 1.85 * nr + 0.9), layout="constrained")
    axes = np.atleast_2d(fig.subplots(nr, nc, squeeze=False))
    im = None
    for r, run in enumerate(run_names):
        for c in range(nc):
            ax = axes[r, c]
            layer = per_run[run][c] if c < len(per_run[run]) else None
            rows = frame[(frame["run"] == run) & (frame["layer"] == layer)]
            if rows.empty:
                ax.set_axis_off()
                continue
            m = rows.pivot_table(index="epoch_a", columns="epoch_b", values=value, aggfunc="mean")
            epochs = list(m.index)
            im = ax.imshow(m.to_numpy(dtype=float), cmap=cmap, vmin=0.0, vmax=1.0, origin="lower",
                           interpolation="nearest", aspect="equal")
            ticks = sorted({0, len(epochs) - 1, len(epochs) // 2})
            ax.set_xticks(ticks, [str(epochs[t]) for t in ticks], fontsize=6)
            ax.set_yticks(ticks, [str(epochs[t]) for t in ticks], fontsize=6)
            if run in fits:
                if epochs[0] <= fits[run] <= epochs[-1]:  # cells are checkpoints: place the epoch between them
                    pos = float(np.interp(fits[run], epochs, np.arange(len(epochs))))
                    for line in (ax.axvline, ax.axhline):
                        line(pos, color="#00d5ff", lw=0.8, ls=":")
            ax.set_title(labels.get(layer, layer), fontsize=7, pad=2)
            if c == 0:
                ax.set_ylabel(f"{run}\nepoch", fontsize=8)
            if r == nr - 1:
                ax.set_xlabel("epoch", fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.6, label=value.upper())
    est = ""
    if "estimator" in frame.columns:
        est = f" ({', '.join(sorted(set(frame['estimator'])))} {', '.join(sorted(set(frame['kernel'])))} CKA, minibatch)"
    elif "triplets" in frame.columns:
        est = f" ({int(frame['triplets'].iloc[0])} planes at {int(frame['resolution'].iloc[0])}x{int(frame['resolution'].iloc[0])})"
    fig.suptitle(title or f"{value.upper()} between checkpoints{est}; dotted: first epoch of 100% train acc.", fontsize=9)
    return fig


def probe_accuracy(probes: pd.DataFrame, training: pd.DataFrame | None = None, *, runs: Sequence[str] | None = None,
                   value: str = "test_acc") -> Figure:
    """Probe accuracy over training: one panel per run, one line per layer (dark = shallow, light = deep)."""
    _need(probes, ["run", "layer", "label", "epoch", value], "probe_accuracy")
    run_names = list(runs) if runs is not None else _order(probes["run"])
    fits = _fit_epochs(training)
    fig = Figure(figsize=(3.3 * len(run_names) + 1.6, 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(run_names), sharey=True, squeeze=False)[0])
    for ax, run in zip(axes, run_names):
        rows = probes[probes["run"] == run]
        layer_names = _order(rows["layer"])
        cmap = colormaps["viridis"]
        for i, layer in enumerate(layer_names):
            lr = rows[rows["layer"] == layer].sort_values("epoch")
            colour = cmap(i / max(1, len(layer_names) - 1))
            plot_series(ax, lr["epoch"], lr[value], marker=".", ms=3, lw=1.2, color=colour, label=lr["label"].iloc[0])
            if "probe_converged" in lr:  # a probe stopped at the L-BFGS cap: its accuracy is biased low
                bad = lr[~lr["probe_converged"].astype(bool)]
                ax.scatter(bad["epoch"], bad[value], marker="x", s=22, color=colour, zorder=3)
        if training is not None and not training.empty:
            tr = training[training["run"] == run].sort_values("epoch")
            plot_series(ax, tr["epoch"], tr["test_acc"], color="k", linestyle="--", lw=1, label="network (test)")
        if run in fits:
            ax.axvline(fits[run], color="#d62728", ls=":", lw=1)
        ax.set_title(run, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right", framealpha=0.7)  # per panel: runs may have different layers
    axes[0].set_ylabel(f"linear probe {value.replace('_', ' ')}")
    unconverged = "probe_converged" in probes and not probes["probe_converged"].astype(bool).all()
    fig.suptitle("Linear-probe accuracy per layer over training; dotted red: first epoch of 100% train acc."
                 + ("; x: probe stopped at the L-BFGS cap unconverged" if unconverged else ""), fontsize=9)
    return fig


def accuracy_curves(training: pd.DataFrame, *, runs: Sequence[str] | None = None) -> Figure:
    """Train (noisy labels), train (clean labels) and test accuracy per epoch, one panel per run; first 100% training
    epoch marked. Colour = run (:mod:`.colors`, as in every figure), line style = series (solid: train, dash-dot:
    train on clean labels, dashed: test)."""
    _need(training, ["run", "epoch", "train_acc", "test_acc"], "accuracy_curves")
    run_names = list(runs) if runs is not None else _order(training["run"])
    colours = colors_for(run_names)
    fits = _fit_epochs(training)
    fig = Figure(figsize=(3.3 * len(run_names) + 0.4, 3.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(run_names), sharey=True, squeeze=False)[0])
    styles = {}
    for ax, run in zip(axes, run_names):
        tr = training[training["run"] == run].sort_values("epoch")
        series = [("train (labels trained on)", "train_acc", "-"), ("test", "test_acc", "--")]
        if "train_acc_clean" in tr and tr["train_acc_clean"].notna().any() and not np.allclose(tr["train_acc_clean"], tr["train_acc"]):
            series.insert(1, ("train (clean labels)", "train_acc_clean", "-."))
        for label, column, style in series:
            plot_series(ax, tr["epoch"], tr[column], linestyle=style, color=colours[run], label=label)
            styles[label] = style
        if run in fits:
            ax.axvline(fits[run], color="#d62728", ls=":", lw=1)
            ax.annotate(f"100% at {fits[run]}", (fits[run], 0.03), fontsize=7, color="#d62728", xytext=(3, 0),
                        textcoords="offset points")
        ax.set_title(run, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    order = ["train (labels trained on)", "train (clean labels)", "test"]  # the styles, in grey: colour is the run's
    handles = [Line2D([], [], color="0.35", linestyle=styles[k], label=k) for k in order if k in styles]
    axes[0].legend(handles=handles, fontsize=7, loc="center right")
    fig.suptitle("Accuracy over training; dotted red: first epoch of 100% training accuracy", fontsize=9)
    return fig


def decision_regions(regions: pd.DataFrame, anchors: pd.DataFrame, *, classes: Sequence[str] | None = None,
                     layers: Sequence[str] | None = None, epochs: Sequence[int] | None = None) -> Figure:
    """Predicted class on a plane (colour) with opacity max softmax(logits / 5): rows = views, columns = epochs."""
    _need(regions, ["epoch", "layer", "label", "i", "j", "pred", "confidence", "c1", "c2"], "decision_regions")
    _need(anchors, ["point", "class", "c1", "c2"], "decision_regions anchors")
    view_names = list(layers) if layers is not None else _order(regions["layer"])
    if "output" in view_names:  # the network first
        view_names = ["output"] + [v for v in view_names if v != "output"]
    epoch_list = list(epochs) if epochs is not None else sorted(set(regions["epoch"]))
    labels = dict(zip(regions["layer"], regions["label"]))
    res = int(regions["i"].max()) + 1
    extent = (regions["c1"].min(), regions["c1"].max(), regions["c2"].min(), regions["c2"].max())
    palette = np.array([to_rgb(c) for c in _CLASS_COLOURS])
    nr, nc = len(view_names), len(epoch_list)
    fig = Figure(figsize=(1.75 * nc + 1.4, 1.75 * nr + 0.8), layout="constrained")
    axes = np.atleast_2d(fig.subplots(nr, nc, squeeze=False))
    for r, view in enumerate(view_names):
        for c, epoch in enumerate(epoch_list):
            ax = axes[r, c]
            rows = regions[(regions["layer"] == view) & (regions["epoch"] == epoch)]
            ax.set_xticks([])
            ax.set_yticks([])
            if rows.empty:
                ax.set_axis_off()
                continue
            img = np.ones((res, res, 4))
            jj, ii = rows["j"].to_numpy(), rows["i"].to_numpy()
            img[jj, ii, :3] = palette[rows["pred"].to_numpy() % len(palette)]
            img[jj, ii, 3] = rows["confidence"].to_numpy()
            ax.imshow(img, origin="lower", extent=extent, interpolation="nearest", aspect="equal")
            for _, a in anchors.iterrows():
                noisy = bool(a.get("noisy", False))  # a training image whose label the noise moved: red ring
                ax.scatter(a["c1"], a["c2"], s=28, marker="o", facecolor=palette[int(a["class"]) % len(palette)],
                           edgecolor="#d62728" if noisy else "k", linewidth=1.6 if noisy else 0.9, zorder=3)
            if r == 0:
                ax.set_title(f"epoch {epoch}", fontsize=8)
            if c == 0:
                ax.set_ylabel("network" if view == "output" else f"probe {labels.get(view, view)}", fontsize=7)
    used = sorted(set(regions["pred"]) | set(anchors["class"]))
    names = list(classes) if classes is not None else [str(k) for k in range(max(used) + 1)]
    from matplotlib.patches import Patch

    handles = [Patch(color=palette[k % len(palette)], label=names[k] if k < len(names) else str(k)) for k in used]
    fig.legend(handles=handles, loc="outside right center", fontsize=7, title="class", title_fontsize=7)
    anchor_txt = ", ".join(
        f"{a['point']}: class {int(a['class'])}" + (f" (noisy; clean {int(a['clean_class'])})" if bool(a.get("noisy", False)) else "")
        for _, a in anchors.iterrows())
    fig.suptitle(f"Decision regions on the plane through three of the run's training images ({anchor_txt}; dots, "
                 "class = label trained with);\ncolour = predicted class, opacity = max softmax(logits / 5)", fontsize=8)
    return fig


def layer_heatmap(frame: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Layer x layer CKA of two models (rows: model A, columns: model B), values printed in the cells."""
    _need(frame, ["layer_a", "label_a", "layer_b", "label_b", "cka"], "layer_heatmap")
    rows_order, cols_order = _order(frame["layer_a"]), _order(frame["layer_b"])
    m = frame.pivot_table(index="layer_a", columns="layer_b", values="cka", aggfunc="mean").reindex(index=rows_order, columns=cols_order)
    la, lb = dict(zip(frame["layer_a"], frame["label_a"])), dict(zip(frame["layer_b"], frame["label_b"]))
    nr, nc = m.shape
    fig = Figure(figsize=(0.5 * nc + 3.0, 0.42 * nr + 1.8), layout="constrained")
    ax = fig.add_subplot()
    values = m.to_numpy(dtype=float)
    im = ax.imshow(values, cmap="magma", vmin=0, vmax=1, origin="lower", interpolation="nearest")
    ax.set_xticks(range(nc), [lb[c] for c in cols_order], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(nr), [la[r] for r in rows_order], fontsize=7)
    if nr * nc <= 400:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5.5, color="k" if v > 0.55 else "w")
    a = frame["model_a"].iloc[0] if "model_a" in frame else "model A"
    b = frame["model_b"].iloc[0] if "model_b" in frame else "model B"
    ax.set_ylabel(str(a)[-45:], fontsize=7)
    ax.set_xlabel(str(b)[-45:], fontsize=7)
    est = f"{frame['estimator'].iloc[0]} minibatch CKA, n={int(frame['n'].iloc[0])}" if "estimator" in frame else "CKA"
    ax.set_title(title or f"Layer x layer {est}", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8, label="CKA")
    return fig


def save_dynamics(tables: dict[str, pd.DataFrame], out_dir: str | Path, *, prefix: str = "dynamics",
                  formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Write every figure the tables support: ``<prefix>_{cka,drs,probes,accuracy}.<fmt>``; returns the paths."""
    training = tables.get("training")
    out: list[Path] = []
    if tables.get("cka") is not None and not tables["cka"].empty:
        out += save_figure(matrix_grid(tables["cka"], "cka", training=training), out_dir, f"{prefix}_cka", formats)
    if tables.get("drs") is not None and not tables["drs"].empty:
        out += save_figure(matrix_grid(tables["drs"], "drs", training=training, cmap="viridis"), out_dir, f"{prefix}_drs", formats)
    if tables.get("probes") is not None and not tables["probes"].empty:
        out += save_figure(probe_accuracy(tables["probes"], training), out_dir, f"{prefix}_probes", formats)
    if training is not None and not training.empty:
        out += save_figure(accuracy_curves(training), out_dir, f"{prefix}_accuracy", formats)
    return out
