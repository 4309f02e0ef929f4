"""The demo's side of training dynamics (Sharon & Dar 2024, arXiv 2405.17377): train the ``dynamics`` zoo, run the
analysis on every run, draw its figures and a decision-region figure, and print what to read off them, in one step,
the ``demo`` of its contract (layerlab/analyses/dynamics.py). Imports the analysis and its figures; the analysis
imports neither."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from .. import runs, structure
from ..demo import DemoContext
from ..dynamics import decision_regions, default_layers, dynamics, fit_summary, phase_table
from ..features import OUTPUT_KEY
from ..models import load_model

__all__ = ["DEMO_OPTIONS", "demo_layers", "dynamics_step"]

#: analysis settings of the demo step: small enough for a 2-core CPU, the same code path as the full study
DEMO_OPTIONS: dict[str, Any] = {"images": 256, "batch_size": 64, "triplets": 16, "resolution": 20,
                                "probe_train": 500,  # probes: the library's L-BFGS defaults (run to convergence)
                                "null": 200, "bootstrap": 200}  # CKA: chance level and 95% interval per pair


def demo_layers(model: nn.Module, count: int = 4) -> list[str]:
    """About ``count`` blocks spread over the depth: the last block of each ResNet stage, or evenly spaced ViT blocks."""
    blocks = structure.find_blocks(model) or default_layers(model)
    stages: dict[str, str] = {}
    for b in blocks:
        stages[b.rsplit(".", 1)[0]] = b  # keeps the last block of each stage
    picked = list(stages.values()) if len(stages) > 1 else blocks
    if len(picked) > count:
        picked = [picked[int(i)] for i in np.round(np.linspace(0, len(picked) - 1, count))]
    return picked


def _first_checkpoint(run: Path) -> nn.Module:
    """The run's first checkpoint on the CPU, in eval mode (to pick its layers)."""
    return load_model(f"file:{runs.checkpoints(run)[0][1]}", device="cpu").eval()


def dynamics_step(ctx: DemoContext) -> None:
    """Sharon & Dar at small scale: ResNet and ViT, SGD and Adam, 20% label noise, trained past 100% train
    accuracy; CKA, probe accuracy and decision-region similarity over training, four runs side by side."""
    from ..plots.dynamics import decision_regions as plot_regions
    from ..plots.dynamics import save_dynamics, save_figure
    from ..train import load_zoo, train_zoo

    zoo = load_zoo("dynamics")
    zoo_dir = ctx.out / "dynamics-zoo"
    train_zoo(zoo, zoo_dir, device=ctx.device, progress=ctx.progress)
    parts = []
    for entry in zoo.entries:
        run = zoo_dir / entry.name
        layers = demo_layers(_first_checkpoint(run))
        parts.append(dynamics(run, store=ctx.store, device=ctx.device, layers=layers, **DEMO_OPTIONS))
    tables = {k: pd.concat([p[k] for p in parts], ignore_index=True) for k in parts[0]}
    fig_dir = ctx.out / "figures" / "dynamics"
    paths = save_dynamics(tables, fig_dir)
    first = zoo.entries[0].name
    ckpt_epochs = [e for e, _ in runs.checkpoints(zoo_dir / first)]
    fit = tables["training"].loc[tables["training"]["run"] == first, "first_fit_epoch"].iloc[0]
    middle = min(ckpt_epochs, key=lambda e: abs(e - fit)) if pd.notna(fit) else ckpt_epochs[len(ckpt_epochs) // 2]
    shown = sorted({ckpt_epochs[0], ckpt_epochs[2], ckpt_epochs[len(ckpt_epochs) // 2], middle, ckpt_epochs[-1]})
    layers = demo_layers(_first_checkpoint(zoo_dir / first))
    r = decision_regions(zoo_dir / first, epochs=shown, layers=layers, resolution=50,
                         probe_train=DEMO_OPTIONS["probe_train"], device=ctx.device)
    paths += save_figure(plot_regions(r["regions"], r["anchors"]), fig_dir, f"dynamics_regions_{first}")
    cka = tables["cka"]
    off = cka[(cka["epoch_a"] == cka.groupby("run")["epoch_a"].transform("min")) &
              (cka["epoch_b"] == cka.groupby("run")["epoch_b"].transform("max"))]
    summary = off.pivot_table(index="run", columns="label", values="cka", sort=False)
    print("CKA(first checkpoint, last checkpoint) per layer (unbiased minibatch, linear):")
    print(summary.to_string(float_format=lambda v: f"{v:.2f}"))
    pairs = cka[cka["epoch_a"] < cka["epoch_b"]]
    print(f"checkpoint pairs whose CKA is indistinguishable from chance (200 row shuffles, p >= 0.05): "
          f"{int((~pairs['distinguishable'].astype(bool)).sum())} of {len(pairs)}; chance reaches "
          f"{pairs['null_high'].min():.2f}-{pairs['null_high'].max():.2f} at these 256 images; 95% intervals "
          f"(batches resampled) {(pairs['ci_high'] - pairs['ci_low']).median():.2f} wide in the median")
    fits = fit_summary(tables["training"], {e.name: [c for c, _ in runs.checkpoints(zoo_dir / e.name)]
                                             for e in zoo.entries})
    print("the fit (first epoch of 100% training accuracy on the labels trained with) and what follows it:")
    print(fits.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    phases = phase_table(cka[cka["layer"] != OUTPUT_KEY])
    print("phase contrast of the layers' CKA matrices (2 blocks; within - across, mean [min, max] over layers):")
    print(", ".join(f"{r} {g.mean():.2f} [{g.min():.2f}, {g.max():.2f}]"
                    for r, g in phases.groupby("run", sort=False)["contrast"]))
    anchors = pd.concat([p["triplets"] for p in parts], ignore_index=True)
    print(f"decision-region planes: {len(anchors)} anchors, all from the runs' own training sets "
          f"({int(anchors['noisy'].sum())} with a noisy training label)")
    print(f"figures: {fig_dir} ({len(paths)} files)")
