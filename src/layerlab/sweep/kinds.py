"""Job kinds: what a sweep can run. A registry of (config, out) -> tables functions: training, the probe, and
one kind per analysis of the contract (:mod:`layerlab.analysis`); plugins add more."""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from ..errors import SpecError
from ..registry import Registry

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
    ``stores``: an analysis of the contract (:mod:`layerlab.analysis`) that writes its tables itself, per unit, as
    its API does; the job is then finished when ``OUT/jobs/<kind>/<key>.json`` exists.
    """

    name: str
    fn: Callable[[dict[str, Any], Path], Result]
    per_model: bool = True
    needs_run: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)
    options: tuple[str, ...] | None = None
    expand: Expander | None = None
    neutral: Mapping[str, Any] = field(default_factory=dict)
    stores: bool = False  # fn(config, out, store) writes its own shards; the runner then marks the job done


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


@job_kind("training", options=("entry",))
def training_job(config: dict[str, Any], out: Path) -> pd.DataFrame:
    """Train one zoo model into ``OUT/zoo/<name>`` (resumes a killed run); returns its per-epoch metrics."""
    from .. import runs
    from ..train import Recipe
    from ..train.zoo import ZooEntry, train_entry

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


def _contract_kinds() -> None:
    """A job kind for every analysis of the contract (:mod:`layerlab.analysis`) not registered yet: its config
    fields are the options (their defaults part of every key), its job writes its own shards."""
    from .. import analysis as contract

    for a in contract.analyses():
        if a.name in JOB_KINDS:
            continue
        defaults = {**contract.config_defaults(a.config)}
        options = tuple(f.name for f in dataclasses.fields(a.config))
        JOB_KINDS.register(a.name)(JobKind(a.name, partial(contract.run_job, a), a.per_model, a.needs_run, defaults,
                                           options, contract.resolve(a.expand), dict(a.neutral), stores=True))


def load_plugins(plugins: Sequence[str]) -> None:
    """Import each plugin (a module name, or a path to a ``.py`` file) once per process; they register job kinds
    (:func:`job_kind`) or whole analyses (:func:`layerlab.analysis.register`)."""
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
    _contract_kinds()  # plugins may register analyses through the contract: they become job kinds here


