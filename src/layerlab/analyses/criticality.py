"""Layer criticality (Gavrikov et al. 2024; Zhang et al. 2022 resets) and module criticality (Chatterji et al.
2020): their contracts. The analyses themselves live in :mod:`layerlab.criticality`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .. import criticality as crit
from ..analysis import Analysis, config_of, job_options, register

DROP = ("models", "data", "device", "progress", "store", "run")


def _job(fn: Callable[..., Any]) -> Callable[[dict[str, Any], Path, Any], None]:
    def job(config: dict[str, Any], out: Path, store: Any) -> None:
        """One model: the API call with ``store``, so its per-unit shards are the ones a direct call writes."""
        opts = job_options(config, "version")
        if config.get("run"):
            opts["run"] = {config["name"]: config["run"]}
        fn({config["name"]: config["model"]}, config["data"], device=config["device"], progress=False, store=store,
           **opts)

    return job


register(Analysis(
    crit.ANALYSIS, tables=(crit.ANALYSIS,), config=config_of(crit.criticality, "CriticalityConfig", drop=DROP,
                                                               version=crit.VERSION),
    job=_job(crit.criticality), neutral={"norm": False, "precision": None, "shift": None, "over_training": False},
    cli="layerlab.cli.criticality:register",
    demo="layerlab.demos.criticality:step",
    help="Re-randomise each layer and measure how far the softmax output moves (Gavrikov et al. 2024).",
))
register(Analysis(
    crit.MODULE_ANALYSIS, tables=(crit.MODULE_ANALYSIS,),
    config=config_of(crit.module_criticality, "ModuleCriticalityConfig", drop=DROP, version=crit.VERSION),
    job=_job(crit.module_criticality), needs_run=True, neutral={"norm": False}, command="criticality",
    help="Module criticality (Chatterji et al. 2020): the largest weight noise a module tolerates.",
))
