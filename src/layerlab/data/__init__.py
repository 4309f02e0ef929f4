"""Data specs: one registry, one way in (``load_data(spec, split, images, seed)``); batches for every analysis.

Spec forms::

    digits[?size=32&channels=3]   the embedded default: scikit-learn's handwritten digits (1,797 real 8x8 scans,
                                  10 classes, shipped inside the scikit-learn wheel, so no network), upsampled
    cifar10:DIR / cifar100:DIR    the torchvision on-disk format (cifar-10-batches-py / cifar-100-python)
    imagefolder:DIR[?size=S&crop=1&skip_bad=true]
                                  DIR/<split>/<class>/*.png|jpg (or DIR/<class>/... for every split)
    imagenet-val:DIR[?size=224&skip_bad=true]
                                  ImageNet validation: DIR/<wnid>/*.JPEG, or flat DIR/*.JPEG + LOC_val_solution.csv

Any spec takes ``classes=0-4`` (or ``1,3,5``): only those classes, relabelled 0..k-1 (for finetuning splits).
An option a source does not know is an error (a typo never silently falls back to a default).

An unreadable image file (truncated, corrupt, not an image) stops loading with an error naming the file.
``skip_bad=true`` on ``imagefolder:`` and ``imagenet-val:`` skips such files instead, with a warning that
lists them (also kept in ``ImageData.meta["skipped"]``); files are decoded lazily, so a subset then holds
fewer images than asked, by exactly the files listed.

Images are decoded once into a uint8 tensor [N, C, H, W] (memoised per process), and a fixed seeded subset
(:func:`subset_rows`, stream ``data/subset``) records the indices it chose, so every layer, trial and
checkpoint sees the same images in the same order. :meth:`ImageData.sample` draws the same subset from an
``ImageData`` in memory as ``load_data(spec, split, n, seed)`` draws from disk.

An ``ImageData`` built by hand may hold uint8 images (0..255) or floating images (0..1); :func:`to_unit_float`
turns either into float32 in [0, 1], the one input convention of every model and analysis.

Modules: :mod:`~layerlab.data.images` (ImageData, the [0, 1] convention, the seeded subset),
:mod:`~layerlab.data.specs` (spec parsing, the source registry, ``load_data``), :mod:`~layerlab.data.sources`
(the built-in sources), :mod:`~layerlab.data.inputs` (the user's own tensors) and :mod:`~layerlab.data.batches`
(``as_batches``: any data as re-iterable batches). Every public name is importable from ``layerlab.data``.
"""
from __future__ import annotations

from . import sources  # noqa: F401  (registers the built-in data sources)
from .batches import (
    Batches, DataLike, DatasetBatches, LoaderBatches, TensorBatches, as_batches, batch_checksum, changed_between_passes,
)
from .images import UNIT_SLACK, ImageData, check_label_coverage, subset_rows, to_unit_float
from .inputs import as_model_input, check_batch_labels
from .sources import DECODE_ERRORS, IMAGE_SUFFIXES
from .specs import DATA_SOURCES, FALSE_WORDS, SPLITS, TRUE_WORDS, Listing, load_data, parse_data_spec

__all__ = [
    "DATA_SOURCES", "DECODE_ERRORS", "FALSE_WORDS", "IMAGE_SUFFIXES", "SPLITS", "TRUE_WORDS", "UNIT_SLACK",
    "Batches", "DataLike", "DatasetBatches", "ImageData", "Listing", "LoaderBatches", "TensorBatches",
    "as_batches", "as_model_input", "batch_checksum", "changed_between_passes", "check_batch_labels",
    "check_label_coverage", "load_data", "parse_data_spec", "subset_rows", "to_unit_float",
]
