"""Sweeps on a real local Ray cluster (2 CPUs, loopback): lost workers, a killed driver, two drivers sharing a
folder, bad input, and the same table as the local engine. Skipped only when Ray is not installed
(``pip install 'layerlab[ray]'``). One cluster serves the module; the subprocess drivers join it with --address.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from layerlab.store import Store  # noqa: E402
from layerlab.sweep import failures, run_sweep  # noqa: E402

from helpers import TINY, TINY_ZOO, Deadline, assert_clean, executions, shard_files, write  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster() -> str:
    """A local 2-CPU Ray cluster on loopback for the whole module; yields its address for other drivers."""
    with Deadline(90):
        info = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield info.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(autouse=True)
def _deadline():
    with Deadline(120):
        yield


def driver(sweep: Path, out: Path, address: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "layerlab.cli", "sweep", str(sweep), "--out", str(out), "--engine", "ray",
           "--address", address]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_killed_worker_is_retried_and_every_result_lands_once(cluster, tmp_path):
    """Job 1 kills its own worker process on its first attempt; Ray retries it; the sweep completes."""
    out = tmp_path / "out"
    s = write(tmp_path / "s.yaml", "retries: 2\nanalyses: {probe: {jobs: 4, seconds: 0.2, crash: once, faulty: [1]}}\n")
    r = run_sweep(s, out, engine="ray", progress=False)
    assert r.ok and r.count("done") == 4, r.outcomes
    assert_clean(out, "probe", 4)
    runs = executions(out)
    key1 = r.outcomes.set_index("model").loc["probe-001", "key"]
    assert runs == {k: (2 if k == key1 else 1) for k in runs}
    assert sorted(Store(out).read("probe")["index"]) == [0, 1, 2, 3]


def test_worker_lost_on_every_attempt_fails_alone(cluster, tmp_path):
    out = tmp_path / "out"
    s = write(tmp_path / "s.yaml", "retries: 1\nanalyses: {probe: {jobs: 3, crash: always, faulty: [0]}}\n")
    r = run_sweep(s, out, engine="ray", progress=False)
    status = r.outcomes.set_index("model")["status"].to_dict()
    assert status == {"probe-000": "failed", "probe-001": "done", "probe-002": "done"}
    f = failures(out)
    assert len(f) == 1 and "lost 2 time(s)" in f["error"].iloc[0]
    assert executions(out)[f["key"].iloc[0]] == 2  # first try + one retry


def test_killed_driver_rerun_recomputes_nothing(cluster, tmp_path):
    out = tmp_path / "out"
    # one job at a time (2 CPUs each): the new driver needs one fresh worker, not two (workers start slowly)
    s = write(tmp_path / "s.yaml", "name: k\nresources: {num_cpus: 2}\nanalyses: {probe: {jobs: 8, seconds: 0.4}}\n")
    proc = driver(s, out, cluster)
    try:
        deadline = time.time() + 90
        while len(shard_files(out, "probe")) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    finished, ran = shard_files(out, "probe"), executions(out)
    assert 3 <= len(finished) < 8

    r = run_sweep(s, out, engine="ray", progress=False)
    assert r.ok and r.count("cached") >= len(finished)
    after = shard_files(out, "probe")
    assert {k: after[k] for k in finished} == finished  # finished shards never rewritten
    assert all(executions(out)[k] == ran[k] for k in finished)  # nor recomputed
    assert_clean(out, "probe", 8, temps_ok=True)
    assert sorted(Store(out).read("probe")["index"]) == list(range(8))


def test_two_drivers_share_one_folder(cluster, tmp_path):
    out = tmp_path / "out"
    s = write(tmp_path / "s.yaml", "name: two\nanalyses: {probe: {jobs: 6, seconds: 0.3, rows: 3}}\n")
    procs = [driver(s, out, cluster) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=100)
        assert p.returncode == 0, err.decode()[-3000:]
    assert_clean(out, "probe", 6)
    assert set(executions(out).values()) == {1}  # the per-job lock: no job ran twice
    table = Store(out).read("probe")
    assert len(table) == 18 and not table.duplicated(["index", "row"]).any()


def test_bad_input_fails_clearly_and_alone(cluster, tmp_path):
    out = tmp_path / "out"
    missing_data = write(tmp_path / "a.yaml", f"""
        models: {{good: "{TINY}"}}
        data: "cifar10:{tmp_path}/nope"
        analyses: {{criticality: {{trials: 1, images: 8}}, probe: {{jobs: 2}}}}
    """)
    r = run_sweep(missing_data, out, engine="ray", progress=False)
    o = r.outcomes.set_index(["kind", "model"])
    assert o["status"].to_dict() == {("criticality", "good"): "failed", ("probe", "probe-000"): "done",
                                     ("probe", "probe-001"): "done"}
    err = o.loc[("criticality", "good"), "error"]
    assert err.startswith("DataError") and "nope" in err and "does not exist" in err
    assert o.loc[("criticality", "good"), "attempts"] == 1  # a user error is not retried

    bad_layer = write(tmp_path / "b.yaml", f"""
        models: {{good: "{TINY}"}}
        analyses: {{criticality: {{trials: 1, images: 8, layers: [layer7.0.conv9]}}}}
    """)
    r = run_sweep(bad_layer, out, engine="ray", progress=False)
    assert r.count("failed") == 1 and "layer7.0.conv9" in r.outcomes["error"].iloc[0]

    write(tmp_path / "zoo.yaml", 'name: z\narch: "%s"\nmodels: {broken: {data: "cifar10:/nope", epochs: 1}}\n' % TINY)
    broken = write(tmp_path / "c.yaml", "zoo: zoo.yaml\nanalyses: {criticality: {trials: 1, images: 8}}\n")
    r = run_sweep(broken, out, engine="ray", progress=False)
    o = r.outcomes.set_index("kind")
    assert o.loc["training", "status"] == "failed" and o.loc["criticality", "status"] == "blocked"
    assert "needs training:broken, which failed" in o.loc["criticality", "error"]
    assert len(failures(out)) == 4 and Store(out).analyses() == ["probe"]


def _comparable(store: Store, analysis: str) -> pd.DataFrame:
    t = store.read(analysis).drop(columns=["seconds"], errors="ignore")
    keys = [c for c in ("model", "layer", "trial", "epoch") if c in t.columns]
    return t.sort_values(keys).reset_index(drop=True)


def test_ray_and_local_give_the_same_tables(cluster, tmp_path):
    """A 2-model zoo (1 epoch) trained and analysed on both engines: the same tables, up to row order."""
    write(tmp_path / "zoo.yaml", TINY_ZOO)
    s = write(tmp_path / "s.yaml", "zoo: zoo.yaml\nanalyses: {criticality: {trials: 2, images: 32}}\n")
    local = run_sweep(s, tmp_path / "local", engine="local", progress=False)
    remote = run_sweep(s, tmp_path / "ray", engine="ray", progress=False)
    assert local.ok and remote.ok and remote.count("done") == 4
    a, b = Store(tmp_path / "local"), Store(tmp_path / "ray")
    for analysis in ("training", "criticality"):
        pd.testing.assert_frame_equal(_comparable(a, analysis), _comparable(b, analysis), check_exact=False, rtol=1e-5)
    assert sorted(p.name for p in a.paths("criticality")) == sorted(p.name for p in b.paths("criticality"))
    zoo_a, zoo_b = (pd.read_csv(p / "zoo" / "zoo.csv") for p in (tmp_path / "local", tmp_path / "ray"))
    assert zoo_a["accuracy"].tolist() == zoo_b["accuracy"].tolist() and len(zoo_a) == 2
