"""Figures from layerlab result tables (matplotlib, Agg; PNG and SVG)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

__all__ = ["save_figure"]


def save_figure(fig: Any, path: str | Path, formats: Sequence[str] = ("png", "svg"), dpi: int = 150) -> list[Path]:
    """Write ``fig`` as ``path.<fmt>`` for each format, each atomically (a killed run never leaves a torn figure);
    returns the paths. The one figure writer of every analysis' plots."""
    from ..store import atomic_write

    out = []
    for fmt in formats:
        p = Path(path).with_suffix(f".{fmt}")
        atomic_write(p, lambda f, fmt=fmt: fig.savefig(f, format=fmt, dpi=dpi))
        out.append(p)
    return out
