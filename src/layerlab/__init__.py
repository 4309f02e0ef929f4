"""layerlab: how a vision model uses its layers and how training shapes them.

One way in for each kind of input (``load_model``, ``load_data``), analyses as plain functions that return
tidy pandas tables, and a store that persists them as Parquet shards.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .data import ImageData, load_data
from .errors import LayerlabError
from .layers import LayerInfo, layers
from .models import fresh_model, load_model, save_checkpoint
from .store import Store

__all__ = [
    "ImageData",
    "LayerInfo",
    "LayerlabError",
    "Store",
    "fresh_model",
    "layers",
    "load_data",
    "load_model",
    "save_checkpoint",
]
