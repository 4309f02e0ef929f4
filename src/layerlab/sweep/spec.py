"""Sweep files: parsing (every error names the field and the fix), expansion into jobs, and the plan."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from ..analysis import RUNTIME_FIELDS
from ..errors import SpecError
from ..registry import check_fields as _unknown
from ..specfiles import read_spec
from ..store import Store, job_key
from .kinds import JOB_KINDS, ZOO_PREFIX, load_plugins

SWEEP_FIELDS = ("name", "zoo", "models", "data", "device", "retries", "resources", "plugins", "analyses", "seed")
RESOURCE_FIELDS = ("num_cpus", "num_gpus")


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
        from ..train import load_zoo

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
        from ..train.zoo import entry_config

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
            _unknown(where, list(options), [o for o in kind.options if o not in RUNTIME_FIELDS])
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


def _failure_path(out: Path, key: str) -> Path:
    return Path(out) / "failed" / f"{key}.json"


def plan(sweep: Sweep, out: str | Path) -> pd.DataFrame:
    """One row per job: kind, model, key, resources, waits-for, and whether it is done or failed in ``out``."""
    store, out = Store(out), Path(out)
    rows = []
    for j in expand(sweep):
        status = "done" if store.done(j.kind, j.key) else "failed" if _failure_path(out, j.key).exists() else "pending"
        rows.append({"kind": j.kind, "model": j.model, "key": j.key, "status": status, "num_cpus": j.num_cpus,
                     "num_gpus": j.num_gpus, "after": ",".join(j.after)})
    return pd.DataFrame(rows, columns=["kind", "model", "key", "status", "num_cpus", "num_gpus", "after"])


