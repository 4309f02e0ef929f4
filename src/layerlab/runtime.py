"""What every analysis needs from its runtime, written once: the device policy, the eval-mode guard, the
fingerprints that key stored results, scoped torch threads and progress bars.

The device policy, where to compute given a ``device=`` argument and a model:

* ``None``: where the model already is (its first parameter, else its first buffer), or the CPU without a
  model. layerlab never moves a model it was handed, so this is the default of every analysis.
* ``"auto"``: CUDA when available, else the CPU.
* anything ``torch.device`` accepts (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``): that device; CUDA
  asked for where there is none is a :class:`LayerlabError`, not a crash deep inside a forward pass.

>>> resolve_device(None)
device(type='cpu')
>>> resolve_device("cpu")
device(type='cpu')
>>> resolve_device(None, torch.nn.Linear(2, 2))
device(type='cpu')
>>> resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
True
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .errors import LayerlabError

__all__ = ["eval_mode", "model_device", "model_fingerprint", "progress", "resolve_device", "tensor_fingerprint",
           "threads"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then every submodule's own training flag back (mixed modes too), even after
    an exception: an analysis leaves the model as it was given."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def model_device(model: nn.Module) -> torch.device | None:
    """The device of ``model``'s first parameter (else first buffer); None for a model without tensors."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def resolve_device(device: str | torch.device | None, model: nn.Module | None = None) -> torch.device:
    """The device to compute on under layerlab's device policy (module doc).

    >>> resolve_device("nonsense")
    Traceback (most recent call last):
    ...
    layerlab.errors.LayerlabError: device 'nonsense': not a device; use 'cpu', 'cuda', 'cuda:N' or 'auto'
    """
    if device is None:
        return (model_device(model) if model is not None else None) or torch.device("cpu")
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise LayerlabError(f"device {device!r}: not a device; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LayerlabError(f"device {str(device)!r} asked for, but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LayerlabError(
                f"device {str(device)!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise LayerlabError(f"device {str(device)!r} asked for, but MPS is not available here; use --device cpu")
    return dev


def _update(h: "hashlib._Hash", label: str | None, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update((f"{label}:" if label is not None else "").encode() + f"{t.dtype}:{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def model_fingerprint(model: nn.Module) -> str:
    """16 hex digits of sha256 over the architecture spec (``layerlab_arch``, else the class name) and every entry
    of the state dict (parameters and buffers: weights and BN statistics both decide the outputs): the weights
    part of a stored result's key.

    >>> a = torch.nn.Linear(2, 2)
    >>> model_fingerprint(a) == model_fingerprint(a), len(model_fingerprint(a))
    (True, 16)
    """
    h = hashlib.sha256(str(getattr(model, "layerlab_arch", type(model).__name__)).encode())
    for k, v in model.state_dict().items():
        _update(h, k, v)
    return h.hexdigest()[:16]


def tensor_fingerprint(x: torch.Tensor) -> str:
    """16 hex digits of sha256 over a tensor's dtype, shape and bytes (images that key a cached result)."""
    h = hashlib.sha256()
    _update(h, None, x)
    return h.hexdigest()[:16]


@contextmanager
def threads(count: float | None) -> Iterator[None]:
    """torch intra-op threads set to ``count`` (at least 1; None: unchanged) for the duration, the caller's setting
    restored afterwards, even after an exception. Tiny float64 ops (probe fits) and tiny convolutions gain nothing
    from threads and on an oversubscribed CPU lose a lot (measured 10-60x); a sweep job gets its own CPUs."""
    if not count:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(count)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def progress(items: Iterable[Any] | None = None, *, total: int | None = None, enabled: bool = True, desc: str = "",
             unit: str = "it", **kwargs: Any) -> Any:
    """The one progress bar (tqdm.auto, ``leave=False`` unless given): over ``items``, or a manual bar of ``total``;
    disabled (no output) unless ``enabled``."""
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit=unit, disable=not enabled, **{"leave": False, **kwargs})
