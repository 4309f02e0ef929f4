"""The learnable layers an analysis walks over: every Conv2d and Linear in forward order, with display labels.

Normalisation layers (BatchNorm, LayerNorm, GroupNorm) are never listed: criticality never randomises them
(Gavrikov et al. 2024; METHODS.md section 1).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch
from torch import nn

from .errors import LayerlabError

LEARNABLE = (nn.Conv2d, nn.Linear)
T = TypeVar("T")
_RESNET_BLOCK = re.compile(r"(?:^|\.)layer(\d+)\.(\d+)\.(.+)$")
_VIT_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class LayerInfo:
    """One learnable layer: its module path, a short display label, its type and its parameter count."""

    index: int
    name: str
    label: str
    kind: str
    params: int


def display_label(name: str) -> str:
    """``layer3.5.conv2`` -> ``[3.5] conv2``; ``blocks.2.attn.qkv`` -> ``[2] attn.qkv``; else the path."""
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


def list_layers(model: nn.Module, sample: torch.Tensor | None = None) -> list[LayerInfo]:
    """The learnable Conv2d/Linear layers of ``model`` with stable names and ResNet-style labels.

    Order is module-registration order, which is forward order for timm/torchvision ResNets and ViTs; pass a
    ``sample`` batch to order by an actual forward pass instead (for models that register out of order).

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    >>> [(i.name, i.kind, i.params) for i in list_layers(net)]
    [('0', 'Conv2d', 224), ('3', 'Linear', 2890)]
    """
    names = [n for n, m in model.named_modules() if isinstance(m, LEARNABLE) and n]
    names = _forward_order(model, names, sample)
    modules = dict(model.named_modules())
    return [
        LayerInfo(
            index=i,
            name=n,
            label=display_label(n),
            kind=type(modules[n]).__name__,
            params=sum(p.numel() for p in modules[n].parameters(recurse=False)),
        )
        for i, n in enumerate(names)
    ]


def resolve_layers(model: nn.Module, requested: list[str] | None) -> list[LayerInfo]:
    """The requested layers (by name or label), or all of them; unknown names raise with close matches."""
    infos = list_layers(model)
    if not requested:
        return infos
    return pick_by_name(
        infos,
        requested,
        lambda r, close: f"layer {r!r} does not exist or is not a learnable Conv2d/Linear"
        + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")
        + "; list them with `layerlab layers SPEC`",
    )


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
    """Group learnable layers into residual blocks (``layer3.5``, ``blocks.2``), the stem and the head.

    Used for Zhang et al.'s block-level resets (``--units blocks``).
    """
    groups: dict[str, list[str]] = {}
    for info in list_layers(model):
        inner = info.name[4:] if info.name.startswith("net.") else info.name
        prefix = info.name[: len(info.name) - len(inner)]
        if m := _RESNET_BLOCK.search(inner):
            key = f"{prefix}{inner[: m.start(3) - 1]}"
        elif m := _VIT_BLOCK.search(inner):
            key = f"{prefix}{inner[: m.start(2) - 1]}"
        else:
            key = info.name
        groups.setdefault(key, []).append(info.name)
    return groups
