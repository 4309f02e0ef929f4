"""Issue 16, a CLI that teaches: a re-run says what it skips before the work ("5 of 8 criticality jobs already
done (in OUT); running 3"), and a progress bar's total is the whole call's from the start, not grown model by
model."""
from __future__ import annotations

import json
import logging

import pytest
import torch

import layerlab.criticality as crit
from helpers import run_cli
from layerlab import load_model, save_checkpoint
from layerlab.criticality import driver, module
from layerlab.store import Store, resumed

SPEC = "timm:resnet18?channels=8,16,32,64&stem_width=8&num_classes=10"
DATA = "digits?size=16"
LAYERS = ["conv1", "fc"]

pytestmark = pytest.mark.usefixtures("one_thread")


class _Bar:
    """A stand-in progress bar that records every total it is given and every step."""

    def __init__(self, total: float) -> None:
        self.totals, self.steps, self.n = [total], [], 0.0

    @property
    def total(self) -> float:
        return self.totals[-1]

    @total.setter
    def total(self, value: float) -> None:
        self.totals.append(value)

    def update(self, n: float = 1) -> None:
        self.steps.append(n)
        self.n += n

    def close(self) -> None:
        pass


@pytest.fixture
def bars(monkeypatch) -> list[_Bar]:
    made: list[_Bar] = []

    def factory(total: int, enabled: bool, desc: str) -> _Bar:
        made.append(_Bar(total))
        return made[-1]

    monkeypatch.setattr(driver, "_progress", factory)
    monkeypatch.setattr(module, "_progress", factory)
    return made


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Two models saved as file: specs (fixed weights, so a re-run finds their shards)."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    out = {}
    for name in ("a", "b"):
        out[name] = f"file:{save_checkpoint(load_model(SPEC), folder / f'{name}.pt')}"
    return out


def test_resumed_says_what_is_skipped():
    assert resumed(90, 132, "out") == "90 of 132 jobs already done (in out); running 42"
    assert resumed(2, 9, "zoo", unit="models", state="already trained", doing="training") == \
        "2 of 9 models already trained (in zoo); training 7"
    assert resumed(0, 132, "out") is None  # a first run says nothing


def test_criticality_bar_total_is_the_whole_call_from_the_start(bars, checkpoints):
    """Two models x 2 layers x 2 trials = 8 jobs: the bar starts at 8 (it used to start at 0 and grow per model)."""
    table = crit.criticality(checkpoints, DATA, images=16, trials=2, layers=LAYERS, progress=True)
    (bar,) = bars
    assert bar.totals == [8] and bar.n == pytest.approx(8) and len(table) == 8


def test_criticality_rerun_says_what_it_skips(bars, checkpoints, tmp_path, caplog):
    store = Store(tmp_path)
    crit.criticality(checkpoints, DATA, images=16, trials=2, layers=LAYERS, store=store)
    for path in sorted(store.paths(crit.ANALYSIS))[:3]:
        path.unlink()
    bars.clear()
    with caplog.at_level(logging.INFO, logger="layerlab"):
        table = crit.criticality(checkpoints, DATA, images=16, trials=2, layers=LAYERS, store=store)
    assert [r.getMessage() for r in caplog.records if r.name == "layerlab"] == [
        f"5 of 8 criticality jobs already done (in {tmp_path}); running 3"]
    (bar,) = bars
    assert bar.totals == [8] and bar.steps[0] == 5 and bar.n == pytest.approx(8) and len(table) == 8


def test_criticality_cli_rerun_prints_the_line(checkpoints, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["criticality", f"a={checkpoints['a']}", f"b={checkpoints['b']}", "--data", DATA, "--images", "16",
            "--trials", "1", "--layers", "conv1,fc", "--out", str(out), "--no-figures", "--no-progress"]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "already done" not in err  # a first run says nothing
    next(iter(Store(out).paths(crit.ANALYSIS))).unlink()
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and f"3 of 4 criticality jobs already done (in {out}); running 1" in err.splitlines()


def test_module_criticality_bar_total_is_the_whole_call_from_the_start(bars, tmp_path):
    """Module criticality over two runs (each with its epoch-0 checkpoint): one bar of 2 x 2 units from the start."""
    specs = {}
    for name, shift in (("r1", 0.5), ("r2", 1.0)):
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"arch": SPEC, "data": DATA}))
        model = load_model(SPEC)
        save_checkpoint(model, run / "checkpoints" / "epoch_0000.pt", epoch=0)
        with torch.no_grad():
            model.fc.bias.add_(shift)
        specs[name] = f"file:{save_checkpoint(model, run / 'final.pt', epoch=1)}"
    table = crit.module_criticality(specs, DATA, images=16, layers=LAYERS, grid=2, draws=1, progress=True)
    (bar,) = bars
    assert bar.totals == [4] and bar.n == 4 and len(table) == 4


def test_generated_command_rerun_prints_the_line(tmp_path, monkeypatch, capsys):
    """A command generated from an analysis contract (the toy's) counts its finished jobs, one per model."""
    import toy_analysis  # noqa: F401
    from layerlab.cli import add_analysis_commands, app

    add_analysis_commands(app)
    out = tmp_path / "o"
    args = ["toy", SPEC, "another-spec", "--out", str(out), "--rows", "2"]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and "already done" not in err, err
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and f"2 of 2 toy jobs already done (in {out}); running 0" in err.splitlines()


def test_sweep_rerun_says_what_it_skips(tmp_path, caplog):
    from helpers import write
    from layerlab.sweep import load_sweep, run_sweep

    out = tmp_path / "out"
    sweep = write(tmp_path / "s.yaml", f"""
        name: toy
        plugins: [toy_analysis]
        models: {{m: "{SPEC}", n: "timm:resnet18?num_classes=10"}}
        data: digits
        analyses:
          toy: {{rows: 2}}
    """)
    with caplog.at_level(logging.INFO, logger="layerlab"):
        run_sweep(load_sweep(sweep), out, progress=False)
        assert not caplog.records
        next((out / "jobs" / "toy").iterdir()).unlink()  # one job's done marker
        run_sweep(load_sweep(sweep), out, progress=False)
    assert [r.getMessage() for r in caplog.records] == [f"1 of 2 sweep jobs already done (in {out}); running 1"]


def test_zoo_train_rerun_says_what_it_skips(tmp_path, caplog):
    from helpers import TINY_ZOO, write
    from layerlab.train import train_zoo

    zoo = write(tmp_path / "zoo.yaml", TINY_ZOO)
    out = tmp_path / "zoo"
    with caplog.at_level(logging.INFO, logger="layerlab"):
        train_zoo(zoo, out, only=["baseline"], progress=False)
        assert not caplog.records
        table = train_zoo(zoo, out, progress=False)
    assert [r.getMessage() for r in caplog.records] == [f"1 of 2 models already trained (in {out}); training 1"]
    assert sorted(table["model"]) == ["adam", "baseline"]


def test_train_rerun_of_a_finished_run_says_so(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["train", SPEC, "--data", "digits?size=8", "--out", str(out), "--epochs", "1", "--train-n", "64",
            "--checkpoints", "final"]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and "already trained" not in err, err
    code, out_text, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and f"{out} is already trained (it holds DONE): nothing to train; its metrics:" in err
    assert "final test accuracy" in out_text
