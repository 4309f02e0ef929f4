"""Words for the report: a title per analysis and table, and per analysis family an introduction that says what
it measures, which paper it follows, how to read its figures and what this run found, in numbers.

Intros are functions of the family's tables (``{table name: DataFrame}``) registered by family name, so an analysis
added later registers its own (``@intro("name")``); a family without one gets a title and no prose.
"""
from __future__ import annotations

import html
from typing import Callable

import pandas as pd

from ..registry import Registry
from .summaries import SUMMARIES

__all__ = ["INTROS", "family", "intro", "intro_html", "title"]

TITLES = {
    "criticality": "Layer criticality",
    "dynamics": "Training dynamics",
    "dynamics-cka": "CKA between checkpoints",
    "dynamics-drs": "Decision-region similarity between checkpoints",
    "dynamics-probes": "Linear probes per layer",
    "dynamics-triplets": "The image triplets behind the decision-region planes",
    "invariance": "Invariances under finetuning",
    "invariance-inversions": "Representation inversions",
    "invariance-summary": "Retention and transfer per layer",
    "tract": "TrAct: training the first layer's activations",
    "training": "Training runs",
    "prune": "Block removal: acting on criticality",
    "prune-scores": "Block scores per criterion",
    "other figures": "Other figures",
}
#: the title of a family's main table where it differs from the family's
TABLE_TITLES = {"invariance": "STIR, CKA and the noise floor for every layer pair",
                "criticality": "Criticality per layer and trial", "tract": "Accuracy per epoch",
                "training": "Accuracy and loss per epoch, per model",
                "prune": "Pruned models: one row per model, criterion, budget and seed"}

Intro = Callable[[dict[str, pd.DataFrame]], str]
INTROS: Registry[Intro] = Registry("report intro")


def intro(name: str):
    """Register ``fn(tables) -> HTML`` as the introduction of analysis family ``name``."""
    return INTROS.register(name)


def family(table: str) -> str:
    """The analysis family a table belongs to: ``dynamics-cka`` -> ``dynamics``."""
    return table.split("-", 1)[0]


def title(name: str, *, table: bool = False) -> str:
    """A title in words for an analysis or table name (``dynamics-cka`` -> "CKA between checkpoints")."""
    if table and name in TABLE_TITLES:
        return TABLE_TITLES[name]
    if name in TITLES:
        return TITLES[name]
    words = name.replace("_", " ").replace("-", " ").strip()
    return words[:1].upper() + words[1:] if words else "Untitled"


def intro_html(name: str, tables: dict[str, pd.DataFrame]) -> str:
    """The family's introduction, or "" when none is registered; a failure shows as a note, never breaks the page."""
    if name not in INTROS:
        return ""
    try:
        return INTROS.get(name)(tables)
    except Exception as e:  # the prose must never cost the page
        return f'<p class="note">(introduction not available: {html.escape(type(e).__name__)}: {html.escape(str(e))})</p>'


def _p(*sentences: str) -> str:
    return "<p>" + " ".join(s for s in sentences if s) + "</p>"


def _pct(v: float) -> str:
    return f"{v:.1f} %"


def _names(values) -> str:
    return ", ".join(html.escape(str(v)) for v in values)


def clean_final(table: pd.DataFrame) -> pd.DataFrame:
    """The final models on clean images (:func:`layerlab.criticality.tables.clean_final`), in randomize mode when
    the table has it, else every mode it holds."""
    from ..criticality.tables import clean_final as rows_of

    has_randomize = "mode" in table.columns and bool((table["mode"] == "randomize").any())
    return rows_of(table, "randomize" if has_randomize else None)


@intro("criticality")
def _criticality(tables: dict[str, pd.DataFrame]) -> str:
    what = _p(
        "<b>What it measures.</b> Each Conv2d/Linear layer of a trained model is re-randomised alone (weights drawn "
        "from the architecture's own initialisation, every other layer kept) and the change of the model's decisions "
        "is measured: criticality = 100 &times; (1 &minus; mean cosine similarity of the softmax outputs), averaged "
        "over images and trials. 0 % means the layer could be replaced by noise without effect (auxiliary), high values "
        "mean the model depends on it (critical). Method: Gavrikov, Agnihotri, Keuper &amp; Keuper 2024 "
        "(arXiv 2410.14470); the spread over trials and a bootstrap interval over images come with every value.",
    )
    how = _p("<b>How to read it.</b> In the heatmap, rows are models and columns layers in forward order; hover a "
             "cell for its value. The per-layer lines let you switch models on and off in the legend. Under training "
             "(runs) and shift (corrupted or adversarial inputs) the same measurement is repeated per epoch or per "
             "shift.")
    table = tables.get("criticality")
    if table is None or table.empty:
        return what + how
    final = clean_final(table)
    found = []
    if len(final):
        per = final.groupby(["model", "layer"], sort=False)["criticality"].mean()
        per_model = per.groupby(level="model").mean().sort_values()
        per_layer = per.groupby(level="layer").mean().sort_values()
        found.append(f"{per_model.size} models, {per_layer.size} layers, {int(final['trial'].nunique()) if 'trial' in final else 1} "
                     f"trials each: mean criticality {_pct(per.mean())} (per model from {_pct(per_model.iloc[0])}, "
                     f"{_names(per_model.index[:1])}, to {_pct(per_model.iloc[-1])}, {_names(per_model.index[-1:])}).")
        found.append(f"The most critical layer on average is <code>{html.escape(per_layer.index[-1])}</code> "
                     f"({_pct(per_layer.iloc[-1])}); the least <code>{html.escape(per_layer.index[0])}</code> "
                     f"({_pct(per_layer.iloc[0])}). {int((per < 5).sum())} of {per.size} (model, layer) values are below 5 %.")
    if "shift" in table.columns:
        shifts = sorted(s for s in table["shift"].dropna().unique() if s != "clean")
        if shifts:
            found.append(f"Under shift: {_names(shifts)}.")
    if "epoch" in table.columns and table["epoch"].notna().any():
        runs = table.loc[table["epoch"].notna(), "model"].unique()
        found.append(f"Over training: {len(runs)} run(s) ({_names(runs)}) analysed at {table['epoch'].nunique()} epochs.")
    return what + how + _p("<b>This run.</b>", *found)


@intro("dynamics")
def _dynamics(tables: dict[str, pd.DataFrame]) -> str:
    what = _p(
        "<b>What it measures.</b> How each layer's representation evolves over training (Sharon &amp; Dar 2024, "
        "arXiv 2405.17377): linear CKA between the layer's features at two checkpoints on a fixed probe set "
        "(unbiased minibatch estimator, with a permutation chance level and a bootstrap interval), linear probes of "
        "every layer per checkpoint, and the similarity of decision regions on planes through image triplets.",
    )
    how = _p("<b>How to read it.</b> CKA near 1 between two checkpoints means the layer's representation did not "
             "change between them (up to rotation and scale); blocks of high CKA are training phases. Pick a run in "
             "the CKA view: each line is one layer's CKA to the final checkpoint.")
    found = []
    cka = tables.get("dynamics-cka")
    if cka is not None and len(cka):
        for r in SUMMARIES.get("dynamics-cka")(cka).dropna(subset=["its CKA"]).to_dict("records"):
            found.append(f"{html.escape(r['run'])}: CKA between epoch {r['first epoch']} and {r['last epoch']} is "
                         f"{r['CKA first-last (mean over layers)']:.2f} on average over {r['layers']} layers, lowest at "
                         f"<code>{html.escape(str(r['layer that changed most']))}</code> ({r['its CKA']:.2f}).")
    probes = tables.get("dynamics-probes")
    if probes is not None and len(probes):
        for r in SUMMARIES.get("dynamics-probes")(probes).to_dict("records"):
            found.append(f"{html.escape(r['run'])}: best linear probe at epoch {r['epoch']} is "
                         f"<code>{html.escape(str(r['best layer']))}</code> ({r['its probe test accuracy']:.1%} test "
                         "accuracy).")
    return what + how + (_p("<b>This run.</b>", *found) if found else "")


@intro("invariance")
def _invariance(tables: dict[str, pd.DataFrame]) -> str:
    what = _p(
        "<b>What it measures.</b> Which invariances of a pretrained model survive finetuning (Merlin, Nanda, Rawal "
        "&amp; Toneva 2023, arXiv 2307.06006): images are inverted through one model's layer (noise optimised until "
        "the layer cannot tell them from the originals), and STIR asks whether another model's layer also finds the "
        "pairs alike (CKA of its features on originals and inversions). Retention = STIR(finetuned | pretrained) at the "
        "same layer; transfer = how much more than a model trained from scratch retains.",
    )
    how = _p("<b>How to read it.</b> In the STIR view pick a pair: rows are the reference model's inverted layers, "
             "columns the evaluated model's layers; values near the noise floor (the STIR of un-optimised noise) mean "
             "no shared invariance.")
    found = []
    summary = tables.get("invariance-summary")
    if summary is not None and len(summary) and {"retention", "label"} <= set(summary.columns):
        lo = summary.loc[summary["retention"].idxmin()]
        found.append(f"Retention ranges from {summary['retention'].min():.2f} (<code>{html.escape(str(lo['label']))}</code>) "
                     f"to {summary['retention'].max():.2f} over {len(summary)} layers")
        if "transfer" in summary.columns:
            found[-1] += f"; transfer from {summary['transfer'].min():+.2f} to {summary['transfer'].max():+.2f}"
        found[-1] += "."
    inv = tables.get("invariance-inversions")
    if inv is not None and len(inv) and {"loss_mean", "initial_loss_mean"} <= set(inv.columns):
        found.append(f"Inversions reduced the matching loss from {inv['initial_loss_mean'].mean():.2f} to "
                     f"{inv['loss_mean'].mean():.2f} on average (worst layer {inv['loss_mean'].max():.2f}).")
    return what + how + (_p("<b>This run.</b>", *found) if found else "")


@intro("tract")
def _tract(tables: dict[str, pd.DataFrame]) -> str:
    what = _p(
        "<b>What it measures.</b> TrAct (Petersen, Borgelt &amp; Ermon, NeurIPS 2024, arXiv 2410.23970) changes only "
        "the first layer's update so that it trains its activations rather than its weights, which the paper finds "
        "reaches the same accuracy in fewer epochs. Here each optimiser and method is trained at several epoch "
        "budgets and seeds.",
    )
    how = _p("<b>How to read it.</b> Test accuracy per epoch, one line per (optimiser, method, budget), the mean over "
             "seeds; a TrAct line above its vanilla line at the same budget is the claimed saving.")
    t = tables.get("tract")
    if t is None or t.empty or not {"optimizer", "method", "budget", "seed", "test_acc"} <= set(t.columns):
        return what + how
    final = t.sort_values("epoch").groupby(["optimizer", "method", "budget", "seed"]).tail(1)
    m = final.groupby(["optimizer", "budget", "method"])["test_acc"].mean().unstack("method")
    found = [f"{html.escape(o)}, {b} epochs: " + ", ".join(f"{html.escape(k)} {v:.1%}" for k, v in row.dropna().items()) + "."
             for (o, b), row in m.iterrows()]
    return what + how + _p(f"<b>This run</b> (final test accuracy, mean over {final['seed'].nunique()} seeds).", *found)


@intro("training")
def _training(tables: dict[str, pd.DataFrame]) -> str:
    what = _p("<b>What it is.</b> The training lab's runs that produced the models analysed above: the same "
              "architecture and data, different training methods (optimiser, augmentation, adversarial training, label "
              "noise, improved recipes, TrAct). Each line of the accuracy view is one model.")
    t = tables.get("training")
    if t is None or t.empty or not {"model", "epoch", "test_acc"} <= set(t.columns):
        return what
    last = t.sort_values("epoch").groupby("model").tail(1).sort_values("test_acc")
    return what + _p(f"<b>This run.</b> {len(last)} models; final test accuracy from {last['test_acc'].iloc[0]:.1%} "
                     f"({html.escape(last['model'].iloc[0])}) to {last['test_acc'].iloc[-1]:.1%} "
                     f"({html.escape(last['model'].iloc[-1])}).")


@intro("prune")
def _prune(tables: dict[str, pd.DataFrame]) -> str:
    what = _p(
        "<b>What it measures.</b> Whole residual blocks are removed (each becomes its shortcut) in the order a "
        "criterion picks, until a budget of blocks is gone: layer criticality (Gavrikov et al. 2024: the blocks whose "
        "re-randomisation changes the output least go first), block influence (ShortGPT: 1 &minus; cos of a block's input "
        "and output), angular distance over runs of blocks (Gromov et al. 2024), at random, and, as the usual baseline, "
        "global unstructured magnitude pruning of as many weights. Accuracy and top-1 agreement with the unpruned "
        "model are measured before and (optionally) after a short healing fine-tune.",
    )
    how = _p("<b>How to read it.</b> Accuracy against the budget, one series per criterion (mean over models; "
             "dashed: after healing; dotted: the unpruned models); a criterion above another at the same budget "
             "picked blocks the model needed less.")
    t = tables.get("prune")
    if t is None or t.empty or not {"criterion", "budget_fraction", "accuracy"} <= set(t.columns):
        return what + how
    m = t.groupby(["budget_fraction", "criterion"])["accuracy"].mean().unstack("criterion")
    found = [f"{b:.0%} of the blocks: " + ", ".join(f"{html.escape(k)} {v:.1%}" for k, v in row.dropna().sort_values(ascending=False).items()) + "."
             for b, row in m.iterrows()]
    base = t["accuracy_base"].mean() if "accuracy_base" in t.columns else float("nan")
    models = t["model"].nunique()
    return what + how + _p(f"<b>This run</b> ({models} model{'s' if models != 1 else ''}, unpruned accuracy {base:.1%}"
                           f"{' on average' if models > 1 else ''}; accuracy without healing, mean over models and "
                           "seeds).", *found)
