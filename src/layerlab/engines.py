"""Engines: where the jobs of a sweep run. ``local`` runs them one after another in this process; ``ray`` submits
each as a Ray task with the job's CPUs and GPUs to a local or an existing Ray cluster.

An engine only schedules: it gets the pending jobs (each with ``key``, ``after``, ``num_cpus``, ``num_gpus``,
``label``), a ``run(job, out, retries) -> outcome`` function that does the work idempotently
(:func:`layerlab.sweep.run_job`), and reports every outcome to ``on_outcome`` as soon as it is known. A job runs
only after the jobs it waits for (``after``) are done; if one of them failed, the job is not run and its outcome is
``blocked``. Adding an engine is one decorated function::

    @engine("threads")
    def thread_engine(jobs, out, run, *, retries, on_outcome): ...
"""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import LayerlabError, warn
from .registry import Registry

__all__ = ["ENGINES", "engine", "import_ray", "local_engine", "ray_engine", "topo_order"]

Outcome = dict[str, Any]
Runner = Callable[[Any, Path, int], Outcome]
OnOutcome = Callable[[Outcome], None]
EngineFn = Callable[..., None]

ENGINES: Registry[EngineFn] = Registry("engine")
BAD = ("failed", "blocked")


def engine(name: str) -> Callable[[EngineFn], EngineFn]:
    """Register an engine ``fn(jobs, out, run, *, retries, on_outcome, **options)`` under ``name``."""
    return ENGINES.register(name)


def topo_order(jobs: Sequence[Any]) -> list[Any]:
    """Jobs ordered so that each comes after those it waits for; ties keep the given order.

    Waiting on a key that is not among ``jobs`` (finished earlier) counts as satisfied; a cycle raises.
    """
    keys = {j.key for j in jobs}
    waits = {j.key: {k for k in j.after if k in keys} for j in jobs}
    done: set[str] = set()
    order: list[Any] = []
    left = list(jobs)
    while left:
        ready = [j for j in left if waits[j.key] <= done]
        if not ready:
            raise LayerlabError(f"jobs wait on each other in a cycle: {', '.join(j.label for j in left)}")
        order += ready
        done |= {j.key for j in ready}
        left = [j for j in left if j.key not in done]
    return order


def blocked(job: Any, failed: Sequence[str]) -> Outcome:
    """The outcome of a job that did not run because the jobs it waits for (labels ``failed``) failed."""
    names = ", ".join(failed)
    return {"key": job.key, "kind": job.kind, "model": job.model, "status": "blocked", "attempts": 0, "seconds": 0.0,
            "error": f"not run: it needs {names}, which failed; fix that and re-run the sweep", "traceback": "",
            "host": "", "pid": 0}


def _no_options(name: str, options: dict[str, Any]) -> None:
    given = {k: v for k, v in options.items() if v is not None}
    if given:
        raise LayerlabError(f"the {name} engine takes no option {', '.join(map(repr, given))}; "
                            f"{'--address belongs to --engine ray' if 'address' in given else 'remove it'}")


@engine("local")
def local_engine(jobs: Sequence[Any], out: Path, run: Runner, *, retries: int, on_outcome: OnOutcome,
                 **options: Any) -> None:
    """Run the jobs in this process, in dependency order, one at a time."""
    _no_options("local", options)
    status: dict[str, str] = {}
    labels = {j.key: j.label for j in jobs}
    for job in topo_order(jobs):
        bad = [labels[k] for k in job.after if status.get(k) in BAD]
        outcome = blocked(job, bad) if bad else run(job, out, retries)
        status[job.key] = outcome["status"]
        on_outcome(outcome)


# ===================================================================================================== ray


def import_ray():
    """Import Ray, or fail with how to install it."""
    try:
        import ray
    except ImportError:
        raise LayerlabError(
            "the ray engine needs Ray, which is not installed: pip install 'layerlab[ray]' "
            "(or pip install 'ray[default]'); or run the sweep with --engine local"
        ) from None
    return ray


def _ray_task(run: Runner, job: Any, out: str, retries: int, *waited: Outcome) -> Outcome:
    """The body of one Ray task: skip when a job it waited for failed, else run the job."""
    bad = [f"{o['kind']}:{o['model']}" for o in waited if o["status"] in BAD]
    if bad:
        return blocked(job, bad)
    return run(job, Path(out), retries)


def _crash_outcome(job: Any, error: BaseException, retries: int) -> Outcome:
    kind = type(error).__name__
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return {"key": job.key, "kind": job.kind, "model": job.model, "status": "failed", "attempts": retries + 1,
            "seconds": 0.0, "error": f"{kind}: the job's Ray task was lost {retries + 1} time(s) (worker or node died, "
            f"or out of memory): {first}", "traceback": str(error), "host": "", "pid": 0}


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast and clearly when nothing listens at a HOST:PORT address (Ray itself would retry for minutes)."""
    host, _, port = address.rpartition(":")
    if address.startswith("ray://") or not host or not port.isdigit():
        return  # 'auto' or a Ray Client address: Ray's own check is quick and says what is wrong
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise LayerlabError(
            f"no Ray cluster answers at {address} ({e.strerror or e}); start one with `ray start --head` (it prints "
            "the address to pass) or leave out --address to start a local cluster for this sweep"
        ) from None


def _check_fits(jobs: Sequence[Any], cluster: dict[str, float], *, fixed: bool) -> None:
    """A job asking for more CPUs or GPUs than the whole cluster has would wait forever: say so before submitting.

    On a cluster this sweep started (``fixed``) that is an error; on an existing one it is a warning, since an
    autoscaler may still add nodes.
    """
    for res, name in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
        need = max((getattr(j, res) for j in jobs), default=0)
        have = cluster.get(name, 0.0)
        if need > have:
            job = next(j for j in jobs if getattr(j, res) == need)
            msg = (f"job {job.label} asks for {need:g} {name}(s) ({res} in the sweep file) but the Ray cluster has "
                   f"{have:g}; lower resources.{res}" + (" or run on a machine that has them" if fixed else
                                                         ", or add nodes: until then those jobs wait"))
            if fixed:
                raise LayerlabError(msg)
            warn(msg)


@engine("ray")
def ray_engine(jobs: Sequence[Any], out: Path, run: Runner, *, retries: int, on_outcome: OnOutcome,
               address: str | None = None, num_cpus: int | None = None, init: dict[str, Any] | None = None) -> None:
    """Submit every job as a Ray task (``num_cpus``/``num_gpus`` of the job) and collect outcomes as they finish.

    Uses the Ray session this process already has (a notebook, a test), else connects to the cluster at
    ``address`` (``auto``, ``HOST:PORT`` or ``ray://HOST:10001``), else starts a local one (``num_cpus`` CPUs,
    default all) and stops it at the end. A task whose worker dies is retried by Ray up to ``retries`` times; a job
    that raises is retried by :func:`layerlab.sweep.run_job`. ``out`` must be a folder every node sees (one
    machine, or a shared file system).
    """
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        opts: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, **(init or {})}
        if address:
            _check_reachable(address)
            opts["address"] = address
        else:
            opts.setdefault("_node_ip_address", "127.0.0.1")  # a local cluster stays on loopback
            if num_cpus:
                opts["num_cpus"] = num_cpus
        try:
            ray.init(**opts)
        except ConnectionError as e:
            where = f"the Ray cluster at {address!r}" if address else "a Ray cluster"
            raise LayerlabError(f"cannot reach {where} ({e}); start one with `ray start --head` and pass its "
                                "address, or leave out --address to start a local one") from None
        started = True
    try:
        _check_fits(jobs, ray.cluster_resources(), fixed=started and not address)
    except BaseException:
        if started:
            ray.shutdown()
        raise
    out_abs = str(Path(out).resolve())
    labels = {j.key: j.label for j in jobs}
    task = ray.remote(_ray_task)
    refs: dict[str, Any] = {}
    job_of: dict[Any, Any] = {}
    try:
        for job in topo_order(jobs):
            waited = [refs[k] for k in job.after if k in refs]
            ref = task.options(num_cpus=job.num_cpus, num_gpus=job.num_gpus, max_retries=retries,
                               retry_exceptions=False, name=job.label).remote(run, job, out_abs, retries, *waited)
            refs[job.key] = ref
            job_of[ref] = job
        pending = list(refs.values())
        status: dict[str, str] = {}
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)  # wakes for Ctrl-C and signals
            for ref in ready:
                job = job_of[ref]
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as e:
                    bad = [labels[k] for k in job.after if status.get(k) in BAD]
                    outcome = blocked(job, bad) if bad else _crash_outcome(job, e, retries)
                status[job.key] = outcome["status"]
                on_outcome(outcome)
    except BaseException:
        for ref in job_of:
            try:
                ray.cancel(ref)
            except Exception:  # already finished or gone
                pass
        raise
    finally:
        if started:
            ray.shutdown()
