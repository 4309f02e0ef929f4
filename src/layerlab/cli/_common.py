"""Small helpers shared by the CLI modules.

Nothing heavy is imported at module level (no torch, pandas or rich): ``layerlab --help`` builds every command's
options from these modules, and must answer without importing torch.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import LayerlabError

if TYPE_CHECKING:
    import pandas as pd

#: one wording of --device and --threads for every command that computes
DEVICE_HELP = "cpu, cuda, cuda:N or auto (cuda where available)."
THREADS_HELP = "torch CPU threads of this process (default: torch's own, usually one per core)."


def check_out(path: Path, *, kind: Literal["folder", "file"] = "folder", option: str = "--out",
              write: bool = True, role: Literal["run", "results"] | None = "results") -> None:
    """Refuse an output path that cannot work, before any model or data is loaded.

    Without this a bad --out failed with a traceback only after the computation had run. Refused: an existing
    path of the other kind, a path under a file, and (``write``) a place where no new file can be made. The
    last is a real probe (a temp file made and removed in the nearest existing folder), not ``os.access``,
    so it is right for root and for read-only mounts. Nothing is left behind. ``role`` refuses the wrong kind
    of folder: analysis results ("results") never go into a training run folder (one with run.json), and a
    training run ("run") goes into a new or empty folder or its own run folder (to resume), never into a
    folder of other files.
    """
    path = Path(path)
    shown = repr(str(path))
    if kind == "folder" and path.is_dir():
        is_run = (path / "run.json").exists()
        if role == "results" and is_run:
            raise LayerlabError(f"{option} {shown} is a training run folder (it holds run.json); write results to a "
                                "folder of their own, e.g. --out out/crit")
        if role == "run" and not is_run and any(path.iterdir()):
            raise LayerlabError(f"{option} {shown} holds other files but no run.json; a training run goes into a new "
                                "(or empty) folder, or into its own run folder to resume it")
    probe = path
    try:
        if path.is_dir():
            if kind == "file":
                raise LayerlabError(f"{option} {shown} is a folder; pass a file path")
            probe = path
        elif path.exists():
            if kind == "folder":
                raise LayerlabError(
                    f"{option} {shown} is an existing file, not a folder; pass a new or an earlier output folder"
                )
            probe = path.absolute().parent
        else:
            probe = next(p for p in path.absolute().parents if p.exists())
            if not probe.is_dir():
                raise LayerlabError(
                    f"{option} {shown} cannot be made: {str(probe)!r} is a file, not a folder; pick another path"
                )
        if write:
            fd, tmp = tempfile.mkstemp(prefix=".layerlab-write-probe-", dir=probe)
            os.close(fd)
            os.unlink(tmp)
    except OSError as e:
        raise LayerlabError(
            f"{option} {shown} is not writable (no new file in {str(probe)!r}: {e.strerror}); "
            "pick a folder you can write to"
        ) from None


def set_threads(threads: int | None) -> None:
    """``--threads N``: torch's CPU threads for this process (None or 0: torch's own default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['lr=0.1', 'augment=augmix'] -> {'lr': 0.1, 'augment': 'augmix'}."""
    from ..models.specs import _parse_value  # values parse as in model specs

    out = {}
    for item in items:
        if "=" not in item:
            raise LayerlabError(f"--set expects FIELD=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v.strip())
    return out


def print_frame(df: pd.DataFrame, title: str = "", max_rows: int = 60) -> None:
    """Print a DataFrame as a rich table (floats to 4 significant digits)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title or None)
    for c in df.columns:
        t.add_column(str(c))
    for _, row in df.head(max_rows).iterrows():
        t.add_row(*[_cell(v) for v in row])
    Console(width=200).print(t)
    if len(df) > max_rows:
        Console().print(f"... {len(df) - max_rows} more rows")


def _cell(v: object) -> str:
    """One printed cell: floats to 4 significant digits, a list (per-image values) by its length."""
    import pandas as pd

    if v is None or v is pd.NA or (isinstance(v, float) and v != v):
        return ""  # a missing value (an empty CSV field, a NaN): blank, not "nan"
    if isinstance(v, float):
        return f"{v:.4g}"
    if hasattr(v, "__len__") and not isinstance(v, str):
        return f"[{len(v)} values]"  # type: ignore[arg-type]
    return str(v)
