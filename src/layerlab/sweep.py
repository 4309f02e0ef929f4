"""Sweeps: a YAML file that names models (specs, or a zoo to train), data and analyses, expanded into
independent, idempotent jobs that an engine (:mod:`layerlab.engines`: ``local`` or ``ray``) runs.

::

    name: small
    zoo: demo                        # a zoo to train first (a YAML file beside this one, or a built-in name)
    models: {random: "timm:resnet18?num_classes=10"}   # more models, not trained (a list of specs works too)
    data: digits                     # data spec every analysis uses unless it sets its own
    device: cpu                      # cpu, cuda, or auto (cuda where the job got a GPU)
    retries: 1                       # extra attempts for a job that raised (a lost worker is retried by Ray too)
    resources: {num_cpus: 1, num_gpus: 0}              # per job; an analysis may set its own
    analyses:
      training: {resources: {num_cpus: 2}}             # options of the training jobs of the zoo
      criticality: {trials: 3, images: 500, models: [baseline, adam]}

Each job is (kind, model, config) with key ``job_key(model, kind, config)``; a finished job is one Parquet shard
``OUT/shards/<kind>/<key>.parquet`` written atomically (:class:`layerlab.store.Store`), so re-running a sweep skips
every finished job and a killed job leaves no trace but a retry. Jobs of a zoo model wait for its training job.
A job that fails after its retries leaves ``OUT/failed/<key>.json`` (error and traceback) and the others go on;
running the sweep again retries it and removes the marker once it succeeds. Two sweeps may share an output folder:
a job is claimed with a lock file, so the second one waits and then finds it finished.

Job kinds are a registry (:data:`JOB_KINDS`): adding an analysis to sweeps is one decorated function
``(config, out) -> DataFrame`` (:func:`job_kind`). ``plugins:`` in the sweep file names modules (or ``.py`` files)
to import, in the driver and in every worker, before the jobs run: that is where your own job kinds live.
"""
from __future__ import annotations

import difflib
import errno
import importlib
import importlib.util
import inspect
import json
import os
import socket
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pandas as pd

from .errors import LayerlabError, SpecError
from .registry import Registry
from .specfiles import builtin_file, read_spec
from .store import Store, atomic_write_text, job_key

__all__ = ["JOB_KINDS", "Job", "JobKind", "Sweep", "SweepResult", "expand", "failures", "job_kind", "load_sweep",
           "plan", "run_job", "run_sweep"]

SWEEP_FIELDS = ("name", "zoo", "models", "data", "device", "retries", "resources", "plugins", "analyses", "seed")
RESOURCE_FIELDS = ("num_cpus", "num_gpus")
ZOO_PREFIX = "zoo:"
JobFn = Callable[[dict[str, Any], Path], pd.DataFrame]


# ================================================================================================ job kinds


Expander = Callable[[dict[str, Any], dict[str, str]], list[tuple[str, dict[str, Any]]]]
Result = pd.DataFrame | Mapping[str, pd.DataFrame]


@dataclass(frozen=True)
class JobKind:
    """One analysis a sweep can run: ``fn(config, out)`` per job, and how a sweep expands into jobs.

    ``per_model``: one job per model of the sweep; else ``expand(options, models)`` lists the jobs as
    (label, config), where ``models`` maps the sweep's model names to specs. ``needs_run``: only models with a
    training run (zoo models) get a job. ``defaults`` are merged into every job's config (writing a default
    explicitly does not change the job key); ``options`` are the option names the kind accepts (``None``: any).
    ``neutral`` holds options added after results were published, at the value that computes what was computed
    before: a job whose option has that value leaves it out of its config (and key), so existing shards stay valid.
    """

    name: str
    fn: Callable[[dict[str, Any], Path], Result]
    per_model: bool = True
    needs_run: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)
    options: tuple[str, ...] | None = None
    expand: Expander | None = None
    neutral: Mapping[str, Any] = field(default_factory=dict)


JOB_KINDS: Registry[JobKind] = Registry("job kind")


def job_kind(name: str, *, per_model: bool = True, needs_run: bool = False, defaults: Mapping[str, Any] | None = None,
             options: Sequence[str] | None = None, expand: Expander | None = None,
             neutral: Mapping[str, Any] | None = None) -> Callable[[JobFn], JobFn]:
    """Register ``fn(config, out) -> DataFrame`` as the sweep job kind ``name`` (see :class:`JobKind`).

    ``config`` holds the job's options with ``model`` (a loadable spec; zoo models become ``file:OUT/zoo/NAME/
    final.pt``), ``run`` (the training run folder, zoo models only), ``data``, ``device`` and ``seed`` filled in,
    plus ``name`` (the model's name in the sweep) and ``key`` (the job key). The returned frame is stored as the
    job's shard (a ``model`` column with the model's name is added when missing). A kind may also return
    ``{part: frame}``: the first part is stored under the kind's name, the others under ``<kind>-<part>``.

    Example::

        @job_kind("param-count")
        def param_count(config, out):
            model = load_model(config["model"])
            return pd.DataFrame([{"params": sum(p.numel() for p in model.parameters())}])
    """

    def deco(fn: JobFn) -> JobFn:
        JOB_KINDS.register(name)(JobKind(name, fn, per_model, needs_run, dict(defaults or {}),
                                         tuple(options) if options is not None else None, expand, dict(neutral or {})))
        return fn

    return deco


def _options_of(fn: Callable, drop: Sequence[str]) -> tuple[str, ...]:
    return tuple(p for p in inspect.signature(fn).parameters if p not in drop)


def _defaults_of(fn: Callable, drop: Sequence[str]) -> dict[str, Any]:
    """The analysis' own keyword defaults (JSON-able ones): part of every job key, so an explicit default and an
    omitted one name the same job, and a changed default in a new release recomputes."""
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        if name in drop or p.default is inspect.Parameter.empty:
            continue
        if p.default is None or isinstance(p.default, (bool, int, float, str)):
            out[name] = p.default
    return out


def _analysis_job(analysis: Callable[..., pd.DataFrame], config: dict[str, Any], out: Path) -> pd.DataFrame:
    """Call a layerlab analysis ``analysis({name: spec}, data, run={name: run}, device=..., **options)``."""
    opts = {k: v for k, v in config.items() if k not in _RUNTIME_FIELDS and k != "version"}
    name = config["name"]
    if "run" in inspect.signature(analysis).parameters and config.get("run"):
        opts["run"] = {name: config["run"]}
    return analysis({name: config["model"]}, config["data"], device=config["device"], progress=False, **opts)


# Fields the runner fills in; everything else in a job's config is an option of the kind.
_RUNTIME_FIELDS = ("model", "run", "data", "device", "name", "key")
_ANALYSIS_DROP = ("models", "data", "device", "progress", "store", "run")


def _register_criticality() -> None:
    if importlib.util.find_spec("layerlab.criticality") is None:
        return
    from . import criticality as crit

    for name, fn, needs_run in (("criticality", crit.criticality, False),
                                ("module-criticality", crit.module_criticality, True)):
        job_kind(name, needs_run=needs_run, defaults={**_defaults_of(fn, _ANALYSIS_DROP), "version": crit.VERSION},
                 options=_options_of(fn, _ANALYSIS_DROP) + ("version",),
                 neutral={"norm": False})(partial(_analysis_job, fn))


@job_kind("training", options=("entry",))
def training_job(config: dict[str, Any], out: Path) -> pd.DataFrame:
    """Train one zoo model into ``OUT/zoo/<name>`` (resumes a killed run); returns its per-epoch metrics."""
    from . import runs
    from .train import Recipe
    from .train.zoo import ZooEntry, train_entry

    entry_dict = dict(config["entry"])
    entry = ZooEntry(**{**entry_dict, "recipe": Recipe(**entry_dict["recipe"])})
    device = config["device"]
    run = train_entry(entry, Path(out) / "zoo", device=device, progress=False)
    metrics = runs.run_metrics(run)
    return metrics.assign(model=entry.name, recipe=entry.recipe.name, category=entry.attrs.get("category"))


def _probe_jobs(options: dict[str, Any], models: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    count = options.get("jobs", 1)
    if not isinstance(count, int) or count < 1:
        raise SpecError(f"probe: 'jobs' must be a positive integer (how many probe jobs), got {count!r}")
    faulty = options.get("faulty")
    if faulty is not None and not (isinstance(faulty, list) and all(isinstance(i, int) for i in faulty)):
        raise SpecError(f"probe: 'faulty' must be a list of job indices such as [0, 2], got {faulty!r}")
    for opt, allowed in (("fail", (None, "once", "always")), ("crash", (None, "once", "always"))):
        if options.get(opt) not in allowed:
            raise SpecError(f"probe: '{opt}' must be once or always (or left out), got {options.get(opt)!r}")
    return [(f"probe-{i:03d}", {**options, "index": i}) for i in range(count)]


@job_kind("probe", per_model=False, expand=_probe_jobs,
          defaults={"jobs": 1, "seconds": 0.0, "rows": 1, "fail": None, "crash": None, "faulty": None},
          options=("jobs", "seconds", "rows", "fail", "crash", "faulty", "index"))
def probe_job(config: dict[str, Any], out: Path) -> pd.DataFrame:
    """A cheap synthetic job to check an engine or a cluster, and to drill failures.

    Sleeps ``seconds``, then returns ``rows`` rows (index, row, value = 10 * index + row, and where it ran: host,
    pid, the GPUs it was given). Every execution leaves ``OUT/probe/<key>/run-<ns>-<pid>`` (count them to see
    what ran twice). ``fail: always|once`` raises (``once``: the first execution only); ``crash: once|always``
    kills the process running the job (a lost Ray worker: Ray retries it; on the local engine it kills the sweep
    itself, like a power cut). ``faulty: [indices]`` limits fail/crash to those probe jobs (default: all).
    """
    folder = Path(out) / "probe" / config["key"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"run-{time.time_ns()}-{os.getpid()}").touch()
    faulty = config.get("faulty") is None or config["index"] in config["faulty"]
    crash, fail = (config.get("crash"), config.get("fail")) if faulty else (None, None)
    if crash == "always" or (crash == "once" and _first_time(folder / "crashed")):
        os.kill(os.getpid(), 9)
    time.sleep(float(config.get("seconds") or 0.0))
    if fail == "always" or (fail == "once" and _first_time(folder / "failed")):
        raise RuntimeError(f"probe {config['index']}: failing on purpose (fail: {fail})")
    i = int(config["index"])
    return pd.DataFrame({"index": i, "row": range(int(config.get("rows", 1))),
                         "value": [10 * i + r for r in range(int(config.get("rows", 1)))],
                         "host": socket.gethostname(), "pid": os.getpid(),
                         "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "")})


def _first_time(marker: Path) -> bool:
    """True exactly once per marker path, across processes (exclusive create)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _invariance_jobs(options: dict[str, Any], models: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """One job per ``pairs`` entry {pretrained: NAME, finetuned: NAME, scratch: NAME (optional)} of sweep models."""
    pairs = options.get("pairs")
    where = "analysis 'invariance'"
    if not isinstance(pairs, list) or not pairs:
        raise SpecError(f"{where} needs 'pairs': a list of {{pretrained: NAME, finetuned: NAME, scratch: NAME}} "
                        f"naming models of this sweep ({', '.join(models) or 'none'})")
    rest = {k: v for k, v in options.items() if k != "pairs"}
    jobs = []
    for pair in pairs:
        if not isinstance(pair, dict) or not {"pretrained", "finetuned"} <= set(pair):
            raise SpecError(f"{where}: each pair needs 'pretrained' and 'finetuned' model names, got {pair!r}")
        _unknown(f"{where} pair", list(pair), ("pretrained", "finetuned", "scratch"))
        for role, name in pair.items():
            if name not in models:
                close = difflib.get_close_matches(str(name), list(models), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SpecError(f"{where}: {role} model {name!r} is not in this sweep{hint}; "
                                f"its models: {', '.join(models)}")
        label = f"{pair['pretrained']}->{pair['finetuned']}" + (f"|{pair['scratch']}" if pair.get("scratch") else "")
        jobs.append((label, {**rest, **{role: models[name] for role, name in pair.items()}}))
    return jobs


def _invariance_job(config: dict[str, Any], out: Path) -> dict[str, pd.DataFrame]:
    """STIR grid of one (pretrained, finetuned[, scratch]) pair; inversions cached under ``OUT/cache/inversions``."""
    from .invariance import invariance_grid

    roles = ("pretrained", "finetuned", "scratch", "version")
    opts = {k: v for k, v in config.items() if k not in _RUNTIME_FIELDS + roles}
    parts = invariance_grid(config["pretrained"], config["finetuned"], config.get("scratch"), config["data"],
                            device=config["device"], cache_dir=Path(out) / "cache" / "inversions", **opts)
    return {"grid": parts["grid"], "inversions": parts["inversions"], "summary": parts["summary"]}


def _register_invariance() -> None:
    if importlib.util.find_spec("layerlab.invariance") is None:
        return
    from . import invariance as inv

    drop = ("pretrained", "finetuned", "scratch", "data", "device", "cache", "cache_dir", "store", "progress")
    job_kind("invariance", per_model=False, expand=_invariance_jobs,
             defaults={**_defaults_of(inv.invariance_grid, drop), "version": inv.VERSION},
             options=_options_of(inv.invariance_grid, drop) + ("pairs", "version"))(_invariance_job)


def _dynamics_job(config: dict[str, Any], out: Path) -> dict[str, pd.DataFrame]:
    """CKA self-similarity, linear probes and decision-region similarity over one run's checkpoints
    (stored as ``dynamics`` (the CKA table), ``dynamics-probes``, ``dynamics-drs``, ``dynamics-training``)."""
    from .dynamics import dynamics

    opts = {k: v for k, v in config.items() if k not in _RUNTIME_FIELDS}
    parts = dynamics(config["run"], config["data"], device=config["device"], **opts)
    return {"cka": parts["cka"], "probes": parts["probes"], "drs": parts["drs"], "training": parts["training"]}


def _register_dynamics() -> None:
    if importlib.util.find_spec("layerlab.dynamics") is None:
        return
    import dataclasses

    from .dynamics import DynamicsConfig

    defaults = {f.name: list(f.default) if isinstance(f.default, tuple) else f.default
                for f in dataclasses.fields(DynamicsConfig)}
    job_kind("dynamics", needs_run=True, defaults=defaults, options=tuple(defaults),
             neutral={"tokens": "flatten"})(_dynamics_job)


_register_criticality()
_register_dynamics()
_register_invariance()


def load_plugins(plugins: Sequence[str]) -> None:
    """Import each plugin (a module name, or a path to a ``.py`` file) once per process; they register job kinds."""
    for plugin in plugins:
        if plugin.endswith(".py"):
            path = Path(plugin).resolve()
            name = f"layerlab_plugin_{abs(hash(str(path))):x}"
            if name in sys.modules:
                continue
            if not path.exists():
                raise SpecError(f"plugin file {plugin!r} does not exist; list modules or .py files under 'plugins:'")
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        else:
            try:
                importlib.import_module(plugin)
            except ImportError as e:
                raise SpecError(f"plugin module {plugin!r} cannot be imported ({e}); is it on PYTHONPATH?") from None


# =================================================================================================== sweeps


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file (see the module docstring)."""

    name: str
    models: dict[str, str]  # name -> spec; zoo models are "zoo:NAME"
    zoo: Any | None  # layerlab.train.Zoo
    data: str
    analyses: dict[str, dict[str, Any]]
    resources: dict[str, float]
    retries: int = 1
    device: str = "cpu"
    seed: int = 0
    plugins: tuple[str, ...] = ()
    source: str = ""


@dataclass(frozen=True)
class Job:
    """One unit of work: its kind, model name, config (JSON-able; the key is its hash) and what it waits for."""

    kind: str
    model: str
    config: dict[str, Any]
    key: str
    after: tuple[str, ...] = ()
    num_cpus: float = 1
    num_gpus: float = 0

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.model}"


def builtin_sweep(name: str) -> Path:
    """Path of a sweep file shipped with layerlab (``demo``)."""
    return builtin_file("sweep", "sweeps", name)


def _unknown(what: str, got: Sequence[str], known: Sequence[str]) -> None:
    bad = [k for k in got if k not in known]
    if bad:
        close = difflib.get_close_matches(bad[0], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpecError(f"{what}: unknown field {bad[0]!r}{hint}; known fields: {', '.join(known)}")


def _resources(doc: Any, where: str, base: Mapping[str, float]) -> dict[str, float]:
    if doc is None:
        return dict(base)
    if not isinstance(doc, dict):
        raise SpecError(f"{where}: 'resources' must be a mapping like {{num_cpus: 1, num_gpus: 0}}, got {doc!r}")
    _unknown(f"{where} resources", list(doc), RESOURCE_FIELDS)
    out = {**base, **doc}
    for k, v in out.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise SpecError(f"{where}: resources.{k} must be a number >= 0, got {v!r}")
    if out["num_cpus"] <= 0 and out["num_gpus"] <= 0:
        raise SpecError(f"{where}: a job needs some resource; set num_cpus > 0 or num_gpus > 0")
    return out


def load_sweep(path: str | Path) -> Sweep:
    """Parse a sweep file (or a built-in sweep name such as ``demo``); every error names the field and the fix."""
    p, doc = read_spec(path, "sweep", "sweeps", shape="'analyses:' (and 'zoo:' or 'models:')")
    return parse_sweep(doc, name=p.stem, base=p.parent, source=str(p))


def parse_sweep(doc: dict[str, Any], *, name: str = "sweep", base: Path | None = None, source: str = "") -> Sweep:
    """Build a :class:`Sweep` from a parsed YAML mapping; relative zoo/plugin paths are taken from ``base``."""
    where = f"sweep {source or name}"
    _unknown(where, list(doc), SWEEP_FIELDS)
    plugins = doc.get("plugins") or []
    if isinstance(plugins, str):
        plugins = [plugins]
    plugins = tuple(str((base / pl).resolve()) if base and pl.endswith(".py") else pl for pl in plugins)
    load_plugins(plugins)

    zoo = None
    models: dict[str, str] = {}
    if doc.get("zoo"):
        from .train import load_zoo

        z = str(doc["zoo"])
        zoo = load_zoo(base / z if base and (base / z).exists() else z)
        models.update({e.name: ZOO_PREFIX + e.name for e in zoo.entries})
    extra = doc.get("models") or {}
    if isinstance(extra, list):
        extra = {str(s): str(s) for s in extra}
    if not isinstance(extra, dict):
        raise SpecError(f"{where}: 'models' must be a list of specs or a mapping name -> spec, got {extra!r}")
    for n, spec in extra.items():
        if n in models:
            raise SpecError(f"{where}: model name {n!r} is used by the zoo and by 'models'; rename one")
        if not isinstance(spec, str) or ":" not in spec:
            raise SpecError(f"{where}: model {n!r} needs a spec such as 'timm:resnet18' or 'file:PATH', got {spec!r}")
        models[str(n)] = spec

    analyses = doc.get("analyses") or {}
    if isinstance(analyses, list):
        analyses = {a: {} for a in analyses}
    if not isinstance(analyses, dict):
        raise SpecError(f"{where}: 'analyses' must map analysis names to options, e.g. {{criticality: {{trials: 3}}}}")
    analyses = {str(k): dict(v or {}) for k, v in analyses.items()}
    if not analyses and zoo is None:
        raise SpecError(f"{where} runs nothing: add 'analyses:' ({', '.join(JOB_KINDS.names())}) or a 'zoo:' to train")
    for a in analyses:
        JOB_KINDS.get(a)  # unknown analyses fail here, with the known ones listed
    if zoo is None and "training" in analyses:
        raise SpecError(f"{where}: 'training' options are given but no 'zoo:' names the models to train")
    device = str(doc.get("device", "cpu"))
    if device not in ("cpu", "auto") and not device.startswith("cuda"):
        raise SpecError(f"{where}: device must be cpu, cuda, cuda:N or auto, got {device!r}")
    retries = doc.get("retries", 1)
    if not isinstance(retries, int) or retries < 0:
        raise SpecError(f"{where}: retries must be an integer >= 0, got {retries!r}")
    res = _resources(doc.get("resources"), where, {"num_cpus": 1, "num_gpus": 0})
    sweep = Sweep(str(doc.get("name", name)), models, zoo, str(doc.get("data", "digits")), analyses, res, retries,
                  device, int(doc.get("seed", 0)), plugins, source)
    expand(sweep)  # validate options and model filters now, not inside a worker
    return sweep


def expand(sweep: Sweep) -> list[Job]:
    """The sweep's jobs, training first; an analysis job of a zoo model lists its training job in ``after``."""
    jobs: list[Job] = []
    trained: dict[str, str] = {}
    if sweep.zoo is not None:
        from .train.zoo import entry_config

        opts = sweep.analyses.get("training", {})
        res = _resources(opts.get("resources"), "analysis 'training'", sweep.resources)
        _unknown("analysis 'training'", [k for k in opts if k != "resources"], ("models",))
        for e in sweep.zoo.entries:
            if opts.get("models") and e.name not in opts["models"]:
                continue
            cfg = {"entry": json.loads(json.dumps(entry_config(e), default=str)), "device": sweep.device}
            job = Job("training", e.name, cfg, job_key(e.name, "training", cfg), (), res["num_cpus"], res["num_gpus"])
            trained[e.name] = job.key
            jobs.append(job)
    for analysis, options in sweep.analyses.items():
        if analysis == "training":
            continue
        kind = JOB_KINDS.get(analysis)
        where = f"analysis {analysis!r}"
        options = dict(options)
        res = _resources(options.pop("resources", None), where, sweep.resources)
        only = options.pop("models", None)
        data = options.pop("data", sweep.data)
        seed = options.get("seed", sweep.seed)
        if kind.options is not None:
            _unknown(where, list(options), [o for o in kind.options if o not in _RUNTIME_FIELDS])
        options = {k: v for k, v in {**kind.defaults, **options}.items()
                   if not (k in kind.neutral and v == kind.neutral[k])}
        if kind.per_model:
            if only is not None:
                missing = [m for m in only if m not in sweep.models]
                if missing:
                    raise SpecError(f"{where}: models {missing} are not in this sweep; "
                                    f"its models: {', '.join(sweep.models)}")
            names = [m for m in sweep.models if only is None or m in only]
            if kind.needs_run:
                names = [m for m in names if sweep.models[m].startswith(ZOO_PREFIX)]
            units = []
            for m in names:
                spec = sweep.models[m]
                units.append((m, {"model": spec, **({"run": spec} if spec.startswith(ZOO_PREFIX) else {})}))
        else:
            units = kind.expand(options, dict(sweep.models)) if kind.expand else [(analysis, {})]
        for model, extra in units:
            cfg = {**(options if kind.per_model else {}), **extra, "data": data, "device": sweep.device}
            if "seed" in (kind.options or ("seed",)):
                cfg["seed"] = seed
            refs = [v[len(ZOO_PREFIX):] for v in cfg.values() if isinstance(v, str) and v.startswith(ZOO_PREFIX)]
            after = tuple(dict.fromkeys(trained[r] for r in refs if r in trained))
            cfg = _normal(cfg)
            jobs.append(Job(analysis, model, cfg, job_key(model, analysis, cfg), after, res["num_cpus"], res["num_gpus"]))
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        dup = next(j for j in jobs if keys.count(j.key) > 1)
        raise SpecError(f"sweep {sweep.name}: job {dup.label} appears twice with the same config; remove the duplicate")
    return jobs


def _normal(value: Any) -> Any:
    """Whole floats as ints (``0`` and ``0.0`` are one option value, hence one job key); tuples as lists."""
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def plan(sweep: Sweep, out: str | Path) -> pd.DataFrame:
    """One row per job: kind, model, key, resources, waits-for, and whether it is done or failed in ``out``."""
    store, out = Store(out), Path(out)
    rows = []
    for j in expand(sweep):
        status = "done" if store.has(j.kind, j.key) else "failed" if _failure_path(out, j.key).exists() else "pending"
        rows.append({"kind": j.kind, "model": j.model, "key": j.key, "status": status, "num_cpus": j.num_cpus,
                     "num_gpus": j.num_gpus, "after": ",".join(j.after)})
    return pd.DataFrame(rows, columns=["kind", "model", "key", "status", "num_cpus", "num_gpus", "after"])


# ============================================================================================= running a job


def _resolve(job: Job, out: Path) -> dict[str, Any]:
    """The config a kind sees: zoo references turned into paths under ``out``, the device chosen, name and key."""
    cfg = dict(job.config)
    for name, value in cfg.items():
        if isinstance(value, str) and value.startswith(ZOO_PREFIX):  # a zoo model: its run folder / final model
            run = out.resolve() / "zoo" / value[len(ZOO_PREFIX):]
            cfg[name] = str(run) if name == "run" else f"file:{run / 'final.pt'}"
    if cfg.get("device") == "auto":
        import torch

        cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if "device" not in cfg:
        cfg["device"] = "cpu"
    return {**cfg, "name": job.model, "key": job.key}


def _failure_path(out: Path, key: str) -> Path:
    return Path(out) / "failed" / f"{key}.json"


@contextmanager
def _claim(out: Path, key: str) -> Iterator[None]:
    """Hold an exclusive lock on ``OUT/.locks/<key>.lock`` (released by the OS if the process dies).

    Two sweeps sharing a folder thus never run one job at the same time; the second waits, then finds its shard.
    Where the file system has no locks (some network mounts) this is a no-op: shards are still written atomically.
    """
    import fcntl

    lock = Path(out) / ".locks" / f"{key}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        yield
    finally:
        os.close(fd)  # closing drops the lock


@contextmanager
def _threads(num_cpus: float) -> Iterator[None]:
    """torch CPU threads = the job's CPUs, in every engine, so results do not depend on where a job ran."""
    if "torch" not in sys.modules:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(num_cpus)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _outcome(job: Job, status: str, t0: float, attempts: int = 0, error: str = "", tb: str = "") -> dict[str, Any]:
    return {"key": job.key, "kind": job.kind, "model": job.model, "status": status, "attempts": attempts,
            "seconds": round(time.time() - t0, 3), "error": error, "traceback": tb,
            "host": socket.gethostname(), "pid": os.getpid()}


def _parts(result: Any, job: Job) -> list[tuple[str, pd.DataFrame]]:
    """(analysis, frame) pairs to store, the job's own shard LAST: its presence means the job is finished."""
    if isinstance(result, pd.DataFrame):
        named = [(job.kind, result)]
    elif isinstance(result, Mapping) and result and all(isinstance(v, pd.DataFrame) for v in result.values()):
        items = list(result.items())
        named = [(f"{job.kind}-{k}", v) for k, v in items[1:]] + [(job.kind, items[0][1])]
    else:
        raise LayerlabError(f"job kind {job.kind!r} returned {type(result).__name__}; expected a pandas DataFrame "
                            "or a non-empty {part: DataFrame} mapping")
    out = []
    for analysis, frame in named:
        if frame.empty and analysis != job.kind:
            continue  # a part the options switched off; the job's own shard is always written (it marks done)
        frame = frame.reset_index(drop=True)
        if "model" not in frame.columns:
            frame.insert(0, "model", job.model)
        out.append((analysis, frame))
    return out


def run_job(job: Job, out: str | Path, retries: int = 0, plugins: Sequence[str] = ()) -> dict[str, Any]:
    """Run one job unless its shard exists; retry exceptions up to ``retries`` times; return its outcome.

    Never raises for a failing job: the outcome's ``status`` is ``done`` (ran and stored), ``cached`` (already
    stored, possibly by another sweep meanwhile) or ``failed`` (with ``error`` and ``traceback``). A user error
    (:class:`~layerlab.errors.LayerlabError`: a missing path, an unknown layer) is not retried: it would fail again.
    """
    out = Path(out)
    t0 = time.time()
    store = Store(out)
    if store.has(job.kind, job.key):
        return _outcome(job, "cached", t0)
    attempts = 0
    with _claim(out, job.key):
        if store.has(job.kind, job.key):  # another sweep finished it while we waited
            return _outcome(job, "cached", t0)
        while True:
            attempts += 1
            try:
                load_plugins(plugins)
                kind = JOB_KINDS.get(job.kind)
                with _threads(job.num_cpus):
                    parts = _parts(kind.fn(_resolve(job, out), out), job)
                meta = {"model": job.model, "kind": job.kind, "config": job.config, "host": socket.gethostname(),
                        "seconds": round(time.time() - t0, 3), "attempts": attempts}
                for analysis, frame in parts:
                    store.write(analysis, job.key, frame, meta)
                return _outcome(job, "done", t0, attempts)
            except Exception as e:  # recorded, never raised: one bad job must not stop a sweep
                permanent = isinstance(e, LayerlabError)
                if permanent or attempts > retries:
                    return _outcome(job, "failed", t0, attempts, f"{type(e).__name__}: {e}", traceback.format_exc())


def record_failure(out: str | Path, job: Job, outcome: Mapping[str, Any]) -> Path:
    """Write ``OUT/failed/<key>.json``: the job, its config and the error (atomically; the last attempt wins)."""
    doc = {"key": job.key, "kind": job.kind, "model": job.model, "config": job.config, "error": outcome.get("error", ""),
           "traceback": outcome.get("traceback", ""), "attempts": outcome.get("attempts", 0),
           "status": outcome.get("status", "failed"), "host": outcome.get("host", ""),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return atomic_write_text(_failure_path(Path(out), job.key), json.dumps(doc, indent=2, default=str))


def failures(out: str | Path) -> pd.DataFrame:
    """The failed jobs of an output folder: one row per ``OUT/failed/<key>.json`` (empty when none failed)."""
    rows = []
    for p in sorted((Path(out) / "failed").glob("*.json")):
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue  # removed or being replaced right now
        rows.append({k: d.get(k) for k in ("kind", "model", "key", "status", "attempts", "error", "time")})
    return pd.DataFrame(rows, columns=["kind", "model", "key", "status", "attempts", "error", "time"])


# =========================================================================================== running a sweep


@dataclass
class SweepResult:
    """What one run of a sweep did: an outcome row per job (status done / cached / failed / blocked)."""

    name: str
    out: Path
    outcomes: pd.DataFrame

    def count(self, status: str) -> int:
        return int((self.outcomes["status"] == status).sum()) if len(self.outcomes) else 0

    @property
    def failed(self) -> pd.DataFrame:
        return self.outcomes[self.outcomes["status"].isin(["failed", "blocked"])]

    @property
    def ok(self) -> bool:
        return self.failed.empty


def run_sweep(sweep: Sweep | str | Path, out: str | Path, *, engine: str = "local", retries: int | None = None,
              progress: bool = True, **engine_options: Any) -> SweepResult:
    """Run every unfinished job of ``sweep`` into ``out`` on ``engine`` (``local`` or ``ray``) and return outcomes.

    Finished jobs are skipped; failed ones are retried ``retries`` times (default: the sweep file's), then recorded
    in ``OUT/failed/``; the zoo table ``OUT/zoo/zoo.csv`` is rewritten at the end. ``engine_options`` go to the
    engine (ray: ``address``).
    """
    from tqdm.auto import tqdm

    from .engines import ENGINES

    sweep = sweep if isinstance(sweep, Sweep) else load_sweep(sweep)
    runner = ENGINES.get(engine)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    retries = sweep.retries if retries is None else retries
    if retries < 0:
        raise LayerlabError(f"retries must be >= 0, got {retries}")
    jobs = expand(sweep)
    store = Store(out)
    t0 = time.time()
    cached = [j for j in jobs if store.has(j.kind, j.key)]
    pending = [j for j in jobs if not store.has(j.kind, j.key)]
    by_key = {j.key: j for j in jobs}
    outcomes = [_outcome(j, "cached", t0) for j in cached]
    for j in cached:
        _failure_path(out, j.key).unlink(missing_ok=True)
    bar = tqdm(total=len(jobs), initial=len(cached), desc=f"sweep {sweep.name} ({engine})", unit="job",
               disable=not progress, dynamic_ncols=True)

    def on_outcome(o: dict[str, Any]) -> None:
        job = by_key[o["key"]]
        if o["status"] in ("failed", "blocked"):
            record_failure(out, job, o)
        else:
            _failure_path(out, job.key).unlink(missing_ok=True)
        outcomes.append(o)
        bar.update(1)
        bad = sum(x["status"] in ("failed", "blocked") for x in outcomes)
        bar.set_postfix_str(f"{job.label} {o['status']}" + (f", {bad} failed" if bad else ""))

    try:
        if pending:  # nothing to do: do not start a cluster for it
            runner(pending, out, partial(run_job, plugins=sweep.plugins), retries=retries, on_outcome=on_outcome,
                   **engine_options)
    finally:
        bar.close()
        if sweep.zoo is not None and (out / "zoo").is_dir():
            from .train import zoo_table

            zoo_table(sweep.zoo, out / "zoo")
    columns = ["key", "kind", "model", "status", "attempts", "seconds", "error", "host", "pid"]
    frame = pd.DataFrame(outcomes, columns=columns + ["traceback"]).drop(columns=["traceback"])
    _write_sweep_record(sweep, out, frame)
    return SweepResult(sweep.name, out, frame)


def _write_sweep_record(sweep: Sweep, out: Path, outcomes: pd.DataFrame) -> Path:
    """``OUT/sweeps/<name>.json``: the sweep as run (source, analyses, resources) and every job's last outcome."""
    doc = {"name": sweep.name, "source": sweep.source, "zoo": sweep.zoo.name if sweep.zoo is not None else None,
           "models": sweep.models, "data": sweep.data, "device": sweep.device, "analyses": sweep.analyses,
           "resources": sweep.resources, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "jobs": outcomes.to_dict("records")}
    return atomic_write_text(out / "sweeps" / f"{sweep.name}.json", json.dumps(doc, indent=2, default=str))

