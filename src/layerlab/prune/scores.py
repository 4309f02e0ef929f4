"""The criteria that choose blocks to remove, one registration each (:data:`CRITERIA`); lower scores go first.

* ``criticality``     -- layerlab's re-randomisation criticality of the whole block (``units="blocks"``: every
                         layer of the block re-randomised at once; Gavrikov et al. 2024, Zhang et al. 2022's unit),
                         mean over trials: a block the output ignores when its weights are replaced is auxiliary.
* ``block-influence`` -- ShortGPT's block influence (Men et al. 2024): 1 - cos(block input, block output), per
                         token (a token is a spatial position of a conv map or a ViT token), averaged over tokens
                         and images. Where a block changes shape the input is taken through the block's shortcut
                         (``act(downsample(x))``: what would remain after removal; our generalisation).
* ``angular``         -- Gromov et al. 2024's angular distance arccos(cos(x_l, x_{l+n})) / pi between the input of
                         block l and the output of block l+n-1, on pooled features (mean over tokens: the vision
                         analogue of their last token), for every run of n chained blocks; the run with the smallest
                         distance goes. x_l is taken through the run's shortcuts as above.
* ``random``          -- a seeded random order (stream ``prune/random``).
* ``magnitude``       -- global unstructured magnitude pruning of the weights (:mod:`.magnitude`): not a block
                         criterion; it prunes as many weights as the budget's blocks hold on average.

Scores are measured on calibration images (a seeded subset of the train split), never on the test images the
pruned model is scored on. Each score function returns rows ``block, label, n, score``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..data import ImageData
from ..errors import LayerlabError
from ..registry import Registry
from ..runtime import eval_mode
from ..seeds import PURPOSES, generator
from .surgery import Block, replacement

__all__ = ["CRITERIA", "Criterion", "ScoreContext", "angular_distance", "pooled", "register_criterion",
           "token_cosine"]

PURPOSES.setdefault("prune/random", "the random order in which the random criterion removes blocks")


@dataclass(frozen=True)
class ScoreContext:
    """What a criterion scores: the model (on ``device``, in eval mode), its removable blocks, calibration images."""

    model: nn.Module
    blocks: list[Block]
    data: ImageData
    seed: int
    device: torch.device
    trials: int = 3
    batch_size: int = 128


@dataclass(frozen=True)
class Criterion:
    """A pruning criterion: ``score(ctx)`` -> rows (block, label, n, score), lower removed first. ``runs``: scores
    are of runs of n chained blocks (one row per start and length); ``weights``: prunes weights, not blocks."""

    name: str
    help: str
    score: Callable[[ScoreContext], pd.DataFrame] | None = None
    runs: bool = False
    weights: bool = False
    random: bool = False  # its choice depends on the seed alone (no images needed)


CRITERIA: Registry[Any] = Registry("pruning criterion")


def register_criterion(criterion: Criterion) -> Criterion:
    """Add a criterion (its name becomes a value of ``criteria=`` and ``--by``)."""
    CRITERIA.register(criterion.name)(criterion)
    return criterion


def _rows(ctx: ScoreContext, values: list[float], n: int = 1) -> pd.DataFrame:
    return pd.DataFrame({"block": [b.name for b in ctx.blocks], "label": [b.label for b in ctx.blocks],
                         "n": n, "score": [float(v) for v in values]})


# ============================================================================================ pure functions
def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image: the cosine of ``a`` and ``b`` along the feature axis, averaged over tokens ([N, C, H, W]: a token
    per position, features = channels; [N, T, D]: a token per row; [N, D]: one token). Shape [N]."""
    a, b = a.float(), b.float()
    if a.ndim == 4:
        return torch.nn.functional.cosine_similarity(a, b, dim=1).flatten(1).mean(1)
    if a.ndim == 3:
        return torch.nn.functional.cosine_similarity(a, b, dim=2).mean(1)
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def pooled(x: torch.Tensor) -> torch.Tensor:
    """Features averaged over tokens: [N, C, H, W] -> [N, C], [N, T, D] -> [N, D]."""
    x = x.float()
    return x.mean((2, 3)) if x.ndim == 4 else x.mean(1) if x.ndim == 3 else x.flatten(1)


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image: arccos(cos(pooled a, pooled b)) / pi, in [0, 1] (Gromov et al. 2024), in float64 (arccos is
    ill-conditioned near cos = 1, where the blocks worth removing sit). Shape [N]."""
    cos = torch.nn.functional.cosine_similarity(pooled(a).double(), pooled(b).double(), dim=1).clamp(-1.0, 1.0)
    return torch.arccos(cos) / torch.pi


# ============================================================================================ block inputs/outputs
def _first(t: Any) -> torch.Tensor:
    return t[0] if isinstance(t, (tuple, list)) else t


@torch.no_grad()
def block_io(ctx: ScoreContext) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Per calibration batch: every removable block's input and output, in block order (one forward each)."""
    modules = dict(ctx.model.named_modules())
    ins: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}
    hooks = []
    for k, b in enumerate(ctx.blocks):
        def hook(m: nn.Module, args: Any, out: Any, k: int = k) -> None:
            ins[k], outs[k] = _first(args).detach().clone(), _first(out).detach().clone()

        hooks.append(modules[b.name].register_forward_hook(hook))
    try:
        with eval_mode(ctx.model):
            for x, _ in ctx.data.batches(ctx.batch_size, ctx.device):
                ins.clear()
                outs.clear()
                ctx.model(x)
                if len(ins) != len(ctx.blocks):
                    missing = [b.name for k, b in enumerate(ctx.blocks) if k not in ins]
                    raise LayerlabError(f"blocks {missing} did not run in the model's forward pass; they cannot be "
                                        "scored by their inputs and outputs")
                yield [ins[k] for k in range(len(ctx.blocks))], [outs[k] for k in range(len(ctx.blocks))]
    finally:
        for h in hooks:
            h.remove()


def _shortcuts(ctx: ScoreContext) -> list[nn.Module]:
    modules = dict(ctx.model.named_modules())
    return [replacement(modules[b.name]).eval() for b in ctx.blocks]  # type: ignore[union-attr]


# ============================================================================================ the criteria
def _criticality(ctx: ScoreContext) -> pd.DataFrame:
    from ..criticality import criticality

    table = criticality(ctx.model, ctx.data, layers=[b.name for b in ctx.blocks], units="blocks", trials=ctx.trials,
                        seed=ctx.seed, batch_size=ctx.batch_size, device=ctx.device)
    mean = table.groupby("layer")["criticality"].mean()
    return _rows(ctx, [mean[b.name] for b in ctx.blocks])


@torch.no_grad()
def _block_influence(ctx: ScoreContext) -> pd.DataFrame:
    shortcuts = _shortcuts(ctx)
    total, count = torch.zeros(len(ctx.blocks), dtype=torch.float64), 0
    for ins, outs in block_io(ctx):
        for k, (x, y) in enumerate(zip(ins, outs)):
            total[k] += (1 - token_cosine(shortcuts[k](x), y)).double().sum().cpu()
        count += ins[0].shape[0]
    return _rows(ctx, (total / count).tolist())


def _chained(ins: list[torch.Tensor], outs: list[torch.Tensor]) -> list[bool]:
    """Whether block k+1 reads exactly block k's output (no layer in between), for each k."""
    return [outs[k].shape == ins[k + 1].shape and bool(torch.equal(outs[k], ins[k + 1])) for k in range(len(ins) - 1)]


@torch.no_grad()
def _angular(ctx: ScoreContext) -> pd.DataFrame:
    shortcuts = _shortcuts(ctx)
    sums: dict[tuple[int, int], float] = {}
    count, chained = 0, None
    for ins, outs in block_io(ctx):
        if chained is None:
            chained = _chained(ins, outs)
        for start in range(len(ins)):
            s = ins[start]
            for end in range(start, len(ins)):
                if end > start and not chained[end - 1]:
                    break
                s = shortcuts[end](s)
                key = (start, end - start + 1)
                sums[key] = sums.get(key, 0.0) + float(angular_distance(s, outs[end]).double().sum())
        count += ins[0].shape[0]
    rows = [{"block": ctx.blocks[s].name, "label": ctx.blocks[s].label, "n": n, "score": v / count}
            for (s, n), v in sorted(sums.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    return pd.DataFrame(rows, columns=["block", "label", "n", "score"])


def _random(ctx: ScoreContext) -> pd.DataFrame:
    order = torch.randperm(len(ctx.blocks), generator=generator("prune/random", ctx.seed))
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return _rows(ctx, rank.tolist())


register_criterion(Criterion("criticality", "re-randomisation criticality of the whole block (Gavrikov et al. "
                             "2024), lowest first", _criticality))
register_criterion(Criterion("block-influence", "ShortGPT block influence 1 - cos(input, output), lowest first",
                             _block_influence))
register_criterion(Criterion("angular", "Gromov et al. 2024: the run of n blocks with the smallest angular "
                             "distance between its input and output", _angular, runs=True))
register_criterion(Criterion("random", "a seeded random choice of blocks", _random, random=True))
register_criterion(Criterion("magnitude", "global unstructured magnitude pruning of Conv2d/Linear weights to the "
                             "same parameter count (dense FLOPs)", weights=True))
