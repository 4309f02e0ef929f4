"""Figures of invariances under finetuning (Merlin et al. 2023), drawn from :func:`layerlab.invariance.invariance_grid`.

* :func:`grid_heatmaps` -- STIR(ft | pt) and STIR(pt | ft), the within-model grids, STIR(scratch | pt), plain CKA
  and the noise floor, one heatmap each (rows: reference layer i, columns: evaluated layer j);
* :func:`layer_curves` -- per layer: retention, reverse, scratch, transfer, ceiling, noise floor; the
  compression map argmax_j STIR(ft_j | pt_i) against i; the inversions' final matching loss;
* :func:`inversion_panel` -- a few originals and their inversions at every layer, per reference model.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot (Agg canvas, no global state);
:func:`save_all` writes them as PNG and SVG.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from ..errors import LayerlabError
from ..invariance import grid_matrix
from . import color_of, colors_for, plot_series, save_figure

_NAMES = {"pretrained": "pt", "finetuned": "ft", "scratch": "scratch"}
#: colours of the per-layer series (measures, not models; the models' colours are :mod:`.colors`')
_COLOURS = {"retention": "#4477AA", "reverse": "#66CCEE", "scratch": color_of("scratch"), "transfer": "#228833",
            "ceiling": "#BBBBBB", "noise": "#000000"}


def _need(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    if missing := [c for c in columns if c not in frame.columns]:
        raise LayerlabError(
            f"{what}: the table lacks columns {missing} (has {list(frame.columns)}); pass the tables returned by "
            "layerlab.invariance.invariance_grid (or read from the store's 'invariance' shards)"
        )


def _panels(grid: pd.DataFrame) -> list[tuple[str, str, str, str]]:
    """(reference, evaluated, metric, title) of every heatmap the grid supports, in reading order."""
    have = set(zip(grid["reference"], grid["evaluated"], grid["metric"]))
    wanted = [
        ("pretrained", "finetuned", "stir", "STIR(ft_j | pt_i)"),
        ("finetuned", "pretrained", "stir", "STIR(pt_j | ft_i)"),
        ("pretrained", "pretrained", "stir", "STIR(pt_j | pt_i)"),
        ("finetuned", "finetuned", "stir", "STIR(ft_j | ft_i)"),
        ("pretrained", "scratch", "stir", "STIR(scratch_j | pt_i)"),
        ("pretrained", "finetuned", "cka", "CKA(pt_i, ft_j)  [plain]"),
        ("pretrained", "finetuned", "noise", "noise floor of ft_j  [0 steps]"),
    ]
    return [w for w in wanted if (w[0], w[1], w[2]) in have]  # a pair without that metric (e.g. no cka): no panel


def grid_heatmaps(grid: pd.DataFrame, *, annotate: bool = True, title: str | None = None) -> Figure:
    """Every STIR / CKA / noise-floor grid as a heatmap on one [0, 1] colour scale."""
    _need(grid, ["reference", "evaluated", "metric", "value", "ref_index", "eval_index", "ref_label", "eval_label"],
          "grid_heatmaps")
    panels = _panels(grid)
    if not panels:
        raise LayerlabError("grid_heatmaps: the grid holds no pretrained/finetuned pairs")
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    n = grid["ref_index"].nunique()
    cell = max(0.45, min(0.8, 4.2 / max(n, 1)))
    fig = Figure(figsize=(cols * (n * cell + 1.6), rows * (n * cell + 1.5)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for ax, (ref, ev, metric, name) in zip(axes.flat, panels):
        mat = grid_matrix(grid, ref, ev, metric)
        image = ax.imshow(mat.to_numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="equal")
        ax.set_xticks(range(mat.shape[1]), mat.columns, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(mat.shape[0]), mat.index, fontsize=7)
        ax.set_xlabel(f"{_NAMES[ev]} layer j (evaluated)", fontsize=8)
        ax.set_ylabel(f"{_NAMES[ref]} layer i (inverted)", fontsize=8)
        ax.set_title(name, fontsize=9)
        if annotate and mat.shape[0] * mat.shape[1] <= 144:
            for (a, b), v in np.ndenumerate(mat.to_numpy()):
                if np.isfinite(v):
                    ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if v > 0.6 else "white")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="linear CKA")
    est = grid["estimator"].iloc[0] if "estimator" in grid else "?"
    steps = grid["steps"].iloc[0] if "steps" in grid else "?"
    images = grid["images"].iloc[0] if "images" in grid else "?"
    fig.suptitle(title or f"STIR grids ({est} linear CKA over {images} images, {steps} inversion steps)", fontsize=10)
    return fig


def layer_curves(summary: pd.DataFrame, inversions: pd.DataFrame | None = None, *, title: str | None = None) -> Figure:
    """Retention / transfer per layer, the compression map, and the inversions' final matching loss."""
    _need(summary, ["label", "index", "retention", "reverse", "ceiling", "noise"], "layer_curves")
    s = summary.sort_values("index")
    x = s["index"].to_numpy()
    panels = 3 if inversions is not None and not inversions.empty else 2
    fig = Figure(figsize=(5.2 * panels, 4.2), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]

    ax = axes[0]
    series = [("ceiling", "STIR(pt_l | pt_l) ceiling", ":"), ("retention", "retention STIR(ft_l | pt_l)", "-"),
              ("reverse", "reverse STIR(pt_l | ft_l)", "--"), ("scratch", "STIR(scratch_l | pt_l)", "-"),
              ("transfer", "transfer = retention - scratch", "-"), ("noise", "noise floor of ft_l", ":")]
    for col, label, style in series:
        if col in s:
            plot_series(ax, x, s[col], linestyle=style, marker="o", ms=4, color=_COLOURS[col], label=label)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(x, s["label"], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("STIR (linear CKA)")
    ax.set_title("shared invariances per layer", fontsize=10)
    ax.legend(fontsize=7, loc="best")

    ax = axes[1]
    ax.plot(x, x, color="grey", lw=0.8, ls=":", label="same layer")
    ft, scratch = color_of("finetuned"), color_of("scratch")
    if "best_index" in s:
        plot_series(ax, x, s["best_index"], marker="o", color=ft, label="argmax_j STIR(ft_j | pt_i)")
    if "shift_above_noise" in s:
        plot_series(ax, x, x + s["shift_above_noise"].to_numpy(), marker="^", linestyle="--", color=ft, alpha=0.6,
                    label="same, above the noise floor")
    if "scratch_shift" in s:
        plot_series(ax, x, x + s["scratch_shift"].to_numpy(), marker="s", color=scratch,
                    label="argmax_j STIR(scratch_j | pt_i)")
    if "scratch_shift_above_noise" in s:
        plot_series(ax, x, x + s["scratch_shift_above_noise"].to_numpy(), marker="v", linestyle="--", color=scratch,
                    alpha=0.6, label="same, above the noise floor")
    ax.set_xticks(x, s["label"], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(x, s["label"], fontsize=8)
    ax.set_xlabel("pretrained layer i")
    ax.set_ylabel("best-matching layer j")
    ax.set_title("compression: where pt_i's invariances sit", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")

    if panels == 3:
        ax = axes[2]
        _need(inversions, ["model", "index", "label", "loss_mean", "initial_loss_mean"], "layer_curves")
        colours = colors_for(inversions["model"])
        for model, rows in inversions.groupby("model", sort=False):
            rows = rows.sort_values("index")
            name, colour = _NAMES.get(model, model), colours[str(model)]
            plot_series(ax, rows["index"], rows["loss_mean"], marker="o", color=colour, label=f"{name} final")
            plot_series(ax, rows["index"], rows["initial_loss_mean"], linestyle=":", color=colour,
                        label=f"{name} noise")
        ax.set_yscale("log")
        ax.set_xticks(x, s["label"], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("|m_i(x') - m_i(x)| / |m_i(x)|")
        ax.set_title("inversion matching loss (mean over images)", fontsize=10)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title or "retention, transfer and compression of pretrained invariances", fontsize=10)
    return fig


def _to_image(t: torch.Tensor) -> np.ndarray:
    """[C, H, W] in [0, 1] -> [H, W] (grey) or [H, W, 3] for imshow."""
    a = t.detach().float().clamp(0, 1).cpu().numpy()
    return a[0] if a.shape[0] == 1 else np.moveaxis(a[:3], 0, -1)


def inversion_panel(originals: torch.Tensor, examples: Mapping[tuple[str, str], torch.Tensor], *,
                    title: str | None = None) -> Figure:
    """Originals (top row) and their inversions at every layer (one row each), one block per reference model.

    ``examples`` maps (model, layer label) to inverted images [k, C, H, W]; see
    :func:`layerlab.invariance.example_inversions`.
    """
    if not examples:
        raise LayerlabError("inversion_panel: no inverted images given; keep the InversionCache of the grid run")
    models = list(dict.fromkeys(m for m, _ in examples))
    labels = list(dict.fromkeys(lab for _, lab in examples))
    k = min(int(originals.shape[0]), min(int(v.shape[0]) for v in examples.values()))
    fig = Figure(figsize=(len(models) * (k * 0.75 + 0.4) + 1.2, (len(labels) + 1) * 0.78 + 0.6), layout="constrained")
    subfigs = fig.subfigures(1, len(models), squeeze=False)[0]
    grey = originals.shape[1] == 1
    for sub, model in zip(subfigs, models):
        axes = sub.subplots(len(labels) + 1, k, squeeze=False)
        rows = [("original", originals[:k])] + [(lab, examples.get((model, lab))) for lab in labels]
        for r, (lab, imgs) in enumerate(rows):
            for c in range(k):
                ax = axes[r, c]
                ax.set_xticks([])
                ax.set_yticks([])
                if imgs is not None:
                    ax.imshow(_to_image(imgs[c]), cmap="gray" if grey else None, vmin=0, vmax=1)
                if c == 0:
                    ax.set_ylabel(lab, fontsize=7, rotation=0, ha="right", va="center")
        sub.suptitle(f"inverted through {model}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_all(result: Mapping[str, pd.DataFrame], out_dir: str | Path, *, originals: torch.Tensor | None = None,
             examples: Mapping[tuple[str, str], torch.Tensor] | None = None,
             formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """All invariance figures into ``out_dir`` (``stir_grids``, ``layer_curves``, ``inversions``); returns paths."""
    out_dir = Path(out_dir)
    paths = save_figure(grid_heatmaps(result["grid"]), out_dir / "stir_grids", formats)
    paths += save_figure(layer_curves(result["summary"], result.get("inversions")), out_dir / "layer_curves", formats)
    if originals is not None and examples:
        paths += save_figure(inversion_panel(originals, examples), out_dir / "inversions", formats)
    return paths
