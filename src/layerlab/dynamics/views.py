"""What a dynamics analysis looks at (Sharon & Dar 2024, arXiv 2405.17377): the layers followed by default (stem
and blocks), the "output" view of the logits, a layer's activation as probe features, and the features of
image batches computed inside the forward hooks."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import structure
from ..features import OUTPUT_KEY, Extractor, as_input, select_layers
from ..models import load_model

__all__ = ["default_layers", "probe_features"]


def default_layers(model: nn.Module) -> list[str]:
    """The stem and every residual/transformer block: the units Sharon & Dar follow, on any model.

    Blocks are :func:`layerlab.structure.find_blocks`'s (``layer3.1``, ``blocks.2``, ``stages.1.blocks.0``); the stem
    is every learnable layer registered before the first block (``conv1``, ``patch_embed.proj``). A model without
    blocks gets every learnable layer but a final Linear head, whose output is the logits that the ``"output"`` view
    always covers.

    >>> default_layers(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2)))
    ['0', '2']
    """
    blocks = structure.find_blocks(model)
    layers = [i.name for i in structure.learnable_layers(model)]
    if blocks:
        order = {name: k for k, (name, _) in enumerate(model.named_modules())}
        return [n for n in layers if order[n] < order[blocks[0]]] + blocks
    if len(layers) > 1 and isinstance(model.get_submodule(layers[-1]), nn.Linear):
        layers = layers[:-1]
    return layers


def probe_features(t: torch.Tensor, pool: int = 2) -> torch.Tensor:
    """A layer's activation as probe features [N, d]: conv maps pooled to pool x pool, tokens averaged (the
    dynamics pass hands it the class token instead with ``tokens="cls"``, :data:`PROBE_TOKENS`)."""
    if t.ndim == 4:
        if pool and (t.shape[-2] > pool or t.shape[-1] > pool):  # never up-sample a small map
            t = F.adaptive_avg_pool2d(t, (min(pool, t.shape[-2]), min(pool, t.shape[-1])))
        return t.flatten(1)
    if t.ndim == 3:
        return t.mean(dim=1)
    return t.reshape(t.shape[0], -1)


def _load(path: Path, device: str | torch.device) -> nn.Module:
    return load_model(f"file:{path}", device=device).eval()


def _resolve_views(model: nn.Module, requested: str | Sequence[str] | None) -> list[str]:
    """The module paths to analyse (:func:`layerlab.features.select_layers`, default :func:`default_layers`), plus
    "output" (the logits) last."""
    requested = [requested] if isinstance(requested, str) else list(requested or [])
    if not requested:
        return default_layers(model) + [OUTPUT_KEY]
    inner = [r for r in requested if r != OUTPUT_KEY]  # ["output"] alone: the logits only
    return [n for n in (select_layers(model, inner) if inner else []) if n != OUTPUT_KEY] + [OUTPUT_KEY]


def _slices(images: torch.Tensor, batch: int) -> Iterator[torch.Tensor]:
    return (images[start : start + batch] for start in range(0, images.shape[0], batch))


def _features(model: nn.Module, layers: list[str], batches: Iterable[torch.Tensor], device: str | torch.device,
              transform: Callable[[torch.Tensor], torch.Tensor], output: bool = False,
              tokens: str = "flatten") -> dict[str, list[torch.Tensor]]:
    """``{view: [transform(features) per batch]}`` over image batches, computed inside the forward hooks."""
    out: dict[str, list[torch.Tensor]] = {}
    with Extractor(model, layers, pool=False, flatten=False, include_output=output, transform=transform,
                   tokens=tokens) as ex:
        for x in batches:
            with torch.inference_mode():
                feats = ex(as_input(x.to(device)))
            for k, v in feats.items():
                out.setdefault(k, []).append(v.cpu())
    return out
