"""Docstring examples are tests: every ``>>>`` example in the package runs here and must pass.

Only modules whose source holds an example are imported (so plotting, Ray and the CLI load only if they have
examples). The minimum count keeps examples from silently disappearing, e.g. behind a failed discovery.
"""
from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest
import torch

import layerlab

MIN_EXAMPLES = 45  # a little below today's count (51); raise it as examples are added


def _modules_with_examples() -> list[str]:
    names = ["layerlab"] + [m.name for m in pkgutil.walk_packages(layerlab.__path__, "layerlab.")]
    out = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and spec.origin.endswith(".py") and ">>>" in Path(spec.origin).read_text():
            out.append(name)
    return out


MODULES = _modules_with_examples()


def _run(name: str) -> doctest.TestResults:
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only cost here
    try:
        for test in finder.find(module, name):
            runner.run(test)
    finally:
        torch.set_num_threads(threads)
    return runner.summarize(verbose=False)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_pass(name, capsys):
    result = _run(name)
    report = capsys.readouterr().out
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed:\n{report}"
    assert result.attempted > 0, f"{name} has '>>>' in its source but no example ran"


def test_enough_examples_are_found():
    finder = doctest.DocTestFinder(exclude_empty=True)
    total = sum(len(t.examples) for name in MODULES for t in finder.find(importlib.import_module(name), name))
    assert total >= MIN_EXAMPLES, f"only {total} docstring examples found (expected >= {MIN_EXAMPLES})"
