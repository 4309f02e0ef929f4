"""Block removal: which blocks of a model can be removed, and the model with some of them replaced by their
shortcut.

A residual or transformer block computes ``act(shortcut(x) + branch(x))``; removing it leaves ``act(shortcut(x))``
(:class:`RemovedBlock`): the identity for a ViT block (``x + attn(...) + mlp(...)``, no activation), the downsample
path and the block's final activation for the first block of a ResNet stage (timm's ``BasicBlock`` applies ``act2``
after the add). So a block whose residual branch outputs zero computes exactly what its removal computes.

Blocks are found as the model describes itself (:func:`layerlab.structure.find_blocks`: timm's ``group_matcher``,
else the module tree); what a block's shortcut is comes from :data:`SHORTCUTS`, one line per block class
(:func:`shortcut_rule`), because no attribute says whether an activation follows the add. A block of a class
without a rule is not removable, and a model without any removable block is an error that says how to add one.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import nn

from .. import structure
from ..errors import LayerlabError

__all__ = ["SHORTCUTS", "Block", "RemovedBlock", "Shortcut", "core_of", "count_params", "removable_blocks",
           "remove_blocks", "replacement", "shortcut_rule"]


@dataclass(frozen=True)
class Shortcut:
    """What a block class computes without its residual branch: ``act(path(x))``. ``path`` and ``act`` name the
    block's own submodules (None: identity, no activation); ``when`` names a boolean attribute that must be true
    for the block to have a shortcut at all (an EfficientNet block skips only when shapes allow, ``has_skip``)."""

    path: str | None = None
    act: str | None = None
    when: str | None = None


#: (module of the class, class name) -> its :class:`Shortcut`; a subclass inherits its base's rule
SHORTCUTS: dict[tuple[str, str], Shortcut] = {}


def shortcut_rule(module: str, name: str, *, path: str | None = None, act: str | None = None,
                  when: str | None = None) -> Shortcut:
    """Declare the shortcut of the block class ``module.name`` (e.g. your own architecture's), making its blocks
    removable."""
    rule = Shortcut(path, act, when)
    SHORTCUTS[(module, name)] = rule
    return rule


shortcut_rule("timm.models.resnet", "BasicBlock", path="downsample", act="act2")
shortcut_rule("timm.models.resnet", "Bottleneck", path="downsample", act="act3")
shortcut_rule("torchvision.models.resnet", "BasicBlock", path="downsample", act="relu")
shortcut_rule("torchvision.models.resnet", "Bottleneck", path="downsample", act="relu")
shortcut_rule("timm.models.vision_transformer", "Block")
shortcut_rule("timm.models.vision_transformer", "ResPostBlock")
shortcut_rule("torchvision.models.vision_transformer", "EncoderBlock")
shortcut_rule("timm.models.convnext", "ConvNeXtBlock", path="shortcut")
for _name in ("InvertedResidual", "DepthwiseSeparableConv", "EdgeResidual", "UniversalInvertedResidual"):
    shortcut_rule("timm.models._efficientnet_blocks", _name, when="has_skip")


class RemovedBlock(nn.Module):
    """A removed block: ``act(path(x))``. The shortcut path keeps the block's attribute name (``downsample``,
    ``shortcut``), so its parameters keep their names in the state dict; the activation runs out of place."""

    def __init__(self, path_name: str | None = None, path: nn.Module | None = None, act: nn.Module | None = None):
        super().__init__()
        self.path_name = path_name if path is not None else None
        if path is not None:
            self.add_module(path_name or "path", path)
        self.act = act

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.path_name is not None:
            x = getattr(self, self.path_name)(x)
        return self.act(x) if self.act is not None else x

    def extra_repr(self) -> str:
        return "identity" if self.path_name is None and self.act is None else ""


def _rule(block: nn.Module) -> Shortcut | None:
    for cls in type(block).__mro__:
        rule = SHORTCUTS.get((cls.__module__, cls.__name__))
        if rule is not None:
            return rule if rule.when is None or bool(getattr(block, rule.when, False)) else None
    return None


def _out_of_place(act: nn.Module | None) -> nn.Module | None:
    if act is None:
        return None
    act = copy.deepcopy(act)
    if hasattr(act, "inplace"):
        act.inplace = False  # an in-place ReLU on an identity shortcut would overwrite the block's input
    return act


def replacement(block: nn.Module) -> RemovedBlock | None:
    """The module a block becomes when removed (sharing the block's shortcut modules), or None (not removable)."""
    rule = _rule(block)
    if rule is None:
        return None
    path = getattr(block, rule.path, None) if rule.path else None
    act = getattr(block, rule.act, None) if rule.act else None
    return RemovedBlock(rule.path, path, _out_of_place(act))


def count_params(module: nn.Module) -> int:
    """Parameters of ``module`` (each tensor once)."""
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class Block:
    """A removable block: its path in the model, display label, and the parameters removing it saves."""

    name: str
    label: str
    index: int
    kind: str
    params: int


def core_of(model: nn.Module) -> tuple[nn.Module, str]:
    """The network inside a ``Normalized`` wrapper and the prefix of its paths (``net.``), else the model and ""."""
    from ..models import Normalized

    return (model.net, "net.") if isinstance(model, Normalized) else (model, "")


def removable_blocks(model: nn.Module) -> list[Block]:
    """The model's removable blocks in forward order; a LayerlabError that names the blocks found (if any) when
    none can be removed."""
    found = structure.find_blocks(model)
    modules = dict(model.named_modules())
    out = []
    for name in found:
        block = modules[name]
        swap = replacement(block)
        if swap is not None:
            out.append(Block(name, structure.block_label(name), len(out), type(block).__name__,
                             count_params(block) - count_params(swap)))
    if not out:
        kinds = sorted({type(modules[n]).__name__ for n in found})
        seen = (f"its blocks ({', '.join(found[:3])}{' ...' if len(found) > 3 else ''}) are of class(es) "
                f"{', '.join(kinds)}, which have no shortcut rule" if found else "it has no residual or transformer blocks")
        raise LayerlabError(
            f"{type(core_of(model)[0]).__name__} has no removable blocks: {seen}. Block removal needs blocks of the "
            "form act(shortcut(x) + branch(x)) (ResNet, ViT, ConvNeXt, EfficientNet skip blocks); for your own "
            "block class declare its shortcut with layerlab.prune.shortcut_rule(module, class_name, path=..., act=...)"
        )
    return out


def remove_blocks(model: nn.Module, names: list[str] | tuple[str, ...]) -> nn.Module:
    """A copy of ``model`` in which each block in ``names`` is replaced by its :class:`RemovedBlock`; the model
    itself is left as it was. Names are paths in ``model`` (``net.layer1.1`` inside a ``Normalized`` wrapper)."""
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    for name in names:
        block = modules.get(name)
        swap = replacement(block) if block is not None else None
        if swap is None:
            known = [b.name for b in removable_blocks(model)]
            raise LayerlabError(f"block {name!r} cannot be removed: it is not a removable block of this model; its "
                                f"removable blocks are {', '.join(known)}")
        parent, _, child = name.rpartition(".")
        (out.get_submodule(parent) if parent else out).register_module(child, swap)
    return out  # a deep copy: the layerlab_* attributes (arch, spec) travel along; callers update the arch
