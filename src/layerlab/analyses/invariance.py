"""Invariances under finetuning (Merlin et al. 2023): its contract, and how a sweep's ``pairs`` become jobs. The
analysis lives in :mod:`layerlab.invariance`."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from .. import invariance as inv
from ..analysis import Analysis, config_of, job_options, register
from ..errors import SpecError
from ..registry import check_fields

ROLES = ("pretrained", "finetuned", "scratch")
DROP = ("pretrained", "finetuned", "scratch", "data", "device", "cache", "cache_dir", "store", "progress")


def pairs(options: dict[str, Any], models: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """One job per ``pairs`` entry {pretrained: NAME, finetuned: NAME, scratch: NAME (optional)} of sweep models."""
    listed = options.get("pairs")
    where = "analysis 'invariance'"
    if not isinstance(listed, list) or not listed:
        raise SpecError(f"{where} needs 'pairs': a list of {{pretrained: NAME, finetuned: NAME, scratch: NAME}} "
                        f"naming models of this sweep ({', '.join(models) or 'none'})")
    rest = {k: v for k, v in options.items() if k != "pairs"}
    jobs = []
    for pair in listed:
        if not isinstance(pair, dict) or not {"pretrained", "finetuned"} <= set(pair):
            raise SpecError(f"{where}: each pair needs 'pretrained' and 'finetuned' model names, got {pair!r}")
        check_fields(f"{where} pair", list(pair), ROLES)
        for role, name in pair.items():
            if name not in models:
                close = difflib.get_close_matches(str(name), list(models), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SpecError(f"{where}: {role} model {name!r} is not in this sweep{hint}; "
                                f"its models: {', '.join(models)}")
        label = f"{pair['pretrained']}->{pair['finetuned']}" + (f"|{pair['scratch']}" if pair.get("scratch") else "")
        jobs.append((label, {**rest, **{role: models[name] for role, name in pair.items()}}))
    return jobs


def job(config: dict[str, Any], out: Path, store: Any) -> None:
    """STIR grid of one (pretrained, finetuned[, scratch]) pair into ``store`` (the shards a direct call writes);
    inversions cached under ``OUT/cache/inversions``."""
    opts = job_options(config, "version", "pairs", *ROLES)
    inv.invariance_grid(config["pretrained"], config["finetuned"], config.get("scratch"), config["data"],
                        device=config["device"], cache_dir=Path(out) / "cache" / "inversions", store=store, **opts)


register(Analysis(
    inv.ANALYSIS, tables=(inv.ANALYSIS, inv.INVERSIONS, inv.SUMMARY),
    config=config_of(inv.invariance_grid, "InvarianceConfig", drop=DROP, version=inv.VERSION, pairs=None),
    job=job, per_model=False, expand=pairs, neutral={"input_range": [0.0, 1.0], "pairs": None},
    cli="layerlab.cli.invariance:register", demo="layerlab.demos.invariance:demo_invariance",
    help="STIR between a pretrained and a finetuned model: retention, transfer, compression (Merlin et al. 2023).",
))
