"""Training dynamics of representations (Sharon & Dar 2024, arXiv 2405.17377; METHODS.md section 2).

For one training run (a checkpoint series, ``layerlab.runs``) and each analysed layer l:

* **CKA over training**: S_l(t1, t2) = CKA(H_l(t1), H_l(t2)), with H_l(t) the flattened layer-l features of a fixed
  probe set (same images, same order) under checkpoint t (a token output [N, T, D]: all tokens, the class token or
  the token mean, ``tokens``). Linear kernel, minibatch CKA with the unbiased HSIC_1
  estimator by default (Nguyen, Raghu, Kornblith 2021); the table says which estimator it holds.
* **Linear probes**: per (layer, checkpoint) a softmax probe (:mod:`layerlab.probes`) fitted on training-split
  features and scored on the test split. Probe features are the layer's map average-pooled to
  ``probe_pool x probe_pool`` (tokens: their mean, or the class token with ``tokens="cls"``), so a probe costs
  milliseconds; ``probe_pool=0`` flattens a conv map whole.
* **Decision-region similarity (DRS)**: per layer, the fraction of plane grid points (:mod:`layerlab.regions`) where
  the probes of two checkpoints agree (image -> layer-l features at t -> probe_t argmax), averaged over random
  triplets of the run's own training images (:func:`training_images`: the ``train_n`` subset of run.json, with the
  labels it was trained with, noisy ones included); the network output (``layer == "output"``) gets the same matrix
  from the network's own argmax. The ``triplets`` table names every plane's three images by data-set index.

How it is computed (one pass per checkpoint, all pairs from what the passes kept) and what it stores:
:mod:`~layerlab.dynamics.series`. The package, one job per module, in the order a newcomer reads it:

* :mod:`~layerlab.dynamics.config`     -- :class:`DynamicsConfig` (every option that shapes the tables) and the
  store's table names;
* :mod:`~layerlab.dynamics.views`      -- the layers followed (:func:`default_layers`), the logits' ``"output"``
  view, probe features and the features of image batches;
* :mod:`~layerlab.dynamics.training`   -- the run's own training images and labels (:func:`training_images`), the
  planes' anchors (:func:`triplet_table`) and :func:`training_curves`;
* :mod:`~layerlab.dynamics.passes`     -- what one checkpoint contributes: Gram matrices, probes, plane predictions;
* :mod:`~layerlab.dynamics.series`     -- :func:`dynamics`, the checkpoint-series analysis, and :func:`select_epochs`;
* :mod:`~layerlab.dynamics.phases`     -- training phases read off the tables (:func:`phase_contrast`,
  :func:`phase_table`, :func:`first_fit_epoch`, :func:`fit_summary`);
* :mod:`~layerlab.dynamics.comparison` -- :func:`compare`, layer x layer CKA of two models;
* :mod:`~layerlab.dynamics.regions`    -- :func:`decision_regions` of chosen checkpoints on one plane.

The figures are in :mod:`layerlab.plots.dynamics` and the demo step in :mod:`layerlab.demos.dynamics`; nothing here
imports them. ``layerlab.dynamics`` is itself callable (``ll.dynamics(run)`` calls :func:`dynamics`,
:mod:`layerlab._api`), so no submodule may be named ``dynamics`` (nor after another public name: ``compare``
lives in ``comparison``).
"""
from __future__ import annotations

from .comparison import compare
from .config import PROBE_TOKENS, TABLES, DynamicsConfig
from .phases import first_fit_epoch, fit_summary, phase_contrast, phase_table
from .regions import decision_regions
from .series import dynamics, select_epochs
from .training import training_curves, training_images, triplet_table
from .views import default_layers, probe_features

# constants, attributes of the package as before (store table names, the "auto" image count of compare)
from .comparison import AUTO_IMAGES  # noqa: F401
from .training import TRIPLET_SOURCE, TRIPLET_TABLE  # noqa: F401

__all__ = [
    "PROBE_TOKENS",
    "TABLES",
    "DynamicsConfig",
    "compare",
    "decision_regions",
    "default_layers",
    "dynamics",
    "first_fit_epoch",
    "fit_summary",
    "phase_contrast",
    "phase_table",
    "probe_features",
    "select_epochs",
    "training_curves",
    "training_images",
    "triplet_table",
]
