"""A model run stage by stage with swapped parameters, never written to: the chain of stages whose composition is
the forward pass (:func:`stage_decomposition`), checked against the real forward before use, and
:class:`Pipeline`, which caches the input of every stage once and re-runs a swapped layer's stage onwards only,
with the variants of one layer stacked along the batch. The part any swap-and-measure analysis can share."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
from torch import nn
from torch.func import functional_call

from .. import structure
from ..errors import DataError, LayerlabError, ShapeError, check_finite, input_mismatch, warn
from ..models import Normalized
from ..structure import Stage

__all__ = ["Pipeline", "stage_decomposition"]


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
