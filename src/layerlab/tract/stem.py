"""Put TrAct (Petersen et al. 2024) on any model: :func:`apply` finds the model's stem and wraps it in place,
:func:`remove` undoes it.

The stem is found from the model's structure (the first learnable conv/linear a probe forward pass calls), not
from its class or attribute names.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LayerlabError
from ..runtime import eval_mode, resolve_device
from .gradient import _check_lam
from .wrapper import TrAct, _check_layer

# Known stems by structure: timm's ``patch_embed.proj`` (ViT, DeiT, Swin, ...) and torchvision ViT's ``conv_proj``.
# Used to size the probe, and as the answer when the probe forward cannot run at all.
_STEM_HINTS = ("patch_embed.proj", "conv_proj")
# Layer types that count as "a layer" when looking for the first one (norms and activations do not).
_LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def _stem_hint(model: nn.Module) -> tuple[str, nn.Module] | None:
    for path in _STEM_HINTS:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, _LAYER_TYPES):
            return path, module
    return None


def _probe_input(model: nn.Module) -> Tensor:
    """A tiny image batch the model accepts.

    Size from timm/torchvision ``img_size``/``image_size`` attributes (fixed-size ViTs), else 32x32 (enough
    for a ResNet's five halvings); channels from the patch embedding, else the first registered Conv2d, else 3.
    """
    size: tuple[int, int] = (32, 32)
    for module in model.modules():
        value = getattr(module, "img_size", None) or getattr(module, "image_size", None)
        if isinstance(value, int):
            size = (value, value)
            break
        if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
            size = (int(value[0]), int(value[1]))
            break
    hint = _stem_hint(model)
    if hint is not None and isinstance(hint[1], nn.Conv2d):
        chans = hint[1].in_channels
    else:
        chans = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = resolve_device(None, model)  # where the model is: layerlab never moves a model
    dtype = param.dtype if param is not None else torch.float32
    return torch.randn(2, chans, *size, device=device, dtype=dtype)


def _learnable(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.requires_grad


def _describe(name: str, module: nn.Module) -> str:
    """``'conv1' (Conv2d)``, with the reason when TrAct cannot wrap it or it is frozen."""
    kind = type(module).__name__
    if not _learnable(module):
        return f"'{name}' ({kind}, frozen)"
    try:
        _check_layer(module, where=name)
    except LayerlabError:
        groups = getattr(module, "groups", 1)
        why = f"groups={groups}" if isinstance(module, nn.Conv2d) and groups != 1 else "not wrappable"
        return f"'{name}' ({kind}, {why})"
    return f"'{name}' ({kind})"


def _forward_order(model: nn.Module, example_input: Tensor | None) -> tuple[list[nn.Module], BaseException | None]:
    """The conv/linear modules in the order a forward pass on ``example_input`` first calls them.

    Eval mode, no grad, hooks and training flags restored. Returns the order (possibly partial) and the
    exception the forward raised, if any.
    """
    probe = _probe_input(model) if example_input is None else example_input
    order: list[nn.Module] = []
    seen: set[int] = set()

    def hook(module: nn.Module, _args: Any) -> None:
        if id(module) not in seen:
            seen.add(id(module))
            order.append(module)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, _LAYER_TYPES)]
    error: BaseException | None = None
    try:
        with eval_mode(model), torch.no_grad():
            model(probe)
    except Exception as err:  # noqa: BLE001 - the probe is a guess; the caller reports it when it matters
        error = err
    finally:
        for handle in handles:
            handle.remove()
    if error is not None:
        error.probe_shape = tuple(probe.shape)  # type: ignore[attr-defined]
    return order, error


def _first_layer(model: nn.Module, example_input: Tensor | None) -> tuple[str, nn.Module]:
    """Name and module of the first learnable Conv/Linear in forward order; refuse one TrAct cannot wrap."""
    names: dict[int, str] = {}
    for qual, module in model.named_modules():
        names.setdefault(id(module), qual or "<model>")
    order, error = _forward_order(model, example_input)
    learnable = [m for m in order if _learnable(m)]
    if not learnable:
        hint = _stem_hint(model)
        if hint is not None and _learnable(hint[1]):
            return hint  # the probe could not run: fall back on the known patch-embedding path
        if error is not None:
            raise LayerlabError(
                f"TrAct.apply: could not run the model on a probe input of shape {error.probe_shape} to find "
                f"its first layer ({type(error).__name__}: {error}); pass example_input=<one batch> or "
                "layer='<module path>' (e.g. 'conv1' or 'patch_embed.proj')"
            ) from error
        ran = ", ".join(_describe(names[id(m)], m) for m in order[:4])
        raise LayerlabError(
            f"TrAct.apply: no learnable nn.Conv2d or nn.Linear ran in the forward pass of {type(model).__name__}"
            + (f" (only {ran})" if ran else "")
            + "; TrAct needs a convolutional or linear first layer (pass layer='<module path>' to choose one)"
        )
    target = learnable[0]
    name = names[id(target)]
    try:
        _check_layer(target, where=f"'{name}'")
    except LayerlabError as err:
        candidates = ", ".join(_describe(names[id(m)], m) for m in order[:5])
        more = f" (+{len(order) - 5} more)" if len(order) > 5 else ""
        reason = str(err).removeprefix("TrAct: ")
        raise LayerlabError(
            f"TrAct.apply: the first learnable layer of {type(model).__name__} in forward order cannot be "
            f"wrapped: {reason}. Conv/Linear layers in forward order: {candidates}{more}; pass "
            "layer='<module path>' to wrap another one explicitly"
        ) from None
    return name, target


def _iter_tract(model: nn.Module) -> Iterator[tuple[str, TrAct]]:
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, TrAct):
            yield name, module


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> list[str]:
    """Point every attribute of ``model`` that holds ``old`` at ``new``; return the qualified names."""
    names = []
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, child_name, new)
                names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


def apply(
    model: nn.Module, lam: float = 0.1, *, layer: str | nn.Module | None = None, name: str | None = None,
    example_input: Tensor | None = None,
) -> nn.Module:
    """Wrap the model's first layer (its stem) in :class:`TrAct` in place and return the model.

    The stem is found from the model's structure, not its class or attribute names: a tiny forward pass
    with pre-hooks on every conv/linear module (on ``example_input``, by default a 2-image random batch sized
    from the model's ``img_size``/``image_size`` attribute, else 32x32) gives the real execution order, and
    the first one with a trainable weight is taken. This finds ``conv1`` of timm and torchvision ResNets,
    ``stem.0`` of ConvNeXt, ``conv_stem`` of EfficientNet, ``patch_embed.proj`` of timm ViTs and
    ``conv_proj`` of torchvision ViTs, also behind leading parameter-free modules. If the probe cannot run,
    a timm ``patch_embed.proj`` / torchvision ``conv_proj`` is used when present. The probe runs in eval mode
    under no_grad, so BatchNorm statistics are untouched; forward hooks on the model do see it.

    Args:
        model: the model, edited in place.
        lam: ridge strength lambda > 0.
        layer: pick the layer explicitly, as a module path (``"conv1"``) or the module itself; no probe runs.
        name: older spelling of ``layer`` (a module path).
        example_input: one batch for the probe, when the default guess does not fit the model.

    If ``model`` itself is the layer, the wrapper is returned instead (there is no parent to edit).
    Raises LayerlabError when TrAct is already applied, nothing suitable is found, or the first layer cannot
    be wrapped (not a Conv2d/Linear, groups != 1, a subclass with its own forward); that message lists the
    conv/linear layers in forward order so one can be passed as ``layer=``.

    Example:
        >>> import timm
        >>> net = apply(timm.create_model("resnet18", num_classes=10))
        >>> type(net.conv1).__name__
        'TrAct'
    """
    _check_lam(lam)
    if name is not None:
        if layer is not None and layer != name:
            raise LayerlabError(f"TrAct.apply: pass layer= or its older spelling name=, not both ({layer!r}, {name!r})")
        layer = name
    present = [n or "<model>" for n, _ in _iter_tract(model)]
    if present:
        raise LayerlabError(
            f"TrAct.apply: TrAct is already applied at {', '.join(present)}; call layerlab.tract.remove(model) "
            "first to change lam or the layer"
        )
    if isinstance(layer, nn.Module):
        target = layer
        where = next((n or "<model>" for n, m in model.named_modules() if m is target), None)
        if where is None:
            raise LayerlabError(
                f"TrAct.apply: layer= is a {type(target).__name__} that is not a submodule of "
                f"{type(model).__name__}; pass one of its modules or a path from dict(model.named_modules())"
            )
    elif isinstance(layer, str):
        try:
            target = model.get_submodule(layer)
        except AttributeError as err:
            raise LayerlabError(
                f"TrAct.apply: the model has no submodule {layer!r} ({err}); pass a path from "
                "dict(model.named_modules()), e.g. 'conv1' or 'patch_embed.proj'"
            ) from None
        where = layer or "<model>"
    elif layer is None:
        where, target = _first_layer(model, example_input)
    else:
        raise LayerlabError(
            f"TrAct.apply: layer= must be a module path (str) or an nn.Module, got {type(layer).__name__}"
        )
    _check_layer(target, where=f"'{where}'")
    wrapper = TrAct(target, lam=lam)
    if target is model:
        return wrapper
    _replace(model, target, wrapper)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: put every TrAct-wrapped layer back (with the wrapper's current Parameters).

    Returns ``model``, or the original layer when ``model`` itself is a TrAct wrapper. Raises LayerlabError
    when the model holds no TrAct wrapper.
    """
    if isinstance(model, TrAct):
        return _unwrap(model)
    found = list(_iter_tract(model))
    if not found:
        raise LayerlabError(
            f"TrAct.remove: {type(model).__name__} holds no TrAct wrapper; nothing to remove "
            "(apply it with layerlab.tract.apply(model))"
        )
    for _, wrapper in {id(w): (n, w) for n, w in found}.values():
        _replace(model, wrapper, _unwrap(wrapper))
    return model


def _unwrap(wrapper: TrAct) -> nn.Module:
    layer = wrapper.layer
    # Re-attach the wrapper's Parameters: .to()/.cuda() may have swapped them for new objects.
    layer.weight = wrapper.weight
    if wrapper.bias is not None:
        layer.bias = wrapper.bias
    layer.train(wrapper.training)
    return layer
