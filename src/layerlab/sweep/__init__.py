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

from .kinds import JOB_KINDS, JobKind, job_kind, load_plugins
from .run import SweepResult, failures, record_failure, run_job, run_sweep
from .spec import Job, Sweep, expand, load_sweep, parse_sweep, plan

__all__ = ["JOB_KINDS", "Job", "JobKind", "Sweep", "SweepResult", "expand", "failures", "job_kind", "load_plugins",
           "load_sweep", "parse_sweep", "plan", "record_failure", "run_job", "run_sweep"]
