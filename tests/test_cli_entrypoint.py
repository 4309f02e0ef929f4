"""Usage errors through the installed `layerlab` script, as a user meets them (not only through main()).

Each case: exit status 2 (0 for --version), no traceback, one `error:` line naming the problem, and no output
folder or shard left behind.
"""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

LAYERLAB = Path(sys.executable).parent / "layerlab"

pytestmark = pytest.mark.skipif(
    not LAYERLAB.is_file(), reason=f"no installed `layerlab` script next to {sys.executable} (pip install -e .)"
)


def _layerlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LAYERLAB), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_version(tmp_path):
    res = _layerlab("--version", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"layerlab {version('layerlab')}\n" and res.stderr == ""


# The model spec is unloadable on purpose: the usage or --out error must come before any model is loaded.
@pytest.mark.parametrize("args, match", [
    (["criticality", "--no-such-option"], "No such option: --no-such-option"),
    (["train"], "Missing argument"),
    (["train", "timm:not_a_model"], "Missing option '--out'"),
    (["criticality", "timm:not_a_model", "--images", "abc", "--out", "{tmp}/out"], "Invalid value for '--images'"),
    (["criticality", "timm:not_a_model", "--out", "{tmp}/file"], "is an existing file, not a folder"),
    (["criticality", "timm:not_a_model", "--out", "{tmp}/file/out"], "is a file, not a folder"),
    (["train", "timm:not_a_model", "--out", "{tmp}/file/out"], "is a file, not a folder"),
], ids=["unknown-option", "missing-argument", "missing-out", "not-an-integer", "out-is-a-file",
        "out-under-a-file", "train-out-under-a-file"])
def test_usage_error_is_one_line_exit_2(args, match, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    res = _layerlab(*[a.replace("{tmp}", str(tmp_path)) for a in args], cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert res.stderr.startswith("error: ") and res.stderr.strip().count("\n") == 0, res.stderr
    assert match in res.stderr and res.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no output folder, no shard
    assert (tmp_path / "file").read_text() == "not a folder"
