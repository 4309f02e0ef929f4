"""Criticality beyond the paper (issue 14): bootstrap intervals, differences with intervals, adaptive sampling,
criticality over training and under distribution shift.

Every check compares against something computed another way: per-image similarities from a plain forward pass of
a deep copy with the weights swapped in place, the normal interval of a mean, a fixed-N run's own prefix, each
checkpoint run alone, criticality of images corrupted before the call.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import layerlab.criticality as crit
from layerlab import load_data, load_model
from layerlab.criticality import intervals
from layerlab.errors import LayerlabError

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = "timm:resnet18?channels=8,16,32,64&stem_width=8&num_classes=10"
DATA = "digits?size=16"


class _Branchy(nn.Module):
    """conv -> (x + 0 * dead(x)) -> head: re-randomising ``dead`` cannot change the output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.dead = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = h + 0.0 * self.dead(h)
        return self.fc(h.mean((2, 3)))


def _branchy(seed: int = 0) -> nn.Module:
    """A model with confident outputs (large logits), so that swaps move them; fixed weights per seed."""
    torch.manual_seed(seed)
    m = _Branchy()
    with torch.no_grad():
        m.conv.weight.mul_(4.0)
        m.fc.weight.mul_(30.0)
    return m


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(240, 3, 8, 8, generator=g), torch.randint(0, 10, (240,), generator=g)


def _reference_per_image(model: nn.Module, fresh: nn.Module, layer: str, x: torch.Tensor) -> np.ndarray:
    """Per-image softmax cosine with the layer's weight and bias copied in place into a deep copy (numpy float64)."""
    swapped = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in ("weight", "bias"):
            getattr(swapped.get_submodule(layer), p).copy_(getattr(fresh.get_submodule(layer), p))
        a = torch.softmax(model.eval()(x).double(), -1).numpy()
        b = torch.softmax(swapped(x).double(), -1).numpy()
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ---------------------------------------------------------------------------------------------- intervals
def test_per_image_similarities_match_a_plain_forward(images):
    x, y = images
    model, fresh = _branchy(0), _branchy(1)
    table = crit.criticality({"m": model}, (x, y), fresh=lambda: copy.deepcopy(fresh), trials=1, batch_size=50)
    for layer in ("conv", "fc"):
        row = table[table["layer"] == layer].iloc[0]
        ref = _reference_per_image(model, fresh, layer, x)
        np.testing.assert_allclose(np.asarray(row["per_image"]), ref, atol=1e-6)
        assert row["criticality"] == pytest.approx(100 * (1 - ref.mean()), abs=1e-4)
        assert row["images"] == len(x)


def test_interval_contains_the_estimate_and_matches_the_normal_interval(images):
    x, y = images
    table = crit.criticality({"m": _branchy(0)}, (x, y), fresh=_Branchy, trials=1, batch_size=64)
    s = crit.summarize(table)
    assert ((s["ci_low"] <= s["criticality"]) & (s["criticality"] <= s["ci_high"])).all()
    for _, row in table[table["layer"] != "dead"].iterrows():  # one trial: the interval is the images' own
        v = 100 * (1 - np.asarray(row["per_image"]))
        half = 1.959964 * v.std(ddof=1) / math.sqrt(len(v))
        got = s.loc[s["layer"] == row["layer"]].iloc[0]
        assert (got["ci_high"] - got["ci_low"]) / 2 == pytest.approx(half, rel=0.15)


def test_interval_shrinks_with_more_images(images):
    x, y = images
    widths = []
    for n in (40, 240):
        s = crit.summarize(crit.criticality({"m": _branchy(0)}, (x[:n], y[:n]), fresh=_Branchy, trials=2,
                                            batch_size=40))
        widths.append((s["ci_high"] - s["ci_low"]).set_axis(s["layer"]))
    assert (widths[1].drop("dead") < widths[0].drop("dead")).all()


def test_a_layer_that_cannot_change_the_output_gets_zero_and_stops_early(images):
    x, y = images
    table = crit.criticality({"m": _branchy(0)}, (x, y), fresh=_Branchy, trials=3, batch_size=32,
                             precision=0.5)
    s = crit.summarize(table).set_index("layer")
    assert s.loc["dead", "criticality"] == pytest.approx(0.0, abs=1e-9)
    assert s.loc["dead", "ci_low"] == pytest.approx(0.0, abs=1e-9)
    assert s.loc["dead", "ci_high"] == pytest.approx(0.0, abs=1e-9)
    dead = table[table["layer"] == "dead"]
    assert (dead["images"] == intervals.MIN_IMAGES).all()  # the first check: stops after one batch of 32
    assert (table["images"] <= len(x)).all()
    assert (table.loc[table["layer"] != "dead", "images"] > intervals.MIN_IMAGES).all()


def test_adaptive_rows_are_a_prefix_of_the_fixed_run(images):
    x, y = images
    kw = dict(fresh=_Branchy, trials=2, batch_size=16)
    fixed = crit.criticality({"m": _branchy(0)}, (x, y), **kw)
    adaptive = crit.criticality({"m": _branchy(0)}, (x, y), precision=2.0, **kw)
    assert adaptive["images"].sum() < fixed["images"].sum()
    for (_, a), (_, f) in zip(adaptive.iterrows(), fixed.iterrows()):
        n = a["images"]
        np.testing.assert_allclose(a["per_image"], np.asarray(f["per_image"])[:n], atol=1e-12)
        stop = intervals.halfwidth(float(np.sum(a["per_image"])), float(np.sum(np.square(a["per_image"]))), n)
        assert n == len(x) or stop < 2.0  # stopped only once narrow enough
        if n > 16:  # ... and not a batch earlier
            before = np.asarray(a["per_image"])[: n - 16]
            assert intervals.halfwidth(before.sum(), np.square(before).sum(), len(before)) >= 2.0 or len(before) < 32
    naive = crit.criticality({"m": _branchy(0)}, (x, y), precision=2.0, naive=True, **kw)
    assert naive["images"].tolist() == adaptive["images"].tolist()


def test_precision_is_validated(images):
    with pytest.raises(LayerlabError, match="precision"):
        crit.criticality({"m": _branchy(0)}, images, fresh=_Branchy, precision=0)


def test_differences_of_a_model_with_itself_and_with_seeds(images):
    x, y = images
    a, b = _branchy(0), _branchy(1)
    table = crit.criticality({"base": a, "same": copy.deepcopy(a), "other": b}, (x, y),
                             fresh={"base": _Branchy, "same": _Branchy, "other": _Branchy},
                             trials=2, batch_size=60)
    d = crit.differences(table, "base").set_index(["model", "layer"])
    same = d.loc["same"]
    assert (same["difference"].abs() < 1e-9).all() and not same["distinguishable"].any()
    assert (same["ci_low"].abs() < 1e-9).all() and (same["ci_high"].abs() < 1e-9).all()  # paired images and trials
    other = d.loc["other"].drop("dead")
    assert ((other["ci_low"] <= other["difference"]) & (other["difference"] <= other["ci_high"])).all()
    assert (other["distinguishable"] == ((other["ci_low"] > 0) | (other["ci_high"] < 0))).all()
    # two methods of two seeds each: the seed spread enters the interval
    seeds = crit.criticality({"b0": a, "b1": _branchy(2), "o0": b, "o1": _branchy(3)}, (x, y),
                             fresh={k: _Branchy for k in ("b0", "b1", "o0", "o1")}, trials=2, batch_size=60)
    g = crit.differences(seeds, "base", groups={"b0": "base", "b1": "base", "o0": "other", "o1": "other"})
    assert set(g["model"]) == {"other"} and (g["seeds"] == 2).all()
    single = crit.differences(seeds[seeds["model"].isin(["b0", "o0"])], "b0")
    width = lambda f: (f["ci_high"] - f["ci_low"]).to_numpy()
    assert width(g.set_index("layer").drop("dead")).mean() > width(single.set_index("layer").drop("dead")).mean()
    with pytest.raises(LayerlabError, match="baseline"):
        crit.differences(table, "nope")


def test_tables_without_per_image_still_summarise(images):
    table = crit.criticality({"m": _branchy(0)}, images, fresh=_Branchy, trials=2, batch_size=60)
    s = crit.summarize(table.drop(columns=["per_image"]))
    assert s["ci_low"].isna().all() and s["criticality"].notna().all()


# ------------------------------------------------------------------------------------------ over training
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from layerlab.train import recipe, train

    out = tmp_path_factory.mktemp("over") / "run"
    return train(SPEC, DATA, recipe("baseline", epochs=2, batch_size=64), out, train_n=192, progress=False)


def test_over_training_equals_each_checkpoint_alone(run, tmp_path):
    data = load_data(DATA, "test", images=48, seed=0)
    layers = ["conv1", "layer2.0.conv1", "fc"]
    table = crit.criticality(run=run, data=data, over_training=True, layers=layers, trials=2, store=tmp_path)
    assert sorted(table["epoch"].unique().tolist()) == [0, 1, 2]
    assert (table["model"] == run.name).all() and (table["mode"] == "randomize").all()
    assert len(table) == 3 * len(layers) * 2
    for epoch in (0, 2):
        alone = crit.criticality({run.name: f"file:{run}/checkpoints/epoch_{epoch:04d}.pt"}, data, layers=layers,
                                 trials=2)
        mine = table[table["epoch"] == epoch].reset_index(drop=True)
        np.testing.assert_allclose(mine["criticality"], alone["criticality"], atol=1e-9)
    again = crit.criticality(run=run, data=data, over_training=True, layers=layers, trials=2, store=tmp_path)
    pd.testing.assert_frame_equal(again.drop(columns=["per_image"]), table.drop(columns=["per_image"]))
    some = crit.criticality(run=run, data=data, over_training=True, layers=["fc"], trials=1, checkpoint=[1])
    assert some["epoch"].tolist() == [1]
    settle = crit.settling(crit.summarize(table), threshold=50.0)
    assert len(settle) == len(layers) and set(settle["final"]) <= {"critical", "auxiliary"}
    assert settle["settled_epoch"].between(0, 2).all()


def test_over_training_refuses_what_it_cannot_do(run):
    data = load_data(DATA, "test", images=16, seed=0)
    with pytest.raises(LayerlabError, match="reinit"):
        crit.criticality(run=run, data=data, over_training=True, mode=["randomize", "reinit"])
    with pytest.raises(LayerlabError, match="run"):
        crit.criticality(_branchy(0), torch.rand(8, 3, 8, 8), fresh=_Branchy, over_training=True)
    with pytest.raises(LayerlabError, match="epoch"):
        crit.criticality(run=run, data=data, over_training=True, checkpoint=[7])


def test_settling_by_hand():
    rows = [("a", "l1", e, c) for e, c in zip([0, 1, 2, 3], [10, 60, 20, 70])] + \
           [("a", "l2", e, c) for e, c in zip([0, 1, 2, 3], [90, 80, 30, 20])] + \
           [("a", "l3", e, c) for e, c in zip([0, 1, 2, 3], [5, 5, 5, 5])]
    s = pd.DataFrame(rows, columns=["model", "layer", "epoch", "criticality"]).assign(mode="randomize", label=lambda f: f["layer"])
    got = crit.settling(s, 50.0).set_index("layer")
    assert got.loc["l1", ["final", "settled_epoch"]].tolist() == ["critical", 3]
    assert got.loc["l2", ["final", "settled_epoch"]].tolist() == ["auxiliary", 2]
    assert got.loc["l3", ["final", "settled_epoch"]].tolist() == ["auxiliary", 0]


# --------------------------------------------------------------------------------------- under shift
def test_shift_rows_equal_criticality_of_images_corrupted_beforehand(images):
    from layerlab.shift import corrupt, parse_shift

    x, y = images
    kw = dict(fresh=_Branchy, trials=2, batch_size=48)
    table = crit.criticality({"m": _branchy(0)}, (x, y), shift=["gaussian-noise:3", "contrast:2"], seed=4, **kw)
    assert table["shift"].drop_duplicates().tolist() == ["clean", "gaussian-noise:3", "contrast:2"]
    clean = crit.criticality({"m": _branchy(0)}, (x, y), seed=4, **kw)
    mine = table[table["shift"] == "clean"].reset_index(drop=True)
    np.testing.assert_allclose(mine["criticality"], clean["criticality"], atol=1e-12)
    for name in ("gaussian-noise:3", "contrast:2"):
        xs = corrupt(x, parse_shift(name), seed=4, positions=torch.arange(len(x)))
        alone = crit.criticality({"m": _branchy(0)}, (xs, y), seed=4, **kw)
        got = table[table["shift"] == name].reset_index(drop=True)
        np.testing.assert_allclose(got["criticality"], alone["criticality"], atol=1e-9)
    zero = crit.criticality({"m": _branchy(0)}, (x, y), shift="contrast:0", seed=4, **kw)
    assert zero["shift"].unique().tolist() == ["clean"]  # NAME:0 is the clean images


def test_pgd_shift_attacks_each_model_and_lowers_accuracy(images):
    x, y = images
    model = _branchy(0)
    with torch.no_grad():  # make the labels the model's own: accuracy 1 on clean images
        y = model(x).argmax(-1)
    table = crit.criticality({"m": model}, (x, y), fresh=_Branchy, trials=1, batch_size=80,
                             shift="pgd-linf:8", layers=["fc"])
    base = table.set_index("shift")["base_accuracy"]
    assert base["clean"] == 1.0 and base["pgd-linf:8"] < 0.9


def test_shift_tables_and_critical_sets(images):
    x, y = images
    table = crit.criticality({"m": _branchy(0)}, (x, y), fresh=_Branchy, trials=1, batch_size=80,
                             shift="gaussian-noise:5")
    s = crit.summarize(table)
    sets = crit.critical_sets(s, threshold=0.0)
    clean = sets[sets["shift"] == "clean"].iloc[0]
    assert clean["jaccard"] == 1.0 and clean["critical"] == 3
    with pytest.raises(LayerlabError, match="shift|unknown|gaussian"):
        crit.criticality({"m": _branchy(0)}, (x, y), fresh=_Branchy, shift="gausian-noise:3")


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_over_training_shift_precision_and_results(run, tmp_path, monkeypatch, capsys):
    from helpers import run_cli

    out = tmp_path / "epochs"
    code, stdout, err = run_cli(monkeypatch, capsys, "criticality", "--run", str(run), "--over-training", "--data", DATA,
                                "--images", "40", "--trials", "2", "--layers", "conv1,fc", "--precision", "2",
                                "--batch-size", "8", "--out", str(out), "--no-progress")
    assert code == 0, err
    assert "settles" in stdout and "adaptive sampling" in stdout
    settle = pd.read_csv(out / "criticality_settling.csv")
    assert set(settle["label"]) == {"conv1", "fc"}
    assert list(out.glob("**/criticality_over_training*.png"))
    summary = pd.read_csv(out / "criticality_summary.csv")
    assert {"ci_low", "ci_high", "images", "epoch"} <= set(summary.columns) and summary["epoch"].nunique() == 3

    shifted = tmp_path / "shift"
    code, stdout, err = run_cli(monkeypatch, capsys, "criticality", f"file:{run}/final.pt", "--data", DATA, "--images", "40",
                                "--trials", "2", "--layers", "conv1,fc", "--shift", "gaussian-noise:2,contrast:4",
                                "--out", str(shifted), "--no-progress")
    assert code == 0, err
    sets = pd.read_csv(shifted / "criticality_critical_sets.csv")
    assert sets["shift"].tolist() == ["clean", "gaussian-noise:2", "contrast:4"]
    assert "under shift" in stdout
    code, stdout, err = run_cli(monkeypatch, capsys, "results", str(shifted))
    assert code == 0 and "criticality_critical_sets" in stdout and "criticality_summary" in stdout
    code, stdout, err = run_cli(monkeypatch, capsys, "results", str(shifted), "--sql",
                                "SELECT shift, count(*) AS n FROM criticality_summary GROUP BY shift ORDER BY shift")
    assert code == 0 and "gaussian-noise:2" in stdout


@pytest.mark.parametrize("args, message", [
    (["--shift", "gausian-noise:3"], "gaussian-noise"),
    (["--shift", "contrast:9"], "severity"),
    (["--precision", "0"], "precision"),
    (["--group-by", "recipe"], "--attrs"),
])
def test_cli_usage_errors_are_one_line(args, message, run, tmp_path, monkeypatch, capsys):
    from helpers import run_cli

    code, stdout, err = run_cli(monkeypatch, capsys, "criticality", f"file:{run}/final.pt", "--data", DATA,
                                "--out", str(tmp_path / "o"), *args)
    assert code != 0 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o" / "shards").exists()  # refused before any work
