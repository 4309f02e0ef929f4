"""`layerlab prune`: remove whole blocks chosen by a criterion (criticality, block influence, angular distance,
random) or prune weights by magnitude, optionally heal, and compare. A thin layer over :mod:`layerlab.prune`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import LayerlabError
from ._common import DEVICE_HELP, THREADS_HELP, check_out

CRITERIA_HELP = "criticality, block-influence, angular, random or magnitude"


def _split(items: list[str] | None) -> list[str]:
    return [p.strip() for item in items or [] for p in item.split(",") if p.strip()]


def register(app: typer.Typer) -> None:
    @app.command("prune")
    def prune_cmd(
        specs: list[str] = typer.Argument(
            ..., help="Model specs, optionally named NAME=SPEC (e.g. baseline=file:zoo/baseline/final.pt)."
        ),
        data: str = typer.Option(
            "digits", "--data", "-d", help="Data spec: blocks are scored on its train split, pruned models tested on "
            "--split and healed on the train split.",
        ),
        budget: list[str] = typer.Option(
            ["0.1", "0.25", "0.5"], "--budget", "-b",
            help="What to remove (repeatable or comma-separated): a fraction of the blocks 0<B<1 (0.25), a count of "
            "blocks (2), or params:F (blocks until that fraction of the parameters is gone). Default 0.1, 0.25 and "
            "0.5 of the blocks.",
        ),
        by: Optional[list[str]] = typer.Option(
            None, "--by", help=f"Criterion (repeatable or comma-separated): {CRITERIA_HELP}; default all five, "
            "because the point is their comparison. magnitude prunes single weights to the same parameter count.",
        ),
        finetune_epochs: int = typer.Option(
            0, "--finetune-epochs", "-e", help="Heal each pruned model with this many epochs of fine-tuning (the "
            "training lab's loop, SGD); 0 = no healing.",
        ),
        heal_lr: float = typer.Option(0.01, "--heal-lr", help="Learning rate of the healing fine-tune."),
        heal_images: Optional[int] = typer.Option(
            None, "--heal-images", help="Heal on a seeded subset of this many training images (default all)."
        ),
        seed: Optional[list[int]] = typer.Option(
            None, "--seed", help="Seed(s) (repeatable): the random choice, criticality's fresh instances, the "
            "calibration subset and healing each draw from their own stream of it. Default 0 (shown unset because the "
            "option repeats: --seed 0 --seed 1 --seed 2 for a seed spread).",
        ),
        images: int = typer.Option(
            256, "--images", "-n", help="Calibration images (a seeded subset of the train split) that the criteria "
            "score blocks on; never the images the pruned models are tested on. Default 256 because scoring needs "
            "only a calibration sample (as dynamics' CKA features), not every image.",
        ),
        eval_images: Optional[int] = typer.Option(
            None, "--eval-images", help="Test on a fixed subset of this many --split images (default all)."
        ),
        split: str = typer.Option("test", "--split", help="The split pruned models are scored on."),
        trials: int = typer.Option(3, "--trials", "-t", help="criticality: fresh instances per block (paper: 3)."),
        batch_size: int = typer.Option(128, "--batch-size", help="Images per forward pass when scoring."),
        out: Path = typer.Option(
            ..., "--out", "-o", help="Output folder: prune.csv, prune_summary.csv, prune_compare.csv, figures, the "
            "pruned checkpoints (pruned/KEY.pt, loadable as file:) and the resumable shard store.",
        ),
        threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
        device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
        figures: bool = typer.Option(True, "--figures/--no-figures", help="Write PNG/SVG figures."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    ) -> None:
        """Remove whole residual/transformer blocks chosen by a criterion until a budget is reached, and compare.

        A removed block becomes its shortcut (identity, or the downsample path where shapes change). Writes one
        row per (model, criterion, budget, seed): blocks removed, parameters, FLOPs, accuracy before and after
        healing, agreement with the unpruned model. Finished jobs are kept in OUT/shards and never recomputed.

        Examples:
          layerlab prune file:runs/base/final.pt --data digits --budget 0.25 --by criticality --out out/prune
          layerlab prune file:runs/base/final.pt --budget 0.1,0.25,0.5 --finetune-epochs 1 --seed 0 --seed 1 --out out/prune
          layerlab prune file:runs/base/final.pt --budget params:0.3 --by criticality,magnitude --out out/prune
        """
        check_out(out)
        budgets = _split(budget)
        criteria = _split(by) or None
        if by and not criteria:  # --by "" named nothing: not "all five" (that is leaving --by out)
            raise LayerlabError(f"--by names no criterion; pass one or more of {CRITERIA_HELP}, or leave --by out for all")
        if budget is not None and not budgets:
            raise LayerlabError("--budget names no budget; pass e.g. --budget 0.25 or --budget 0.1,0.25,0.5")

        from ..prune import CRITERIA, DEFAULT_CRITERIA, compare, parse_budget, prune, summarize
        from ..store import atomic_write_text
        from ._common import print_frame, set_threads
        from .criticality import parse_specs

        for b in budgets:
            parse_budget(b)  # a malformed budget fails now, before any model is loaded
        for c in criteria or []:
            CRITERIA.get(c)
        if finetune_epochs < 0:
            raise LayerlabError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
        set_threads(threads)
        table = prune(parse_specs(specs), data, criteria=criteria or DEFAULT_CRITERIA, budgets=budgets,
                      seeds=seed or [0], finetune_epochs=finetune_epochs, heal_lr=heal_lr, heal_images=heal_images,
                      images=images, eval_images=eval_images, split=split, trials=trials, batch_size=batch_size,
                      device=device, store=out, progress=progress)
        summary = summarize(table)
        paths = [atomic_write_text(out / "prune.csv", table.to_csv(index=False)),
                 atomic_write_text(out / "prune_summary.csv", summary.to_csv(index=False))]
        if "criticality" in set(table["criterion"]) and table["criterion"].nunique() > 1:
            paths.append(atomic_write_text(out / "prune_compare.csv", compare(table).to_csv(index=False)))
        if figures:
            from ..plots.prune import figures as prune_figures

            paths += prune_figures({"prune": table}, out / "figures" / "prune")
        cols = ["criterion", "budget", "stage", "accuracy", "accuracy_std", "agreement", "params_removed",
                "flops_ratio", "seeds", "models"]
        print_frame(summary[cols], "block removal: accuracy per criterion and budget (mean over models; std over "
                    "seeds, ddof=1)")
        base = table.drop_duplicates("model")["accuracy_base"]
        typer.echo(f"unpruned accuracy: {base.mean():.4f}" + (" (mean over models)" if len(base) > 1 else ""))
        typer.echo(f"wrote {len(paths)} files to {out}; pruned checkpoints in {out / 'pruned'}")
