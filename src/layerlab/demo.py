"""`layerlab demo`: the whole toolkit end to end on the embedded digits data, offline, in minutes on a CPU.

Steps run in order; each is resumable (finished runs and shards are skipped), so a killed demo re-run
continues where it stopped. Every analysis contributes one step function ``(ctx) -> None``.
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
ORDER: list[str] = ["zoo", "criticality", "tract", "dynamics", "invariance", "report"]
# Analysis modules that register their own demo step (imported lazily: they import this module).
STEP_MODULES: list[str] = ["layerlab.dynamics", "layerlab.invariance", "layerlab.report"]


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


def run_demo(out: str | Path = "layerlab-demo", *, steps: list[str] | None = None, device: str = "cpu",
             progress: bool = True) -> DemoContext:
    """Run the demo steps (all by default) into ``out`` and return the context with timings."""
    import importlib

    for module in STEP_MODULES:
        importlib.import_module(module)
    ctx = DemoContext(Path(out), device=device, progress=progress)
    ctx.out.mkdir(parents=True, exist_ok=True)
    for name in steps or ORDER:
        fn = DEMO_STEPS.get(name)
        t0 = time.time()
        print(f"== demo step: {name}", flush=True)
        fn(ctx)
        ctx.timings[name] = time.time() - t0
        print(f"   {name} done in {ctx.timings[name]:.1f} s", flush=True)
    return ctx


@step("criticality")
def criticality_of_zoo(ctx: DemoContext) -> None:
    """Gavrikov et al.'s layer criticality for every zoo model (364 test images, 3 trials) and its figures."""
    from .criticality import demo_step

    attrs = pd.read_csv(ctx.zoo_dir / "zoo.csv")
    demo_step(ctx.zoo_dir, ctx.out, attrs, threads=1)
    summary = pd.read_csv(ctx.out / "criticality_summary.csv")
    avg = summary.groupby("model")["criticality"].mean().sort_values()
    print("average criticality (%):", ", ".join(f"{m} {v:.1f}" for m, v in avg.items()))


@step("tract")
def tract_vs_vanilla(ctx: DemoContext) -> None:
    """TrAct vs vanilla (SGD and Adam, 3 seeds) on a 500-image digits subset: accuracy-vs-epoch curves."""
    from . import tract_study

    config = {"budgets": [6], "seeds": [0, 1, 2], "optimizers": ["sgd", "adam"], "train_n": 500, "lam": 0.1}
    key = job_key(tract_study.DEMO_ARCH, "tract", config)
    if not ctx.store.has("tract", key):
        curves = tract_study.epochs_to_accuracy(ctx.out / "tract-runs", budgets=config["budgets"], seeds=config["seeds"],
                                                optimizers=config["optimizers"], train_n=config["train_n"],
                                                lam=config["lam"], device=ctx.device, progress=ctx.progress)
        ctx.store.write("tract", key, curves, {"model": tract_study.DEMO_ARCH, "config": config})
    curves = ctx.store.read_shard("tract", key)
    tract_study.plot_curves(curves, ctx.out / "figures" / "tract" / "tract_vs_vanilla")
    summary = tract_study.summarize(curves)
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
