"""Tables derived from :func:`~layerlab.prune.prune`'s rows (pure functions over frames): accuracy per criterion
and budget with the seed spread (:func:`summarize`), and whether one criterion beats the others (:func:`compare`).

Seeds are the replicates: per seed the numbers are first averaged over the models (a zoo), then the mean and the
standard deviation over seeds (ddof=1) are reported, so the spread is the seed-to-seed spread of a zoo average.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..errors import LayerlabError

__all__ = ["STAGES", "compare", "long_form", "summarize"]

#: the two moments a pruned model is scored at, and the columns they read
STAGES = {"pruned": ("accuracy", "agreement"), "healed": ("accuracy_healed", "agreement_healed")}


def long_form(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, criterion, budget, seed, stage) with ``accuracy`` and ``agreement``: ``pruned`` rows,
    and ``healed`` rows where the job healed."""
    need = {"model", "criterion", "budget", "seed", "accuracy", "agreement"}
    if missing := sorted(need - set(table.columns)):
        raise LayerlabError(f"not a prune table: columns {missing} are missing; pass the table ll.prune(...) returns")
    keep = ["model", "criterion", "budget", "budget_fraction", "seed", "params_removed", "flops_ratio"]
    keep = [c for c in keep if c in table.columns]
    parts = []
    for stage, (acc, agree) in STAGES.items():
        if acc not in table.columns:
            continue
        part = table[keep + [acc, agree]].rename(columns={acc: "accuracy", agree: "agreement"})
        part = part[part["accuracy"].notna()]
        parts.append(part.assign(stage=stage))
    return pd.concat(parts, ignore_index=True)


def _seed_means(long: pd.DataFrame, values: Sequence[str]) -> pd.DataFrame:
    keys = ["criterion", "budget", "stage", "seed"]
    return long.groupby(keys, sort=False)[list(values)].mean().reset_index()


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per (criterion, budget, stage): mean accuracy and agreement over models, then mean and std over seeds;
    with the fraction of parameters removed and the FLOPs ratio, and how many models and seeds went in."""
    long = long_form(table)
    values = [c for c in ("accuracy", "agreement", "params_removed", "flops_ratio", "budget_fraction")
              if c in long.columns]
    per_seed = _seed_means(long, values)
    keys = ["criterion", "budget", "stage"]
    grouped = per_seed.groupby(keys, sort=False)
    out = grouped[values].mean()
    for col in ("accuracy", "agreement"):
        out[f"{col}_std"] = grouped[col].std(ddof=1)
    out["seeds"] = grouped["seed"].nunique()
    out["models"] = long.groupby(keys, sort=False)["model"].nunique()
    return out.reset_index()


def compare(table: pd.DataFrame, reference: str = "criticality", value: str = "accuracy") -> pd.DataFrame:
    """Does ``reference`` beat each other criterion? Per (budget, stage, other criterion): the difference
    reference - other in ``value`` (accuracy or agreement), paired by model and seed, averaged over models per
    seed; its mean, std and range over seeds, the share of (model, seed) pairs where the reference is ahead, and
    a verdict: ``beats`` when every seed's difference is positive, ``loses`` when every one is negative, else
    ``within spread``; with one seed there is no spread to judge against: ``one seed``."""
    long = long_form(table)
    if reference not in set(long["criterion"]):
        raise LayerlabError(f"reference criterion {reference!r} is not in the table; it has "
                            f"{', '.join(sorted(set(long['criterion'])))}")
    keys = ["model", "budget", "stage", "seed"]
    ref = long[long["criterion"] == reference].set_index(keys)[value]
    rows = []
    for other, part in long[long["criterion"] != reference].groupby("criterion", sort=False):
        diff = (ref - part.set_index(keys)[value]).dropna().rename("diff").reset_index()
        for (budget, stage), d in diff.groupby(["budget", "stage"], sort=False):
            per_seed = d.groupby("seed")["diff"].mean()
            verdict = ("one seed" if len(per_seed) < 2 else "beats" if (per_seed > 0).all()
                       else "loses" if (per_seed < 0).all() else "within spread")
            rows.append({"reference": reference, "other": other, "budget": budget, "stage": stage, "value": value,
                         "difference": float(per_seed.mean()),
                         "std": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else float("nan"),
                         "min": float(per_seed.min()), "max": float(per_seed.max()),
                         "ahead": float(np.mean(d["diff"] > 0)), "pairs": len(d), "seeds": len(per_seed),
                         "verdict": verdict})
    return pd.DataFrame(rows)
