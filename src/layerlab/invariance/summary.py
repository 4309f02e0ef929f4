"""Summaries of the invariance grid: one grid as a matrix, and retention, transfer and compression per layer (the
toolkit's operationalisation of Merlin et al. 2023, arXiv 2307.06006; the paper's exact metric names were not
available):

* retention(l)   = STIR(ft_l | pt_l): how much of the pretrained layer's invariance the finetuned layer keeps;
* transfer(l)    = retention(l) - STIR(scratch_l | pt_l): the part a model trained from scratch on the
  downstream task does not have, i.e. what pretraining handed over;
* compression(i) = argmax_j STIR(ft_j | pt_i): the finetuned layer that best shares pretrained layer i's
  invariances; ``shift`` = position(argmax) - position(i) < 0 means the invariance moved to a shallower layer.

The paper's findings to check: pretraining induces transferable invariances in shallow layers (transfer > 0
there), and invariances of deep pretrained layers move towards shallower finetuned layers (shift < 0 there).
"""
from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from ..errors import LayerlabError
from .inversion import InversionCache

__all__ = ["example_inversions", "grid_matrix", "summarize"]


def grid_matrix(grid: pd.DataFrame, reference: str, evaluated: str, metric: str = "stir") -> pd.DataFrame:
    """One grid as a matrix: rows = reference layer i, columns = evaluated layer j (labels in depth order)."""
    sel = grid[(grid["reference"] == reference) & (grid["evaluated"] == evaluated) & (grid["metric"] == metric)]
    if sel.empty:
        have = sorted(set(grid["pair"])) if "pair" in grid else []
        raise LayerlabError(f"no {metric!r} rows for {evaluated}|{reference}; the grid holds pairs {have}")
    mat = sel.pivot_table(index=["ref_index", "ref_label"], columns=["eval_index", "eval_label"], values="value")
    mat = mat.sort_index(axis=0).sort_index(axis=1)
    mat.index = mat.index.get_level_values(1)
    mat.columns = mat.columns.get_level_values(1)
    return mat


def summarize(grid: pd.DataFrame, inversions: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per pretrained layer l: retention, transfer, compression (module doc), with their context.

    Columns: layer, label, index, retention = STIR(ft_l | pt_l), reverse = STIR(pt_l | ft_l), ceiling =
    STIR(pt_l | pt_l) (what a perfect match of the inversion reaches), noise = the floor of ft_l, cka =
    CKA(pt_l, ft_l); with a scratch model scratch = STIR(scratch_l | pt_l) and transfer = retention - scratch;
    compression: best_layer / best_label / best_index = argmax_j STIR(ft_j | pt_l), best_stir, shift =
    best_index - index (< 0: the invariance sits shallower after finetuning), and the scratch control
    scratch_best_label / scratch_shift; inversion_loss = mean final matching loss of pt's inversion at l.

    Shallow layers have higher noise floors (even unrelated inputs look alike to them), which pulls a raw argmax
    shallower for any model, the scratch control included. ``best_label_above_noise`` / ``shift_above_noise`` /
    ``scratch_shift_above_noise`` take the argmax of the floor-normalised STIR (STIR - noise_j) / (1 - noise_j)
    instead; read a shift as real when it holds there too and the scratch control does not show it.
    """
    need = {"reference", "evaluated", "metric", "value", "ref_layer", "eval_layer", "ref_index", "eval_index"}
    if not need <= set(grid.columns):
        raise LayerlabError(f"summarize: expected a grid from invariance_grid with columns {sorted(need)}")
    g = grid.set_index(["reference", "evaluated", "metric", "ref_index", "eval_index"])["value"]
    refs = (grid[grid["reference"] == "pretrained"][["ref_index", "ref_layer", "ref_label"]]
            .drop_duplicates().sort_values("ref_index"))
    labels = dict(zip(grid["eval_index"], grid["eval_label"]))
    layer_names = dict(zip(grid["eval_index"], grid["eval_layer"]))
    has_scratch = "scratch" in set(grid["evaluated"])

    def val(ref: str, ev: str, metric: str, i: int, j: int) -> float:
        try:
            return float(g.loc[(ref, ev, metric, i, j)])
        except KeyError:
            return float("nan")

    rows = []
    for _, r in refs.iterrows():
        i = int(r["ref_index"])
        row: dict[str, Any] = {"layer": r["ref_layer"], "label": r["ref_label"], "index": i,
                               "retention": val("pretrained", "finetuned", "stir", i, i),
                               "reverse": val("finetuned", "pretrained", "stir", i, i),
                               "ceiling": val("pretrained", "pretrained", "stir", i, i),
                               "noise": val("pretrained", "finetuned", "noise", i, i),
                               "cka": val("pretrained", "finetuned", "cka", i, i)}
        if has_scratch:
            row["scratch"] = val("pretrained", "scratch", "stir", i, i)
            row["transfer"] = row["retention"] - row["scratch"]
        for ev in ("finetuned", "scratch"):
            if ev == "scratch" and not has_scratch:
                continue
            js = sorted(labels)
            line = pd.Series([val("pretrained", ev, "stir", i, j) for j in js], index=js)
            floor = pd.Series([val("pretrained", ev, "noise", i, j) for j in js], index=js)
            if line.isna().all():
                continue
            j = int(line.idxmax())
            above = (line - floor) / (1.0 - floor)
            ja = int(above.idxmax()) if not above.isna().all() else j
            if ev == "finetuned":
                row.update({"best_layer": layer_names[j], "best_label": labels[j], "best_index": j,
                            "best_stir": float(line[j]), "shift": j - i,
                            "best_label_above_noise": labels[ja], "shift_above_noise": ja - i})
            else:
                row.update({"scratch_best_label": labels[j], "scratch_shift": j - i,
                            "scratch_shift_above_noise": ja - i})
        if inversions is not None and not inversions.empty:
            hit = inversions[(inversions["model"] == "pretrained") & (inversions["index"] == i)]
            row["inversion_loss"] = float(hit["loss_mean"].iloc[0]) if not hit.empty else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def example_inversions(cache: InversionCache, inversions: pd.DataFrame, k: int = 6) -> dict[tuple[str, str], torch.Tensor]:
    """The first ``k`` inverted images of every (model, layer) row of ``inversions`` still in ``cache``."""
    out = {}
    for _, r in inversions.iterrows():
        found = cache.load(str(r["key"]))
        if found is not None:
            out[(str(r["model"]), str(r["label"]))] = found[0][:k]
    return out
