"""`layerlab sweep SWEEP.yaml` (jobs on the local or a Ray engine) and `layerlab report DIR` (one HTML page)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import LayerlabError
from ._common import THREADS_HELP, check_out, print_frame, set_threads


def register(app: typer.Typer) -> None:
    @app.command("sweep")
    def sweep_cmd(
        sweep: str = typer.Argument(..., help="Sweep YAML file (or a built-in sweep: demo)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder: shards/, zoo/, failed/. Re-running resumes."),
        engine: str = typer.Option("local", "--engine", "-e", help="local (in this process) or ray (Ray tasks)."),
        address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to use: auto, HOST:PORT or ray://HOST:10001 (default: start a local one)."),
        retries: Optional[int] = typer.Option(None, "--retries", help="Extra attempts per failing job (default: the sweep file's 'retries', else 1)."),
        cpus: Optional[int] = typer.Option(None, "--cpus", help="CPUs of the local Ray cluster this starts (default: all)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="List the jobs and their status; run nothing."),
        device: Optional[str] = typer.Option(
            None, "--device", help="cpu, cuda, cuda:N or auto, for every job; default the sweep file's device: (else "
            "cpu), because the device is part of the sweep's job keys and the file is the record of the sweep.",
        ),
        threads: Optional[int] = typer.Option(
            None, help=THREADS_HELP.rstrip(".") + "; Ray jobs use their resources' num_cpus.",
        ),
    ) -> None:
        """Expand a sweep into jobs (train a zoo, then analyse every model) and run those not finished yet.

        Each job writes one shard atomically; a failing job is retried, then recorded in OUT/failed/.

        The other jobs go on; the exit status is 1 if any job failed. Examples:

          layerlab sweep demo --out sweep-out

          layerlab sweep my-sweep.yaml --out /shared/out --engine ray --address auto
        """
        check_out(out, write=not dry_run)  # a dry run only reads: a read-only OUT is fine

        from ..sweep import load_sweep, plan, run_sweep

        set_threads(threads)
        s = _with_device(load_sweep(sweep), device)
        if dry_run:
            print_frame(plan(s, out), f"sweep {s.name}: jobs in {out}", max_rows=500)
            return
        options = {"address": address} if engine == "ray" or address else {}
        if cpus is not None:
            options["num_cpus"] = cpus
        result = run_sweep(s, out, engine=engine, retries=retries, **options)
        counts = ", ".join(f"{n} {st}" for st in ("done", "cached", "failed", "blocked") if (n := result.count(st)))
        typer.echo(f"sweep {s.name}: {len(result.outcomes)} jobs ({counts or 'none'}); results: {out}")
        if not result.ok:
            print_frame(result.failed[["kind", "model", "key", "status", "error"]], "failed jobs (details in OUT/failed/)")
            typer.echo("fix the cause and re-run the same command: finished jobs are kept, failed ones are retried")
            raise typer.Exit(1)
        typer.echo(f"query: layerlab results {out}    report: layerlab report {out}")

    @app.command("report")
    def report_cmd(
        out: Path = typer.Argument(..., help="An output folder (of `layerlab demo`, `sweep`, an analysis)."),
        html: Optional[Path] = typer.Option(None, "--html", help="Where to write the page (default OUT/report.html)."),
        rows: int = typer.Option(200, "--rows", help="Rows shown per table before it is cut (the full data stays in the shards)."),
    ) -> None:
        """Write one self-contained HTML page of an output folder (OUT/report.html).

        Per analysis: an introduction with this run's numbers, interactive views (hover, zoom, pick models), the
        figures (click to enlarge), sortable and filterable tables, configs and versions; the criticality/accuracy
        correlation, two chosen models side by side, failed jobs.

        The page needs no network: plotly.js and everything else are inside it; it opens offline in any browser.

        Example: layerlab report layerlab-demo --html demo-report.html
        """
        if html is not None or out.is_dir():  # a missing OUT is reported by write_report
            check_out(html or out / "report.html", kind="file", option="--html" if html else "OUT")

        from ..report import write_report

        path = write_report(out, html, max_rows=rows)
        typer.echo(f"report: {path}")


def _with_device(sweep: Any, device: str | None) -> Any:
    """The sweep with ``--device`` in place of its file's ``device:`` (checked as the file's is)."""
    if device is None:
        return sweep
    if device not in ("cpu", "auto") and not device.startswith("cuda"):
        raise LayerlabError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")
    return dataclasses.replace(sweep, device=device)
