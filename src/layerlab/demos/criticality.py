"""The demo's side of layer criticality (Gavrikov et al. 2024): the criticality of every model of a trained zoo,
its tables and every figure, in one step (:func:`demo_step`). Imports the analysis and its figures; the analysis
imports neither."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .. import runtime
from ..criticality import criticality, derive, write_tables
from ..errors import LayerlabError

__all__ = ["demo_step", "over_training_study", "over_training_step", "shift_study", "step"]


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
    derived = derive(table, baseline="baseline")
    paths = write_tables(table, out, derived=derived)
    return paths + save_all(derived["summary"], out / "figures" / "criticality", attrs=attrs, baseline="baseline",
                            differences=derived.get("differences"))


#: the shift study of the demo: four training methods; contrast at three severities (the corruption these models
#: feel: at CIFAR-10-C's noise levels the upscaled 8x8 digits keep their accuracy), the strongest gaussian noise,
#: and PGD at the budget the pgd-linf-8 model was trained against
SHIFT_MODELS = ("baseline", "adam", "randaugment", "pgd-linf-8")
SHIFTS = ("contrast:1", "contrast:3", "contrast:5", "gaussian-noise:5", "pgd-linf:8")


def shift_study(zoo_dir: Path, out: Path, *, models: Sequence[str] = SHIFT_MODELS, shifts: Sequence[str] = SHIFTS,
                trials: int = 3, threads: int | None = None) -> list[Path]:
    """Criticality of some zoo models under distribution shift (the clean rows are the main step's jobs, read back
    from the store): ``out/criticality_shift*.csv`` and the shift figures."""
    from ..plots.criticality_studies import save_studies

    named = {m: "file:" + str(Path(zoo_dir) / m / "final.pt") for m in models if (Path(zoo_dir) / m / "final.pt").exists()}
    with runtime.threads(threads):
        table = criticality(named, "digits", split="test", trials=trials, shift=list(shifts), store=out)
    derived = derive(table)
    paths = write_tables(table, out, prefix="criticality_shift", derived=derived)
    return paths + save_studies(derived["summary"], out / "figures" / "criticality",
                                critical_sets=derived.get("critical_sets"))


def over_training_study(runs_dir: Path, out: Path, *, images: int = 256, precision: float | None = 1.0,
                        batch_size: int = 32, trials: int = 3, threads: int | None = None) -> list[Path]:
    """Criticality at every other checkpoint (and the last) of each run in ``runs_dir``, with adaptive sampling
    (``precision`` points): ``out/criticality_over_training*.csv``, and its heatmaps in ``figures/dynamics`` (beside
    the CKA over training)."""
    from ..plots.criticality_studies import save_studies
    from ..runs import checkpoints, run_config

    found = sorted(d for d in Path(runs_dir).iterdir() if (d / "run.json").exists()) if Path(runs_dir).is_dir() else []
    if not found:
        raise LayerlabError(f"{str(runs_dir)!r} holds no training runs; run the demo's dynamics step first")
    parts = []
    with runtime.threads(threads):
        for run in found:
            epochs = [e for e, _ in checkpoints(run)]
            picked = sorted(set(epochs[::2]) | {epochs[-1]})
            data = run_config(run)["data"]
            parts.append(criticality(run=run, data=data, split="test", images=images, trials=trials, precision=precision,
                                     batch_size=batch_size, over_training=True, checkpoint=picked, store=out))
    table = pd.concat(parts, ignore_index=True)
    table.attrs = parts[0].attrs
    derived = derive(table)
    paths = write_tables(table, out, prefix="criticality_over_training", derived=derived)
    return paths + save_studies(derived["summary"], out / "figures" / "dynamics", settling=derived.get("settling"))


def step(ctx) -> None:
    """The demo step: Gavrikov et al.'s layer criticality for every zoo model (364 test images, 3 trials) and its
    figures with 95 % intervals and the differences to the baseline; then four models under five shifts."""
    attrs = pd.read_csv(ctx.zoo_dir / "zoo.csv")
    demo_step(ctx.zoo_dir, ctx.out, attrs, threads=1)
    summary = pd.read_csv(ctx.out / "criticality_summary.csv")
    avg = summary.groupby("model")["criticality"].mean().sort_values()
    print("average criticality (%):", ", ".join(f"{m} {v:.1f}" for m, v in avg.items()))
    width = (summary["ci_high"] - summary["ci_low"]) / 2
    print(f"95% intervals (images and trials): half-width median {width.median():.1f} points, max {width.max():.1f}")
    diff = pd.read_csv(ctx.out / "criticality_differences.csv")
    print(f"differences to the baseline distinguishable from 0: {int(diff['distinguishable'].sum())} of {len(diff)} "
          "(model, layer) cells")
    shift_study(ctx.zoo_dir, ctx.out, threads=1)
    sets = pd.read_csv(ctx.out / "criticality_shift_critical_sets.csv")
    print("critical layers under shift (Jaccard with the clean set):")
    print(sets.pivot_table(index="model", columns="shift", values="jaccard", sort=False).to_string(
        float_format=lambda v: f"{v:.2f}"))


def over_training_step(ctx) -> None:
    """The demo step after dynamics: criticality over training of the Sharon & Dar runs (ResNet/ViT, SGD/Adam),
    adaptive sampling at +-1 point; prints where each layer settles."""
    over_training_study(ctx.out / "dynamics-zoo", ctx.out, threads=1)
    settle = pd.read_csv(ctx.out / "criticality_over_training_settling.csv")
    crit = settle[settle["final"] == "critical"]
    print("layers that end critical (>= 50%) and the checkpoint from which they stay so:")
    for run, part in crit.groupby("model", sort=False):
        print(f"  {run}: " + ", ".join(f"{r.label} @{r.settled_epoch}" for r in part.itertuples()))
    table = pd.read_csv(ctx.out / "criticality_over_training_summary.csv")
    print(f"adaptive sampling: {int(table['images'].sum())} of {256 * len(table)} images per trial "
          f"({256 * len(table) / table['images'].sum():.1f}x fewer)")
