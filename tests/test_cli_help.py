"""Issue 16, a CLI that teaches: every command's --help holds a runnable example and a description of every option,
options shared by commands share their default (or say why not), every command that computes takes --threads and
--device, and --help answers without importing torch (faster than `import torch` itself)."""
from __future__ import annotations

import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import typer.main

import toy_analysis  # noqa: F401  (a generated command: its help must teach too)
from helpers import run_cli
from layerlab.cli import add_analysis_commands, app

#: commands that load models or data and compute: each takes --threads and --device
COMPUTE = {"train", "finetune", "demo", "criticality", "dynamics", "compare", "invariance", "sweep", "zoo train", "prune", "toy"}
#: commands generated from a test plugin's contract (tests/toy_analysis.py)
PLUGIN_COMMANDS = {"toy"}
#: commands that only read or list (no model runs)
NO_COMPUTE = {"", "recipes", "layers", "results", "report", "zoo", "zoo show"}
EXAMPLE = re.compile(r"^\s*(?:Examples?:\s*)?(layerlab\b.*)$")


def _commands() -> dict[str, object]:
    """'zoo train' -> its click command, for every command and group of the app ('' is the app itself)."""
    add_analysis_commands(app)
    found, stack = {}, [(typer.main.get_command(app), [])]
    while stack:
        cmd, path = stack.pop()
        found[" ".join(path)] = cmd
        stack += [(sub, path + [name]) for name, sub in getattr(cmd, "commands", {}).items()]
    return found


COMMANDS = _commands()


def _examples(cmd, path: str) -> list[str]:
    """The invocations of ``layerlab PATH`` in a command's help, one per line (after an optional 'Example:')."""
    prefix = " ".join(["layerlab", *path.split()])
    lines = [m.group(1).strip() for m in map(EXAMPLE.match, (cmd.help or "").splitlines()) if m]
    return [line for line in lines if line == prefix or line.startswith(prefix + " ")]


def _parse(example: str) -> str:
    """Parse an example against the app like click would run it (nothing runs); returns the command path reached."""
    root = typer.main.get_command(app)
    args, path, cmd = shlex.split(example)[1:], [], root
    while args and args[0] in getattr(cmd, "commands", {}):
        path.append(args[0])
        cmd = cmd.commands[args.pop(0)]
    cmd.make_context(" ".join(["layerlab", *path]), list(args))  # unknown option, bad value, missing --out: raises
    return " ".join(path)


def test_every_command_is_classified():
    """A new command must say whether it computes (and so needs --threads/--device)."""
    assert set(COMMANDS) == COMPUTE | NO_COMPUTE


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_help_has_a_runnable_example(path, monkeypatch, capsys):
    cmd = COMMANDS[path]
    examples = _examples(cmd, path)
    assert "Example" in (cmd.help or "") and examples, f"`layerlab {path} --help` shows no example"
    for example in examples:
        reached = _parse(example)
        assert reached == path or (reached.startswith(path) and reached), (example, reached)
    monkeypatch.setenv("COLUMNS", "300")
    code, out, _ = run_cli(monkeypatch, capsys, *path.split(), "--help")
    shown = " ".join(out.split())
    assert code == 0 and all(" ".join(e.split()) in shown for e in examples), out


def test_a_wrong_example_would_fail():
    """The parse above is a real check: a misspelt option, a bad value and a missing --out all raise."""
    from layerlab.cli import _click_errors  # typer's vendored click or click itself

    assert _parse("layerlab criticality file:m.pt --out o --trials 2") == "criticality"
    for bad in ("layerlab criticality file:m.pt --out o --trails 2", "layerlab criticality file:m.pt --out o -t x",
                "layerlab criticality file:m.pt"):
        with pytest.raises(_click_errors()):
            _parse(bad)


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_option_and_argument_is_described(path):
    cmd = COMMANDS[path]
    bare = [p.opts[0] if p.opts else p.name for p in cmd.params if p.name != "help" and not (p.help or "").strip()]
    assert bare == [], f"`layerlab {path}`: no description for {bare}"


@pytest.mark.parametrize("path", sorted(COMPUTE))
def test_every_computing_command_takes_threads_and_device(path):
    flags = {o for p in COMMANDS[path].params for o in p.opts}
    assert {"--threads", "--device"} <= flags, path


def _default(param) -> str:
    """A comparable default: not given (None, empty list) is one value, a required option another."""
    if param.required:
        return "required"
    value = param.default
    return "unset" if value in (None, [], ()) else str(value)


def _shared_options() -> dict[str, dict[str, tuple[str, str]]]:
    """--flag -> {command: (default, help)} for every option that more than one command has (layerlab's own
    commands: a plugin's options are its author's)."""
    seen: dict[str, dict[str, tuple[str, str]]] = {}
    for path, cmd in COMMANDS.items():
        for p in cmd.params if path not in PLUGIN_COMMANDS else []:
            if p.param_type_name == "option" and p.name != "help":
                seen.setdefault(p.opts[0], {})[path] = (_default(p), p.help or "")
    return {flag: by for flag, by in seen.items() if len(by) > 1}


def test_shared_options_share_their_default_or_say_why():
    """One default per option across commands; where one differs from the most common (on a tie: all differ),
    its help gives the reason ('because ...')."""
    shared = _shared_options()
    differing = {}
    for flag, by in shared.items():
        counts = Counter(d for d, _ in by.values()).most_common()
        if len(counts) == 1:
            continue
        usual = counts[0][0] if counts[0][1] > counts[1][1] else None
        differing[flag] = {path: (d, h) for path, (d, h) in by.items() if d != usual}
    assert {"--images", "--batch-size", "--data", "--out", "--estimator"} <= set(differing)  # the check is not vacuous
    assert {"--threads", "--tokens", "--recipe"} <= set(shared) - set(differing)  # these agree everywhere
    assert set(differing["--seed"]) == {"prune"}  # repeatable there (a seed spread): shown unset, said why
    assert set(differing["--device"]) == {"sweep"}  # cpu everywhere; a sweep's default is its file's device:
    unexplained = {f"{flag} ({path}: default {d})" for flag, by in differing.items() for path, (d, h) in by.items()
                   if "because" not in h}
    assert unexplained == set()


def test_images_defaults_are_the_documented_ones():
    """--images: all (criticality), 256 (dynamics, compare: CKA features), 128 (invariance: inversions), each said."""
    by = _shared_options()["--images"]
    assert {path: d for path, (d, _) in by.items()} == {"criticality": "unset", "dynamics": "256", "compare": "256",
                                                         "invariance": "unset", "prune": "256"}
    assert "default all" in by["criticality"][1] and "Default 256" in by["dynamics"][1]
    assert "default 128" in by["invariance"][1]


# ------------------------------------------------------------------------------------- --help without torch

LAYERLAB = Path(sys.executable).parent / "layerlab"
CLI = [str(LAYERLAB)] if LAYERLAB.is_file() else [sys.executable, "-m", "layerlab.cli"]
PROBE = """
import contextlib, io, json, sys
import typer.main
from layerlab.cli import app, main
paths, stack = [], [(typer.main.get_command(app), [])]
while stack:
    cmd, path = stack.pop()
    paths.append(path)
    stack += [(sub, path + [name]) for name, sub in getattr(cmd, "commands", {}).items()]
for path in paths:
    sys.argv = ["layerlab", *path, "--help"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main()
print(json.dumps({"commands": len(paths), "heavy": sorted(m for m in ("torch", "pandas", "numpy", "pyarrow",
                  "matplotlib") if m in sys.modules)}))
"""


def test_help_imports_no_torch():
    """Every command's --help, in one fresh process: torch (and pandas, numpy, pyarrow, matplotlib) never load."""
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout.strip().splitlines()[-1])
    assert found["commands"] >= 15 and found["heavy"] == []


def test_builtin_analyses_need_no_generated_command():
    """Why --help may skip importing the analyses: each built-in one has a hand-written command (a new one without
    would still run, found on demand, but would be missing from `layerlab --help`)."""
    from layerlab.analysis import analyses, resolve

    hand = {c.name for c in app.registered_commands if c.callback.__module__ != "layerlab.cli.generated"}
    builtin = [a for a in analyses() if resolve(a.job).__module__.startswith("layerlab.")]
    assert len(builtin) >= 4 and {a.command or a.name for a in builtin} <= hand


def test_plugin_commands_are_listed_and_found():
    """With $LAYERLAB_PLUGINS the generated commands are in `layerlab --help` and run by name."""
    env = {**os.environ, "LAYERLAB_PLUGINS": "toy_analysis",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    listed = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert listed.returncode == 0 and re.search(r"\btoy\s+A toy analysis", listed.stdout), listed.stdout
    found = subprocess.run([*CLI, "toy", "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert found.returncode == 0 and "Example: layerlab toy" in found.stdout, found.stderr


def _seconds(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return time.perf_counter() - t0


def test_help_is_faster_than_importing_torch():
    """The acceptance test of issue 16: in one run, interleaved, median of 3 each."""
    runs = {"import torch": [sys.executable, "-c", "import torch"], "layerlab --help": [*CLI, "--help"],
            "layerlab criticality --help": [*CLI, "criticality", "--help"]}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(3):
        for name, cmd in runs.items():
            times[name].append(_seconds(cmd))
    median = {name: statistics.median(t) for name, t in times.items()}
    assert median["layerlab --help"] < median["import torch"], median
    assert median["layerlab criticality --help"] < median["import torch"], median


def test_prose_paragraphs_reflow_to_the_terminal_and_examples_keep_their_lines():
    """Docstrings are wrapped at the source's width; the help joins a paragraph's lines so the terminal wraps them
    (at 80 columns the old help broke 'Writes one / row per ...' raggedly), while each example stays a line."""
    env = {**os.environ, "COLUMNS": "250", "TERM": "dumb", "NO_COLOR": "1"}
    out = subprocess.run([*CLI, "prune", "--help"], capture_output=True, text=True, env=env, timeout=60).stdout
    assert "Writes one row per (model, criterion, budget, seed): blocks removed, parameters, FLOPs" in out
    examples = [line.strip() for line in out.splitlines() if line.strip().startswith("layerlab prune ")]
    assert len(examples) == 3 and all(e.endswith("--out out/prune") for e in examples)
