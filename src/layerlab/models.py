"""Model specs: one registry, one way in (``load_model(spec)``).

Spec forms::

    timm:NAME[?k=v&k=v]          timm architecture; a pretrained tag (``resnet50.a1_in1k``) or ``pretrained=true``
                                 loads weights from the local cache only (never downloads)
    torchvision:NAME[:WEIGHTS]   torchvision architecture, weights from the local torch hub cache only
    file:PATH                    a layerlab checkpoint (read with ``torch.load(weights_only=True)``), or a whole
                                 module saved with ``torch.save(model)``: unpickling runs code from the file, so
                                 that needs ``load_model(spec, trust_pickle=True)`` (the CLI:
                                 ``layerlab --trust-pickle COMMAND``, or ``LAYERLAB_TRUST_PICKLE=1`` in the environment)

Every model loaded from a spec carries ``model.layerlab_arch`` (an architecture spec without weights) so that a
fresh, untrained instance of the same architecture can be built (:func:`fresh_model`), which the layer
criticality analysis needs. Any other ``nn.Module`` gets its fresh instances from :func:`fresh_source`: a
``fresh=`` callable, its spec, its timm/torchvision constructor when it can be rebuilt exactly, or (last resort)
each layer's own ``reset_parameters()``.
"""
from __future__ import annotations

import copy
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl

import torch
from torch import nn

from .errors import LayerlabError, SpecError
from .registry import Registry, close_names, did_you_mean

CHECKPOINT_FORMAT = "layerlab-checkpoint/1"
TRUST_PICKLE_ENV = "LAYERLAB_TRUST_PICKLE"  # "1": unpickle whole modules from file: specs (the CLI's opt-in)
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


def load_model(
    spec: str,
    *,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    trust_pickle: bool | None = None,
) -> nn.Module:
    """Build the model a spec names, in eval mode, with ``layerlab_arch``/``layerlab_spec`` attributes set.

    ``file:`` checkpoints are read with ``torch.load(weights_only=True)``. A whole module saved with
    ``torch.save(model)`` can only be unpickled, which runs code from the file: pass ``trust_pickle=True`` for a
    file you trust (default: the environment variable ``LAYERLAB_TRUST_PICKLE=1``), else it is an error that says
    so. A model loaded that way remembers the opt-in (``model.layerlab_trust_pickle``) for the checkpoints and
    fresh instances derived from it.
    """
    parsed = ModelSpec.parse(spec)
    kwargs = dict(parsed.kwargs)
    if num_classes is not None and parsed.source != "file":
        kwargs["num_classes"] = num_classes
    if parsed.source == "file":
        kwargs["trust_pickle"] = trusts_pickle(trust_pickle)
    model = MODEL_SOURCES.get(parsed.source)(parsed.name, parsed.weights, kwargs)
    model.layerlab_spec = spec
    if parsed.source == "file" and kwargs["trust_pickle"]:
        model.layerlab_trust_pickle = True
    if not hasattr(model, "layerlab_arch"):
        # A whole module saved with torch.save carries no architecture spec: no fresh instance can be made of it.
        model.layerlab_arch = None if parsed.source == "file" else str(ModelSpec(parsed.source, parsed.name, None, _arch_kwargs(kwargs)))
    return model.to(device).eval()


@torch.no_grad()
def num_outputs(model: nn.Module, sample: torch.Tensor) -> int:
    """How many logits ``model`` returns, measured on ``sample`` (float images [N, C, H, W]; one is enough).

    Measured rather than read from a head attribute, so it holds for every wrapper (Normalized, TrAct, timm heads).
    """
    from .runtime import eval_mode

    device = next(iter(model.parameters()), torch.empty(0)).device
    with eval_mode(model), torch.no_grad():
        out = model(sample[:1].to(device))
    return int(out.shape[-1])


def trusts_pickle(trust_pickle: bool | None = None) -> bool:
    """Whether whole pickled modules may be loaded: ``trust_pickle`` when given, else ``LAYERLAB_TRUST_PICKLE=1``."""
    if trust_pickle is not None:
        return bool(trust_pickle)
    return os.environ.get(TRUST_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _arch_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k != "pretrained"}


# ------------------------------------------------------------------------------------------ fresh instances
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
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _load_file(p: Path, trust_pickle: bool) -> Any:
    """``torch.load`` with ``weights_only=True``; pickled objects only with ``trust_pickle`` (else a clear error)."""
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _UNSAFE_GLOBAL.search(str(e))
        if found is None:  # a torn or foreign file, not a pickled object
            raise LayerlabError(f"cannot read checkpoint {str(p)!r} ({type(e).__name__}: {_first_line(e)}); "
                                "is it a torch.save file?") from None
        if not trust_pickle:
            raise LayerlabError(
                f"{str(p)!r} holds pickled Python objects ({found.group(1)}: e.g. a whole module saved with "
                "torch.save(model)); unpickling runs code from the file, so layerlab loads it only when asked: "
                "load_model('file:PATH', trust_pickle=True), or `layerlab --trust-pickle COMMAND ...` on the command "
                "line (LAYERLAB_TRUST_PICKLE=1 in the environment does the same), for a file you trust; or save the model as a layerlab checkpoint (layerlab.save_checkpoint)"
            ) from None
    except Exception as e:  # a torn or foreign file
        raise LayerlabError(f"cannot read checkpoint {str(p)!r} ({type(e).__name__}: {_first_line(e)}); "
                            "is it a torch.save file?") from None
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise LayerlabError(f"cannot read checkpoint {str(p)!r} ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


@MODEL_SOURCES.register("file")
def _file_model(path: str, weights: str | None, kwargs: dict[str, Any]) -> nn.Module:
    p = Path(path).expanduser()
    if not p.exists():
        raise LayerlabError(f"checkpoint {str(p)!r} does not exist; pass an existing path as 'file:PATH'")
    trust = bool(kwargs.get("trust_pickle", False))
    obj = _load_file(p, trust)
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        model = load_model(obj["arch"], trust_pickle=trust)
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


def checkpoint_state(path: str | Path, *, trust_pickle: bool | None = None) -> dict[str, torch.Tensor]:
    """The state_dict of a layerlab checkpoint, read with ``weights_only=True`` and without building the model
    (so a checkpoint whose architecture is a pickled module needs no opt-in); a whole saved module needs
    ``trust_pickle``, as in :func:`load_model`."""
    p = Path(path).expanduser()
    if not p.exists():
        raise LayerlabError(f"checkpoint {str(p)!r} does not exist")
    obj = _load_file(p, trusts_pickle(trust_pickle))
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return obj["state_dict"]
    raise LayerlabError(f"{str(p)!r} is neither a layerlab checkpoint nor a saved nn.Module")


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a layerlab checkpoint (everything but the tensors)."""
    obj = _load_file(Path(path), trusts_pickle())
    return {k: v for k, v in obj.items() if k not in ("state_dict", "optimizer")}
