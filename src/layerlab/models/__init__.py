"""Model specs: one registry, one way in (``load_model(spec)``).

Spec forms::

    timm:NAME[?k=v&k=v]          timm architecture; a pretrained tag (``resnet50.a1_in1k``) or ``pretrained=true``
                                 loads weights from the local cache only (never downloads)
    torchvision:NAME[:WEIGHTS]   torchvision architecture, weights from the local torch hub cache only
    file:PATH                    a layerlab checkpoint (read with ``torch.load(weights_only=True)``), or a whole
                                 module saved with ``torch.save(model)``: unpickling runs code from the file, so
                                 that needs ``load_model(spec, trust_pickle=True)`` (the CLI:
                                 ``layerlab --trust-pickle COMMAND``, or ``LAYERLAB_TRUST_PICKLE=1`` in the environment)

Every model loaded from a spec carries ``model.layerlab_arch`` (an architecture spec without weights) so that a
fresh, untrained instance of the same architecture can be built (:func:`fresh_model`), which the layer
criticality analysis needs. Any other ``nn.Module`` gets its fresh instances from :func:`fresh_source`: a
``fresh=`` callable, its spec, its timm/torchvision constructor when it can be rebuilt exactly, or (last resort)
each layer's own ``reset_parameters()``.

Modules: :mod:`~layerlab.models.specs` (spec parsing, the source registry, ``load_model``),
:mod:`~layerlab.models.sources` (``timm:``, ``torchvision:``), :mod:`~layerlab.models.checkpoints` (``file:``,
``save_checkpoint``), :mod:`~layerlab.models.fresh` (fresh instances) and :mod:`~layerlab.models.normalized`
(the [0, 1] input wrapper). Every public name is importable from ``layerlab.models``.
"""
from __future__ import annotations

from . import sources  # noqa: F401  (registers the timm: and torchvision: sources)
from .checkpoints import CHECKPOINT_FORMAT, checkpoint_state, read_checkpoint_meta, save_checkpoint
from .fresh import FRESH_LAYERS, FRESH_SOURCES, FreshSource, fresh_model, fresh_source
from .normalized import IMAGENET_MEAN, IMAGENET_STD, Normalized
from .specs import _parse_value  # noqa: F401  (the CLI parses option values the same way)
from .specs import MODEL_SOURCES, TRUST_PICKLE_ENV, ModelSpec, load_model, num_outputs, trusts_pickle

__all__ = [
    "CHECKPOINT_FORMAT", "FRESH_LAYERS", "FRESH_SOURCES", "IMAGENET_MEAN", "IMAGENET_STD", "MODEL_SOURCES",
    "TRUST_PICKLE_ENV", "FreshSource", "ModelSpec", "Normalized", "checkpoint_state", "fresh_model", "fresh_source",
    "load_model", "num_outputs", "read_checkpoint_meta", "save_checkpoint", "trusts_pickle",
]
