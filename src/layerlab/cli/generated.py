"""`layerlab <analysis>` for an analysis of the contract (:mod:`layerlab.analysis`) that has no hand-written command.

The command takes model specs, ``--data``, ``--out``, ``--device`` and one option per field of the analysis'
config class (a bool is a ``--flag/--no-flag``, a number or a string takes a value, anything else a JSON/YAML
value via ``--set FIELD=VALUE``). It runs one job per model into ``OUT`` (resumable: a finished job is skipped),
writes the analysis' figures when it declares them, and prints the main table.
"""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import typer

from ._common import check_out, parse_overrides, print_frame

SIMPLE = (bool, int, float, str)


def _field_type(f: dataclasses.Field, default: Any) -> type | None:
    for t in SIMPLE:
        if f.type in (t, t.__name__) or (default is not None and type(default) is t):
            return t
    return None


def register(app: typer.Typer, analysis: Any) -> None:
    """Add the command ``analysis.name`` to ``app``, its options generated from ``analysis.config``."""
    from ..analysis import config_defaults

    defaults = config_defaults(analysis.config)
    simple: dict[str, type] = {}
    params = [
        inspect.Parameter("models", inspect.Parameter.KEYWORD_ONLY, annotation=list[str],
                          default=typer.Argument(..., help="Model specs: timm:..., torchvision:..., file:...")),
        inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Path,
                          default=typer.Option(..., "--out", "-o", help="Output folder (re-running resumes).")),
        inspect.Parameter("data", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                          default=typer.Option("digits", "--data", "-d", help="Data spec.")),
        inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                          default=typer.Option("cpu", help="cpu, cuda or auto.")),
        inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, annotation=list[str],
                          default=typer.Option([], "--set", help="Any option as FIELD=VALUE (repeatable).")),
    ]
    for f in dataclasses.fields(analysis.config):
        default = defaults.get(f.name)
        t = _field_type(f, default)
        if t is None or f.name in ("models", "out", "data", "device", "set_"):
            continue
        simple[f.name] = t
        flag = "--" + f.name.replace("_", "-")
        decl = f"{flag}/--no-{f.name.replace('_', '-')}" if t is bool else flag
        help_text = f.metadata.get("help", "") if f.metadata else ""
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=t,
                                        default=typer.Option(default, decl, help=help_text)))

    def command(**kwargs: Any) -> None:
        from ..analysis import resolve, run_job
        from ..store import Store, job_key

        out = Path(kwargs.pop("out"))
        check_out(out)
        models, data, device = kwargs.pop("models"), kwargs.pop("data"), kwargs.pop("device")
        options = {**{k: kwargs[k] for k in simple}, **parse_overrides(kwargs.pop("set_"))}
        store = Store(out)
        for i, spec in enumerate(models):
            name = spec if len(models) == 1 else f"{i}:{spec}"
            key = job_key(spec, analysis.name, {**options, "data": data})
            if store.done(analysis.name, key):
                continue
            config = {**options, "model": spec, "data": data, "device": device, "name": name, "key": key}
            run_job(analysis, config, out, store)
            store.mark_done(analysis.name, key, {"model": spec, "config": options})
        tables = {t: store.read(t) for t in analysis.tables}
        figures = resolve(analysis.figures)
        if figures is not None:
            for p in figures(tables, out / "figures" / analysis.name):
                typer.echo(f"figure: {p}")
        print_frame(tables[analysis.tables[0]], analysis.name)

    command.__signature__ = inspect.Signature(params)  # typer reads the options from here
    command.__doc__ = analysis.help or f"The {analysis.name} analysis (generated from its contract)."
    app.command(analysis.name)(command)
