"""Figures from layerlab result tables (matplotlib, Agg; PNG and SVG)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .colors import color_of, colors_for

__all__ = ["MIN_LINE_POINTS", "color_of", "colors_for", "plot_series", "save_figure"]

#: A series is drawn as a line only through this many distinct x values or more; fewer are drawn as unconnected
#: markers (a line through two points draws a trend that two points cannot show).
MIN_LINE_POINTS = 3


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


def plot_series(ax: Any, x: Sequence, y: Sequence, *, linestyle: str = "-", marker: str | None = None, **kw: Any) -> Any:
    """``ax.plot(x, y)`` as a line through :data:`MIN_LINE_POINTS` or more distinct x values, as markers (``marker``
    or ``o``) without a connecting line through fewer; returns the ``Line2D``. The one way per-run series are drawn."""
    if len(set(x)) < MIN_LINE_POINTS:
        linestyle, marker = "none", marker or "o"
    (line,) = ax.plot(x, y, linestyle=linestyle, marker=marker, **kw)
    return line
