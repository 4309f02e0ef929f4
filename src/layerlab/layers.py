"""The learnable layers an analysis walks over, with display labels: a thin public face of
:mod:`layerlab.structure`, which reads them off any model (timm's own block names first, else the module tree).

Layers are every Conv2d, Linear and ``nn.MultiheadAttention`` input projection. Normalisation layers (BatchNorm,
LayerNorm, GroupNorm, ...) are listed only with ``norm=True``: Gavrikov et al. 2024 never randomise them, and
criticality follows the paper by default (METHODS.md section 1).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Callable, Sequence, TypeVar

import torch
from torch import nn

from .errors import LayerlabError
from .structure import LayerInfo, block_units, is_norm, learnable_layers

__all__ = ["LayerInfo", "display_label", "list_layers", "pick_by_name", "resolve_layers", "residual_blocks",
           "unknown_layer"]

T = TypeVar("T")
_RESNET_BLOCK = re.compile(r"(?:^|\.)layer(\d+)\.(\d+)\.(.+)$")
_VIT_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.(.+)$")


def display_label(name: str) -> str:
    """A label from a layer's path alone: ``layer3.5.conv2`` -> ``[3.5] conv2``; ``blocks.2.attn.qkv`` ->
    ``[2] attn.qkv``; else the path. With the model at hand, ``LayerInfo.label`` (read off its structure) is the
    better label for other architectures."""
    inner = name[4:] if name.startswith("net.") else name
    if m := _RESNET_BLOCK.search(inner):
        return f"[{m.group(1)}.{m.group(2)}] {m.group(3)}"
    if m := _VIT_BLOCK.search(inner):
        return f"[{m.group(1)}] {m.group(2)}"
    return inner


def _forward_order(model: nn.Module, names: list[str], sample: torch.Tensor | None) -> list[str]:
    """Order ``names`` by when their forward first runs on ``sample`` (module order for unused layers)."""
    if sample is None:
        return names
    modules = dict(model.named_modules())
    seen: list[str] = []
    hooks = [
        modules[n].register_forward_pre_hook(lambda m, a, n=n: seen.append(n) if n not in seen else None)
        for n in names
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(sample)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return seen + [n for n in names if n not in seen]


def list_layers(model: nn.Module, sample: torch.Tensor | None = None, norm: bool = False) -> list[LayerInfo]:
    """The learnable layers of ``model`` (Conv2d, Linear, MultiheadAttention in_proj; with ``norm`` also the
    normalisation layers' affine parameters) with stable names and labels from their block
    (:func:`layerlab.structure.learnable_layers`: ``[3.1] conv2``, ``[4] attn.qkv``).

    Order is module-registration order, which is forward order for timm/torchvision ResNets and ViTs; pass a
    ``sample`` batch to order by an actual forward pass instead (for models that register out of order).

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    >>> [(i.name, i.kind, i.params) for i in list_layers(net)]
    [('0', 'Conv2d', 224), ('3', 'Linear', 2890)]
    >>> [i.kind for i in list_layers(net, norm=True)]
    ['Conv2d', 'BatchNorm2d', 'Linear']
    """
    infos = learnable_layers(model, norm)
    if sample is None:
        return infos
    by_name = {i.name: i for i in infos}
    ordered = _forward_order(model, list(by_name), sample)
    return [dataclasses.replace(by_name[n], index=k) for k, n in enumerate(ordered)]


def unknown_layer(model: nn.Module, name: str, close: list[str]) -> str:
    """The message for a requested layer that is not among the units: a normalisation layer asked for without
    ``norm=True`` says how to opt in; anything else lists close matches."""
    every = {i.name: i for i in learnable_layers(model, norm=True)}
    hit = every.get(name) or next((i for i in every.values() if i.label == name), None)
    if hit is not None and is_norm(model.get_submodule(hit.name)):
        return (f"layer {name!r} is a normalisation layer ({hit.kind}), not a learnable Conv2d/Linear: Gavrikov et al. "
                "never randomise them; pass norm=True (CLI: --norm) to include normalisation layers")
    return (f"layer {name!r} does not exist or is not a learnable Conv2d/Linear"
            + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")
            + "; list them with `layerlab layers SPEC`")


def resolve_layers(model: nn.Module, requested: list[str] | None, norm: bool = False) -> list[LayerInfo]:
    """The requested layers (by name or label), or all of them; unknown names raise with close matches."""
    infos = list_layers(model, norm=norm)
    if not requested:
        return infos
    return pick_by_name(infos, requested, lambda r, close: unknown_layer(model, r, close))


def pick_by_name(items: Sequence[T], requested: Sequence[str], unknown: Callable[[str, list[str]], str]) -> list[T]:
    """The items named in ``requested`` (by ``.name`` or ``.label``), in that order.

    An unknown name raises LayerlabError with ``unknown(name, close_matches)`` as its message.
    """
    by_key = {i.name: i for i in items} | {i.label: i for i in items}
    out = []
    for r in requested:
        if r not in by_key:
            raise LayerlabError(unknown(r, difflib.get_close_matches(r, list(by_key), n=3)))
        out.append(by_key[r])
    return out


def residual_blocks(model: nn.Module) -> dict[str, list[str]]:
    """Learnable layers grouped into residual/transformer blocks (``layer3.5``, ``blocks.2``), every layer outside
    blocks (stem, head) on its own: :func:`layerlab.structure.block_units`.

    Used for Zhang et al.'s block-level resets (``--units blocks``).
    """
    return block_units(model)
