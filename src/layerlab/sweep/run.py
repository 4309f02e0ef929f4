"""Running jobs and sweeps: one job idempotently (claimed, retried, stored atomically, failures recorded), and a
whole sweep on an engine (:mod:`layerlab.engines`)."""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import pandas as pd

from ..errors import LayerlabError
from ..store import Store, atomic_write_text, resumed
from .kinds import JOB_KINDS, ZOO_PREFIX, load_plugins
from .spec import Job, Sweep, _failure_path, expand, load_sweep


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
    from ..runtime import threads

    with threads(num_cpus):
        yield


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
    if store.done(job.kind, job.key):
        return _outcome(job, "cached", t0)
    attempts = 0
    with _claim(out, job.key):
        if store.done(job.kind, job.key):  # another sweep finished it while we waited
            return _outcome(job, "cached", t0)
        while True:
            attempts += 1
            try:
                load_plugins(plugins)
                kind = JOB_KINDS.get(job.kind)
                with _threads(job.num_cpus):
                    result = kind.fn(_resolve(job, out), out, store) if kind.stores else kind.fn(_resolve(job, out), out)
                meta = {"model": job.model, "kind": job.kind, "config": job.config, "host": socket.gethostname(),
                        "seconds": round(time.time() - t0, 3), "attempts": attempts}
                if kind.stores:
                    store.mark_done(job.kind, job.key, meta)
                else:
                    for analysis, frame in _parts(result, job):
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

    from ..engines import ENGINES

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
    cached = [j for j in jobs if store.done(j.kind, j.key)]
    pending = [j for j in jobs if not store.done(j.kind, j.key)]
    by_key = {j.key: j for j in jobs}
    outcomes = [_outcome(j, "cached", t0) for j in cached]
    resumed(len(cached), len(jobs), out, unit="sweep jobs")
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
            from ..train import zoo_table

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

