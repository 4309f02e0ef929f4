"""The tables of both analyses: per-trial rows as a frame, the summaries over trials, layers and units, and the
files a run writes."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..errors import LayerlabError

__all__ = ["average_criticality", "criticality_accuracy", "network_criticality", "spearman_rho", "summarize",
           "write_tables"]

#: training categories the paper reports the correlation without (adversarially trained models)
ADVERSARIAL = ("adversarial",)


def _rows_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    ints = ("epoch", "seed", "draw_seed")
    # Integer columns with gaps (reinit rows have no seed) are built as nullable Int64 from the Python ints, never
    # through float64, which would round 63-bit draw seeds (6673782257543995146 -> ...392).
    frame = pd.DataFrame([{k: v for k, v in r.items() if k not in ints} for r in rows])
    for col in ints:
        if any(col in r for r in rows):
            frame[col] = pd.array([r.get(col) for r in rows], dtype="Int64")
    order = list(dict.fromkeys(k for r in rows for k in r))  # the rows' own column order
    return frame[order]


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per-(model, layer, mode, epoch) summary of a per-trial table: mean criticality, std (ddof=1) and sem.

    ``std`` is the spread over trials (the paper's "standard error" figure); ``sem`` = std / sqrt(trials).
    """
    need = {"model", "layer", "label", "criticality"}
    if missing := need - set(table.columns):
        raise LayerlabError(f"summarize: the table lacks columns {sorted(missing)}; pass the table criticality() returns")
    keys = [c for c in ("model", "layer", "label", "kind", "index", "units", "mode", "epoch") if c in table.columns]
    means = [c for c in ("similarity", "agreement", "accuracy", "kl", "base_accuracy") if c in table.columns]
    g = table.groupby(keys, dropna=False, sort=False)
    out = g["criticality"].agg(criticality="mean", std=lambda s: s.std(ddof=1), trials="count").reset_index()
    if means:
        out = out.merge(g[means].mean().reset_index(), on=keys, how="left")
    out["sem"] = out["std"] / np.sqrt(out["trials"])
    cols = keys + ["criticality", "std", "sem", "trials"] + means
    return out[cols].reset_index(drop=True)


def average_criticality(summary: pd.DataFrame, mode: str = "randomize") -> pd.DataFrame:
    """Per model: the mean over layers of the layer criticalities (the paper's "average criticality")."""
    rows = summary[summary["mode"] == mode] if "mode" in summary.columns else summary
    return rows.groupby("model", sort=False)["criticality"].mean().reset_index()


def network_criticality(table: pd.DataFrame) -> pd.DataFrame:
    """Per model: Chatterji et al. 2020's network criticality, the sum of the module criticalities mu_i."""
    return (
        table.groupby("model", sort=False)
        .agg(network_criticality=("criticality", "sum"), units=("layer", "count"))
        .reset_index()
    )


def write_tables(table: pd.DataFrame, out: str | Path, prefix: str = "criticality") -> list[Path]:
    """Write ``OUT/<prefix>.parquet``/``.csv`` (per trial), ``<prefix>_summary.csv`` and ``<prefix>_images.csv``.

    For module criticality tables (``mode == 'module'``) the summary is the network criticality per model.
    """
    from ..store import atomic_write, atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        atomic_write(out / f"{prefix}.parquet", lambda f: table.to_parquet(f, index=False)),
        atomic_write_text(out / f"{prefix}.csv", table.to_csv(index=False)),
    ]
    is_module = len(table) > 0 and "mode" in table.columns and bool((table["mode"] == "module").all())
    summary = network_criticality(table) if is_module else summarize(table)
    paths.append(atomic_write_text(out / f"{prefix}_summary.csv", summary.to_csv(index=False)))
    indices = table.attrs.get("indices")
    if indices is not None:
        images = pd.DataFrame({"position": range(len(indices)), "index": indices})
        images["data"], images["split"] = table.attrs.get("data", ""), table.attrs.get("split", "")
        paths.append(atomic_write_text(out / f"{prefix}_images.csv", images.to_csv(index=False)))
    return paths


def criticality_accuracy(criticality: pd.DataFrame, zoo: pd.DataFrame, *, mode: str = "randomize",
                         exclude: Sequence[str] = ADVERSARIAL) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-model table, correlations): Spearman rho between each model's mean criticality and its accuracy.

    The per-model table joins the mean over layers of the (trial-averaged) layer criticality with the zoo table's
    ``accuracy`` (and ``category``). Correlations: one row over all models and, when some model's category is in
    ``exclude`` (the paper's adversarially trained models), one without them; rho is NaN below 3 models.
    """
    need = {"model", "layer", "criticality"}
    if missing := need - set(criticality.columns):
        raise LayerlabError(f"criticality table lacks columns {sorted(missing)}; pass the table criticality() returns")
    if "model" not in zoo.columns or "accuracy" not in zoo.columns:
        raise LayerlabError("zoo table needs 'model' and 'accuracy' columns (as OUT/zoo/zoo.csv has)")
    rows = criticality[criticality["mode"] == mode] if "mode" in criticality.columns else criticality
    per_model = (rows.groupby(["model", "layer"], sort=False)["criticality"].mean()
                 .groupby(level="model", sort=False).mean().rename("mean_criticality").reset_index())
    keep = [c for c in ("model", "category", "recipe", "accuracy") if c in zoo.columns]
    table = per_model.merge(zoo[keep].drop_duplicates("model"), on="model", how="inner")
    subsets = [("all models", table)]
    if "category" in table.columns and table["category"].isin(list(exclude)).any():
        subsets.append((f"without {', '.join(exclude)}", table[~table["category"].isin(list(exclude))]))
    corr = [{"models": label, **spearman_rho(part["mean_criticality"], part["accuracy"])} for label, part in subsets]
    return table.sort_values("accuracy", ascending=False).reset_index(drop=True), pd.DataFrame(corr)


def spearman_rho(x: pd.Series, y: pd.Series) -> dict[str, float]:
    """Spearman's rho and its p-value over paired values (NaN below 3 pairs or without variation), with n."""
    from scipy.stats import spearmanr

    n = int(len(x))
    if n < 3 or x.nunique() < 2 or y.nunique() < 2:
        return {"n": n, "rho": math.nan, "p": math.nan}
    res = spearmanr(x, y)
    return {"n": n, "rho": float(res.statistic), "p": float(res.pvalue)}
