"""The chain of stages a model's forward pass is made of, where it can be split (so criticality's prefix cache
re-runs only the suffix after a perturbed layer).

Plain ``nn.Sequential`` (recursively), timm/torchvision ResNets, timm ViT/DeiT
(patch embedding, each transformer block, head), timm ConvNeXt (stem, each stage's downsample and blocks, head),
timm EfficientNet/MobileNetV3 (stem, each block, head), timm Swin (patch embedding, each stage's patch merging
and blocks, norm, head), timm RegNet (stem, each block of each stage, final conv, head), torchvision
``features``/``avgpool``/``classifier`` models (EfficientNet, MobileNetV3, ConvNeXt, VGG), torchvision
MobileNetV2 and DenseNet (each item of ``features``, each layer of a dense block, then pool and classifier),
torchvision ViT (patch embedding + class token + position embedding, each encoder layer, ln, class token + heads)
and the ``Normalized`` wrapper around any of them. A chain is only a proposal:
:class:`layerlab.criticality.Pipeline` checks it against the real forward before use.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CHAINS", "Stage", "stage_chain"]


class _Call(nn.Module):
    """A part of a model's forward written as a function of the model (``fn(model, x)``), callable through
    ``functional_call`` with the model's parameters under ``owner.``."""

    def __init__(self, owner: nn.Module, fn: Callable[[Any, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.owner = owner
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.owner, x)


@dataclass
class Stage:
    """One link of a model's forward chain: a submodule (``path``), a part of a model's own forward (``call``: a
    function of the model at ``path`` that owns the parameters under the names in ``owned``), or parameter-free
    glue (flatten, normalise)."""

    path: str
    kind: str = "module"  # "module" | "call" | "flatten" | "normalize"
    module: nn.Module | None = None
    owned: tuple[str, ...] = field(default_factory=tuple)

    def _rel(self, name: str) -> str | None:
        if self.path == "":
            return name
        if name == self.path:
            return ""
        return name[len(self.path) + 1 :] if name.startswith(self.path + ".") else None

    def owns(self, name: str) -> bool:
        """Whether the module at ``name`` (a layer or parameter path) lives inside this stage."""
        if self.kind == "module":
            return self._rel(name) is not None
        if self.kind == "call":
            rel = self._rel(name)
            return rel is not None and any(rel == o or rel.startswith(o + ".") for o in self.owned)
        return False

    def key(self, name: str) -> str | None:
        """The name the stage's module knows a parameter by (None when the parameter is not visible to it)."""
        rel = self._rel(name)
        if rel is None or rel == "":
            return None
        return "owner." + rel if self.kind == "call" else rel


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _call(owner: nn.Module, path: str, fn: Callable[[Any, torch.Tensor], torch.Tensor], owned: tuple[str, ...]) -> Stage:
    return Stage(path, "call", _Call(owner, fn), owned)


def _top_names(m: nn.Module) -> tuple[str, ...]:
    """The names of a module's children and own parameters: what a call stage over all of it owns."""
    return tuple(n for n, _ in m.named_children()) + tuple(n for n, _ in m.named_parameters(recurse=False))


def stage_chain(model: nn.Module) -> list[Stage]:
    """The model as a chain of stages whose composition is its forward pass, or the whole model as one stage
    (see the module docstring for the architectures understood; every chain is checked before use)."""
    return _expand(model, "")


def _expand(m: nn.Module, path: str) -> list[Stage]:
    from .models import Normalized

    if _is_plain_sequential(m):
        return [s for name, child in m.named_children() for s in _expand(child, _join(path, name))]
    if isinstance(m, Normalized):
        return [Stage(path, "normalize", m), *_expand(m.net, _join(path, "net"))]
    for chain in CHAINS:
        try:
            found = chain(m, path)
        except Exception:  # a variant the builder does not know: leave it whole
            found = None
        if found is not None:
            return found
    return [Stage(path, "module", m)]


def _seq(m: nn.Module, path: str) -> list[Stage]:
    """``m`` expanded, with parameter-free identity modules left out."""
    return [] if isinstance(m, nn.Identity) else _expand(m, path)


def _resnet_chain(m: nn.Module, path: str) -> list[Stage] | None:
    """timm / torchvision ResNet: stem modules, every residual block, global pool (+ flatten), fc."""
    kids = dict(m.named_children())
    act = next((a for a in ("act1", "relu") if a in kids), None)
    pool = next((p for p in ("global_pool", "avgpool") if p in kids), None)
    stages = sorted((int(k[5:]), k) for k in kids if re.fullmatch(r"layer\d+", k))
    if act is None or pool is None or not stages or not {"conv1", "bn1", "maxpool", "fc"} <= kids.keys():
        return None
    if [i for i, _ in stages] != list(range(1, len(stages) + 1)):
        return None
    order = ["conv1", "bn1", act, "maxpool", *(k for _, k in stages), pool]
    out = [s for k in order for s in _expand(kids[k], _join(path, k))]
    if pool == "avgpool":  # torchvision: avgpool -> torch.flatten(x, 1) -> fc; timm's global_pool flattens
        out.append(Stage(_join(path, "flatten"), "flatten"))
    return out + _expand(kids["fc"], _join(path, "fc"))


def _timm_class(m: nn.Module, module: str, name: str) -> bool:
    return type(m).__module__.startswith("timm.") and any(
        c.__module__ == f"timm.models.{module}" and c.__name__ == name for c in type(m).__mro__
    )


def _vit_prefix(m: Any, x: torch.Tensor) -> torch.Tensor:
    return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))


def _vit_suffix(m: Any, x: torch.Tensor) -> torch.Tensor:
    return m.forward_head(m.norm(x))


def _timm_vit_chain(m: nn.Module, path: str) -> list[Stage] | None:
    """timm VisionTransformer (ViT, DeiT): patch embedding + position embedding, each block, norm + head."""
    if not _timm_class(m, "vision_transformer", "VisionTransformer") or not _is_plain_sequential(m.blocks):
        return None
    first = ("patch_embed", "cls_token", "reg_token", "dist_token", "pos_embed", "pos_drop", "patch_drop", "norm_pre")
    top = [n for n, _ in m.named_children()] + [n for n, _ in m.named_parameters(recurse=False)]
    last = tuple(n for n in top if n not in first and n != "blocks")  # norm, fc_norm, head, head_dist, attn_pool ...
    blocks = [Stage(_join(path, f"blocks.{i}"), "module", b) for i, b in enumerate(m.blocks)]
    return [_call(m, path, _vit_prefix, first), *blocks, _call(m, path, _vit_suffix, last)]


def _head(m: Any, x: torch.Tensor) -> torch.Tensor:
    return m.forward_head(x)


def _timm_convnext_chain(m: nn.Module, path: str) -> list[Stage] | None:
    """timm ConvNeXt: stem, per stage its downsample and each block, norm_pre, head."""
    if not _timm_class(m, "convnext", "ConvNeXt") or not _is_plain_sequential(m.stages):
        return None
    stages = _stages(m.stages, _join(path, "stages"), "convnext", "ConvNeXtStage")
    if stages is None:
        return None
    out = _seq(m.stem, _join(path, "stem")) + stages + _seq(m.norm_pre, _join(path, "norm_pre"))
    return out + [_call(m, path, _head, ("head",))]


def _stages(stages: nn.Module, path: str, module: str, cls: str) -> list[Stage] | None:
    """timm stages of class ``cls`` (ConvNeXt, Swin): each stage's downsample, then each of its blocks; None when a
    stage is of another class or its blocks are not a plain Sequential."""
    out: list[Stage] = []
    for i, stage in enumerate(stages):
        if not _timm_class(stage, module, cls) or not _is_plain_sequential(stage.blocks):
            return None
        sp = _join(path, str(i))
        out += _seq(stage.downsample, _join(sp, "downsample"))
        out += [Stage(_join(sp, f"blocks.{j}"), "module", b) for j, b in enumerate(stage.blocks)]
    return out


def _timm_efficientnet_chain(m: nn.Module, path: str) -> list[Stage] | None:
    """timm EfficientNet / MobileNetV3: conv_stem, bn1, each block of each stage, then the rest as the head."""
    effnet = _timm_class(m, "efficientnet", "EfficientNet")
    mobile = _timm_class(m, "mobilenetv3", "MobileNetV3")
    if not (effnet or mobile) or not _is_plain_sequential(m.blocks):
        return None
    out = _seq(m.conv_stem, _join(path, "conv_stem")) + _seq(m.bn1, _join(path, "bn1"))
    for i, stage in enumerate(m.blocks):
        if not _is_plain_sequential(stage):
            return None
        out += [Stage(_join(path, f"blocks.{i}.{j}"), "module", b) for j, b in enumerate(stage)]
    if effnet:
        out += _seq(m.conv_head, _join(path, "conv_head")) + _seq(m.bn2, _join(path, "bn2"))
        return out + [_call(m, path, _head, ("global_pool", "classifier"))]
    return out + [_call(m, path, _head, ("global_pool", "conv_head", "norm_head", "act2", "flatten", "classifier"))]


def _tv_features_chain(m: nn.Module, path: str) -> list[Stage] | None:
    """torchvision ``features -> avgpool -> [flatten] -> classifier`` models (EfficientNet, MobileNetV3, ConvNeXt,
    VGG): flatten only where the classifier does not flatten itself."""
    if not type(m).__module__.startswith("torchvision.models"):
        return None
    kids = dict(m.named_children())
    if set(kids) != {"features", "avgpool", "classifier"} or not _is_plain_sequential(kids["features"]):
        return None
    out = _expand(kids["features"], _join(path, "features")) + [Stage(_join(path, "avgpool"), "module", kids["avgpool"])]
    classifier = kids["classifier"]
    if not any(isinstance(c, nn.Flatten) for c in classifier.modules()):
        out.append(Stage(_join(path, "flatten"), "flatten"))
    return out + _expand(classifier, _join(path, "classifier"))


def _timm_swin_chain(m: nn.Module, path: str) -> list[Stage] | None:
    """timm Swin Transformer (v1): patch embedding, per stage its patch merging and each block, norm, head."""
    if not _timm_class(m, "swin_transformer", "SwinTransformer") or not _is_plain_sequential(m.layers):
        return None
    if set(_top_names(m)) != {"patch_embed", "layers", "norm", "head"}:  # e.g. an absolute position embedding
        return None
    stages = _stages(m.layers, _join(path, "layers"), "swin_transformer", "SwinTransformerStage")
    if stages is None:
        return None
    out = _expand(m.patch_embed, _join(path, "patch_embed")) + stages
    return out + _seq(m.norm, _join(path, "norm")) + [_call(m, path, _head, ("head",))]


def _timm_regnet_chain(m: nn.Module, path: str) -> list[Stage] | None:
    """timm RegNet (X, Y, Z): stem, each block of stages s1..s4 (a RegStage runs its children in order),
    final conv, head."""
    if not _timm_class(m, "regnet", "RegNet"):
        return None
    stages = [f"s{i}" for i in range(1, 5)]
    if set(_top_names(m)) != {"stem", *stages, "final_conv", "head"}:
        return None
    out = _expand(m.stem, _join(path, "stem"))
    for name in stages:
        stage = getattr(m, name)
        if not _timm_class(stage, "regnet", "RegStage"):
            return None
        out += [Stage(_join(path, f"{name}.{b}"), "module", block) for b, block in stage.named_children()]
    return out + _seq(m.final_conv, _join(path, "final_conv")) + [_call(m, path, _head, ("head",))]


def _tv_class(m: nn.Module, module: str, name: str) -> bool:
    """``m`` is an instance of torchvision's ``torchvision.models.<module>.<name>`` (or of a subclass)."""
    return any(c.__module__ == f"torchvision.models.{module}" and c.__name__ == name for c in type(m).__mro__)


def _tv_vit_prefix(m: Any, x: torch.Tensor) -> torch.Tensor:
    """torchvision VisionTransformer.forward up to the encoder layers: patch embedding, class token, then the
    encoder's position embedding and dropout (as ``Encoder.forward`` adds them)."""
    x = m._process_input(x)
    x = torch.cat([m.class_token.expand(x.shape[0], -1, -1), x], dim=1)
    return m.encoder.dropout(x + m.encoder.pos_embedding)


def _tv_vit_suffix(m: Any, x: torch.Tensor) -> torch.Tensor:
    return m.heads(x[:, 0])


def _tv_vit_chain(m: nn.Module, path: str) -> list[Stage] | None:
    """torchvision VisionTransformer: patch embedding + class token + position embedding, each encoder layer,
    the encoder's final ln, then the class token through the heads."""
    if not _tv_class(m, "vision_transformer", "VisionTransformer"):
        return None
    encoder = m.encoder
    if set(_top_names(m)) != {"conv_proj", "class_token", "encoder", "heads"}:
        return None
    if set(_top_names(encoder)) != {"pos_embedding", "dropout", "layers", "ln"}:
        return None
    if not _is_plain_sequential(encoder.layers):
        return None
    layers = [Stage(_join(path, f"encoder.layers.{n}"), "module", b) for n, b in encoder.layers.named_children()]
    first = _call(m, path, _tv_vit_prefix, ("conv_proj", "class_token", "encoder.pos_embedding", "encoder.dropout"))
    ln = Stage(_join(path, "encoder.ln"), "module", encoder.ln)
    return [first, *layers, ln, _call(m, path, _tv_vit_suffix, ("heads",))]


def _pool_head(m: Any, x: torch.Tensor) -> torch.Tensor:
    """torchvision MobileNetV2 after ``features``: global average pool, flatten, classifier."""
    return m.classifier(torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1))


def _relu_pool_head(m: Any, x: torch.Tensor) -> torch.Tensor:
    """torchvision DenseNet after ``features``: ReLU, then :func:`_pool_head`. Not in place (the model's own
    ``F.relu(inplace=True)``): the stage's input is a cached activation."""
    return _pool_head(m, F.relu(x))


#: torchvision models whose forward is ``features`` then a function of the model: (module, class) -> that function
_TV_HEADS: dict[tuple[str, str], Callable[[Any, torch.Tensor], torch.Tensor]] = {
    ("mobilenetv2", "MobileNetV2"): _pool_head,
    ("densenet", "DenseNet"): _relu_pool_head,
}


def _tv_features_head_chain(m: nn.Module, path: str) -> list[Stage] | None:
    """torchvision MobileNetV2 and DenseNet: each item of ``features`` (dense blocks layer by layer), then the
    pool-and-classify part of their forward (:data:`_TV_HEADS`)."""
    head = next((fn for (mod, name), fn in _TV_HEADS.items() if _tv_class(m, mod, name)), None)
    if head is None or set(_top_names(m)) != {"features", "classifier"} or not _is_plain_sequential(m.features):
        return None
    return _expand(m.features, _join(path, "features")) + [_call(m, path, head, ("classifier",))]


def _dense_step(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """One layer of a dense block on the concatenation of all earlier features: appends its new features."""
    return torch.cat([x, layer(x)], 1)


def _tv_dense_block_chain(m: nn.Module, path: str) -> list[Stage] | None:
    """torchvision ``_DenseBlock``: one stage per ``_DenseLayer``. The block feeds layer k the concatenation of its
    input and layers 1..k-1's outputs and returns the concatenation of all; carrying that concatenation from
    stage to stage computes the same tensors."""
    if not _tv_class(m, "densenet", "_DenseBlock"):
        return None
    layers = list(m.named_children())
    if not layers or not all(_tv_class(layer, "densenet", "_DenseLayer") for _, layer in layers):
        return None
    return [_call(layer, _join(path, n), _dense_step, _top_names(layer)) for n, layer in layers]


#: the chain builders :func:`stage_chain` tries, in order: each returns the stages of a model it knows, else None
CHAINS: tuple[Callable[[nn.Module, str], list[Stage] | None], ...] = (
    _resnet_chain, _timm_vit_chain, _timm_convnext_chain, _timm_efficientnet_chain, _timm_swin_chain,
    _timm_regnet_chain, _tv_features_chain, _tv_features_head_chain, _tv_dense_block_chain, _tv_vit_chain,
)
