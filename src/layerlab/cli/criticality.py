"""`layerlab criticality`: which layers a trained model uses (Gavrikov et al. 2024; Zhang et al. 2022;
Chatterji et al. 2020). A thin layer over :mod:`layerlab.criticality`."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from ..errors import LayerlabError
from ._common import check_out

_NAMED = re.compile(r"^([A-Za-z0-9_.\-]+)=(.+)$")


def parse_specs(specs: list[str]) -> dict[str, str]:
    """['baseline=file:zoo/b/final.pt', 'timm:resnet18?num_classes=10'] -> {name: spec} (name = spec if unnamed)."""
    out: dict[str, str] = {}
    for s in specs:
        m = _NAMED.match(s)
        name, spec = (m.group(1), m.group(2)) if m and ":" not in m.group(1) else (s, s)
        if name in out:
            raise LayerlabError(f"model {name!r} is given twice; name them apart with NAME=SPEC")
        out[name] = spec
    return out


def _split_list(items: list[str] | None) -> list[str]:
    return [p.strip() for item in items or [] for p in item.split(",") if p.strip()]


def _default_model(run: Path) -> str:
    """The trained model of a run: final.pt, else its last checkpoint."""
    from ..runs import checkpoints

    if (run / "final.pt").exists():
        return "file:" + str(run / "final.pt")
    found = checkpoints(run)
    if not found:
        raise LayerlabError(f"run {str(run)!r} has neither final.pt nor checkpoints; pass the model SPEC explicitly")
    return "file:" + str(found[-1][1])


def register(app: typer.Typer) -> None:
    @app.command("criticality")
    def criticality_cmd(
        specs: Optional[list[str]] = typer.Argument(
            None, help="Model specs, optionally named NAME=SPEC (e.g. baseline=file:zoo/baseline/final.pt). "
            "Default with --run: the run's final.pt."
        ),
        data: str = typer.Option("digits", "--data", "-d", help="Data spec: digits, cifar10:DIR, imagenet-val:DIR ..."),
        split: Optional[str] = typer.Option(
            None, help="Data split; default test, and train with --module (Chatterji et al. measure on training data).",
        ),
        images: Optional[int] = typer.Option(
            None, "--images", "-n",
            help="A fixed seeded subset of this many images (default all).",
        ),
        trials: int = typer.Option(
            3, "--trials", "-t",
            help="Fresh instances per layer (randomize mode; the paper uses 3).",
        ),
        out: Path = typer.Option(
            ..., "--out", "-o",
            help="Output folder: tables, figures and the resumable shard store.",
        ),
        layers: Optional[list[str]] = typer.Option(
            None, "--layers", "-l",
            help="Layer names or labels (repeatable or comma-separated); default all.",
        ),
        mode: Optional[list[str]] = typer.Option(
            None, "--mode", "-m",
            help="randomize (default), reinit or checkpoint; repeatable.",
        ),
        run: Optional[Path] = typer.Option(
            None, "--run",
            help="Training run folder (run.json + checkpoints/) for reinit/checkpoint/--module.",
        ),
        checkpoint: Optional[list[int]] = typer.Option(
            None, "--checkpoint",
            help="Checkpoint epoch(s) for --mode checkpoint (default: all).",
        ),
        units: str = typer.Option(
            "layers", "--units",
            help="layers, or blocks (reset every layer of a residual block together).",
        ),
        norm: bool = typer.Option(
            False, "--norm",
            help="Also reset normalisation layers (BatchNorm/LayerNorm/GroupNorm affine weight and bias; running "
            "statistics kept). An extension: the paper randomises Conv2d/Linear only.",
        ),
        module: bool = typer.Option(
            False, "--module",
            help="Chatterji et al. module criticality instead (needs --run).",
        ),
        eps_factor: float = typer.Option(1.01, "--eps-factor", help="--module: epsilon = this x the trained loss."),
        batch_size: int = typer.Option(128, "--batch-size", "-b", help="Images per forward pass (memory only)."),
        threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's own)."),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda (cuda: bf16 autocast and channels_last)."),
        naive: bool = typer.Option(
            False, "--naive",
            help="Reference implementation: full forward per layer and trial.",
        ),
        seed: int = typer.Option(
            0, help="Base seed of the image subset, the fresh instances and the --module noise; each draw has its own "
            "stream (trial t: derive_seed('criticality/fresh', seed, t)), never a seed a model trains with.",
        ),
        attrs: Optional[Path] = typer.Option(
            None, "--attrs",
            help="CSV of per-model attributes for the figures (model, category, budget, accuracy).",
        ),
        baseline: str = typer.Option("baseline", help="Model the difference figure subtracts."),
        figures: bool = typer.Option(True, "--figures/--no-figures", help="Write PNG/SVG figures."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    ) -> None:
        """Re-randomise each layer and measure how far the softmax output moves: 100 * (1 - mean cosine).

        Writes OUT/criticality.parquet and .csv (one row per model, layer, trial), criticality_summary.csv
        (mean, std, sem per model and layer), criticality_images.csv (the image indices) and figures.
        Finished (model, layer, trial) jobs are kept in OUT/shards and never recomputed. With --module: Chatterji
        et al.'s module criticality instead (module_criticality.csv: mu, alpha, sigma per unit;
        module_criticality_summary.csv: the network criticality).

        Examples:
          layerlab criticality file:runs/base/final.pt --data digits --trials 3 --out out/crit
          layerlab criticality --run runs/base --mode randomize --mode reinit --out out/zhang
          layerlab criticality --run runs/base --module --images 256 --layers conv1,fc --out out/module
          layerlab criticality file:runs/base/final.pt --norm --layers bn1,layer3.0.bn2 --out out/norms
        """
        check_out(out)
        if module:
            ignored = [flag for flag, given in (("--mode", bool(mode)), ("--trials", trials != 3), ("--naive", naive),
                                                ("--checkpoint", bool(checkpoint))) if given]
            if ignored:
                raise LayerlabError(f"{', '.join(ignored)} do(es) not apply to --module (module criticality has no "
                                    "trials or reset modes); drop them or drop --module")
        if attrs is not None and not attrs.is_file():  # read only after the computation: check it now
            raise LayerlabError(f"--attrs {str(attrs)!r} does not exist; pass a CSV with a 'model' column")

        import pandas as pd

        from ..criticality import criticality, module_criticality, network_criticality, summarize, write_tables
        from ..data import load_data
        from ._common import print_frame, set_threads

        set_threads(threads)
        named = parse_specs(specs or [])
        if not named:
            if run is None:
                raise LayerlabError("no model given; pass SPEC... (e.g. 'timm:resnet18?num_classes=10') or --run RUN_DIR")
            named = {run.name: _default_model(run)}
        if baseline != "baseline" and baseline not in named:  # the default may be absent; a name given must exist
            raise LayerlabError(f"--baseline {baseline!r} is not one of the models ({', '.join(named)}); name one of them")
        picked = _split_list(layers) or None
        images_data = load_data(data, split or ("train" if module else "test"), images, seed)
        if module:
            table = module_criticality(
                named, images_data, run=run, layers=picked, units=units, seed=seed, eps_factor=eps_factor,
                batch_size=batch_size, device=device, store=out, progress=progress, norm=norm,
            )
            paths = write_tables(table, out, prefix="module_criticality")
            cols = ["model", "label", "criticality", "alpha", "sigma", "distance", "expected_loss", "epsilon"]
            print_frame(table[cols], "module criticality (Chatterji et al. 2020): mu = alpha^2 distance / sigma^2")
            print_frame(network_criticality(table), "network criticality: sum of mu_i")
        else:
            table = criticality(
                named, images_data, layers=picked, trials=trials, mode=_split_list(mode) or "randomize", run=run,
                checkpoint=checkpoint or None, units=units, seed=seed, batch_size=batch_size, device=device,
                naive=naive, store=out, progress=progress, norm=norm,
            )
            paths = write_tables(table, out)
            summary = summarize(table)
            if figures:
                from ..plots.criticality import save_all

                extra = None
                if attrs is not None:
                    extra = pd.read_csv(attrs)
                paths += save_all(summary, out, attrs=extra, baseline=baseline)
            varied = summary[["mode", "epoch"]].astype(str).drop_duplicates().shape[0] > 1
            cols = ["model", *(["mode", "epoch"] if varied else []), "label", "criticality", "std", "accuracy"]
            print_frame(summary[cols], "layer criticality [%] (mean over trials; std ddof=1)")
        typer.echo(f"wrote {len(paths)} files to {out}")
