"""`layerlab demo`: the whole toolkit end to end on the embedded digits data, offline, in minutes on a CPU.

Steps run in order; each is resumable (finished runs and shards are skipped), so a killed demo re-run
continues where it stopped. The demo's own steps (train the zoo, the TrAct study, the report) are registered here;
every analysis contributes its step ``(ctx) -> None`` through its contract (``demo=`` in
:mod:`layerlab.analysis`), in :data:`ORDER` or, for an analysis the order does not name, before the report.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from .registry import Registry
from .store import Store, job_key

DEMO_STEPS: Registry[Callable[["DemoContext"], None]] = Registry("demo step")
ORDER: list[str] = ["zoo", "criticality", "tract", "dynamics", "over-training", "invariance", "prune", "report"]


@dataclass
class DemoContext:
    out: Path
    device: str = "cpu"
    progress: bool = True
    zoo_table: pd.DataFrame | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def store(self) -> Store:
        return Store(self.out)

    @property
    def zoo_dir(self) -> Path:
        return self.out / "zoo"


def step(name: str):
    """Register a demo step (in ``ORDER``) under ``name``."""
    return DEMO_STEPS.register(name)


@step("zoo")
def train_demo_zoo(ctx: DemoContext) -> None:
    """Train the demo zoo (one ResNet, many training methods) and store its per-epoch metrics."""
    from . import runs
    from .train import load_zoo, train_zoo

    zoo = load_zoo("demo")
    ctx.zoo_table = train_zoo(zoo, ctx.zoo_dir, device=ctx.device, progress=ctx.progress)
    for e in zoo.entries:
        key = job_key(e.name, "training", {"zoo": "demo", "run": str(ctx.zoo_dir / e.name)})
        if not ctx.store.has("training", key):
            m = runs.run_metrics(ctx.zoo_dir / e.name).assign(model=e.name, recipe=e.recipe.name, category=e.attrs.get("category"))
            ctx.store.write("training", key, m, {"model": e.name, "recipe": e.recipe.to_dict()})


def demo_steps() -> dict[str, Callable[[DemoContext], None]]:
    """Every step in running order: the demo's own (here) and each analysis' (its contract's ``demo``)."""
    from .analysis import analyses, resolve

    steps = {name: DEMO_STEPS.get(name) for name in DEMO_STEPS.names()}
    steps.update({a.name: resolve(a.demo) for a in analyses() if a.demo is not None})
    order = [n for n in ORDER if n in steps]
    extra = [n for n in steps if n not in order]
    at = order.index("report") if "report" in order else len(order)
    return {n: steps[n] for n in order[:at] + extra + order[at:]}


def run_demo(out: str | Path = "layerlab-demo", *, steps: list[str] | None = None, device: str = "cpu",
             progress: bool = True) -> DemoContext:
    """Run the demo steps (all by default) into ``out`` and return the context with timings."""
    registered = demo_steps()
    ctx = DemoContext(Path(out), device=device, progress=progress)
    ctx.out.mkdir(parents=True, exist_ok=True)
    for name in steps or list(registered):
        if name not in registered:
            DEMO_STEPS.get(name)  # the usual unknown-name error, with the known steps
        fn = registered[name]
        t0 = time.time()
        print(f"== demo step: {name}", flush=True)
        fn(ctx)
        ctx.timings[name] = time.time() - t0
        print(f"   {name} done in {ctx.timings[name]:.1f} s", flush=True)
    return ctx


@step("tract")
def tract_vs_vanilla(ctx: DemoContext) -> None:
    """TrAct vs vanilla (SGD and Adam, 3 seeds) on a 500-image digits subset: accuracy-vs-epoch curves."""
    from . import tract_study
    from .plots.tract import plot_curves

    config = {"budgets": [6], "seeds": [0, 1, 2], "optimizers": ["sgd", "adam"], "train_n": 500, "lam": 0.1}
    key = job_key(tract_study.DEMO_ARCH, "tract", config)
    if not ctx.store.has("tract", key):
        curves = tract_study.epochs_to_accuracy(ctx.out / "tract-runs", budgets=config["budgets"], seeds=config["seeds"],
                                                optimizers=config["optimizers"], train_n=config["train_n"],
                                                lam=config["lam"], device=ctx.device, progress=ctx.progress)
        ctx.store.write("tract", key, curves, {"model": tract_study.DEMO_ARCH, "config": config})
    curves = ctx.store.read_shard("tract", key)
    plot_curves(curves, ctx.out / "figures" / "tract" / "tract_vs_vanilla")
    summary = tract_study.summarize(curves)
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


@step("over-training")
def criticality_over_training(ctx: DemoContext) -> None:
    """Criticality at the checkpoints of the training-dynamics runs, beside their CKA (needs the dynamics step)."""
    from .demos.criticality import over_training_step

    over_training_step(ctx)


@step("report")
def report_step(ctx: DemoContext) -> None:
    """Write OUT/report.html: every figure, table, config and version of the demo on one offline page."""
    from .report import write_report

    path = write_report(ctx.out)
    print(f"report: {path.resolve()}", flush=True)
