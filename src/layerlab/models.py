"""Model specs: one registry, one way in (``load_model(spec)``).

Spec forms::

    timm:NAME[?k=v&k=v]          timm architecture; a pretrained tag (``resnet50.a1_in1k``) or ``pretrained=true``
                                 loads weights from the local cache only (never downloads)
    torchvision:NAME[:WEIGHTS]   torchvision architecture, weights from the local torch hub cache only
    file:PATH                    a layerlab checkpoint, or a whole module saved with ``torch.save``

Every loaded model carries ``model.layerlab_arch`` (an architecture spec without weights) so that a fresh,
untrained instance of the same architecture can always be built (:func:`fresh_model`), which the layer
criticality analysis needs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl

import torch
from torch import nn

from .errors import LayerlabError, SpecError
from .registry import Registry, close_names, did_you_mean

CHECKPOINT_FORMAT = "layerlab-checkpoint/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MODEL_SOURCES: Registry[Callable[..., nn.Module]] = Registry("model source")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: ``source:name[:weights][?kwargs]``."""

    source: str
    name: str
    weights: str | None
    kwargs: dict[str, Any]

    @classmethod
    def parse(cls, spec: str) -> "ModelSpec":
        if not isinstance(spec, str) or ":" not in spec:
            raise SpecError(
                f"model spec {spec!r} has no source; write e.g. 'timm:resnet18', "
                "'torchvision:resnet50:IMAGENET1K_V2' or 'file:path/to/checkpoint.pt'"
            )
        source, rest = spec.split(":", 1)
        MODEL_SOURCES.get(source)  # validates the source early, with suggestions
        if source == "file":
            return cls(source, rest, None, {})
        query = ""
        if "?" in rest:
            rest, query = rest.split("?", 1)
        name, _, weights = rest.partition(":")
        if not name:
            raise SpecError(f"model spec {spec!r} names no architecture after '{source}:'")
        return cls(source, name, weights or None, {k: _parse_value(v) for k, v in parse_qsl(query)})

    def __str__(self) -> str:
        if self.source == "file":
            return f"file:{self.name}"
        s = f"{self.source}:{self.name}" + (f":{self.weights}" if self.weights else "")
        if self.kwargs:
            s += "?" + "&".join(f"{k}={_format_value(v)}" for k, v in self.kwargs.items())
        return s


def _parse_value(v: str) -> Any:
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, '16,32' -> (16, 32), else the string."""
    if "," in v:
        return tuple(_parse_value(p) for p in v.split(",") if p)
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _format_value(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(_format_value(p) for p in v)
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


class Normalized(nn.Module):
    """Wraps a classifier that expects normalised inputs so that it takes images in [0, 1].

    Input normalisation belongs to the model (METHODS.md section 1), so every analysis feeds [0, 1] images.
    """

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def load_model(spec: str, *, num_classes: int | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model a spec names, in eval mode, with ``layerlab_arch``/``layerlab_spec`` attributes set."""
    parsed = ModelSpec.parse(spec)
    kwargs = dict(parsed.kwargs)
    if num_classes is not None and parsed.source != "file":
        kwargs["num_classes"] = num_classes
    model = MODEL_SOURCES.get(parsed.source)(parsed.name, parsed.weights, kwargs)
    model.layerlab_spec = spec
    if not hasattr(model, "layerlab_arch"):
        # A whole module saved with torch.save carries no architecture spec: no fresh instance can be made of it.
        model.layerlab_arch = None if parsed.source == "file" else str(ModelSpec(parsed.source, parsed.name, None, _arch_kwargs(kwargs)))
    return model.to(device).eval()


@torch.no_grad()
def num_outputs(model: nn.Module, sample: torch.Tensor) -> int:
    """How many logits ``model`` returns, measured on ``sample`` (float images [N, C, H, W]; one is enough).

    Measured rather than read from a head attribute, so it holds for every wrapper (Normalized, TrAct, timm heads).
    """
    flags = [(m, m.training) for m in model.modules()]  # every submodule's own flag comes back, mixed modes too
    model.eval()
    try:
        device = next(iter(model.parameters()), torch.empty(0)).device
        with torch.no_grad():
            out = model(sample[:1].to(device))
    finally:
        for m, flag in flags:
            m.training = flag
    return int(out.shape[-1])


def _arch_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k != "pretrained"}


def fresh_model(model_or_arch: nn.Module | str, seed: int, device: str | torch.device | None = None) -> nn.Module:
    """A fresh, untrained instance of the same architecture, initialised by its own constructor under ``seed``."""
    arch = model_or_arch if isinstance(model_or_arch, str) else getattr(model_or_arch, "layerlab_arch", None)
    if arch is None:
        raise LayerlabError(
            "cannot build a fresh instance of this model: it has no architecture spec (not loaded by a timm:/torchvision: "
            "spec or from a layerlab checkpoint); set model.layerlab_arch = 'timm:NAME?kwargs' or save it with "
            "layerlab.save_checkpoint"
        )
    if device is None and isinstance(model_or_arch, nn.Module):
        device = next(iter(model_or_arch.parameters())).device
    devices = [torch.device(device)] if device is not None and torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        fresh = load_model(arch)
    if isinstance(model_or_arch, Normalized) and not isinstance(fresh, Normalized):
        fresh = Normalized(fresh, *_mean_std(model_or_arch))
        fresh.layerlab_arch = arch
    return fresh.to(device or "cpu").eval()


def _mean_std(model: Normalized) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return tuple(model.mean.flatten().tolist()), tuple(model.std.flatten().tolist())


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


# --------------------------------------------------------------------------------------------------- file
@MODEL_SOURCES.register("file")
def _file_model(path: str, weights: str | None, kwargs: dict[str, Any]) -> nn.Module:
    p = Path(path).expanduser()
    if not p.exists():
        raise LayerlabError(f"checkpoint {str(p)!r} does not exist; pass an existing path as 'file:PATH'")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # a torn or foreign file
        raise LayerlabError(f"cannot read checkpoint {str(p)!r} ({type(e).__name__}: {e}); is it a torch.save file?") from None
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        model = load_model(obj["arch"])
        if obj.get("normalize") is not None:
            model = Normalized(model, *obj["normalize"])
        model.load_state_dict(obj["state_dict"])
        model.layerlab_arch = obj["arch"]
        model.layerlab_checkpoint = {k: v for k, v in obj.items() if k not in ("state_dict", "optimizer")}
        return model
    raise LayerlabError(
        f"{str(p)!r} is neither a layerlab checkpoint nor a saved nn.Module (a bare state_dict has no architecture); "
        "save with layerlab.save_checkpoint(model, path) or torch.save(model, path)"
    )


def save_checkpoint(model: nn.Module, path: str | Path, **meta: Any) -> Path:
    """Write a layerlab checkpoint atomically: architecture spec + state_dict + metadata (epoch, metrics, ...)."""
    arch = getattr(model, "layerlab_arch", None)
    if arch is None:
        raise LayerlabError("model has no layerlab_arch; load it with layerlab.load_model(spec) or set model.layerlab_arch")
    from .store import atomic_write

    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    normalize = _mean_std(model) if isinstance(model, Normalized) else None
    payload = {"format": CHECKPOINT_FORMAT, "arch": arch, "normalize": normalize, "state_dict": state, **meta}
    return atomic_write(Path(path), lambda f: torch.save(payload, f))


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a layerlab checkpoint (everything but the tensors)."""
    obj = torch.load(Path(path), map_location="cpu", weights_only=False)
    return {k: v for k, v in obj.items() if k not in ("state_dict", "optimizer")}
