"""The public names of ``import layerlab as ll`` and the machinery that loads them lazily.

Kept apart from ``__init__`` so the table reads on its own: each public name maps to the submodule that
defines it and the attribute there (None: the submodule itself). Three names are both a submodule and a
function (``criticality``, ``dynamics``, ``train``). A plain function bound in the package would be replaced by
the submodule as soon as anything imports ``layerlab.criticality`` (the import system binds submodules on their
parent), so ``ll.criticality`` would be a function or a module depending on import order. Instead the
submodule itself becomes callable (:class:`CallableModule`), whoever imports it first.
"""
from __future__ import annotations

import types
from typing import Any

#: public name -> (submodule, attribute or None for the submodule itself)
EXPORTS: dict[str, tuple[str, str | None]] = {
    # analyses; each returns tidy pandas tables (columns documented in its docstring)
    "criticality": ("criticality", None),
    "module_criticality": ("criticality", "module_criticality"),
    "dynamics": ("dynamics", None),
    "compare": ("dynamics", "compare"),
    "invert": ("invariance", "invert"),
    "invariance_grid": ("invariance", "invariance_grid"),
    "prune": ("prune", None),
    # representational similarity
    "linear_cka": ("similarity", "linear_cka"),
    "rbf_cka": ("similarity", "rbf_cka"),
    "CKAAccumulator": ("similarity", "CKAAccumulator"),
    # training
    "train": ("train", None),
    "TrAct": ("tract", "TrAct"),
    "apply_tract": ("tract", "apply"),
    # inputs
    "load_model": ("models", "load_model"),
    "fresh_model": ("models", "fresh_model"),
    "save_checkpoint": ("models", "save_checkpoint"),
    "load_data": ("data", "load_data"),
    "ImageData": ("data", "ImageData"),
    "list_layers": ("layers", "list_layers"),
    "LayerInfo": ("layers", "LayerInfo"),
    # results and errors
    "Store": ("store", "Store"),
    "LayerlabError": ("errors", "LayerlabError"),
    "resolve_device": ("runtime", "resolve_device"),
}

#: submodules that, called, call their namesake function
CALLABLE_MODULES = frozenset(name for name, (module, attr) in EXPORTS.items() if attr is None and module == name)


class _ByName(types.ModuleType):
    """Pickles as a re-import, like a plain module under cloudpickle (Ray), which knows only ModuleType itself."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        import importlib

        return importlib.import_module, (self.__name__,)


class CallableModule(_ByName):
    """A submodule that calls its namesake function when called: ``layerlab.criticality(...)`` is
    ``layerlab.criticality.criticality(...)``. ``inspect.signature`` reports the function's signature."""

    def __function(self) -> Any:  # a method: a property would shadow a global of that name
        return self.__dict__[self.__name__.rpartition(".")[2]]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__function()(*args, **kwargs)

    @property
    def __signature__(self) -> Any:
        import inspect

        return inspect.signature(self.__function())


class Package(_ByName):
    """The ``layerlab`` package object: makes a :data:`CALLABLE_MODULES` submodule callable when it is bound."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in CALLABLE_MODULES and type(value) is types.ModuleType:
            value.__class__ = CallableModule
        super().__setattr__(name, value)
