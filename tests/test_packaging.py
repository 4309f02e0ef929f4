"""pyproject declares ranges; constraints.txt holds the tested exact versions; constraints-lowest.txt the bounds.

Keeps the three files in step: a lower bound raised in one must be raised in the other, and the main lock must
lie inside the declared ranges.
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PINNED_LOW = ("torch", "torchvision", "timm")


def _dependencies() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {r.name: r for r in map(Requirement, project["dependencies"])}


def _pins(path: Path) -> dict[str, Version]:
    text = path.read_text()
    return {name.lower(): Version(v) for name, v in re.findall(r"^([A-Za-z0-9_.-]+)==([^\s,#]+)", text, re.M)}


pytestmark = pytest.mark.skipif(not (ROOT / "constraints.txt").is_file(), reason="not run from a source tree")


def test_dependencies_are_ranges_not_pins():
    for name, req in _dependencies().items():
        assert not any(s.operator in ("==", "===") for s in req.specifier), f"{name} is pinned in pyproject: {req}"
    python = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert "<" not in python, f"requires-python caps the Python version: {python}"


@pytest.mark.parametrize("name", PINNED_LOW)
def test_lowest_constraints_are_the_declared_lower_bounds(name):
    lower = [Version(s.version) for s in _dependencies()[name].specifier if s.operator == ">="]
    assert lower, f"{name} has no lower bound in pyproject"
    low = _pins(ROOT / "constraints-lowest.txt")[name]
    assert low.release[: len(lower[0].release)] == lower[0].release, f"{name}: pyproject >={lower[0]}, CI tests {low}"


def test_the_lock_lies_inside_the_declared_ranges():
    pins = _pins(ROOT / "constraints.txt")
    for name, req in _dependencies().items():
        if name.lower() in pins:
            assert req.specifier.contains(pins[name.lower()], prereleases=True), f"constraints.txt {name} {pins[name.lower()]} vs {req}"
