"""The criticality figures of issue 14 (marked differences, over training, under shift, critical sets), drawn from
synthetic tables: no model is trained or run."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from layerlab.criticality.tables import critical_sets, settling
from layerlab.errors import LayerlabError
from layerlab.plots import criticality as plots
from layerlab.plots import criticality_studies as studies

LAYERS = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2", "fc"]
LABELS = ["stem", "b1.c1", "b1.c2", "b2.c1", "b2.c2", "head"]
MODELS = ("baseline", "adv")
SHIFTS = ["clean"] + [f"gaussian-noise:{s}" for s in range(1, 6)] + ["pgd-linf:2"]
EPOCHS = [0, 1, 2, 4, 8]


def _row(model: str, k: int, **extra) -> dict:
    return {"model": model, "layer": LAYERS[k], "label": LABELS[k], "kind": "conv", "index": k, "units": 1,
            "mode": "randomize", "epoch": pd.NA, "shift": "clean", "std": 1.0, "base_accuracy": 0.9, **extra}


def _shift_summary() -> pd.DataFrame:
    """2 models x 6 layers x 7 shifts; layer k of model m sits at 10 k + 5 m + severity points."""
    rows = []
    for m, model in enumerate(MODELS):
        for s in SHIFTS:
            sev = 0 if s == "clean" else int(s.rsplit(":", 1)[1])
            rows += [_row(model, k, shift=s, criticality=float(10 * k + 5 * m + sev)) for k in range(len(LAYERS))]
    return pd.DataFrame(rows)


def _epoch_summary() -> pd.DataFrame:
    """2 models x 6 layers x epochs 0-8; layer k crosses 50 % at epoch k - 1 in model 0 and stays below in 1."""
    rows = []
    for m, model in enumerate(MODELS):
        for e in EPOCHS:
            rows += [_row(model, k, epoch=e, criticality=float(80 if m == 0 and e >= k - 1 else 20 + k))
                     for k in range(len(LAYERS))]
    frame = pd.DataFrame(rows)
    frame["epoch"] = frame["epoch"].astype("Int64")
    return frame


def _clean_summary() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    return pd.DataFrame([_row(m, k, criticality=float(rng.uniform(0, 100))) for m in ("baseline", "a", "b", "c")
                         for k in range(len(LAYERS))])


def _differences(distinguishable: list[bool]) -> pd.DataFrame:
    """Methods a (1 seed) and b (3 seeds) vs the baseline; the distinguishable flags in (method, layer) order."""
    rows = []
    for n, (method, seeds) in enumerate((("a", 1), ("b", 3))):
        for k in range(len(LAYERS)):
            d = float(k - 2 * n)
            rows.append(_row(method, k, difference=d, ci_low=d - 1, ci_high=d + 1, seeds=seeds,
                             distinguishable=distinguishable[n * len(LAYERS) + k]))
    frame = pd.DataFrame(rows).drop(columns=["std", "base_accuracy"])
    shifted = frame.assign(shift="gaussian-noise:3", distinguishable=True)  # never drawn: not the clean models
    return pd.concat([frame, shifted], ignore_index=True)


def _dots(fig) -> int:
    return sum(len(c.get_offsets()) for ax in fig.axes for c in ax.collections if c.get_gid() == "distinguishable")


def _ticks(ax, axis: str = "y") -> list[str]:
    return [t.get_text() for t in (ax.get_yticklabels() if axis == "y" else ax.get_xticklabels())]


# ------------------------------------------------------------------------------------ the difference figure


def test_old_difference_call_keeps_its_matrix():
    summary = _clean_summary()
    shown = np.asarray(plots.diff_to_baseline(summary, "baseline").axes[0].images[0].get_array())
    pivot = summary.pivot(index="layer", columns="model", values="criticality").loc[LAYERS]
    assert np.allclose(shown, pivot[["a", "b", "c"]].sub(pivot["baseline"], axis=0).to_numpy())
    assert _dots(plots.diff_to_baseline(summary, "baseline")) == 0


@pytest.mark.parametrize("flags", [[False] * 12, [True] * 12, [k % 3 == 0 for k in range(12)]])
def test_marks_count_the_distinguishable_cells(flags):
    fig = plots.diff_to_baseline(_clean_summary(), "baseline", differences=_differences(flags))
    ax = fig.axes[0]
    assert _dots(fig) == sum(flags)
    assert f"({sum(flags)} of 12 cells)" in ax.get_title() and "95 % interval excludes 0" in ax.get_title()
    assert np.allclose(np.asarray(ax.images[0].get_array()), [[k, k - 2] for k in range(len(LAYERS))])
    assert _ticks(ax, "x") == ["a", "b (3 seeds)"] and _ticks(ax) == LABELS


def test_marks_sit_on_the_distinguishable_cells():
    flags = [False] * 12
    flags[7] = True  # method b, layer 1
    dots = plots.diff_to_baseline(_clean_summary(), differences=_differences(flags)).axes[0].collections[0]
    (x, y), = dots.get_offsets()
    assert (round(x), round(y)) == (1, 1)


def test_save_all_draws_the_marked_difference_and_ignores_studies(tmp_path, monkeypatch):
    clean = _clean_summary()
    mixed = pd.concat([clean, _shift_summary().query("shift != 'clean'"), _epoch_summary()], ignore_index=True)
    drawn: dict[str, object] = {}
    heatmap, diff = plots.heatmap, plots.diff_to_baseline
    monkeypatch.setattr(plots, "heatmap", lambda summary, **kw: drawn.setdefault("heatmap", heatmap(summary, **kw)))
    monkeypatch.setattr(plots, "diff_to_baseline",
                        lambda *a, **kw: drawn.setdefault("diff", diff(*a, **kw)))
    paths = plots.save_all(mixed, tmp_path, differences=_differences([True] * 12), formats=("png",))
    assert {p.name for p in paths} == {"criticality_heatmap.png", "criticality_std.png", "criticality_diff.png",
                                        "criticality_vs_accuracy.png"}
    shown = drawn["heatmap"].axes[0].images[0].get_array()
    assert np.allclose(shown, heatmap(clean).axes[0].images[0].get_array())
    assert _dots(drawn["diff"]) == 12
    assert plots.clean_final(mixed).shape == clean.shape


def test_save_all_on_old_summaries_is_unchanged(tmp_path):
    old = _clean_summary().drop(columns=["shift", "epoch"])
    assert plots.clean_final(old) is not None and len(plots.clean_final(old)) == len(old)
    names = {p.name for p in plots.save_all(old, tmp_path, formats=("png",))}
    assert names == {"criticality_heatmap.png", "criticality_std.png", "criticality_diff.png",
                     "criticality_vs_accuracy.png"}
    assert plots.save_all(_epoch_summary(), tmp_path / "over", formats=("png",)) == []


def test_difference_input_errors():
    with pytest.raises(LayerlabError, match=r"lacks columns \['distinguishable'\]"):
        plots.diff_to_baseline(_clean_summary(), differences=_differences([True] * 12).drop(columns="distinguishable"))
    with pytest.raises(LayerlabError, match=r"models \['zzz'\] are not in the differences"):
        plots.diff_to_baseline(_clean_summary(), models=["zzz"], differences=_differences([True] * 12))
    shifted_only = _differences([True] * 12).query("shift != 'clean'")
    with pytest.raises(LayerlabError, match="no clean final-model rows"):
        plots.diff_to_baseline(_clean_summary(), differences=shifted_only)


# ------------------------------------------------------------------------------------ over training


def test_over_training_heatmap_panels_and_cells():
    summary = _epoch_summary()
    fig = studies.over_training_heatmap(summary)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 and [ax.get_title() for ax in panels] == list(MODELS)
    assert _ticks(panels[0]) == LABELS and _ticks(panels[0], "x") == [str(e) for e in EPOCHS]
    cells = np.asarray(panels[1].images[0].get_array())
    assert cells.shape == (6, 5) and np.allclose(cells[:, 0], [20 + k for k in range(6)])
    assert len([ax for ax in studies.over_training_heatmap(summary, "adv").axes if ax.images]) == 1


def test_over_training_ignores_shifted_rows():
    summary = _epoch_summary()
    noisy = summary.assign(shift="gaussian-noise:1", criticality=999.0)
    fig = studies.over_training_heatmap(pd.concat([summary, noisy], ignore_index=True), "baseline")
    assert np.nanmax(np.asarray(fig.axes[0].images[0].get_array())) == 80


def test_settling_outlines_the_settled_cells():
    summary = _epoch_summary()
    table = settling(summary)
    fig = studies.over_training_heatmap(summary, "baseline", settling=table)
    boxes = [p for p in fig.axes[0].patches if str(p.get_gid()).startswith("settled:")]
    assert len(boxes) == len(table[table["model"] == "baseline"]) == 6
    # layer k settles critical at epoch max(k - 1, 0): its box sits on that epoch's column
    where = sorted((round(p.get_y() + 0.46), round(p.get_x() + 0.46)) for p in boxes)
    assert where == [(k, EPOCHS.index(next(e for e in EPOCHS if e >= k - 1))) for k in range(6)]
    assert {p.get_gid() for p in boxes} == {"settled:critical"}
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {"settles: critical", "settles: auxiliary"}
    assert not studies.over_training_heatmap(summary, "baseline").legends


def test_over_training_input_errors():
    with pytest.raises(LayerlabError, match="lacks columns"):
        studies.over_training_heatmap(_epoch_summary().drop(columns="epoch"))
    with pytest.raises(LayerlabError, match="no randomize rows on clean images with an epoch"):
        studies.over_training_heatmap(_clean_summary())
    with pytest.raises(LayerlabError, match="model 'nope' is not in the table"):
        studies.over_training_heatmap(_epoch_summary(), "nope")
    with pytest.raises(LayerlabError, match=r"settling: the table lacks columns \['final'\]"):
        studies.over_training_heatmap(_epoch_summary(), settling=settling(_epoch_summary()).drop(columns="final"))


# ------------------------------------------------------------------------------------ under shift


def test_shift_heatmap_has_a_panel_per_corruption():
    fig = studies.shift_heatmap(_shift_summary(), "adv")
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["gaussian-noise", "pgd-linf"]
    assert _ticks(panels[0], "x") == ["0", "1", "2", "3", "4", "5"] and _ticks(panels[1], "x") == ["0", "2"]
    assert _ticks(panels[0]) == LABELS
    noise = np.asarray(panels[0].images[0].get_array())
    assert np.allclose(noise, [[10 * k + 5 + sev for sev in range(6)] for k in range(6)])
    assert panels[1].get_xlabel().startswith("eps")


def test_shift_heatmap_grid_over_models():
    panels = [ax for ax in studies.shift_heatmap(_shift_summary()).axes if ax.images]
    assert len(panels) == 4 and [panels[0].get_ylabel(), panels[2].get_ylabel()] == list(MODELS)


def test_shift_input_errors():
    with pytest.raises(LayerlabError, match="only clean rows"):
        studies.shift_heatmap(_clean_summary())
    with pytest.raises(LayerlabError, match="model 'nope' is not in the table"):
        studies.shift_heatmap(_shift_summary(), "nope")
    with pytest.raises(LayerlabError, match="neither 'clean' nor NAME:SEVERITY"):
        studies.shift_heatmap(_shift_summary().assign(shift="fog"))
    with pytest.raises(LayerlabError, match=r"lacks columns \['shift'\]"):
        studies.shift_heatmap(_clean_summary().drop(columns="shift"))


def test_parse_shift_splits_at_the_last_colon():
    assert studies.parse_shift("clean") == (None, 0.0)
    assert studies.parse_shift("pgd-linf:8") == ("pgd-linf", 8.0)
    assert studies.parse_shift("a:b:2.5") == ("a:b", 2.5)


def test_critical_set_figure_annotates_gains_and_losses():
    summary = _shift_summary()  # at 50 %: adv's clean set is {head} (55); b2.c2 (45) joins from noise severity 5
    summary.loc[(summary["model"] == "adv") & (summary["shift"] == "pgd-linf:2") & (summary["label"] == "head"),
                "criticality"] = 0.0
    sets = critical_sets(summary)
    fig = studies.critical_set_figure(sets)
    assert len(fig.axes) == 2
    ax = fig.axes[1]
    assert _ticks(ax, "x") == SHIFTS[1:]
    heights = [b.get_height() for b in ax.patches]
    want = sets[(sets["model"] == "adv") & (sets["shift"] != "clean")]["jaccard"].tolist()
    assert np.allclose(heights, want)
    notes = [t.get_text() for t in ax.texts]
    assert notes[-1] == "+0 \u22121" and len(notes) == len(SHIFTS) - 1
    assert notes[4] == "+1 \u22120" and "clean: 1 critical" in ax.get_title()  # gaussian-noise:5 gains b2.c2


def test_critical_set_input_errors():
    with pytest.raises(LayerlabError, match=r"lacks columns \['jaccard'\]"):
        studies.critical_set_figure(critical_sets(_shift_summary()).drop(columns="jaccard"))
    with pytest.raises(LayerlabError, match="no shifted rows"):
        studies.critical_set_figure(critical_sets(_shift_summary().query("shift == 'clean'")))


# ------------------------------------------------------------------------------------ save_studies


def test_save_studies_writes_what_the_tables_support(tmp_path):
    def names(paths):
        return sorted(p.name for p in paths)

    shift = studies.save_studies(_shift_summary(), tmp_path / "shift")
    assert names(shift) == ["criticality_critical_sets.png", "criticality_shift_adv.png",
                            "criticality_shift_baseline.png"]
    assert all(p.stat().st_size > 0 for p in shift)
    one = _epoch_summary().query("model == 'adv'")
    over = studies.save_studies(one, tmp_path / "over", settling=settling(one), formats=("png", "svg"))
    assert names(over) == ["criticality_over_training.png", "criticality_over_training.svg"]
    assert names(studies.save_studies(_epoch_summary(), tmp_path / "two")) == [
        "criticality_over_training_adv.png", "criticality_over_training_baseline.png"]
    assert studies.save_studies(_clean_summary(), tmp_path / "none") == []
    assert studies.save_studies(_epoch_summary().query("epoch == 4"), tmp_path / "single") == []
    assert not (tmp_path / "none").exists()


def test_tick_labels_of_long_names_stay_distinct():
    """Two specs that differ only in the middle were cut to the same 'head...tail' tick label."""
    from layerlab.plots.criticality import short_labels

    a = "file:/very/long/path/to/zoo/run-one/checkpoints/final.pt"
    b = "file:/very/long/path/to/zoo/run-two/checkpoints/final.pt"
    labels = short_labels([a, b, "baseline"])
    assert len(set(labels)) == 3 and labels[2] == "baseline" and all(len(x) < len(a) for x in labels[:2])
    assert short_labels([a, a]) == [short_labels([a])[0]] * 2  # the same name twice is one label, not widened
