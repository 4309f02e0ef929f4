"""Sweeps on the local engine: expansion, idempotence, retries, failures, plugins, and crash safety.

Cheap synthetic ``probe`` jobs do the scheduling checks; one tiny real criticality and training job each check
that bad input fails clearly and alone. Ray lives in test_sweep_ray.py.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from layerlab.engines import import_ray, topo_order
from layerlab.errors import LayerlabError, SpecError
from layerlab.store import Store
from layerlab.sweep import Job, expand, failures, load_sweep, plan, run_sweep

from helpers import TINY, TINY_ZOO, Deadline, assert_clean, executions, shard_files, write  # noqa: E402

@pytest.fixture(autouse=True)
def _deadline():
    """No test here may run past 150 s (SIGALRM raises in the test, which then fails)."""
    with Deadline(150):
        yield


# ----------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("doc, message", [
    ("analyses: {probe: {}}\nmodles: []\n", "unknown field 'modles' .*did you mean 'models'"),
    ("analyses: {critcality: {}}\n", "unknown job kind 'critcality'.*did you mean 'criticality'"),
    ("analyses: {probe: {jobs: 0}}\n", "positive integer"),
    ("analyses: {probe: {}}\nresources: {num_cpu: 1}\n", "unknown field 'num_cpu'.*num_cpus"),
    ("analyses: {probe: {}}\nresources: {num_cpus: 0}\n", "needs some resource"),
    ("models: [\"" + TINY + "\"]\nanalyses: {criticality: {trails: 3}}\n", "unknown field 'trails'.*'trials'"),
    ("models: {a: \"" + TINY + "\"}\nanalyses: {criticality: {models: [b]}}\n", r"models \['b'\] are not in this sweep"),
    ("models: {a: resnet18}\nanalyses: {probe: {}}\n", "needs a spec such as 'timm:resnet18'"),
    ("name: x\n", "runs nothing"),
    ("analyses: {probe: {}}\nretries: -1\n", "retries must be an integer >= 0"),
])
def test_sweep_file_errors_name_the_field_and_the_fix(tmp_path, doc, message):
    with pytest.raises(SpecError, match=message):
        load_sweep(write(tmp_path / "s.yaml", doc))


def test_missing_sweep_file_and_builtin(tmp_path):
    with pytest.raises(LayerlabError, match="does not exist"):
        load_sweep(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="built-in sweeps: demo"):
        load_sweep("nope")
    demo = load_sweep("demo")
    jobs = expand(demo)
    assert [j.kind for j in jobs].count("training") == 10 and [j.kind for j in jobs].count("criticality") == 10


def test_expand_puts_training_first_and_keys_are_stable(tmp_path):
    write(tmp_path / "zoo.yaml", TINY_ZOO)
    a = load_sweep(write(tmp_path / "a.yaml", """
        zoo: zoo.yaml
        models: {random: "%s"}
        analyses: {criticality: {images: 16}, probe: {jobs: 2}}
    """ % TINY))
    jobs = expand(a)
    assert [(j.kind, j.model) for j in jobs] == [
        ("training", "baseline"), ("training", "adam"), ("criticality", "baseline"), ("criticality", "adam"),
        ("criticality", "random"), ("probe", "probe-000"), ("probe", "probe-001")]
    train = {j.model: j.key for j in jobs if j.kind == "training"}
    crit = {j.model: j for j in jobs if j.kind == "criticality"}
    assert crit["baseline"].after == (train["baseline"],) and crit["random"].after == ()
    assert crit["baseline"].config["model"] == "zoo:baseline" and crit["random"].config["model"] == TINY
    # writing the analysis' own default explicitly names the same job (same key, same shard)
    b = load_sweep(write(tmp_path / "b.yaml", """
        zoo: zoo.yaml
        models: {random: "%s"}
        analyses: {criticality: {images: 16, trials: 3, mode: randomize}, probe: {jobs: 2, seconds: 0}}
    """ % TINY))
    assert [j.key for j in expand(b)] == [j.key for j in jobs]
    assert (plan(a, tmp_path / "out")["status"] == "pending").all()


def test_topo_order_respects_waits_and_rejects_cycles():
    a, b, c = (Job("probe", n, {}, n, after) for n, after in (("a", ("b",)), ("b", ()), ("c", ("gone",))))
    assert [j.key for j in topo_order([a, b, c])] == ["b", "c", "a"]
    with pytest.raises(LayerlabError, match="cycle"):
        topo_order([Job("probe", "x", {}, "x", ("y",)), Job("probe", "y", {}, "y", ("x",))])


def test_unreachable_ray_address_fails_fast():
    import socket

    from layerlab.engines import _check_reachable

    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(LayerlabError, match=f"no Ray cluster answers at 127.0.0.1:{port}.*ray start --head"):
        _check_reachable(f"127.0.0.1:{port}")
    _check_reachable("auto")  # left to Ray


def test_jobs_that_cannot_fit_the_cluster_are_refused():
    from layerlab.engines import _check_fits

    jobs = [Job("probe", "a", {}, "a", (), 1, 0), Job("probe", "b", {}, "b", (), 1, 1)]
    with pytest.raises(LayerlabError, match="probe:b asks for 1 GPU.*has 0; lower resources.num_gpus"):
        _check_fits(jobs, {"CPU": 2.0}, fixed=True)
    with pytest.warns(UserWarning, match="add nodes"):
        _check_fits(jobs, {"CPU": 2.0}, fixed=False)
    _check_fits(jobs, {"CPU": 2.0, "GPU": 1.0}, fixed=True)


def test_missing_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(LayerlabError, match=r"pip install 'layerlab\[ray\]'.*--engine local"):
        import_ray()


# ----------------------------------------------------------------------------------------------- running


def test_local_sweep_skips_finished_jobs_retries_and_records_failures(tmp_path):
    out = tmp_path / "out"
    bad = write(tmp_path / "bad.yaml", """
        name: p
        retries: 1
        analyses: {probe: {jobs: 3, rows: 2, fail: always, faulty: [1]}}
    """)
    r = run_sweep(bad, out, progress=False)
    status = dict(zip(r.outcomes["model"], r.outcomes["status"]))
    assert status == {"probe-000": "done", "probe-001": "failed", "probe-002": "done"}
    failed = failures(out)
    assert len(failed) == 1 and failed["attempts"].iloc[0] == 2  # one retry, then recorded
    assert "failing on purpose" in failed["error"].iloc[0]
    doc = json.loads(next((out / "failed").glob("*.json")).read_text())
    assert "RuntimeError" in doc["traceback"] and doc["config"]["index"] == 1
    assert sorted(Store(out).read("probe")["value"]) == [0, 1, 20, 21]
    runs_before = executions(out)

    again = run_sweep(bad, out, progress=False)  # finished jobs are skipped; the failed one runs again
    assert sorted(again.outcomes["status"]) == ["cached", "cached", "failed"]
    after = executions(out)
    failed_key = failed["key"].iloc[0]
    assert {k: after[k] - runs_before[k] for k in after} == {k: (2 if k == failed_key else 0) for k in after}

    fixed = write(tmp_path / "fixed.yaml", """
        name: p
        analyses: {probe: {jobs: 3, rows: 2, fail: always, faulty: [7]}}
    """)
    assert run_sweep(fixed, out, progress=False).ok  # other config, other keys: all new and fine
    ok = write(tmp_path / "ok.yaml", """
        name: p
        retries: 1
        analyses: {probe: {jobs: 3, rows: 2, fail: once, faulty: [1]}}
    """)
    r = run_sweep(ok, out, progress=False)
    assert r.ok and r.outcomes.set_index("model")["attempts"].to_dict() == {"probe-000": 1, "probe-001": 2, "probe-002": 1}
    assert (out / "sweeps" / "p.json").exists()


def test_bad_inputs_fail_clearly_and_alone(tmp_path):
    """A missing checkpoint and a missing data folder fail their own jobs (user errors: no retry); the rest run,
    and the analyses of a model whose training failed are not run ('blocked')."""
    out = tmp_path / "out"
    zoo = write(tmp_path / "zoo.yaml", TINY_ZOO.replace("adam: {recipe: adam}", 'broken: {recipe: adam, data: "cifar10:/nope"}'))
    s = write(tmp_path / "s.yaml", f"""
        zoo: {zoo.name}
        models: {{good: "{TINY}", missing: "file:{tmp_path}/nope/final.pt"}}
        retries: 2
        analyses:
          training: {{models: [broken]}}
          criticality: {{trials: 1, images: 8, models: [good, missing, broken]}}
          probe: {{jobs: 1}}
    """)
    r = run_sweep(s, out, progress=False)
    o = r.outcomes.set_index(["kind", "model"])
    assert o.loc[("criticality", "good"), "status"] == "done" and o.loc[("probe", "probe-000"), "status"] == "done"
    assert o.loc[("training", "broken"), "status"] == "failed"
    assert o.loc[("training", "broken"), "attempts"] == 1  # a user error is not retried
    assert "cifar10" in o.loc[("training", "broken"), "error"] and "does not exist" in o.loc[("training", "broken"), "error"]
    assert o.loc[("criticality", "missing"), "status"] == "failed"
    assert "nope/final.pt" in o.loc[("criticality", "missing"), "error"]
    assert o.loc[("criticality", "broken"), "status"] == "blocked"
    assert "training:broken" in o.loc[("criticality", "broken"), "error"]
    assert len(failures(out)) == 3
    crit = Store(out).read("criticality")
    assert set(crit["model"]) == {"good"} and crit["criticality"].notna().all()


def test_unknown_layer_fails_alone(tmp_path):
    s = write(tmp_path / "s.yaml", f"""
        models: {{good: "{TINY}"}}
        analyses: {{criticality: {{trials: 1, images: 8, layers: [layer9.nope]}}, probe: {{jobs: 2}}}}
    """)
    r = run_sweep(s, tmp_path / "out", progress=False)
    o = r.outcomes.set_index(["kind", "model"])["status"].to_dict()
    assert o == {("criticality", "good"): "failed", ("probe", "probe-000"): "done", ("probe", "probe-001"): "done"}
    assert "layer9.nope" in failures(tmp_path / "out")["error"].iloc[0]


def test_landed_analyses_run_as_jobs(tmp_path):
    """module-criticality and dynamics (zoo models only: they need the run's checkpoints) and invariance (one job
    per pair; parts stored as invariance, invariance-inversions, ...) on a 2-model zoo, tiny settings."""
    write(tmp_path / "zoo.yaml", TINY_ZOO.replace("checkpoints: final", "checkpoints: every"))
    s = load_sweep(write(tmp_path / "s.yaml", f"""
        zoo: zoo.yaml
        models: {{random: "{TINY}"}}
        analyses:
          module-criticality: {{grid: 2, draws: 1, images: 16, layers: [conv1, fc]}}
          invariance: {{pairs: [{{pretrained: baseline, finetuned: adam}}], steps: 2, images: 8, layers: [conv1, fc]}}
          dynamics: {{layers: [conv1], images: 16, batch_size: 8, triplets: 2, resolution: 4, probe_train: 64}}
    """))
    jobs = {(j.kind, j.model): j for j in expand(s)}
    assert ("module-criticality", "random") not in jobs and ("dynamics", "random") not in jobs  # no run
    inv = jobs[("invariance", "baseline->adam")]
    assert inv.config["pretrained"] == "zoo:baseline" and "pairs" not in inv.config and len(inv.after) == 2
    r = run_sweep(s, tmp_path / "out", progress=False)
    assert r.ok, r.failed
    store = Store(tmp_path / "out")
    # the tables a direct call of each analysis writes, under the same names (one name for one table, issue 13)
    assert set(store.analyses()) == {"training", "module-criticality", "invariance", "invariance-inversions",
                                     "invariance-summary", "dynamics-cka", "dynamics-probes", "dynamics-drs",
                                     "dynamics-triplets", "dynamics-training"}
    cka = store.read("dynamics-cka")
    assert set(cka["run"]) == {"baseline", "adam"} and set(cka["epoch_a"]) == {0, 1}
    mc = store.read("module-criticality")
    assert sorted(mc["model"]) == ["adam", "adam", "baseline", "baseline"] and set(mc["layer"]) == {"conv1", "fc"}
    assert set(store.read("invariance")["metric"]) == {"stir", "noise", "cka"}
    assert (tmp_path / "out" / "cache" / "inversions").is_dir()


def test_plugin_job_kind_with_parts(tmp_path):
    write(tmp_path / "kinds.py", """
        import pandas as pd
        from layerlab.sweep import job_kind

        @job_kind("test-two-parts", per_model=True, options=("scale",))
        def two_parts(config, out):
            main = pd.DataFrame({"x": [1, 2], "y": [config["scale"], 2 * config["scale"]]})
            return {"main": main, "extra": pd.DataFrame({"spec": [config["model"]]})}
    """)
    s = write(tmp_path / "s.yaml", f"""
        plugins: [kinds.py]
        models: {{a: "{TINY}", b: "file:/somewhere.pt"}}
        analyses: {{test-two-parts: {{scale: 3}}}}
    """)
    assert run_sweep(s, tmp_path / "out", progress=False).ok
    store = Store(tmp_path / "out")
    assert store.analyses() == ["test-two-parts", "test-two-parts-extra"]
    main = store.read("test-two-parts").sort_values(["model", "x"])
    assert main["model"].tolist() == ["a", "a", "b", "b"] and main["y"].tolist() == [3, 6, 3, 6]
    assert sorted(store.read("test-two-parts-extra")["spec"]) == ["file:/somewhere.pt", TINY]
    assert run_sweep(s, tmp_path / "out", progress=False).count("cached") == 2


def test_cli_dry_run_and_exit_status(tmp_path):
    from typer.testing import CliRunner

    from layerlab.cli import app

    s = write(tmp_path / "s.yaml", "analyses: {probe: {jobs: 2, fail: always, faulty: [0]}}\nretries: 0\n")
    runner = CliRunner()
    dry = runner.invoke(app, ["sweep", str(s), "--out", str(tmp_path / "out"), "--dry-run"])
    assert dry.exit_code == 0 and dry.output.count("pending") == 2
    res = runner.invoke(app, ["sweep", str(s), "--out", str(tmp_path / "out")])
    assert res.exit_code == 1, res.output
    assert "1 done, 1 failed" in res.output and "failing on purpose" in res.output
    rep = runner.invoke(app, ["report", str(tmp_path / "out")])
    assert rep.exit_code == 0 and (tmp_path / "out" / "report.html").exists()


# ------------------------------------------------------------------------------------ crashes and sharing


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "layerlab.cli", "sweep", *args]


def _wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.1)


def test_killed_driver_resumes_without_recomputing(tmp_path):
    out = tmp_path / "out"
    s = write(tmp_path / "s.yaml", "name: k\nanalyses: {probe: {jobs: 8, seconds: 0.4}}\n")
    proc = subprocess.Popen(_cli(str(s), "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: len(shard_files(out, "probe")) >= 3 or proc.poll() is not None, 120, "3 finished jobs")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    finished = shard_files(out, "probe")
    ran = executions(out)
    assert 3 <= len(finished) < 8

    r = run_sweep(s, out, progress=False)
    assert r.ok and r.count("cached") == len(finished)
    after = shard_files(out, "probe")
    assert {k: after[k] for k in finished} == finished  # finished shards untouched (same mtime)
    assert all(executions(out)[k] == ran[k] for k in finished)  # and never run again
    assert_clean(out, "probe", 8, temps_ok=True)
    assert sorted(Store(out).read("probe")["index"]) == list(range(8))


def test_two_sweeps_share_one_folder(tmp_path):
    """Two drivers at once on one folder: every job runs once (a lock per job), every shard whole and single."""
    out = tmp_path / "out"
    s = write(tmp_path / "s.yaml", "name: two\nanalyses: {probe: {jobs: 6, seconds: 0.3, rows: 3}}\n")
    procs = [subprocess.Popen(_cli(str(s), "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=140)
        assert p.returncode == 0, err.decode()[-2000:]
    assert_clean(out, "probe", 6)
    assert set(executions(out).values()) == {1}
    table = Store(out).read("probe")
    assert len(table) == 18 and not table.duplicated(["index", "row"]).any()


KEYS_YAML = """
name: keys
zoo: demo
models: {random: "timm:resnet18?num_classes=10"}
data: digits
analyses:
  training: {}
  criticality: {trials: 3, mode: randomize, models: [baseline, random]}
  module-criticality: {models: [baseline]}
  dynamics: {models: [baseline, adam]}
  invariance: {pairs: [{pretrained: baseline, finetuned: adam, scratch: random}]}
"""
#: job keys as published (commit 436d6b4): an option added since (criticality's ``norm``, dynamics' ``tokens``) at
#: its neutral value must not change them, or every stored result would be recomputed. A deliberate change of
#: what a job computes bumps the analysis' VERSION and updates this table.
PUBLISHED_KEYS = {
    ("criticality", "baseline"): "c61bba9fdcd62045",
    ("criticality", "random"): "f6c1f1c6fd9f2943",
    ("module-criticality", "baseline"): "6c24801c1e674c05",
    ("dynamics", "baseline"): "8b58fe25721817c6",
    ("dynamics", "adam"): "7b5aa8361a22f436",
    ("invariance", "baseline->adam|random"): "89abcc6eac78e822",
}


def test_job_keys_of_published_results_do_not_drift(tmp_path):
    keys = {(j.kind, j.model): j.key for j in expand(load_sweep(write(tmp_path / "keys.yaml", KEYS_YAML)))
            if j.kind != "training"}
    assert keys == PUBLISHED_KEYS
    with_norm = KEYS_YAML.replace("mode: randomize,", "mode: randomize, norm: true,")
    changed = {(j.kind, j.model): j.key for j in expand(load_sweep(write(tmp_path / "norm.yaml", with_norm)))}
    assert changed[("criticality", "baseline")] != PUBLISHED_KEYS[("criticality", "baseline")]
