"""The CLI's front door: --help everywhere, and bad input as one clear line with exit status 2."""
from __future__ import annotations

import sys

import pytest

from layerlab.cli import app, main


def _run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["layerlab", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def _commands(group, prefix=()):
    import typer.main

    click_group = typer.main.get_command(group)
    stack = [(click_group, list(prefix))]
    while stack:
        cmd, path = stack.pop()
        yield path
        for name, sub in getattr(cmd, "commands", {}).items():
            stack.append((sub, path + [name]))


def test_every_command_has_help(monkeypatch, capsys):
    paths = list(_commands(app))
    assert ["train"] in paths and ["zoo", "train"] in paths and ["demo"] in paths
    for path in paths:
        code, out, _ = _run(monkeypatch, capsys, *path, "--help")
        assert code == 0 and "Usage" in out, path


@pytest.mark.parametrize("args, match", [
    (["layers", "timm:not_a_model"], "timm has no model"),
    (["layers", "nosource"], "has no source"),
    (["train", "timm:resnet18", "--data", "cifar10:/no/such/dir", "--out", "{tmp}/r"], "does not exist"),
    (["train", "timm:resnet18", "--recipe", "fancy", "--out", "{tmp}/r"], "unknown recipe"),
    (["train", "timm:resnet18", "--set", "lr", "--out", "{tmp}/r"], "FIELD=VALUE"),
    (["results", "{tmp}/nothing"], "does not exist"),
    (["zoo", "train", "{tmp}/missing.yaml", "--out", "{tmp}/z"], "does not exist"),
    (["finetune", "{tmp}/missing.pt", "--data", "digits", "--out", "{tmp}/f"], "does not exist"),
])
def test_bad_input_is_one_line_exit_2(args, match, monkeypatch, capsys, tmp_path):
    code, _, err = _run(monkeypatch, capsys, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2, err
    assert err.startswith("error: ") and match in err and err.strip().count("\n") == 0


def test_results_lists_and_queries(monkeypatch, capsys, tmp_path):
    import pandas as pd

    from layerlab.store import Store

    Store(tmp_path).write("training", "k", pd.DataFrame({"model": ["a"], "test_acc": [0.5]}))
    code, out, _ = _run(monkeypatch, capsys, "results", str(tmp_path))
    assert code == 0 and "training" in out
    code, out, _ = _run(monkeypatch, capsys, "results", str(tmp_path), "--sql", "SELECT avg(test_acc) AS m FROM training")
    assert code == 0 and "0.5" in out
    code, _, err = _run(monkeypatch, capsys, "results", str(tmp_path), "-a", "criticality")
    assert code == 2 and "found: training" in err
