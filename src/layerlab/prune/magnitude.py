"""Global unstructured magnitude pruning, the usual baseline: zero the ``amount`` Conv2d/Linear weights of smallest
magnitude, over the whole model at once (Han et al. 2015's criterion; :func:`torch.nn.utils.prune.global_unstructured`).

The zeros stay in dense tensors, so the FLOPs a dense forward costs do not change (the table says so). While a
pruned model heals its weights carry their masks (``weight = weight_orig * weight_mask``): a pruned weight gets no
gradient and stays zero under SGD, momentum, weight decay and Adam alike. :func:`bake` then makes the zeros plain
weights again, so the saved model is the unpruned architecture with zeros in it.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

__all__ = ["add_masks", "bake", "baked", "magnitude_prune", "prunable_weights", "sparsity"]


def prunable_weights(model: nn.Module) -> list[nn.Module]:
    """Every Conv2d and Linear with a weight, in module order (not the output projection inside an
    ``nn.MultiheadAttention``, whose forward reads the weight without calling the Linear)."""
    inside_mha = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return [m for m in model.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in inside_mha and m.weight is not None]


def magnitude_prune(model: nn.Module, amount: int) -> nn.Module:
    """A copy of ``model`` whose ``amount`` smallest-magnitude Conv2d/Linear weights (over all layers at once) are
    masked to zero; the masks stay attached (:func:`bake` removes them)."""
    out = copy.deepcopy(model)
    layers = prunable_weights(out)
    total = sum(m.weight.numel() for m in layers)
    amount = int(min(max(amount, 0), total))
    torch_prune.global_unstructured([(m, "weight") for m in layers], pruning_method=torch_prune.L1Unstructured,
                                    amount=amount)
    return _refresh(out)


def _masked(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "weight_mask", None), torch.Tensor)]


def _refresh(model: nn.Module) -> nn.Module:
    """Recompute each masked weight outside autograd (the forward recomputes it anyway), so that the model can be
    deep-copied (a weight left over from a forward with gradients is not a graph leaf and cannot be)."""
    with torch.no_grad():
        for m in _masked(model):
            m.weight = m.weight_orig * m.weight_mask
    return model


def add_masks(model: nn.Module) -> nn.Module:
    """Attach an all-ones mask to every prunable weight, in place (the ``masked=true`` form of a ``pruned:`` spec,
    into which a magnitude-pruned checkpoint's masks then load)."""
    for m in prunable_weights(model):
        if not torch_prune.is_pruned(m):
            torch_prune.identity(m, "weight")
    return _refresh(model)


def bake(model: nn.Module) -> nn.Module:
    """Make masked weights plain weights again (their zeros kept), in place."""
    for m in _masked(model):
        torch_prune.remove(m, "weight")
    return model


def baked(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its masks baked in (:func:`bake`); the model itself keeps them. A model without masks
    is returned as it is."""
    if not _masked(model):
        return model
    return bake(copy.deepcopy(_refresh(model)))


def sparsity(model: nn.Module) -> float:
    """The fraction of Conv2d/Linear weights that are exactly zero."""
    layers = prunable_weights(model)
    total = sum(m.weight.numel() for m in layers)
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    return zeros / total if total else 0.0
