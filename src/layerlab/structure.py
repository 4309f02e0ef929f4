"""The structure of any image classifier, read from the model itself: its learnable layers with readable labels,
its residual/transformer blocks, and the chain of stages its forward pass is made of (where it can be split).

* Layers: every ``Conv2d`` and ``Linear`` (stems, patch embeddings, depthwise and pointwise convs, attention qkv and
  projections, MLP fc1/fc2, downsample convs, heads) and the input projection of ``nn.MultiheadAttention``
  (torchvision's ViT keeps qkv there, not in a Linear). Normalisation layers are listed only on request
  (``norm=True``, :func:`is_norm`): Gavrikov et al. 2024 re-randomise Conv2d/Linear only, and so does criticality
  by default.
* Blocks: timm models name them in their own ``group_matcher()`` (``blocks.3``, ``stages.1.blocks.2``,
  ``layer3.1``, ``s2.b1``); every other model is walked: a block is a composite module (two or more learnable
  layers, not itself a layer) that is an item of an ``nn.Sequential``/``nn.ModuleList``, innermost such, in a
  container that is a list of blocks (not a plain sequence of layers with, say, a squeeze-excite module among them:
  that SE module stays part of its block). Layers outside every block (stem, downsample between stages, head)
  are units of their own. Normalisation layers never count towards a block.
* Labels: a block is labelled by the integers of its path (``layer3.1`` -> ``[3.1]``, ``stages.1.blocks.2`` ->
  ``[1.2]``, ``encoder.layers.encoder_layer_3`` -> ``[3]``), a layer inside a block by the block's label and its
  path within the block (``[3.1] conv2``, ``[4] attn.qkv``, ``[3.1] bn1``), any other layer by its path (a
  ``Normalized`` wrapper's ``net.`` left out).
* Stage chains: :mod:`layerlab.chains` (re-exported here as :func:`stage_chain` and :class:`Stage`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .errors import LayerlabError

__all__ = ["LayerInfo", "Stage", "block_label", "block_units", "find_blocks", "is_layer", "is_norm", "layer_params",
           "learnable_layers", "stage_chain"]

#: modules whose own parameters are one learnable layer
LAYER_TYPES = (nn.Conv2d, nn.Linear, nn.MultiheadAttention)
#: normalisation layers (BatchNorm*, InstanceNorm*, SyncBatchNorm, LayerNorm, GroupNorm, RMSNorm and their
#: subclasses, e.g. timm's LayerNorm2d, BatchNormAct2d, GroupNorm1); timm's own ``timm.layers.norm`` classes too
NORM_TYPES = (_NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
CONTAINERS = (nn.Sequential, nn.ModuleList)


@dataclass(frozen=True)
class LayerInfo:
    """One learnable layer: its module path, a short display label, its type and its parameter count."""

    index: int
    name: str
    label: str
    kind: str
    params: int


def is_layer(m: nn.Module) -> bool:
    """A learnable layer: a Conv2d or Linear, or a MultiheadAttention (its own in_proj parameters)."""
    if isinstance(m, nn.MultiheadAttention):
        return any(p is not None for p in m.parameters(recurse=False))
    return isinstance(m, LAYER_TYPES)


def is_norm(m: nn.Module) -> bool:
    """A normalisation layer with affine parameters of its own (weight and/or bias; running statistics are
    buffers, not parameters): an instance of :data:`NORM_TYPES` or of a class of timm's ``timm.layers.norm``."""
    if not (isinstance(m, NORM_TYPES) or type(m).__module__ == "timm.layers.norm"):
        return False
    return any(p is not None for p in m.parameters(recurse=False))


def layer_params(model: nn.Module, name: str) -> tuple[str, ...]:
    """The full names of a layer's own parameters (weight and bias; a MultiheadAttention's in_proj ones)."""
    module = model.get_submodule(name)
    return tuple(f"{name}.{p}" for p, t in module.named_parameters(recurse=False) if t is not None)


def _inner(name: str) -> str:
    return name[4:] if name.startswith("net.") else name


def _core(model: nn.Module) -> tuple[nn.Module, str]:
    """The model inside a ``Normalized`` wrapper (and the prefix of its names), else the model itself."""
    from .models import Normalized

    return (model.net, "net.") if isinstance(model, Normalized) else (model, "")


# ================================================================================================= blocks
def find_blocks(model: nn.Module) -> list[str]:
    """The paths of the model's residual/transformer blocks, in module order (see the module docstring)."""
    core, prefix = _core(model)
    found = _timm_blocks(core)
    if found is None:
        found = _walk(core, "", item=False)
    return [prefix + b for b in found]


def _count(m: nn.Module) -> int:
    return sum(1 for x in m.modules() if is_layer(x))


def _walk(m: nn.Module, path: str, item: bool) -> list[str]:
    """Innermost composite modules that are items of a block list (a container of blocks)."""
    if is_layer(m):
        return []
    children = list(m.named_children())
    is_container = isinstance(m, CONTAINERS)
    inner: list[str] = []
    for name, child in children:
        inner += _walk(child, f"{path}.{name}" if path else name, item=is_container and _is_block_list(m))
    if inner:
        return inner
    if item and _count(m) >= 2:
        return [path]
    return []


def _is_block_list(container: nn.Module) -> bool:
    """Whether a container's composite items are blocks: every learnable layer it holds lies in a composite item
    (a stage of blocks), or two or more of its items are composites of one class (blocks among a stem and a head,
    as in a hand-written nn.Sequential). Not so for a sequence of layers with one composite among them (an MBConv's
    conv, conv, squeeze-excite, conv): there the composite is part of the enclosing block."""
    composite = [c for _, c in container.named_children() if not is_layer(c) and _count(c) >= 2]
    loose = sum(_count(c) for _, c in container.named_children() if not (not is_layer(c) and _count(c) >= 2))
    if not composite:
        return False
    if loose == 0:
        return True
    classes = [type(c) for c in composite]
    return any(classes.count(t) >= 2 for t in set(classes))


def _timm_blocks(core: nn.Module) -> list[str] | None:
    """Blocks as a timm model's own ``group_matcher(coarse=False)`` names them, or None (not timm, or its matcher
    does not name module paths)."""
    matcher = getattr(core, "group_matcher", None)
    if not callable(matcher) or not type(core).__module__.startswith("timm."):
        return None
    try:
        spec = matcher(coarse=False).get("blocks")
    except Exception:
        return None
    patterns = [spec] if isinstance(spec, str) else [p for p, _ in spec] if isinstance(spec, (list, tuple)) else []
    if not patterns:
        return None
    compiled = [re.compile(p) for p in patterns]
    modules = dict(core.named_modules())
    found: dict[str, None] = {}
    for name, m in core.named_modules():
        if not name or not is_layer(m):
            continue
        for rx in compiled:
            hit = rx.match(name + ".")
            if hit:
                key = hit.group(0).rstrip(".")
                if key not in modules:
                    return None  # the matcher names something other than module paths
                if not is_layer(modules[key]) and _count(modules[key]) >= 2:
                    found.setdefault(key)
                break
    return list(found) or None


def _integers(path: str) -> list[str]:
    return [m.group(1) for part in path.split(".") if (m := re.search(r"(\d+)$", part))]


def block_label(path: str) -> str:
    """``layer3.1`` -> ``[3.1]``, ``stages.1.blocks.2`` -> ``[1.2]``, ``blocks.4`` -> ``[4]``."""
    ints = _integers(_inner(path))
    return f"[{'.'.join(ints)}]" if ints else _inner(path)


# ================================================================================================= layers
def learnable_layers(model: nn.Module, norm: bool = False) -> list[LayerInfo]:
    """Every learnable layer of ``model`` (module order), labelled from its block (see the module docstring);
    with ``norm`` the normalisation layers with affine parameters too (:func:`is_norm`)."""
    blocks = find_blocks(model)
    out = []
    for name, m in model.named_modules():
        if not name or not (is_layer(m) or (norm and is_norm(m))):
            continue
        owner = next((b for b in blocks if name.startswith(b + ".")), None)
        label = f"{block_label(owner)} {name[len(owner) + 1:]}" if owner else _inner(name)
        if isinstance(m, nn.MultiheadAttention):
            label += " (in_proj)"
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in m.parameters(recurse=False)):
            raise LayerlabError(f"layer {name!r} ({type(m).__name__}) is a lazy module whose weights do not exist "
                                "yet; run one forward pass first (model(images[:1])) so they take their shapes")
        params = sum(p.numel() for p in m.parameters(recurse=False))
        out.append(LayerInfo(index=len(out), name=name, label=label, kind=type(m).__name__, params=params))
    return out


def block_units(model: nn.Module, norm: bool = False) -> dict[str, list[str]]:
    """Zhang et al.'s units: each block with its learnable layers, and every layer outside blocks on its own,
    in the order of their first layer; with ``norm`` normalisation layers are members (or units) too."""
    blocks = find_blocks(model)
    groups: dict[str, list[str]] = {}
    for info in learnable_layers(model, norm):
        owner = next((b for b in blocks if info.name.startswith(b + ".")), None)
        groups.setdefault(owner or info.name, []).append(info.name)
    return groups


from .chains import Stage, stage_chain  # noqa: E402,F401  (the forward as a chain of stages)
