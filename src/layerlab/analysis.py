"""The analysis contract: what an analysis declares once, and everything else derives from it.

An analysis is one :class:`Analysis` record, registered with :func:`register` from the module that implements it:

* ``name`` and ``tables``: the fixed names of the tables it writes (``OUT/shards/<table>/``), the first one the
  main table. Every path into an output folder (the Python API with ``store=``, a sweep job, the CLI) writes the
  same tables at the same granularity with the same keys, so a folder never counts a row twice.
* ``config``: a frozen dataclass of its options (defaults included; validated in its ``__post_init__``). Its
  fields are the sweep options and the generated CLI options; their defaults are part of every job key.
* ``job``: ``job(config: dict, out: Path, store: Store) -> None`` runs it for one sweep/CLI job (``config`` holds
  the options plus ``model``, ``run``, ``data``, ``device``, ``name``, ``key``) and writes its tables to ``store``.
* optional, as ``"module:attribute"`` references imported only when used (so an analysis never imports figures,
  demos, reports or the CLI): ``figures(tables, folder) -> [paths]``, ``summary(main_table) -> DataFrame`` for the
  report, ``demo(ctx)`` (a demo step), ``cli(app)`` (a hand-written command; without one the CLI generates
  ``layerlab <name>`` from ``config``; ``command`` names another analysis' command that serves this one too).

Derived from the registry: the sweep job kinds (:mod:`layerlab.sweep`), the CLI commands (:mod:`layerlab.cli`), the
report's per-table summaries (:mod:`layerlab.report`) and the demo steps (:mod:`layerlab.demo`).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .registry import Registry

__all__ = ["ANALYSES", "Analysis", "BUILTIN", "analyses", "coerce", "config_defaults", "config_of", "register",
           "job_options", "resolve", "run_job"]

#: the package whose modules declare the built-in analyses, one module each (imported on first use)
BUILTIN = "layerlab.analyses"
#: comma-separated modules that register more analyses (your own), imported with the built-in ones
PLUGINS_ENV = "LAYERLAB_PLUGINS"
#: the job config fields the sweep runner fills in; everything else in a job's config is an option of its kind
RUNTIME_FIELDS = ("model", "run", "data", "device", "name", "key")


@dataclass(frozen=True)
class Analysis:
    """One analysis, declared once (see the module docstring)."""

    name: str
    tables: tuple[str, ...]
    config: type
    job: str | Callable[..., Any]
    help: str = ""
    per_model: bool = True  # one job per model of a sweep; else ``expand`` lists the jobs
    needs_run: bool = False  # only models with a training run (zoo models) get a job
    expand: str | Callable[..., Any] | None = None
    neutral: Mapping[str, Any] = field(default_factory=dict)  # options whose value leaves keys as published
    figures: str | Callable[..., Any] | None = None
    summary: str | Callable[..., Any] | None = None
    demo: str | Callable[..., Any] | None = None
    cli: str | Callable[..., Any] | None = None
    command: str | None = None  # the CLI command that serves it, when another analysis' (default: its name)

    def __post_init__(self) -> None:
        if not self.tables:
            raise ValueError(f"analysis {self.name!r}: declare at least one table")
        if not (dataclasses.is_dataclass(self.config) and self.config.__dataclass_params__.frozen):
            raise TypeError(f"analysis {self.name!r}: config must be a frozen dataclass")


ANALYSES: Registry[Analysis] = Registry("analysis")
_loaded = False


def register(analysis: Analysis) -> Analysis:
    """Add ``analysis`` to the registry (and so to sweeps, the CLI, the report and the demo)."""
    ANALYSES.register(analysis.name)(analysis)
    return analysis


def analyses() -> list[Analysis]:
    """Every registered analysis: the built-in ones (each module of :data:`BUILTIN`) and those of the modules in
    ``$LAYERLAB_PLUGINS`` imported first."""
    global _loaded
    if not _loaded:
        _loaded = True
        package = importlib.import_module(BUILTIN)
        names = [f"{BUILTIN}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
        names += [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
        for module in names:
            importlib.import_module(module)
    return [ANALYSES.get(n) for n in ANALYSES.names()]


def resolve(ref: str | Callable[..., Any] | None) -> Any:
    """A ``"module:attribute"`` reference imported now (a callable is returned as is, None stays None)."""
    if ref is None or callable(ref):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def config_of(fn: Callable[..., Any], name: str, *, drop: tuple[str, ...] = (), **extra: Any) -> type:
    """A frozen config dataclass whose fields are ``fn``'s keyword options (those with defaults, minus ``drop``)
    plus ``extra`` (e.g. ``version``): the options declared once, in the API function's signature."""
    fields = []
    for p in inspect.signature(fn).parameters.values():
        if p.name in drop or p.default is inspect.Parameter.empty:
            continue
        default = list(p.default) if isinstance(p.default, tuple) else p.default
        fields.append((p.name, Any, field(default_factory=lambda d=default: d) if isinstance(default, list)
                       else field(default=default)))
    fields += [(k, Any, field(default=v)) for k, v in extra.items()]
    return dataclasses.make_dataclass(name, fields, frozen=True)


def config_defaults(config: type) -> dict[str, Any]:
    """The config's fields and defaults as JSON-able values (tuples become lists), for sweep keys and CLI options."""
    out = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def job_options(config: Mapping[str, Any], *drop: str) -> dict[str, Any]:
    """A job config's analysis options: everything but :data:`RUNTIME_FIELDS` and ``drop`` (e.g. ``version``)."""
    return {k: v for k, v in config.items() if k not in RUNTIME_FIELDS + drop}


def coerce(config: type, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with each value of a float field made a float (YAML, JSON and job keys write 1.0 as 1), so the
    API, the CLI and a sweep hand an analysis the same values and so compute the same keys."""
    floats = {n for n, d in config_defaults(config).items() if isinstance(d, float)}
    return {k: float(v) if k in floats and isinstance(v, int) and not isinstance(v, bool) else v
            for k, v in options.items()}


def run_job(analysis: Analysis, config: dict[str, Any], out: Path, store: Any) -> None:
    """Validate ``config``'s options against the analysis' config class (a bad value raises before any work),
    then run its job into ``store``."""
    config = coerce(analysis.config, config)
    options = {f.name for f in dataclasses.fields(analysis.config)}
    analysis.config(**{k: v for k, v in config.items() if k in options})
    resolve(analysis.job)(config, Path(out), store)
