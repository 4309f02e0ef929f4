"""The ``layerlab`` command line: a thin typer layer over the Python API.

Each command family lives in its own module with a ``register(app)`` function; user errors
(:class:`layerlab.errors.LayerlabError`) print as one line and exit with status 2.
"""
from __future__ import annotations

import importlib
import sys

import typer

from ..errors import LayerlabError

app = typer.Typer(
    name="layerlab",
    help=(
        "How a vision model uses its layers and how training shapes them.\n\n"
        "Models are specs: timm:resnet18?num_classes=10, torchvision:resnet50:IMAGENET1K_V2, file:run/final.pt. "
        "Data are specs: digits (embedded, offline), cifar10:DIR, cifar100:DIR, imagefolder:DIR, imagenet-val:DIR. "
        "Start with `layerlab demo`."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# One module per command family; each adds its commands to ``app``.
COMMAND_MODULES = ["train", "results", "demo", "criticality", "dynamics", "invariance", "sweep"]
for _name in COMMAND_MODULES:
    importlib.import_module(f"{__name__}.{_name}").register(app)


def main() -> None:
    """Entry point: run the app, turning user errors into one clear line and exit status 2."""
    try:
        app(standalone_mode=False)
    except LayerlabError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.secho("interrupted: finished results are kept; re-run the same command to resume", err=True)
        sys.exit(130)
    except Exception as e:  # click usage errors carry their own exit code
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        raise
