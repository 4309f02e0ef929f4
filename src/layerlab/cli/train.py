"""`layerlab train`, `layerlab zoo train|show`, `layerlab recipes`, `layerlab layers`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import DEVICE_HELP, THREADS_HELP, check_out, parse_overrides, print_frame, set_threads


def _print(renderable: object) -> None:
    """Print text or a rich table (rich is imported only when a command prints, not for --help)."""
    from rich.console import Console

    Console().print(renderable)


def _finished(out: Path) -> bool:
    """Whether ``out`` holds a finished run (then ``train`` checks it is this run and trains nothing)."""
    from ..runs import is_done

    return is_done(out)


def _say_finished(finished: bool, out: Path) -> None:
    """A re-run of a finished run says so instead of silently showing its old metrics (a partly trained run says
    how many epochs it resumes after, from :func:`layerlab.train.train`)."""
    if finished:
        typer.echo(f"{out} is already trained (it holds DONE): nothing to train; its metrics:", err=True)


def register(app: typer.Typer) -> None:
    zoo_app = typer.Typer(
        help="Train and inspect model zoos: one architecture, many training methods.\n\n"
             "Example: layerlab zoo train demo --out zoo --only baseline --only adam",
        no_args_is_help=True,
    )
    app.add_typer(zoo_app, name="zoo")

    @app.command("train")
    def train_cmd(
        arch: str = typer.Argument(..., help="Architecture spec, e.g. 'timm:resnet18?channels=16,32,64,128'."),
        data: str = typer.Option("digits", "--data", "-d", help="Data spec: digits, cifar10:DIR, imagefolder:DIR ..."),
        out: Path = typer.Option(..., "--out", "-o", help="Run folder: checkpoints/, metrics.csv, final.pt. Re-running resumes."),
        recipe: str = typer.Option("baseline", "--recipe", "-r", help="Named recipe; list them with `layerlab recipes`."),
        epochs: Optional[int] = typer.Option(None, help="Override the recipe's epoch count."),
        lr: Optional[float] = typer.Option(None, help="Override the recipe's learning rate."),
        tract: Optional[float] = typer.Option(None, "--tract", help="Train the first layer with TrAct at this lambda (e.g. 0.1)."),
        set_: list[str] = typer.Option([], "--set", help="Any recipe field, FIELD=VALUE (repeatable), e.g. --set label_noise=0.2."),
        checkpoints: str = typer.Option(
            "every", help="Checkpoint schedule: every, log (0,1,2,4,...), final, or epochs such as 1,5,10 (epoch 0 "
            "and the last are always kept).",
        ),
        seed: int = typer.Option(0, help="Seed for init, data order, augmentation and label noise."),
        train_n: Optional[int] = typer.Option(None, help="Train on a fixed seeded subset of this many images."),
        init: Optional[str] = typer.Option(None, help="Start from this checkpoint (finetuning)."),
        device: str = typer.Option("cpu", help=DEVICE_HELP + " On cuda: bf16 autocast and channels_last."),
        threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    ) -> None:
        """Train one model with one recipe, checkpointing on a schedule; a killed run resumes from its last epoch.

        Example: layerlab train 'timm:resnet18?channels=16,32,64,128' --data digits --out runs/base --epochs 8
        """
        check_out(out, role="run")

        from ..train import recipe as make_recipe
        from ..train import train

        set_threads(threads)
        over = parse_overrides(set_)
        for k, v in (("epochs", epochs), ("lr", lr), ("tract", tract)):
            if v is not None:
                over[k] = v
        r = make_recipe(recipe, **over)
        finished = _finished(out)
        run = train(arch, data, r, out, seed=seed, checkpoints=checkpoints, device=device, train_n=train_n, init=init)
        _say_finished(finished, out)
        from ..runs import run_metrics

        m = run_metrics(run)
        print_frame(m[["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"]], f"{run}")
        _print(f"final test accuracy {m['test_acc'].iloc[-1]:.4f}; model: file:{run / 'final.pt'}")

    @app.command("finetune")
    def finetune_cmd(
        spec: str = typer.Argument(..., help="Pretrained model: a checkpoint path or file:PATH."),
        data: str = typer.Option(
            ..., "--data", "-d", help="Downstream data spec (e.g. 'digits?classes=5-9' or imagefolder:DIR); required "
            "because finetuning is for a task the pretrained model was not trained on.",
        ),
        out: Path = typer.Option(..., "--out", "-o", help="Run folder for the finetuned model."),
        mode: str = typer.Option(
            "full", help="What trains: full (all layers) or linear (linear probing: only the re-made head). Not "
            "criticality's --mode; default full because linear probing leaves every layer but the head, and so "
            "all that the analyses measure, unchanged.",
        ),
        recipe: str = typer.Option(
            "baseline", "--recipe", "-r", help="Named training recipe (optimizer, schedule, augmentation); list them "
            "with `layerlab recipes`.",
        ),
        epochs: Optional[int] = typer.Option(None, help="Override the recipe's epoch count."),
        lr: Optional[float] = typer.Option(None, help="Override the recipe's learning rate."),
        seed: int = typer.Option(0, help="Seed for the new head's init, data order, augmentation and label noise."),
        device: str = typer.Option("cpu", help=DEVICE_HELP),
        threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    ) -> None:
        """Finetune a pretrained checkpoint on new data: full finetuning or linear probing; the head is re-made.

        Example: layerlab finetune runs/base/final.pt --data 'digits?classes=5-9' --out runs/ft --mode linear --epochs 4
        """
        check_out(out, role="run")

        from ..models import read_checkpoint_meta
        from ..train import recipe as make_recipe
        from ..train import train

        path = spec.removeprefix("file:")
        if not Path(path).exists():
            from ..errors import LayerlabError

            raise LayerlabError(f"pretrained checkpoint {path!r} does not exist; pass a file made by `layerlab train`")
        arch = read_checkpoint_meta(path)["arch"]
        over = {k: v for k, v in (("epochs", epochs), ("lr", lr)) if v is not None}
        if mode not in ("full", "linear"):
            from ..errors import LayerlabError

            raise LayerlabError(f"--mode must be 'full' or 'linear', got {mode!r}")
        set_threads(threads)
        finished = _finished(out)
        run = train(arch, data, make_recipe(recipe, **over), out, seed=seed, device=device, init=path,
                    trainable="head" if mode == "linear" else None)
        _say_finished(finished, out)
        from ..runs import run_metrics

        _print(f"finetuned test accuracy {run_metrics(run)['test_acc'].iloc[-1]:.4f}; model: file:{run / 'final.pt'}")

    @zoo_app.command("train")
    def zoo_train(
        zoo: str = typer.Argument("demo", help="Zoo YAML file or a built-in zoo name (demo, dynamics)."),
        out: Path = typer.Option(..., "--out", "-o", help="Zoo folder: one run folder per model, and zoo.csv."),
        only: list[str] = typer.Option([], help="Train only these models of the zoo (repeatable; default all)."),
        device: str = typer.Option("cpu", help=DEVICE_HELP),
        threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    ) -> None:
        """Train every model of a zoo; finished models are skipped, a killed one resumes from its last epoch.

        A re-run first says how many models are already trained.

        Example: layerlab zoo train demo --out zoo --only baseline --only adam
        """
        check_out(out, role=None)  # a zoo folder holds run folders

        from ..train import train_zoo

        set_threads(threads)
        table = train_zoo(zoo, out, device=device, only=only or None)
        print_frame(table[["model", "recipe", "category", "train_acc", "accuracy", "seconds"]], f"zoo {out}")

    @zoo_app.command("show")
    def zoo_show(zoo: str = typer.Argument("demo", help="Zoo YAML file or a built-in zoo name (demo, dynamics).")) -> None:
        """Print the models of a zoo file with their resolved recipes.

        Example: layerlab zoo show dynamics
        """
        from ..train import load_zoo

        z = load_zoo(zoo)
        from rich.table import Table

        t = Table(title=f"zoo {z.name} ({z.source})")
        for c in ("model", "recipe", "arch", "data", "epochs", "differs from baseline"):
            t.add_column(c)
        from ..train import Recipe

        base = Recipe().to_dict()
        for e in z.entries:
            diff = {k: v for k, v in e.recipe.to_dict().items() if base.get(k) != v and k != "name"}
            t.add_row(e.name, e.recipe.name, e.arch, e.data, str(e.recipe.epochs), ", ".join(f"{k}={v}" for k, v in diff.items()))
        _print(t)

    @app.command("recipes")
    def recipes_cmd() -> None:
        """List the named training recipes and what each changes relative to 'baseline'.

        Example: layerlab recipes
        """
        from ..train import CATEGORIES, RECIPES, Recipe

        from rich.table import Table

        base = Recipe().to_dict()
        t = Table(title="training recipes")
        for c in ("recipe", "category", "changes"):
            t.add_column(c)
        for name in RECIPES:
            r = RECIPES.get(name)().to_dict()
            t.add_row(name, CATEGORIES.get(name, ""), ", ".join(f"{k}={v}" for k, v in r.items() if base[k] != v and k != "name"))
        _print(t)

    @app.command("layers")
    def layers_cmd(
        spec: str = typer.Argument(..., help="Model spec, e.g. timm:resnet18 or file:run/final.pt."),
        norm: bool = typer.Option(False, "--norm", help="Also list normalisation layers (criticality --norm units)."),
    ) -> None:
        """List a model's learnable layers: the names and labels every analysis takes in --layers.

        Learnable layers are Conv2d, Linear and attention in_proj. With --norm also the normalisation layers (the
        paper never re-randomises them).

        Example: layerlab layers 'timm:vit_tiny_patch16_224?img_size=32&patch_size=4&num_classes=10'
        """
        import pandas as pd

        from .. import list_layers, load_model

        print_frame(pd.DataFrame([vars(i) for i in list_layers(load_model(spec), norm=norm)]), spec)
