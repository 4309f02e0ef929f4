"""From measurement to action: remove whole blocks of a trained model, chosen by layer criticality or by the
criteria it competes with, and see what is left.

Gavrikov et al. 2024 find many layers of a trained model auxiliary: re-randomising them barely moves the output.
:func:`prune` acts on that: it removes residual or transformer blocks (each becomes its shortcut: the identity, or
the downsample path and the block's final activation where shapes change) chosen by

* ``criticality``     -- re-randomisation criticality of the whole block (lowest first; :mod:`layerlab.criticality`);
* ``block-influence`` -- ShortGPT's 1 - cos(block input, block output) (Men et al. 2024);
* ``angular``         -- the run of n blocks with the smallest angular distance between its input and output
                         (Gromov et al. 2024);
* ``random``          -- a seeded random choice;

until a budget of blocks or parameters is reached, against ``magnitude``: global unstructured magnitude pruning
at the same parameter count (the usual baseline; dense FLOPs). Each pruned model can heal with a short fine-tune
from the training lab, and saves as a layerlab checkpoint whose architecture is a ``pruned:`` spec, so ``file:``
loads it and every other analysis runs on it. One row per (model, criterion, budget, seed): blocks removed,
parameters, FLOPs, accuracy before and after healing, agreement with the unpruned model.

The package, one job per module, in the order the data flows:

* :mod:`.budget`    -- :class:`Budget`: a fraction or count of blocks, or ``params:F``;
* :mod:`.surgery`   -- removable blocks (:func:`removable_blocks`) and :func:`remove_blocks`; shortcut rules;
* :mod:`.magnitude` -- global magnitude pruning with masks that survive healing;
* :mod:`.spec`      -- the ``pruned:`` model source (registered on import) and :func:`pruned_arch`;
* :mod:`.scores`    -- the criteria (:data:`CRITERIA`) and their pure functions (token cosine, angular distance);
* :mod:`.select`    -- from scores and a budget to the blocks removed;
* :mod:`.measure`   -- parameters, FLOPs, accuracy and agreement;
* :mod:`.heal`      -- the healing fine-tune (:func:`layerlab.train.train` with ``init=``);
* :mod:`.driver`    -- :func:`prune`, the analysis, and :func:`prune_model`;
* :mod:`.tables`    -- :func:`summarize` (seed spread) and :func:`compare` (does criticality beat the others?).

Figures are drawn by :mod:`layerlab.plots.prune` from the table; nothing here imports them. ``layerlab.prune`` is
itself callable (``ll.prune(models, data)``), so no submodule may be named ``prune``.
"""
from __future__ import annotations

from .budget import Budget, parse_budget
from .driver import ANALYSIS, DEFAULT_CRITERIA, SCORES, VERSION, prune, prune_model
from .heal import HEAL_RECIPE, heal
from .magnitude import add_masks, bake, baked, magnitude_prune, prunable_weights, sparsity
from .measure import count_flops, count_params, predictions
from .scores import CRITERIA, Criterion, ScoreContext, angular_distance, pooled, register_criterion, token_cosine
from .select import choose, weight_target
from .spec import SOURCE, pruned_arch, split_arch
from .surgery import SHORTCUTS, Block, RemovedBlock, Shortcut, removable_blocks, remove_blocks, shortcut_rule
from .tables import STAGES, compare, long_form, summarize

__all__ = [
    "ANALYSIS", "CRITERIA", "DEFAULT_CRITERIA", "HEAL_RECIPE", "SCORES", "SHORTCUTS", "SOURCE", "STAGES", "VERSION",
    "Block", "Budget", "Criterion", "RemovedBlock", "ScoreContext", "Shortcut", "add_masks", "angular_distance",
    "bake", "baked", "choose", "compare", "count_flops", "count_params", "heal", "long_form", "magnitude_prune",
    "parse_budget", "pooled", "predictions", "prunable_weights", "prune", "prune_model", "pruned_arch",
    "register_criterion", "removable_blocks", "remove_blocks", "shortcut_rule", "sparsity", "split_arch",
    "summarize", "token_cosine", "weight_target",
]
