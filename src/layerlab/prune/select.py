"""From scores to the blocks removed, under a budget (pure functions over the score rows of :mod:`.scores`).

* per-block scores (criticality, block influence, random): blocks in ascending score (ties: forward order); a
  blocks budget takes the first n, a parameter budget takes blocks until the removed parameters reach it;
* run scores (angular): for n blocks the run of n chained blocks with the smallest score (ties: the earliest); a
  parameter budget takes the smallest n whose best run removes enough;
* magnitude's weight count for a budget (:func:`weight_target`): a parameter budget's count, or for a blocks budget
  n times the mean parameters of a removable block (what a random choice of n blocks removes on average).
"""
from __future__ import annotations

import pandas as pd

from ..errors import LayerlabError
from .budget import Budget
from .surgery import Block

__all__ = ["choose", "weight_target"]


def _ordered(scores: pd.DataFrame, blocks: list[Block]) -> list[Block]:
    score = dict(zip(scores["block"], scores["score"]))
    missing = [b.name for b in blocks if b.name not in score]
    if missing:
        raise LayerlabError(f"the scores hold no value for blocks {missing}; score every removable block")
    return sorted(blocks, key=lambda b: (score[b.name], b.index))


def _run(scores: pd.DataFrame, blocks: list[Block], n: int) -> list[Block] | None:
    rows = scores[scores["n"] == n]
    if rows.empty:
        return None
    index = {b.name: b.index for b in blocks}
    best = min(rows.itertuples(), key=lambda r: (r.score, index[r.block]))
    return blocks[index[best.block]: index[best.block] + n]


def choose(scores: pd.DataFrame, blocks: list[Block], budget: Budget, total_params: int, *,
           runs: bool = False) -> list[str]:
    """The names of the blocks to remove, in forward order."""
    if budget.kind == "blocks":
        n = budget.blocks(len(blocks))
        if runs:
            picked = _run(scores, blocks, n)
            if picked is None:
                longest = int(scores["n"].max()) if len(scores) else 0
                raise LayerlabError(f"no run of {n} chained blocks exists (the longest run of blocks that feed each "
                                    f"other directly has {longest}); ask the angular criterion for at most {longest}")
        else:
            picked = _ordered(scores, blocks)[:n]
        return [b.name for b in sorted(picked, key=lambda b: b.index)]
    target = budget.value * total_params
    if runs:
        for n in range(1, int(scores["n"].max()) + 1):
            picked = _run(scores, blocks, n)
            if picked is not None and sum(b.params for b in picked) >= target:
                return [b.name for b in picked]
        most = max(sum(b.params for b in _run(scores, blocks, int(n)) or []) for n in scores["n"].unique())
    else:
        taken: list[Block] = []
        for b in _ordered(scores, blocks):
            taken.append(b)
            if sum(t.params for t in taken) >= target:
                return [t.name for t in sorted(taken, key=lambda t: t.index)]
        most = sum(b.params for b in blocks)
    raise LayerlabError(f"budget {budget.label!r} cannot be met: removing blocks removes at most "
                        f"{most / total_params:.1%} of the parameters; ask for less (e.g. "
                        f"params:{max(0.01, most / total_params * 0.9):.2f})")


def weight_target(budget: Budget, blocks: list[Block], total_params: int) -> int:
    """How many weights magnitude pruning zeroes for ``budget``."""
    if budget.kind == "params":
        return round(budget.value * total_params)
    n = budget.blocks(len(blocks))
    return round(n * sum(b.params for b in blocks) / len(blocks))
