"""What one swap replaces (a :class:`Unit`): a learnable layer, or all learnable layers of a residual block
(Zhang, Bengio, Singer 2022's unit), read off the model by :mod:`layerlab.structure`; and a unit's part of a
stored job's key."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .. import structure
from ..errors import LayerlabError
from ..layers import pick_by_name, unknown_layer

__all__ = ["UNITS", "Unit", "units_of"]

UNITS = ("layers", "blocks")


@dataclass(frozen=True)
class Unit:
    """What one swap replaces: a learnable layer, or all learnable layers of one residual block."""

    name: str
    label: str
    kind: str
    index: int
    layers: tuple[str, ...]
    params: tuple[str, ...]  # full parameter names: each layer's weight and bias, nothing else


def units_of(
    model: nn.Module, units: str = "layers", names: Sequence[str] | None = None, norm: bool = False
) -> list[Unit]:
    """The units a run walks over, in module order: every learnable layer, or every residual/transformer block
    and every layer outside blocks (Zhang et al.), as :mod:`layerlab.structure` reads them off the model. With
    ``norm`` normalisation layers (their affine weight and bias) are layers too, and members of their block.

    ``names`` selects some (layer names or labels; block names like ``layer3.1`` or labels like ``[3.1]``).
    """
    if units not in UNITS:
        raise LayerlabError(f"units must be one of {', '.join(UNITS)}, got {units!r}")
    infos = structure.learnable_layers(model, norm)
    if not infos:
        raise LayerlabError(
            f"{type(model).__name__} has no learnable Conv2d/Linear layer; criticality needs at least one"
        )
    if units == "layers":
        all_layers = [Unit(i.name, i.label, i.kind, i.index, (i.name,), structure.layer_params(model, i.name))
                      for i in infos]
        if not names:
            return all_layers
        return pick_by_name(all_layers, list(names), lambda r, close: unknown_layer(model, r, close))
    by_name = {i.name: i for i in infos}
    all_units = [
        Unit(
            key,
            structure.block_label(key) if key not in by_name else by_name[key].label,
            "block" if key not in by_name else by_name[key].kind,
            k,
            tuple(members),
            tuple(p for m in members for p in structure.layer_params(model, m)),
        )
        for k, (key, members) in enumerate(structure.block_units(model, norm).items())
    ]
    if not names:
        return all_units
    return pick_by_name(
        all_units,
        names,
        lambda n, close: f"block {n!r} does not exist (units='blocks' selects residual blocks such as "
        f"{', '.join(repr(u.name) for u in all_units[:3])})"
        + (f"; did you mean {', '.join(map(repr, close))}?" if close else ""),
    )


def _norm_params(unit: Unit, norms: set[str]) -> list[str]:
    """The unit's parameters that belong to normalisation layers (paths in ``norms``)."""
    return [p for p in unit.params if p.rpartition(".")[0] in norms]


def _unit_key(unit: Unit, norms: set[str]) -> dict[str, Any]:
    """The unit's part of a job's key: its name, and ``norm`` where it holds normalisation parameters (a block with
    its norms is another job than the block without; every other key is as before the ``norm`` option)."""
    return {"layer": unit.name, **({"norm": True} if _norm_params(unit, norms) else {})}
