"""The CLI's front door: --help everywhere, and bad input as one clear line with exit status 2."""
from __future__ import annotations


import pytest

from helpers import run_cli
from layerlab.cli import app


_run = run_cli


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


# ------------------------------------------------------------------ usage errors and impossible --out, before the work


def _one_error_line(code: int, out: str, err: str, match: str) -> None:
    """Exit status 2, no traceback, and exactly one `error:` line on stderr that names the problem."""
    assert code == 2, err
    assert "Traceback" not in out + err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert match in err, err


def test_version(monkeypatch, capsys):
    from importlib.metadata import version

    for flag in ("--version", "-V"):
        code, out, err = _run(monkeypatch, capsys, flag)
        assert code == 0 and out == f"layerlab {version('layerlab')}\n" and err == ""


@pytest.mark.parametrize("args, match", [
    (["--no-such-option"], "No such option: --no-such-option"),
    (["criticality", "--no-such-option"], "No such option: --no-such-option"),
    (["criticality", "x", "--imagse", "3", "--out", "{tmp}/c"], "--images"),  # suggests the right spelling
    (["train"], "Missing argument"),
    (["train", "timm:resnet18"], "Missing option '--out'"),
    (["criticality", "x", "--images", "abc", "--out", "{tmp}/c"], "Invalid value for '--images'"),
    (["train", "timm:resnet18", "--out", "{tmp}/r", "--epochs", "1.5"], "Invalid value for '--epochs'"),
])
def test_usage_error_is_one_line_exit_2(args, match, monkeypatch, capsys, tmp_path):
    code, out, err = _run(monkeypatch, capsys, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    _one_error_line(code, out, err, match)
    assert "--help`" in err  # where to look next, on the same line
    assert list(tmp_path.iterdir()) == []


def _read_only_dir(tmp_path):
    """A folder no new file can be made in, even for root (root ignores mode bits; /proc refuses files)."""
    import os
    from pathlib import Path

    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        return ro
    if Path("/proc/self").is_dir():
        return Path("/proc")
    pytest.skip("running as root without /proc: no folder here is read-only for root")


# Every command that writes to --out, with arguments that would otherwise reach the work. The model spec is
# unloadable on purpose: the --out error must come first, so no model or data is touched.
OUT_COMMANDS = [
    ["train", "timm:not_a_model"],
    ["finetune", "{tmp}/missing.pt", "--data", "digits"],
    ["zoo", "train", "{tmp}/missing.yaml"],
    ["criticality", "timm:not_a_model"],
    ["dynamics", "{tmp}/no-run"],
    ["compare", "timm:not_a_model", "timm:not_a_model"],
    ["invariance", "timm:not_a_model", "timm:not_a_model", "--data", "digits"],
    ["sweep", "{tmp}/missing.yaml"],
    ["demo"],
]


@pytest.mark.parametrize("command", OUT_COMMANDS, ids=lambda c: " ".join(c[:2]))
@pytest.mark.parametrize("case", ["existing-file", "file-parent", "read-only"])
def test_impossible_out_is_one_line_before_the_work(command, case, monkeypatch, capsys, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out, match = {
        "existing-file": (tmp_path / "file", "is an existing file, not a folder"),
        "file-parent": (tmp_path / "file" / "sub" / "out", "is a file, not a folder"),
        "read-only": (None, "is not writable"),
    }[case]
    if out is None:
        out = _read_only_dir(tmp_path) / "layerlab-out"
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    code, stdout, err = _run(monkeypatch, capsys, *args, "--out", str(out))
    _one_error_line(code, stdout, err, match)
    assert f"--out {str(out)!r}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing made, nothing half-written
    assert (tmp_path / "file").read_text() == "not a folder"  # the existing file is left as it was
    assert case == "existing-file" or not out.exists()


@pytest.mark.parametrize("args, match", [
    (["report", "{tmp}", "--html", "{tmp}/file/page.html"], "--html"),
    (["results", "{tmp}", "--csv", "{tmp}"], "--csv"),
    (["criticality", "timm:not_a_model", "--out", "{tmp}/c", "--attrs", "{tmp}/no.csv"], "--attrs"),
])
def test_other_outputs_are_checked_first(args, match, monkeypatch, capsys, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    code, out, err = _run(monkeypatch, capsys, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    _one_error_line(code, out, err, match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_check_out_accepts_new_and_earlier_folders(tmp_path):
    from layerlab.cli._common import check_out

    check_out(tmp_path)  # an earlier output folder: resumed
    check_out(tmp_path / "a" / "b" / "c")  # made later, by the command
    check_out(tmp_path / "page.html", kind="file")
    assert list(tmp_path.iterdir()) == []  # the write probe leaves nothing behind


def test_exit_status_of_the_command_is_kept(monkeypatch, capsys):
    """typer returns (not raises) a command's typer.Exit status and 130 for Ctrl-C under standalone_mode=False."""
    import typer

    import layerlab.cli as cli

    fake = typer.Typer()

    @fake.command("fail")
    def fail() -> None:
        raise typer.Exit(1)

    @fake.command("interrupt")
    def interrupt() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "app", fake)
    assert _run(monkeypatch, capsys, "fail")[0] == 1
    code, _, err = _run(monkeypatch, capsys, "interrupt")
    assert code == 130 and err.startswith("interrupted:")


def test_out_of_the_wrong_kind_is_refused_before_any_work(monkeypatch, capsys, tmp_path):
    """Results never go into a training run folder, and a run never into a folder of other files."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    code, _, err = _run(monkeypatch, capsys, "criticality", "timm:nosuchmodel", "--out", str(run))
    assert code == 2 and "is a training run folder" in err and "Traceback" not in err
    other = tmp_path / "results"
    other.mkdir()
    (other / "criticality.csv").write_text("x\n")
    code, _, err = _run(monkeypatch, capsys, "train", "timm:nosuchmodel", "--out", str(other))
    assert code == 2 and "holds other files but no run.json" in err
    assert sorted(p.name for p in other.iterdir()) == ["criticality.csv"]
    code, _, err = _run(monkeypatch, capsys, "criticality", "a=timm:resnet18", "--baseline", "nosuch", "--out",
                        str(tmp_path / "c"))
    assert code == 2 and "--baseline 'nosuch' is not one of the models (a)" in err


def test_trust_pickle_is_an_explicit_cli_opt_in(monkeypatch, capsys, tmp_path):
    """A whole pickled module loads only with `layerlab --trust-pickle ...`: without it one line that names the flag."""
    import torch
    from torch import nn

    from layerlab.models import TRUST_PICKLE_ENV

    monkeypatch.setenv(TRUST_PICKLE_ENV, "0")  # off, and restored after the test (the flag sets it in-process)
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 10)), tmp_path / "whole.pt")
    code, _, err = run_cli(monkeypatch, capsys, "layers", f"file:{tmp_path / 'whole.pt'}")
    assert code == 2 and "pickled Python objects" in err and "layerlab --trust-pickle" in err
    assert err.strip().count("\n") == 0
    code, out, err = run_cli(monkeypatch, capsys, "--trust-pickle", "layers", f"file:{tmp_path / 'whole.pt'}")
    assert code == 0, err
    assert "Conv2d" in out
