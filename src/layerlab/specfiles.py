"""YAML spec files (zoos, sweeps) given as a path or as the name of a file shipped with layerlab.

One place for the rules every spec loader shares: a path that looks like a file must exist; a bare name is looked
up among the built-in files of that kind; the YAML must parse to a mapping. Errors say what was tried and what
exists.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import LayerlabError, SpecError

__all__ = ["builtin_file", "read_spec"]


def _known(folder: str) -> list[str]:
    root = resources.files("layerlab") / folder
    return sorted(f.name.removesuffix(".yaml") for f in root.iterdir() if f.name.endswith(".yaml"))


def builtin_file(kind: str, folder: str, name: str) -> Path:
    """Path of the built-in ``kind`` file ``name`` (layerlab/<folder>/<name>.yaml); lists the others if absent."""
    p = resources.files("layerlab") / folder / f"{name}.yaml"
    if not p.is_file():
        raise SpecError(
            f"no {kind} file {name!r} and no built-in {kind} of that name; built-in {kind}s: "
            f"{', '.join(_known(folder))}"
        )
    return Path(str(p))


def read_spec(path: str | Path, kind: str, folder: str, shape: str = "") -> tuple[Path, dict[str, Any]]:
    """(resolved path, parsed mapping) of a ``kind`` file given as a YAML path or a built-in name.

    ``shape`` describes the expected top-level keys for the error raised when the file is not a mapping.
    """
    p = Path(path)
    if not p.exists():
        if p.suffix in (".yaml", ".yml") or "/" in str(path):
            raise LayerlabError(
                f"{kind} file {str(p)!r} does not exist; pass a YAML file or a built-in name "
                f"({', '.join(_known(folder))})"
            )
        p = builtin_file(kind, folder, str(path))
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SpecError(f"{kind} file {p} is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{kind} file {p} must be a YAML mapping{shape and ' with ' + shape}, got {type(doc).__name__}")
    return p, doc
