"""Healing: a short fine-tune of a pruned model with the training lab's own loop (:func:`layerlab.train.train`
with ``init=``: the pruned checkpoint's weights, its architecture from the ``pruned:`` spec), into a run folder of
its own (resumable, like every training run). A magnitude-pruned model heals with its masks on, so its zeros stay.
The run's seed comes from the stream ``prune/heal`` of the pruning seed, never the seed a zoo model trained with
(so healing does not replay the original run's data order)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..models import load_model, save_checkpoint
from ..seeds import PURPOSES, derive_seed
from ..train import recipe, train

__all__ = ["HEAL_RECIPE", "heal"]

PURPOSES.setdefault("prune/heal", "the training streams of the fine-tune that heals a pruned model")

#: the recipe a pruned model heals with (its epochs and learning rate set per call): plain SGD, cosine schedule
HEAL_RECIPE = "baseline"


def heal(model: nn.Module, data: str, run: Path, *, epochs: int, lr: float, seed: int, device: torch.device,
         images: int | None = None) -> nn.Module:
    """Fine-tune ``model`` (whose ``layerlab_arch`` describes it, masks included) for ``epochs`` on ``data``'s train
    split (``images``: a seeded subset) into the run folder ``run``; returns the fine-tuned model on ``device``.
    A finished run is read, not retrained."""
    run = Path(run)
    start = run.parent / f"{run.name}.start.pt"
    if not (run / "DONE").exists():
        save_checkpoint(model, start)
    train(model.layerlab_arch, data, recipe(HEAL_RECIPE, epochs=epochs, lr=lr), run,
          seed=derive_seed("prune/heal", seed), checkpoints="final", device=device, train_n=images, progress=False,
          init=f"file:{start}")
    start.unlink(missing_ok=True)
    return load_model(f"file:{run / 'final.pt'}", device=device)
