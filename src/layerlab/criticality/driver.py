"""Layer criticality, the analysis: :func:`criticality` walks models, units and references, reads finished jobs
from the store, computes the others with the engine and writes them shard by shard. Re-randomisation after
Gavrikov, Agnihotri, Keuper, Keuper 2024 (arXiv 2410.14470); resets to init or a checkpoint after Zhang, Bengio,
Singer 2022."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import structure
from ..data import Batches, DataLike, as_batches
from ..errors import LayerlabError
from ..models import load_model
from ..runs import checkpoints
from ..runtime import eval_mode, model_fingerprint
from ..store import Store, job_key, resumed
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

__all__ = ["criticality", "run_models"]


def criticality(
    models: ModelLike | Sequence[ModelLike] | Mapping[str, ModelLike] | None = None,
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
    precision: float | None = None,
    shift: str | Sequence[str] | None = None,
    over_training: bool = False,
) -> pd.DataFrame:
    """Layer criticality of one model or a zoo: one row per (model, layer, mode, epoch, shift, trial).

    Args:
        models: a spec (``timm:resnet18``), a model, a list of them, or ``{name: spec or model}`` (zoo sweep);
            omitted with ``run=``: the run's final model (``RUN/final.pt``, else its last checkpoint).
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
        precision: adaptive sampling: a (model, layer, trial) stops taking images once the half-width of its 95 %
            interval over images is below ``precision`` points (after at least 32 images; never more than
            ``images``); its row's ``images`` says how many it used (:mod:`~layerlab.criticality.intervals`).
            Checked after every batch: a smaller ``batch_size`` stops closer to the target.
        shift: distribution shifts to measure under besides the clean images (always included, ``shift="clean"``
            rows): ``"gaussian-noise:3"`` (a corruption at severity 1-5, modelled on ImageNet-C), ``"pgd-linf:2"``
            / ``"pgd-l2:EPS"`` (PGD inputs against the unperturbed model, eps in 1/255), or a list
            (:mod:`layerlab.shift`). Corruptions are seeded per image from ``seed``: every model sees the same
            corrupted images. Needs images in [0, 1] (a model that normalises inside).
        over_training: re-randomise at every checkpoint of each model's run (``run=``, or the run folder around a
            ``file:RUN/final.pt`` model; ``checkpoint=`` picks epochs) instead of the model itself: rows carry the
            checkpoint's ``epoch`` (randomize mode only).

    Columns: model, layer, label, kind, index, units, mode, epoch (the reset checkpoint; with ``over_training`` the
    analysed one), shift, trial, seed, draw_seed, fresh_source (where trial t's fresh weights came from: callable,
    spec, timm, torchvision or reset_parameters; empty for reinit/checkpoint), similarity, criticality (%),
    agreement, accuracy, kl, base_accuracy, images (used by this row), per_image (the per-image similarities, in
    image order: what :func:`~layerlab.criticality.summarize` bootstraps). ``table.attrs`` holds the image indices
    and, under ``"fresh"``, each model's fresh-instance source in words.
    """
    from ..shift import parse_shifts, shifted

    if not isinstance(trials, int) or trials < 1:
        raise LayerlabError(f"trials must be a positive integer (the paper uses 3), got {trials!r}")
    if batch_size < 1:
        raise LayerlabError(f"batch_size must be positive, got {batch_size}")
    modes = _modes(mode)
    if precision is not None and not (isinstance(precision, (int, float)) and precision > 0):
        raise LayerlabError(f"precision is a half-width in criticality points and must be > 0, got {precision!r}")
    if over_training and modes != ["randomize"]:
        raise LayerlabError(
            "over_training re-randomises layers at each checkpoint of a run (randomize mode); reinit/checkpoint "
            "modes already reset to a run's checkpoints: drop over_training or the mode"
        )
    shifts = parse_shifts([shift] if isinstance(shift, str) else list(shift or []))
    named = _named_models(models if models is not None else run_models(run))
    dev = _device(device, named)
    amp = dev.type == "cuda" if amp is None else amp
    channels_last = dev.type == "cuda" if channels_last is None else channels_last
    if isinstance(fresh, Mapping) and (unknown := sorted(set(fresh) - set(named))):
        raise LayerlabError(f"fresh= names models that are not analysed: {unknown}; the models are {list(named)}")
    data = as_batches(data, batch_size, images=images, seed=seed, split=split, arg="images=")
    epochs = [checkpoint] if isinstance(checkpoint, int) else checkpoint
    st = Store(store) if isinstance(store, (str, Path)) else store
    job = _Job(data=data, data_key=data.fingerprint() if st is not None else "", units=units, layers=layers,
               store=st, precision="bf16" if amp else "fp32", norm=norm, target=precision)
    # first every model's jobs (and which of them the store holds), so that the bar's total is the whole call's
    # from the start and a re-run says what it skips before any work
    plans: list[_Plan | None] = []
    sources: dict[str, str] = {}
    for name, spec in named.items():
        model = load_model(spec) if isinstance(spec, str) else spec
        run_dir = known_run(model, _run_for(name, run, len(named)))  # file:RUN/final.pt names its run
        refs = _references(modes, trials, seed, run_dir, None if over_training else epochs)
        for at, analysed in _over_training(name, model, run_dir, epochs) if over_training else [(None, model)]:
            if "randomize" in modes:
                how = _fresh_for(name, fresh, len(named))
                sources[name] = str(_bind_fresh(job.references, name, analysed, how))
            for s in shifts:
                part = shifted(data, s, seed=seed, model=analysed)
                sjob = replace(job, data=part, data_key=part.fingerprint() if st is not None else "", shift=str(s),
                               at_epoch=at)
                plans.append(_plan_model(sjob, name, analysed, refs, run_dir))
    total, done = sum(p.jobs for p in plans if p), sum(len(p.rows) for p in plans if p)
    if st is not None:
        resumed(done, total, st.root, unit=f"{ANALYSIS} jobs")
    rows: list[dict[str, Any]] = []
    bar = _progress(total, progress, "criticality")
    bar.update(done)
    try:
        for k, plan in enumerate(plans):
            assert plan is not None
            plans[k] = None  # its model's cached (e.g. adversarial) images go once it is measured
            rows += _criticality_model(plan, bar, dev=dev, amp=amp, channels_last=channels_last, naive=naive,
                                       batch_size=batch_size, max_bytes=cache_mb * 2**20)
    finally:
        bar.close()
    table = _rows_frame(rows)
    order = {n: k for k, n in enumerate(named)}
    mode_order = {m: k for k, m in enumerate(modes)}
    shift_order = {str(s): k for k, s in enumerate(shifts)}
    table = (
        table.assign(_m=table["model"].map(order), _o=table["mode"].map(mode_order), _s=table["shift"].map(shift_order))
        .sort_values(["_m", "index", "_o", "epoch", "_s", "trial"], na_position="first", kind="stable")
        .drop(columns=["_m", "_o", "_s"])
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
    target: float | None = None  # adaptive sampling: the half-width in points (None: every image)
    shift: str = "clean"
    at_epoch: int | None = None  # over training: the analysed checkpoint's epoch
    references: _ReferenceCache = field(default_factory=lambda: _ReferenceCache())


def run_models(run: str | Path | Mapping[str, str | Path] | None) -> dict[str, str]:
    """``models`` omitted (and ``layerlab criticality --run RUN``): each run's trained model (final.pt, else its last checkpoint), named after the run."""
    if run is None:
        raise LayerlabError("no model given; pass a spec like 'timm:resnet18', a model, {name: spec}, or run=RUN_DIR")
    runs = dict(run) if isinstance(run, Mapping) else {Path(run).name: run}
    out = {}
    for name, r in runs.items():
        r = Path(r)
        found = checkpoints(r) if r.is_dir() else []
        if (r / "final.pt").exists():
            out[name] = f"file:{r / 'final.pt'}"
        elif found:
            out[name] = f"file:{found[-1][1]}"
        else:
            raise LayerlabError(f"run {str(r)!r} has neither final.pt nor checkpoints/epoch_XXXX.pt; pass the model")
    return out


def _over_training(
    name: str, model: nn.Module, run: Path | None, epochs: Sequence[int] | None
) -> list[tuple[int, nn.Module]]:
    """(epoch, model at that checkpoint) for every checkpoint of the model's run (or the ``epochs`` chosen)."""
    if run is None:
        raise LayerlabError(
            f"model {name!r}: over_training re-randomises at each checkpoint of a training run; pass run=RUN_DIR "
            "(or a file:RUN/final.pt model inside its run folder)"
        )
    found = dict(checkpoints(run))
    if not found:
        raise LayerlabError(f"run {str(run)!r} holds no checkpoints/epoch_XXXX.pt to analyse over training")
    chosen = list(epochs) if epochs else sorted(found)
    if missing := [e for e in chosen if e not in found]:
        raise LayerlabError(f"run {str(run)!r} has no checkpoint for epoch(s) {missing}; it has {sorted(found)}")
    return [(e, load_model(f"file:{found[e]}")) for e in chosen]


@dataclass
class _Plan:
    """One model (at one checkpoint, under one shift): its jobs, the rows the store already holds and the rest."""

    job: _Job
    name: str
    model: nn.Module
    refs: list[Reference]
    run_dir: Path | None
    jobs: int  # (unit, reference) jobs in all
    rows: list[dict[str, Any]]  # the finished jobs' rows, read from the store
    pending: dict[str, list[Reference]]  # unit name -> references still to measure
    config: Callable[[Unit, Reference], dict[str, Any]]  # a job's store config (its key's input)
    units: list[Unit]
    source: Any  # the fresh-instance source (randomize), else None


def _plan_model(job: _Job, name: str, model: nn.Module, refs: list[Reference], run_dir: Path | None) -> _Plan:
    """One model's jobs: the finished ones read from the store, the others listed as pending."""
    us = units_of(model, job.units, job.layers, job.norm)
    weights = model_fingerprint(model)
    st, data = job.store, job.data

    source = job.references.bind(model) if any(r.mode == "randomize" for r in refs) else None
    norms = {n for n, m in model.named_modules() if structure.is_norm(m)}

    def config(u: Unit, r: Reference) -> dict[str, Any]:
        cfg = {"version": VERSION, "weights": weights, "data": job.data_key, "images": len(data),
               "units": job.units, **_unit_key(u, norms), "precision": job.precision, **r.config(),
               **({"shift": job.shift} if job.shift != "clean" else {}),
               **({"adaptive": float(job.target)} if job.target is not None else {}),
               **({"at_epoch": job.at_epoch} if job.at_epoch is not None else {})}
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
            key = job_key(name, ANALYSIS, config(u, r)) if st is not None else ""
            if st is not None and st.has(ANALYSIS, key):
                rows.extend(_stored_rows(st.read_shard(ANALYSIS, key), job.shift))
            else:
                pending.setdefault(u.name, []).append(r)
    return _Plan(job, name, model, refs, run_dir, len(us) * len(refs), rows, pending, config, us, source)


def _criticality_model(plan: _Plan, bar: Any, **run_opts: Any) -> list[dict[str, Any]]:
    """Rows of one planned model: the finished jobs' rows, the others computed and written shard by shard."""
    job, name, model, refs, run_dir = plan.job, plan.name, plan.model, plan.refs, plan.run_dir
    rows, pending, config, us, source = list(plan.rows), plan.pending, plan.config, plan.units, plan.source
    st, data = job.store, job.data
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
        for k, (r, stats) in enumerate(zip(task.refs, task.stats)):
            row = {
                "model": name, "layer": task.unit.name, "label": task.unit.label, "kind": task.unit.kind,
                "index": task.unit.index, "units": job.units, "mode": r.mode,
                "epoch": job.at_epoch if job.at_epoch is not None else r.epoch, "shift": job.shift, "trial": r.trial,
                "seed": r.seed, "draw_seed": r.draw_seed,
                "fresh_source": source.kind if r.mode == "randomize" and source is not None else None,
                **_stats_compute(stats), "base_accuracy": base, "images": int(stats[5]), "per_image": task.per_image(k),
            }
            if st is not None:
                cfg = config(task.unit, r)
                meta = {"model": name, "config": cfg, "indices": data.indices.tolist()}
                st.write(ANALYSIS, job_key(name, ANALYSIS, cfg), _rows_frame([row]), meta)
            rows.append(row)

    with eval_mode(model):
        _evaluate(name, pipe, data, tasks, batch_size=run_opts["batch_size"], naive=run_opts["naive"],
                  max_bytes=run_opts["max_bytes"], on_done=done, advance=bar.update, precision=job.target)
    return rows


def _stored_rows(frame: pd.DataFrame, shift: str) -> list[dict[str, Any]]:
    """A stored shard's rows; shards written before shifts and intervals lack ``shift`` (they are clean) and
    ``per_image`` (their interval is NaN)."""
    rows = frame.to_dict("records")
    for row in rows:
        row.setdefault("shift", shift)
        if isinstance(row.get("per_image"), np.ndarray):
            row["per_image"] = row["per_image"].tolist()
    return rows
