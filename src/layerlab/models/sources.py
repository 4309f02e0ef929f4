"""The ``timm:`` and ``torchvision:`` model sources; pretrained weights come from the local caches only.

Pretrained models are wrapped in :class:`~layerlab.models.Normalized` with their own mean and std, so every
model takes images in [0, 1]; layerlab never downloads.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LayerlabError, SpecError
from ..registry import close_names, did_you_mean
from .normalized import IMAGENET_MEAN, IMAGENET_STD, Normalized
from .specs import MODEL_SOURCES, _format_value


# --------------------------------------------------------------------------------------------------- timm
@MODEL_SOURCES.register("timm")
def _timm_model(name: str, weights: str | None, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    kwargs = dict(kwargs)
    pretrained = bool(kwargs.pop("pretrained", False)) or "." in name
    base = name.split(".")[0]
    if not timm.is_model(base):
        raise SpecError(f"timm has no model {base!r}{did_you_mean(close_names(base, timm.list_models()))}; "
                        f"list them with timm.list_models('{base[:4]}*')")
    if not pretrained:
        return timm.create_model(base, pretrained=False, **kwargs)
    path = _timm_cached_weights(name)
    net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    cfg = net.pretrained_cfg
    model = Normalized(net, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)))
    model.layerlab_arch = f"timm:{base}" + ("?" + "&".join(f"{k}={_format_value(v)}" for k, v in kwargs.items()) if kwargs else "")
    return model


def _timm_cached_weights(name: str) -> Path:
    """The local file of a timm pretrained tag: the Hugging Face cache or the torch hub cache; never downloads."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise SpecError(f"timm has no pretrained tag {name!r}; list them with timm.list_pretrained('{name.split('.')[0]}*')")
    if cfg.file and Path(cfg.file).exists():
        return Path(cfg.file)
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            hit = try_to_load_from_cache(cfg.hf_hub_id, fname)
            if isinstance(hit, str) and os.path.exists(hit):
                return Path(hit)
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if cached.exists():
            return cached
    where = f"the Hugging Face cache (repo {cfg.hf_hub_id})" if cfg.hf_hub_id else f"{torch.hub.get_dir()}/checkpoints"
    raise LayerlabError(
        f"weights for timm:{name} are not in the local cache ({where}); layerlab never downloads. "
        f"Fetch them once with `python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` on a "
        "networked machine, or save the model and load it with 'file:PATH'"
    )


# --------------------------------------------------------------------------------------------- torchvision
@MODEL_SOURCES.register("torchvision")
def _torchvision_model(name: str, weights: str | None, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    kwargs = dict(kwargs)
    kwargs.pop("pretrained", None)
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        close = close_names(name, torchvision.models.list_models())
        raise SpecError(f"torchvision has no model {name!r}{did_you_mean(close)}; "
                        "list them with torchvision.models.list_models()") from None
    if weights is None:
        return builder(weights=None, **kwargs)
    try:
        w = torchvision.models.get_model_weights(name)[weights]
    except KeyError:
        known = [e.name for e in torchvision.models.get_model_weights(name)]
        raise SpecError(f"torchvision:{name} has no weights {weights!r}; known: {', '.join(known)}") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
    if not cached.exists():
        raise LayerlabError(
            f"weights {name}:{weights} are not in the local torch hub cache ({cached}); layerlab never downloads. "
            f"Copy the file there (it is {w.url}) or load a saved model with 'file:PATH'"
        )
    net = builder(weights=None, **kwargs)
    net.load_state_dict(torch.load(cached, map_location="cpu", weights_only=True))
    mean = tuple(w.transforms().mean) if hasattr(w.transforms(), "mean") else IMAGENET_MEAN
    std = tuple(w.transforms().std) if hasattr(w.transforms(), "std") else IMAGENET_STD
    model = Normalized(net, mean, std)
    model.layerlab_arch = f"torchvision:{name}" + (
        "?" + "&".join(f"{k}={_format_value(v)}" for k, v in kwargs.items()) if kwargs else ""
    )
    return model
