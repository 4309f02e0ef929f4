"""Small helpers shared by the CLI modules."""
from __future__ import annotations

from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from ..errors import LayerlabError
from ..models import _parse_value


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['lr=0.1', 'augment=augmix'] -> {'lr': 0.1, 'augment': 'augmix'}."""
    out = {}
    for item in items:
        if "=" not in item:
            raise LayerlabError(f"--set expects FIELD=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v.strip())
    return out


def print_frame(df: pd.DataFrame, title: str = "", max_rows: int = 60) -> None:
    """Print a DataFrame as a rich table (floats to 4 significant digits)."""
    t = Table(title=title or None)
    for c in df.columns:
        t.add_column(str(c))
    for _, row in df.head(max_rows).iterrows():
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    Console(width=200).print(t)
    if len(df) > max_rows:
        Console().print(f"... {len(df) - max_rows} more rows")
