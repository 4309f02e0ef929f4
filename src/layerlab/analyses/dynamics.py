"""Training dynamics over one run's checkpoints (Sharon & Dar 2024): its contract. The analysis lives in
:mod:`layerlab.dynamics`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..analysis import Analysis, job_options, register
from ..dynamics import TABLES, TRIPLET_TABLE, DynamicsConfig, dynamics
from ..store import job_key

TRAINING_TABLE = "dynamics-training"


def job(config: dict[str, Any], out: Path, store: Any) -> None:
    """One zoo run: the API call with ``store`` (one shard per (table, layer), as a direct call writes), plus the
    run's training curves."""
    opts = job_options(config)
    parts = dynamics(config["run"], config["data"], device=config["device"], store=store, progress=False, **opts)
    key = job_key(config["run"], TRAINING_TABLE, {})
    if not store.has(TRAINING_TABLE, key):
        store.write(TRAINING_TABLE, key, parts["training"].assign(model=config["name"]), {"model": config["name"]})


register(Analysis(
    "dynamics", tables=(TABLES["cka"], TABLES["probes"], TABLES["drs"], TRIPLET_TABLE, TRAINING_TABLE),
    config=DynamicsConfig, job=job, needs_run=True, neutral={"tokens": "flatten", "null": 0, "bootstrap": 0},
    cli="layerlab.cli.dynamics:register", demo="layerlab.demos.dynamics:dynamics_step",
    help="How each layer's representation evolves over training: CKA, probes, decision regions (Sharon & Dar 2024).",
))
