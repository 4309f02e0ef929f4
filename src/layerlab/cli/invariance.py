"""`layerlab invariance`: STIR between a pretrained and a finetuned model (Merlin et al. 2023), with figures."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import DEVICE_HELP, THREADS_HELP, check_out, print_frame, set_threads

SUMMARY_COLUMNS = ["label", "retention", "reverse", "ceiling", "scratch", "transfer", "noise", "cka", "best_label",
                   "shift", "shift_above_noise", "scratch_shift", "scratch_shift_above_noise", "inversion_loss"]


def register(app: typer.Typer) -> None:
    @app.command("invariance")
    def invariance_cmd(
        pretrained: str = typer.Argument(..., help="Pretrained model: a checkpoint path or a spec (file:PATH, timm:...)."),
        finetuned: str = typer.Argument(..., help="The same model after finetuning (e.g. made by `layerlab finetune`)."),
        scratch: Optional[str] = typer.Option(None, "--scratch", help="Control trained from scratch on the downstream task (gives transfer)."),
        data: str = typer.Option(
            ..., "--data", "-d", help="Images to invert, e.g. the downstream data 'digits?classes=5-9'; required "
            "because they must be the finetuning task's, which no default knows.",
        ),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder: shards/, cache/inversions/, figures/invariance/. Re-running resumes."),
        layers: list[str] = typer.Option([], "--layers", "-l", help="Layers in depth order: module paths, labels ('[3.1] conv2'), 'blocks', 'layers' or 'kind:ClassName' (repeatable or comma-separated); default 6 evenly spaced conv/linear layers."),
        images: Optional[int] = typer.Option(
            None, "--images", "-n",
            help="Number of images (a fixed seeded subset of --split); default 128, or all when the split holds "
            "fewer, because every image is inverted for every layer and model (--steps gradient steps each), by far "
            "the costliest part.",
        ),
        steps: int = typer.Option(500, "--steps", help="Inversion steps (the reference uses 500-1000)."),
        step_size: float = typer.Option(0.5, "--step-size", help="L2 length of each normalised-gradient step in pixel space."),
        seed: int = typer.Option(0, help="Seed of the image subset and of the initial noise."),
        split: str = typer.Option(
            "test", help="Data split to take the images from; default test because invariances are measured on "
            "held-out images (criticality --module defaults to train, as its paper does).",
        ),
        estimator: str = typer.Option(
            "biased", help="Linear CKA estimator over all images: biased (full N) or unbiased. Default biased because "
            "STIR (Merlin et al.) uses standard linear CKA; compare defaults to unbiased because it works on minibatches.",
        ),
        batch_size: int = typer.Option(
            128, "--batch-size", help="Images per inversion batch: memory only. dynamics and compare default to 64 "
            "because there it is the CKA estimator's minibatch.",
        ),
        examples: int = typer.Option(6, "--examples", help="Example inversions per layer in the figure (0: none)."),
        device: str = typer.Option("cpu", help=DEVICE_HELP + " On cuda: inversions under bf16 autocast."),
        threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    ) -> None:
        """Invariances kept by finetuning: STIR between a pretrained and a finetuned model (Merlin et al. 2023).

        STIR(finetuned_j | pretrained_i) for every layer pair, both directions, within-model grids, plain CKA and
        the noise floor; per-layer retention, transfer (with --scratch) and compression; figures.

        Example: layerlab invariance runs/pt/final.pt runs/ft/final.pt --scratch runs/sc/final.pt --data 'digits?classes=5-9' --out inv --layers conv1,layer1,layer2,layer3,layer4,fc --steps 300
        """
        check_out(out)

        from ..invariance import InversionCache, as_model_spec, example_inversions, grid_images, invariance_grid
        from ..models import load_model
        from ..plots.invariance import save_all
        from ..store import Store

        set_threads(threads)
        names = [p.strip() for item in layers for p in item.split(",") if p.strip()] or None
        models = [load_model(as_model_spec(s), device=device) if s else None for s in (pretrained, finetuned, scratch)]
        store = Store(out)
        cache = InversionCache(out / "cache" / "inversions")
        res = invariance_grid(*models, data=data, layers=names, images=images or "auto", steps=steps, step_size=step_size,
                              seed=seed, split=split, estimator=estimator, batch_size=batch_size, device=device,
                              cache=cache, store=store, progress=True)
        originals, shown = None, None
        if examples > 0:
            originals = grid_images(data, images or "auto", seed, split)[:examples]
            shown = example_inversions(cache, res["inversions"], k=examples)
        paths = save_all(res, out / "figures" / "invariance", originals=originals, examples=shown)
        summary = res["summary"]
        print_frame(summary[[c for c in SUMMARY_COLUMNS if c in summary.columns]],
                    f"invariances: retention = STIR(ft_l | pt_l) ({estimator} linear CKA, {images} images, {steps} steps)")
        typer.echo(f"figures: {', '.join(str(p) for p in paths if p.suffix == '.png')}")
        typer.echo(f"tables: {out}/shards/invariance*/ (query with `layerlab results {out}`)")
