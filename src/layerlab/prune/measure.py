"""What a pruned model costs and how it does: parameters, FLOPs (:class:`torch.utils.flop_counter.FlopCounterMode`,
one image), accuracy (the training lab's :func:`~layerlab.train.evaluate`) and top-1 agreement with the unpruned
model (the same function, scored against the unpruned model's predictions instead of the labels)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..data import ImageData
from ..runtime import eval_mode
from ..train import evaluate
from .surgery import count_params

__all__ = ["count_flops", "count_params", "predictions", "scores"]


@torch.no_grad()
def count_flops(model: nn.Module, sample: torch.Tensor) -> int:
    """FLOPs of one forward pass on one image of ``sample``'s shape, as torch counts them (2 per multiply-add of
    convolutions, matrix products and attention; normalisation, activations and additions are not counted)."""
    device = next(iter(model.parameters())).device
    with eval_mode(model), FlopCounterMode(display=False) as counter:
        model(sample[:1].to(device))
    return int(counter.get_total_flops())


@torch.no_grad()
def predictions(model: nn.Module, data: ImageData, device: torch.device, batch_size: int = 500) -> torch.Tensor:
    """The model's top-1 class for every image of ``data`` (eval mode; on CUDA under bf16 autocast, as
    :func:`~layerlab.train.evaluate` scores), on the CPU."""
    out = []
    cuda = torch.device(device).type == "cuda"
    with eval_mode(model), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        for x, _ in data.batches(batch_size, device):
            out.append(model(x).float().argmax(1).cpu())
    return torch.cat(out)


def scores(model: nn.Module, data: ImageData, reference: torch.Tensor, device: torch.device) -> dict[str, float]:
    """``accuracy`` and ``loss`` on ``data``'s labels, ``agreement``: top-1 agreement with ``reference`` (the
    unpruned model's predictions)."""
    what = "the pruned model"
    hint = "pruning left no path from the input to the output"
    loss, accuracy = evaluate(model, data, device=device, what=what, hint=hint)
    _, agreement = evaluate(model, data, labels=reference, device=device, what=what, hint=hint)
    return {"accuracy": accuracy, "agreement": agreement, "loss": loss}


def model_costs(model: nn.Module, sample: torch.Tensor) -> dict[str, int]:
    """``params`` and ``flops`` (one image) of ``model``."""
    return {"params": count_params(model), "flops": count_flops(model, sample)}
