"""The public API of ``import layerlab as ll``: every name reachable, cheap to import, one device policy."""
from __future__ import annotations

import inspect
import subprocess
import sys
import types

import pytest
import torch

import layerlab as ll
from layerlab.errors import LayerlabError
from layerlab.runtime import resolve_device

PUBLIC = ["criticality", "module_criticality", "linear_cka", "rbf_cka", "CKAAccumulator", "dynamics", "compare",
          "invert", "invariance_grid", "TrAct", "apply_tract", "train", "load_model", "load_data", "list_layers"]


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_is_reachable_and_listed(name):
    value = getattr(ll, name)
    assert callable(value)
    assert name in ll.__all__ and name in dir(ll)


def test_public_names_are_the_documented_objects():
    from layerlab import criticality, dynamics, invariance, similarity, tract
    from layerlab.train import loop

    assert ll.module_criticality is criticality.module_criticality
    assert ll.compare is dynamics.compare
    assert ll.invert is invariance.invert and ll.invariance_grid is invariance.invariance_grid
    assert ll.linear_cka is similarity.linear_cka and ll.CKAAccumulator is similarity.CKAAccumulator
    assert ll.TrAct is tract.TrAct and ll.apply_tract is tract.apply
    assert ll.train.train is loop.train


def test_layers_is_the_submodule_and_list_layers_the_function():
    import layerlab.layers

    assert isinstance(ll.layers, types.ModuleType) and ll.layers is layerlab.layers
    assert ll.list_layers is layerlab.layers.list_layers
    assert not hasattr(layerlab.layers, "layers")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    assert [(i.name, i.kind) for i in ll.list_layers(net)] == [("0", "Conv2d"), ("3", "Linear")]


@pytest.mark.parametrize("name", ["criticality", "dynamics", "train"])
def test_a_submodule_of_a_function_name_is_callable_as_that_function(name):
    """``ll.criticality`` is both the submodule (``ll.criticality.summarize``) and, called, the function."""
    module = sys.modules[f"layerlab.{name}"] if f"layerlab.{name}" in sys.modules else getattr(ll, name)
    assert getattr(ll, name) is module and isinstance(module, types.ModuleType)
    function = getattr(module, name)
    assert inspect.isfunction(function)
    assert inspect.signature(getattr(ll, name)) == inspect.signature(function)


def test_calling_the_module_calls_its_function(monkeypatch):
    import layerlab.criticality as crit

    seen = []
    monkeypatch.setattr(crit, "criticality", lambda *a, **k: seen.append((a, k)) or "table")
    assert ll.criticality(1, data="x") == "table" and seen == [((1,), {"data": "x"})]


def test_submodules_stay_importable_by_name():
    import layerlab.criticality as crit  # IMPORT_FROM reads the package attribute: it must be the module
    from layerlab import dynamics as dyn

    assert crit.__name__ == "layerlab.criticality" and dyn.__name__ == "layerlab.dynamics"
    assert callable(crit.summarize)


def test_the_package_and_its_callable_modules_pickle_by_name():
    """Ray ships a notebook's functions with cloudpickle, and those reference ``ll`` and ``ll.criticality``."""
    import pickle

    cloudpickle = pytest.importorskip("cloudpickle")
    for module in (ll, ll.criticality, ll.train):
        assert pickle.loads(cloudpickle.dumps(module)) is module
        assert pickle.loads(pickle.dumps(module)) is module


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'layerz'"):
        ll.layerz  # noqa: B018
    assert not hasattr(ll, "_private")


def _imported_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return set(out.split())


def test_import_layerlab_is_light():
    """No torch, plotting, Ray or CLI framework until a name is used (``layerlab --help`` stays fast)."""
    loaded = _imported_after("import layerlab")
    assert not {"torch", "matplotlib", "ray", "typer", "pandas"} & loaded


def test_using_an_analysis_does_not_import_plotting_or_ray():
    loaded = _imported_after("import layerlab as ll; ll.criticality; ll.invariance_grid; ll.train; ll.linear_cka")
    assert "torch" in loaded and not {"matplotlib", "ray", "typer"} & loaded


# ------------------------------------------------------------------------------------------- device policy


def test_device_none_is_the_models_device_or_the_cpu():
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(None, torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert resolve_device(None, torch.nn.ReLU()) == torch.device("cpu")  # no tensors at all
    assert resolve_device(None, torch.nn.BatchNorm2d(2, affine=False)) == torch.device("cpu")  # buffers only
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_device_auto_and_bad_devices():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(LayerlabError, match="not a device"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_layerlab_error():
    with pytest.raises(LayerlabError, match="CUDA is not available here"):
        resolve_device("cuda")
    with pytest.raises(LayerlabError, match="CUDA is not available here"):
        ll.invert(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)), "0", torch.rand(2, 1, 8, 8), steps=0, device="cuda")


def test_invariance_takes_images_as_its_subset_size():
    from layerlab.invariance import grid_images

    assert "images" in inspect.signature(ll.invariance_grid).parameters
    assert "n_images" not in inspect.signature(ll.invariance_grid).parameters
    x = torch.rand(10, 1, 8, 8)
    assert grid_images(x, images=4).shape == (4, 1, 8, 8)
    assert grid_images(x).shape == (10, 1, 8, 8)  # "auto": 128, or all when fewer


def test_warnings_point_at_the_users_line_not_at_layerlab():
    """``ll.criticality`` runs through the callable-module shim (_api.py) and several layerlab frames; the warning
    about a model without a known constructor must name this file, where the user called it."""
    from torch import nn

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8) % 10
    with pytest.warns(UserWarning, match="reset_parameters") as caught:
        ll.criticality(net, (x, y), trials=1, layers=["0"])
    assert {w.filename for w in caught if "reset_parameters" in str(w.message)} == {__file__}
