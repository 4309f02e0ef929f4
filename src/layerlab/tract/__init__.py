"""TrAct: train the first layer's activations instead of its weights (Petersen et al., NeurIPS 2024).

The weight gradient of a vision model's first layer, ``grad_z^T x``, is proportional to pixel values, so
high-contrast images dominate its updates and the layer learns slowly. TrAct (Petersen, Borgelt, Ermon 2024,
arXiv:2410.23970) replaces it by the closed-form ridge solution for the weight step that best realises a
gradient step on the activations ``z = x W^T``::

    grad_W = grad_z^T x (x^T x / b + lam I_n)^(-1)

with ``x`` the ``b x n`` matrix of unfolded input rows (conv: one row per output position holding its
``C k_h k_w`` patch; linear: one row per input vector). The forward pass, the bias gradient and the input
gradient are unchanged, so the optimiser (SGD, Adam, schedules) just sees a different weight gradient.

Public API: :class:`TrAct` wraps one ``nn.Conv2d`` / ``nn.Linear``; :func:`apply` finds any model's first layer
and wraps it in place; :func:`remove` undoes it; :func:`tract_gradient` is the pure formula on row matrices.

Modules: :mod:`~layerlab.tract.gradient` (the formula and autograd functions), :mod:`~layerlab.tract.wrapper`
(:class:`TrAct`) and :mod:`~layerlab.tract.stem` (:func:`apply`, :func:`remove`). Every public name is
importable from ``layerlab.tract``.
"""
from __future__ import annotations

from .gradient import tract_gradient
from .stem import apply, remove
from .wrapper import TrAct

__all__ = ["TrAct", "apply", "remove", "tract_gradient"]
