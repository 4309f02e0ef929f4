"""Helpers shared by the sweep, Ray and report tests: a tiny zoo, YAML writers, shard checks, a SIGALRM deadline."""
from __future__ import annotations

import signal
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq

TINY = "timm:resnet18?channels=8,16,32,64&stem_width=8&num_classes=10"
TINY_ZOO = """
name: tiny
arch: "timm:resnet18?channels=8,16,32,64&stem_width=8"
data: digits
defaults: {epochs: 1, checkpoints: final, train_n: 200}
models:
  baseline: {recipe: baseline}
  adam: {recipe: adam}
"""


class Deadline:
    """SIGALRM after ``seconds``: a hung job or cluster fails the test (TimeoutError) instead of hanging the suite."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def __enter__(self) -> Deadline:
        def expire(signum, frame):
            raise TimeoutError(f"ran past its {self.seconds} s deadline")

        self.old = signal.signal(signal.SIGALRM, expire)
        signal.alarm(self.seconds)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


def write(path: Path, text: str) -> Path:
    """Write dedented ``text`` to ``path`` and return the path (sweep and zoo files inline in a test)."""
    path.write_text(textwrap.dedent(text))
    return path


def executions(out: Path) -> dict[str, int]:
    """Probe executions per job key (each execution leaves one run-* marker)."""
    base = out / "probe"
    return {d.name: len(list(d.glob("run-*"))) for d in base.iterdir()} if base.is_dir() else {}


def shard_files(out: Path, analysis: str) -> dict[str, int]:
    """Shard name -> modification time: a rerun that rewrote a finished shard changes it."""
    return {p.stem: p.stat().st_mtime_ns for p in (out / "shards" / analysis).glob("*.parquet")}


def assert_clean(out: Path, analysis: str, expected: int, *, temps_ok: bool = False) -> None:
    """Every expected shard present exactly once and readable; no temp file left (a kill may leave one, unused)."""
    files = sorted((out / "shards" / analysis).iterdir())
    shards = [p for p in files if p.suffix == ".parquet"]
    assert len(shards) == expected, [p.name for p in files]
    for p in shards:
        assert len(pq.read_table(p)) >= 1
    assert temps_ok or not [p for p in files if p.name.endswith(".tmp")]


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run ``layerlab ARGS`` in-process through the entry point's ``main()``: (exit status, stdout, stderr)."""
    from layerlab.cli import main

    monkeypatch.setattr(sys, "argv", ["layerlab", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err
