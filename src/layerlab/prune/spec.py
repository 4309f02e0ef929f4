"""The ``pruned:`` model source: the architecture of a pruned model as a spec, so a pruned model saves as an ordinary
layerlab checkpoint and loads again with ``file:PATH`` (and fresh instances of it can be drawn for criticality).

::

    pruned:BASE?removed=PATHS[&masked=true]

``BASE`` is the unpruned architecture (``timm:resnet18?channels=16,32,64,128&num_classes=10``; its own options
stay in the query), ``PATHS`` the removed blocks (paths in the bare network, ``.`` written ``/`` so no path reads as
a number: ``removed=layer1/1,layer3/0``), and ``masked=true`` a model whose Conv2d/Linear weights carry a pruning
mask (``weight = weight_orig * weight_mask``, :mod:`torch.nn.utils.prune`): how a magnitude-pruned model keeps its
zeros while it heals. The source is registered when :mod:`layerlab.prune` is imported.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import SpecError
from ..models.specs import MODEL_SOURCES, ModelSpec, _format_value, load_model
from .magnitude import add_masks
from .surgery import remove_blocks

__all__ = ["SOURCE", "pruned_arch", "split_arch"]

SOURCE = "pruned"
KEYS = ("removed", "masked")


def _encode(path: str) -> str:
    return path.replace(".", "/")


def _decode(value: Any) -> list[str]:
    items = value if isinstance(value, tuple) else (value,)
    return [str(v).replace("/", ".") for v in items if str(v)]


def split_arch(arch: str) -> tuple[str, list[str], bool]:
    """``pruned:BASE?...`` -> (BASE, removed block paths, masked); any other arch -> (arch, [], False)."""
    if not arch.startswith(f"{SOURCE}:"):
        return arch, [], False
    spec = ModelSpec.parse(arch)
    return _base(spec.name, spec.weights, spec.kwargs), _decode(spec.kwargs.get("removed", ())), \
        bool(spec.kwargs.get("masked", False))


def _base(source: str, rest: str | None, kwargs: dict[str, Any]) -> str:
    if rest is None:
        raise SpecError(f"pruned spec names no base architecture after '{SOURCE}:{source}'; write "
                        f"'{SOURCE}:timm:resnet18?removed=layer1/1'")
    own = {k: v for k, v in kwargs.items() if k not in KEYS}
    return f"{source}:{rest}" + ("?" + "&".join(f"{k}={_format_value(v)}" for k, v in own.items()) if own else "")


def pruned_arch(base: str, removed: Sequence[str] = (), masked: bool = False) -> str:
    """The spec of ``base`` with the blocks ``removed`` (paths in the bare network) removed and, with ``masked``,
    weight masks; a ``pruned:`` base adds to its own removals.

    >>> pruned_arch("timm:resnet18?num_classes=10", ["layer1.1", "layer3.0"])
    'pruned:timm:resnet18?num_classes=10&removed=layer1/1,layer3/0'
    """
    base, before, was_masked = split_arch(base)
    paths = list(dict.fromkeys([*before, *removed]))
    extra = ([f"removed={','.join(_encode(p) for p in paths)}"] if paths else []) + (
        ["masked=true"] if masked or was_masked else [])
    if not extra:
        return base
    return f"{SOURCE}:{base}{'&' if '?' in base else '?'}{'&'.join(extra)}"


@MODEL_SOURCES.register(SOURCE)
def _pruned_model(source: str, rest: str | None, kwargs: dict[str, Any]) -> nn.Module:
    """Build the base architecture, remove the listed blocks, add masks when asked (num_classes etc. pass through)."""
    base = _base(source, rest, kwargs)
    removed, masked = _decode(kwargs.get("removed", ())), bool(kwargs.get("masked", False))
    model = load_model(base, trust_pickle=kwargs.get("trust_pickle"))
    out = remove_blocks(model, removed) if removed else model
    if masked:
        add_masks(out)
    out.layerlab_arch = pruned_arch(model.layerlab_arch, removed, masked)
    return out
