"""A toy analysis declared through the contract alone (tests/test_contract.py): nothing else in layerlab names it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from layerlab.analysis import Analysis, register
from layerlab.store import Store, job_key


@dataclass(frozen=True)
class ToyConfig:
    rows: int = field(default=3, metadata={"help": "Rows (units) per model."})
    scale: float = 1.0
    loud: bool = False

    def __post_init__(self) -> None:
        if self.rows < 1:
            from layerlab.errors import SpecError

            raise SpecError(f"toy: rows must be >= 1, got {self.rows}")


def toy(models: dict[str, str], data: str, *, store: Store | None = None, rows: int = 3, scale: float = 1.0,
        loud: bool = False) -> pd.DataFrame:
    """The API: one row per (model, unit); with ``store`` one shard per unit, skipped when it exists."""
    frames = []
    for name, spec in models.items():
        for r in range(rows):
            frame = pd.DataFrame([{"model": name, "unit": r, "value": len(spec) * scale + r, "data": data}])
            key = job_key(name, "toy", {"spec": spec, "unit": r, "scale": scale, "data": data})
            if store is not None and not store.has("toy", key):
                store.write("toy", key, frame, {"model": name})
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def job(config: dict[str, Any], out: Path, store: Store) -> None:
    toy({config["name"]: config["model"]}, config["data"], store=store, rows=config["rows"], scale=config["scale"])


def summary(table: pd.DataFrame) -> pd.DataFrame:
    return table.groupby("model", as_index=False)["value"].sum().rename(columns={"value": "toy total"})


def demo(ctx: Any) -> None:
    """The toy's demo step: its table for two made-up models."""
    toy({"a": "spec-a", "b": "spec-bb"}, "digits", store=ctx.store)


TOY = register(Analysis("toy", tables=("toy",), config=ToyConfig, job=job, summary=summary, demo=demo,
                        help="A toy analysis (tests only)."))
