"""What the figures show (issue 15, item 4): panels, axis and tick labels, titles and the plotted values, each figure
built from a small synthetic table (no model is trained or run). The over-training, shift, critical-set and
marked-difference figures are checked in test_criticality_figures.py."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.colors import to_rgb, to_rgba

from layerlab.plots import color_of, colors_for
from layerlab.plots import criticality as crit
from layerlab.plots import dynamics as dynp
from layerlab.plots import invariance as invp
from layerlab.plots import tract as tractp


def _ticks(labels) -> list[str]:
    return [t.get_text() for t in labels]


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def _image(ax) -> np.ndarray:
    return np.ma.filled(np.ma.asarray(ax.images[0].get_array()).astype(float), np.nan)


def _colourbar(fig):
    """The colour bar's axes: the one axes that holds no image of its own but a colorbar."""
    bars = [ax for ax in fig.axes if hasattr(ax, "_colorbar")]
    assert len(bars) == 1
    return bars[0]


# ------------------------------------------------------------------------------------------------- criticality

LAYERS = ["conv1", "layer1.conv", "fc"]  # forward order; the table below lists them out of order
LABELS = ["stem", "block", "head"]
MODELS = ["baseline", "adv1", "adv3", "augmix"]
CRIT = {  # criticality [%] per model, per layer in forward order
    "baseline": [80.0, 30.0, 10.0], "adv1": [60.0, 25.0, 12.0], "adv3": [40.0, 22.0, 15.0], "augmix": [90.0, 35.0, 5.0],
}
STD = {"baseline": [1.0, 2.0, 0.5], "adv1": [3.5, 0.0, 1.0], "adv3": [2.0, 4.25, 1.5], "augmix": [0.25, 1.0, 2.0]}
BASE_ACC = {"baseline": 0.91, "adv1": 0.85, "adv3": 0.80, "augmix": 0.93}


def _summary() -> pd.DataFrame:
    rows = []
    for model in MODELS:
        for k in (2, 0, 1):  # not in forward order: the figures sort by index
            rows.append({"model": model, "layer": LAYERS[k], "label": LABELS[k], "index": k, "mode": "randomize",
                         "criticality": CRIT[model][k], "std": STD[model][k], "base_accuracy": BASE_ACC[model]})
    return pd.DataFrame(rows)


def _attrs() -> pd.DataFrame:
    return pd.DataFrame({"model": MODELS, "category": ["base", "adv", "adv", "aug"],
                         "budget": [0.0, 1.0, 3.0, np.nan], "accuracy": [0.9, 0.8, 0.7, 0.95]})


def _matrix(values: dict, models=MODELS) -> np.ndarray:
    return np.array([values[m] for m in models]).T  # layers x models


def test_heatmap_shows_layers_by_models():
    fig = crit.heatmap(_summary())
    assert len(fig.axes) == 2  # the heatmap and its colour bar
    ax = fig.axes[0]
    np.testing.assert_array_equal(_image(ax), _matrix(CRIT))
    assert _ticks(ax.get_yticklabels()) == LABELS
    assert _ticks(ax.get_xticklabels()) == MODELS
    assert ax.get_title() == "Layer criticality (randomize)"
    assert ax.images[0].get_clim() == (0, 100)
    bar = _colourbar(fig)
    assert bar.get_ylabel() == "criticality [%]"
    assert _texts(ax) == [f"{v:.0f}" for v in _matrix(CRIT).ravel()]  # row-major: one value per cell


def test_heatmap_keeps_the_model_order_asked_for_and_shortens_long_names():
    long = "resnet18?weights=" + "x" * 30 + "&tail=end"
    summary = _summary()
    summary["model"] = summary["model"].replace({"augmix": long})
    ax = crit.heatmap(summary, models=["adv3", long, "baseline"], title="T").axes[0]
    np.testing.assert_array_equal(_image(ax), _matrix(CRIT, ["adv3", "augmix", "baseline"]))
    shown = _ticks(ax.get_xticklabels())
    assert shown[0] == "adv3" and shown[2] == "baseline"
    assert shown[1] == long[:11] + "..." + long[-10:] and len(shown[1]) == 24
    assert ax.get_title() == "T"


def test_std_heatmap_shows_the_spread_on_its_own_scale():
    fig = crit.std_heatmap(_summary())
    ax = fig.axes[0]
    np.testing.assert_array_equal(_image(ax), _matrix(STD))
    assert ax.images[0].get_clim() == (0, 4.25)  # zero to the largest std
    assert _ticks(ax.get_yticklabels()) == LABELS and _ticks(ax.get_xticklabels()) == MODELS
    assert ax.get_title() == "Criticality: std over trials"
    assert _colourbar(fig).get_ylabel() == "std [% points]"
    assert _texts(ax)[:3] == ["1.0", "3.5", "2.0"]


def test_difference_to_baseline_is_symmetric_and_leaves_the_baseline_out():
    fig = crit.diff_to_baseline(_summary(), "baseline")
    ax = fig.axes[0]
    want = _matrix(CRIT, MODELS[1:]) - _matrix(CRIT, ["baseline"])
    np.testing.assert_array_equal(_image(ax), want)
    assert _ticks(ax.get_xticklabels()) == MODELS[1:] and _ticks(ax.get_yticklabels()) == LABELS
    lim = np.abs(want).max()
    assert ax.images[0].get_clim() == (-lim, lim)
    assert ax.get_title() == "Criticality minus 'baseline'"
    assert _colourbar(fig).get_ylabel() == "difference [% points]"
    assert _texts(ax)[0] == f"{want[0, 0]:+.0f}"
    # the baseline comes from the whole summary when the models asked for leave it out
    only = crit.diff_to_baseline(_summary(), "baseline", models=["adv3"]).axes[0]
    np.testing.assert_array_equal(_image(only), want[:, [1]])
    assert _ticks(only.get_xticklabels()) == ["adv3"]


def _average(model: str) -> float:
    return float(np.mean(CRIT[model]))


def test_vs_attribute_draws_a_line_per_category_through_the_averages():
    fig = crit.vs_attribute(_summary(), _attrs(), "budget")
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {"base", "adv"}  # augmix has no budget: left out
    assert lines["adv"].get_xdata().tolist() == [1.0, 3.0]
    assert lines["adv"].get_ydata().tolist() == pytest.approx([_average("adv1"), _average("adv3")])
    assert lines["base"].get_xdata().tolist() == [0.0]
    assert lines["base"].get_ydata().tolist() == pytest.approx([_average("baseline")])
    # one and two budgets per category: points, not lines, each labelled with its model and value
    assert all(line.get_linestyle() == "None" and line.get_marker() == "o" for line in ax.lines)
    assert sorted(_texts(ax)) == [f"{m} ({_average(m):.0f} %)" for m in ("adv1", "adv3", "baseline")]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["base", "adv"]
    assert _ticks(ax.get_xticklabels()) == ["0", "1", "3"]
    assert ax.get_xlabel() == "budget" and ax.get_ylabel() == "average criticality [%]"
    assert ax.get_title() == "Average criticality vs budget"


def test_vs_accuracy_scatters_averages_against_accuracy_with_rho():
    from scipy.stats import spearmanr

    ax = crit.vs_accuracy(_summary(), _attrs()).axes[0]
    points = {c.get_label(): c.get_offsets().data.tolist() for c in ax.collections}
    assert points == {
        "base": [[0.9, pytest.approx(_average("baseline"))]],
        "adv": [[0.8, pytest.approx(_average("adv1"))], [0.7, pytest.approx(_average("adv3"))]],
        "aug": [[0.95, pytest.approx(_average("augmix"))]],
    }
    rho = spearmanr([_average(m) for m in MODELS], _attrs()["accuracy"])
    assert ax.get_title() == ("Average criticality vs accuracy\n"
                              f"Spearman rho = {rho.statistic:+.2f} (p = {rho.pvalue:.2g}, n = 4)")
    assert ax.get_xlabel() == "accuracy" and ax.get_ylabel() == "average criticality [%]"
    assert sorted(_texts(ax)) == sorted(MODELS)
    # without attrs: the accuracy on the criticality images, no categories: a point per model in its colour
    ax = crit.vs_accuracy(_summary()).axes[0]
    assert ax.get_xlabel() == "accuracy on the criticality images"
    assert [c.get_label() for c in ax.collections] == MODELS
    for c, m in zip(ax.collections, MODELS):
        np.testing.assert_allclose(c.get_offsets().data, [(BASE_ACC[m], _average(m))])
        assert to_rgb(c.get_facecolor()[0]) == to_rgb(color_of(m))
    assert ax.get_legend() is None  # the points' labels name the models


def test_accuracy_scatter_without_a_rho():
    table = pd.DataFrame({"model": ["a", "b"], "accuracy": [0.5, 0.6], "mean_criticality": [10.0, 20.0]})
    ax = crit.accuracy_scatter(table, {"n": 2, "rho": math.nan, "p": math.nan}).axes[0]
    assert ax.get_title() == "Average criticality vs accuracy\nSpearman rho: n/a (n = 2)"
    assert [c.get_offsets().data.tolist() for c in ax.collections] == [[[0.5, 10.0]], [[0.6, 20.0]]]
    assert ax.get_xlabel() == "test accuracy"


def _checkpoint_summary() -> pd.DataFrame:
    rows = []
    for k in range(2):
        rows.append({"model": "mlp", "layer": LAYERS[k], "label": LABELS[k], "index": k, "mode": "randomize",
                     "epoch": np.nan, "accuracy": 0.1 + 0.1 * k})
        rows.append({"model": "mlp", "layer": LAYERS[k], "label": LABELS[k], "index": k, "mode": "reinit",
                     "epoch": 0, "accuracy": 0.2 + 0.1 * k})
        for e in (0, 1, 3):
            rows.append({"model": "mlp", "layer": LAYERS[k], "label": LABELS[k], "index": k, "mode": "checkpoint",
                         "epoch": e, "accuracy": 0.5 + 0.1 * e + 0.05 * k})
    return pd.DataFrame(rows[::-1])  # in reverse: the figure orders units and columns itself


def test_checkpoint_heatmap_shows_the_error_after_each_reset():
    fig = crit.checkpoint_heatmap(_checkpoint_summary())
    ax = fig.axes[0]
    assert _ticks(ax.get_xticklabels()) == ["random", "epoch 0 (reinit)", "epoch 0", "epoch 1", "epoch 3"]
    assert _ticks(ax.get_yticklabels()) == LABELS[:2]
    want = np.array([[100 * (1 - a) for a in (0.1 + 0.1 * k, 0.2 + 0.1 * k, *(0.5 + 0.1 * e + 0.05 * k for e in (0, 1, 3)))]
                     for k in range(2)])
    np.testing.assert_allclose(_image(ax), want)
    assert ax.get_title() == "Test error after reset: mlp"
    assert ax.images[0].get_clim() == (0, 100)
    assert _colourbar(fig).get_ylabel() == "test error [%]"


# --------------------------------------------------------------------------------------------------- dynamics

EPOCHS = [0, 1, 3]  # log-spaced checkpoints: one cell each


def _cka_frame() -> pd.DataFrame:
    """Run a: layers conv1, fc; run b: conv1 only. Value = 0.1 * (3 a + b) + 0.01 * layer + 0.05 * run."""
    rows = []
    for r, (run, layers) in enumerate((("a", ["conv1", "fc"]), ("b", ["conv1"]))):
        for li, layer in enumerate(layers):
            for ia, ea in enumerate(EPOCHS):
                for ib, eb in enumerate(EPOCHS):
                    rows.append({"run": run, "layer": layer, "label": layer.upper(), "epoch_a": ea, "epoch_b": eb,
                                 "cka": 0.1 * (3 * ia + ib) + 0.01 * li + 0.05 * r})
    return pd.DataFrame(rows)


def _training() -> pd.DataFrame:
    rows = []
    for run, fit in (("a", 2), ("b", None)):
        for e in EPOCHS:
            rows.append({"run": run, "epoch": e, "train_acc": 0.3 + 0.2 * e, "train_acc_clean": 0.25 + 0.2 * e,
                         "test_acc": 0.2 + 0.1 * e, "first_fit_epoch": fit})
    return pd.DataFrame(rows)


def test_matrix_grid_panels_values_and_fit_marks():
    frame = _cka_frame()
    fig = dynp.matrix_grid(frame, "cka", training=_training())
    panels = fig.axes[:4]  # 2 runs x 2 layers, then the colour bar
    assert len(fig.axes) == 5 and _colourbar(fig).get_ylabel() == "CKA"
    a0, a1, b0, b1 = panels
    assert not b1.axison and not b1.images  # run b has one layer
    for ax, run, layer in ((a0, "a", "conv1"), (a1, "a", "fc"), (b0, "b", "conv1")):
        rows = frame[(frame["run"] == run) & (frame["layer"] == layer)]
        want = rows.pivot(index="epoch_a", columns="epoch_b", values="cka").to_numpy()
        np.testing.assert_allclose(_image(ax), want)
        assert ax.images[0].origin == "lower" and ax.images[0].get_clim() == (0.0, 1.0)
        assert ax.get_title() == layer.upper()
        assert _ticks(ax.get_xticklabels()) == ["0", "1", "3"] == _ticks(ax.get_yticklabels())
    assert a0.get_ylabel() == "a\nepoch" and b0.get_ylabel() == "b\nepoch" and a1.get_ylabel() == ""
    assert a0.get_xlabel() == "" and b0.get_xlabel() == "epoch"
    # run a first fit all training images at epoch 2, between checkpoints 1 and 3: cell position 1.5
    marks = sorted((line.get_xdata()[0], line.get_ydata()[0]) for line in a0.lines)
    assert marks == [(0, 1.5), (1.5, 0)]
    assert not b0.lines  # run b never fit its training set
    assert fig.get_suptitle().startswith("CKA between checkpoints")


def test_probe_accuracy_a_line_per_layer_and_the_network():
    rows = []
    for run in ("a", "b"):
        for li, layer in enumerate(("conv1", "fc")):
            for e in (3, 0, 1):
                rows.append({"run": run, "layer": layer, "label": f"L{li}", "epoch": e, "test_acc": 0.1 * e + 0.3 * li,
                             "probe_converged": not (run == "a" and layer == "fc" and e == 1)})
    probes = pd.DataFrame(rows)
    fig = dynp.probe_accuracy(probes, _training())
    assert len(fig.axes) == 2
    ax = fig.axes[0]
    assert ax.get_title() == "a" and fig.axes[1].get_title() == "b"
    lines = {line.get_label(): line for line in ax.lines}
    assert lines["L0"].get_xdata().tolist() == EPOCHS
    assert lines["L0"].get_ydata().tolist() == pytest.approx([0.0, 0.1, 0.3])
    assert lines["L1"].get_ydata().tolist() == pytest.approx([0.3, 0.4, 0.6])
    assert lines["network (test)"].get_ydata().tolist() == pytest.approx([0.2, 0.3, 0.5])
    assert [c.get_offsets().data.tolist() for c in ax.collections] == [[], [[1.0, pytest.approx(0.4)]]]  # unconverged
    fit = [line for line in ax.lines if line.get_label().startswith("_")]
    assert [line.get_xdata()[0] for line in fit] == [2]
    assert not [line for line in fig.axes[1].lines if line.get_label().startswith("_")]
    assert ax.get_ylabel() == "linear probe test acc" and ax.get_xlabel() == "epoch"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["L0", "L1", "network (test)"]
    assert "x: probe stopped" in fig.get_suptitle()


def test_accuracy_curves_train_clean_and_test():
    training = _training()
    training.loc[training["run"] == "b", "train_acc_clean"] = training.loc[training["run"] == "b", "train_acc"]
    fig = dynp.accuracy_curves(training)
    a, b = fig.axes
    lines = {line.get_label(): line.get_ydata().tolist() for line in a.lines if not line.get_label().startswith("_")}
    assert lines == {"train (labels trained on)": pytest.approx([0.3, 0.5, 0.9]),
                     "train (clean labels)": pytest.approx([0.25, 0.45, 0.85]),
                     "test": pytest.approx([0.2, 0.3, 0.5])}
    labelled_b = [line.get_label() for line in b.lines if not line.get_label().startswith("_")]
    assert labelled_b == ["train (labels trained on)", "test"]  # clean = trained-on labels: one line
    assert _texts(a) == ["100% at 2"] and _texts(b) == []
    assert a.get_ylim() == (0, 1.02) and a.get_ylabel() == "accuracy"
    assert (a.get_title(), b.get_title()) == ("a", "b")
    # colour = run (one colour per run, as in every figure), style = series; the legend shows the styles
    want = colors_for(["a", "b"])
    for ax, run in ((a, "a"), (b, "b")):
        drawn = [line for line in ax.lines if not line.get_label().startswith("_")]
        assert {to_rgb(line.get_color()) for line in drawn} == {to_rgb(want[run])}
    assert want["a"] != want["b"]
    assert [line.get_linestyle() for line in a.lines if not line.get_label().startswith("_")] == ["-", "-.", "--"]
    assert [t.get_text() for t in a.get_legend().get_texts()] == ["train (labels trained on)", "train (clean labels)",
                                                                   "test"]


def test_accuracy_curves_take_the_run_colours_of_the_methods():
    training = pd.concat([_training().assign(run=name) for name in ("resnet-adam", "vit-tract")])
    a, b = dynp.accuracy_curves(training).axes
    assert to_rgb(a.lines[0].get_color()) == to_rgb(color_of("adam"))
    assert to_rgb(b.lines[0].get_color()) == to_rgb(color_of("tract"))


def test_series_over_two_epochs_are_points_not_lines():
    training = _training()
    training = training[training["epoch"] < 3]  # epochs 0 and 1
    for line in dynp.accuracy_curves(training).axes[0].lines:
        if not line.get_label().startswith("_"):
            assert line.get_linestyle() == "None" and line.get_marker() == "o"
    probes = pd.DataFrame([{"run": "a", "layer": "fc", "label": "L0", "epoch": e, "test_acc": 0.5} for e in (0, 1)])
    ax = dynp.probe_accuracy(probes, training).axes[0]
    drawn = {line.get_label(): line for line in ax.lines}
    assert drawn["L0"].get_linestyle() == "None" and drawn["L0"].get_marker() == "."
    assert drawn["network (test)"].get_linestyle() == "None"
    three = pd.concat([probes, probes.iloc[:1].assign(epoch=3)])
    assert dynp.probe_accuracy(three).axes[0].lines[0].get_linestyle() == "-"  # three epochs: a line


def test_decision_regions_colour_opacity_and_anchors():
    res = 3
    rows = []
    for view, label in (("fc", "head"), ("output", "output")):
        for e in (0, 4):
            for i in range(res):
                for j in range(res):
                    rows.append({"epoch": e, "layer": view, "label": label, "i": i, "j": j,
                                 "pred": (i + 2 * j + e) % 3, "confidence": 0.2 + 0.1 * i + 0.05 * j,
                                 "c1": float(i), "c2": float(j)})
    regions = pd.DataFrame(rows)
    anchors = pd.DataFrame({"point": ["p0", "p1", "p2"], "class": [0, 1, 2], "c1": [0.0, 2.0, 0.0],
                            "c2": [0.0, 0.0, 2.0], "noisy": [False, True, False], "clean_class": [0, 2, 2]})
    fig = dynp.decision_regions(regions, anchors, classes=["zero", "one", "two"])
    axes = np.array(fig.axes).reshape(2, 2)  # rows: the network first, then the probe; columns: epochs
    assert [ax.get_title() for ax in axes[0]] == ["epoch 0", "epoch 4"]
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["network", "probe head"]
    palette = np.array([to_rgb(c) for c in dynp._CLASS_COLOURS])
    for r, view in enumerate(("output", "fc")):
        for c, e in enumerate((0, 4)):
            img = np.asarray(axes[r, c].images[0].get_array())
            part = regions[(regions["layer"] == view) & (regions["epoch"] == e)]
            for _, p in part.iterrows():
                np.testing.assert_allclose(img[int(p["j"]), int(p["i"]), :3], palette[int(p["pred"])])
                assert img[int(p["j"]), int(p["i"]), 3] == pytest.approx(p["confidence"])
            dots = axes[r, c].collections
            assert [d.get_offsets().data.tolist() for d in dots] == [[[0.0, 0.0]], [[2.0, 0.0]], [[0.0, 2.0]]]
            assert [tuple(d.get_edgecolor()[0]) for d in dots] == [to_rgba("k"), to_rgba("#d62728"), to_rgba("k")]
    assert axes[0, 0].images[0].get_extent() == [0.0, 2.0, 0.0, 2.0]
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["zero", "one", "two"]
    assert "p1: class 1 (noisy; clean 2)" in fig.get_suptitle()


def test_layer_heatmap_rows_model_a_columns_model_b():
    rows = [{"layer_a": la, "label_a": la.upper(), "layer_b": lb, "label_b": lb + "'", "cka": 0.1 * i + 0.3 * j,
             "model_a": "modelA", "model_b": "modelB", "estimator": "unbiased", "n": 24}
            for i, la in enumerate(("c1", "c2", "fc")) for j, lb in enumerate(("c1", "fc"))]
    fig = dynp.layer_heatmap(pd.DataFrame(rows))
    ax = fig.axes[0]
    np.testing.assert_allclose(_image(ax), [[0.1 * i + 0.3 * j for j in range(2)] for i in range(3)])
    assert _ticks(ax.get_yticklabels()) == ["C1", "C2", "FC"] and _ticks(ax.get_xticklabels()) == ["c1'", "fc'"]
    assert ax.get_ylabel() == "modelA" and ax.get_xlabel() == "modelB"
    assert ax.get_title() == "Layer x layer unbiased minibatch CKA, n=24"
    assert _colourbar(fig).get_ylabel() == "CKA"
    assert _texts(ax)[:2] == ["0.00", "0.30"]


# -------------------------------------------------------------------------------------------------- invariance

INV_LABELS = ["conv1", "conv2", "fc"]


def _grid() -> pd.DataFrame:
    rows = []
    for n, (ref, ev, metric) in enumerate((("pretrained", "finetuned", "stir"), ("finetuned", "pretrained", "stir"),
                                           ("pretrained", "pretrained", "stir"), ("pretrained", "finetuned", "cka"),
                                           ("pretrained", "finetuned", "noise"))):
        for i in (2, 0, 1):  # out of depth order
            for j in range(3):
                rows.append({"reference": ref, "evaluated": ev, "metric": metric, "value": 0.05 * n + 0.3 * i + 0.1 * j,
                             "ref_index": i, "eval_index": j, "ref_label": INV_LABELS[i], "eval_label": INV_LABELS[j],
                             "estimator": "unbiased", "steps": 7, "images": 12})
    return pd.DataFrame(rows)


def test_grid_heatmaps_a_panel_per_grid():
    fig = invp.grid_heatmaps(_grid())
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["STIR(ft_j | pt_i)", "STIR(pt_j | ft_i)", "STIR(pt_j | pt_i)",
                                                 "CKA(pt_i, ft_j)  [plain]", "noise floor of ft_j  [0 steps]"]
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 5 + 1  # 5 panels on a 2 x 4 grid, the colour bar
    for n, ax in enumerate(panels):
        np.testing.assert_allclose(_image(ax), [[0.05 * n + 0.3 * i + 0.1 * j for j in range(3)] for i in range(3)])
        assert _ticks(ax.get_xticklabels()) == INV_LABELS == _ticks(ax.get_yticklabels())
        assert ax.images[0].get_clim() == (0.0, 1.0)
    assert panels[1].get_xlabel() == "pt layer j (evaluated)" and panels[1].get_ylabel() == "ft layer i (inverted)"
    assert _texts(panels[0])[:3] == ["0.00", "0.10", "0.20"]
    assert _colourbar(fig).get_ylabel() == "linear CKA"
    assert fig.get_suptitle() == "STIR grids (unbiased linear CKA over 12 images, 7 inversion steps)"


def test_grid_heatmaps_leave_out_a_metric_the_grid_lacks():
    """A grid without the plain-CKA rows (e.g. run with cka off) draws the other panels instead of failing."""
    grid = _grid()
    fig = invp.grid_heatmaps(grid[grid["metric"] != "cka"])
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == ["STIR(ft_j | pt_i)", "STIR(pt_j | ft_i)", "STIR(pt_j | pt_i)", "noise floor of ft_j  [0 steps]"]


def test_layer_curves_series_compression_and_losses():
    summary = pd.DataFrame({"label": ["fc", "conv1", "conv2"], "index": [2, 0, 1], "retention": [0.5, 0.9, 0.7],
                            "reverse": [0.4, 0.8, 0.6], "ceiling": [0.95, 0.99, 0.97], "noise": [0.1, 0.2, 0.15],
                            "scratch": [0.3, 0.6, 0.5], "transfer": [0.2, 0.3, 0.2], "best_index": [2, 0, 0]})
    inversions = pd.DataFrame({"model": ["pretrained"] * 3 + ["finetuned"] * 3, "index": [0, 1, 2] * 2,
                               "label": INV_LABELS * 2, "loss_mean": [0.1, 0.2, 0.3, 0.15, 0.25, 0.35],
                               "initial_loss_mean": [1.0, 1.1, 1.2, 1.05, 1.15, 1.25]})
    fig = invp.layer_curves(summary, inversions)
    curves, compression, losses = fig.axes
    got = {line.get_label(): line.get_ydata().tolist() for line in curves.lines if not line.get_label().startswith("_")}
    assert got == {"STIR(pt_l | pt_l) ceiling": [0.99, 0.97, 0.95], "retention STIR(ft_l | pt_l)": [0.9, 0.7, 0.5],
                   "reverse STIR(pt_l | ft_l)": [0.8, 0.6, 0.4], "STIR(scratch_l | pt_l)": [0.6, 0.5, 0.3],
                   "transfer = retention - scratch": [0.3, 0.2, 0.2], "noise floor of ft_l": [0.2, 0.15, 0.1]}
    assert all(line.get_xdata().tolist() == [0, 1, 2] for line in curves.lines[:-1])
    for ax in (curves, compression, losses):
        assert _ticks(ax.get_xticklabels()) == INV_LABELS
    assert _ticks(compression.get_yticklabels()) == INV_LABELS
    best = {line.get_label(): line.get_ydata().tolist() for line in compression.lines}
    assert best == {"same layer": [0, 1, 2], "argmax_j STIR(ft_j | pt_i)": [0, 0, 2]}
    assert (compression.get_xlabel(), compression.get_ylabel()) == ("pretrained layer i", "best-matching layer j")
    loss = {line.get_label(): line.get_ydata().tolist() for line in losses.lines}
    assert loss == {"pt final": [0.1, 0.2, 0.3], "pt noise": [1.0, 1.1, 1.2],
                    "ft final": [0.15, 0.25, 0.35], "ft noise": [1.05, 1.15, 1.25]}
    assert losses.get_yscale() == "log"
    colour = {line.get_label(): to_rgb(line.get_color()) for line in losses.lines}
    assert colour["pt final"] == colour["pt noise"] == to_rgb(color_of("pretrained"))
    assert colour["ft final"] == colour["ft noise"] == to_rgb(color_of("finetuned"))
    assert {to_rgb(line.get_color()) for line in compression.lines[1:]} == {to_rgb(color_of("finetuned"))}
    assert all(line.get_linestyle() != "None" for line in curves.lines)  # three layers: lines
    assert [ax.get_title() for ax in fig.axes] == ["shared invariances per layer",
                                                   "compression: where pt_i's invariances sit",
                                                   "inversion matching loss (mean over images)"]
    assert len(invp.layer_curves(summary).axes) == 2  # no inversions: no loss panel


def test_inversion_panel_originals_then_each_layer():
    originals = torch.linspace(-0.5, 1.5, 3 * 4 * 4).reshape(3, 1, 4, 4)
    examples = {(m, lab): torch.full((3, 1, 4, 4), 0.1 * (k + 1) + 0.3 * mi)
                for mi, m in enumerate(("pretrained", "finetuned")) for k, lab in enumerate(("conv1", "fc"))}
    fig = invp.inversion_panel(originals, examples, title="T")
    subs = fig.subfigs
    assert [s.get_suptitle() for s in subs] == ["inverted through pretrained", "inverted through finetuned"]
    assert fig.get_suptitle() == "T"
    for mi, sub in enumerate(subs):
        axes = np.array(sub.axes).reshape(3, 3)  # original, conv1, fc  x  3 images
        assert [ax.get_ylabel() for ax in axes[:, 0]] == ["original", "conv1", "fc"]
        for c in range(3):
            np.testing.assert_allclose(_image(axes[0, c]), originals[c, 0].clamp(0, 1).numpy())
            for k in range(2):
                np.testing.assert_allclose(_image(axes[k + 1, c]), np.full((4, 4), 0.1 * (k + 1) + 0.3 * mi), rtol=1e-6)
        assert axes[0, 0].images[0].get_cmap().name == "gray"


# ------------------------------------------------------------------------------------------------------- tract


def test_tract_curves_mean_and_spread_per_panel(tmp_path, monkeypatch):
    drawn = []
    real = tractp.save_figure
    monkeypatch.setattr(tractp, "save_figure", lambda fig, path, **kw: drawn.append(fig) or real(fig, path, **kw))
    rows = []
    for opt, budget in (("sgd", 20), ("adam", 10)):
        for method, base in (("vanilla", 0.5), ("tract", 0.6)):
            for seed in range(2 if method == "vanilla" else 3):
                for epoch in (1, 2):
                    rows.append({"optimizer": opt, "budget": budget, "method": method, "seed": seed, "epoch": epoch,
                                 "test_acc": base + 0.1 * epoch + 0.01 * seed})
    curves = pd.DataFrame(rows)
    path = tractp.plot_curves(curves, tmp_path / "curves")
    assert path == tmp_path / "curves.png" and path.stat().st_size > 0
    (fig,) = drawn
    assert [ax.get_title() for ax in fig.axes] == ["ADAM, 10 epochs", "SGD, 20 epochs"]  # sorted panels
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("epoch", "test accuracy")
    lines = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
    assert set(lines) == {"vanilla (n=2)", "tract (n=3)"}
    assert lines["vanilla (n=2)"].get_xdata().tolist() == [1, 2]
    assert lines["vanilla (n=2)"].get_ydata().tolist() == pytest.approx([0.605, 0.705])
    assert lines["tract (n=3)"].get_ydata().tolist() == pytest.approx([0.71, 0.81])
    assert to_rgb(lines["tract (n=3)"].get_color()) == to_rgb(color_of("tract"))
    assert to_rgb(lines["vanilla (n=2)"].get_color()) == to_rgb(color_of("vanilla"))
    # two epochs: points with error bars (mean +- std over seeds), no connecting line and no band
    assert all(line.get_linestyle() == "None" for line in lines.values())
    bars = ax.collections[1].get_segments()  # tract: mean +- std over its 3 seeds (std 0.01)
    assert [tuple(seg[:, 1]) for seg in bars] == [pytest.approx((0.70, 0.72)), pytest.approx((0.80, 0.82))]
    assert fig.get_suptitle().startswith("TrAct (first layer")
    # three epochs: a line through the means and a band of mean +- std
    more = pd.concat([curves, curves[curves["epoch"] == 2].assign(epoch=3)])
    tractp.plot_curves(more, tmp_path / "more")
    ax = drawn[-1].axes[0]
    tract = next(line for line in ax.lines if line.get_label() == "tract (n=3)")
    assert tract.get_linestyle() == "-" and tract.get_xdata().tolist() == [1, 2, 3]
    band = ax.collections[1].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.70) and band.max() == pytest.approx(0.82)
