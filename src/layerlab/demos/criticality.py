"""The demo's side of layer criticality (Gavrikov et al. 2024): the criticality of every model of a trained zoo,
its tables and every figure, in one step (:func:`demo_step`). Imports the analysis and its figures; the analysis
imports neither."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .. import runtime
from ..criticality import criticality, summarize, write_tables
from ..errors import LayerlabError

__all__ = ["demo_step", "step"]


def demo_step(
    zoo_dir: Path,
    out: Path,
    attrs: pd.DataFrame,
    *,
    images: int | None = None,
    trials: int = 3,
    threads: int | None = None,
) -> list[Path]:
    """Criticality of every model of a trained zoo (``zoo_dir/<name>/final.pt``) on the ``digits`` test images
    (all 360 unless ``images``), T = 3: writes the tables and every figure (heatmap across training methods,
    difference to the model named ``baseline``, std over trials, vs attribute, vs accuracy) into ``out``;
    returns the paths written. Finished jobs are kept in ``out/shards``, so a re-run only draws the figures.

    ``threads`` sets torch's CPU threads for the duration (restored after): these models are small, and on a
    machine shared with other jobs one thread is several times faster than two competing ones.
    """
    from ..plots.criticality import save_all

    zoo_dir, out = Path(zoo_dir), Path(out)
    found = sorted(d for d in zoo_dir.iterdir() if (d / "final.pt").exists()) if zoo_dir.is_dir() else []
    if not found:
        raise LayerlabError(f"zoo folder {str(zoo_dir)!r} holds no <model>/final.pt; train the zoo first")
    models = {d.name: "file:" + str(d / "final.pt") for d in found}
    with runtime.threads(threads):
        table = criticality(models, "digits", split="test", images=images, trials=trials, store=out, progress=False)
    paths = write_tables(table, out)
    return paths + save_all(summarize(table), out / "figures" / "criticality", attrs=attrs, baseline="baseline")


def step(ctx) -> None:
    """The demo step: Gavrikov et al.'s layer criticality for every zoo model (364 test images, 3 trials) and its
    figures, then the models' average criticality."""
    attrs = pd.read_csv(ctx.zoo_dir / "zoo.csv")
    demo_step(ctx.zoo_dir, ctx.out, attrs, threads=1)
    summary = pd.read_csv(ctx.out / "criticality_summary.csv")
    avg = summary.groupby("model")["criticality"].mean().sort_values()
    print("average criticality (%):", ", ".join(f"{m} {v:.1f}" for m, v in avg.items()))
