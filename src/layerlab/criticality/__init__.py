"""Layer criticality: which layers does a trained model actually use?

Re-randomise one layer (or residual block) at a time, keep every other parameter trained, and measure how much
the model's output moves (Gavrikov, Agnihotri, Keuper, Keuper 2024, arXiv 2410.14470; METHODS.md section 1):

    criticality(l) = 100 * (1 - mean_t mean_x cos(softmax f(x), softmax f_{l <- fresh_t}(x)))    [%]

where trial t copies layer l's weight and bias from ONE fresh, untrained instance of the same architecture (from
``fresh=``, the model's spec, its exact timm/torchvision constructor, or each layer's ``reset_parameters()``:
:func:`layerlab.models.fresh_source`; built on the CPU so results do not depend on the device) under the seed
``derive_seed("criticality/fresh", seed, t)`` (:mod:`layerlab.seeds`): a stream of its own that no training seed
can coincide with. (With ``seed + t``, trial 0 of a model trained under seed 0 re-installed the
layer's own initial weights and measured a reset to init, not a re-randomisation.) Where the run is known (a
layerlab checkpoint inside its run folder, or ``run=``), a fresh instance equal to the run's epoch-0 weights is an
error. Normalisation layers are not touched (the paper randomises Conv2d/Linear only); ``norm=True`` makes their
affine weight and bias units too, an opt-in extension (their running statistics stay the trained model's). Every
layer and trial sees the same images in the same order. Per (layer, trial) the table also holds top-1 agreement
with the original model, top-1 accuracy after the swap (Zhang, Bengio, Singer 2022's metric) and
KL(original || swapped).

Other references for layer l (``mode``):

* ``reinit``      -- Zhang et al. 2022 re-initialisation: l's weights at step 0 of training (a run's epoch-0
                     checkpoint, theta_0);
* ``checkpoint``  -- Zhang et al. robustness to checkpoint tau: l's weights at checkpoint tau of the run;
* ``units="blocks"`` resets all layers of a residual block together (Zhang et al.'s unit).

:func:`module_criticality` is Chatterji, Neyshabur, Sedghi 2020's module criticality.

The model is never modified: every forward is ``torch.func.functional_call`` with a swapped parameter dict, so
after any run, including one that raised, the model reproduces its logits bit for bit.

Speed (the naive way runs the whole network over all images for every (layer, trial)): the model is cut into a
chain of stages (stem modules, residual blocks, pool, head; :func:`stage_decomposition`); per batch the input to
every stage is computed once with the original weights, and a swap of layer l re-runs only from l's stage on.
The T references of a layer share one pass: their stage outputs are stacked along the batch and the rest of the
network runs once (eval-mode BatchNorm keeps this exact). On CUDA, bf16 autocast and channels_last are on by
default. ``naive=True`` runs the reference implementation; both agree to float precision.

The package, one job per module, read top to bottom in the order the data flows:

* :mod:`.metrics`     -- the per-image numbers of one swap (pure functions: cosine, agreement, accuracy, KL);
* :mod:`.units`       -- what one swap replaces (:class:`Unit`: a layer or a residual block) and its job key;
* :mod:`.pipeline`    -- the model run stage by stage with swapped parameters (:class:`Pipeline`);
* :mod:`.references`  -- where the swapped weights come from (:class:`Reference`: fresh instance or checkpoint);
* :mod:`.engine`      -- every (unit, reference) swap measured over all images on the cached stage inputs;
* :mod:`.jobs`        -- what both analyses share: store keys (:data:`ANALYSIS`, :data:`VERSION`), models, device;
* :mod:`.driver`      -- :func:`criticality`, the analysis (Gavrikov et al. 2024; Zhang et al. 2022);
* :mod:`.module`      -- :func:`module_criticality` (Chatterji et al. 2020);
* :mod:`.intervals`   -- confidence: the bootstrap over images and trials, adaptive sampling's stopping rule;
* :mod:`.tables`      -- the tables: summaries with intervals, differences, settling over training, critical sets
                         under shift, and the files a run writes.

The demo's side (zoo figures) lives in :mod:`layerlab.demos.criticality` and the figures in
:mod:`layerlab.plots.criticality`; nothing here imports them. ``layerlab.criticality`` is itself callable
(``ll.criticality(model, data)``, :mod:`layerlab._api`), so no submodule may be named ``criticality``.
"""
from __future__ import annotations

from .driver import criticality
from .engine import MAX_STACK, Trace
from .jobs import ANALYSIS, MODULE_ANALYSIS, VERSION, ModelLike
from .metrics import kl_divergence, layer_criticality, softmax_cosine
from .module import SIGMA_MIN, SIGMA_RTOL, module_criticality
from .pipeline import Pipeline, stage_decomposition
from .references import MODES, Reference, known_run
from .tables import (
    CRITICAL, average_criticality, critical_sets, derive, differences, network_criticality, replicates, settling, summarize,
    write_tables,
)
from .units import UNITS, Unit, units_of

__all__ = [
    "ANALYSIS", "CRITICAL", "MAX_STACK", "MODES", "MODULE_ANALYSIS", "ModelLike", "Pipeline", "Reference", "SIGMA_MIN",
    "SIGMA_RTOL", "Trace", "UNITS", "Unit", "VERSION", "average_criticality", "critical_sets", "criticality", "derive", "differences", "kl_divergence",
    "known_run", "layer_criticality", "module_criticality", "network_criticality", "replicates", "settling", "softmax_cosine",
    "stage_decomposition", "summarize", "units_of", "write_tables",
]
