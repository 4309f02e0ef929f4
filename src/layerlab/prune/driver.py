"""The analysis: :func:`prune` removes blocks (or weights) of each model under each criterion, budget and seed,
optionally heals the result, and writes one row per job to the store; :func:`prune_model` prunes one model."""
from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..criticality.jobs import ModelLike, _device, _named_models
from ..data import ImageData, load_data
from ..errors import LayerlabError
from ..models import load_model, save_checkpoint
from ..runtime import model_fingerprint
from ..runtime import progress as progress_bar
from ..store import Store, job_key, resumed
from .budget import Budget, parse_budget
from .heal import heal
from .magnitude import baked, magnitude_prune, sparsity
from .measure import model_costs, predictions, scores
from .scores import CRITERIA, Criterion, ScoreContext
from .select import choose, weight_target
from .spec import pruned_arch
from .surgery import Block, core_of, count_params, removable_blocks, remove_blocks

__all__ = ["ANALYSIS", "DEFAULT_CRITERIA", "SCORES", "VERSION", "prune", "prune_model"]

ANALYSIS = "prune"
SCORES = "prune-scores"
VERSION = 1  # bump when the numbers a job produces change; old shards are then recomputed
DEFAULT_CRITERIA = ("criticality", "block-influence", "angular", "random", "magnitude")


def prune(
    models: ModelLike | Sequence[ModelLike] | Mapping[str, ModelLike],
    data: str = "digits",
    *,
    criteria: str | Sequence[str] = DEFAULT_CRITERIA,
    budgets: str | float | Sequence[str | float] = (0.1, 0.25, 0.5),
    seeds: int | Sequence[int] = 0,
    finetune_epochs: int = 0,
    heal_lr: float = 0.01,
    heal_images: int | None = None,
    images: int | None = 256,
    eval_images: int | None = None,
    split: str = "test",
    trials: int = 3,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    store: Store | str | Path | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Remove whole blocks chosen by each criterion until each budget is reached (or prune weights by magnitude),
    and measure the result: one row per (model, criterion, budget, seed).

    Args:
        models: a spec (``file:run/final.pt``), a model, a list, or ``{name: spec or model}``.
        data: a data spec: criteria score blocks on ``images`` calibration images of its train split (a subset seeded
            by the job's seed), pruned models are scored on ``split`` (``eval_images``: a fixed subset), and healing
            fine-tunes on the train split (``heal_images``: a seeded subset; default all of it).
        criteria: names of :data:`~layerlab.prune.CRITERIA`: ``criticality``, ``block-influence``, ``angular``,
            ``random``, ``magnitude``.
        budgets: each a fraction of the removable blocks (``0.25``), a count (``2``) or ``"params:0.25"`` (blocks
            until that fraction of the parameters is gone); magnitude prunes as many weights (:mod:`.select`).
        seeds: the seeds of the random choice, criticality's fresh instances, the calibration subset and healing.
        finetune_epochs: heal each pruned model for this many epochs with the training lab (0: no healing).
        heal_lr: the healing learning rate (SGD, cosine schedule).
        trials: criticality's fresh instances per block.
        store: a :class:`Store` or its root: one shard per job (finished jobs are read, never recomputed), the
            criteria's scores (table ``prune-scores``), pruned and healed checkpoints (``ROOT/pruned/KEY.pt``, each a
            layerlab checkpoint that loads with ``file:``) and healing runs (``ROOT/heal/KEY``).

    Columns: model, criterion, budget, budget_kind, budget_fraction, seed, blocks_total, blocks_removed, removed
    (block paths), params_base, params (magnitude: the non-zero ones), params_removed (fraction), flops_base, flops
    (one image, torch.utils.flop_counter), flops_ratio, flops_dense (magnitude: zeros are still multiplied),
    sparsity, accuracy_base, accuracy, agreement (top-1 with the unpruned model), loss, finetune_epochs,
    accuracy_healed, agreement_healed, loss_healed (NaN without healing), images, calibration, checkpoint,
    checkpoint_healed, seconds.
    """
    crits = _criteria(criteria)
    buds = [parse_budget(b) for b in ([budgets] if isinstance(budgets, (str, float, int, Budget)) else budgets)]
    seed_list = [seeds] if isinstance(seeds, int) else list(seeds)
    _check(data, seed_list, finetune_epochs, heal_lr, trials, batch_size, images)
    named = _named_models(models)
    dev = _device(device, named)
    st = Store(store) if isinstance(store, (str, Path)) else store
    test = load_data(data, split, images=eval_images, seed=0, arg="eval_images=")
    opts = {"version": VERSION, "data": data, "split": split, "eval_images": len(test), "images": images,
            "trials": trials, "finetune_epochs": finetune_epochs,
            **({"heal_lr": heal_lr, "heal_images": heal_images} if finetune_epochs else {})}
    plans = [_plan(name, spec, crits, buds, seed_list, opts, st, dev, finetune_epochs) for name, spec in named.items()]
    done = sum(len(p["rows"]) for p in plans)
    total = done + sum(len(p["jobs"]) for p in plans)  # finished and pending: the whole call's jobs
    if st is not None:
        resumed(done, total, st.root, unit=f"{ANALYSIS} jobs")
    bar = progress_bar(total=total, enabled=progress, desc="prune", unit="job", leave=True)
    bar.update(done)
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="layerlab-heal-") as scratch:
            where = st.root if st is not None else Path(scratch)
            for plan in plans:
                rows += plan["rows"] + _run_plan(plan, test, data, dev, st, where, opts, bar, batch_size,
                                                 heal_images=heal_images, heal_lr=heal_lr)
    finally:
        bar.close()
    return _ordered(pd.DataFrame(rows), named, crits, buds)


def _criteria(criteria: str | Sequence[str]) -> list[Criterion]:
    names = [c.strip() for c in criteria.split(",")] if isinstance(criteria, str) else list(criteria)
    if not names:
        raise LayerlabError(f"criteria is empty; name one or more of {', '.join(CRITERIA.names())}")
    return [CRITERIA.get(n) for n in dict.fromkeys(names)]


def _check(data: Any, seeds: list[int], epochs: int, lr: float, trials: int, batch_size: int, images: Any) -> None:
    checks = [
        (isinstance(data, str), (f"data must be a data spec such as 'digits' (pruning scores, evaluates and heals "
                                 f"on its splits), got {type(data).__name__}")),
        (bool(seeds) and all(isinstance(s, int) for s in seeds), f"seeds must be integers, got {seeds!r}"),
        (isinstance(epochs, int) and epochs >= 0, f"finetune_epochs must be a whole number >= 0, got {epochs!r}"),
        (lr > 0, f"heal_lr must be > 0, got {lr!r}"),
        (isinstance(trials, int) and trials >= 1, f"trials must be a positive integer, got {trials!r}"),
        (batch_size >= 1, f"batch_size must be positive, got {batch_size!r}"),
        (images is None or (isinstance(images, int) and images >= 1),
         f"images (calibration) must be a positive integer or None, got {images!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise LayerlabError(message)


def _plan(name: str, spec: ModelLike, crits: list[Criterion], buds: list[Budget], seeds: list[int],
          opts: dict[str, Any], st: Store | None, dev: torch.device, epochs: int) -> dict[str, Any]:
    """One model's jobs: the finished ones read from the store, the others listed (every budget checked now)."""
    model = load_model(spec) if isinstance(spec, str) else spec
    blocks = removable_blocks(model)
    arch = getattr(model, "layerlab_arch", None)
    if arch is None and (st is not None or epochs):
        raise LayerlabError(f"model {name!r} has no architecture spec, so its pruned versions can be neither saved "
                            "nor healed; load it with layerlab.load_model(spec) or set model.layerlab_arch = "
                            "'timm:NAME?kwargs'")
    for b in buds:
        if b.kind == "blocks":
            b.blocks(len(blocks))  # a count larger than the model's blocks fails before any work
    weights = model_fingerprint(model)
    jobs, rows = [], []
    for seed in seeds:
        for c in crits:
            for b in buds:
                cfg = {**opts, "weights": weights, "criterion": c.name, "budget": b.label, "seed": seed}
                if c.weights or c.random:  # they draw no fresh instances and read no calibration images
                    cfg.pop("trials")
                    cfg.pop("images")
                key = job_key(name, ANALYSIS, cfg)
                if st is not None and st.has(ANALYSIS, key):
                    rows += st.read_shard(ANALYSIS, key).to_dict("records")
                else:
                    jobs.append((seed, c, b, key, cfg))
    return {"name": name, "model": model, "blocks": blocks, "arch": arch, "weights": weights, "jobs": jobs,
            "rows": rows}


def _run_plan(plan: dict[str, Any], test: ImageData, data: str, dev: torch.device, st: Store | None, where: Path,
              opts: dict[str, Any], bar: Any, batch_size: int, **heal_opts: Any) -> list[dict[str, Any]]:
    """Run one model's pending jobs, writing each row (and its checkpoints) as soon as it is done."""
    if not plan["jobs"]:
        return []
    base = copy.deepcopy(plan["model"]).to(dev).eval()  # the model given is never moved or changed
    blocks, name = plan["blocks"], plan["name"]
    sample = test.subset([0]).float()
    reference = predictions(base, test, dev)
    costs = model_costs(base, sample)
    before = {"params_base": costs["params"], "flops_base": costs["flops"],
              "accuracy_base": scores(base, test, reference, dev)["accuracy"]}
    ranked: dict[tuple[int, str], pd.DataFrame] = {}
    rows = []
    for seed, c, budget, key, cfg in plan["jobs"]:
        t0 = time.time()
        if not c.weights and (seed, c.name) not in ranked:
            ranked[(seed, c.name)] = _stored_scores(plan, base, c, seed, data, opts, st, dev, batch_size)
        table = ranked.get((seed, c.name))
        pruned, info = _prune(base, blocks, c, budget, table, before["params_base"], plan["arch"])
        row = {"model": name, "criterion": c.name, "budget": budget.label, "budget_kind": budget.kind,
               "budget_fraction": budget.fraction(len(blocks)), "seed": seed, "blocks_total": len(blocks),
               **info, **before, **_costs(pruned, sample, before, info["pruned_weights"]),
               **scores(pruned, test, reference, dev), "finetune_epochs": opts["finetune_epochs"],
               "accuracy_healed": float("nan"), "agreement_healed": float("nan"), "loss_healed": float("nan"),
               "images": len(test), "calibration": int(table["images"].iloc[0]) if table is not None else 0,
               "checkpoint": "", "checkpoint_healed": ""}
        if st is not None:
            row["checkpoint"] = str(save_checkpoint(_final(pruned, plan["arch"]), where / "pruned" / f"{key}.pt",
                                                    pruning=_meta(row)))
        if opts["finetune_epochs"]:
            healed = heal(pruned, data, where / "heal" / key, epochs=opts["finetune_epochs"], seed=seed, device=dev,
                          lr=heal_opts["heal_lr"], images=heal_opts["heal_images"])
            healed = _final(healed, plan["arch"])
            got = scores(healed, test, reference, dev)
            row.update(accuracy_healed=got["accuracy"], agreement_healed=got["agreement"], loss_healed=got["loss"])
            if st is not None:
                row["checkpoint_healed"] = str(save_checkpoint(healed, where / "pruned" / f"{key}.healed.pt",
                                                               pruning=_meta(row)))
        row["seconds"] = time.time() - t0
        if st is not None:
            st.write(ANALYSIS, key, pd.DataFrame([row]), {"model": name, "config": cfg})
        rows.append(row)
        bar.update(1)
    return rows


def _stored_scores(plan: dict[str, Any], base: nn.Module, c: Criterion, seed: int, data: str, opts: dict[str, Any],
                   st: Store | None, dev: torch.device, batch_size: int) -> pd.DataFrame:
    """A criterion's scores for one model and seed: read from the store, else measured (and written)."""
    cfg = {"version": VERSION, "weights": plan["weights"], "criterion": c.name, "seed": seed,
           **({} if c.random else {"data": data, "images": opts["images"], "trials": opts["trials"]})}
    key = job_key(plan["name"], SCORES, cfg)
    if st is not None and st.has(SCORES, key):
        return st.read_shard(SCORES, key)
    table = _measure_scores(base, plan["blocks"], c, data, seed, opts["images"], opts["trials"], dev,
                            batch_size).assign(model=plan["name"])
    if st is not None:
        st.write(SCORES, key, table, {"model": plan["name"], "config": cfg})
    return table


def _measure_scores(base: nn.Module, blocks: list[Block], c: Criterion, data: str, seed: int, images: int | None,
                    trials: int, dev: torch.device, batch_size: int) -> pd.DataFrame:
    """Rows block, label, n, score (and criterion, seed, images: the calibration images used, 0 for random)."""
    calibration = None if c.random else load_data(data, "train", images=images, seed=seed, arg="images=")
    ctx = ScoreContext(base, blocks, calibration, seed, dev, trials, batch_size)  # type: ignore[arg-type]
    return c.score(ctx).assign(criterion=c.name, seed=seed,  # type: ignore[misc]
                               images=len(calibration) if calibration is not None else 0)


def _prune(base: nn.Module, blocks: list[Block], c: Criterion, budget: Budget, ranked: pd.DataFrame | None,
           params_base: int, arch: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """The pruned model (its ``layerlab_arch`` the unpruned arch for magnitude, else a ``pruned:`` spec) and what
    was removed. A magnitude-pruned model keeps its masks (for healing); :func:`_final` bakes them."""
    if c.weights:
        amount = weight_target(budget, blocks, params_base)
        pruned = magnitude_prune(base, amount)
        pruned.layerlab_arch = pruned_arch(arch, masked=True) if arch else None
        return pruned, {"blocks_removed": 0, "removed": "", "pruned_weights": amount}
    names = choose(ranked, blocks, budget, params_base, runs=c.runs)  # type: ignore[arg-type]
    pruned = remove_blocks(base, names)
    prefix = core_of(base)[1]
    pruned.layerlab_arch = pruned_arch(arch, [n[len(prefix):] for n in names]) if arch else None
    return pruned, {"blocks_removed": len(names), "removed": ",".join(names), "pruned_weights": 0}


def _final(model: nn.Module, arch: str | None) -> nn.Module:
    """A magnitude-pruned model with its masks baked in (the unpruned architecture with zeros), else itself."""
    out = baked(model)
    if out is not model:
        out.layerlab_arch = arch
    return out


def _costs(pruned: nn.Module, sample: torch.Tensor, before: dict[str, Any], zeroed: int) -> dict[str, Any]:
    """Parameters (without the weights magnitude pruning zeroed), FLOPs of a dense forward, sparsity."""
    dense = _final(pruned, None)
    costs = model_costs(dense, sample)
    params = costs["params"] - zeroed
    return {"params": params, "params_removed": 1 - params / before["params_base"], "flops": costs["flops"],
            "flops_ratio": costs["flops"] / before["flops_base"], "flops_dense": bool(zeroed),
            "sparsity": sparsity(dense)}


def _meta(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("model", "criterion", "budget", "seed", "removed", "accuracy", "agreement", "finetune_epochs")
    return {k: row[k] for k in keys if k in row}


def _ordered(table: pd.DataFrame, named: Mapping[str, Any], crits: list[Criterion], buds: list[Budget]) -> pd.DataFrame:
    if table.empty:
        return table
    order = {"model": list(named), "criterion": [c.name for c in crits], "budget": [b.label for b in buds]}
    keys = {c: table[c].map({v: k for k, v in enumerate(vals)}) for c, vals in order.items()}
    return (table.assign(_m=keys["model"], _c=keys["criterion"], _b=keys["budget"])
            .sort_values(["_m", "_c", "_b", "seed"], kind="stable").drop(columns=["_m", "_c", "_b"])
            .reset_index(drop=True))


def prune_model(model: ModelLike, criterion: str = "criticality", budget: str | float = 0.25, data: str = "digits",
                *, seed: int = 0, images: int | None = 256, trials: int = 3, batch_size: int = 128,
                device: str | torch.device | None = None) -> nn.Module:
    """One pruned model: ``model`` (a spec or a model, left as it was) with the blocks ``criterion`` picks under
    ``budget`` removed (or its weights magnitude-pruned, zeros baked in), on ``device``; ``layerlab_pruned`` lists
    the removed blocks. Save it with :func:`layerlab.save_checkpoint`; it loads again with ``file:``. That needs the
    architecture: a model from a spec carries it; for a bare module set ``model.layerlab_arch = "timm:NAME?..."``
    (the spec that builds it) before pruning, else saving says so.

    Example (needs a trained checkpoint)::

        small = ll.prune.prune_model("file:runs/base/final.pt", "block-influence", 2)
    """
    c, b = _criteria([criterion])[0], parse_budget(budget)
    _check(data, [seed], 0, 1.0, trials, batch_size, images)
    named = _named_models(model)
    dev = _device(device, named)
    spec = next(iter(named.values()))
    loaded = load_model(spec) if isinstance(spec, str) else spec
    base = copy.deepcopy(loaded).to(dev).eval()
    blocks = removable_blocks(base)
    ranked = None if c.weights else _measure_scores(base, blocks, c, data, seed, images, trials, dev, batch_size)
    pruned, info = _prune(base, blocks, c, b, ranked, count_params(base), getattr(loaded, "layerlab_arch", None))
    pruned = _final(pruned, getattr(loaded, "layerlab_arch", None))
    pruned.layerlab_pruned = [n for n in info["removed"].split(",") if n]
    return pruned
