"""layerlab checkpoints: writing them, reading them, and the ``file:`` model source.

A checkpoint holds an architecture spec, a state_dict and metadata, read with ``torch.load(weights_only=True)``.
A whole module saved with ``torch.save(model)`` can only be unpickled, which runs code from the file: that
needs the ``trust_pickle`` opt-in (:func:`~layerlab.models.specs.trusts_pickle`).
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LayerlabError
from .normalized import Normalized, _mean_std
from .specs import MODEL_SOURCES, load_model, trusts_pickle

CHECKPOINT_FORMAT = "layerlab-checkpoint/1"
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
    from ..store import atomic_write

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
