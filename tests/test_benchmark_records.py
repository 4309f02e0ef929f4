"""Benchmark evidence is generated, not transcribed: records (benchmarks/record.py) and the RESULTS.md blocks
rendered from them (benchmarks/render.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import record  # noqa: E402
import render  # noqa: E402


def test_recorder_interleaves_and_bounds_the_paired_ratio(tmp_path):
    rec = record.Recorder("toy", "A toy comparison", conditions={"model": "none"})
    naive, fast = [0.30, 0.32, 0.31, 0.29, 0.30], [0.10, 0.11, 0.10, 0.09, 0.10]
    for a, b in zip(naive, fast):  # rounds as a benchmark interleaves them (the times given, not measured)
        rec.record["times"].setdefault("naive", []).append(a)
        rec.record["times"].setdefault("fast", []).append(b)
    r = rec.ratio("naive", "fast", target=2.5)
    per_round = [a / b for a, b in zip(naive, fast)]
    assert r["per_round"] == pytest.approx(per_round)
    assert r["median"] == pytest.approx(float(np.median(per_round)))
    assert r["ci"][0] <= r["median"] <= r["ci"][1]
    assert r["met"] is bool(r["ci"][0] >= 2.5) and r["met"]
    assert rec.ratio("naive", "fast", target=3.1)["met"] is False  # the median may clear it, the interval does not
    out = rec.write(tmp_path)
    data = json.loads(out.read_text())
    assert data["rounds"] == 5 and data["summary"]["fast"]["min"] == pytest.approx(0.09)
    assert {"commit", "device", "torch", "threads", "load_before", "load_after", "conditions"} <= set(data)
    assert rec.time("fast", lambda: 7) == 7 and len(rec.record["times"]["fast"]) == 6


def test_render_fills_blocks_from_records_and_says_when_one_is_missing(tmp_path):
    rec = {"benchmark": "x", "title": "t", "started": "2026-11-30 12:00:00", "device": "CPU x86_64, 2 cores",
           "commit": "abc1234", "dirty": False, "torch": "2.14.1", "cuda": None, "threads": 1, "load_before": 0.5,
           "load_after": 0.7, "rounds": 2, "conditions": {"data": "digits"}, "times": {"a": [2.0, 2.2], "b": [1.0, 1.0]},
           "summary": {"a": {"median": 2.1, "min": 2.0, "max": 2.2}, "b": {"median": 1.0, "min": 1.0, "max": 1.0}},
           "ratios": [{"label": "a / b", "median": 2.1, "ci": [2.0, 2.2], "target": 2.0, "met": True}],
           "measures": {"forwards_ratio": 1.61}, "notes": ""}
    (tmp_path / "x.json").write_text(json.dumps(rec))
    text = "intro\n<!-- record: x -->\nstale 9.99x\n<!-- /record -->\n<!-- record: y -->\nold\n<!-- /record -->\nend\n"
    out = render.render(text, tmp_path)
    assert "stale" not in out and "2.10x" in out and "[2.00, 2.20]" in out and "**met**" in out and "1.61" in out
    assert "No record `y.json`" in out and "old" not in out
    assert out.startswith("intro\n") and out.endswith("end\n")
    assert render.render(out, tmp_path) == out  # idempotent


def test_results_md_is_what_the_records_render():
    done = subprocess.run([sys.executable, str(BENCH / "render.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
