"""What both analyses (:func:`~layerlab.criticality.criticality`, :func:`~layerlab.criticality.module_criticality`)
share around their jobs: the analysis names and the version that key stored shards, the models as named, each
model's run, the device and the progress bar."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LayerlabError
from ..runtime import progress, resolve_device

__all__ = ["ANALYSIS", "MODULE_ANALYSIS", "ModelLike", "VERSION"]

ANALYSIS = "criticality"
MODULE_ANALYSIS = "module-criticality"
VERSION = 2  # bump when the numbers a job produces change; old shards are then recomputed
# 2: fresh instances and module-criticality noise from purpose streams (layerlab.seeds), not seed + t;
#    module criticality searches sigma by bisection on a log scale

ModelLike = nn.Module | str  # a spec like 'timm:resnet18', or a model


def _named_models(models: ModelLike | Sequence[ModelLike] | Mapping[str, ModelLike]) -> dict[str, ModelLike]:
    if isinstance(models, Mapping):
        named = dict(models)
    else:
        seq = [models] if isinstance(models, (str, nn.Module)) else list(models)
        named = {}
        for k, m in enumerate(seq):
            name = m if isinstance(m, str) else getattr(m, "layerlab_spec", None) or f"model{k}"
            if name in named:
                raise LayerlabError(f"model {name!r} is listed twice; pass {{name: model}} to name them apart")
            named[name] = m
    if not named:
        raise LayerlabError("no model given; pass a spec like 'timm:resnet18', a model, or {name: spec}")
    for name, m in named.items():
        if not isinstance(m, (str, nn.Module)):
            raise LayerlabError(f"model {name!r}: expected a spec string or an nn.Module, got {type(m).__name__}")
    return named


def _device(device: str | torch.device | None, named: Mapping[str, ModelLike]) -> torch.device:
    """layerlab's device policy (:func:`layerlab.runtime.resolve_device`); ``None``: where the first model given
    as an ``nn.Module`` is (models are never moved: the pipeline holds its own copies), else the CPU."""
    first = next((m for m in named.values() if isinstance(m, nn.Module)), None)
    return resolve_device(device, first)


def _run_for(name: str, run: str | Path | Mapping[str, str | Path] | None, n_models: int) -> Path | None:
    if run is None:
        return None
    if isinstance(run, Mapping):
        r = run.get(name)
        return Path(r) if r is not None else None
    if n_models > 1:
        raise LayerlabError("one run directory cannot serve several models; pass run={model name: RUN_DIR}")
    return Path(run)


def _progress(total: int, enabled: bool, desc: str) -> Any:
    # delay: a bar appears only once work has gone on for a second, so an input error found on the first batch
    # is the only line the user sees
    return progress(total=total, enabled=enabled, desc=desc, unit="job", dynamic_ncols=True, delay=1.0, leave=True)
