"""`layerlab demo`: everything end to end on the embedded data."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import DEVICE_HELP, THREADS_HELP, check_out, print_frame, set_threads


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        out: Path = typer.Option(
            Path("layerlab-demo"), "--out", "-o", help="Output folder (re-running resumes). It has a default, unlike "
            "every other command's --out, because the demo runs with no arguments at all.",
        ),
        step: list[str] = typer.Option(
            [], "--step", help="Run only these steps (repeatable), e.g. --step zoo --step criticality; default all, in "
            "order (a run ends by listing them).",
        ),
        device: str = typer.Option("cpu", help=DEVICE_HELP),
        threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    ) -> None:
        """Train the demo zoo on the embedded digits data and run every analysis on it, offline.

        Writes OUT/zoo (trained runs), OUT/shards (tidy Parquet tables), figures and a report. Takes a few
        minutes on a 2-core CPU; a killed demo resumes where it stopped.

        Example: layerlab demo --out layerlab-demo --step zoo --step criticality
        """
        check_out(out)

        from ..demo import ORDER, run_demo

        set_threads(threads)
        ctx = run_demo(out, steps=step or None, device=device)
        if ctx.zoo_table is not None and not ctx.zoo_table.empty:
            print_frame(ctx.zoo_table[["model", "recipe", "category", "train_acc", "accuracy", "seconds"]], "demo zoo")
        typer.echo(f"steps: {', '.join(f'{k} {v:.0f}s' for k, v in ctx.timings.items())} (all: {', '.join(ORDER)})")
        typer.echo(f"results: {out} (query with `layerlab results {out}`)")
