"""benchmarks/gpu.sh: ``--smoke`` runs the GPU set's code paths tiny on the CPU and writes sane records; without
``--smoke`` a machine with no GPU gets one clear line and exit code 2 (issue 15)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
RECORDS = ("gpu_criticality", "gpu_cka", "gpu_tract_resnet", "gpu_tract_vit")
FIELDS = {"benchmark", "commit", "device", "device_type", "torch", "cuda", "threads", "load_before", "load_after",
          "conditions", "times", "summary", "ratios", "measures", "rounds", "rounds_planned", "mode", "wall_s"}
NO_GPU_LINE = ("error: benchmarks/gpu.sh needs a CUDA GPU (torch.cuda.is_available() is False); run with --smoke "
               "for the CPU smoke test")


def _env() -> dict[str, str]:
    """This interpreter first on PATH (gpu.sh calls `python`), one thread everywhere, nothing from the network."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHON"] = sys.executable
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu-smoke")
    done = subprocess.run(["bash", str(SCRIPT), "--smoke", "--threads", "1", "--out", str(out)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=600)
    return done, out


def test_smoke_exits_zero_and_states_its_time(smoke):
    done, out = smoke
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "total:" in done.stdout
    run = json.loads((out / "gpu_run.json").read_text())
    assert run["mode"] == "smoke" and run["device"] == "cpu" and run["rc"] == {"demo": 0, "set": 0}
    assert run["total_s"] > 0 and set(run["phases_s"]) == {"peers", "demo", "set"}


@pytest.mark.parametrize("name", RECORDS)
def test_smoke_record_has_the_evidence(smoke, name):
    done, out = smoke
    assert done.returncode == 0, done.stderr[-3000:]
    rec = json.loads((out / f"{name}.json").read_text())
    assert FIELDS <= set(rec), sorted(FIELDS - set(rec))
    assert rec["mode"] == "smoke" and rec["device_type"] == "cpu" and rec["device"].startswith("CPU")
    assert rec["commit"] and rec["torch"] == torch.__version__ and rec["threads"] == 1
    assert rec["load_before"] >= 0 and rec["load_after"] >= 0 and rec["conditions"]
    assert rec["rounds"] == rec["rounds_planned"] >= 1 and rec["cut_by_budget"] is False
    assert len(rec["times"]) >= 2  # at least two sides compared
    for side, times in rec["times"].items():
        assert len(times) == rec["rounds"] and all(t > 0 for t in times), side
        s = rec["summary"][side]
        assert 0 < s["min"] <= s["median"] <= s["max"]
    assert rec["ratios"]
    for r in rec["ratios"]:
        assert len(r["per_round"]) == rec["rounds"] and all(v > 0 for v in r["per_round"])
        assert r["ci"][0] <= r["median"] <= r["ci"][1], r
    assert rec["wall_s"] > 0


def test_smoke_measures(smoke):
    done, out = smoke
    assert done.returncode == 0, done.stderr[-3000:]
    crit = json.loads((out / "gpu_criticality.json").read_text())
    m = crit["measures"]
    assert set(crit["times"]) == {"naive", "fast"}
    assert m["stages"] > 1 and len(m["stage_costs_ms"]) == m["stages"]
    assert m["suffix_only_s"] > 0 and m["naive_model_s"] > 0 and m["ceiling_speedup"] >= 1.0
    assert m["max_abs_diff_fast_naive_points"] < 5.0  # bf16 autocast on both sides; the same jobs
    cka = json.loads((out / "gpu_cka.json").read_text())
    assert {"layerlab", "forward-only"} <= set(cka["times"]) and cka["measures"]["layers"] > 1
    for key in ("resnet", "vit"):
        tract = json.loads((out / f"gpu_tract_{key}.json").read_text())
        assert {"vanilla", "layerlab"} <= set(tract["times"])
        assert "layerlab_overhead_pct" in tract["measures"]


def test_without_gpu_one_line_and_exit_2(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the full set would run")
    done = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path / "out")], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip() == NO_GPU_LINE
    assert not (tmp_path / "out").exists()  # it stopped before doing anything
