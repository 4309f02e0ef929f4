"""The tables of both analyses: per-trial rows as a frame, the summaries over trials, layers and units, and the
files a run writes."""
from __future__ import annotations

import math
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..errors import LayerlabError
from ..seeds import derive_seed
from .intervals import (
    LEVEL, RESAMPLES, criticality_replicates, difference_replicates, image_weights, per_image_arrays,
    percentile_interval,
)

__all__ = ["average_criticality", "clean_final", "criticality_accuracy", "derive", "differences", "network_criticality", "replicates",
           "critical_sets", "settling", "spearman_rho", "summarize", "write_tables"]

#: criticality (points) from which a layer counts as critical, below it auxiliary (our choice: the paper names no
#: cut; on the demo zoo layers sit at 0-30 or 60-80, far from it)
CRITICAL = 50.0

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


KEYS = ("model", "layer", "label", "kind", "index", "units", "mode", "epoch", "shift")  #: a summary row's identity


def summarize(
    table: pd.DataFrame, *, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
) -> pd.DataFrame:
    """Per-(model, layer, mode, epoch, shift) summary of a per-trial table: mean criticality, std over trials
    (ddof=1; the paper's "standard error" figure), sem = std / sqrt(trials), the ``level`` bootstrap interval
    ``ci_low``/``ci_high`` over images and trials (:mod:`.intervals`; NaN for rows stored without ``per_image``),
    ``images`` (the most a trial used: below the data's size under adaptive sampling) and the means of the other
    numbers.
    """
    need = {"model", "layer", "label", "criticality"}
    if missing := need - set(table.columns):
        raise LayerlabError(f"summarize: the table lacks columns {sorted(missing)}; pass the table criticality() returns")
    keys = [c for c in KEYS if c in table.columns]
    means = [c for c in ("similarity", "agreement", "accuracy", "kl", "base_accuracy") if c in table.columns]
    g = table.groupby(keys, dropna=False, sort=False)
    out = g["criticality"].agg(criticality="mean", std=lambda s: s.std(ddof=1), trials="count").reset_index()
    out["sem"] = out["std"] / np.sqrt(out["trials"])
    ci = _intervals(table, keys, level, resamples, seed)
    out["ci_low"], out["ci_high"] = ci[:, 0], ci[:, 1]
    if "images" in table.columns:
        out = out.merge(g["images"].max().reset_index(), on=keys, how="left")
    if means:
        out = out.merge(g[means].mean().reset_index(), on=keys, how="left")
    cols = keys + ["criticality", "std", "sem", "ci_low", "ci_high", "trials"]
    cols += ["images"] * ("images" in table.columns) + means
    return out[cols].reset_index(drop=True)


def replicates(
    table: pd.DataFrame, keys: Sequence[str] | None = None, *, resamples: int = RESAMPLES, seed: int = 0
) -> list[tuple[tuple, np.ndarray | None]]:
    """``(group key, [resamples] bootstrap replicates of its criticality)`` for each group of per-trial rows, in
    the table's order, all on the same image weights (paired); None for a group stored without ``per_image``."""
    keys = list(keys or [c for c in KEYS if c in table.columns])
    grouped = [(k if isinstance(k, tuple) else (k,), per_image_arrays(rows))
               for k, rows in table.groupby(keys, dropna=False, sort=False)]
    longest = max((len(a) for _, arrs in grouped if arrs for a in arrs), default=0)
    if longest == 0:
        return [(k, None) for k, _ in grouped]
    weights = image_weights(longest, resamples, seed)
    return [(k, criticality_replicates(arrs, weights, seed) if arrs else None) for k, arrs in grouped]


def _intervals(table: pd.DataFrame, keys: list[str], level: float, resamples: int, seed: int) -> np.ndarray:
    reps = replicates(table, keys, resamples=resamples, seed=seed)
    return np.array([percentile_interval(r, level) if r is not None else (math.nan, math.nan) for _, r in reps],
                    dtype=np.float64).reshape(len(reps), 2)


def _plain(v: Any) -> Any:
    """A key value comparable across frames (every missing value is None)."""
    return None if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else v


def differences(
    table: pd.DataFrame,
    baseline: str = "baseline",
    *,
    groups: Mapping[str, str] | None = None,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> pd.DataFrame:
    """Criticality minus the baseline's per layer (mode, epoch, shift), with a ``level`` bootstrap interval.

    ``groups`` maps model -> training method: models of one method are its seeds, their criticality is averaged
    and the seeds are resampled in the bootstrap (seed-to-seed spread widens the interval); ``baseline`` then
    names a method. Without it every model is its own group. Both sides are bootstrapped on the same image
    weights (paired images). Columns: model (the method), layer, label, index, mode, epoch, shift, difference,
    ci_low, ci_high, distinguishable (the interval excludes 0), seeds.
    """
    need = {"model", "layer", "criticality"}
    if missing := need - set(table.columns):
        raise LayerlabError(f"differences: the table lacks columns {sorted(missing)}; pass the per-trial table")
    method = {m: (groups or {}).get(m, m) for m in table["model"].unique()}
    if baseline not in set(method.values()):
        raise LayerlabError(f"baseline {baseline!r} is not among the models/methods: {sorted(set(method.values()))}")
    keys = [c for c in KEYS if c in table.columns]
    cell_cols = [c for c in keys if c != "model"]
    means = table.groupby(keys, dropna=False, sort=False)["criticality"].mean().tolist()
    reps = replicates(table, keys, resamples=resamples, seed=seed)
    cells: dict[tuple, dict[str, list[tuple[float, np.ndarray | None]]]] = {}
    for (key, rep), mean in zip(reps, means):
        cell = tuple(_plain(v) for v in key[1:])
        cells.setdefault(cell, {}).setdefault(method[key[0]], []).append((mean, rep))
    rng = np.random.default_rng(derive_seed("criticality/bootstrap", seed, 2))
    rows = []
    for cell, by in cells.items():
        if baseline not in by:
            continue
        base = by[baseline]
        for m, seeds in by.items():
            if m == baseline:
                continue
            diff = float(np.mean([v for v, _ in seeds]) - np.mean([v for v, _ in base]))
            lo = hi = math.nan
            if all(r is not None for _, r in seeds + base):
                flat = {f"m{k}": r for k, (_, r) in enumerate(seeds)} | {f"b{k}": r for k, (_, r) in enumerate(base)}
                lo, hi = percentile_interval(difference_replicates(
                    flat, [f"b{k}" for k in range(len(base))], [f"m{k}" for k in range(len(seeds))], rng), level)
            rows.append({"model": m, **dict(zip(cell_cols, cell)), "difference": diff, "ci_low": lo, "ci_high": hi,
                         "distinguishable": bool(lo > 0 or hi < 0), "seeds": len(seeds)})
    return pd.DataFrame(rows)


def settling(summary: pd.DataFrame, threshold: float = CRITICAL) -> pd.DataFrame:
    """Over training: per (model, layer, shift) the class it ends in (``critical`` when its criticality is at
    least ``threshold`` points, else ``auxiliary``) and ``settled_epoch``, the first checkpoint from which it
    never leaves that class; ``first_epoch``/``final_criticality`` beside them. Needs a summary over epochs
    (:func:`summarize` of ``criticality(..., over_training=True)``)."""
    need = {"model", "layer", "epoch", "criticality"}
    if missing := need - set(summary.columns):
        raise LayerlabError(f"settling: the summary lacks columns {sorted(missing)}; summarize an over-training table")
    rows = summary[summary["mode"] == "randomize"] if "mode" in summary.columns else summary
    rows = rows.dropna(subset=["epoch"])
    keys = [c for c in ("model", "layer", "label", "index", "shift") if c in rows.columns]
    out = []
    for key, part in rows.groupby(keys, dropna=False, sort=False):
        part = part.sort_values("epoch")
        critical = (part["criticality"] >= threshold).tolist()
        epochs = [int(e) for e in part["epoch"]]
        settled = epochs[-1]
        for k in range(len(critical) - 1, -1, -1):
            if critical[k] != critical[-1]:
                break
            settled = epochs[k]
        out.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))),
                    "final": "critical" if critical[-1] else "auxiliary", "settled_epoch": settled,
                    "first_epoch": epochs[0], "last_epoch": epochs[-1],
                    "final_criticality": float(part["criticality"].iloc[-1]), "threshold": threshold})
    return pd.DataFrame(out)


def critical_sets(summary: pd.DataFrame, threshold: float = CRITICAL) -> pd.DataFrame:
    """Under shift: per (model, mode, epoch, shift) the critical layers (criticality >= ``threshold``), how many,
    and how far the set moved from the clean one: Jaccard similarity, layers gained and layers lost."""
    need = {"model", "layer", "shift", "criticality"}
    if missing := need - set(summary.columns):
        raise LayerlabError(f"critical_sets: the summary lacks columns {sorted(missing)}; summarize a shift table")
    keys = [c for c in ("model", "mode", "epoch") if c in summary.columns]
    out = []
    for key, part in summary.groupby(keys, dropna=False, sort=False):
        sets = {s: set(p.loc[p["criticality"] >= threshold, "label" if "label" in p.columns else "layer"])
                for s, p in part.groupby("shift", sort=False)}
        clean = sets.get("clean")
        for s, crit in sets.items():
            union = (clean or set()) | crit
            out.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))), "shift": s,
                        "critical": len(crit),
                        "jaccard": (len(crit & clean) / len(union) if union else 1.0) if clean is not None else math.nan,
                        "gained": ", ".join(sorted(crit - (clean or set()))),
                        "lost": ", ".join(sorted((clean or set()) - crit)),
                        "layers": ", ".join(sorted(crit)), "threshold": threshold})
    return pd.DataFrame(out)


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


def derive(
    table: pd.DataFrame,
    *,
    baseline: str | None = None,
    groups: Mapping[str, str] | None = None,
    threshold: float = CRITICAL,
) -> dict[str, pd.DataFrame]:
    """The tables a per-trial table supports, computed once: ``summary`` (with intervals; for module criticality
    the network criticality per model), and where the table allows it ``differences`` (to ``baseline``, a model
    or, with ``groups``, a method), ``settling`` (over training) and ``critical_sets`` (under shift)."""
    is_module = len(table) > 0 and "mode" in table.columns and bool((table["mode"] == "module").all())
    if is_module:
        return {"summary": network_criticality(table)}
    summary = summarize(table)
    out = {"summary": summary}
    if len(table):
        methods = set((groups or {}).get(m, m) for m in table["model"].unique())
        if baseline is not None and baseline in methods and len(methods) > 1:
            out["differences"] = differences(table, baseline, groups=groups)
        if _over_epochs(summary):
            out["settling"] = settling(summary, threshold)
        if "shift" in summary.columns and bool((summary["shift"] != "clean").any()):
            out["critical_sets"] = critical_sets(summary, threshold)
    return out


def write_tables(
    table: pd.DataFrame,
    out: str | Path,
    prefix: str = "criticality",
    *,
    baseline: str | None = None,
    groups: Mapping[str, str] | None = None,
    threshold: float = CRITICAL,
    derived: Mapping[str, pd.DataFrame] | None = None,
) -> list[Path]:
    """Write ``OUT/<prefix>.parquet``/``.csv`` (per trial; the csv without ``per_image``), ``<prefix>_images.csv``
    and ``OUT/<prefix>_<name>.csv`` for each derived table (:func:`derive`: summary, differences, settling,
    critical_sets); pass ``derived`` when it is already computed, else it is derived here.
    """
    from ..store import atomic_write, atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        atomic_write(out / f"{prefix}.parquet", lambda f: table.to_parquet(f, index=False)),
        atomic_write_text(out / f"{prefix}.csv", table.drop(columns=["per_image"], errors="ignore").to_csv(index=False)),
    ]
    if derived is None:
        derived = derive(table, baseline=baseline, groups=groups, threshold=threshold)
    for name, frame in derived.items():
        paths.append(atomic_write_text(out / f"{prefix}_{name}.csv", frame.to_csv(index=False)))
    indices = table.attrs.get("indices")
    if indices is not None:
        images = pd.DataFrame({"position": range(len(indices)), "index": indices})
        images["data"], images["split"] = table.attrs.get("data", ""), table.attrs.get("split", "")
        paths.append(atomic_write_text(out / f"{prefix}_images.csv", images.to_csv(index=False)))
    return paths


def _over_epochs(summary: pd.DataFrame) -> bool:
    """Whether a summary holds randomize rows at several analysed checkpoints (criticality over training)."""
    if not {"mode", "epoch"} <= set(summary.columns):
        return False
    rows = summary[summary["mode"] == "randomize"]
    return rows["epoch"].dropna().nunique() > 1


def clean_final(table: pd.DataFrame, mode: str | None = None) -> pd.DataFrame:
    """The rows about the models as trained, on clean images: shift ``clean`` and no analysed epoch in randomize
    mode (rows over training and under shift have their own tables and figures; in reinit/checkpoint modes
    ``epoch`` names the reset's target and stays); only ``mode``'s rows when given. Tables without a ``shift`` or
    ``epoch`` column pass whole."""
    rows = table[table["mode"] == mode] if mode is not None and "mode" in table.columns else table
    keep = pd.Series(True, index=rows.index)
    if "shift" in rows.columns:
        keep &= rows["shift"].fillna("clean").eq("clean")
    if {"mode", "epoch"} <= set(rows.columns):
        keep &= ~(rows["mode"].eq("randomize") & rows["epoch"].notna())
    return rows[keep]


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
    rows = clean_final(criticality, mode)
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
