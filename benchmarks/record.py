"""Benchmark records: every benchmark run writes one JSON file that says what was measured, where, and how sure.

A record holds the git commit, the device, torch/CUDA versions, threads, the load average before and after, the
conditions (model, weights, data), each side's per-round times (sides interleaved round by round: a, b, a, b ...),
their medians and spread, and each paired ratio: the per-round ratios, their median and a 95 % bootstrap interval
of that median. A target is met only when the interval clears it. ``benchmarks/render.py`` turns the records
into tables; nothing in them is typed by hand.

    from record import Recorder
    rec = Recorder("criticality_adaptive", "Adaptive sampling vs fixed N", conditions={...})
    for _ in range(rounds):
        rec.time("fixed", lambda: run_fixed())
        rec.time("adaptive", lambda: run_adaptive())
    rec.ratio("fixed", "adaptive", target=3.0)
    rec.measure("forwards_ratio", 1.61)
    rec.write()                       # benchmarks/records/criticality_adaptive.json (atomic)
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RECORDS = Path(__file__).resolve().parent / "records"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip()  # the repository root: "src" below
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str = "cpu") -> dict[str, Any]:
    """Where a record was measured: commit, device in words, versions, threads."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = f"CPU {platform.machine()}, {os.cpu_count()} cores"
    return {
        "commit": _git("rev-parse", "--short", "HEAD"), "dirty": bool(_git("status", "--porcelain", "--", "src")),
        "device": name, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None, "threads": torch.get_num_threads(),
        "packages": packages(),
    }


#: the libraries a figure depends on: the model zoo and the peers compared against (installed --no-deps)
PACKAGES = ("timm", "torchvision", "torch-tract", "pytorch-cka", "torch-cka", "ckatorch")


def packages() -> dict[str, str]:
    """Installed versions of :data:`PACKAGES` (a peer imported from PYTHONPATH counts: its dist-info is found)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def median_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(median, 2.5 %, 97.5 %) of the median by a percentile bootstrap over the values (rounds)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 1:
        return float(v[0]), float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    meds = np.median(v[rng.integers(0, len(v), size=(resamples, len(v)))], axis=1)
    lo, hi = np.quantile(meds, [0.025, 0.975])
    return float(np.median(v)), float(lo), float(hi)


class Recorder:
    """Collects one benchmark run; :meth:`write` saves it as ``records/<name>.json``."""

    def __init__(self, name: str, title: str, *, conditions: dict[str, Any], device: str = "cpu",
                 notes: str = "") -> None:
        self.name, self.title, self.notes = name, title, notes
        self.record: dict[str, Any] = {
            "benchmark": name, "title": title, **environment(device), "conditions": conditions,
            "load_before": os.getloadavg()[0], "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "times": {}, "ratios": [], "measures": {}, "notes": notes,
        }

    def time(self, side: str, fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> Any:
        """Run ``fn`` once, add its wall time to ``side``'s rounds; returns what ``fn`` returned."""
        if sync:
            sync()
        t0 = time.perf_counter()
        out = fn()
        if sync:
            sync()
        self.record["times"].setdefault(side, []).append(time.perf_counter() - t0)
        return out

    def ratio(self, numerator: str, denominator: str, *, target: float | None = None, label: str = "") -> dict:
        """The paired ratio numerator/denominator per round, its median and 95 % interval; met when lo >= target."""
        a, b = self.record["times"][numerator], self.record["times"][denominator]
        per_round = [x / y for x, y in zip(a, b)]
        med, lo, hi = median_interval(per_round)
        entry = {"label": label or f"{numerator} / {denominator}", "numerator": numerator, "denominator": denominator,
                 "per_round": per_round, "median": med, "ci": [lo, hi], "target": target,
                 "met": None if target is None else bool(lo >= target)}
        self.record["ratios"].append(entry)
        return entry

    def measure(self, key: str, value: Any) -> None:
        """Any other number the benchmark reports (counts, differences, accuracies)."""
        self.record["measures"][key] = value

    def write(self, folder: Path = RECORDS) -> Path:
        rec = self.record
        rec["load_after"] = os.getloadavg()[0]
        rec["rounds"] = max((len(v) for v in rec["times"].values()), default=0)
        rec["summary"] = {side: {"median": float(np.median(v)), "min": float(np.min(v)), "max": float(np.max(v))}
                          for side, v in rec["times"].items()}
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(rec, indent=1, default=float) + "\n")
        tmp.replace(path)
        print(f"record: {path}")
        return path
