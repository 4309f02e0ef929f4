"""layerlab: how a vision model uses its layers and how training shapes them.

One way in for each kind of input (``load_model``, ``load_data``), analyses as plain functions that return
tidy pandas tables, and a store that persists them as Parquet shards. The public API, ``import layerlab as ll``:

* analyses: ``ll.criticality``, ``ll.module_criticality``, ``ll.dynamics``, ``ll.compare``, ``ll.invert``,
  ``ll.invariance_grid``, ``ll.prune``; similarity: ``ll.linear_cka``, ``ll.rbf_cka``, ``ll.CKAAccumulator``;
* training: ``ll.train``, ``ll.TrAct``, ``ll.apply_tract``;
* inputs: ``ll.load_model``, ``ll.load_data``, ``ll.list_layers``.

Names load on first use (PEP 562), so ``import layerlab`` imports neither torch nor matplotlib, ray or typer.
``ll.criticality``, ``ll.dynamics`` and ``ll.train`` are the submodules of those names, made callable: calling
one calls its namesake function (``ll.criticality(model, data)`` is ``ll.criticality.criticality(model, data)``),
while ``ll.criticality.summarize`` and ``import layerlab.criticality as crit`` keep working.

>>> import torch, layerlab as ll
>>> [i.name for i in ll.list_layers(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()))]
['0']
>>> round(ll.linear_cka(torch.eye(4), torch.eye(4)), 6)
1.0
"""
from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from ._api import EXPORTS, Package

__version__ = "0.1.0"

# The package object enforces "a callable submodule is its own namesake": see _api.Package.
sys.modules[__name__].__class__ = Package

__all__ = sorted(EXPORTS)

if TYPE_CHECKING:  # what static checkers and IDEs see; at run time names load lazily in __getattr__
    from . import criticality, dynamics, prune, train
    from .criticality import module_criticality
    from .data import ImageData, load_data
    from .dynamics import compare
    from .errors import LayerlabError
    from .invariance import invariance_grid, invert
    from .layers import LayerInfo, list_layers
    from .models import fresh_model, load_model, save_checkpoint
    from .similarity import CKAAccumulator, linear_cka, rbf_cka
    from .store import Store
    from .tract import TrAct
    from .tract import apply as apply_tract


def __getattr__(name: str) -> Any:
    """Load a public name (or a submodule, ``ll.layers``) on first use and keep it."""
    if name in EXPORTS:
        module, attr = EXPORTS[name]
        value: Any = importlib.import_module(f"{__name__}.{module}")
        if attr is not None:
            value = getattr(value, attr)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")  # the import binds it here too
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, ``__version__`` and the submodules (not the helpers this file imports)."""
    import pkgutil

    submodules = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    return sorted(set(__all__) | submodules | {"__version__"})

