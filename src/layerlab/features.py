"""Activation capture with forward hooks, one batch at a time.

* :class:`Extractor` returns ``{layer: features}`` for one forward pass; hooks live only inside its ``with`` block
  (or inside one call) and are removed even when the forward raises.
* :func:`forward_until` returns one layer's activation and stops the forward there (representation inversion,
  METHODS.md section 4: later layers are never computed, gradients flow back to the input).
* :func:`iter_features` streams features over a tensor of images in batches under ``torch.inference_mode``,
  so a caller (e.g. :class:`layerlab.similarity.CKAAccumulator`) never holds more than one batch.
* :func:`select_layers` turns what a user asks for (module paths, layer labels, ``blocks``, ``layers``,
  ``kind:Conv2d``) into module paths on any model; :func:`layer_labels` gives them their table labels.
* ``tokens`` (:data:`TOKENS`) says how a token output [N, T, D] becomes features: all of it (``flatten``), the class
  token (``cls``) or the token mean (``mean``); conv maps and other shapes are unaffected.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from . import runtime, structure
from .runtime import eval_mode
from .errors import LayerlabError, ShapeError, check_images

__all__ = [
    "TOKENS",
    "Extractor",
    "as_input",
    "check_tokens",
    "forward_until",
    "has_class_token",
    "iter_features",
    "layer_labels",
    "select_layers",
]

OUTPUT_KEY = "output"
Transform = Callable[[torch.Tensor], torch.Tensor]


def _resolve(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """Map layer names to modules, failing with the closest valid names for any unknown one."""
    if isinstance(names, str):
        names = [names]
    modules = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for name in names:
        if not isinstance(name, str):
            raise LayerlabError(f"layer names must be strings (module paths like 'layer1.0.conv1'), got {name!r}")
        if name not in modules or name == "":
            close = difflib.get_close_matches(name, [n for n in modules if n], n=3, cutoff=0.5)
            hint = f"closest valid names: {', '.join(repr(c) for c in close)}; " if close else ""
            raise LayerlabError(
                f"unknown layer {name!r} in {type(model).__name__}; {hint}list the learnable layers with "
                "[l.name for l in layerlab.list_layers(model)] or every module with [n for n, _ in model.named_modules()]"
            )
        out[name] = modules[name]
    return out


# ============================================================================================ layer selection
KIND_PREFIX = "kind:"

#: selector keywords -> the module paths they stand for, in module order
SELECTORS: dict[str, Callable[[nn.Module], list[str]]] = {
    "blocks": structure.find_blocks,  # every residual/transformer block
    "layers": lambda model: [i.name for i in structure.learnable_layers(model)],  # every learnable layer
}

_HOW_TO_LIST = "list them with `layerlab layers SPEC` or layerlab.structure.learnable_layers(model) / find_blocks(model)"


def _labelled(model: nn.Module) -> dict[str, str]:
    """label -> module path, for every learnable layer and block whose label is unique in the model."""
    pairs = [(i.label, i.name) for i in structure.learnable_layers(model)]
    pairs += [(structure.block_label(b), b) for b in structure.find_blocks(model)]
    counts: dict[str, int] = {}
    for label, _ in pairs:
        counts[label] = counts.get(label, 0) + 1
    return {label: name for label, name in pairs if counts[label] == 1}


def _by_kind(model: nn.Module, kind: str) -> list[str]:
    found = [n for n, m in model.named_modules() if n and type(m).__name__ == kind]
    if not found:
        kinds = sorted({type(m).__name__ for n, m in model.named_modules() if n})
        close = difflib.get_close_matches(kind, kinds, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(repr(KIND_PREFIX + c) for c in close)}?)" if close else ""
        raise LayerlabError(f"layers: no module of class {kind!r} in {type(model).__name__}{hint}; its module classes: "
                            f"{', '.join(kinds[:12])}{' ...' if len(kinds) > 12 else ''}")
    return found


def select_layers(model: nn.Module, requested: str | Sequence[str]) -> list[str]:
    """The module paths of ``model`` that ``requested`` names, in the order asked (duplicates dropped).

    Each item is a module path (``layer3.1``, ``blocks.4.attn``), the label of a learnable layer or block from
    :mod:`layerlab.structure` (``[3.1] conv2``, ``[3.1]``), ``blocks`` (every residual/transformer block, from
    :func:`layerlab.structure.find_blocks`), ``layers`` (every learnable layer) or ``kind:<ClassName>`` (every
    module of that class, e.g. ``kind:Conv2d``, ``kind:Block``). Works on any ``nn.Module``; an unknown item is a
    one-line :class:`LayerlabError` naming the closest valid ones.

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    >>> select_layers(net, ["kind:Conv2d", "layers", "1"])
    ['0', '3', '1']
    """
    if isinstance(requested, str):
        requested = [requested]
    modules = {n for n, _ in model.named_modules() if n}
    labels: dict[str, str] | None = None
    out: list[str] = []
    for item in requested:
        if not isinstance(item, str):
            raise LayerlabError(f"layers: expected names such as 'layer3.1', '[3.1] conv2', 'blocks' or 'kind:Conv2d', "
                                f"got {item!r}")
        if item in SELECTORS:
            found = SELECTORS[item](model)
            if not found:
                raise LayerlabError(f"layers: {item!r} selects nothing in {type(model).__name__} (it has no "
                                    f"{'residual/transformer blocks' if item == 'blocks' else 'learnable layers'}); "
                                    "pass 'layers' or module paths instead")
        elif item.startswith(KIND_PREFIX):
            found = _by_kind(model, item[len(KIND_PREFIX):])
        elif item in modules:
            found = [item]
        else:
            labels = _labelled(model) if labels is None else labels
            if item not in labels:
                choices = sorted(modules | set(labels) | set(SELECTORS))
                close = difflib.get_close_matches(item, choices, n=3, cutoff=0.5)
                hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
                raise LayerlabError(f"unknown layer {item!r} in {type(model).__name__}{hint}; pass a module path, a "
                                    f"layer label, 'blocks', 'layers' or 'kind:<ClassName>'; {_HOW_TO_LIST}")
            found = [labels[item]]
        out += found
    if not out:
        raise LayerlabError("layers: the list is empty; pass at least one layer, or None for the default")
    return list(dict.fromkeys(out))


def layer_labels(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Table labels of module paths: a learnable layer's label from :mod:`layerlab.structure` (``[3.1] conv2``), a
    block's path (``layer3.1``, ``blocks.4``), a module inside a block its block's label and the rest of its path
    (``[4] attn``), anything else its path (a ``Normalized`` wrapper's ``net.`` left out); ``output`` stays."""
    learnable = {i.name: i.label for i in structure.learnable_layers(model)}
    blocks = structure.find_blocks(model)

    def inner(name: str) -> str:
        return name.removeprefix("net.")

    def label(name: str) -> str:
        if name in learnable:
            return learnable[name]
        if name in blocks or name == OUTPUT_KEY:
            return inner(name)
        owner = next((b for b in blocks if name.startswith(b + ".")), None)
        return f"{structure.block_label(owner)} {name[len(owner) + 1:]}" if owner else inner(name)

    return {n: label(n) for n in names}


# ============================================================================================ token outputs
#: how a token output [N, T, D] (batch first, as timm and torchvision ViTs give it) becomes features
TOKENS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "flatten": lambda t: t,  # every token: T x D features once flattened (the default)
    "cls": lambda t: t[:, 0],  # the class token, first in timm and torchvision ViTs
    "mean": lambda t: t.mean(dim=1),  # the average over tokens
}


def check_tokens(tokens: Any) -> str:
    """``tokens`` validated: one of :data:`TOKENS`, else a one-line LayerlabError."""
    if not isinstance(tokens, str) or tokens not in TOKENS:
        raise LayerlabError(f"tokens: expected one of {', '.join(map(repr, TOKENS))} (how a token output [N, T, D] "
                            f"becomes features: all of it, the class token, the token mean), got {tokens!r}")
    return tokens


def has_class_token(model: nn.Module) -> bool:
    """Whether ``model`` holds a class token: a non-None ``cls_token`` (timm) or ``class_token`` (torchvision)
    attribute on any of its modules."""
    return any(getattr(m, a, None) is not None for m in model.modules() for a in ("cls_token", "class_token"))


def _first_tensor(out: Any, name: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise LayerlabError(
        f"layer {name!r} returned {type(out).__name__}, not a tensor; pick a module that outputs a tensor "
        "(e.g. one of its children)"
    )


def _reshape(t: torch.Tensor, pool: bool, flatten: bool) -> torch.Tensor:
    """[N, C, H, W] -> mean over H, W if pool; [N, T, D] -> mean over T if pool; then [N, D] if flatten."""
    if pool and t.ndim == 4:
        t = t.mean(dim=(2, 3))
    elif pool and t.ndim == 3:
        t = t.mean(dim=1)
    elif pool and t.ndim > 4:
        t = t.mean(dim=tuple(range(2, t.ndim)))
    if flatten:
        t = t.reshape(t.shape[0], -1) if t.ndim != 1 else t[:, None]
    return t


class Extractor:
    """Capture the outputs of named modules during one forward pass.

    ``with Extractor(model, ["layer1.0.conv1", "fc"]) as ex: feats = ex(x)`` gives ``{name: Tensor[N, D]}`` in
    the order of ``layers``. ``tokens`` (:data:`TOKENS`) first reduces a token output [N, T, D]: ``"flatten"``
    (default) keeps it, ``"cls"`` takes token 0 (refused for a model without a class token), ``"mean"`` averages
    the tokens; 4-D conv maps and 2-D outputs are unaffected. ``pool=True`` then averages conv maps [N, C, H, W] ->
    [N, C] and (kept) tokens [N, T, D] -> [N, D] (channels-first layout assumed); ``flatten=True`` flattens the rest
    to [N, D]. ``detach=False`` keeps
    the autograd graph. ``include_output=True`` adds the model's output under ``"output"``. ``transform`` runs on
    each (pooled/flattened) activation inside its hook, so only its result is kept (e.g. ``CKAAccumulator.gram``
    turns a [N, D] activation into an [N, N] Gram matrix as soon as the layer has run).

    Hooks are registered on ``__enter__`` and removed on ``__exit__``; calling the extractor outside a ``with``
    block registers them for that call only. Either way they are removed if the forward raises.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        *,
        pool: bool = False,
        flatten: bool = True,
        detach: bool = True,
        include_output: bool = False,
        transform: Transform | None = None,
        tokens: str = "flatten",
    ) -> None:
        if isinstance(layers, str):
            layers = [layers]
        layers = list(dict.fromkeys(layers))
        if not layers and not include_output:
            raise LayerlabError("Extractor: no layers given; pass module names or include_output=True")
        if include_output and OUTPUT_KEY in layers:
            raise LayerlabError(
                f"Extractor: a layer is named {OUTPUT_KEY!r}, which clashes with include_output=True; "
                "capture the model output under another name by hooking the last module instead"
            )
        self.model = model
        self.layers = layers
        self.modules = _resolve(model, layers)
        self.pool, self.flatten, self.detach = pool, flatten, detach
        self.include_output = include_output
        self.transform = transform
        self.tokens = check_tokens(tokens)
        self._class_token = tokens != "cls" or has_class_token(model)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._feats: dict[str, torch.Tensor] = {}

    def _process(self, out: Any, name: str) -> torch.Tensor:
        t = _first_tensor(out, name)
        if self.detach:
            t = t.detach()
        if t.ndim == 3:
            if not self._class_token:
                raise LayerlabError(
                    f"tokens='cls': layer {name!r} outputs tokens {list(t.shape)} but {type(self.model).__name__} has "
                    "no class token (no cls_token or class_token attribute, e.g. a ViT built without one); use "
                    "tokens='mean' or 'flatten'"
                )
            t = TOKENS[self.tokens](t)
        t = _reshape(t, self.pool, self.flatten)
        return self.transform(t) if self.transform is not None else t

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if name in self._feats:
                raise LayerlabError(
                    f"layer {name!r} ran twice in one forward pass (a module reused inside the model, e.g. a "
                    "shared ReLU), so its output is ambiguous; capture a module that runs once, such as the "
                    "layer before it"
                )
            self._feats[name] = self._process(out, name)

        return hook

    @property
    def active(self) -> bool:
        """Whether hooks are currently registered."""
        return bool(self._handles)

    def __enter__(self) -> Extractor:
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove all hooks (idempotent) and drop any partially captured features."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._feats = {}

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Run ``model(x, *args, **kwargs)`` once and return the captured features."""
        temporary = not self._handles
        if temporary:
            self.__enter__()
        self._feats = {}
        try:
            out = self.model(x, *args, **kwargs)
            feats, self._feats = self._feats, {}
            missing = [n for n in self.layers if n not in feats]
            if missing:
                raise LayerlabError(
                    f"layers {missing} did not run during the forward pass of {type(self.model).__name__}; "
                    "pick modules on the path from input to output"
                )
            result = {n: feats[n] for n in self.layers}
            if self.include_output:
                result[OUTPUT_KEY] = self._process(out, OUTPUT_KEY)
            return result
        finally:
            self._feats = {}
            if temporary:
                self.remove()


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass early; never escapes :func:`forward_until`."""


def forward_until(model: nn.Module, layer: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """The output of module ``layer`` for input x, stopping the forward pass right there.

    Later modules never run (their cost is saved). The activation keeps its autograd graph, so
    ``forward_until(model, "layer2", x).norm().backward()`` reaches ``x.grad`` (representation inversion).
    """
    module = _resolve(model, [layer])[layer]
    captured: list[Any] = []

    def hook(mod: nn.Module, inputs: Any, out: Any) -> None:
        captured.append(out)
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        model(x, *args, **kwargs)
    except _StopForward:
        return captured[0]
    finally:
        handle.remove()
    raise LayerlabError(
        f"layer {layer!r} never ran during the forward pass of {type(model).__name__}; pick a module on the path "
        "from input to output"
    )


def as_input(batch: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """An image batch [N, C, H, W] in channels_last memory format (same values; other shapes unchanged).

    PyTorch runs a convolution channels_last when its input is, without converting the model's weights, so
    inference code can take the faster layout without touching (mutating) the model.
    """
    if channels_last and batch.ndim == 4:
        return batch.contiguous(memory_format=torch.channels_last)
    return batch


def iter_features(
    model: nn.Module,
    layers: Sequence[str],
    data: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    batch_size: int = 256,
    device: str | torch.device | None = None,
    *,
    pool: bool = False,
    flatten: bool = True,
    include_output: bool = False,
    transform: Transform | None = None,
    channels_last: bool = True,
    tokens: str = "flatten",
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``{layer: features}`` for consecutive batches of ``data`` (images [N, C, H, W], or (images, labels)).

    The model runs in eval mode under ``torch.inference_mode``; each module's train/eval flag is restored when
    the generator finishes or is closed. Only one batch of features exists at a time. Labels are not used; slice
    them with ``labels.split(batch_size)`` to pair them with the yielded batches. ``device`` defaults to the
    model's; the model itself is never moved.

    ``channels_last=True`` hands each batch to the model in channels_last memory format (see :func:`as_input`):
    convolutions run faster (ResNet-18 at 32 px, batch 256: ~2130 vs ~1870 img/s on 2 CPU threads) while the model's
    weights stay as they are. Values are unchanged; conv activations then come out channels_last, which
    ``flatten=True`` still returns in NCHW order and :meth:`CKAAccumulator.gram` flattens without a copy.
    ``tokens``: how token outputs [N, T, D] become features (:class:`Extractor`).
    """
    images = data[0] if isinstance(data, (tuple, list)) else data
    check_images(images, name="data")
    if isinstance(data, (tuple, list)) and len(data) > 1 and len(data[1]) != len(images):
        raise ShapeError(f"data: {len(images)} images but {len(data[1])} labels; pass matching (images, labels)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LayerlabError(f"batch_size: expected a positive integer, got {batch_size!r}")
    model_device = runtime.model_device(model)
    device = runtime.resolve_device(device) if device is not None else (model_device or images.device)
    if model_device is not None and model_device.type != device.type:
        raise LayerlabError(
            f"iter_features: the model is on {model_device} but device={device}; call model.to({str(device)!r}) "
            "first or pass the model's device"
        )
    extractor = Extractor(model, layers, pool=pool, flatten=flatten, include_output=include_output, transform=transform,
                          tokens=tokens)
    with eval_mode(model):
        for start in range(0, images.shape[0], batch_size):
            batch = as_input(images[start : start + batch_size].to(device, non_blocking=True), channels_last)
            with torch.inference_mode():
                feats = extractor(batch)
            yield feats
