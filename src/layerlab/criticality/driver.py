"""Layer criticality, the analysis: :func:`criticality` walks models, units and references, reads finished jobs
from the store, computes the others with the engine and writes them shard by shard. Re-randomisation after
Gavrikov, Agnihotri, Keuper, Keuper 2024 (arXiv 2410.14470); resets to init or a checkpoint after Zhang, Bengio,
Singer 2022."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from .. import structure
from ..data import Batches, DataLike, as_batches
from ..errors import LayerlabError
from ..models import load_model
from ..runtime import eval_mode, model_fingerprint
from ..store import Store, job_key
from .engine import _evaluate, _Task
from .jobs import ANALYSIS, VERSION, ModelLike, _device, _named_models, _progress, _run_for
from .metrics import _stats_compute
from .pipeline import Pipeline
from .references import (
    Reference, _bind_fresh, _fresh_for, _modes, _overrides, _ReferenceCache, _references,
    _refuse_fresh_equal_to_init, _warn_if_not_fresh, _what, known_run,
)
from .tables import _rows_frame
from .units import Unit, _norm_params, _unit_key, units_of

__all__ = ["criticality"]


def criticality(
    models: ModelLike | Sequence[ModelLike] | Mapping[str, ModelLike],
    data: DataLike = "digits",
    *,
    layers: Sequence[str] | None = None,
    trials: int = 3,
    mode: str | Sequence[str] = "randomize",
    run: str | Path | Mapping[str, str | Path] | None = None,
    checkpoint: int | Sequence[int] | None = None,
    units: str = "layers",
    images: int | None = None,
    split: str = "test",
    seed: int = 0,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    channels_last: bool | None = None,
    naive: bool = False,
    store: Store | str | Path | None = None,
    progress: bool = False,
    cache_mb: int = 2048,
    fresh: Callable[[], nn.Module] | Mapping[str, Callable[[], nn.Module]] | None = None,
    norm: bool = False,
) -> pd.DataFrame:
    """Layer criticality of one model or a zoo: one row per (model, layer, mode, epoch, trial).

    Args:
        models: a spec (``timm:resnet18``), a model, a list of them, or ``{name: spec or model}`` (zoo sweep).
        data: a data spec (``digits``), an :class:`ImageData`, a tensor, an ``(images, labels)`` pair of tensors or
            arrays, a torch ``Dataset`` or a ``DataLoader`` (:func:`layerlab.data.as_batches`). Spec data is fed in
            [0, 1] (the model wrapper normalises); the user's own images as given (only uint8 is divided by 255).
            ``images``/``seed`` pick a fixed seeded subset of indexable data; of a DataLoader ``images=N`` takes the
            first N images it yields, and its batches are its own (``batch_size`` does not apply). Data that does
            not fit the cache (``cache_mb``) is streamed: a DataLoader is read once per chunk, never held whole.
        layers: layer names or labels (block names with ``units="blocks"``); default all.
        trials: fresh instances per layer in ``randomize`` mode; trial t is built under
            ``derive_seed("criticality/fresh", seed, t)`` (column ``draw_seed``), never under a training seed.
        mode: ``randomize`` (Gavrikov et al.), ``reinit`` or ``checkpoint`` (Zhang et al.; need ``run``), or a list.
        checkpoint: the epochs ``checkpoint`` mode resets to (default: every checkpoint of the run).
        store: a :class:`Store` (or its root): one shard per (model, layer, reference) job, finished jobs are read,
            never recomputed.
        naive: run the reference implementation (full forward per layer and trial) instead of the cached one.
        cache_mb: memory for the cached stage inputs; beyond it images are processed in chunks.
        fresh: where ``randomize`` draws fresh instances: a zero-argument callable returning a new, untrained
            instance of the architecture (the paper's "fresh instance"), or ``{model name: callable}`` for a zoo.
            Without it: the model's spec or layerlab checkpoint, else its timm/torchvision constructor when that
            rebuilds it exactly, else each layer's own ``reset_parameters()`` (with a warning);
            :func:`layerlab.models.fresh_source`. Every source draws trial t under ``draw_seed``.
        norm: also measure normalisation layers (BatchNorm, LayerNorm, GroupNorm, ...; labels like ``[3.1] bn1``),
            an opt-in extension: the paper re-randomises Conv2d/Linear only. A norm layer's affine weight and bias
            are swapped (``randomize``: the fresh instance's, i.e. the architecture's init, usually 1 and 0;
            ``reinit``/``checkpoint``: the run's), its running statistics stay the trained model's. With
            ``units="blocks"`` a block's norms are reset with its layers.

    Columns: model, layer, label, kind, index, units, mode, epoch, trial, seed, draw_seed, fresh_source (where trial
    t's fresh weights came from: callable, spec, timm, torchvision or reset_parameters; empty for reinit/checkpoint),
    similarity, criticality (%), agreement, accuracy, kl, base_accuracy, images. ``table.attrs`` holds the image
    indices and, under ``"fresh"``, each model's fresh-instance source in words.
    """
    if not isinstance(trials, int) or trials < 1:
        raise LayerlabError(f"trials must be a positive integer (the paper uses 3), got {trials!r}")
    if batch_size < 1:
        raise LayerlabError(f"batch_size must be positive, got {batch_size}")
    modes = _modes(mode)
    named = _named_models(models)
    dev = _device(device, named)
    amp = dev.type == "cuda" if amp is None else amp
    channels_last = dev.type == "cuda" if channels_last is None else channels_last
    if isinstance(fresh, Mapping) and (unknown := sorted(set(fresh) - set(named))):
        raise LayerlabError(f"fresh= names models that are not analysed: {unknown}; the models are {list(named)}")
    data = as_batches(data, batch_size, images=images, seed=seed, split=split, arg="images=")
    epochs = [checkpoint] if isinstance(checkpoint, int) else checkpoint
    st = Store(store) if isinstance(store, (str, Path)) else store
    job = _Job(data=data, data_key=data.fingerprint() if st is not None else "", units=units, layers=layers,
               store=st, precision="bf16" if amp else "fp32", norm=norm)
    rows: list[dict[str, Any]] = []
    sources: dict[str, str] = {}
    bar = _progress(0, progress, "criticality")
    try:
        for name, spec in named.items():
            model = load_model(spec) if isinstance(spec, str) else spec
            run_dir = known_run(model, _run_for(name, run, len(named)))  # file:RUN/final.pt names its run
            refs = _references(modes, trials, seed, run_dir, epochs)
            if "randomize" in modes:
                sources[name] = str(_bind_fresh(job.references, name, model, _fresh_for(name, fresh, len(named))))
            rows += _criticality_model(job, name, model, refs, run_dir, bar, dev=dev, amp=amp,
                                       channels_last=channels_last, naive=naive, batch_size=batch_size,
                                       max_bytes=cache_mb * 2**20)
    finally:
        bar.close()
    table = _rows_frame(rows)
    order = {n: k for k, n in enumerate(named)}
    mode_order = {m: k for k, m in enumerate(modes)}
    table = (
        table.assign(_m=table["model"].map(order), _o=table["mode"].map(mode_order))
        .sort_values(["_m", "index", "_o", "epoch", "trial"], na_position="first", kind="stable")
        .drop(columns=["_m", "_o"])
        .reset_index(drop=True)
    )
    table.attrs = {"data": data.spec, "split": data.split, "indices": data.indices.tolist(), "fresh": sources}
    return table


@dataclass
class _Job:
    """What every (model, unit, reference) job of one criticality() call shares."""

    data: Batches
    data_key: str
    units: str
    layers: Sequence[str] | None
    store: Store | None
    precision: str
    norm: bool = False
    references: _ReferenceCache = field(default_factory=lambda: _ReferenceCache())


def _criticality_model(
    job: _Job,
    name: str,
    model: nn.Module,
    refs: list[Reference],
    run_dir: Path | None,
    bar: Any,
    **run_opts: Any,
) -> list[dict[str, Any]]:
    """Rows of one model: finished jobs read from the store, the others computed and written shard by shard."""
    us = units_of(model, job.units, job.layers, job.norm)
    weights = model_fingerprint(model)
    st, data = job.store, job.data

    source = job.references.bind(model) if any(r.mode == "randomize" for r in refs) else None
    norms = {n for n, m in model.named_modules() if structure.is_norm(m)}

    def config(u: Unit, r: Reference) -> dict[str, Any]:
        cfg = {"version": VERSION, "weights": weights, "data": job.data_key, "images": len(data),
               "units": job.units, **_unit_key(u, norms), "precision": job.precision, **r.config()}
        own_norm = _norm_params(u, norms)
        if r.mode == "randomize" and source is not None and source.kind != "spec":
            # a spec's draws are a function of (spec, draw_seed); other sources are keyed by the weights they drew:
            # the layers', and a unit's own normalisation parameters where it has some
            cfg["fresh"] = f"{source.kind}:{job.references.digest(model, r)}"
            if own_norm:
                cfg["fresh"] += f":{job.references.digest(model, r, own_norm)}"
        return cfg

    rows: list[dict[str, Any]] = []
    pending: dict[str, list[Reference]] = {}
    for u in us:
        for r in refs:
            if st is not None and st.has(ANALYSIS, job_key(name, ANALYSIS, config(u, r))):
                rows.extend(st.read_shard(ANALYSIS, job_key(name, ANALYSIS, config(u, r))).to_dict("records"))
            else:
                pending.setdefault(u.name, []).append(r)
    bar.total += len(us) * len(refs)
    bar.update(len(us) * len(refs) - sum(map(len, pending.values())))
    if not pending:
        return rows
    _warn_if_not_fresh(model, refs, job.references)
    _refuse_fresh_equal_to_init(model, refs, job.references, run_dir)
    pipe = Pipeline(model, run_opts["dev"], amp=run_opts["amp"], channels_last=run_opts["channels_last"])
    tasks = []
    for u in us:
        if u.name in pending:
            sources = [_overrides(model, u, job.references.get(model, r), _what(r, run_dir)) for r in pending[u.name]]
            tasks.append(_Task(u, pending[u.name], [{k: pipe.prepare(v) for k, v in s.items()} for s in sources]))

    def done(task: _Task, base: float) -> None:
        for r, stats in zip(task.refs, task.stats):
            row = {
                "model": name, "layer": task.unit.name, "label": task.unit.label, "kind": task.unit.kind,
                "index": task.unit.index, "units": job.units, "mode": r.mode, "epoch": r.epoch, "trial": r.trial,
                "seed": r.seed, "draw_seed": r.draw_seed,
                "fresh_source": source.kind if r.mode == "randomize" and source is not None else None,
                **_stats_compute(stats), "base_accuracy": base, "images": len(data),
            }
            if st is not None:
                cfg = config(task.unit, r)
                meta = {"model": name, "config": cfg, "indices": data.indices.tolist()}
                st.write(ANALYSIS, job_key(name, ANALYSIS, cfg), _rows_frame([row]), meta)
            rows.append(row)

    with eval_mode(model):
        _evaluate(name, pipe, data, tasks, batch_size=run_opts["batch_size"], naive=run_opts["naive"],
                  max_bytes=run_opts["max_bytes"], on_done=done, advance=bar.update)
    return rows
