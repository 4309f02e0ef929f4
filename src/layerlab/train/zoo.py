"""Model zoos: one YAML file names the architecture, data and a recipe per model; each model is its own run.

::

    name: demo
    arch: timm:resnet18?channels=16,32,64,128
    data: digits
    seed: 0
    defaults: {epochs: 8, checkpoints: every}      # recipe fields and run options for every model
    models:
      baseline: {recipe: baseline}
      pgd-linf: {recipe: pgd-linf, eps: 0.0314, attrs: {budget: 8}}
      resnet-adam: {recipe: adam, arch: "timm:...", label_noise: 0.2}

Training a zoo trains every model whose run is not DONE (a killed zoo resumes, finished models are kept)
and writes ``OUT/zoo.csv``: one row per model with its recipe, category, attributes and accuracy.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .. import runs
from ..errors import SpecError
from ..specfiles import builtin_file, read_spec
from ..store import atomic_write_text, resumed
from .loop import train
from .recipes import CATEGORIES, Recipe, recipe

RUN_OPTIONS = ("arch", "data", "seed", "checkpoints", "train_n", "attrs", "recipe", "init", "trainable", "category")


@dataclass
class ZooEntry:
    """One model of a zoo, fully resolved."""

    name: str
    arch: str
    data: str
    recipe: Recipe
    seed: int = 0
    checkpoints: Any = "every"
    train_n: int | None = None
    init: str | None = None
    trainable: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Zoo:
    name: str
    entries: list[ZooEntry]
    source: str = ""


def builtin_zoo(name: str) -> Path:
    """Path of a zoo file shipped with layerlab (``demo``, ``dynamics``)."""
    return builtin_file("zoo", "zoos", name)


def load_zoo(path: str | Path) -> Zoo:
    """Parse a zoo file (or a built-in zoo name) into resolved entries; every error names the model and field."""
    p, doc = read_spec(path, "zoo", "zoos", shape="'models:' (name -> {recipe: ...})")
    models = doc.get("models")
    if not isinstance(models, dict) or not models:
        raise SpecError(f"zoo file {p} has no 'models:' mapping of name -> {{recipe: ...}}")
    defaults = dict(doc.get("defaults") or {})
    entries = []
    for name, spec in models.items():
        spec = {**defaults, **(spec or {})}
        opts = {k: spec.pop(k) for k in list(spec) if k in RUN_OPTIONS}
        rname = opts.get("recipe", "baseline")
        try:
            r = recipe(rname, **spec)
        except SpecError as e:
            raise SpecError(f"zoo {p.name}, model {name!r}: {e}") from None
        attrs = {"category": opts.get("category", CATEGORIES.get(rname, rname)), **(opts.get("attrs") or {})}
        arch, data = opts.get("arch", doc.get("arch")), opts.get("data", doc.get("data", "digits"))
        if not arch:
            raise SpecError(f"zoo {p.name}, model {name!r}: no 'arch' (set it at the top or per model)")
        entries.append(ZooEntry(str(name), arch, data, r, int(opts.get("seed", doc.get("seed", 0))),
                                opts.get("checkpoints", "every"), opts.get("train_n"), opts.get("init"),
                                opts.get("trainable"), attrs))
    return Zoo(str(doc.get("name", p.stem)), entries, str(p))


def train_entry(entry: ZooEntry, out: Path, *, device: str = "cpu", progress: bool = True) -> Path:
    """Train one zoo model into ``out/<name>`` (resumable; skipped when DONE)."""
    init = entry.init
    if init and not Path(init).is_absolute() and not (":" in init) and (out / init / "final.pt").exists():
        init = str(out / init / "final.pt")  # another model of this zoo, by name
    return train(entry.arch, entry.data, entry.recipe, out / entry.name, seed=entry.seed, checkpoints=entry.checkpoints,
                 device=device, train_n=entry.train_n, attrs=entry.attrs, progress=progress, init=init,
                 trainable=entry.trainable)


def train_zoo(zoo: Zoo | str | Path, out: str | Path, *, device: str = "cpu", progress: bool = True,
              only: list[str] | None = None) -> pd.DataFrame:
    """Train every model of a zoo into ``out`` and return (and write) its ``zoo.csv`` table."""
    zoo = zoo if isinstance(zoo, Zoo) else load_zoo(zoo)
    out = Path(out)
    chosen = [e for e in zoo.entries if not only or e.name in only]
    resumed(sum(runs.is_done(out / e.name) for e in chosen), len(chosen), out, unit="models", state="already trained",
            doing="training")
    for i, entry in enumerate(chosen, 1):
        if progress and not runs.is_done(out / entry.name):
            print(f"[{i}/{len(chosen)}] {entry.name}: {entry.recipe.name} on {entry.data}", flush=True)
        train_entry(entry, out, device=device, progress=progress)
    return zoo_table(zoo, out)


def zoo_table(zoo: Zoo, out: Path) -> pd.DataFrame:
    """One row per finished model: name, path, recipe, category, attributes, final accuracies."""
    rows = []
    for e in zoo.entries:
        run = out / e.name
        if not runs.is_done(run):
            continue
        m = runs.run_metrics(run)
        last = m.iloc[-1]
        rows.append({"model": e.name, "path": str(run / "final.pt"), "arch": e.arch, "data": e.data,
                     "recipe": e.recipe.name, **e.attrs, "epochs": e.recipe.epochs,
                     "train_acc": float(last["train_acc"]), "accuracy": float(last["test_acc"]),
                     "best_test_acc": float(m["test_acc"].max()), "seconds": float(m["seconds"].sum())})
    table = pd.DataFrame(rows)
    atomic_write_text(out / "zoo.csv", table.to_csv(index=False))
    return table


def entry_config(entry: ZooEntry) -> dict[str, Any]:
    """A JSON-able description of an entry (for sweep job keys)."""
    d = dataclasses.asdict(entry)
    d["recipe"] = entry.recipe.to_dict()
    return d
