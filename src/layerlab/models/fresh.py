"""Fresh, untrained instances of a model's architecture (:func:`fresh_model`, :func:`fresh_source`).

The layer criticality analysis re-initialises layers from a fresh instance of the same architecture. It comes
from a ``fresh=`` callable, the model's spec or checkpoint, an exact timm/torchvision rebuild (verified on the
meta device) or, last, each layer's own ``reset_parameters()``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..errors import LayerlabError
from .normalized import Normalized, _mean_std
from .specs import _format_value, load_model

FRESH_SOURCES = ("callable", "spec", "timm", "torchvision", "reset_parameters")
#: the modules whose weights a re-randomisation replaces and ``reset_parameters`` re-draws
FRESH_LAYERS = (nn.Conv2d, nn.Linear, nn.MultiheadAttention)


@dataclass(frozen=True)
class FreshSource:
    """Where fresh, untrained instances of a model's architecture come from (:func:`fresh_source`).

    ``kind`` is one of :data:`FRESH_SOURCES`; ``detail`` says which constructor (a spec, ``timm:NAME?kwargs``,
    the callable's name); ``key`` identifies the source for caching. :meth:`draw` builds one instance with torch's
    global RNG seeded by ``seed`` (and restored afterwards), on the CPU, in eval mode.
    """

    kind: str
    detail: str
    key: tuple
    build: Callable[[], nn.Module]

    def draw(self, seed: int) -> nn.Module:
        """A fresh instance built under ``torch.manual_seed(seed)``; the caller's RNG state is left as it was.

        ``draw(derive_seed(purpose, *indices))`` is ``with seeds.global_seed(purpose, *indices): build()``.
        """
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            fresh = self.build()
        if not isinstance(fresh, nn.Module):
            raise LayerlabError(
                f"the fresh-instance source ({self.kind}: {self.detail}) returned {type(fresh).__name__}, not an "
                "nn.Module; fresh= must be a zero-argument callable that returns a new, untrained model"
            )
        return fresh.to("cpu").eval()

    def __str__(self) -> str:
        # "timm:resnet18?..." already names its kind; "spec: file:..." and "callable: make_net" need the prefix
        return self.detail if self.detail.startswith(f"{self.kind}:") else f"{self.kind}: {self.detail}"


def fresh_source(
    model: nn.Module, fresh: Callable[[], nn.Module] | None = None, *, allow_reset: bool = True
) -> FreshSource:
    """Where fresh instances of ``model``'s architecture come from, in this order:

    1. ``fresh``: a zero-argument callable returning a new instance (the paper's "fresh instance of the
       architecture"), e.g. ``lambda: timm.create_model("resnet18", num_classes=10)``;
    2. the spec or layerlab checkpoint the model was loaded from (``model.layerlab_arch``);
    3. the timm constructor (``pretrained_cfg["architecture"]`` plus the kwargs that can be read off the model:
       num_classes, in_chans, ViT geometry, ResNet widths ...) or the torchvision builder of the model's class,
       used only when its state_dict keys and shapes equal the model's (checked on the meta device);
    4. with ``allow_reset``: a deep copy of the model in which every Conv2d/Linear calls its own
       ``reset_parameters()`` (PyTorch's default init, which can differ from the architecture's).

    A ``Normalized`` wrapper is looked through and put back around the fresh instance.
    """
    if fresh is not None:
        if not callable(fresh) or isinstance(fresh, nn.Module):
            raise LayerlabError(
                f"fresh= must be a zero-argument callable returning a new, untrained instance (e.g. lambda: "
                f"MyNet()), got {type(fresh).__name__}"
            )
        name = getattr(fresh, "__qualname__", None) or type(fresh).__name__
        return FreshSource("callable", name, ("callable", id(fresh)), _wrapped(model, fresh))
    arch = getattr(model, "layerlab_arch", None)
    if arch is not None:
        trust = bool(getattr(model, "layerlab_trust_pickle", False))
        return FreshSource("spec", arch, ("spec", arch), _wrapped(model, lambda: load_model(arch, trust_pickle=trust or None)))
    core = model.net if isinstance(model, Normalized) else model
    for rebuild in (_timm_rebuild, _torchvision_rebuild):
        found = rebuild(core)
        if found is not None:
            kind, detail, build = found
            return FreshSource(kind, detail, (kind, detail), _wrapped(model, build))
    if not allow_reset:
        raise LayerlabError(
            f"cannot build a fresh instance of this {type(model).__name__}: it has no architecture spec (not loaded "
            "by a timm:/torchvision: spec or from a layerlab checkpoint) and no timm/torchvision constructor rebuilds "
            "it exactly; pass fresh=lambda: <a new instance>, set model.layerlab_arch = 'timm:NAME?kwargs', or save "
            "it with layerlab.save_checkpoint"
        )
    return FreshSource("reset_parameters", f"{type(model).__name__} layers' own reset_parameters()",
                       ("reset_parameters", id(model)), lambda: _reset_copy(model))


def _wrapped(model: nn.Module, build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """``build``, with the model's ``Normalized`` wrapper put around a bare fresh network."""
    if not isinstance(model, Normalized):
        return build

    def wrap() -> nn.Module:
        fresh = build()
        return fresh if isinstance(fresh, Normalized) else Normalized(fresh, *_mean_std(model))

    return wrap


def _reset_copy(model: nn.Module) -> nn.Module:
    """A CPU deep copy of ``model`` whose Conv2d/Linear layers re-drew their weights with ``reset_parameters()``."""
    try:
        clone = copy.deepcopy(model)
    except Exception as e:
        raise LayerlabError(
            f"cannot copy {type(model).__name__} to re-draw its layers ({type(e).__name__}: {e}); pass fresh=lambda: "
            "<a new instance of the architecture>"
        ) from None
    clone = clone.to("cpu")
    with torch.no_grad():
        for _, m in clone.named_modules():
            if isinstance(m, FRESH_LAYERS):
                m.reset_parameters()
    return clone


def _same_structure(model: nn.Module, other: nn.Module) -> bool:
    """Same state_dict keys, in the same order, with the same shapes."""
    a, b = model.state_dict(), other.state_dict()
    return list(a) == list(b) and all(tuple(a[k].shape) == tuple(b[k].shape) for k in a)


def _on_meta(build: Callable[[], nn.Module]) -> nn.Module | None:
    """``build()`` on the meta device (no memory, no init cost), falling back to the CPU; None if it raises."""
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                return build()
        except Exception:
            continue
    return None


def _first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def _last_linear(model: nn.Module) -> nn.Linear | None:
    found = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return found[-1] if found else None


def _timm_candidates(model: nn.Module) -> list[dict[str, Any]]:
    """kwargs for ``timm.create_model`` read off the model, from few to many (each is verified by shapes)."""
    base: dict[str, Any] = {}
    if isinstance(getattr(model, "num_classes", None), int):
        base["num_classes"] = model.num_classes
    conv = _first_conv(model)
    if conv is not None and conv.in_channels != 3:
        base["in_chans"] = conv.in_channels
    extra: dict[str, Any] = {}
    pe, blocks = getattr(model, "patch_embed", None), getattr(model, "blocks", None)
    if pe is not None and blocks is not None and hasattr(model, "embed_dim"):  # ViT/DeiT family
        for key, value in (("img_size", getattr(pe, "img_size", None)), ("patch_size", getattr(pe, "patch_size", None))):
            if value is not None:
                extra[key] = tuple(value) if isinstance(value, (tuple, list)) else value
        extra.update(embed_dim=model.embed_dim, depth=len(blocks))
        attn = getattr(blocks[0], "attn", None) if len(blocks) else None
        if attn is not None and hasattr(attn, "num_heads"):
            extra["num_heads"] = attn.num_heads
        mlp = getattr(blocks[0], "mlp", None) if len(blocks) else None
        fc1 = getattr(mlp, "fc1", None)
        if isinstance(fc1, nn.Linear) and model.embed_dim:
            extra["mlp_ratio"] = fc1.out_features / model.embed_dim
        if hasattr(model, "global_pool") and isinstance(model.global_pool, str):
            extra["global_pool"] = model.global_pool
        if hasattr(model, "cls_token"):
            extra["class_token"] = model.cls_token is not None
    stages = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(s, nn.Sequential) and len(s) for s in stages) and isinstance(getattr(model, "conv1", None), nn.Conv2d):
        # a ResNet: each stage's first conv has the stage's base width (BasicBlock and Bottleneck alike)
        first = [next((m for m in s[0].modules() if isinstance(m, nn.Conv2d)), None) for s in stages]  # type: ignore[index]
        widths = [c.out_channels for c in first if c is not None]
        if len(widths) == 4:
            extra["channels"] = tuple(widths)
            extra["stem_width"] = model.conv1.out_channels
    out = [base]
    if extra:
        out.append({**base, **extra})
        if "stem_width" in extra:
            out.append({**base, "channels": extra["channels"]})
    return out


def _timm_rebuild(model: nn.Module) -> tuple[str, str, Callable[[], nn.Module]] | None:
    """timm's constructor for ``model`` when some kwargs rebuild its exact state_dict structure, else None."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not arch or not type(model).__module__.startswith("timm."):
        return None
    import timm

    if not timm.is_model(arch):
        return None
    for kwargs in _timm_candidates(model):
        def build(kwargs: dict[str, Any] = kwargs) -> nn.Module:
            return timm.create_model(arch, pretrained=False, **kwargs)

        probe = _on_meta(build)
        if probe is not None and type(probe) is type(model) and _same_structure(model, probe):
            query = "&".join(f"{k}={_format_value(v)}" for k, v in kwargs.items())
            return "timm", f"timm:{arch}" + (f"?{query}" if query else ""), build
    return None


def _torchvision_rebuild(model: nn.Module) -> tuple[str, str, Callable[[], nn.Module]] | None:
    """The torchvision builder of ``model``'s class that rebuilds its exact state_dict structure, else None."""
    module = type(model).__module__
    if not module.startswith("torchvision.models"):
        return None
    import torchvision

    head = _last_linear(model)
    kwargs = {"num_classes": head.out_features} if head is not None else {}
    for name in torchvision.models.list_models(module=torchvision.models):
        builder = torchvision.models.get_model_builder(name)
        if builder.__module__ != module:
            continue

        def build(builder: Callable[..., nn.Module] = builder) -> nn.Module:
            return builder(weights=None, **kwargs)

        probe = _on_meta(build)
        if probe is not None and type(probe) is type(model) and _same_structure(model, probe):
            query = "&".join(f"{k}={_format_value(v)}" for k, v in kwargs.items())
            return "torchvision", f"torchvision:{name}" + (f"?{query}" if query else ""), build
    return None


def fresh_model(
    model_or_arch: nn.Module | str,
    seed: int,
    device: str | torch.device | None = None,
    *,
    fresh: Callable[[], nn.Module] | None = None,
) -> nn.Module:
    """A fresh, untrained instance of the same architecture, initialised by its own constructor under ``seed``.

    A spec string, or a model whose constructor is known (``fresh``, its spec or checkpoint, an exact timm or
    torchvision rebuild: :func:`fresh_source`); never a copy of the model's own weights.
    """
    if isinstance(model_or_arch, str):
        source = FreshSource("spec", model_or_arch, ("spec", model_or_arch), lambda: load_model(model_or_arch))
    else:
        source = fresh_source(model_or_arch, fresh, allow_reset=False)
    if device is None and isinstance(model_or_arch, nn.Module):
        device = next(iter(model_or_arch.parameters())).device
    return source.draw(seed).to(device or "cpu").eval()

