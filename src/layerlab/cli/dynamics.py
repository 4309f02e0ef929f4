"""`layerlab dynamics RUN_DIR` (representations over training) and `layerlab compare SPEC_A SPEC_B` (layer x layer CKA)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from ._common import DEVICE_HELP, THREADS_HELP, check_out, print_frame, set_threads

if TYPE_CHECKING:
    import pandas as pd

LAYERS_HELP = ("module paths, layer labels ('[3.1] conv2'), 'blocks' (every residual/transformer block), 'layers' "
               "(every learnable layer) or 'kind:ClassName' (every module of that class); repeatable or comma-separated")
TOKENS_HELP = ("How a token output [N, T, D] (a ViT block) becomes CKA features: flatten (all tokens), cls (the class "
               "token, first in timm/torchvision ViTs) or mean (token average). Conv maps are unaffected.")


NULL_HELP = ("Is each CKA above chance at your N? --null 200: CKA of 200 row-shuffled pairings (image i of one side "
             "against a random image of the other, within each batch) shows what chance reaches; adds null_mean, "
             "null_high (95th percentile), p_value and distinguishable (p < 0.05). No extra forward pass. 0: off.")
IMAGES_HELP = ("Probe images (test split, at most its size), trimmed to whole batches. Default 256 because the CKA "
               "features of every image are held per layer (and checkpoint); criticality, cheaper per image, "
               "defaults to all.")
BATCH_HELP = ("Minibatch size of the CKA estimator: part of the estimate, not only memory. Default 64 because the "
              "default 256 images then give 4 minibatches to average; criticality and invariance use 128 (memory only).")
BOOTSTRAP_HELP = ("--bootstrap 200: a 95% interval (ci_low, ci_high) from 200 resamples of the probe batches with "
                  "replacement: how much the CKA would move with other images. Needs >= 2 batches (8+ is steadier: "
                  "lower --batch-size). 0: off.")


def _split_list(items: list[str]) -> list[str]:
    """['a,b', 'c'] -> ['a', 'b', 'c'] (repeatable and comma-separated both work)."""
    return [p.strip() for item in items for p in item.split(",") if p.strip()]


def register(app: typer.Typer) -> None:
    @app.command("dynamics")
    def dynamics_cmd(
        run: Path = typer.Argument(..., help="A training run folder (run.json + checkpoints/), e.g. from `layerlab train`."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder: shards/dynamics-*/ and figures/dynamics/<run>/. Re-running resumes."),
        data: Optional[str] = typer.Option(
            None, "--data", "-d", help="Data spec of the probe images; default the run's own, because its checkpoints "
            "are compared on the data they were trained for.",
        ),
        layers: list[str] = typer.Option([], "--layers", "-l", help=f"Layers: {LAYERS_HELP}. Default: the stem and every block; 'output' (the logits) is always added."),
        tokens: str = typer.Option("flatten", "--tokens", help=TOKENS_HELP + " Probes use the class token with cls, else the token mean."),
        epochs: list[str] = typer.Option([], "--epochs", help="Only these checkpoints (comma-separated epochs)."),
        max_checkpoints: Optional[int] = typer.Option(None, "--max-checkpoints", help="Keep at most this many checkpoints, log-spaced."),
        images: int = typer.Option(256, "--images", "-n", help=IMAGES_HELP),
        batch_size: int = typer.Option(64, "--batch-size", help=BATCH_HELP),
        triplets: int = typer.Option(500, "--triplets", help="Planes for decision-region similarity, each through three of the run's own training images (its train_n subset, noisy labels included)."),
        resolution: int = typer.Option(50, "--resolution", help="Grid points per plane axis."),
        probe_train: Optional[int] = typer.Option(1000, "--probe-train", help="Training images to fit the probes on."),
        probe_pool: int = typer.Option(2, "--probe-pool", help="Average-pool conv maps to s x s for the probes (0: flatten all)."),
        probe_iter: int = typer.Option(1000, "--probe-iter", help="Cap on a probe's L-BFGS iterations (it stops earlier once converged; a probe at the cap is recorded and warned about)."),
        regions: list[str] = typer.Option([], "--regions", help="Also plot decision regions at these epochs (comma-separated)."),
        null: int = typer.Option(0, "--null", help=NULL_HELP),
        bootstrap: int = typer.Option(0, "--bootstrap", help=BOOTSTRAP_HELP),
        seed: int = typer.Option(0, help="Seed of the probe images, triplets, shuffles and resamples."),
        device: str = typer.Option("cpu", help=DEVICE_HELP),
        threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    ) -> None:
        """How each layer's representation evolves over training (Sharon & Dar 2024).

        Checkpoint x checkpoint CKA, linear probes per checkpoint, and decision-region similarity of the probes and
        of the network.

        Example: layerlab dynamics runs/resnet-sgd --out dyn --layers layer1.1,layer2.1,layer3.1,layer4.1 --triplets 50 --resolution 30
        """
        check_out(out)

        from ..dynamics import decision_regions, dynamics
        from ..plots.dynamics import decision_regions as plot_regions
        from ..plots.dynamics import save_dynamics, save_figure
        from ..store import Store

        set_threads(threads)
        tables = dynamics(run, data, store=Store(out), device=device, progress=True, layers=_split_list(layers) or None,
                          epochs=[int(e) for e in _split_list(epochs)] or None, max_checkpoints=max_checkpoints,
                          images=images, batch_size=batch_size, triplets=triplets, resolution=resolution,
                          probe_train=probe_train, probe_pool=probe_pool, probe_iter=probe_iter, seed=seed, tokens=tokens,
                          null=null, bootstrap=bootstrap)
        fig_dir = out / "figures" / "dynamics" / run.name
        paths = save_dynamics(tables, fig_dir)
        if regions:
            r = decision_regions(run, data, epochs=[int(e) for e in _split_list(regions)], layers=_split_list(layers) or None,
                                 tokens=tokens, resolution=100, probe_train=probe_train, probe_pool=probe_pool, probe_iter=probe_iter,
                                 seed=seed, device=device)
            paths += save_figure(plot_regions(r["regions"], r["anchors"]), fig_dir, "dynamics_regions")
        cka = tables["cka"]
        summary = cka[cka["epoch_a"] != cka["epoch_b"]].groupby(["layer", "label"], sort=False)["cka"].agg(["min", "mean"])
        drs = tables["drs"]
        summary["drs_min"] = drs[drs["epoch_a"] != drs["epoch_b"]].groupby("layer", sort=False)["drs"].min()
        probes = tables["probes"]
        if not probes.empty:
            last = probes[probes["epoch"] == probes["epoch"].max()].set_index("layer")["test_acc"]
            summary["probe_test_acc_last"] = last
        print_frame(summary.reset_index().rename(columns={"min": "cka_min", "mean": "cka_mean"}),
                    f"{run.name}: {cka['estimator'].iloc[0]} minibatch CKA between checkpoints (off-diagonal)")
        _echo_chance(cka[cka["epoch_a"] < cka["epoch_b"]], "checkpoint pairs")
        typer.echo(f"figures: {', '.join(str(p) for p in paths if p.suffix == '.png')}")
        typer.echo(f"tables: layerlab results {out} --analysis dynamics-cka (also dynamics-probes, dynamics-drs, dynamics-triplets)")

    @app.command("compare")
    def compare_cmd(
        spec_a: str = typer.Argument(..., help="Model A spec: file:run/final.pt, timm:..., torchvision:..."),
        spec_b: str = typer.Argument(..., help="Model B spec."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder: shards/compare/ and figures/compare/."),
        data: str = typer.Option("digits", "--data", "-d", help="Data spec of the probe images."),
        layers_a: list[str] = typer.Option([], "--layers-a", help=f"Model A layers: {LAYERS_HELP}. Default: the stem and every block; 'output' is always added."),
        layers_b: list[str] = typer.Option([], "--layers-b", help="Model B layers (the same forms and default)."),
        tokens: str = typer.Option("flatten", "--tokens", help=TOKENS_HELP),
        images: int = typer.Option(256, "--images", "-n", help=IMAGES_HELP),
        batch_size: int = typer.Option(64, "--batch-size", help=BATCH_HELP),
        estimator: str = typer.Option(
            "unbiased", help="unbiased (minibatch HSIC_1) or biased (HSIC_0 per batch). Default unbiased because "
            "HSIC_0 is biased upwards on minibatches this small; invariance defaults to biased because STIR uses "
            "standard linear CKA over all its images.",
        ),
        null: int = typer.Option(0, "--null", help=NULL_HELP),
        bootstrap: int = typer.Option(0, "--bootstrap", help=BOOTSTRAP_HELP),
        seed: int = typer.Option(0, help="Seed of the probe images, shuffles and resamples."),
        device: str = typer.Option("cpu", help=DEVICE_HELP),
        threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    ) -> None:
        """Layer x layer CKA between two models on the same images: a heatmap and a table.

        Example: layerlab compare file:zoo/resnet-sgd/final.pt file:zoo/resnet-adam/final.pt --out cmp
        """
        check_out(out)

        from ..dynamics import compare
        from ..features import check_tokens
        from ..plots.dynamics import layer_heatmap, save_figure
        from ..store import Store, job_key, resumed

        set_threads(threads)
        config = {"data": data, "layers_a": _split_list(layers_a), "layers_b": _split_list(layers_b), "images": images,
                  "batch_size": batch_size, "estimator": estimator, "seed": seed}
        if check_tokens(tokens) != "flatten":  # only a non-default choice enters the key: earlier results stay valid
            config["tokens"] = tokens
        config |= {k: v for k, v in (("null", null), ("bootstrap", bootstrap)) if v}  # likewise
        store = Store(out)
        key = job_key(f"{spec_a} | {spec_b}", "compare", config)
        if store.has("compare", key):
            resumed(1, 1, out, unit="compare job")  # "1 of 1 compare job already done (in OUT); running 0"
        else:
            frame = compare(spec_a, spec_b, data, layers_a=config["layers_a"] or None, layers_b=config["layers_b"] or None,
                            tokens=tokens, images=images, batch_size=batch_size, estimator=estimator, seed=seed, device=device,
                            null=null, bootstrap=bootstrap)
            store.write("compare", key, frame, {"model": f"{spec_a} | {spec_b}", "config": config})
        frame = store.read_shard("compare", key)
        paths = save_figure(layer_heatmap(frame), out / "figures" / "compare", f"compare_{key}")
        wide = frame.pivot_table(index="label_a", columns="label_b", values="cka", sort=False).reset_index()
        print_frame(wide, f"{frame['estimator'].iloc[0]} minibatch CKA (rows: A, columns: B), n={int(frame['n'].iloc[0])}")
        _echo_chance(frame, "layer pairs")
        typer.echo(f"figure: {paths[0]}")


def _echo_chance(frame: "pd.DataFrame", what: str) -> None:
    """One line each on the null and the interval, when the table has them."""
    if "p_value" in frame:
        lost = frame[~frame["distinguishable"]]
        typer.echo(f"chance: {len(lost)} of {len(frame)} {what} indistinguishable from chance (p >= 0.05); "
                   f"shuffled pairings reach CKA {frame['null_high'].min():.3f}-{frame['null_high'].max():.3f} "
                   "(95th percentile)")
    if "ci_low" in frame:
        width = frame["ci_high"] - frame["ci_low"]
        typer.echo(f"95% bootstrap intervals over batches: width {width.min():.3f}-{width.max():.3f}")
