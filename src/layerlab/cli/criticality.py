"""`layerlab criticality`: which layers a trained model uses (Gavrikov et al. 2024; Zhang et al. 2022;
Chatterji et al. 2020). A thin layer over :mod:`layerlab.criticality`."""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from ..errors import LayerlabError
from ._common import DEVICE_HELP, THREADS_HELP, check_out

if TYPE_CHECKING:
    import pandas as pd

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


def register(app: typer.Typer) -> None:
    @app.command("criticality")
    def criticality_cmd(
        specs: Optional[list[str]] = typer.Argument(
            None, help="Model specs, optionally named NAME=SPEC (e.g. baseline=file:zoo/baseline/final.pt). "
            "Default with --run: the run's final.pt."
        ),
        data: str = typer.Option("digits", "--data", "-d", help="Data spec: digits, cifar10:DIR, imagenet-val:DIR ..."),
        split: Optional[str] = typer.Option(
            None, help="Data split; default test, and train with --module because Chatterji et al. measure module "
            "criticality on the training data.",
        ),
        images: Optional[int] = typer.Option(
            None, "--images", "-n",
            help="A fixed seeded subset of this many images of --split; default all of them, because every layer "
            "and trial sees the same images and the interval narrows with more (dynamics and compare default to "
            "256, invariance to 128: per image they cost far more). --precision stops early per layer.",
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
            help="randomize (Gavrikov et al.; the default because it is the paper's measure), reinit or checkpoint "
            "(Zhang et al.; need --run); repeatable.",
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
        batch_size: int = typer.Option(
            128, "--batch-size", "-b", help="Images per forward pass: memory only (with --precision also where "
            "sampling stops). dynamics and compare default to 64 because there it is the CKA estimator's minibatch.",
        ),
        threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
        device: str = typer.Option("cpu", "--device", help=DEVICE_HELP + " On cuda: bf16 autocast and channels_last."),
        naive: bool = typer.Option(
            False, "--naive",
            help="Reference implementation: full forward per layer and trial.",
        ),
        seed: int = typer.Option(
            0, help="Base seed of the image subset, the fresh instances and the --module noise; each draw has its own "
            "stream (trial t: derive_seed('criticality/fresh', seed, t)), never a seed a model trains with.",
        ),
        precision: Optional[float] = typer.Option(
            None, "--precision",
            help="Adaptive sampling: stop adding images to a (model, layer, trial) once its 95% interval over "
            "images is narrower than +-P points (at most --images; a smaller --batch-size stops closer). "
            "Auxiliary layers settle after a batch or two.",
        ),
        shift: Optional[list[str]] = typer.Option(
            None, "--shift", "-s",
            help="Also measure under a distribution shift NAME:SEVERITY (repeatable or comma-separated): "
            "gaussian-noise, shot-noise, impulse-noise, gaussian-blur, contrast, brightness, saturate, jpeg, "
            "pixelate at severity 1-5 (ImageNet-C style), or pgd-linf:EPS / pgd-l2:EPS (eps in 1/255, PGD "
            "against each model). The clean images are always measured too.",
        ),
        over_training: bool = typer.Option(
            False, "--over-training",
            help="Re-randomise at every checkpoint of the run (--run, or each file:RUN/final.pt model's run; "
            "--checkpoint picks epochs): rows carry the epoch; writes criticality_settling.csv (the epoch each "
            "layer settles as critical or auxiliary).",
        ),
        attrs: Optional[Path] = typer.Option(
            None, "--attrs",
            help="CSV of per-model attributes for the figures (model, category, budget, accuracy).",
        ),
        baseline: str = typer.Option("baseline", help="Model (or --group-by method) the difference table and "
                                     "figure subtract; cells whose 95% interval excludes 0 are marked."),
        group_by: Optional[str] = typer.Option(
            None, "--group-by",
            help="Column of --attrs naming each model's training method (e.g. recipe): models of one method are "
            "its seeds, and differences between methods include the seed-to-seed spread.",
        ),
        threshold: float = typer.Option(
            50.0, "--threshold", help="Criticality (points) from which a layer counts as critical (settling over "
            "training, critical sets under shift); below it auxiliary.",
        ),
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
          layerlab criticality file:runs/base/final.pt --precision 1 --batch-size 32 --out out/adaptive
          layerlab criticality --run runs/base --over-training --out out/epochs
          layerlab criticality file:runs/base/final.pt --shift gaussian-noise:3 --shift pgd-linf:2 --out out/shift

        The summary holds a 95% bootstrap interval (ci_low, ci_high) over images and trials for every number;
        criticality_differences.csv the difference to --baseline with its interval.
        """
        check_out(out)
        if module:
            ignored = [flag for flag, given in (("--mode", bool(mode)), ("--trials", trials != 3), ("--naive", naive),
                                                ("--checkpoint", bool(checkpoint)), ("--precision", precision is not None),
                                                ("--shift", bool(shift)), ("--over-training", over_training)) if given]
            if ignored:
                raise LayerlabError(f"{', '.join(ignored)} do(es) not apply to --module (module criticality has no "
                                    "trials or reset modes); drop them or drop --module")
        if attrs is not None and not attrs.is_file():  # read only after the computation: check it now
            raise LayerlabError(f"--attrs {str(attrs)!r} does not exist; pass a CSV with a 'model' column")
        if group_by is not None and attrs is None:
            raise LayerlabError("--group-by names a column of --attrs; pass --attrs CSV with 'model' and that column")
        if precision is not None and precision <= 0:
            raise LayerlabError(f"--precision is a half-width in criticality points and must be > 0, got {precision}")
        if over_training and run is None and not specs:
            raise LayerlabError("--over-training analyses the checkpoints of a run; pass --run RUN_DIR")
        from ..shift import parse_shifts

        shifts = [str(s) for s in parse_shifts(_split_list(shift))]  # a typo fails now, not after an hour

        import pandas as pd

        from ..criticality import criticality, derive, module_criticality, network_criticality, write_tables
        from ..data import load_data
        from ._common import print_frame, set_threads

        set_threads(threads)
        named = parse_specs(specs or [])
        if not named:
            if run is None:
                raise LayerlabError("no model given; pass SPEC... (e.g. 'timm:resnet18?num_classes=10') or --run RUN_DIR")
            from ..criticality.driver import run_models

            named = run_models(run)
        if baseline != "baseline" and group_by is None and baseline not in named:  # a name given must exist
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
            extra = pd.read_csv(attrs) if attrs is not None else None
            groups = _groups(extra, group_by) if group_by else None
            table = criticality(
                named, images_data, layers=picked, trials=trials, mode=_split_list(mode) or "randomize", run=run,
                checkpoint=checkpoint or None, units=units, seed=seed, batch_size=batch_size, device=device,
                naive=naive, store=out, progress=progress, norm=norm, precision=precision, shift=shifts[1:] or None,
                over_training=over_training,
            )
            methods = set((groups or {}).get(m, m) for m in table["model"].unique())
            if baseline != "baseline" and baseline not in methods:
                raise LayerlabError(f"--baseline {baseline!r} is neither a model nor a method: {sorted(methods)}")
            derived = derive(table, baseline=baseline, groups=groups, threshold=threshold)
            paths = write_tables(table, out, derived=derived)
            if figures:
                from ..plots.criticality import save_all
                from ..plots.criticality_studies import save_studies

                diff = derived.get("differences")
                paths += save_all(derived["summary"], out, attrs=extra, baseline=baseline, differences=diff)
                paths += save_studies(derived["summary"], out, differences=diff, settling=derived.get("settling"),
                                      critical_sets=derived.get("critical_sets"), threshold=threshold)
            _print_summary(derived, print_frame, precision=precision, threshold=threshold,
                           n_images=len(table.attrs.get("indices", [])))
        typer.echo(f"wrote {len(paths)} files to {out}")


def _groups(attrs: "pd.DataFrame", column: str) -> dict[str, str]:
    """{model: method} from the --attrs column named by --group-by."""
    if "model" not in attrs.columns or column not in attrs.columns:
        raise LayerlabError(f"--group-by {column!r}: --attrs needs columns 'model' and {column!r}; it has "
                            f"{', '.join(map(str, attrs.columns))}")
    return {str(m): str(g) for m, g in zip(attrs["model"], attrs[column])}


def _print_summary(derived: dict[str, "pd.DataFrame"], print_frame, *, precision: float | None, threshold: float,
                   n_images: int) -> None:
    """The summary the user reads first: per layer the criticality with its interval, and per study its verdict
    (the tables of :func:`layerlab.criticality.derive`)."""
    summary = derived["summary"]
    varied = [c for c in ("mode", "epoch", "shift") if c in summary.columns
              and summary[c].astype(str).nunique() > 1]
    cols = ["model", *varied, "label", "criticality", "ci_low", "ci_high", "std",
            *(["images"] if precision is not None else []), "accuracy"]
    print_frame(summary[cols], "layer criticality [%] (mean over trials; 95% bootstrap interval over images and "
                "trials; std over trials, ddof=1)")
    if precision is not None:
        used, fixed = int(summary["images"].sum()), n_images * len(summary)
        typer.echo(f"adaptive sampling (+-{precision:g} points): {used} image evaluations per trial over all layers, "
                   f"{fixed} at a fixed N = {n_images} ({fixed / max(used, 1):.1f}x fewer)")
    if "settling" in derived:
        cols = ["model", "label", "final", "settled_epoch", "final_criticality"]
        print_frame(derived["settling"][cols], f"over training: where each layer settles (critical: >= {threshold:g}%)")
    if "critical_sets" in derived:
        cols = ["model", "shift", "critical", "jaccard", "gained", "lost"]
        print_frame(derived["critical_sets"][cols], f"under shift: the critical set (>= {threshold:g}%) vs clean")
