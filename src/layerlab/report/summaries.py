"""The short table the report shows above each analysis' full table: one row per model (or run, pair, method),
and only measures aggregated.

A mean of a coordinate is not a result ("epoch 3.5", "ref_index 2.5", "seed 1"): the generic summary averages
float columns only and never the columns that index an observation (:data:`COORDINATES`), and the tables that have
a natural reading get their own summary (the final epoch, the first-to-last checkpoint, the mean over seeds).
"""
from __future__ import annotations

from typing import Callable

import pandas as pd

from ..registry import Registry

__all__ = ["COORDINATES", "SUMMARIES", "generic_summary", "summary", "summary_of"]

SUMMARIES: Registry[Callable[[pd.DataFrame], pd.DataFrame]] = Registry("report summary")

#: columns that say where an observation sits, not what was measured: grouped by or left out, never averaged
COORDINATES = frozenset({
    "epoch", "epoch_a", "epoch_b", "step", "seed", "draw_seed", "trial", "budget", "index", "ref_index", "eval_index",
    "best_index", "layer_index", "triplet", "row", "label", "clean_label", "images", "n", "n_train", "n_test",
    "n_batches", "batch_size", "dim", "steps", "step_size", "resolution", "margin", "l2", "probe_max_iter",
    "probe_iterations", "triplets", "shift", "scratch_shift", "shift_above_noise", "scratch_shift_above_noise", "lr",
})
#: the column naming the thing a row belongs to, in order of preference
ENTITY = ("model", "run", "pair", "reference")


def summary(name: str):
    """Register ``fn(table) -> DataFrame``, the short table the report shows above table ``name``."""
    return SUMMARIES.register(name)


def summary_of(table: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """The summary shown above ``table``: registered here, else declared by the analysis whose main table it is
    (:mod:`layerlab.analysis`), else :func:`generic_summary`."""
    if table in SUMMARIES:
        return SUMMARIES.get(table)
    from ..analysis import analyses, resolve

    declared = {a.tables[0]: a.summary for a in analyses() if a.summary is not None}
    return resolve(declared[table]) if table in declared else generic_summary


def measures(table: pd.DataFrame) -> list[str]:
    """The columns worth averaging: floats that are not coordinates."""
    return [c for c in table.columns if c not in COORDINATES and pd.api.types.is_float_dtype(table[c])]


def generic_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per model (or run, pair): the row count and the mean of every measure (:func:`measures`)."""
    cols = measures(table)
    entity = next((c for c in ENTITY if c in table.columns), None)
    if entity is None:
        return table[cols].mean().to_frame("mean").T if cols else pd.DataFrame()
    g = table.groupby(entity, sort=False)
    out = g.size().rename("rows").to_frame()
    if cols:
        out = out.join(g[cols].mean().add_prefix("mean "))
    return out.reset_index()


def first_last(pairs: pd.DataFrame) -> pd.DataFrame:
    """The rows of a checkpoint-pair table (``epoch_a``, ``epoch_b``) that compare the first checkpoint with the
    last: how much training changed each layer overall."""
    return pairs[(pairs["epoch_a"] == pairs["epoch_a"].min()) & (pairs["epoch_b"] == pairs["epoch_b"].max())]


def _last(table: pd.DataFrame, by: list[str], epoch: str = "epoch") -> pd.DataFrame:
    return table.sort_values(epoch).groupby(by, sort=False).tail(1)


@summary("criticality")
def _criticality(table: pd.DataFrame) -> pd.DataFrame:
    """Per model (and mode, analysed epoch, shift): mean layer criticality over layers, its range, and trials per
    layer."""
    keys = ["model"] + [c for c in ("mode", "epoch", "shift") if c in table.columns]
    per_layer = (table.groupby(keys + ["layer"], sort=False, dropna=False)["criticality"]
                 .agg(["mean", "count"]).reset_index())
    g = per_layer.groupby(keys, sort=False, dropna=False)
    out = g["mean"].agg(criticality="mean", min="min", max="max").join(g["layer"].nunique().rename("layers"))
    out = out.join(g["count"].max().rename("trials"))
    if "base_accuracy" in table.columns:
        out = out.join(table.groupby(keys, sort=False, dropna=False)["base_accuracy"].mean())
    out = out.reset_index()
    # the final models on clean images first, then under shift, then the runs over training
    order = pd.DataFrame({
        "over training": out["epoch"].notna() if "epoch" in out.columns else False,
        "shifted": out["shift"].fillna("clean").ne("clean") if "shift" in out.columns else False,
    }, index=out.index).join(out[[c for c in ("shift", "epoch") if c in out.columns] + ["model"]])
    return out.loc[order.sort_values(list(order.columns), kind="stable").index].reset_index(drop=True)


@summary("training")
def _training(table: pd.DataFrame) -> pd.DataFrame:
    """Per model: the last epoch's train and test accuracy, and the training time."""
    if "epoch" not in table.columns or "model" not in table.columns:
        return generic_summary(table)
    last = _last(table, ["model"])
    cols = [c for c in ("model", "recipe", "category", "epoch", "train_acc", "test_acc") if c in last.columns]
    out = last[cols].rename(columns={"epoch": "epochs"})
    if "seconds" in table.columns:
        out = out.merge(table.groupby("model")["seconds"].sum().reset_index(), on="model")
    return out.sort_values("model").reset_index(drop=True)


@summary("dynamics-cka")
def _dynamics_cka(table: pd.DataFrame) -> pd.DataFrame:
    """Per run: checkpoints, layers, and CKA between the first and the last checkpoint (mean over layers and the
    layer that changed most)."""
    rows = []
    for run, t in table.groupby("run", sort=False):
        first, last = t["epoch_a"].min(), t["epoch_b"].max()
        ends = first_last(t)
        worst = ends.loc[ends["cka"].idxmin()] if len(ends) else None
        rows.append({"run": run, "checkpoints": len(set(t["epoch_a"]) | set(t["epoch_b"])), "layers": t["layer"].nunique(),
                     "first epoch": first, "last epoch": last, "CKA first-last (mean over layers)": ends["cka"].mean(),
                     "layer that changed most": None if worst is None else worst["label"],
                     "its CKA": None if worst is None else worst["cka"]})
    return pd.DataFrame(rows)


@summary("dynamics-drs")
def _dynamics_drs(table: pd.DataFrame) -> pd.DataFrame:
    """Per run and kind: decision-region similarity between the first and the last checkpoint."""
    rows = []
    for (run, kind), t in table.groupby(["run", "kind"], sort=False):
        first, last = t["epoch_a"].min(), t["epoch_b"].max()
        ends = first_last(t)
        rows.append({"run": run, "kind": kind, "first epoch": first, "last epoch": last,
                     "DRS first-last": ends["drs"].mean(), "layers": t["layer"].nunique()})
    return pd.DataFrame(rows)


@summary("dynamics-probes")
def _dynamics_probes(table: pd.DataFrame) -> pd.DataFrame:
    """Per run at its last epoch: the best probed layer and its test accuracy, and the last layer's."""
    rows = []
    for run, t in table.groupby("run", sort=False):
        final = t[t["epoch"] == t["epoch"].max()]
        best = final.loc[final["test_acc"].idxmax()]
        rows.append({"run": run, "epoch": int(final["epoch"].iloc[0]), "layers": len(final),
                     "best layer": best["label"], "its probe test accuracy": best["test_acc"],
                     "mean probe test accuracy": final["test_acc"].mean()})
    return pd.DataFrame(rows)


@summary("tract")
def _tract(table: pd.DataFrame) -> pd.DataFrame:
    """Per optimiser, method and epoch budget: the final test accuracy, mean and spread over seeds."""
    keys = [c for c in ("optimizer", "method", "budget") if c in table.columns]
    final = _last(table, keys + ["seed"])
    g = final.groupby(keys, sort=False)["test_acc"]
    return g.agg(final_test_acc="mean", std="std", seeds="count").reset_index()


@summary("invariance")
def _invariance(table: pd.DataFrame) -> pd.DataFrame:
    """Per pair and metric: the value at matching layers (reference layer = evaluated layer), mean over layers."""
    same = table[table["ref_index"] == table["eval_index"]]
    out = same.groupby(["pair", "metric"], sort=False)["value"].agg(["mean", "min", "max"]).reset_index()
    return out.rename(columns={"mean": "mean at matching layers", "min": "min", "max": "max"})


@summary("invariance-inversions")
def _inversions(table: pd.DataFrame) -> pd.DataFrame:
    """Per model: the inversion loss at the end against its start, mean over layers."""
    g = table.groupby("model", sort=False)
    return g.agg(layers=("layer", "nunique"), initial_loss=("initial_loss_mean", "mean"),
                 final_loss=("loss_mean", "mean"), worst_layer_loss=("loss_max", "max")).reset_index()


@summary("invariance-summary")
def _invariance_summary(table: pd.DataFrame) -> pd.DataFrame:
    """The table is already per layer: retention, transfer and the noise floor."""
    cols = [c for c in ("label", "retention", "transfer", "noise", "cka", "best_label", "inversion_loss")
            if c in table.columns]
    return table[cols]


@summary("dynamics-triplets")
def _triplets(table: pd.DataFrame) -> pd.DataFrame:
    """Per run: the triplets drawn for the decision-region planes and how many points carry a flipped label."""
    g = table.groupby("run", sort=False)
    out = g["triplet"].nunique().rename("triplets").to_frame()
    if "noisy" in table.columns:
        out = out.join(g["noisy"].sum().rename("noisy points"))
    return out.reset_index()


@summary("prune")
def _prune(table: pd.DataFrame) -> pd.DataFrame:
    """Per criterion and budget: accuracy and agreement over models and seeds, parameters and FLOPs removed; per
    healing setting when the folder holds runs with different ones (each run's rows kept apart)."""
    from ..prune import summarize

    if "finetune_epochs" not in table.columns or table["finetune_epochs"].nunique() < 2:
        return summarize(table).sort_values(["stage", "budget", "accuracy"], ascending=[False, True, False])
    parts = [summarize(t).assign(finetune_epochs=e) for e, t in table.groupby("finetune_epochs")]
    return pd.concat(parts, ignore_index=True)


@summary("prune-scores")
def _prune_scores(table: pd.DataFrame) -> pd.DataFrame:
    """Per model, criterion and seed: the block each criterion removes first (its lowest score) and the highest."""
    single = table[table["n"] == 1] if "n" in table.columns else table
    rows = []
    for (model, criterion, seed), t in single.groupby(["model", "criterion", "seed"], sort=False):
        lo, hi = t.loc[t["score"].idxmin()], t.loc[t["score"].idxmax()]
        rows.append({"model": model, "criterion": criterion, "seed": seed, "removed first": lo["block"],
                     "lowest score": lo["score"], "kept longest": hi["block"], "highest score": hi["score"]})
    return pd.DataFrame(rows)
