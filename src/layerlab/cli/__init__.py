"""The ``layerlab`` command line: a thin typer layer over the Python API.

Each command family lives in its own module with a ``register(app)`` function. Usage errors (unknown
option, missing or malformed value) and user errors (:class:`layerlab.errors.LayerlabError`, e.g. an --out
that cannot be written) print one ``error:`` line, no traceback, and exit with status 2 before any work.

``layerlab --help`` answers without importing torch: the command modules import torch, pandas and the analyses
inside their command functions, and the commands generated from analysis contracts (:func:`add_analysis_commands`,
which imports the analyses) are added only when needed: for a command name no hand-written command has, or for
the command list when plugins are configured (``$LAYERLAB_PLUGINS``) or already registered.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import sys
from typing import Any, Iterator, NoReturn

import typer
from typer.core import TyperGroup

from ..errors import LayerlabError


def reflow(text: str | None) -> str | None:
    r"""A command's help with each prose paragraph on one line, so that the terminal wraps it at its own width.

    Docstrings are wrapped at the source's width, and typer keeps their single line breaks, so an 80-column terminal
    showed ragged lines. Lines that are not prose keep their breaks: examples (``layerlab ...``), indented lines,
    list items and a paragraph's ``Example:``/``Examples:`` header.

    >>> reflow("Writes one\nrow per job.\n\nExamples:\n  layerlab x --a 1\n  layerlab y")
    'Writes one row per job.\n\nExamples:\n  layerlab x --a 1\n  layerlab y'
    """
    if not text:
        return text

    def verbatim(line: str) -> bool:
        bare = line.strip()
        return (line[:1].isspace() or bare.startswith(("layerlab ", "- ", "* ", "$ ", "\b"))
                or bare.rstrip(":") in ("Example", "Examples"))

    paragraphs = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        lines: list[str] = []
        for line in paragraph.split("\n"):
            if lines and not verbatim(line) and not verbatim(lines[-1]) and line.strip():
                lines[-1] = f"{lines[-1].rstrip()} {line.strip()}"
            else:
                lines.append(line)
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def _reflowed(command: Any) -> Any:
    """``command`` (and a group's subcommands) with reflowed help, once."""
    if command is not None and not getattr(command, "_layerlab_reflowed", False):
        command.help = reflow(command.help)
        command._layerlab_reflowed = True
        for sub in getattr(command, "commands", {}).values():
            _reflowed(sub)
    return command


class _Commands(TyperGroup):
    """The root command group: hand-written commands at once, commands generated from analysis contracts on demand."""

    def _add_generated(self) -> None:
        """Add the generated commands to ``app`` and to this (already built) group."""
        if add_analysis_commands():
            for name, command in typer.main.get_command(app).commands.items():  # type: ignore[attr-defined]
                self.commands.setdefault(name, command)

    def list_commands(self, ctx: Any) -> list[str]:
        from ..analysis import ANALYSES, PLUGINS_ENV

        if os.environ.get(PLUGINS_ENV) or ANALYSES.names():  # else every analysis has a hand-written command
            self._add_generated()
        return super().list_commands(ctx)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is None:
            self._add_generated()
            command = super().get_command(ctx, cmd_name)
        return _reflowed(command)


app = typer.Typer(
    cls=_Commands,
    name="layerlab",
    help=(
        "How a vision model uses its layers and how training shapes them.\n\n"
        "Models are specs: timm:resnet18?num_classes=10, torchvision:resnet50:IMAGENET1K_V2, file:run/final.pt. "
        "Data are specs: digits (embedded, offline), cifar10:DIR, cifar100:DIR, imagefolder:DIR, imagenet-val:DIR "
        "(add ?skip_bad=true to skip and list unreadable image files). "
        "Start with `layerlab demo`.\n\n"
        "Example: layerlab demo --out layerlab-demo"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    """``--version``: print ``layerlab X.Y.Z`` and exit before any command is parsed."""
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("layerlab")
        except PackageNotFoundError:  # run from a source tree that is not installed
            from .. import __version__ as v
        typer.echo(f"layerlab {v}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle",
        help="Allow file: specs that hold a whole pickled module (torch.save(model)). Unpickling runs code from the "
             "file: use it only for files you trust. Goes before the command: layerlab --trust-pickle criticality "
             "file:model.pt ... (same as LAYERLAB_TRUST_PICKLE=1; local Ray workers inherit it).",
    ),
) -> None:
    # No docstring: the app's help (above) stays the top-level help text.
    if trust_pickle:
        from ..models import TRUST_PICKLE_ENV

        os.environ[TRUST_PICKLE_ENV] = "1"  # read by load_model/checkpoint_state, in this process and its workers


# One module per command family; each adds its commands to ``app``.
COMMAND_MODULES = ["train", "results", "demo", "criticality", "dynamics", "invariance", "prune", "sweep"]
for _name in COMMAND_MODULES:
    importlib.import_module(f"{__name__}.{_name}").register(app)


def add_analysis_commands(app: typer.Typer = app) -> list[str]:
    """A command for every analysis of the contract (:mod:`layerlab.analysis`) that has none yet: its own
    ``cli`` register function, else one generated from its config. Returns the names added."""
    from ..analysis import analyses, resolve
    from .generated import register

    have = {c.name or c.callback.__name__ for c in app.registered_commands}
    added = []
    for a in analyses():
        if (a.command or a.name) in have:
            continue
        (resolve(a.cli) or (lambda app_: register(app_, a)))(app)
        added.append(a.name)
    return added


def _click_errors() -> tuple[type[Exception], ...]:
    """Usage-error base classes: typer >= 0.2x raises its vendored copy of click's, older typer click's own."""
    found: list[type[Exception]] = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(module).ClickException)
        except ImportError:
            pass
    return tuple(found)


def _usage_line(e: Exception) -> str:
    """One line for a click/typer usage error: the message, then where the command's help is."""
    message = " ".join(e.format_message().split()).rstrip(".")
    ctx = getattr(e, "ctx", None)
    where = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
    return f"error: {message}{where}"


def _interrupted() -> NoReturn:
    """Ctrl-C: say that finished work is kept (every result is written atomically), exit 130."""
    typer.secho("interrupted: finished results are kept; re-run the same command to resume", err=True)
    sys.exit(130)


class _Notes(logging.Handler):
    """Prints the ``layerlab`` logger's INFO lines (what a re-run skips) on stderr, above any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


@contextlib.contextmanager
def _notes_shown() -> Iterator[None]:
    """While a command runs: the ``layerlab`` logger's INFO lines on stderr (detached after, for in-process callers)."""
    log, handler = logging.getLogger("layerlab"), _Notes()
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def main() -> None:
    """Entry point: run the app; usage errors and user errors print one line and exit with status 2.

    ``standalone_mode=False`` so that this function, not click, words the errors; typer then returns
    the status of ``typer.Exit`` (and 130 for Ctrl-C) instead of exiting, so it is passed on here.
    """
    try:
        with _notes_shown():
            status = app(prog_name="layerlab", standalone_mode=False)
    except LayerlabError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        _interrupted()
    except _click_errors() as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare group (`layerlab`, `layerlab zoo`): show its help
            e.show()
        else:
            typer.secho(_usage_line(e), fg=typer.colors.RED, err=True)
        sys.exit(2)
    if status == 130:
        _interrupted()
    if isinstance(status, int) and status:
        sys.exit(status)
