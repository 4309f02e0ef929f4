"""Block removal by criticality, block influence, angular distance, random choice and magnitude: its contract. The
analysis lives in :mod:`layerlab.prune`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import prune as pr
from ..analysis import Analysis, config_of, job_options, register

DROP = ("models", "data", "device", "store", "progress")


def job(config: dict[str, Any], out: Path, store: Any) -> None:
    """One model: the API call with ``store``, so its per-job shards (and checkpoints) are the ones a direct call
    writes."""
    pr.prune({config["name"]: config["model"]}, config["data"], device=config["device"], store=store, progress=False,
             **job_options(config, "version"))


register(Analysis(
    pr.ANALYSIS, tables=(pr.ANALYSIS, pr.SCORES), config=config_of(pr.prune, "PruneConfig", drop=DROP,
                                                                    version=pr.VERSION),
    job=job, cli="layerlab.cli.prune:register", figures="layerlab.plots.prune:figures",
    demo="layerlab.demos.prune:demo_prune",
    help="Remove whole blocks chosen by criticality, block influence, angular distance or at random, against "
         "magnitude pruning; accuracy before and after healing.",
))
