"""Layer criticality: which layers does a trained model actually use?

Re-randomise one layer (or residual block) at a time, keep every other parameter trained, and measure how much
the model's output moves (Gavrikov, Agnihotri, Keuper, Keuper 2024, arXiv 2410.14470; METHODS.md section 1):

    criticality(l) = 100 * (1 - mean_t mean_x cos(softmax f(x), softmax f_{l <- fresh_t}(x)))    [%]

where trial t copies layer l's weight and bias from ONE fresh, untrained instance of the same architecture built
by its own constructor (:func:`layerlab.models.fresh_model`, on the CPU so results do not depend on the device)
under the seed ``derive_seed("criticality/fresh", seed, t)`` (:mod:`layerlab.seeds`): a stream of its own that no
training seed can coincide with. (With ``seed + t``, trial 0 of a model trained under seed 0 re-installed the
layer's own initial weights and measured a reset to init, not a re-randomisation.) Where the run is known (a
layerlab checkpoint inside its run folder, or ``run=``), a fresh instance equal to the run's epoch-0 weights is an
error. Normalisation layers are never touched. Every layer and trial sees the same images
in the same order. Per (layer, trial) the table also holds top-1 agreement with the original model, top-1
accuracy after the swap (Zhang, Bengio, Singer 2022's metric) and KL(original || swapped).

Other references for layer l (``mode``):

* ``reinit``      -- Zhang et al. 2022 re-initialisation: l's weights at step 0 of training (a run's epoch-0
                     checkpoint, theta_0);
* ``checkpoint``  -- Zhang et al. robustness to checkpoint tau: l's weights at checkpoint tau of the run;
* ``units="blocks"`` resets all layers of a residual block together (Zhang et al.'s unit).

:func:`module_criticality` is Chatterji, Neyshabur, Sedghi 2020's module criticality.

The model is never modified: every forward is ``torch.func.functional_call`` with a swapped parameter dict, so
after any run, including one that raised, the model reproduces its logits bit for bit.

Speed (the naive way runs the whole network over all images for every (layer, trial)): the model is cut into a
chain of stages (stem modules, residual blocks, pool, head; :func:`stage_decomposition`); per batch the input to
every stage is computed once with the original weights, and a swap of layer l re-runs only from l's stage on.
The T references of a layer share one pass: their stage outputs are stacked along the batch and the rest of the
network runs once (eval-mode BatchNorm keeps this exact). On CUDA, bf16 autocast and channels_last are on by
default. ``naive=True`` runs the reference implementation; both agree to float precision.
"""
from __future__ import annotations

import hashlib
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .data import ImageData, check_label_coverage, load_data, to_unit_float
from .errors import LayerlabError, NonFiniteError, ShapeError, check_finite
from .layers import LEARNABLE, display_label, layers as learnable_layers, pick_by_name, resolve_layers, residual_blocks
from .models import Normalized, fresh_model, load_model
from .runs import checkpoint_path, checkpoints as run_checkpoints
from .seeds import derive_seed, generator
from .store import Store, job_key

ANALYSIS = "criticality"
MODULE_ANALYSIS = "module-criticality"
VERSION = 2  # bump when the numbers a job produces change; old shards are then recomputed
# 2: fresh instances and module-criticality noise from purpose streams (layerlab.seeds), not seed + t;
#    module criticality searches sigma by bisection on a log scale
MODES = ("randomize", "reinit", "checkpoint")
UNITS = ("layers", "blocks")
MAX_STACK = 8  # at most this many references of one unit share a pass (memory: MAX_STACK x batch)
SIGMA_MIN = 1e-6  # module criticality: the smallest noise scale searched
SIGMA_RTOL = 0.05  # module criticality: sigma is bisected (log scale) to this relative precision (mu: ~2x that;
# finer than the alpha grid, whose neighbouring points differ by 20 % or more in alpha^2 near alpha = 1)

ModelLike = nn.Module | str

# ============================================================================================ pure metrics


def _check_logits(reference: torch.Tensor, other: torch.Tensor) -> None:
    if reference.ndim != 2 or reference.shape != other.shape:
        raise ShapeError(
            f"logits: expected two [N, classes] tensors of the same shape, got {tuple(reference.shape)} and "
            f"{tuple(other.shape)}; pass the model outputs of one batch before and after the swap"
        )


def softmax_cosine(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity of softmax(reference) and softmax(other), float64 [N] (Gavrikov et al. 2024).

    >>> softmax_cosine(torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 0.0]]))
    tensor([1.], dtype=torch.float64)
    """
    _check_logits(reference, other)
    p = torch.softmax(reference.double(), dim=-1)
    q = torch.softmax(other.double(), dim=-1)
    return F.cosine_similarity(p, q, dim=-1)


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-row KL(softmax(reference) || softmax(other)) in nats, float64 [N]."""
    _check_logits(reference, other)
    logp = torch.log_softmax(reference.double(), dim=-1)
    logq = torch.log_softmax(other.double(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def _stats_update(reference: torch.Tensor, other: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """One batch -> sufficient statistics [sum cos, sum agree, sum correct, n labelled, sum kl, n] (float64)."""
    cos = softmax_cosine(reference, other)
    kl = kl_divergence(reference, other)
    pred = other.argmax(dim=-1)
    agree = (reference.argmax(dim=-1) == pred).sum()
    if labels is None:
        correct = labelled = torch.zeros((), dtype=torch.long)
    else:
        has = labels >= 0
        correct, labelled = ((pred == labels) & has).sum(), has.sum()
    n = torch.tensor(reference.shape[0])
    return torch.stack([cos.sum(), agree.double(), correct.double(), labelled.double(), kl.sum(), n.double()]).cpu()


def _stats_compute(stats: torch.Tensor) -> dict[str, float]:
    """Sufficient statistics -> similarity, criticality (%), agreement, accuracy (NaN without labels), kl."""
    s = stats.tolist()
    n = s[5]
    similarity = s[0] / n
    return {
        "similarity": similarity,
        "criticality": 100.0 * (1.0 - similarity),
        "agreement": s[1] / n,
        "accuracy": s[2] / s[3] if s[3] > 0 else math.nan,
        "kl": s[4] / n,
    }


def layer_criticality(
    reference: torch.Tensor, other: torch.Tensor, labels: torch.Tensor | None = None
) -> dict[str, float]:
    """All per-(layer, trial) numbers from the original and the swapped logits of the same images.

    >>> layer_criticality(torch.zeros(4, 10), torch.zeros(4, 10))["criticality"]
    0.0
    """
    return _stats_compute(_stats_update(reference, other, labels))


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per-(model, layer, mode, epoch) summary of a per-trial table: mean criticality, std (ddof=1) and sem.

    ``std`` is the spread over trials (the paper's "standard error" figure); ``sem`` = std / sqrt(trials).
    """
    need = {"model", "layer", "label", "criticality"}
    if missing := need - set(table.columns):
        raise LayerlabError(f"summarize: the table lacks columns {sorted(missing)}; pass the table criticality() returns")
    keys = [c for c in ("model", "layer", "label", "kind", "index", "units", "mode", "epoch") if c in table.columns]
    means = [c for c in ("similarity", "agreement", "accuracy", "kl", "base_accuracy") if c in table.columns]
    g = table.groupby(keys, dropna=False, sort=False)
    out = g["criticality"].agg(criticality="mean", std=lambda s: s.std(ddof=1), trials="count").reset_index()
    if means:
        out = out.merge(g[means].mean().reset_index(), on=keys, how="left")
    out["sem"] = out["std"] / np.sqrt(out["trials"])
    cols = keys + ["criticality", "std", "sem", "trials"] + means
    return out[cols].reset_index(drop=True)


def average_criticality(summary: pd.DataFrame, mode: str = "randomize") -> pd.DataFrame:
    """Per model: the mean over layers of the layer criticalities (the paper's "average criticality")."""
    rows = summary[summary["mode"] == mode] if "mode" in summary.columns else summary
    return rows.groupby("model", sort=False)["criticality"].mean().reset_index()


def network_criticality(table: pd.DataFrame) -> pd.DataFrame:
    """Per model: Chatterji et al. 2020's network criticality, the sum of the module criticalities mu_i."""
    return (
        table.groupby("model", sort=False)
        .agg(network_criticality=("criticality", "sum"), units=("layer", "count"))
        .reset_index()
    )


# ==================================================================================================== units


@dataclass(frozen=True)
class Unit:
    """What one swap replaces: a learnable layer, or all learnable layers of one residual block."""

    name: str
    label: str
    kind: str
    index: int
    layers: tuple[str, ...]
    params: tuple[str, ...]  # full parameter names: each layer's weight and bias, nothing else


_BLOCK_KEY = re.compile(r"(?:^|\.)layer(\d+)\.(\d+)$")
_VIT_KEY = re.compile(r"(?:^|\.)blocks\.(\d+)$")


def _block_label(key: str) -> str:
    inner = key[4:] if key.startswith("net.") else key
    if m := _BLOCK_KEY.search(inner):
        return f"[{m.group(1)}.{m.group(2)}]"
    if m := _VIT_KEY.search(inner):
        return f"[{m.group(1)}]"
    return display_label(key)


def _layer_params(model: nn.Module, name: str) -> tuple[str, ...]:
    module = model.get_submodule(name)
    return tuple(f"{name}.{p}" for p, t in module.named_parameters(recurse=False) if t is not None)


def units_of(model: nn.Module, units: str = "layers", names: Sequence[str] | None = None) -> list[Unit]:
    """The units a run walks over, in forward order: every Conv2d/Linear, or every residual block (Zhang et al.).

    ``names`` selects some (layer names or labels; block names like ``layer3.1`` or labels like ``[3.1]``).
    """
    if units not in UNITS:
        raise LayerlabError(f"units must be one of {', '.join(UNITS)}, got {units!r}")
    infos = learnable_layers(model)
    if not infos:
        raise LayerlabError(
            f"{type(model).__name__} has no learnable Conv2d/Linear layer; criticality needs at least one"
        )
    if units == "layers":
        chosen = resolve_layers(model, list(names) if names else None)
        pos = {i.name: i.index for i in infos}
        return [
            Unit(i.name, i.label, i.kind, pos[i.name], (i.name,), _layer_params(model, i.name)) for i in chosen
        ]
    all_units = [
        Unit(
            key,
            _block_label(key),
            "block" if len(members) > 1 or key not in members else next(i.kind for i in infos if i.name == key),
            k,
            tuple(members),
            tuple(p for m in members for p in _layer_params(model, m)),
        )
        for k, (key, members) in enumerate(residual_blocks(model).items())
    ]
    if not names:
        return all_units
    return pick_by_name(
        all_units,
        names,
        lambda n, close: f"block {n!r} does not exist (units='blocks' selects residual blocks such as "
        f"{', '.join(repr(u.name) for u in all_units[:3])})"
        + (f"; did you mean {', '.join(map(repr, close))}?" if close else ""),
    )


# ==================================================================================== stage decomposition


@dataclass
class Stage:
    """One link of a model's forward chain: a submodule (``path``), or parameter-free glue (flatten, normalise)."""

    path: str
    kind: str = "module"  # "module" | "flatten" | "normalize"
    module: nn.Module | None = None

    def owns(self, name: str) -> bool:
        """Whether the module at ``name`` (a layer or parameter path) lives inside this stage."""
        if self.kind != "module":
            return False
        return self.path == "" or name == self.path or name.startswith(self.path + ".")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _expand(m: nn.Module, path: str) -> list[Stage]:
    """A plain nn.Sequential is the chain of its children (recursively); anything else is one stage."""
    if _is_plain_sequential(m):
        return [s for name, child in m.named_children() for s in _expand(child, _join(path, name))]
    if isinstance(m, Normalized):
        return [Stage(path, "normalize", m), *_expand(m.net, _join(path, "net"))]
    resnet = _resnet_stages(m, path)
    return resnet if resnet is not None else [Stage(path, "module", m)]


def _resnet_stages(m: nn.Module, path: str) -> list[Stage] | None:
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


def stage_decomposition(model: nn.Module) -> list[Stage]:
    """The model as a chain of stages whose composition is its forward pass, or the whole model as one stage.

    Understood: plain ``nn.Sequential`` (recursively), timm/torchvision ResNets (stem, blocks, pool, fc) and the
    ``Normalized`` wrapper around either. The chain is verified against the real forward on the first batch
    before use (:class:`Pipeline`), so an unknown architecture falls back to the full forward, always correct.
    """
    return _expand(model, "")


class Pipeline:
    """Runs a model stage by stage with parameter dicts on ``device``; never writes to the model.

    ``params`` holds every parameter and buffer (detached; moved or re-laid-out copies only when the device or
    memory format differs), each stage gets its slice under relative names, and overrides (full names -> tensor)
    replace entries of those dicts for one call only.
    """

    def __init__(
        self, model: nn.Module, device: torch.device, *, amp: bool, channels_last: bool, decompose: bool = True
    ) -> None:
        self.model = model
        self.device = device
        self.amp = amp
        self.channels_last = channels_last
        self.params = {
            k: self.prepare(v.detach())
            for k, v in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        }
        self.stages = stage_decomposition(model) if decompose else [Stage("", "module", model)]
        names = [i.name for i in learnable_layers(model)]
        if len(self.stages) > 1 and any(self.stage_of(n) is None for n in names):
            self.stages = [Stage("", "module", model)]
        self._stage_params = [self._slice(s) for s in self.stages]

    # ------------------------------------------------------------------------------------------- plumbing
    def prepare(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor on the pipeline's device (channels_last for 4-D floating tensors when enabled)."""
        t = t.to(self.device)
        if self.channels_last and t.ndim == 4 and t.is_floating_point():
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def _slice(self, stage: Stage) -> dict[str, torch.Tensor]:
        if stage.kind == "flatten":
            return {}
        if stage.path == "":
            return self.params
        prefix = stage.path + "."
        return {k[len(prefix):]: v for k, v in self.params.items() if k.startswith(prefix)}

    def stage_of(self, name: str) -> int | None:
        """Index of the stage that owns the layer/parameter ``name`` (None when no stage does)."""
        return next((i for i, s in enumerate(self.stages) if s.owns(name)), None)

    def split(self, overrides: Mapping[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
        """Full-name overrides -> {stage index: overrides under the stage's relative names}."""
        out: dict[int, dict[str, torch.Tensor]] = {}
        for name, t in overrides.items():
            i = self.stage_of(name)
            if i is None:
                raise LayerlabError(f"parameter {name!r} belongs to no stage of {type(self.model).__name__}")
            path = self.stages[i].path
            out.setdefault(i, {})[name[len(path) + 1:] if path else name] = t
        return out

    @contextmanager
    def autocast(self) -> Iterator[None]:
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else nullcontext()
        with torch.inference_mode(), ctx:
            yield

    def input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (0..255) or float (0..1) [B, C, H, W] -> float in [0, 1] on the device, in the pipeline's memory
        format."""
        return self.prepare(to_unit_float(images, self.device))

    @staticmethod
    def _logits(y: Any, what: str) -> torch.Tensor:
        if not isinstance(y, torch.Tensor) or y.ndim != 2:
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ShapeError(
                f"{what}: expected the model to return logits [N, classes], got {shape}; wrap the model so that "
                "forward() returns class logits"
            )
        return y.float()

    # -------------------------------------------------------------------------------------------- running
    def stage(self, i: int, x: torch.Tensor, overrides: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        s, p = self.stages[i], self._stage_params[i]
        if s.kind == "flatten":
            return torch.flatten(x, 1)
        if overrides:
            p = {**p, **overrides}
        if s.kind == "normalize":
            return (x - p["mean"]) / p["std"]
        return functional_call(s.module, p, (x,))

    def full(self, x: torch.Tensor, overrides: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The whole model in one functional call (the naive path and the reference for validation)."""
        p = {**self.params, **overrides} if overrides else self.params
        with self.autocast():
            return self._logits(functional_call(self.model, p, (x,)), "model output")

    def trace(self, x: torch.Tensor, keep: Iterable[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Original logits and the inputs of the stages in ``keep`` (computed once with the original weights)."""
        keep = set(keep)
        cache: dict[int, torch.Tensor] = {}
        with self.autocast():
            for i in range(len(self.stages)):
                if i in keep:
                    cache[i] = x
                x = self.stage(i, x)
            return self._logits(x, "model output"), cache

    def resume(
        self, start: int, x: torch.Tensor, variants: Sequence[Mapping[int, Mapping[str, torch.Tensor]]]
    ) -> torch.Tensor:
        """Logits of V variants [V*B, C] from the cached input ``x`` of stage ``start``.

        Each variant runs its own stages up to the last overridden one; their outputs are stacked along the batch
        and the remaining stages run once for all V.
        """
        last = max(max(v) for v in variants)
        outs = []
        with self.autocast():
            for v in variants:
                y = x
                for i in range(start, last + 1):
                    y = self.stage(i, y, v.get(i))
                outs.append(y)
            y = torch.cat(outs) if len(outs) > 1 else outs[0]
            for i in range(last + 1, len(self.stages)):
                y = self.stage(i, y)
            return self._logits(y, "model output")

    def validate(self, x: torch.Tensor, what: str) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Check the stage chain against the real forward on ``x``, falling back to the full forward when they
        differ; returns the trace of ``x`` (logits and every stage input) so that it need not run again."""
        reference = self.full(x)
        check_finite(reference, what=f"the original logits of {what}", hint="the model itself produces NaN/inf")
        if len(self.stages) == 1:
            return reference, {0: x}
        chained, cache = self.trace(x, range(len(self.stages)))
        scale = 1.0 + float(reference.abs().max())
        if torch.equal(chained, reference) or torch.allclose(chained, reference, rtol=1e-3, atol=1e-3 * scale):
            return chained, cache
        warnings.warn(
            f"criticality: the stage decomposition of {type(self.model).__name__} does not reproduce its "
            "forward; falling back to full forward passes (correct, slower)",
            stacklevel=3,
        )
        self.stages = [Stage("", "module", self.model)]
        self._stage_params = [self.params]
        return reference, {0: x}


# ========================================================================================== model handling


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then every submodule's own training flag back, even after an exception."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _fingerprint(model: nn.Module) -> str:
    """sha256 of the architecture spec and every state tensor: the weights part of a job's key."""
    h = hashlib.sha256(str(getattr(model, "layerlab_arch", type(model).__name__)).encode())
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def _data_fingerprint(data: ImageData) -> str:
    h = hashlib.sha256(f"{data.spec}|{data.split}|{tuple(data.images.shape)}".encode())
    h.update(data.indices.cpu().contiguous().numpy().tobytes())
    if not data.spec:  # an in-memory data set: hash the pixels themselves
        h.update(data.images.cpu().contiguous().numpy().tobytes())
    h.update(data.labels.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _named_models(models: ModelLike | Sequence[ModelLike] | Mapping[str, ModelLike]) -> dict[str, ModelLike]:
    if isinstance(models, Mapping):
        named = dict(models)
    else:
        seq = [models] if isinstance(models, (str, nn.Module)) else list(models)
        named = {}
        for k, m in enumerate(seq):
            name = m if isinstance(m, str) else getattr(m, "layerlab_spec", None) or f"model{k}"
            if name in named:
                raise LayerlabError(f"model {name!r} is listed twice; pass {{name: model}} to name them apart")
            named[name] = m
    if not named:
        raise LayerlabError("no model given; pass a spec like 'timm:resnet18', a model, or {name: spec}")
    for name, m in named.items():
        if not isinstance(m, (str, nn.Module)):
            raise LayerlabError(f"model {name!r}: expected a spec string or an nn.Module, got {type(m).__name__}")
    return named


def _as_data(data: ImageData | str, split: str, images: int | None, seed: int) -> ImageData:
    if isinstance(data, ImageData):
        return data.sample(images, seed)  # the same seeded choice load_data makes; too many is an error
    if isinstance(data, str):
        return load_data(data, split, images, seed)
    raise LayerlabError(f"data: expected a data spec such as 'digits' or an ImageData, got {type(data).__name__}")


def _device(device: str | torch.device) -> torch.device:
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise LayerlabError(f"device {str(device)!r} asked for, but CUDA is not available here; use --device cpu")
    return d


# ============================================================================================ references


@dataclass(frozen=True)
class Reference:
    """Where a swap's weights come from: trial ``trial`` of a fresh instance under base ``seed``, or a checkpoint
    of a run (``path``, its ``epoch``)."""

    mode: str
    trial: int
    seed: int | None = None
    epoch: int | None = None
    path: Path | None = None

    @property
    def draw_seed(self) -> int | None:
        """The seed the fresh instance is built under: stream ``criticality/fresh`` of (seed, trial)."""
        return None if self.seed is None else derive_seed("criticality/fresh", self.seed, self.trial)

    def config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "trial": self.trial, "seed": self.seed, "epoch": self.epoch}
        if self.path is not None:
            st = self.path.stat()
            out["reference"] = [str(self.path.resolve()), st.st_size, st.st_mtime_ns]
        return out


def _run_checkpoint(run: Path, epoch: int) -> Path:
    found = dict(run_checkpoints(run))
    if epoch not in found:
        raise LayerlabError(
            f"run {str(run)!r} has no checkpoint for epoch {epoch}; it has epochs "
            f"{', '.join(map(str, sorted(found))) or 'none'} (checkpoints/epoch_XXXX.pt)"
        )
    return found[epoch]


def _references(
    modes: Sequence[str], trials: int, seed: int, run: Path | None, epochs: Sequence[int] | None
) -> list[Reference]:
    refs: list[Reference] = []
    for mode in modes:
        if mode == "randomize":
            refs += [Reference("randomize", t, seed=seed) for t in range(trials)]
            continue
        if run is None:
            raise LayerlabError(
                f"mode {mode!r} resets layers to a training run's checkpoints; pass the run with --run RUN_DIR "
                "(run=...) holding run.json and checkpoints/epoch_XXXX.pt"
            )
        if mode == "reinit":
            refs.append(Reference("reinit", 0, epoch=0, path=_run_checkpoint(run, 0)))
        else:
            chosen = list(epochs) if epochs else [e for e, _ in run_checkpoints(run)]
            refs += [Reference("checkpoint", 0, epoch=e, path=_run_checkpoint(run, e)) for e in chosen]
    return refs


class _ReferenceCache:
    """Reference parameters (CPU) per (architecture, seed) or checkpoint file, shared across a zoo sweep."""

    def __init__(self) -> None:
        self._items: dict[tuple, dict[str, torch.Tensor]] = {}

    def get(self, model: nn.Module, ref: Reference) -> dict[str, torch.Tensor]:
        if ref.path is None:
            key: tuple = ("fresh", getattr(model, "layerlab_arch", None), type(model).__name__, ref.draw_seed)
        else:
            key = ("file", str(ref.path.resolve()), ref.path.stat().st_mtime_ns)
        if key not in self._items:
            if ref.path is None:
                source = fresh_model(model, seed=ref.draw_seed, device="cpu")  # CPU: device-independent draws
            else:
                source = load_model("file:" + str(ref.path))
            owners = {n for n, m in source.named_modules() if isinstance(m, LEARNABLE)}
            self._items[key] = {
                n: p.detach().clone() for n, p in source.named_parameters() if n.rpartition(".")[0] in owners
            }
        return self._items[key]


def _what(ref: Reference, run: Path | None) -> str:
    if ref.path is None:
        return f"the fresh instance of trial {ref.trial} (seed {ref.seed})"
    return f"checkpoint epoch {ref.epoch} of run {str(run)!r}"


def _overrides(model: nn.Module, unit: Unit, source: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """The unit's weight and bias tensors from a reference, checked against the model's names and shapes."""
    own = dict(model.named_parameters())
    out = {}
    for name in unit.params:
        if name not in source:
            raise LayerlabError(
                f"{what} has no parameter {name!r}; the reference must be the same architecture as the model "
                "(is --run the run that trained this model?)"
            )
        if source[name].shape != own[name].shape:
            raise LayerlabError(
                f"{what}: {name!r} has shape {tuple(source[name].shape)}, the model {tuple(own[name].shape)}; "
                "the reference must be the same architecture as the model"
            )
        out[name] = source[name].to(dtype=own[name].dtype)
    return out


# ================================================================================================= engine


@dataclass
class _Task:
    """One unit and the references of it still to compute; they share passes in groups of MAX_STACK."""

    unit: Unit
    refs: list[Reference]
    overrides: list[dict[str, torch.Tensor]]  # full names, on the device
    stats: list[torch.Tensor] = field(default_factory=list)


class _Traces:
    """Per batch: original logits, labels and the cached stage inputs; held for all images when they fit in
    ``max_bytes``, else produced in chunks of batches (then every chunk is traced once per use)."""

    def __init__(
        self,
        pipe: Pipeline,
        data: ImageData,
        keep: set[int],
        batch_size: int,
        max_bytes: int,
        first: tuple[torch.Tensor, dict[int, torch.Tensor]],
    ) -> None:
        self.pipe, self.data, self.keep, self.bs = pipe, data, keep, batch_size
        starts = list(range(0, len(data), batch_size))
        logits, cache = first  # batch 0, traced by Pipeline.validate
        first = (logits, data.labels[:batch_size].to(logits.device), {k: cache[k] for k in keep})
        per_batch = sum(t.numel() * t.element_size() for t in first[2].values()) + first[0].numel() * 4
        per_chunk = max(1, int(max_bytes // max(per_batch, 1)))
        self.chunks = [starts[i : i + per_chunk] for i in range(0, len(starts), per_chunk)]
        self._held = [first] + [self._trace(s) for s in self.chunks[0][1:]] if len(self.chunks) == 1 else None

    def _trace(self, start: int) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        x = self.pipe.input(self.data.images[start : start + self.bs])
        logits, cache = self.pipe.trace(x, self.keep)
        labels = self.data.labels[start : start + self.bs].to(logits.device)
        return logits, labels, cache

    def chunk(self, j: int) -> list[tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]]:
        if self._held is not None:
            return self._held
        return [self._trace(s) for s in self.chunks[j]]


def _finite(t: torch.Tensor, model: str, unit: Unit, refs: Sequence[Reference]) -> None:
    if not bool(torch.isfinite(t).all()):
        which = ", ".join(f"{r.mode} trial {r.trial}" + (f" epoch {r.epoch}" if r.epoch is not None else "") for r in refs)
        raise NonFiniteError(
            f"model {model!r}: logits after swapping {unit.name!r} ({which}) are not finite (NaN or inf); the "
            "reference weights overflow this network, check the model's dtype and the reference checkpoint"
        )


def _groups(task: _Task) -> list[tuple[int, int]]:
    n = len(task.refs)
    return [(i, min(i + MAX_STACK, n)) for i in range(0, n, MAX_STACK)]


def _evaluate(
    name: str,
    pipe: Pipeline,
    data: ImageData,
    tasks: list[_Task],
    *,
    batch_size: int,
    naive: bool,
    max_bytes: int,
    on_done: Callable[[_Task, float], None],
    advance: Callable[[float], None],
) -> None:
    """Fill every task's per-reference statistics, calling ``on_done(task, base_accuracy)`` as each finishes."""
    if naive:
        originals = []
        for s in range(0, len(data), batch_size):
            logits = pipe.full(pipe.input(data.images[s : s + batch_size]))
            check_label_coverage(logits.shape[-1], data, f"model {name!r}")
            check_finite(logits, what=f"the original logits of model {name!r}", hint="the model itself produces NaN/inf")
            originals.append((logits, data.labels[s : s + batch_size].to(logits.device)))
        base = _base_accuracy(originals)
        for task in tasks:
            for ov, ref in zip(task.overrides, task.refs):
                acc = torch.zeros(6, dtype=torch.float64)
                for (orig, labels), s in zip(originals, range(0, len(data), batch_size)):
                    out = pipe.full(pipe.input(data.images[s : s + batch_size]), ov)
                    _finite(out, name, task.unit, [ref])
                    acc += _stats_update(orig, out, labels)
                task.stats.append(acc)
                advance(1)
            on_done(task, base)
        return
    first = pipe.validate(pipe.input(data.images[:batch_size]), f"model {name!r}")
    check_label_coverage(first[0].shape[-1], data, f"model {name!r}")
    starts = {t.unit.name: min(pipe.stage_of(n) for n in t.unit.params) for t in tasks}  # type: ignore[type-var]
    split = {t.unit.name: [pipe.split(ov) for ov in t.overrides] for t in tasks}
    traces = _Traces(pipe, data, set(starts.values()), batch_size, max_bytes, first)
    for task in tasks:
        task.stats = [torch.zeros(6, dtype=torch.float64) for _ in task.refs]
    base_stats = []
    n_chunks = len(traces.chunks)
    for j in range(n_chunks):
        chunk = traces.chunk(j)
        for logits, labels, _ in chunk:
            check_finite(logits, what=f"the original logits of model {name!r}", hint="the model itself produces NaN/inf")
            base_stats.append((logits, labels))
        for task in tasks:
            start = starts[task.unit.name]
            for lo, hi in _groups(task):
                variants = split[task.unit.name][lo:hi]
                for logits, labels, cache in chunk:
                    out = pipe.resume(start, cache[start], variants)
                    _finite(out, name, task.unit, task.refs[lo:hi])
                    for k, part in enumerate(out.split(logits.shape[0])):
                        task.stats[lo + k] += _stats_update(logits, part, labels)
            advance(len(task.refs) / n_chunks)
            if j == n_chunks - 1:
                on_done(task, _base_accuracy(base_stats))


def _base_accuracy(batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    correct = sum(int(((l.argmax(-1) == y) & (y >= 0)).sum()) for l, y in batches)
    labelled = sum(int((y >= 0).sum()) for _, y in batches)
    return correct / labelled if labelled else math.nan


# ============================================================================================= public API


def _modes(mode: str | Sequence[str]) -> list[str]:
    modes = [mode] if isinstance(mode, str) else list(mode)
    for m in modes:
        if m not in MODES:
            raise LayerlabError(f"mode must be one of {', '.join(MODES)}, got {m!r} (module criticality: --module)")
    if not modes:
        raise LayerlabError(f"no mode given; choose from {', '.join(MODES)}")
    return list(dict.fromkeys(modes))


def _run_for(name: str, run: str | Path | Mapping[str, str | Path] | None, n_models: int) -> Path | None:
    if run is None:
        return None
    if isinstance(run, Mapping):
        r = run.get(name)
        return Path(r) if r is not None else None
    if n_models > 1:
        raise LayerlabError("one run directory cannot serve several models; pass run={model name: RUN_DIR}")
    return Path(run)


def _rows_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for col in ("epoch", "seed", "draw_seed"):
        if col in frame.columns:
            frame[col] = frame[col].astype("Int64")
    return frame


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="job", dynamic_ncols=True)


def criticality(
    models: ModelLike | Sequence[ModelLike] | Mapping[str, ModelLike],
    data: ImageData | str = "digits",
    *,
    layers: Sequence[str] | None = None,
    trials: int = 3,
    mode: str | Sequence[str] = "randomize",
    run: str | Path | Mapping[str, str | Path] | None = None,
    checkpoint: int | Sequence[int] | None = None,
    units: str = "layers",
    images: int | None = None,
    split: str = "test",
    seed: int = 0,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    amp: bool | None = None,
    channels_last: bool | None = None,
    naive: bool = False,
    store: Store | str | Path | None = None,
    progress: bool = False,
    cache_mb: int = 2048,
) -> pd.DataFrame:
    """Layer criticality of one model or a zoo: one row per (model, layer, mode, epoch, trial).

    Args:
        models: a spec (``timm:resnet18``), a model, a list of them, or ``{name: spec or model}`` (zoo sweep).
        data: a data spec (``digits``) or an :class:`ImageData`; ``images``/``seed`` pick a fixed subset.
        layers: layer names or labels (block names with ``units="blocks"``); default all.
        trials: fresh instances per layer in ``randomize`` mode; trial t is built under
            ``derive_seed("criticality/fresh", seed, t)`` (column ``draw_seed``), never under a training seed.
        mode: ``randomize`` (Gavrikov et al.), ``reinit`` or ``checkpoint`` (Zhang et al.; need ``run``), or a list.
        checkpoint: the epochs ``checkpoint`` mode resets to (default: every checkpoint of the run).
        store: a :class:`Store` (or its root): one shard per (model, layer, reference) job, finished jobs are read,
            never recomputed.
        naive: run the reference implementation (full forward per layer and trial) instead of the cached one.
        cache_mb: memory for the cached stage inputs; beyond it images are processed in chunks.

    Columns: model, layer, label, kind, index, units, mode, epoch, trial, seed, draw_seed, similarity, criticality (%),
    agreement, accuracy, kl, base_accuracy, images. ``table.attrs`` holds the image indices.
    """
    if not isinstance(trials, int) or trials < 1:
        raise LayerlabError(f"trials must be a positive integer (the paper uses 3), got {trials!r}")
    if batch_size < 1:
        raise LayerlabError(f"batch_size must be positive, got {batch_size}")
    modes = _modes(mode)
    dev = _device(device)
    amp = dev.type == "cuda" if amp is None else amp
    channels_last = dev.type == "cuda" if channels_last is None else channels_last
    named = _named_models(models)
    data = _as_data(data, split, images, seed)
    epochs = [checkpoint] if isinstance(checkpoint, int) else checkpoint
    st = Store(store) if isinstance(store, (str, Path)) else store
    job = _Job(data=data, data_key=_data_fingerprint(data), units=units, layers=layers, store=st,
               precision="bf16" if amp else "fp32")
    rows: list[dict[str, Any]] = []
    bar = _progress(0, progress, "criticality")
    try:
        for name, spec in named.items():
            model = load_model(spec) if isinstance(spec, str) else spec
            run_dir = _run_for(name, run, len(named))
            refs = _references(modes, trials, seed, run_dir, epochs)
            rows += _criticality_model(job, name, model, refs, run_dir, bar, dev=dev, amp=amp,
                                       channels_last=channels_last, naive=naive, batch_size=batch_size,
                                       max_bytes=cache_mb * 2**20)
    finally:
        bar.close()
    table = _rows_frame(rows)
    order = {n: k for k, n in enumerate(named)}
    mode_order = {m: k for k, m in enumerate(modes)}
    table = (
        table.assign(_m=table["model"].map(order), _o=table["mode"].map(mode_order))
        .sort_values(["_m", "index", "_o", "epoch", "trial"], na_position="first", kind="stable")
        .drop(columns=["_m", "_o"])
        .reset_index(drop=True)
    )
    table.attrs = {"data": data.spec, "split": data.split, "indices": data.indices.tolist()}
    return table


@dataclass
class _Job:
    """What every (model, unit, reference) job of one criticality() call shares."""

    data: ImageData
    data_key: str
    units: str
    layers: Sequence[str] | None
    store: Store | None
    precision: str
    references: _ReferenceCache = field(default_factory=lambda: _ReferenceCache())


def _criticality_model(
    job: _Job,
    name: str,
    model: nn.Module,
    refs: list[Reference],
    run_dir: Path | None,
    bar: Any,
    **run_opts: Any,
) -> list[dict[str, Any]]:
    """Rows of one model: finished jobs read from the store, the others computed and written shard by shard."""
    us = units_of(model, job.units, job.layers)
    weights = _fingerprint(model)
    st, data = job.store, job.data
    indices = data.indices.tolist()

    def config(u: Unit, r: Reference) -> dict[str, Any]:
        return {"version": VERSION, "weights": weights, "data": job.data_key, "images": len(data),
                "units": job.units, "layer": u.name, "precision": job.precision, **r.config()}

    rows: list[dict[str, Any]] = []
    pending: dict[str, list[Reference]] = {}
    for u in us:
        for r in refs:
            key = job_key(name, ANALYSIS, config(u, r))
            if st is not None and st.has(ANALYSIS, key):
                rows.extend(st.read_shard(ANALYSIS, key).to_dict("records"))
            else:
                pending.setdefault(u.name, []).append(r)
    bar.total += len(us) * len(refs)
    bar.update(len(us) * len(refs) - sum(map(len, pending.values())))
    if not pending:
        return rows
    _warn_if_not_fresh(model, refs, job.references)
    _refuse_fresh_equal_to_init(model, refs, job.references, run_dir)
    pipe = Pipeline(model, run_opts["dev"], amp=run_opts["amp"], channels_last=run_opts["channels_last"])
    tasks = []
    for u in us:
        if u.name in pending:
            sources = [_overrides(model, u, job.references.get(model, r), _what(r, run_dir)) for r in pending[u.name]]
            tasks.append(_Task(u, pending[u.name], [{k: pipe.prepare(v) for k, v in s.items()} for s in sources]))

    def done(task: _Task, base: float) -> None:
        for r, stats in zip(task.refs, task.stats):
            row = {
                "model": name, "layer": task.unit.name, "label": task.unit.label, "kind": task.unit.kind,
                "index": task.unit.index, "units": job.units, "mode": r.mode, "epoch": r.epoch, "trial": r.trial,
                "seed": r.seed, "draw_seed": r.draw_seed, **_stats_compute(stats), "base_accuracy": base,
                "images": len(data),
            }
            if st is not None:
                cfg = config(task.unit, r)
                meta = {"model": name, "config": cfg, "indices": indices}
                st.write(ANALYSIS, job_key(name, ANALYSIS, cfg), _rows_frame([row]), meta)
            rows.append(row)

    with _eval_mode(model):
        _evaluate(name, pipe, data, tasks, batch_size=run_opts["batch_size"], naive=run_opts["naive"],
                  max_bytes=run_opts["max_bytes"], on_done=done, advance=bar.update)
    return rows


def known_run(model: nn.Module, run: Path | None = None) -> Path | None:
    """The training run a model comes from: ``run`` when given, else the run folder around the layerlab checkpoint
    it was loaded from (``RUN/final.pt`` or ``RUN/checkpoints/epoch_XXXX.pt``), else None."""
    if run is not None:
        return Path(run)
    spec = getattr(model, "layerlab_spec", None)
    if not isinstance(spec, str) or not spec.startswith("file:"):
        return None
    path = Path(spec[len("file:"):]).expanduser()
    for folder in (path.parent, path.parent.parent if path.parent.name == "checkpoints" else None):
        if folder is not None and (folder / "run.json").exists():
            return folder
    return None


def _refuse_fresh_equal_to_init(
    model: nn.Module, refs: Sequence[Reference], cache: _ReferenceCache, run: Path | None
) -> None:
    """A fresh instance that shares any randomly initialised tensor with the run's epoch-0 weights would measure
    a reset to init (Zhang et al.), not a re-randomisation (Gavrikov et al.): refuse it, saying why."""
    run = known_run(model, run)
    init_path = checkpoint_path(run, 0) if run is not None else None
    fresh = [r for r in refs if r.mode == "randomize"]
    if init_path is None or not init_path.exists() or not fresh:
        return
    init = cache.get(model, Reference("reinit", 0, epoch=0, path=init_path))
    for r in fresh:
        drawn = cache.get(model, r)
        for name, t in drawn.items():
            random = t.numel() > 1 and not bool((t == t.reshape(-1)[0]).all())  # constant inits match by design
            if random and name in init and init[name].shape == t.shape and torch.equal(init[name], t):
                raise LayerlabError(
                    f"trial {r.trial}'s fresh instance (seed {r.seed}) has the same {name!r} as the run's initial "
                    f"weights ({str(init_path)!r}): re-randomising would re-install the layer's own start and measure "
                    "a reset to init (Zhang et al., mode 'reinit'), not a re-randomisation (Gavrikov et al.); the run "
                    "was initialised from the stream this trial draws from. Pass another seed"
                )


def _warn_if_not_fresh(model: nn.Module, refs: Sequence[Reference], cache: _ReferenceCache) -> None:
    """Two trials with identical 'fresh' weights mean the architecture spec does not build a new init."""
    fresh = [r for r in refs if r.mode == "randomize"]
    if len(fresh) < 2:
        return
    a, b = cache.get(model, fresh[0]), cache.get(model, fresh[1])
    if all(torch.equal(a[k], b[k]) for k in a):
        warnings.warn(
            f"fresh instances of {getattr(model, 'layerlab_arch', '?')!r} for trials {fresh[0].trial} and "
            f"{fresh[1].trial} are identical: this architecture spec loads fixed weights instead of initialising; "
            "load the model through a timm:/torchvision: spec or a layerlab checkpoint",
            stacklevel=3,
        )


# ================================================================================ module criticality


def _noise(unit: Unit, model: nn.Module, draws: int, seed: int, position: int) -> list[dict[str, torch.Tensor]]:
    """Standard-normal draws z_d for the unit's parameters: ``g = seeds.generator("criticality/noise", seed,
    position)`` (``position``: the unit's index among all units of the model), then for each draw d, for each
    parameter in unit order, ``torch.randn(shape, generator=g)`` (CPU, float32).

    The same z_d serve every (alpha, sigma) tried (u = sigma * z_d; common random numbers), so the expected loss
    is a deterministic function of (alpha, sigma) and the search is exact whatever order it visits them in.
    """
    g = generator("criticality/noise", seed, position)
    own = dict(model.named_parameters())
    return [{n: torch.randn(own[n].shape, generator=g) for n in unit.params} for _ in range(draws)]


def module_criticality(
    models: ModelLike | Sequence[ModelLike] | Mapping[str, ModelLike],
    data: ImageData | str = "digits",
    *,
    run: str | Path | Mapping[str, str | Path] | None = None,
    layers: Sequence[str] | None = None,
    units: str = "layers",
    images: int | None = None,
    split: str = "train",
    grid: int = 11,
    draws: int = 10,
    eps_factor: float = 1.01,
    sigma_min: float = SIGMA_MIN,
    rtol: float = SIGMA_RTOL,
    seed: int = 0,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    store: Store | str | Path | None = None,
    progress: bool = False,
    cache_mb: int = 2048,
) -> pd.DataFrame:
    """Chatterji, Neyshabur, Sedghi 2020 module criticality, one row per (model, unit).

    For unit i with trained weights theta_F and initial weights theta_0 (the run's epoch-0 checkpoint):
    theta_alpha = (1 - alpha) theta_0 + alpha theta_F and

        mu_i = min over alpha, sigma in [0, 1] of alpha^2 ||theta_F - theta_0||_F^2 / sigma^2
               subject to E_{u ~ N(0, sigma^2 I)} loss(theta_alpha + u) <= epsilon = eps_factor * loss(theta_F),

    with alpha on ``linspace(0, 1, grid)`` and, per alpha, sigma found by bisection on a log scale in
    [``sigma_min``, 1] (:func:`_largest_sigma`), the expectation over ``draws`` noise draws (:func:`_noise`,
    stream ``criticality/noise``), loss = mean cross-entropy over ``data`` (the paper's training data: ``split``
    defaults to ``"train"``). A module that did not move (theta_F = theta_0) has mu_i = 0. mu_i = inf only when
    no alpha is feasible at any sigma >= ``sigma_min``. Network criticality = sum of mu_i
    (:func:`network_criticality`).

    Columns: model, layer, label, kind, index, units, mode, criticality (= mu_i), alpha, sigma (the minimiser),
    distance (||theta_F - theta_0||_F^2), loss, epsilon, expected_loss (at the minimiser), evaluated
    ((alpha, sigma) points tried), draws, sigma_min.
    """
    if grid < 2 or draws < 1 or eps_factor <= 0:
        raise LayerlabError(f"grid must be >= 2, draws >= 1 and eps_factor > 0; got {grid}, {draws}, {eps_factor}")
    if not 0 < sigma_min < 1 or not 0 < rtol < 1:
        raise LayerlabError(f"sigma_min and rtol must lie in (0, 1); got {sigma_min}, {rtol}")
    dev = _device(device)
    named = _named_models(models)
    data = _as_data(data, split, images, seed)
    st = Store(store) if isinstance(store, (str, Path)) else store
    data_key = _data_fingerprint(data)
    indices = data.indices.tolist()
    rows: list[dict[str, Any]] = []
    bar = _progress(0, progress, "module criticality")
    try:
        for name, spec in named.items():
            model = load_model(spec) if isinstance(spec, str) else spec
            run_dir = _run_for(name, run, len(named))
            if run_dir is None:
                raise LayerlabError(
                    f"module criticality of {name!r} needs theta_0, the weights at initialisation: pass the training "
                    "run with --run RUN_DIR (run=...), whose checkpoints/epoch_0000.pt holds them"
                )
            init_path = _run_checkpoint(run_dir, 0)
            all_units = units_of(model, units)
            position = {u.name: k for k, u in enumerate(all_units)}
            us = units_of(model, units, layers)
            weights = _fingerprint(model)
            init = Reference("reinit", 0, epoch=0, path=init_path)
            cfg_base = {
                "version": VERSION, "weights": weights, "data": data_key, "images": len(data), "units": units,
                "grid": grid, "draws": draws, "eps_factor": eps_factor, "sigma_min": sigma_min, "rtol": rtol,
                "seed": seed, **init.config(),
            }
            todo = []
            for u in us:
                key = job_key(name, MODULE_ANALYSIS, {**cfg_base, "layer": u.name})
                if st is not None and st.has(MODULE_ANALYSIS, key):
                    rows.extend(st.read_shard(MODULE_ANALYSIS, key).to_dict("records"))
                else:
                    todo.append(u)
            bar.total += len(us)
            bar.update(len(us) - len(todo))
            if not todo:
                continue
            theta0 = _ReferenceCache().get(model, init)
            pipe = Pipeline(model, dev, amp=False, channels_last=False)
            with _eval_mode(model):
                first = pipe.validate(pipe.input(data.images[:batch_size]), f"model {name!r}")
                check_label_coverage(first[0].shape[-1], data, f"model {name!r}")
                keep = {min(pipe.stage_of(p) for p in u.params) for u in todo}  # type: ignore[type-var]
                traces = _Traces(pipe, data, keep, batch_size, cache_mb * 2**20, first)
                loss = _trained_loss(traces)
                check_finite(torch.tensor(loss), what=f"the loss of model {name!r}",
                             hint="the model itself produces NaN/inf")
                for u in todo:
                    search = _Search(grid, draws, eps_factor, sigma_min, rtol, seed, position[u.name])
                    row = _module_unit(pipe, model, traces, u, theta0, loss, search, _what(init, run_dir))
                    row = {"model": name, "layer": u.name, "label": u.label, "kind": u.kind, "index": u.index,
                           "units": units, "mode": "module", **row}
                    if st is not None:
                        cfg = {**cfg_base, "layer": u.name}
                        st.write(MODULE_ANALYSIS, job_key(name, MODULE_ANALYSIS, cfg), pd.DataFrame([row]),
                                 {"model": name, "config": cfg, "indices": indices})
                    rows.append(row)
                    bar.update(1)
    finally:
        bar.close()
    table = pd.DataFrame(rows)
    order = {n: k for k, n in enumerate(named)}
    table = (
        table.assign(_m=table["model"].map(order)).sort_values(["_m", "index"], kind="stable")
        .drop(columns="_m").reset_index(drop=True)
    )
    table.attrs = {"data": data.spec, "split": data.split, "indices": indices}
    return table


def _trained_loss(traces: _Traces) -> float:
    total, n = 0.0, 0
    for j in range(len(traces.chunks)):
        for logits, labels, _ in traces.chunk(j):
            total += float(F.cross_entropy(logits.double(), labels, reduction="sum"))
            n += labels.shape[0]
    return total / n


@dataclass(frozen=True)
class _Search:
    """How module criticality searches (alpha, sigma) for one unit."""

    grid: int
    draws: int
    eps_factor: float
    sigma_min: float
    rtol: float
    seed: int
    position: int


def _largest_sigma(feasible: Callable[[float], bool], lo: float, hi: float, rtol: float) -> float:
    """The largest sigma in [lo, hi] with ``feasible(sigma)``, given ``feasible(lo)``: ``hi`` when it is
    feasible; else a scan down by decades from ``hi`` brackets the boundary (infeasible points are cheap: their
    running loss passes epsilon early), then bisection on a log scale until the bracket's ratio is below
    1 + rtol. Returns the bracket's feasible end, so the answer is always a sigma that was checked. Assumes
    feasibility falls as sigma grows."""
    if feasible(hi):
        return hi
    s = hi / 10
    while s > lo and not feasible(s):
        hi, s = s, s / 10
    lo = max(s, lo)
    while hi / lo > 1.0 + rtol:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
    return lo


def _module_unit(
    pipe: Pipeline,
    model: nn.Module,
    traces: _Traces,
    unit: Unit,
    theta0: Mapping[str, torch.Tensor],
    loss: float,
    search: _Search,
    what: str,
) -> dict[str, Any]:
    """Module criticality of one unit (Chatterji et al. 2020).

    mu = min over alpha of alpha^2 d / sigma*(alpha)^2, with sigma*(alpha) the largest feasible sigma in
    [sigma_min, 1]. Alphas are visited in increasing order; once some mu is known, an alpha can only beat it with
    sigma > alpha sqrt(d / mu), so it is first checked there and skipped when infeasible (exact under the
    monotonicity the bisection assumes). alpha = 0 (theta_0 plus noise) and an unmoved unit (d = 0) give mu = 0.
    """
    final = {n: p.detach().cpu().float() for n, p in model.named_parameters() if n in unit.params}
    init = {n: t.float() for n, t in _overrides(model, unit, theta0, what).items()}
    distance = float(sum(((final[n] - init[n]).double() ** 2).sum() for n in unit.params))
    epsilon = search.eps_factor * loss
    z = _noise(unit, model, search.draws, search.seed, search.position)
    start = min(pipe.stage_of(p) for p in unit.params)  # type: ignore[type-var]
    dtype = {n: p.dtype for n, p in model.named_parameters() if n in unit.params}
    evaluated = 0
    losses: dict[tuple[float, float], float] = {}

    def expected(a: float, s: float) -> float:
        nonlocal evaluated
        if (a, s) not in losses:
            evaluated += 1
            variants = [
                pipe.split({
                    n: pipe.prepare(((1 - a) * init[n] + a * final[n] + s * zd[n]).to(dtype[n])) for n in unit.params
                })
                for zd in z
            ]
            losses[a, s] = _expected_loss(pipe, traces, start, variants, epsilon)
        return losses[a, s]

    best: tuple[float, float, float] | None = None  # (mu, alpha, sigma)
    for a in (float(v) for v in np.linspace(0.0, 1.0, search.grid)):
        need = search.sigma_min if best is None or a * a * distance == 0 else a * math.sqrt(distance / best[0])
        if need > 1.0 or expected(a, max(need, search.sigma_min)) > epsilon:
            continue
        if a * a * distance == 0:  # objective 0 at any feasible sigma: nothing can beat it
            best = (0.0, a, max(need, search.sigma_min))
            break
        sigma = _largest_sigma(lambda s: expected(a, s) <= epsilon, max(need, search.sigma_min), 1.0, search.rtol)
        mu = a * a * distance / (sigma * sigma)
        if best is None or mu < best[0]:
            best = (mu, a, sigma)
    common = {"distance": distance, "loss": loss, "epsilon": epsilon, "evaluated": evaluated, "draws": search.draws,
              "sigma_min": search.sigma_min}
    if best is None:
        return {"criticality": math.inf, "alpha": math.nan, "sigma": math.nan, "expected_loss": math.nan, **common}
    mu, a, sigma = best
    return {"criticality": mu, "alpha": a, "sigma": sigma, "expected_loss": losses[a, sigma], **common}


def _expected_loss(
    pipe: Pipeline, traces: _Traces, start: int, variants: list[dict[int, dict[str, torch.Tensor]]], limit: float
) -> float:
    """Mean over noise draws of the mean cross-entropy over all images (draws stacked MAX_STACK at a time).

    Cross-entropy is non-negative, so the running sum only grows: once it passes ``limit`` (epsilon) times the
    number of terms the point is infeasible and the rest of the images are skipped (returns inf; exact).
    """
    n_images = len(traces.data)
    budget = limit * n_images * len(variants)
    total = 0.0
    for j in range(len(traces.chunks)):
        for logits, labels, cache in traces.chunk(j):
            for lo in range(0, len(variants), MAX_STACK):
                out = pipe.resume(start, cache[start], variants[lo : lo + MAX_STACK])
                reps = out.shape[0] // labels.shape[0]
                total += float(F.cross_entropy(out.double(), labels.repeat(reps), reduction="sum"))
                if not total <= budget:  # also catches NaN
                    return math.inf
    return total / (n_images * len(variants))


# ============================================================================================ outputs


def write_tables(table: pd.DataFrame, out: str | Path, prefix: str = "criticality") -> list[Path]:
    """Write ``OUT/<prefix>.parquet``/``.csv`` (per trial), ``<prefix>_summary.csv`` and ``<prefix>_images.csv``.

    For module criticality tables (``mode == 'module'``) the summary is the network criticality per model.
    """
    from .store import atomic_write, atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        atomic_write(out / f"{prefix}.parquet", lambda f: table.to_parquet(f, index=False)),
        atomic_write_text(out / f"{prefix}.csv", table.to_csv(index=False)),
    ]
    is_module = len(table) > 0 and "mode" in table.columns and bool((table["mode"] == "module").all())
    summary = network_criticality(table) if is_module else summarize(table)
    paths.append(atomic_write_text(out / f"{prefix}_summary.csv", summary.to_csv(index=False)))
    indices = table.attrs.get("indices")
    if indices is not None:
        images = pd.DataFrame({"position": range(len(indices)), "index": indices})
        images["data"], images["split"] = table.attrs.get("data", ""), table.attrs.get("split", "")
        paths.append(atomic_write_text(out / f"{prefix}_images.csv", images.to_csv(index=False)))
    return paths


def demo_step(
    zoo_dir: Path,
    out: Path,
    attrs: pd.DataFrame,
    *,
    images: int | None = None,
    trials: int = 3,
    threads: int | None = None,
) -> list[Path]:
    """Criticality of every model of a trained zoo (``zoo_dir/<name>/final.pt``) on the ``digits`` test images
    (all 360 unless ``images``), T = 3: writes the tables and every figure (heatmap across training methods,
    difference to the model named ``baseline``, std over trials, vs attribute, vs accuracy) into ``out``;
    returns the paths written. Finished jobs are kept in ``out/shards``, so a re-run only draws the figures.

    ``threads`` sets torch's CPU threads for the duration (restored after): these models are small, and on a
    machine shared with other jobs one thread is several times faster than two competing ones.
    """
    from .plots.criticality import save_all

    zoo_dir, out = Path(zoo_dir), Path(out)
    found = sorted(d for d in zoo_dir.iterdir() if (d / "final.pt").exists()) if zoo_dir.is_dir() else []
    if not found:
        raise LayerlabError(f"zoo folder {str(zoo_dir)!r} holds no <model>/final.pt; train the zoo first")
    models = {d.name: "file:" + str(d / "final.pt") for d in found}
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        table = criticality(models, "digits", split="test", images=images, trials=trials, store=out, progress=False)
    finally:
        torch.set_num_threads(before)
    paths = write_tables(table, out)
    return paths + save_all(summarize(table), out / "figures" / "criticality", attrs=attrs, baseline="baseline")
