"""The analysis contract (issue 13): an analysis declared once is a sweep kind, a CLI command and a report
section; the API and a sweep write the same shards, so one folder never holds a row twice."""
from __future__ import annotations

import pytest

import toy_analysis  # noqa: F401  (registers the toy analysis through the contract, nothing else)
from helpers import run_cli, write
from layerlab import analysis as contract
from layerlab.errors import SpecError
from layerlab.store import Store

SPEC = "timm:resnet18?num_classes=10"


def test_toy_is_registered_through_the_contract_alone():
    assert "toy" in [a.name for a in contract.analyses()]
    from layerlab.sweep import JOB_KINDS, load_plugins

    load_plugins([])
    kind = JOB_KINDS.get("toy")
    assert kind.stores and kind.defaults == {"rows": 3, "scale": 1.0, "loud": False}


def test_toy_is_a_cli_command_with_options_from_its_config(monkeypatch, capsys, tmp_path):
    from layerlab.cli import add_analysis_commands, app

    add_analysis_commands(app)
    code, out, err = run_cli(monkeypatch, capsys, "toy", "--help")
    assert code == 0 and "--rows" in out and "--scale" in out and "--loud" in out and "Rows (units)" in out
    code, out, err = run_cli(monkeypatch, capsys, "toy", SPEC, "--out", str(tmp_path / "o"), "--rows", "2")
    assert code == 0, err
    assert sorted(Store(tmp_path / "o").read("toy")["unit"]) == [0, 1]
    code, _, err = run_cli(monkeypatch, capsys, "toy", SPEC, "--out", str(tmp_path / "o"), "--rows", "0")
    assert code == 2 and err.startswith("error: toy: rows must be >= 1")


def test_toy_is_a_report_section_with_its_declared_summary(tmp_path):
    from layerlab.report import collect, render

    toy_analysis.toy({"a": SPEC, "b": "x"}, "digits", store=Store(tmp_path))
    data = collect(tmp_path)
    section = next(a for a in data.analyses if a.name == "toy")
    assert list(section.summary.columns) == ["model", "toy total"] and len(section.table) == 6
    assert 'data-analysis="toy"' in render(data)


def test_toy_is_a_demo_step_before_the_report(tmp_path):
    from layerlab.demo import ORDER, demo_steps, run_demo

    steps = list(demo_steps())
    assert "toy" not in ORDER and steps.index("toy") == steps.index("report") - 1
    run_demo(tmp_path, steps=["toy"], progress=False)
    assert len(Store(tmp_path).read("toy")) == 6


def test_api_and_sweep_into_one_folder_count_no_row_twice(tmp_path):
    from layerlab.sweep import load_sweep, run_sweep

    out = tmp_path / "out"
    toy_analysis.toy({"m": SPEC}, "digits", store=Store(out), rows=3)  # the API first
    sweep = write(tmp_path / "s.yaml", f"""
        name: toy
        plugins: [toy_analysis]
        models: {{m: "{SPEC}"}}
        data: digits
        analyses:
          toy: {{rows: 4}}
    """)
    result = run_sweep(load_sweep(sweep), out, progress=False)
    assert result.count("done") == 1
    table = Store(out).read("toy")
    assert sorted(table["unit"]) == [0, 1, 2, 3]  # units 0-2 came from the API call and were not written again
    again = run_sweep(load_sweep(sweep), out, progress=False)
    assert again.count("cached") == 1 and len(Store(out).read("toy")) == 4


def test_a_bad_option_value_fails_before_any_work(tmp_path):
    with pytest.raises(SpecError, match="rows must be >= 1"):
        contract.run_job(contract.ANALYSES.get("toy"), {"rows": 0, "scale": 1.0, "model": SPEC, "data": "digits",
                                                         "name": "m", "key": "k"}, tmp_path, Store(tmp_path))
    assert not (tmp_path / "shards").exists()


def test_criticality_via_api_and_sweep_into_one_folder_counts_no_row_twice(tmp_path):
    """The real analysis: a direct call with store= and a sweep job write the same per-unit shards, so the second
    path computes nothing and the folder's table has each (model, layer, trial) once."""
    import layerlab as ll
    from helpers import TINY
    from layerlab.sweep import load_sweep, run_sweep

    out, data = tmp_path / "out", "digits?size=8"
    spec = f"file:{ll.save_checkpoint(ll.load_model(TINY), tmp_path / 'm.pt')}"  # fixed weights: a timm: spec
    options = {"trials": 2, "images": 8, "layers": ["conv1", "fc"]}      # draws new ones at every load
    direct = ll.criticality({"m": spec}, data, store=Store(out), progress=False, **options)
    sweep = write(tmp_path / "s.yaml", f"""
        name: crit
        models: {{m: "{spec}"}}
        data: "{data}"
        analyses:
          criticality: {{trials: 2, images: 8, layers: [conv1, fc]}}
    """)
    before = sorted(p.name for p in Store(out).paths("criticality"))
    assert run_sweep(load_sweep(sweep), out, progress=False).count("done") == 1
    assert sorted(p.name for p in Store(out).paths("criticality")) == before  # nothing new was written
    table = Store(out).read("criticality")
    assert len(table) == len(direct) == 4
    assert not table.duplicated(["model", "layer", "trial"]).any()
