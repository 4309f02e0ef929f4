"""The evaluation loop of criticality: every (unit, reference) swap measured over all images, on the
:class:`~layerlab.criticality.pipeline.Pipeline`'s cached stage inputs (:class:`_Traces`: held when they fit in
memory, else rebuilt chunk by chunk) with up to :data:`MAX_STACK` references of a unit in one pass, or naively
(a full forward per swap, the reference implementation)."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..data import Batches, ImageData, as_batches, batch_checksum, changed_between_passes, check_batch_labels
from ..errors import DataError, NonFiniteError, check_finite
from .intervals import MIN_IMAGES, halfwidth
from .metrics import _batch_stats
from .pipeline import Pipeline
from .references import Reference
from .units import Unit

__all__ = ["MAX_STACK", "Trace"]

MAX_STACK = 8  # at most this many references of one unit share a pass (memory: MAX_STACK x batch)
N_STATS = 7  # the sufficient statistics of metrics._stats_update


@dataclass
class _Task:
    """One unit and the references of it still to compute; they share passes in groups of MAX_STACK."""

    unit: Unit
    refs: list[Reference]
    overrides: list[dict[str, torch.Tensor]]  # full names, on the device
    stats: list[torch.Tensor] = field(default_factory=list)  # per reference: sufficient statistics (metrics)
    cos: list[list[torch.Tensor]] = field(default_factory=list)  # per reference: per-image cosines, batch by batch
    active: list[bool] = field(default_factory=list)  # per reference: still taking images (adaptive sampling)

    def start(self) -> None:
        self.stats = [torch.zeros(N_STATS, dtype=torch.float64) for _ in self.refs]
        self.cos = [[] for _ in self.refs]
        self.active = [True for _ in self.refs]

    def add(self, k: int, reference: torch.Tensor, swapped: torch.Tensor, labels: torch.Tensor,
            precision: float | None) -> None:
        """Reference k's statistics of one batch; with ``precision`` it stops once its interval is narrow enough."""
        stats, cos = _batch_stats(reference, swapped, labels)
        self.stats[k] += stats
        self.cos[k].append(cos)
        s = self.stats[k]
        if precision is not None and s[5] >= MIN_IMAGES and halfwidth(float(s[0]), float(s[6]), float(s[5])) < precision:
            self.active[k] = False

    def per_image(self, k: int) -> list[float]:
        return torch.cat(self.cos[k]).tolist() if self.cos[k] else []


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
    precision: float | None = None,
) -> None:
    """Fill every task's per-reference statistics, calling ``on_done(task, base_accuracy)`` as each finishes.

    With ``precision`` (points) a reference stops taking images once the half-width of its interval is below it
    (:func:`~layerlab.criticality.intervals.halfwidth`); the others go on, in smaller stacks.
    """
    data = as_batches(data, batch_size)
    what = f"model {name!r}"
    for task in tasks:
        task.start()
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
            for k, (ov, ref) in enumerate(zip(task.overrides, task.refs)):
                for (orig, labels), (x, _) in zip(originals, data.batches(pipe.device), strict=True):
                    if not task.active[k]:
                        break
                    out = pipe.full(pipe.input(x), ov)
                    _finite(out, name, task.unit, [ref])
                    task.add(k, orig, out, labels, precision)
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
                for logits, labels, cache in chunk:
                    active = [k for k in range(lo, hi) if task.active[k]]
                    if not active:
                        break
                    out = pipe.resume(start, cache[start], [split[task.unit.name][k] for k in active])
                    _finite(out, name, task.unit, [task.refs[k] for k in active])
                    for k, part in zip(active, out.split(logits.shape[0])):
                        task.add(k, logits, part, labels, precision)
            advance(len(task.refs) * share)
            if last:
                on_done(task, base)


def _base_accuracy(batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    correct = sum(int(((l.argmax(-1) == y) & (y >= 0)).sum()) for l, y in batches)
    labelled = sum(int((y >= 0).sum()) for _, y in batches)
    return correct / labelled if labelled else math.nan
