"""Interactive views of the report: plotly.js figure specs built from the tidy tables, plus the data of the
side-by-side model comparison.

Each view is a plain ``{"data": [...], "layout": {...}}`` dict (the plotly.js figure schema), so building one needs
no plotting library and a test can read its numbers back; the page embeds plotly.js itself (:func:`plotly_js`,
from the ``plotly`` package) so the views work offline. Builders are registered per analysis family and get the
family's tables; a builder that finds nothing to show returns no view.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from ..registry import Registry
from .summaries import first_last

__all__ = ["VIEWS", "View", "compare_data", "plotly_js", "views_for"]


@dataclass
class View:
    """One interactive figure: a title, a plotly.js spec and a line on how to use it."""

    key: str
    title: str
    spec: dict[str, Any]
    note: str = ""
    wide: bool = False  # spans the section's width (heatmaps with many columns)


Builder = Callable[[dict[str, pd.DataFrame], dict[str, str]], list[View]]
VIEWS: Registry[Builder] = Registry("report view")


def view(name: str):
    """Register ``fn(tables, colors) -> [View]`` for analysis family ``name``."""
    return VIEWS.register(name)


def plotly_js() -> str:
    """The plotly.js bundle shipped inside the ``plotly`` package (no network)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def clean(obj: Any) -> Any:
    """JSON-safe: NaN and inf -> None, numpy scalars and arrays -> Python (JSON.parse rejects NaN)."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if obj is pd.NA or obj is pd.NaT:
        return None
    return obj


def views_for(name: str, tables: dict[str, pd.DataFrame], colors: dict[str, str]) -> list[View]:
    """The views of analysis family ``name`` (none when it has no builder or its tables lack the columns)."""
    if name not in VIEWS:
        return []
    try:
        return VIEWS.get(name)(tables, colors)
    except (KeyError, ValueError, TypeError, IndexError):  # a table of another shape: the static figures remain
        return []


def _layout(title: str, height: int = 420, **kw: Any) -> dict[str, Any]:
    base = {"title": {"text": title, "font": {"size": 14}, "x": 0.01, "xanchor": "left"}, "height": height, "margin": {"l": 70, "r": 20, "t": 40, "b": 60},
            "hovermode": "closest", "paper_bgcolor": "#fff", "plot_bgcolor": "#fff", "font": {"size": 12},
            "legend": {"orientation": "v"}}
    base.update(kw)
    return base


def _layer_order(table: pd.DataFrame, layer: str = "layer", index: str | None = "index") -> list[str]:
    """Layers in forward order: by their index column when the table has one, else in natural order."""
    t = table.drop_duplicates(layer)
    if index is not None and index in t.columns:
        return t.sort_values(index, kind="stable")[layer].tolist()
    return _natural(t[layer].tolist())


def _natural(names: list[str]) -> list[str]:
    """Layer names without a forward index in natural order (layer2 before layer10; the output last)."""
    def key(name: str) -> tuple:
        last = name in ("output", "logits", "head", "fc")
        return (last, [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)])
    return sorted(names, key=key)


def _labels(table: pd.DataFrame, layers: list[str], layer: str = "layer", label: str = "label") -> list[str]:
    if label not in table.columns:
        return layers
    names = table.drop_duplicates(layer).set_index(layer)[label].astype(str).to_dict()
    return [names.get(x, x) for x in layers]


def _dropdown(labels: list[str], masks: list[list[bool]], titles: list[str] | None = None) -> list[dict[str, Any]]:
    buttons = []
    for i, (label, mask) in enumerate(zip(labels, masks)):
        args: list[Any] = [{"visible": mask}]
        if titles:
            args.append({"title.text": titles[i]})
        buttons.append({"label": label, "method": "update", "args": args})
    return [{"buttons": buttons, "direction": "down", "x": 1.0, "xanchor": "right", "y": 1.0, "yanchor": "bottom",
             "showactive": True}]


# ============================================================================================== criticality


def final_criticality(table: pd.DataFrame) -> pd.DataFrame:
    """Per (model, layer) mean criticality of the final models on clean images (randomize mode)."""
    from .text import clean_final

    rows = clean_final(table)
    keys = ["model", "layer"] + [c for c in ("label", "index") if c in rows.columns]
    return rows.groupby(keys, sort=False)["criticality"].agg(["mean", "std", "count"]).reset_index()


@view("criticality")
def _criticality(tables: dict[str, pd.DataFrame], colors: dict[str, str]) -> list[View]:
    table = tables["criticality"]
    per = final_criticality(table)
    if per.empty:
        return []
    layers = _layer_order(per)
    labels = _labels(per, layers)
    models = sorted(per["model"].unique(), key=lambda m: per.loc[per["model"] == m, "mean"].mean())
    grid = per.pivot_table(index="model", columns="layer", values="mean", aggfunc="mean").reindex(index=models, columns=layers)
    heat = {"data": [{"type": "heatmap", "z": grid.to_numpy(), "x": labels, "y": models, "colorscale": "Viridis",
                      "zmin": 0, "zmax": 100, "colorbar": {"title": {"text": "criticality %"}},
                      "hovertemplate": "model %{y}<br>layer %{x}<br>criticality %{z:.1f} %<extra></extra>"}],
            "layout": _layout("Criticality per model and layer (final models, clean images)", 140 + 26 * len(models),
                              xaxis={"tickangle": -60, "automargin": True}, yaxis={"automargin": True})}
    lines = []
    for m in models:
        t = per[per["model"] == m].set_index("layer").reindex(layers)
        lines.append({"type": "scatter", "mode": "lines+markers", "name": m, "x": labels, "y": t["mean"].to_numpy(),
                      "error_y": {"type": "data", "array": t["std"].fillna(0).to_numpy(), "visible": True, "thickness": 1},
                      "line": {"color": colors.get(m)}, "marker": {"color": colors.get(m), "size": 5},
                      "hovertemplate": f"{m}<br>%{{x}}<br>%{{y:.1f}} %<extra></extra>"})
    per_layer = {"data": lines, "layout": _layout("Criticality per layer (error bars: std over trials)", 460,
                                                  xaxis={"tickangle": -60, "automargin": True},
                                                  yaxis={"title": {"text": "criticality %"}, "rangemode": "tozero"})}
    out = [View("criticality-heatmap", "Criticality heatmap", heat, "Hover a cell for its value; drag to zoom, "
                "double-click to reset.", wide=len(layers) > 12),
           View("criticality-lines", "Criticality per layer, per model", per_layer, "Click a model in the legend to "
                "hide it, double-click to show it alone.")]
    over = _over_training(table, colors)
    return out + ([over] if over else [])


def _over_training(table: pd.DataFrame, colors: dict[str, str]) -> View | None:
    if "epoch" not in table.columns or not table["epoch"].notna().any():
        return None
    rows = table[table["epoch"].notna()]
    if "shift" in rows.columns:
        rows = rows[rows["shift"].isna() | (rows["shift"] == "clean")]
    traces, masks, runs = [], [], sorted(rows["model"].unique())
    for r in runs:
        t = rows[rows["model"] == r]
        layers = _layer_order(t)
        grid = t.pivot_table(index="epoch", columns="layer", values="criticality", aggfunc="mean").reindex(columns=layers)
        traces.append({"type": "heatmap", "z": grid.to_numpy(), "x": _labels(t, layers), "y": [int(e) for e in grid.index],
                       "colorscale": "Viridis", "zmin": 0, "zmax": 100, "visible": r == runs[0], "name": r,
                       "colorbar": {"title": {"text": "criticality %"}},
                       "hovertemplate": f"{r}<br>epoch %{{y}}<br>%{{x}}: %{{z:.1f}} %<extra></extra>"})
    for i, _ in enumerate(runs):
        masks.append([j == i for j in range(len(runs))])
    spec = {"data": traces, "layout": _layout(f"Criticality over training: {runs[0]}", 420,
                                              xaxis={"tickangle": -60, "automargin": True},
                                              yaxis={"title": {"text": "epoch"}, "type": "category"},
                                              updatemenus=_dropdown(runs, masks, [f"Criticality over training: {r}" for r in runs]))}
    return View("criticality-over-training", "Criticality over training", spec, "Pick a run in the menu (top right).")


# ================================================================================================= dynamics


@view("dynamics")
def _dynamics(tables: dict[str, pd.DataFrame], colors: dict[str, str]) -> list[View]:
    out = []
    cka = tables.get("dynamics-cka")
    if cka is not None and len(cka):
        traces, owner, runs = [], [], sorted(cka["run"].unique())
        for r in runs:
            t = cka[cka["run"] == r]
            last = t["epoch_b"].max()
            to_last = t[t["epoch_b"] == last].sort_values("epoch_a")
            layers = _layer_order(t, index=None)
            names = _labels(t, layers)
            for i, (layer, name) in enumerate(zip(layers, names)):
                s = to_last[to_last["layer"] == layer]
                shade = f"hsl({int(220 - 200 * i / max(len(layers) - 1, 1))},65%,45%)"
                traces.append({"type": "scatter", "mode": "lines+markers", "name": name, "x": s["epoch_a"].to_numpy(),
                               "y": s["cka"].to_numpy(), "visible": r == runs[0], "line": {"color": shade},
                               "marker": {"size": 4}, "hovertemplate": f"{r} {name}<br>epoch %{{x}}: CKA %{{y:.3f}}<extra></extra>"})
                owner.append(r)
        masks = [[o == r for o in owner] for r in runs]
        titles = [f"CKA of each layer to the final checkpoint: {r}" for r in runs]
        out.append(View("dynamics-cka", "CKA to the final checkpoint", {
            "data": traces, "layout": _layout(titles[0], 440, xaxis={"title": {"text": "epoch"}},
                                              yaxis={"title": {"text": "CKA"}, "range": [0, 1.05]},
                                              updatemenus=_dropdown(runs, masks, titles))},
            "Pick a run in the menu (top right); lines run from the first layer (blue) to the last (red)."))
    probes = tables.get("dynamics-probes")
    if probes is not None and len(probes):
        traces = []
        for r in sorted(probes["run"].unique()):
            t = probes[probes["run"] == r]
            final = t[t["epoch"] == t["epoch"].max()]
            layers = _layer_order(final, index=None)
            s = final.set_index("layer").reindex(layers)
            depth = [i / max(len(layers) - 1, 1) for i in range(len(layers))]
            traces.append({"type": "scatter", "mode": "lines+markers", "name": f"{r} (epoch {int(t['epoch'].max())})",
                           "x": depth, "y": s["test_acc"].to_numpy(), "text": _labels(final, layers),
                           "line": {"color": colors.get(r)},
                           "hovertemplate": f"{r}<br>%{{text}}: %{{y:.1%}}<extra></extra>"})
        out.append(View("dynamics-probes", "Linear probe accuracy per layer", {
            "data": traces, "layout": _layout("Linear probe test accuracy per layer, last checkpoint", 420,
                                              yaxis={"title": {"text": "test accuracy"}, "tickformat": ".0%"},
                                              xaxis={"title": {"text": "relative depth (0: first probed layer, 1: last)"}})},
            "Each line is one run at its last checkpoint (hover a point for its layer); the legend toggles runs."))
    return out


# ================================================================================================ invariance


@view("invariance")
def _invariance(tables: dict[str, pd.DataFrame], colors: dict[str, str]) -> list[View]:
    out = []
    grid = tables.get("invariance")
    if grid is not None and len(grid) and (grid["metric"] == "stir").any():
        stir = grid[grid["metric"] == "stir"]
        pairs = list(dict.fromkeys(stir["pair"]))
        pairs.sort(key=lambda p: len(set(p.split("|"))) == 1)  # between two models first: the paper's grids
        traces = []
        for p in pairs:
            t = stir[stir["pair"] == p]
            ref = t.drop_duplicates("ref_index").sort_values("ref_index")
            ev = t.drop_duplicates("eval_index").sort_values("eval_index")
            z = t.pivot_table(index="ref_index", columns="eval_index", values="value", aggfunc="mean")
            reference, evaluated = (p.split("|") + [""])[:2]
            traces.append({"type": "heatmap", "z": z.to_numpy(), "x": ev["eval_label"].tolist(), "y": ref["ref_label"].tolist(),
                           "colorscale": "Viridis", "zmin": 0, "zmax": 1, "visible": p == pairs[0], "name": p,
                           "colorbar": {"title": {"text": "STIR"}},
                           "hovertemplate": f"inverted through {reference} %{{y}}<br>seen by {evaluated} %{{x}}<br>"
                                            "STIR %{z:.3f}<extra></extra>"})
        masks = [[j == i for j in range(len(pairs))] for i in range(len(pairs))]
        titles = [f"STIR({p.split('|')[-1]} layer | {p.split('|')[0]} layer)" for p in pairs]
        out.append(View("invariance-stir", "STIR between two models' layers", {
            "data": traces, "layout": _layout(titles[0], 440, xaxis={"title": {"text": "evaluated model's layer"}},
                                              yaxis={"title": {"text": "reference model's inverted layer"}},
                                              updatemenus=_dropdown(pairs, masks, titles))},
            "Pick a pair (reference|evaluated) in the menu; hover a cell for its value."))
    summary = tables.get("invariance-summary")
    if summary is not None and len(summary):
        s = summary.sort_values("index") if "index" in summary.columns else summary
        traces = [{"type": "scatter", "mode": "lines+markers", "name": c, "x": s["label"].astype(str).tolist(),
                   "y": s[c].to_numpy(), "hovertemplate": f"{c} %{{x}}: %{{y:.3f}}<extra></extra>"}
                  for c in ("retention", "reverse", "ceiling", "scratch", "transfer", "noise", "cka") if c in s.columns]
        out.append(View("invariance-summary", "Retention, transfer and the noise floor per layer", {
            "data": traces, "layout": _layout("Retention and transfer per layer", 400, xaxis={"automargin": True})},
            "Retention: STIR(finetuned | pretrained) at the same layer; transfer: retention minus the scratch model's."))
    return out


# ============================================================================================ tract, training


@view("tract")
def _tract(tables: dict[str, pd.DataFrame], colors: dict[str, str]) -> list[View]:
    t = tables["tract"]
    g = t.groupby(["optimizer", "method", "budget", "epoch"], sort=True)["test_acc"].agg(["mean", "std"]).reset_index()
    traces = []
    for (o, m, b), s in g.groupby(["optimizer", "method", "budget"], sort=True):
        traces.append({"type": "scatter", "mode": "lines+markers", "name": f"{o} {m} ({b} ep)", "x": s["epoch"].to_numpy(),
                       "y": s["mean"].to_numpy(), "error_y": {"type": "data", "array": s["std"].fillna(0).to_numpy(),
                                                               "visible": True, "thickness": 1},
                       "line": {"color": colors.get(m), "dash": "solid" if o == "sgd" else "dot"},
                       "legendgroup": f"{o}-{m}",
                       "hovertemplate": f"{o} {m}, budget {b}<br>epoch %{{x}}: %{{y:.1%}}<extra></extra>"})
    return [View("tract-curves", "Test accuracy per epoch", {
        "data": traces, "layout": _layout("TrAct vs vanilla: test accuracy per epoch (mean and std over seeds)", 440,
                                          xaxis={"title": {"text": "epoch"}},
                                          yaxis={"title": {"text": "test accuracy"}, "tickformat": ".0%"})},
        "Solid: SGD, dotted: Adam; the colour is the method. Click the legend to compare two lines.")]


@view("training")
def _training(tables: dict[str, pd.DataFrame], colors: dict[str, str]) -> list[View]:
    t = tables["training"]
    traces = []
    for m in sorted(t["model"].unique()):
        s = t[t["model"] == m].sort_values("epoch")
        traces.append({"type": "scatter", "mode": "lines+markers", "name": m, "x": s["epoch"].to_numpy(),
                       "y": s["test_acc"].to_numpy(), "line": {"color": colors.get(m)},
                       "hovertemplate": f"{m}<br>epoch %{{x}}: %{{y:.1%}}<extra></extra>"})
    return [View("training-curves", "Test accuracy per epoch", {
        "data": traces, "layout": _layout("Test accuracy per epoch, per model", 420, xaxis={"title": {"text": "epoch"}},
                                          yaxis={"title": {"text": "test accuracy"}, "tickformat": ".0%"})},
        "Click a model in the legend to hide it, double-click to show it alone.")]


@view("prune")
def _prune(tables: dict[str, pd.DataFrame], colors: dict[str, str]) -> list[View]:
    t = tables["prune"]
    stages = [("accuracy", "solid", "")] + ([("accuracy_healed", "dash", " healed")]
                                          if "accuracy_healed" in t.columns and t["accuracy_healed"].notna().any() else [])
    traces = []
    for column, dash, suffix in stages:
        g = (t.dropna(subset=[column]).groupby(["criterion", "budget_fraction", "seed"])[column].mean()
             .groupby(["criterion", "budget_fraction"]).agg(["mean", "std"]).reset_index())
        for c, s in g.groupby("criterion", sort=True):
            s = s.sort_values("budget_fraction")
            traces.append({"type": "scatter", "mode": "lines+markers" if len(s) > 2 else "markers", "name": c + suffix,
                           "x": s["budget_fraction"].to_numpy(), "y": s["mean"].to_numpy(), "legendgroup": c,
                           "error_y": {"type": "data", "array": s["std"].fillna(0).to_numpy(), "visible": True},
                           "marker": {"size": 9, "color": colors.get(c), "symbol": "circle" if not suffix else "diamond"},
                           "line": {"color": colors.get(c), "dash": dash},
                           "hovertemplate": f"{c}{suffix}<br>%{{x:.0%}} of blocks removed: %{{y:.1%}}<extra></extra>"})
    shapes = []
    if "accuracy_base" in t.columns:
        base = float(t.drop_duplicates("model")["accuracy_base"].mean())
        shapes.append({"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": base, "y1": base,
                       "line": {"color": "#555", "dash": "dot", "width": 1}})
    return [View("prune-accuracy", "Accuracy after block removal", {
        "data": traces, "layout": _layout("Accuracy after removing blocks, by criterion (mean over models)", 420,
                                          xaxis={"title": {"text": "fraction of blocks removed"}, "tickformat": ".0%"},
                                          yaxis={"title": {"text": "test accuracy"}, "tickformat": ".0%"},
                                          shapes=shapes)},
        "Circles: right after removal; diamonds (dashed): after healing; dotted line: the unpruned models. Error "
        "bars: std over seeds. Click a criterion in the legend to hide it.")]


def correlation_view(per_model: pd.DataFrame, colors: dict[str, str], rho: float | None) -> View:
    """Mean criticality against test accuracy, one point per model (hover for its name)."""
    traces = [{"type": "scatter", "mode": "markers+text", "name": str(r.model), "x": [r.accuracy], "y": [r.mean_criticality],
               "text": [str(r.model)], "textposition": "top center", "marker": {"size": 11, "color": colors.get(str(r.model))},
               "hovertemplate": f"{r.model}<br>accuracy %{{x:.1%}}<br>mean criticality %{{y:.1f}} %<extra></extra>"}
              for r in per_model.itertuples()]
    title = "Mean criticality vs test accuracy" + (f" (Spearman rho {rho:+.2f})" if rho is not None and rho == rho else "")
    return View("correlation", "Criticality vs accuracy", {
        "data": traces, "layout": _layout(title, 420, showlegend=False, xaxis={"title": {"text": "test accuracy"},
                                                                              "tickformat": ".0%"},
                                          yaxis={"title": {"text": "mean criticality %"}})})


# ===================================================================================== side-by-side models


def compare_data(tables: dict[str, pd.DataFrame]) -> dict[str, dict[str, dict[str, list]]]:
    """Per panel, per model: the per-layer values the side-by-side view draws.

    Panels: criticality (final, clean), CKA between the first and the last checkpoint, linear probe accuracy at
    the last checkpoint, and the inversion loss. A model appears in the panels of the analyses that hold it.
    """
    out: dict[str, dict[str, dict[str, list]]] = {}
    crit = tables.get("criticality")
    if crit is not None and len(crit):
        per = final_criticality(crit)
        if "epoch" in crit.columns and crit["epoch"].notna().any():  # a run's last analysed epoch stands for it
            runs = crit[crit["epoch"].notna()]
            runs = runs[runs["epoch"] == runs.groupby("model")["epoch"].transform("max")]
            if "shift" in runs.columns:
                runs = runs[runs["shift"].isna() | (runs["shift"] == "clean")]
            keys = ["model", "layer"] + [c for c in ("label", "index") if c in runs.columns]
            rp = runs.groupby(keys, sort=False)["criticality"].agg(["mean"]).reset_index()
            per = pd.concat([per[~per["model"].isin(rp["model"])], rp], ignore_index=True)
        out["criticality"] = {m: _series(t, "mean") for m, t in per.groupby("model", sort=False)}
    cka = tables.get("dynamics-cka")
    if cka is not None and len(cka):
        out["cka"] = {r: _series(first_last(t), "cka", index=None) for r, t in cka.groupby("run", sort=False)}
    probes = tables.get("dynamics-probes")
    if probes is not None and len(probes):
        out["probes"] = {r: _series(t[t["epoch"] == t["epoch"].max()], "test_acc", index=None)
                         for r, t in probes.groupby("run", sort=False)}
    inv = tables.get("invariance-inversions")
    if inv is not None and len(inv):
        out["inversion"] = {m: _series(t, "loss_mean") for m, t in inv.groupby("model", sort=False)}
    return clean(out)


def _series(t: pd.DataFrame, value: str, index: str | None = "index") -> dict[str, list]:
    """One model's per-layer values in forward order (by its index column, else the layers' natural order)."""
    if index and index in t.columns:
        t = t.sort_values(index, kind="stable")
    else:
        t = t.set_index("layer").loc[_natural(t["layer"].tolist())].reset_index()
    label = t["label"] if "label" in t.columns else t["layer"]
    return {"x": label.astype(str).tolist(), "y": t[value].astype(float).tolist()}


COMPARE_PANELS = {
    "criticality": ("Criticality per layer (%)", "criticality %"),
    "cka": ("CKA between the first and the last checkpoint", "CKA"),
    "probes": ("Linear probe test accuracy, last checkpoint", "test accuracy"),
    "inversion": ("Inversion loss per layer (lower: inverted more closely)", "loss"),
}
