"""Where a swap's weights come from (a :class:`Reference`): a fresh, untrained instance of the architecture
(Gavrikov et al. 2024's re-randomisation, trial t drawn under ``derive_seed("criticality/fresh", seed, t)``), or a
checkpoint of the model's training run (Zhang, Bengio, Singer 2022: ``reinit`` to epoch 0, ``checkpoint`` to epoch
tau). Also: the cache of reference weights shared across a zoo, the binding of each model's fresh-instance source,
the run a model comes from, and the guards against fresh instances that are not fresh."""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import structure
from ..errors import LayerlabError, warn
from ..models import FreshSource, checkpoint_state, fresh_source
from ..runs import checkpoint_path, checkpoints as run_checkpoints
from ..seeds import derive_seed
from .units import Unit

__all__ = ["MODES", "Reference", "known_run"]

MODES = ("randomize", "reinit", "checkpoint")


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


def _modes(mode: str | Sequence[str]) -> list[str]:
    modes = [mode] if isinstance(mode, str) else list(mode)
    for m in modes:
        if m not in MODES:
            raise LayerlabError(f"mode must be one of {', '.join(MODES)}, got {m!r} (module criticality: --module)")
    if not modes:
        raise LayerlabError(f"no mode given; choose from {', '.join(MODES)}")
    return list(dict.fromkeys(modes))


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
