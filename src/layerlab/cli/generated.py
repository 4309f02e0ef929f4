"""`layerlab <analysis>` for an analysis of the contract (:mod:`layerlab.analysis`) that has no hand-written command.

The command takes model specs, ``--data``, ``--out``, ``--device``, ``--threads`` and one option per field of the
analysis' config class (a bool is a ``--flag/--no-flag``, a number or a string takes a value, anything else a JSON/YAML
value via ``--set FIELD=VALUE``). It runs one job per model into ``OUT`` (resumable: a finished job is skipped),
writes the analysis' figures when it declares them, and prints the main table. A re-run says how many jobs it
finds done before it runs the rest.
"""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, Optional

import typer

from ._common import DEVICE_HELP, THREADS_HELP, check_out, parse_overrides, print_frame, set_threads

SIMPLE = (bool, int, float, str)


def _field_type(f: dataclasses.Field, default: Any) -> type | None:
    for t in SIMPLE:
        if f.type in (t, t.__name__) or (default is not None and type(default) is t):
            return t
    return None


def _field_help(analysis: Any, field: str) -> str:
    """Help for a config field that declares none (``field(metadata={"help": ...})`` is the way to give one)."""
    return f"The {field!r} option of the {analysis.name} analysis ({analysis.config.__name__}; its docs say more)."


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
                          default=typer.Option("digits", "--data", "-d",
                                               help="Data spec: digits, cifar10:DIR, imagefolder:DIR ...")),
        inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                          default=typer.Option("cpu", help=DEVICE_HELP)),
        inspect.Parameter("threads", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[int],
                          default=typer.Option(None, help=THREADS_HELP)),
        inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, annotation=list[str],
                          default=typer.Option([], "--set", help="Any option as FIELD=VALUE (repeatable).")),
    ]
    for f in dataclasses.fields(analysis.config):
        default = defaults.get(f.name)
        t = _field_type(f, default)
        if t is None or f.name in ("models", "out", "data", "device", "threads", "set_"):
            continue
        simple[f.name] = t
        flag = "--" + f.name.replace("_", "-")
        decl = f"{flag}/--no-{f.name.replace('_', '-')}" if t is bool else flag
        help_text = (f.metadata.get("help", "") if f.metadata else "") or _field_help(analysis, f.name)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=t,
                                        default=typer.Option(default, decl, help=help_text)))

    def command(**kwargs: Any) -> None:
        from ..analysis import resolve, run_job
        from ..store import Store, job_key, resumed

        out = Path(kwargs.pop("out"))
        check_out(out)
        models, data, device = kwargs.pop("models"), kwargs.pop("data"), kwargs.pop("device")
        set_threads(kwargs.pop("threads"))
        options = {**{k: kwargs[k] for k in simple}, **parse_overrides(kwargs.pop("set_"))}
        store = Store(out)
        keys = [job_key(spec, analysis.name, {**options, "data": data}) for spec in models]
        resumed(sum(store.done(analysis.name, key) for key in keys), len(keys), out, unit=f"{analysis.name} jobs")
        for i, (spec, key) in enumerate(zip(models, keys)):
            name = spec if len(models) == 1 else f"{i}:{spec}"
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
    summary = analysis.help or f"The {analysis.name} analysis (generated from its contract)."
    command.__doc__ = f"{summary}\n\nExample: layerlab {analysis.name} 'timm:resnet18?num_classes=10' --out out/{analysis.name}"
    app.command(analysis.name)(command)
