"""Model specs: the registry of model sources and the one way in, ``load_model(spec)``.

A spec is ``source:name[:weights][?k=v&...]`` (the forms are listed in :mod:`layerlab.models`); each source
registers a function ``(name, weights, kwargs) -> nn.Module`` in :data:`MODEL_SOURCES` (``timm:`` and
``torchvision:`` in :mod:`layerlab.models.sources`, ``file:`` in :mod:`layerlab.models.checkpoints`).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qsl

import torch
from torch import nn

from ..errors import SpecError
from ..registry import Registry

TRUST_PICKLE_ENV = "LAYERLAB_TRUST_PICKLE"  # "1": unpickle whole modules from file: specs (the CLI's opt-in)

MODEL_SOURCES: Registry[Callable[..., nn.Module]] = Registry("model source")
#: sources registered by a module outside the model layer, imported on first use (a name, not an import, so that
#: models/ does not depend on the layers above it): ``pruned:`` is :mod:`layerlab.prune.spec`'s
LAZY_SOURCES = {"pruned": "layerlab.prune.spec"}


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: ``source:name[:weights][?kwargs]``."""

    source: str
    name: str
    weights: str | None
    kwargs: dict[str, Any]

    @classmethod
    def parse(cls, spec: str) -> "ModelSpec":
        if not isinstance(spec, str) or ":" not in spec:
            raise SpecError(
                f"model spec {spec!r} has no source; write e.g. 'timm:resnet18', "
                "'torchvision:resnet50:IMAGENET1K_V2' or 'file:path/to/checkpoint.pt'"
            )
        source, rest = spec.split(":", 1)
        if source in LAZY_SOURCES and source not in MODEL_SOURCES:
            importlib.import_module(LAZY_SOURCES[source])
        MODEL_SOURCES.get(source)  # validates the source early, with suggestions
        if source == "file":
            return cls(source, rest, None, {})
        query = ""
        if "?" in rest:
            rest, query = rest.split("?", 1)
        name, _, weights = rest.partition(":")
        if not name:
            raise SpecError(f"model spec {spec!r} names no architecture after '{source}:'")
        return cls(source, name, weights or None, {k: _parse_value(v) for k, v in parse_qsl(query)})

    def __str__(self) -> str:
        if self.source == "file":
            return f"file:{self.name}"
        s = f"{self.source}:{self.name}" + (f":{self.weights}" if self.weights else "")
        if self.kwargs:
            s += "?" + "&".join(f"{k}={_format_value(v)}" for k, v in self.kwargs.items())
        return s


def _parse_value(v: str) -> Any:
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, '16,32' -> (16, 32), else the string."""
    if "," in v:
        return tuple(_parse_value(p) for p in v.split(",") if p)
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _format_value(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(_format_value(p) for p in v)
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def load_model(
    spec: str,
    *,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    trust_pickle: bool | None = None,
) -> nn.Module:
    """Build the model a spec names, in eval mode, with ``layerlab_arch``/``layerlab_spec`` attributes set.

    ``file:`` checkpoints are read with ``torch.load(weights_only=True)``. A whole module saved with
    ``torch.save(model)`` can only be unpickled, which runs code from the file: pass ``trust_pickle=True`` for a
    file you trust (default: the environment variable ``LAYERLAB_TRUST_PICKLE=1``), else it is an error that says
    so. A model loaded that way remembers the opt-in (``model.layerlab_trust_pickle``) for the checkpoints and
    fresh instances derived from it.
    """
    parsed = ModelSpec.parse(spec)
    kwargs = dict(parsed.kwargs)
    if num_classes is not None and parsed.source != "file":
        kwargs["num_classes"] = num_classes
    if parsed.source == "file":
        kwargs["trust_pickle"] = trusts_pickle(trust_pickle)
    model = MODEL_SOURCES.get(parsed.source)(parsed.name, parsed.weights, kwargs)
    model.layerlab_spec = spec
    if parsed.source == "file" and kwargs["trust_pickle"]:
        model.layerlab_trust_pickle = True
    if not hasattr(model, "layerlab_arch"):
        # A whole module saved with torch.save carries no architecture spec: no fresh instance can be made of it.
        model.layerlab_arch = None if parsed.source == "file" else str(ModelSpec(parsed.source, parsed.name, None, _arch_kwargs(kwargs)))
    return model.to(device).eval()


@torch.no_grad()
def num_outputs(model: nn.Module, sample: torch.Tensor) -> int:
    """How many logits ``model`` returns, measured on ``sample`` (float images [N, C, H, W]; one is enough).

    Measured rather than read from a head attribute, so it holds for every wrapper (Normalized, TrAct, timm heads).
    """
    from ..runtime import eval_mode

    device = next(iter(model.parameters()), torch.empty(0)).device
    with eval_mode(model), torch.no_grad():
        out = model(sample[:1].to(device))
    return int(out.shape[-1])


def trusts_pickle(trust_pickle: bool | None = None) -> bool:
    """Whether whole pickled modules may be loaded: ``trust_pickle`` when given, else ``LAYERLAB_TRUST_PICKLE=1``."""
    if trust_pickle is not None:
        return bool(trust_pickle)
    return os.environ.get(TRUST_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _arch_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k != "pretrained"}
