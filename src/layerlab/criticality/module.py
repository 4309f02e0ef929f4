"""Module criticality (Chatterji, Neyshabur, Sedghi 2020): how far a unit's weights can move from the trained
point back towards initialisation, under Gaussian noise, before the loss rises; :func:`module_criticality` and its
search over (alpha, sigma), sigma bisected on a log scale."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .. import structure
from ..data import DataLike, as_batches
from ..errors import DataError, LayerlabError, check_finite
from ..models import load_model
from ..runtime import eval_mode, model_fingerprint
from ..seeds import generator
from ..store import Store, job_key, resumed
from .engine import MAX_STACK, _first_batch, _Traces
from .jobs import MODULE_ANALYSIS, VERSION, ModelLike, _device, _named_models, _progress, _run_for
from .pipeline import Pipeline
from .references import Reference, _overrides, _ReferenceCache, _run_checkpoint, _what, known_run
from .units import Unit, _unit_key, units_of

__all__ = ["SIGMA_MIN", "SIGMA_RTOL", "module_criticality"]

SIGMA_MIN = 1e-6  # the smallest noise scale searched
SIGMA_RTOL = 0.05  # sigma is bisected (log scale) to this relative precision (mu: ~2x that; finer than the alpha
# grid, whose neighbouring points differ by 20 % or more in alpha^2 near alpha = 1)


def _noise(unit: Unit, model: nn.Module, draws: int, seed: int, position: int) -> list[dict[str, torch.Tensor]]:
    """Standard-normal draws z_d for the unit's parameters: ``g = seeds.generator("criticality/noise", seed,
    position)`` (``position``: the unit's index among all units of the model), then for each draw d, for each
    parameter in unit order, ``torch.randn(shape, generator=g)`` (CPU, float32).

    The same z_d serve every (alpha, sigma) tried (u = sigma * z_d; common random numbers), so the expected loss
    is a deterministic function of (alpha, sigma) and the search is exact whatever order it visits them in.
    """
    g = generator("criticality/noise", seed, position)
    own = dict(model.named_parameters())
    return [{n: torch.randn(own[n].shape, generator=g) for n in unit.params} for _ in range(draws)]


def module_criticality(
    models: ModelLike | Sequence[ModelLike] | Mapping[str, ModelLike],
    data: DataLike = "digits",
    *,
    run: str | Path | Mapping[str, str | Path] | None = None,
    layers: Sequence[str] | None = None,
    units: str = "layers",
    images: int | None = None,
    split: str = "train",
    grid: int = 11,
    draws: int = 10,
    eps_factor: float = 1.01,
    sigma_min: float = SIGMA_MIN,
    rtol: float = SIGMA_RTOL,
    seed: int = 0,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    store: Store | str | Path | None = None,
    progress: bool = False,
    cache_mb: int = 2048,
    norm: bool = False,
) -> pd.DataFrame:
    """Chatterji, Neyshabur, Sedghi 2020 module criticality, one row per (model, unit).

    For unit i with trained weights theta_F and initial weights theta_0 (the run's epoch-0 checkpoint):
    theta_alpha = (1 - alpha) theta_0 + alpha theta_F and

        mu_i = min over alpha, sigma in [0, 1] of alpha^2 ||theta_F - theta_0||_F^2 / sigma^2
               subject to E_{u ~ N(0, sigma^2 I)} loss(theta_alpha + u) <= epsilon = eps_factor * loss(theta_F),

    with alpha on ``linspace(0, 1, grid)`` and, per alpha, sigma found by bisection on a log scale in
    [``sigma_min``, 1] (:func:`_largest_sigma`), the expectation over ``draws`` noise draws (:func:`_noise`,
    stream ``criticality/noise``), loss = mean cross-entropy over ``data`` (the paper's training data: ``split``
    defaults to ``"train"``). A module that did not move (theta_F = theta_0) has mu_i = 0. mu_i = inf only when
    no alpha is feasible at any sigma >= ``sigma_min``. Network criticality = sum of mu_i
    (:func:`network_criticality`). ``norm=True`` adds normalisation layers (affine weight and bias) as modules, as
    in :func:`criticality`.

    Columns: model, layer, label, kind, index, units, mode, criticality (= mu_i), alpha, sigma (the minimiser),
    distance (||theta_F - theta_0||_F^2), loss, epsilon, expected_loss (at the minimiser), evaluated
    ((alpha, sigma) points tried), draws, sigma_min.
    """
    if not isinstance(grid, int) or grid < 2:
        raise LayerlabError(f"grid (alpha values tried) must be an integer >= 2, got {grid!r}")
    if not isinstance(draws, int) or draws < 1:
        raise LayerlabError(f"draws (noise draws per point) must be a positive integer, got {draws!r}")
    if not eps_factor > 1:
        raise LayerlabError(
            f"eps_factor must be > 1 (epsilon = eps_factor x the trained loss; the paper's is 1.01), got {eps_factor!r}:"
            " below 1 not even the trained weights meet the constraint, so every module would come out inf"
        )
    if not 0 < sigma_min < 1 or not 0 < rtol < 1:
        raise LayerlabError(f"sigma_min and rtol must lie in (0, 1); got {sigma_min}, {rtol}")
    named = _named_models(models)
    dev = _device(device, named)
    data = as_batches(data, batch_size, images=images, seed=seed, split=split, arg="images=")
    st = Store(store) if isinstance(store, (str, Path)) else store
    data_key = data.fingerprint() if st is not None else ""
    # every model's units first (and which the store holds): the bar's total is the whole call's from the start
    plans = [_plan_model(name, spec, run, len(named), units, layers, norm, data, data_key, st,
                         {"grid": grid, "draws": draws, "eps_factor": eps_factor, "sigma_min": sigma_min, "rtol": rtol,
                          "seed": seed})
             for name, spec in named.items()]
    total, done = sum(len(p.units) for p in plans), sum(len(p.rows) for p in plans)
    if st is not None:
        resumed(done, total, st.root, unit=f"{MODULE_ANALYSIS} jobs")
    rows: list[dict[str, Any]] = []
    bar = _progress(total, progress, "module criticality")
    bar.update(done)
    try:
        for plan in plans:
            rows += plan.rows
            if not plan.todo:
                continue
            name, model, units_cfg = plan.name, plan.model, plan.cfg_base
            theta0 = _ReferenceCache().get(model, plan.init)
            pipe = Pipeline(model, dev, amp=False, channels_last=False)
            with eval_mode(model):
                x0, y0 = _first_batch(data, pipe.device)
                logits0, cache0 = pipe.validate(pipe.input(x0), f"model {name!r}")
                data.check_outputs(logits0.shape[-1], f"model {name!r}")
                keep = {min(pipe.stage_of(p) for p in u.params) for u in plan.todo}  # type: ignore[type-var]
                traces = _Traces(pipe, data, keep, cache_mb * 2**20, (logits0, y0, cache0), f"model {name!r}", x0)
                loss = _trained_loss(traces)
                check_finite(torch.tensor(loss), what=f"the loss of model {name!r}",
                             hint="the model itself produces NaN/inf")
                for u in plan.todo:
                    search = _Search(grid, draws, eps_factor, sigma_min, rtol, seed, plan.position[u.name])
                    row = _module_unit(pipe, model, traces, u, theta0, loss, search, _what(plan.init, plan.run_dir))
                    row = {"model": name, "layer": u.name, "label": u.label, "kind": u.kind, "index": u.index,
                           "units": units, "mode": "module", **row}
                    if st is not None:
                        cfg = {**units_cfg, **_unit_key(u, plan.norms)}
                        st.write(MODULE_ANALYSIS, job_key(name, MODULE_ANALYSIS, cfg), pd.DataFrame([row]),
                                 {"model": name, "config": cfg, "indices": data.indices.tolist()})
                    rows.append(row)
                    bar.update(1)
    finally:
        bar.close()
    table = pd.DataFrame(rows)
    order = {n: k for k, n in enumerate(named)}
    table = (
        table.assign(_m=table["model"].map(order)).sort_values(["_m", "index"], kind="stable")
        .drop(columns="_m").reset_index(drop=True)
    )
    table.attrs = {"data": data.spec, "split": data.split, "indices": data.indices.tolist()}
    return table


@dataclass
class _ModulePlan:
    """One model's units: those the store holds (their rows) and those still to measure."""

    name: str
    model: nn.Module
    run_dir: Path
    init: Reference
    units: list[Unit]
    todo: list[Unit]
    rows: list[dict[str, Any]]
    position: dict[str, int]  # unit name -> its noise stream
    norms: set[str]
    cfg_base: dict[str, Any]


def _plan_model(name: str, spec: ModelLike, run: Any, n_models: int, units: str, layers: Sequence[str] | None,
                norm: bool, data: Any, data_key: str, st: Store | None, search: dict[str, Any]) -> _ModulePlan:
    """Load one model and list its units, reading the finished ones from the store."""
    model = load_model(spec) if isinstance(spec, str) else spec
    run_dir = known_run(model, _run_for(name, run, n_models))  # file:RUN/final.pt names its run
    if run_dir is None:
        raise LayerlabError(
            f"module criticality of {name!r} needs theta_0, the weights at initialisation: pass the training "
            "run with --run RUN_DIR (run=...), whose checkpoints/epoch_0000.pt holds them"
        )
    init = Reference("reinit", 0, epoch=0, path=_run_checkpoint(run_dir, 0))
    # a unit's noise stream is its position among the norm=False units (norm units follow them), so that
    # the flag never changes another unit's draws
    base = [u.name for u in units_of(model, units)]
    extra = [u.name for u in units_of(model, units, norm=True) if u.name not in set(base)] if norm else []
    position = {n: k for k, n in enumerate(base + extra)}
    us = units_of(model, units, layers, norm)
    norms = {n for n, m in model.named_modules() if structure.is_norm(m)}
    cfg_base = {
        "version": VERSION, "weights": model_fingerprint(model), "data": data_key,
        "images": len(data) if st is not None else None, "units": units, **search, **init.config(),
    }
    todo, rows = [], []
    for u in us:
        key = job_key(name, MODULE_ANALYSIS, {**cfg_base, **_unit_key(u, norms)})
        if st is not None and st.has(MODULE_ANALYSIS, key):
            rows.extend(st.read_shard(MODULE_ANALYSIS, key).to_dict("records"))
        else:
            todo.append(u)
    return _ModulePlan(name, model, run_dir, init, us, todo, rows, position, norms, cfg_base)


def _trained_loss(traces: _Traces) -> float:
    total, n = 0.0, 0
    for chunk, _ in traces.chunks():
        for logits, labels, _ in chunk:
            if bool((labels < 0).any()):
                raise DataError(f"module criticality needs labelled images (it measures the loss), but "
                                f"{traces.data.describe()} has images without a label; pass (images, labels)")
            total += float(F.cross_entropy(logits.double(), labels, reduction="sum"))
            n += labels.shape[0]
    return total / n


@dataclass(frozen=True)
class _Search:
    """How module criticality searches (alpha, sigma) for one unit."""

    grid: int
    draws: int
    eps_factor: float
    sigma_min: float
    rtol: float
    seed: int
    position: int


def _largest_sigma(feasible: Callable[[float], bool], lo: float, hi: float, rtol: float) -> float:
    """The largest sigma in [lo, hi] with ``feasible(sigma)``, given ``feasible(lo)``: ``hi`` when it is
    feasible; else a scan down by decades from ``hi`` brackets the boundary (infeasible points are cheap: their
    running loss passes epsilon early), then bisection on a log scale until the bracket's ratio is below
    1 + rtol. Returns the bracket's feasible end, so the answer is always a sigma that was checked. Assumes
    feasibility falls as sigma grows."""
    if feasible(hi):
        return hi
    s = hi / 10
    while s > lo and not feasible(s):
        hi, s = s, s / 10
    lo = max(s, lo)
    while hi / lo > 1.0 + rtol:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
    return lo


def _module_unit(
    pipe: Pipeline,
    model: nn.Module,
    traces: _Traces,
    unit: Unit,
    theta0: Mapping[str, torch.Tensor],
    loss: float,
    search: _Search,
    what: str,
) -> dict[str, Any]:
    """Module criticality of one unit (Chatterji et al. 2020).

    mu = min over alpha of alpha^2 d / sigma*(alpha)^2, with sigma*(alpha) the largest feasible sigma in
    [sigma_min, 1]. Alphas are visited in increasing order; once some mu is known, an alpha can only beat it with
    sigma > alpha sqrt(d / mu), so it is first checked there and skipped when infeasible (exact under the
    monotonicity the bisection assumes). alpha = 0 (theta_0 plus noise) and an unmoved unit (d = 0) give mu = 0.
    """
    final = {n: p.detach().cpu().float() for n, p in model.named_parameters() if n in unit.params}
    init = {n: t.float() for n, t in _overrides(model, unit, theta0, what).items()}
    distance = float(sum(((final[n] - init[n]).double() ** 2).sum() for n in unit.params))
    epsilon = search.eps_factor * loss
    z = _noise(unit, model, search.draws, search.seed, search.position)
    start = min(pipe.stage_of(p) for p in unit.params)  # type: ignore[type-var]
    dtype = {n: p.dtype for n, p in model.named_parameters() if n in unit.params}
    evaluated = 0
    losses: dict[tuple[float, float], float] = {}

    def expected(a: float, s: float) -> float:
        nonlocal evaluated
        if (a, s) not in losses:
            evaluated += 1
            variants = [
                pipe.split({
                    n: pipe.prepare(((1 - a) * init[n] + a * final[n] + s * zd[n]).to(dtype[n])) for n in unit.params
                })
                for zd in z
            ]
            losses[a, s] = _expected_loss(pipe, traces, start, variants, epsilon)
        return losses[a, s]

    best: tuple[float, float, float] | None = None  # (mu, alpha, sigma)
    for a in (float(v) for v in np.linspace(0.0, 1.0, search.grid)):
        need = search.sigma_min if best is None or a * a * distance == 0 else a * math.sqrt(distance / best[0])
        if need > 1.0 or expected(a, max(need, search.sigma_min)) > epsilon:
            continue
        if a * a * distance == 0:  # objective 0 at any feasible sigma: nothing can beat it
            best = (0.0, a, max(need, search.sigma_min))
            break
        sigma = _largest_sigma(lambda s: expected(a, s) <= epsilon, max(need, search.sigma_min), 1.0, search.rtol)
        mu = a * a * distance / (sigma * sigma)
        if best is None or mu < best[0]:
            best = (mu, a, sigma)
    common = {"distance": distance, "loss": loss, "epsilon": epsilon, "evaluated": evaluated, "draws": search.draws,
              "sigma_min": search.sigma_min}
    if best is None:
        return {"criticality": math.inf, "alpha": math.nan, "sigma": math.nan, "expected_loss": math.nan, **common}
    mu, a, sigma = best
    return {"criticality": mu, "alpha": a, "sigma": sigma, "expected_loss": losses[a, sigma], **common}


def _expected_loss(
    pipe: Pipeline, traces: _Traces, start: int, variants: list[dict[int, dict[str, torch.Tensor]]], limit: float
) -> float:
    """Mean over noise draws of the mean cross-entropy over all images (draws stacked MAX_STACK at a time).

    Cross-entropy is non-negative, so the running sum only grows: once it passes ``limit`` (epsilon) times the
    number of terms the point is infeasible and the rest of the images are skipped (returns inf; exact).
    """
    n_images = traces.n_images
    assert n_images is not None  # _trained_loss made the first full pass
    budget = limit * n_images * len(variants)
    total = 0.0
    for chunk, _ in traces.chunks():
        for logits, labels, cache in chunk:
            for lo in range(0, len(variants), MAX_STACK):
                out = pipe.resume(start, cache[start], variants[lo : lo + MAX_STACK])
                reps = out.shape[0] // labels.shape[0]
                total += float(F.cross_entropy(out.double(), labels.repeat(reps), reduction="sum"))
                if not total <= budget:  # also catches NaN
                    return math.inf
    return total / (n_images * len(variants))
