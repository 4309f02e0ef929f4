"""Layer criticality: which layers does a trained model actually use?

Re-randomise one layer (or residual block) at a time, keep every other parameter trained, and measure how much
the model's output moves (Gavrikov, Agnihotri, Keuper, Keuper 2024, arXiv 2410.14470; METHODS.md section 1):

    criticality(l) = 100 * (1 - mean_t mean_x cos(softmax f(x), softmax f_{l <- fresh_t}(x)))    [%]

where trial t copies layer l's weight and bias from ONE fresh, untrained instance of the same architecture (from
``fresh=``, the model's spec, its exact timm/torchvision constructor, or each layer's ``reset_parameters()``:
:func:`layerlab.models.fresh_source`; built on the CPU so results do not depend on the device) under the seed
``derive_seed("criticality/fresh", seed, t)`` (:mod:`layerlab.seeds`): a stream of its own that no training seed
can coincide with. (With ``seed + t``, trial 0 of a model trained under seed 0 re-installed the
layer's own initial weights and measured a reset to init, not a re-randomisation.) Where the run is known (a
layerlab checkpoint inside its run folder, or ``run=``), a fresh instance equal to the run's epoch-0 weights is an
error. Normalisation layers are not touched (the paper randomises Conv2d/Linear only); ``norm=True`` makes their
affine weight and bias units too, an opt-in extension (their running statistics stay the trained model's). Every
layer and trial sees the same images in the same order. Per (layer, trial) the table also holds top-1 agreement
with the original model, top-1 accuracy after the swap (Zhang, Bengio, Singer 2022's metric) and
KL(original || swapped).

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

from .data import (
    Batches, DataLike, ImageData, as_batches, batch_checksum, changed_between_passes, check_batch_labels,
)
from .errors import DataError, LayerlabError, NonFiniteError, ShapeError, check_finite, input_mismatch, warn
from . import structure
from .layers import pick_by_name, unknown_layer
from .structure import Stage
from .models import FreshSource, Normalized, checkpoint_state, fresh_source, load_model
from .runs import checkpoint_path, checkpoints as run_checkpoints
from .runtime import eval_mode, resolve_device
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


def units_of(
    model: nn.Module, units: str = "layers", names: Sequence[str] | None = None, norm: bool = False
) -> list[Unit]:
    """The units a run walks over, in module order: every learnable layer, or every residual/transformer block
    and every layer outside blocks (Zhang et al.), as :mod:`layerlab.structure` reads them off the model. With
    ``norm`` normalisation layers (their affine weight and bias) are layers too, and members of their block.

    ``names`` selects some (layer names or labels; block names like ``layer3.1`` or labels like ``[3.1]``).
    """
    if units not in UNITS:
        raise LayerlabError(f"units must be one of {', '.join(UNITS)}, got {units!r}")
    infos = structure.learnable_layers(model, norm)
    if not infos:
        raise LayerlabError(
            f"{type(model).__name__} has no learnable Conv2d/Linear layer; criticality needs at least one"
        )
    if units == "layers":
        all_layers = [Unit(i.name, i.label, i.kind, i.index, (i.name,), structure.layer_params(model, i.name))
                      for i in infos]
        if not names:
            return all_layers
        return pick_by_name(all_layers, list(names), lambda r, close: unknown_layer(model, r, close))
    by_name = {i.name: i for i in infos}
    all_units = [
        Unit(
            key,
            structure.block_label(key) if key not in by_name else by_name[key].label,
            "block" if key not in by_name else by_name[key].kind,
            k,
            tuple(members),
            tuple(p for m in members for p in structure.layer_params(model, m)),
        )
        for k, (key, members) in enumerate(structure.block_units(model, norm).items())
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


def stage_decomposition(model: nn.Module) -> list[Stage]:
    """The model as a chain of stages whose composition is its forward pass, or the whole model as one stage
    (:func:`layerlab.structure.stage_chain`: plain ``nn.Sequential``, ResNets, timm ViT/ConvNeXt/EfficientNet/
    MobileNetV3/Swin/RegNet, torchvision features/classifier models, MobileNetV2, DenseNet and ViT, inside
    ``Normalized`` too). The chain is verified against
    the real forward on the first batch before use (:class:`Pipeline`), so an architecture it cannot split falls
    back to the full forward, always correct.
    """
    return structure.stage_chain(model)


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
        names = [i.name for i in structure.learnable_layers(model, norm=True)]  # every layer a unit can swap
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
        if stage.kind == "module" and stage.path == "":
            return self.params
        out = {}
        for k, v in self.params.items():
            key = stage.key(k)
            if key is not None:
                out[key] = v
        return out

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
            out.setdefault(i, {})[self.stages[i].key(name)] = t  # type: ignore[index]
        return out

    @contextmanager
    def autocast(self) -> Iterator[None]:
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else nullcontext()
        with torch.inference_mode(), ctx:
            yield

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of model inputs (float [B, C, H, W], from :class:`~layerlab.data.Batches`) on the device, in the
        pipeline's memory format."""
        return self.prepare(x)

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

    def first(self, x: torch.Tensor, what: str) -> torch.Tensor:
        """:meth:`full` on the first batch, where images that do not fit the model (channels, size) are a
        ShapeError naming the model and the image shape instead of torch's bare RuntimeError, and images outside
        [0, 1] for a model that takes [0, 1] (a layerlab spec or checkpoint, or a ``Normalized`` wrapper: it
        normalises inside) are a DataError instead of silently wrong numbers."""
        if getattr(self.model, "layerlab_arch", None) is not None or isinstance(self.model, Normalized):
            lo, hi = float(x.min()), float(x.max())
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise DataError(
                    f"{what} takes images in [0, 1] (it normalises inside), but these lie in [{lo:.3g}, {hi:.3g}]; pass "
                    "unnormalised images in [0, 1] (uint8 0-255 is converted), or a model that expects your scaling"
                )
        try:
            return self.full(x)
        except RuntimeError as e:
            if (mismatch := input_mismatch(e, what, tuple(x.shape[1:]))) is not None:
                raise mismatch from None
            raise

    def validate(self, x: torch.Tensor, what: str) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Check the stage chain against the real forward on ``x``, falling back to the full forward when they
        differ; returns the trace of ``x`` (logits and every stage input) so that it need not run again."""
        reference = self.first(x, what)
        check_finite(reference, what=f"the original logits of {what}", hint="the model itself produces NaN/inf")
        if len(self.stages) == 1:
            return reference, {0: x}
        try:
            chained, cache = self.trace(x, range(len(self.stages)))
        except Exception:  # a chain the model's forward does not fit (shapes, missing glue)
            chained, cache = None, {}
        scale = 1.0 + float(reference.abs().max())
        if chained is not None and chained.shape == reference.shape and (
            torch.equal(chained, reference) or torch.allclose(chained, reference, rtol=1e-3, atol=1e-3 * scale)
        ):
            return chained, cache
        warn(
            f"criticality: the stage decomposition of {type(self.model).__name__} does not reproduce its "
            "forward; falling back to full forward passes (correct, slower)",
        )
        self.stages = [Stage("", "module", self.model)]
        self._stage_params = [self.params]
        return reference, {0: x}


# ========================================================================================== model handling


def _fingerprint(model: nn.Module) -> str:
    """sha256 of the architecture spec and every state tensor: the weights part of a job's key."""
    h = hashlib.sha256(str(getattr(model, "layerlab_arch", type(model).__name__)).encode())
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
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


def _device(device: str | torch.device | None, named: Mapping[str, ModelLike]) -> torch.device:
    """layerlab's device policy (:func:`layerlab.runtime.resolve_device`); ``None``: where the first model given
    as an ``nn.Module`` is (models are never moved: the pipeline holds its own copies), else the CPU."""
    first = next((m for m in named.values() if isinstance(m, nn.Module)), None)
    return resolve_device(device, first)


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
    """Reference parameters (CPU) per (fresh-instance source, seed) or checkpoint file, shared across a zoo sweep.

    Each model's fresh instances come from one :class:`~layerlab.models.FreshSource` (:meth:`bind`), and trial t's
    instance is drawn under ``Reference.draw_seed`` = ``derive_seed("criticality/fresh", seed, t)`` whatever the
    source (a ``fresh=`` callable and ``reset_parameters()`` included), on the CPU so the draws do not depend on the
    device. A reference holds the parameters of every layer and normalisation layer (:func:`_swappable`).
    """

    def __init__(self) -> None:
        self._items: dict[tuple, dict[str, torch.Tensor]] = {}
        self._digests: dict[tuple, str] = {}
        self._sources: dict[int, tuple[nn.Module, FreshSource]] = {}  # id(model) -> (model kept alive, source)

    def bind(self, model: nn.Module, fresh: Callable[[], nn.Module] | None = None) -> FreshSource:
        """Resolve (once) where ``model``'s fresh instances come from (:func:`layerlab.models.fresh_source`)."""
        if id(model) not in self._sources:
            self._sources[id(model)] = (model, fresh_source(model, fresh))
        return self._sources[id(model)][1]

    def _key(self, model: nn.Module, ref: Reference) -> tuple:
        if ref.path is None:
            return ("fresh", self.bind(model).key, type(model).__name__, ref.draw_seed)
        return ("file", str(ref.path.resolve()), ref.path.stat().st_mtime_ns)

    def get(self, model: nn.Module, ref: Reference) -> dict[str, torch.Tensor]:
        key = self._key(model, ref)
        if key not in self._items:
            if ref.path is None:
                bound = self.bind(model)
                source = bound.draw(ref.draw_seed)  # type: ignore[arg-type]
                if bound.kind == "reset_parameters":  # the copy re-drew its Conv2d/Linear only: reset the norms too
                    with torch.no_grad():
                        for m in source.modules():
                            if structure.is_norm(m) and callable(getattr(m, "reset_parameters", None)):
                                m.reset_parameters()
                owners = _swappable(source)
                self._items[key] = {
                    n: p.detach().clone() for n, p in source.named_parameters() if n.rpartition(".")[0] in owners
                }
            else:  # a run's checkpoint: its tensors only (weights_only=True), the model's layer weights among them
                trust = bool(getattr(model, "layerlab_trust_pickle", False))
                state = checkpoint_state(ref.path, trust_pickle=trust or None)
                owners = _swappable(model)
                self._items[key] = {
                    n: t.detach().clone() for n, t in state.items() if n.rpartition(".")[0] in owners
                }
        return self._items[key]

    def digest(self, model: nn.Module, ref: Reference, names: Iterable[str] | None = None) -> str:
        """sha256 of the reference's Conv2d/Linear/MultiheadAttention weights (or of the tensors ``names``): part
        of a job's key where the source is not a spec."""
        key = (self._key(model, ref), None if names is None else tuple(sorted(names)))
        if key not in self._digests:
            items = self.get(model, ref)
            if names is None:
                layers = {n for n, m in model.named_modules() if structure.is_layer(m)}
                names = [n for n in items if n.rpartition(".")[0] in layers]
            h = hashlib.sha256()
            for name in sorted(names):
                t = items[name].contiguous()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy())
            self._digests[key] = h.hexdigest()[:16]
        return self._digests[key]


def _swappable(model: nn.Module) -> set[str]:
    """The modules whose own parameters a reference provides: every layer and every normalisation layer."""
    return {n for n, m in model.named_modules() if structure.is_layer(m) or structure.is_norm(m)}


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
                "(is --run the run that trained this model? does fresh= build this architecture?)"
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


Trace = tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]  # (original logits, labels, stage inputs)


class _Traces:
    """Per batch: original logits, labels and the cached inputs of the stages in ``keep``.

    Held for all images when they fit in ``max_bytes`` (then the data is read once); else produced chunk by chunk
    in one pass over the data per use (:meth:`chunks`), so memory holds one chunk, never all images: a DataLoader
    streams. ``first`` is batch 0 already traced by :meth:`Pipeline.validate`.
    """

    def __init__(
        self, pipe: Pipeline, data: Batches, keep: set[int], max_bytes: int, first: Trace, what: str, x0: torch.Tensor
    ) -> None:
        self.pipe, self.data, self.keep, self.what = pipe, data, keep, what
        logits, labels, cache = first
        self._first: Trace = (logits, labels, {k: cache[k] for k in keep})
        self._x0 = batch_checksum(x0, labels)
        per_batch = sum(t.numel() * t.element_size() for t in self._first[2].values()) + logits.numel() * 4
        self.per_chunk = max(1, int(max_bytes // max(per_batch, 1)))
        self._held: list[Trace] | None = None
        self.n_images: int | None = None

    def _trace(self, x: torch.Tensor, labels: torch.Tensor) -> Trace:
        logits, cache = self.pipe.trace(self.pipe.input(x), self.keep)
        check_finite(logits, what=f"the original logits of {self.what}", hint="the model itself produces NaN/inf")
        check_batch_labels(logits.shape[-1], labels, self.what, self.data.describe())
        return logits, labels.to(logits.device), cache

    def chunks(self) -> Iterator[tuple[list[Trace], bool]]:
        """``(traces of consecutive batches, is_last)`` over all images, in order."""
        if self._held is not None:
            yield self._held, True
            return
        source = iter(self.data.batches(self.pipe.device))
        upcoming = next(source, None)
        chunk: list[Trace] = []
        k = n = 0
        while upcoming is not None:
            x, labels = upcoming
            if k == 0 and batch_checksum(x, labels) != self._x0:
                raise changed_between_passes(self.data.describe(), 0)
            chunk.append(self._first if k == 0 else self._trace(x, labels))
            k, n = k + 1, n + labels.shape[0]
            upcoming = next(source, None)
            if len(chunk) == self.per_chunk or upcoming is None:
                if upcoming is None:
                    self.n_images = n
                    if k == len(chunk):  # everything fit: keep it for every later use
                        self._held = chunk
                yield chunk, upcoming is None
                chunk = []


def _first_batch(data: Batches, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    for x, labels in data.batches(device):
        return x, labels
    raise DataError(f"{data.describe()} holds no images")


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
    data: Batches | ImageData,
    tasks: list[_Task],
    *,
    batch_size: int,
    naive: bool,
    max_bytes: int,
    on_done: Callable[[_Task, float], None],
    advance: Callable[[float], None],
) -> None:
    """Fill every task's per-reference statistics, calling ``on_done(task, base_accuracy)`` as each finishes."""
    data = as_batches(data, batch_size)
    what = f"model {name!r}"
    if naive:
        originals = []
        for x, labels in data.batches(pipe.device):
            logits = pipe.first(pipe.input(x), f"model {name!r}")
            if not originals:
                data.check_outputs(logits.shape[-1], what)
            check_batch_labels(logits.shape[-1], labels, what, data.describe())
            check_finite(logits, what=f"the original logits of {what}", hint="the model itself produces NaN/inf")
            originals.append((logits, labels))
        base = _base_accuracy(originals)
        for task in tasks:
            for ov, ref in zip(task.overrides, task.refs):
                acc = torch.zeros(6, dtype=torch.float64)
                for (orig, labels), (x, _) in zip(originals, data.batches(pipe.device), strict=True):
                    out = pipe.full(pipe.input(x), ov)
                    _finite(out, name, task.unit, [ref])
                    acc += _stats_update(orig, out, labels)
                task.stats.append(acc)
                advance(1)
            on_done(task, base)
        return
    x0, y0 = _first_batch(data, pipe.device)
    logits0, cache0 = pipe.validate(pipe.input(x0), what)
    data.check_outputs(logits0.shape[-1], what)
    check_batch_labels(logits0.shape[-1], y0, what, data.describe())
    starts = {t.unit.name: min(pipe.stage_of(n) for n in t.unit.params) for t in tasks}  # type: ignore[type-var]
    split = {t.unit.name: [pipe.split(ov) for ov in t.overrides] for t in tasks}
    traces = _Traces(pipe, data, set(starts.values()), max_bytes, (logits0, y0, cache0), what, x0)
    for task in tasks:
        task.stats = [torch.zeros(6, dtype=torch.float64) for _ in task.refs]
    correct = labelled = 0
    total = data.known_len()
    for chunk, last in traces.chunks():
        for logits, labels, _ in chunk:
            correct += int(((logits.argmax(-1) == labels) & (labels >= 0)).sum())
            labelled += int((labels >= 0).sum())
        base = correct / labelled if labelled else math.nan
        share = sum(t[1].shape[0] for t in chunk) / total if total else float(last)
        for task in tasks:
            start = starts[task.unit.name]
            for lo, hi in _groups(task):
                variants = split[task.unit.name][lo:hi]
                for logits, labels, cache in chunk:
                    out = pipe.resume(start, cache[start], variants)
                    _finite(out, name, task.unit, task.refs[lo:hi])
                    for k, part in enumerate(out.split(logits.shape[0])):
                        task.stats[lo + k] += _stats_update(logits, part, labels)
            advance(len(task.refs) * share)
            if last:
                on_done(task, base)


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
    ints = ("epoch", "seed", "draw_seed")
    # Integer columns with gaps (reinit rows have no seed) are built as nullable Int64 from the Python ints, never
    # through float64, which would round 63-bit draw seeds (6673782257543995146 -> ...392).
    frame = pd.DataFrame([{k: v for k, v in r.items() if k not in ints} for r in rows])
    for col in ints:
        if any(col in r for r in rows):
            frame[col] = pd.array([r.get(col) for r in rows], dtype="Int64")
    order = list(dict.fromkeys(k for r in rows for k in r))  # the rows' own column order
    return frame[order]


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    # delay: a bar appears only once work has gone on for a second, so an input error found on the first batch
    # is the only line the user sees
    return tqdm(total=total, disable=not enabled, desc=desc, unit="job", dynamic_ncols=True, delay=1.0)


def criticality(
    models: ModelLike | Sequence[ModelLike] | Mapping[str, ModelLike],
    data: DataLike = "digits",
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
    device: str | torch.device | None = None,
    amp: bool | None = None,
    channels_last: bool | None = None,
    naive: bool = False,
    store: Store | str | Path | None = None,
    progress: bool = False,
    cache_mb: int = 2048,
    fresh: Callable[[], nn.Module] | Mapping[str, Callable[[], nn.Module]] | None = None,
    norm: bool = False,
) -> pd.DataFrame:
    """Layer criticality of one model or a zoo: one row per (model, layer, mode, epoch, trial).

    Args:
        models: a spec (``timm:resnet18``), a model, a list of them, or ``{name: spec or model}`` (zoo sweep).
        data: a data spec (``digits``), an :class:`ImageData`, a tensor, an ``(images, labels)`` pair of tensors or
            arrays, a torch ``Dataset`` or a ``DataLoader`` (:func:`layerlab.data.as_batches`). Spec data is fed in
            [0, 1] (the model wrapper normalises); the user's own images as given (only uint8 is divided by 255).
            ``images``/``seed`` pick a fixed seeded subset of indexable data; of a DataLoader ``images=N`` takes the
            first N images it yields, and its batches are its own (``batch_size`` does not apply). Data that does
            not fit the cache (``cache_mb``) is streamed: a DataLoader is read once per chunk, never held whole.
        layers: layer names or labels (block names with ``units="blocks"``); default all.
        trials: fresh instances per layer in ``randomize`` mode; trial t is built under
            ``derive_seed("criticality/fresh", seed, t)`` (column ``draw_seed``), never under a training seed.
        mode: ``randomize`` (Gavrikov et al.), ``reinit`` or ``checkpoint`` (Zhang et al.; need ``run``), or a list.
        checkpoint: the epochs ``checkpoint`` mode resets to (default: every checkpoint of the run).
        store: a :class:`Store` (or its root): one shard per (model, layer, reference) job, finished jobs are read,
            never recomputed.
        naive: run the reference implementation (full forward per layer and trial) instead of the cached one.
        cache_mb: memory for the cached stage inputs; beyond it images are processed in chunks.
        fresh: where ``randomize`` draws fresh instances: a zero-argument callable returning a new, untrained
            instance of the architecture (the paper's "fresh instance"), or ``{model name: callable}`` for a zoo.
            Without it: the model's spec or layerlab checkpoint, else its timm/torchvision constructor when that
            rebuilds it exactly, else each layer's own ``reset_parameters()`` (with a warning);
            :func:`layerlab.models.fresh_source`. Every source draws trial t under ``draw_seed``.
        norm: also measure normalisation layers (BatchNorm, LayerNorm, GroupNorm, ...; labels like ``[3.1] bn1``),
            an opt-in extension: the paper re-randomises Conv2d/Linear only. A norm layer's affine weight and bias
            are swapped (``randomize``: the fresh instance's, i.e. the architecture's init, usually 1 and 0;
            ``reinit``/``checkpoint``: the run's), its running statistics stay the trained model's. With
            ``units="blocks"`` a block's norms are reset with its layers.

    Columns: model, layer, label, kind, index, units, mode, epoch, trial, seed, draw_seed, fresh_source (where trial
    t's fresh weights came from: callable, spec, timm, torchvision or reset_parameters; empty for reinit/checkpoint),
    similarity, criticality (%), agreement, accuracy, kl, base_accuracy, images. ``table.attrs`` holds the image
    indices and, under ``"fresh"``, each model's fresh-instance source in words.
    """
    if not isinstance(trials, int) or trials < 1:
        raise LayerlabError(f"trials must be a positive integer (the paper uses 3), got {trials!r}")
    if batch_size < 1:
        raise LayerlabError(f"batch_size must be positive, got {batch_size}")
    modes = _modes(mode)
    named = _named_models(models)
    dev = _device(device, named)
    amp = dev.type == "cuda" if amp is None else amp
    channels_last = dev.type == "cuda" if channels_last is None else channels_last
    if isinstance(fresh, Mapping) and (unknown := sorted(set(fresh) - set(named))):
        raise LayerlabError(f"fresh= names models that are not analysed: {unknown}; the models are {list(named)}")
    data = as_batches(data, batch_size, images=images, seed=seed, split=split, arg="images=")
    epochs = [checkpoint] if isinstance(checkpoint, int) else checkpoint
    st = Store(store) if isinstance(store, (str, Path)) else store
    job = _Job(data=data, data_key=data.fingerprint() if st is not None else "", units=units, layers=layers,
               store=st, precision="bf16" if amp else "fp32", norm=norm)
    rows: list[dict[str, Any]] = []
    sources: dict[str, str] = {}
    bar = _progress(0, progress, "criticality")
    try:
        for name, spec in named.items():
            model = load_model(spec) if isinstance(spec, str) else spec
            run_dir = known_run(model, _run_for(name, run, len(named)))  # file:RUN/final.pt names its run
            refs = _references(modes, trials, seed, run_dir, epochs)
            if "randomize" in modes:
                sources[name] = str(_bind_fresh(job.references, name, model, _fresh_for(name, fresh, len(named))))
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
    table.attrs = {"data": data.spec, "split": data.split, "indices": data.indices.tolist(), "fresh": sources}
    return table


def _fresh_for(
    name: str, fresh: Callable[[], nn.Module] | Mapping[str, Callable[[], nn.Module]] | None, n_models: int
) -> Callable[[], nn.Module] | None:
    if fresh is None or not isinstance(fresh, Mapping):
        if fresh is not None and n_models > 1:
            raise LayerlabError("one fresh= callable cannot serve several models; pass fresh={model name: callable}")
        return fresh
    return fresh.get(name)


def _bind_fresh(
    cache: _ReferenceCache, name: str, model: nn.Module, fresh: Callable[[], nn.Module] | None
) -> FreshSource:
    """The model's fresh-instance source; the last resort (each layer's reset_parameters) warns in one line."""
    source = cache.bind(model, fresh)
    if source.kind == "reset_parameters":
        warn(
            f"criticality: no constructor is known for model {name!r} ({type(model).__name__}: no fresh=, spec or "
            "exactly rebuildable timm/torchvision model), so each layer is re-drawn by its own reset_parameters() "
            "(PyTorch's default init, not necessarily the architecture's); pass fresh=lambda: "
            f"{type(model).__name__}(...) to draw fresh instances of the architecture",
        )
    return source


@dataclass
class _Job:
    """What every (model, unit, reference) job of one criticality() call shares."""

    data: Batches
    data_key: str
    units: str
    layers: Sequence[str] | None
    store: Store | None
    precision: str
    norm: bool = False
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
    us = units_of(model, job.units, job.layers, job.norm)
    weights = _fingerprint(model)
    st, data = job.store, job.data

    source = job.references.bind(model) if any(r.mode == "randomize" for r in refs) else None
    norms = {n for n, m in model.named_modules() if structure.is_norm(m)}

    def config(u: Unit, r: Reference) -> dict[str, Any]:
        cfg = {"version": VERSION, "weights": weights, "data": job.data_key, "images": len(data),
               "units": job.units, **_unit_key(u, norms), "precision": job.precision, **r.config()}
        own_norm = _norm_params(u, norms)
        if r.mode == "randomize" and source is not None and source.kind != "spec":
            # a spec's draws are a function of (spec, draw_seed); other sources are keyed by the weights they drew:
            # the layers', and a unit's own normalisation parameters where it has some
            cfg["fresh"] = f"{source.kind}:{job.references.digest(model, r)}"
            if own_norm:
                cfg["fresh"] += f":{job.references.digest(model, r, own_norm)}"
        return cfg

    rows: list[dict[str, Any]] = []
    pending: dict[str, list[Reference]] = {}
    for u in us:
        for r in refs:
            if st is not None and st.has(ANALYSIS, job_key(name, ANALYSIS, config(u, r))):
                rows.extend(st.read_shard(ANALYSIS, job_key(name, ANALYSIS, config(u, r))).to_dict("records"))
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
                "seed": r.seed, "draw_seed": r.draw_seed,
                "fresh_source": source.kind if r.mode == "randomize" and source is not None else None,
                **_stats_compute(stats), "base_accuracy": base, "images": len(data),
            }
            if st is not None:
                cfg = config(task.unit, r)
                meta = {"model": name, "config": cfg, "indices": data.indices.tolist()}
                st.write(ANALYSIS, job_key(name, ANALYSIS, cfg), _rows_frame([row]), meta)
            rows.append(row)

    with eval_mode(model):
        _evaluate(name, pipe, data, tasks, batch_size=run_opts["batch_size"], naive=run_opts["naive"],
                  max_bytes=run_opts["max_bytes"], on_done=done, advance=bar.update)
    return rows


def _norm_params(unit: Unit, norms: set[str]) -> list[str]:
    """The unit's parameters that belong to normalisation layers (paths in ``norms``)."""
    return [p for p in unit.params if p.rpartition(".")[0] in norms]


def _unit_key(unit: Unit, norms: set[str]) -> dict[str, Any]:
    """The unit's part of a job's key: its name, and ``norm`` where it holds normalisation parameters (a block with
    its norms is another job than the block without; every other key is as before the ``norm`` option)."""
    return {"layer": unit.name, **({"norm": True} if _norm_params(unit, norms) else {})}


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
        warn(
            f"fresh instances of {str(cache.bind(model))!r} for trials {fresh[0].trial} and {fresh[1].trial} are "
            "identical: this source loads fixed weights instead of initialising (or ignores torch's RNG); load the "
            "model through a timm:/torchvision: spec or a layerlab checkpoint, or pass fresh=lambda: <new instance>",
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
    data: DataLike = "digits",
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
    device: str | torch.device | None = None,
    store: Store | str | Path | None = None,
    progress: bool = False,
    cache_mb: int = 2048,
    norm: bool = False,
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
    (:func:`network_criticality`). ``norm=True`` adds normalisation layers (affine weight and bias) as modules, as
    in :func:`criticality`.

    Columns: model, layer, label, kind, index, units, mode, criticality (= mu_i), alpha, sigma (the minimiser),
    distance (||theta_F - theta_0||_F^2), loss, epsilon, expected_loss (at the minimiser), evaluated
    ((alpha, sigma) points tried), draws, sigma_min.
    """
    if not isinstance(grid, int) or grid < 2:
        raise LayerlabError(f"grid (alpha values tried) must be an integer >= 2, got {grid!r}")
    if not isinstance(draws, int) or draws < 1:
        raise LayerlabError(f"draws (noise draws per point) must be a positive integer, got {draws!r}")
    if not eps_factor > 1:
        raise LayerlabError(
            f"eps_factor must be > 1 (epsilon = eps_factor x the trained loss; the paper's is 1.01), got {eps_factor!r}:"
            " below 1 not even the trained weights meet the constraint, so every module would come out inf"
        )
    if not 0 < sigma_min < 1 or not 0 < rtol < 1:
        raise LayerlabError(f"sigma_min and rtol must lie in (0, 1); got {sigma_min}, {rtol}")
    named = _named_models(models)
    dev = _device(device, named)
    data = as_batches(data, batch_size, images=images, seed=seed, split=split, arg="images=")
    st = Store(store) if isinstance(store, (str, Path)) else store
    data_key = data.fingerprint() if st is not None else ""
    rows: list[dict[str, Any]] = []
    bar = _progress(0, progress, "module criticality")
    try:
        for name, spec in named.items():
            model = load_model(spec) if isinstance(spec, str) else spec
            run_dir = known_run(model, _run_for(name, run, len(named)))  # file:RUN/final.pt names its run
            if run_dir is None:
                raise LayerlabError(
                    f"module criticality of {name!r} needs theta_0, the weights at initialisation: pass the training "
                    "run with --run RUN_DIR (run=...), whose checkpoints/epoch_0000.pt holds them"
                )
            init_path = _run_checkpoint(run_dir, 0)
            # a unit's noise stream is its position among the norm=False units (norm units follow them), so that
            # the flag never changes another unit's draws
            base = [u.name for u in units_of(model, units)]
            extra = [u.name for u in units_of(model, units, norm=True) if u.name not in set(base)] if norm else []
            position = {n: k for k, n in enumerate(base + extra)}
            us = units_of(model, units, layers, norm)
            norms = {n for n, m in model.named_modules() if structure.is_norm(m)}
            weights = _fingerprint(model)
            init = Reference("reinit", 0, epoch=0, path=init_path)
            cfg_base = {
                "version": VERSION, "weights": weights, "data": data_key,
                "images": len(data) if st is not None else None, "units": units,
                "grid": grid, "draws": draws, "eps_factor": eps_factor, "sigma_min": sigma_min, "rtol": rtol,
                "seed": seed, **init.config(),
            }
            todo = []
            for u in us:
                key = job_key(name, MODULE_ANALYSIS, {**cfg_base, **_unit_key(u, norms)})
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
            with eval_mode(model):
                x0, y0 = _first_batch(data, pipe.device)
                logits0, cache0 = pipe.validate(pipe.input(x0), f"model {name!r}")
                data.check_outputs(logits0.shape[-1], f"model {name!r}")
                keep = {min(pipe.stage_of(p) for p in u.params) for u in todo}  # type: ignore[type-var]
                traces = _Traces(pipe, data, keep, cache_mb * 2**20, (logits0, y0, cache0), f"model {name!r}", x0)
                loss = _trained_loss(traces)
                check_finite(torch.tensor(loss), what=f"the loss of model {name!r}",
                             hint="the model itself produces NaN/inf")
                for u in todo:
                    search = _Search(grid, draws, eps_factor, sigma_min, rtol, seed, position[u.name])
                    row = _module_unit(pipe, model, traces, u, theta0, loss, search, _what(init, run_dir))
                    row = {"model": name, "layer": u.name, "label": u.label, "kind": u.kind, "index": u.index,
                           "units": units, "mode": "module", **row}
                    if st is not None:
                        cfg = {**cfg_base, **_unit_key(u, norms)}
                        st.write(MODULE_ANALYSIS, job_key(name, MODULE_ANALYSIS, cfg), pd.DataFrame([row]),
                                 {"model": name, "config": cfg, "indices": data.indices.tolist()})
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
    table.attrs = {"data": data.spec, "split": data.split, "indices": data.indices.tolist()}
    return table


def _trained_loss(traces: _Traces) -> float:
    total, n = 0.0, 0
    for chunk, _ in traces.chunks():
        for logits, labels, _ in chunk:
            if bool((labels < 0).any()):
                raise DataError(f"module criticality needs labelled images (it measures the loss), but "
                                f"{traces.data.describe()} has images without a label; pass (images, labels)")
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
    n_images = traces.n_images
    assert n_images is not None  # _trained_loss made the first full pass
    budget = limit * n_images * len(variants)
    total = 0.0
    for chunk, _ in traces.chunks():
        for logits, labels, cache in chunk:
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
