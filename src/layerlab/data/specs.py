"""Data specs: the registry of data sources and the one way in, ``load_data(spec, split, images, seed)``.

A spec is ``source[:ARG][?k=v&...]`` (the forms are listed in :mod:`layerlab.data`); each source registers a
function ``(arg, split, opts) -> ImageData | Listing`` in :data:`DATA_SOURCES` (the sources themselves live in
:mod:`layerlab.data.sources`). Only the chosen rows are decoded, once per process (memoised).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qsl

import torch

from ..errors import DataError, SpecError, warn
from ..registry import Registry
from .images import ImageData, subset_rows

DATA_SOURCES: Registry[Callable[..., "ImageData | Listing"]] = Registry("data source")
SPLITS = ("train", "test", "val")
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_data_spec(spec: str) -> tuple[str, str, dict]:
    """'cifar10:/data?x=1' -> ('cifar10', '/data', {'x': '1'})."""
    if not isinstance(spec, str) or not spec:
        raise SpecError(f"data spec {spec!r} is empty; use 'digits', 'cifar10:DIR', 'imagefolder:DIR' or 'imagenet-val:DIR'")
    query = ""
    if "?" in spec:
        spec, query = spec.split("?", 1)
    source, _, arg = spec.partition(":")
    return source, arg, dict(parse_qsl(query))


@dataclass
class Listing:
    """What a source found before decoding: ``count`` items and ``take(rows)`` to decode just those rows."""

    count: int
    take: Callable[[torch.Tensor], ImageData]
    labels: torch.Tensor

    @classmethod
    def of(cls, data: ImageData) -> "Listing":
        return cls(len(data), data.subset, data.labels)


def _parse_classes(value: str) -> list[int]:
    """'0-4' -> [0, 1, 2, 3, 4]; '1,3,5' -> [1, 3, 5]."""
    out: list[int] = []
    try:
        for part in value.replace("+", ",").split(","):
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise SpecError(f"classes={value!r} is not a class list like '0-4' or '1,3,5'") from None
    return sorted(set(out))


def load_data(spec: str, split: str = "test", images: int | None = None, seed: int = 0, *, arg: str = "--images",
              n: int | None = None) -> ImageData:
    """Load ``split`` of the data set ``spec``; ``images`` picks a fixed seeded subset (indices in ``.indices``),
    the same name as every analysis' subset size.

    Only the chosen images are decoded, once per process (memoised): repeated evaluations reuse the tensor.
    ``images`` larger than the split is a DataError that names the split's size; ``arg`` is how the message names
    the option that set it (``--images`` for the analyses, ``--train-n`` for training). ``n`` is the old name of
    ``images`` (a FutureWarning).

    >>> d = load_data("digits?size=8", "test", images=5, seed=0)
    >>> tuple(d.images.shape), d.split
    ((5, 3, 8, 8), 'test')
    """
    if n is not None:
        if images is not None:
            raise SpecError("load_data: pass images= only (n= is its old name)")
        warn("load_data(n=...) is now load_data(images=...), the subset size's name in every analysis", FutureWarning)
        images = n
    if split not in SPLITS:
        raise SpecError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    data = _load(spec, split, images, seed, arg)
    return ImageData(data.images, data.labels, data.indices, data.classes, spec, split, dict(data.meta, seed=seed))


@functools.lru_cache(maxsize=16)
def _load(spec: str, split: str, n: int | None, seed: int, arg: str) -> ImageData:
    source, arg_dir, opts = parse_data_spec(spec)
    opts_classes = opts.pop("classes", None)
    classes = _parse_classes(opts_classes) if opts_classes is not None else None
    listing = _listing(source, arg_dir, tuple(sorted(opts.items())), split)
    pool = torch.arange(listing.count)
    if classes is not None:  # a class subset, relabelled 0..k-1 in the order given
        pool = pool[torch.isin(listing.labels, torch.tensor(classes))]
    if pool.numel() == 0:
        raise DataError(f"data set {spec!r} split {split!r} holds no images; check the path, its layout and any classes= option")
    # The same row choice as ImageData.sample: positions within the (class-filtered) pool, chosen before decoding.
    rows = pool[subset_rows(pool.numel(), n, seed, f"the {split} split of {spec!r}", arg)]
    data = listing.take(rows)
    data.images = data.images.contiguous()
    if classes is not None and max(classes) >= len(data.classes):
        raise SpecError(f"classes={opts_classes}: {spec!r} has classes 0-{len(data.classes) - 1}; "
                        "ask only for classes in that range")
    if classes is not None:
        remap = torch.full((int(listing.labels.max()) + 1,), -1, dtype=torch.long)
        remap[torch.tensor(classes)] = torch.arange(len(classes))
        data.labels = remap[data.labels]
        data.classes = [data.classes[c] for c in classes]
    return data


@functools.lru_cache(maxsize=8)
def _listing(source: str, arg: str, opts: tuple, split: str) -> Listing:
    found = DATA_SOURCES.get(source)(arg, split, dict(opts))
    return found if isinstance(found, Listing) else Listing.of(found)


def _options(opts: dict, source: str, known: tuple[str, ...]) -> None:
    """Raise SpecError for an option ``source`` does not read (a typo would otherwise fall back to a default)."""
    unknown = sorted(set(opts) - set(known))
    if unknown:
        allowed = ", ".join(known + ("classes",))
        raise SpecError(f"data source '{source}' has no option {unknown[0]!r}; its options are: {allowed}")


def _flag(opts: dict, key: str, source: str) -> bool:
    """A boolean spec option: true/1/yes/on or false/0/no/off (absent: false)."""
    value = str(opts.get(key, "false")).lower()
    if value not in TRUE_WORDS + FALSE_WORDS:
        raise SpecError(f"{source}: {key}={opts[key]!r} is not a boolean; write {key}=true or {key}=false")
    return value in TRUE_WORDS


def _int_option(opts: dict, key: str, source: str, default: int | None) -> int | None:
    """A positive integer spec option such as size=32."""
    if key not in opts:
        return default
    try:
        value = int(opts[key])
    except ValueError:
        value = 0
    if value < 1:
        raise SpecError(f"{source}: {key}={opts[key]!r} is not a positive integer; write e.g. {key}=32")
    return value


def _need_dir(arg: str, source: str) -> Path:
    if not arg:
        raise SpecError(f"data spec '{source}:' needs a directory, e.g. '{source}:/data/{source}'")
    p = Path(arg).expanduser()
    if not p.is_dir():
        raise DataError(f"data directory {str(p)!r} for '{source}' does not exist; pass an existing path as '{source}:DIR'")
    return p
