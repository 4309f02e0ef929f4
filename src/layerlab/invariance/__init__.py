"""Invariances under finetuning: representation inversion, STIR, and the pretrained x finetuned grid.

Merlin, Nanda, Rawal, Toneva 2023 ("What Happens During Finetuning of Vision Transformers: An Invariance Based
Investigation", arXiv 2307.06006) ask which invariances of a pretrained model survive finetuning, and where they
move. Their tool is STIR (Nanda et al. 2022, "Measuring Representational Robustness of Neural Networks Through
Shared Invariances"); METHODS.md section 4 pins down the details.

One module per step, in the order the analysis runs them:

* :mod:`~layerlab.invariance.inputs` -- input ranges, image, layer and device checks, the forward to one layer;
* :mod:`~layerlab.invariance.inversion` -- :func:`invert` (images a layer sees like the originals),
  :func:`initial_noise`, :func:`matching_loss` and the :class:`InversionCache`;
* :mod:`~layerlab.invariance.measure` -- :func:`stir`, STIR(m2_j | m1_i) = CKA(m2_j(X), m2_j(X'_i));
* :mod:`~layerlab.invariance.grid` -- :func:`invariance_grid`, every layer pair of every model pair, stored;
* :mod:`~layerlab.invariance.summary` -- :func:`summarize` (retention, transfer, compression per layer),
  :func:`grid_matrix`, :func:`example_inversions`.

The figures are in :mod:`layerlab.plots.invariance`, the demo step in :mod:`layerlab.demos.invariance`; neither is
imported here.
"""
from __future__ import annotations

from .grid import as_model_spec, grid_images, invariance_grid
from .inputs import default_layers
from .inversion import InversionCache, initial_noise, invert, matching_loss
from .measure import stir
from .summary import example_inversions, grid_matrix, summarize

# constants, attributes of the package as before: layerlab.sweep reads VERSION; ANALYSIS, INVERSIONS, SUMMARY name tables
from .grid import ANALYSIS, INVERSIONS, SUMMARY  # noqa: F401
from .inputs import DEFAULT_RANGE  # noqa: F401
from .inversion import VERSION  # noqa: F401
from .measure import ESTIMATORS  # noqa: F401

__all__ = [
    "InversionCache",
    "as_model_spec",
    "default_layers",
    "example_inversions",
    "grid_images",
    "grid_matrix",
    "initial_noise",
    "invariance_grid",
    "invert",
    "matching_loss",
    "stir",
    "summarize",
]
