"""One colour per model, run or training method across every figure (issue 16): :mod:`layerlab.plots.colors` and
the figures that use it, read back from the matplotlib artists."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb

from layerlab.plots import color_of, colors, colors_for
from layerlab.plots import criticality as crit
from layerlab.plots import dynamics as dynp
from layerlab.plots import tract as tractp

LAYERS = ["conv1", "layer1.conv", "fc"]


def _summary(models: list[str]) -> pd.DataFrame:
    """Randomize rows of three layers per model; criticality grows with the model's position."""
    return pd.DataFrame([{"model": m, "layer": layer, "label": layer, "index": k, "mode": "randomize",
                          "criticality": 10.0 * (i + 1) + k, "std": 1.0, "base_accuracy": 0.5 + 0.01 * i}
                         for i, m in enumerate(models) for k, layer in enumerate(LAYERS)])


def _scatter_colours(ax) -> dict[str, tuple]:
    return {c.get_label(): to_rgb(c.get_facecolor()[0]) for c in ax.collections}


def _line_colours(ax) -> dict[str, tuple]:
    return {line.get_label(): to_rgb(line.get_color()) for line in ax.lines if not line.get_label().startswith("_")}


# ------------------------------------------------------------------------------------------ the same in every figure

def test_a_category_has_one_colour_in_two_figures_whatever_else_they_show():
    # the scatter shows four categories, the budget figure two of them in another order: a palette dealt out by
    # position would give 'adversarial' the second colour in one and the first in the other
    models = ["baseline", "pgd-linf-2", "pgd-linf-8", "pgd-linf-4", "randaugment", "tract"]
    attrs = pd.DataFrame({"model": models, "category": ["baseline", "adversarial", "adversarial", "adversarial",
                                                        "augmentation", "tract"],
                          "budget": [np.nan, 2.0, 8.0, 4.0, np.nan, np.nan], "accuracy": np.linspace(0.9, 0.6, 6)})
    scatter = _scatter_colours(crit.vs_accuracy(_summary(models), attrs).axes[0])
    assert list(scatter) == ["baseline", "adversarial", "augmentation", "tract"]
    attrs.loc[0, "budget"] = 0.0
    budget = _line_colours(crit.vs_attribute(_summary(models[::-1]), attrs.iloc[::-1], "budget").axes[0])
    assert list(budget) == ["adversarial", "baseline"]
    for name in budget:
        assert budget[name] == scatter[name] == to_rgb(color_of(name))
    assert len(set(scatter.values())) == 4


def test_a_method_has_one_colour_across_analyses(tmp_path, monkeypatch):
    # TrAct: a category of the criticality scatter, a method of the TrAct study, a run of the dynamics figures
    drawn = []
    monkeypatch.setattr(tractp, "save_figure", lambda fig, path, **kw: drawn.append(fig) or [path])
    curves = pd.DataFrame([{"optimizer": "sgd", "budget": 3, "method": method, "seed": 0, "epoch": e,
                            "test_acc": 0.1 * e} for method in ("vanilla", "tract") for e in (1, 2, 3)])
    tractp.plot_curves(curves, tmp_path / "curves")
    tract_fig = _line_colours(drawn[0].axes[0])
    training = pd.DataFrame([{"run": run, "epoch": e, "train_acc": 0.1 * e, "test_acc": 0.1 * e}
                             for run in ("resnet-tract", "resnet-adam") for e in (1, 2, 3)])
    dynamics = [_line_colours(ax)["test"] for ax in dynp.accuracy_curves(training).axes]
    models = ["baseline", "adam", "tract"]
    attrs = pd.DataFrame({"model": models, "category": ["baseline", "optimizer", "tract"], "accuracy": [0.9, 0.8, 0.7]})
    scatter = _scatter_colours(crit.vs_accuracy(_summary(models), attrs).axes[0])
    by_model = _scatter_colours(crit.accuracy_scatter(
        pd.DataFrame({"model": ["resnet-adam", "baseline"], "accuracy": [0.5, 0.6], "mean_criticality": [1.0, 2.0]}),
        {"n": 2, "rho": np.nan, "p": np.nan}).axes[0])
    tract = to_rgb(color_of("tract"))
    assert tract_fig["tract (n=1)"] == dynamics[0] == scatter["tract"] == tract
    assert dynamics[1] == by_model["resnet-adam"] == to_rgb(color_of("adam"))
    assert tract_fig["vanilla (n=1)"] == to_rgb(color_of("vanilla"))
    assert scatter["baseline"] == by_model["baseline"] == to_rgb(color_of("baseline"))


# ------------------------------------------------------------------------------------------------ the mapping

@pytest.mark.parametrize("name, method", [
    ("resnet-sgd", "sgd"), ("vit-adam", "adam"), ("convnext_adamw", "adamw"), ("pgd-linf-8", "adversarial"),
    ("label noise", "label-noise"), ("resnet-label-noise", "label-noise"), ("improved recipe", "improved"),
    ("adam-tract-e6-s0", "tract"), ("sgd-vanilla-e6-s0", "vanilla"), ("ViT_Finetuned", "finetuned"),
])
def test_a_compound_name_takes_its_methods_colour(name, method):
    assert colors.method_of(name) == method
    assert color_of(name) == color_of(method) == colors.METHOD_COLORS[method]


def test_known_names_have_distinct_fixed_colours_and_the_palette_is_apart():
    table = colors.METHOD_COLORS
    assert len(set(table.values())) == len(table)
    assert not set(colors.PALETTE) & set(table.values())
    assert len(set(colors.PALETTE)) == len(colors.PALETTE)
    assert color_of("tract") == "#cc3311" and color_of("baseline") == "#555555"
    assert colors.method_of("resnet18") is None and color_of("resnet18") in colors.PALETTE


def test_names_in_one_figure_never_share_a_colour():
    many = [f"model-{k}" for k in range(25)]  # more unknown names than the palette has colours
    got = colors_for(many)
    assert list(got) == many and len(set(got.values())) == 25
    mixed = ["baseline", "adam", "resnet-adam", "vit-adam", "resnet-sgd", "vit-sgd", "pgd-linf-2", "pgd-linf-8",
             "tract", *many]
    got = colors_for(mixed)
    assert len(set(got.values())) == len(mixed)
    for name in ("baseline", "adam", "tract"):  # a known name keeps its colour whatever else is in the figure
        assert got[name] == color_of(name)
    # names of one method: the method's own name keeps its colour, the others take shades of it
    assert got["resnet-adam"] != got["adam"] and got["vit-adam"] != got["adam"]
    assert got["resnet-sgd"] == color_of("sgd")  # no plain 'sgd' here: the first in sorted order keeps it
    # the answer depends on the set of names, not their order
    assert colors_for(mixed[::-1]) == {n: got[n] for n in mixed[::-1]}


def test_a_figure_of_many_models_gives_each_its_own_colour():
    models = [f"net-{k}" for k in range(25)]
    table = pd.DataFrame({"model": models, "accuracy": np.linspace(0, 1, 25), "mean_criticality": np.arange(25.0)})
    seen = _scatter_colours(crit.accuracy_scatter(table, {"n": 25, "rho": np.nan, "p": np.nan}).axes[0])
    assert list(seen) == models and len(set(seen.values())) == 25


def test_unknown_names_keep_their_colour_in_another_process():
    names = ["my-odd-model", "zoo/run_17", "another one"]
    code = ("from layerlab.plots import color_of, colors_for; "
            f"print(*[color_of(n) for n in {names!r}], *colors_for({names!r}).values())")
    here = [color_of(n) for n in names] + list(colors_for(names).values())
    for seed in ("1", "2"):  # Python's own str hash differs between these processes
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.split() == here
    assert len(set(here[:3])) == 3


# --------------------------------------------------------------------------------------- too few points for a line

def _budget_figure(budgets: list[float]):
    models = [f"pgd-linf-{b:g}" for b in budgets]
    attrs = pd.DataFrame({"model": models, "category": "adversarial", "budget": budgets})
    return crit.vs_attribute(_summary(models), attrs, "budget").axes[0]


def test_criticality_vs_budget_with_two_budgets_draws_labelled_points():
    ax = _budget_figure([2.0, 8.0])
    (line,) = ax.lines
    assert line.get_linestyle() == "None" and line.get_marker() == "o"  # no line through two points
    assert line.get_xdata().tolist() == [2.0, 8.0]
    assert sorted(t.get_text() for t in ax.texts) == ["pgd-linf-2 (11 %)", "pgd-linf-8 (21 %)"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "8"]
    assert to_rgb(line.get_color()) == to_rgb(color_of("adversarial"))


def test_criticality_vs_budget_with_three_budgets_draws_a_line():
    ax = _budget_figure([2.0, 4.0, 8.0])
    (line,) = ax.lines
    assert line.get_linestyle() == "-" and line.get_xdata().tolist() == [2.0, 4.0, 8.0]
    assert sorted(t.get_text() for t in ax.texts) == ["pgd-linf-2", "pgd-linf-4", "pgd-linf-8"]


def test_save_all_writes_the_budget_figure_as_points(tmp_path, monkeypatch):
    drawn = {}
    real = crit.vs_attribute
    monkeypatch.setattr(crit, "vs_attribute", lambda *a, **kw: drawn.setdefault("fig", real(*a, **kw)))
    models = ["baseline", "pgd-linf-2", "pgd-linf-8"]
    attrs = pd.DataFrame({"model": models, "category": ["baseline", "adversarial", "adversarial"],
                          "budget": [np.nan, 2.0, 8.0]})
    paths = crit.save_all(_summary(models), tmp_path, attrs, formats=("png",))
    assert tmp_path / "criticality_vs_budget.png" in paths
    assert [line.get_linestyle() for line in drawn["fig"].axes[0].lines] == ["None"]
