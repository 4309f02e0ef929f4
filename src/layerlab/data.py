"""Data specs: one registry, one way in (``load_data(spec, split, n, seed)``).

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
"""
from __future__ import annotations

import csv
from abc import ABC, abstractmethod
import functools
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Union
from urllib.parse import parse_qsl

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from . import seeds
from .errors import DataError, ShapeError, SpecError, warn
from .registry import Registry

DATA_SOURCES: Registry[Callable[..., "ImageData | Listing"]] = Registry("data source")
SPLITS = ("train", "test", "val")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
UNIT_SLACK = 1e-3  # float rounding of augmentations (AugMix blends) may step a hair outside [0, 1]
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def to_unit_float(images: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """Images as a new float32 tensor in [0, 1] on ``device``: uint8 (0..255) is divided by 255, floating
    (0..1) is kept as is. The one conversion every model input goes through, so float images are never
    divided by 255 twice (which made every image near-black and every analysis number wrong)."""
    if images.dtype == torch.uint8:
        return images.to(device).float().div_(255)
    if images.is_floating_point():
        _check_unit_range(images, "images")
        return images.to(device=device, dtype=torch.float32, copy=True)
    raise ShapeError(f"images: expected uint8 (0..255) or floating (0..1) values, got dtype {images.dtype}; "
                     "convert with x.to(torch.uint8) or x.float() / 255")


def _check_unit_range(images: torch.Tensor, name: str) -> None:
    """Raise DataError unless floating ``images`` lie in [0, 1] (0-255 floats would be silently wrong)."""
    if images.numel() == 0:
        return
    lo, hi = float(images.min()), float(images.max())
    if not (-UNIT_SLACK <= lo and hi <= 1.0 + UNIT_SLACK):  # also false for NaN
        hint = ("images look like 0-255 floats: pass uint8 or divide by 255" if hi > 1.0 and lo >= 0.0 and hi <= 255.0
                else "normalised or non-finite images are not accepted: pass uint8 or floats in [0, 1]")
        raise DataError(f"{name}: floating images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; {hint}")


def subset_rows(count: int, n: int | None, seed: int, what: str, arg: str = "--images") -> torch.Tensor:
    """Sorted positions (int64) of a fixed seeded subset of ``n`` of ``count`` items (stream ``data/subset``).

    ``n=None`` or ``n == count`` means all, in order. Asking for more than ``count`` is an error, never a silent
    ``count``: ``what`` names the collection (e.g. "the test split of 'digits'") and ``arg`` the option to fix.
    """
    if n is None or n == count:
        return torch.arange(count)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"{arg.rstrip('=')}: expected a positive number of images, got {n!r}; omit it to use all {count} "
                        f"of {what}")
    if n > count:
        fix = f"{arg}{count}" if arg.endswith("=") else f"{arg} {count}"  # images=364 (Python) or --images 364 (CLI)
        raise DataError(f"asked for {n} images but {what} holds {count}; pass {fix} or fewer (or omit it for all)")
    perm = torch.randperm(count, generator=seeds.generator("data/subset", seed))
    return perm[:n].sort().values


def check_label_coverage(num_outputs: int, data: "ImageData", what: str) -> None:
    """Raise DataError when a model with ``num_outputs`` logits cannot predict every class of ``data``.

    Fewer outputs than classes made a 5-class model score ~0.06 on 10-class digits instead of failing; more
    outputs than classes (an ImageNet model on ``classes=0-4``) stays allowed.
    """
    needed = max(data.num_classes, int(data.labels.max()) + 1 if len(data) else 0)
    if num_outputs < needed:
        name = f"{data.spec!r}" if data.spec else "the data"
        raise DataError(
            f"{what} has {num_outputs} outputs but {name} has {needed} classes (labels 0..{needed - 1}); use a model "
            f"with at least {needed} outputs (finetune it: `layerlab finetune`), or restrict the data to its classes "
            f"with '?classes=0-{max(num_outputs - 1, 0)}'"
        )


@dataclass
class ImageData:
    """Decoded images [N, C, H, W], labels (int64 [N]) and the source indices they came from.

    ``images`` are uint8 (0..255; every loader makes these) or floating (0..1; an ImageData built by hand);
    read them through :meth:`float` / :meth:`batches`, which give float32 in [0, 1] either way.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    classes: list[str]
    spec: str = ""
    split: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Reject images a model would read wrongly: not [N, C, H, W], not uint8/floating, or floats outside [0, 1]."""
        x = self.images
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ShapeError(f"ImageData.images: expected a tensor [N, C, H, W], got {got}; "
                             "add a batch dimension with x.unsqueeze(0) or a channel one with x.unsqueeze(1)")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise ShapeError(f"ImageData.images: expected uint8 (0..255) or floating (0..1), got dtype {x.dtype}")
        if x.is_floating_point():
            _check_unit_range(x, "ImageData.images")
        n = x.shape[0]
        for name in ("labels", "indices"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n,):
                got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ShapeError(f"ImageData.{name}: expected a tensor of shape ({n},), one per image, got {got}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def float(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """Images as float32 in [0, 1] on ``device`` (:func:`to_unit_float`)."""
        return to_unit_float(self.images, device)

    def subset(self, rows: torch.Tensor | np.ndarray | list[int]) -> "ImageData":
        """The images at positions ``rows``, in that order (their source ``indices`` travel along)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return ImageData(self.images[rows], self.labels[rows], self.indices[rows], self.classes, self.spec, self.split, dict(self.meta))

    def sample(self, n: int | None, seed: int, arg: str = "--images") -> "ImageData":
        """A fixed seeded subset of ``n`` images (all for ``None``), the same choice ``load_data`` makes.

        ``n`` larger than the data is a DataError naming the size (``arg`` is the option the user set).
        """
        rows = subset_rows(len(self), n, seed, self.describe(), arg)
        if n is None or n == len(self):
            return self
        out = self.subset(rows)
        out.meta["seed"] = seed
        return out

    def describe(self) -> str:
        """'the test split of 'digits'' (or 'the in-memory data'): how error messages name this data."""
        if not self.spec:
            return f"the in-memory {self.split} data" if self.split else "the in-memory data"
        return f"the {self.split or 'chosen'} split of {self.spec!r}"

    def batches(self, batch_size: int, device: str | torch.device = "cpu"):
        """Yield (float images in [0, 1], labels) batches in order."""
        for i in range(0, len(self), batch_size):
            yield to_unit_float(self.images[i : i + batch_size], device), self.labels[i : i + batch_size].to(device)


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


def _resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y.round().clamp_(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------------------ digits
@DATA_SOURCES.register("digits")
def _digits(arg: str, split: str, opts: dict) -> ImageData:
    """scikit-learn's handwritten digits: 1,797 8x8 grey scans (UCI), a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits

    _options(opts, "digits", ("size", "channels"))
    size, channels = _int_option(opts, "size", "digits", 32), _int_option(opts, "channels", "digits", 3)
    if channels not in (1, 3):
        raise SpecError(f"digits: channels must be 1 or 3, got {channels}")
    d = load_digits()
    x = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8))[:, None]
    y = torch.from_numpy(d.target.astype(np.int64))
    # Fixed stratified split, independent of any user seed: every 5th image of each class is test.
    rank = np.zeros(len(y), dtype=np.int64)
    for c in range(10):
        idx = np.flatnonzero(d.target == c)
        rank[idx] = np.arange(len(idx))
    is_test = rank % 5 == 0
    rows = np.flatnonzero(is_test if split != "train" else ~is_test)
    x = _resize_uint8(x[rows], size).expand(-1, channels, -1, -1)
    return ImageData(x, y[rows], torch.from_numpy(rows), [str(c) for c in range(10)])


# ----------------------------------------------------------------------------------------------- CIFAR
def _cifar(arg: str, split: str, folder: str, files: dict[str, list[str]], label_key: bytes, meta: tuple[str, bytes], source: str,
           opts: dict) -> ImageData:
    _options(opts, source, ())
    root = _need_dir(arg, source)
    base = root / folder if (root / folder).is_dir() else root
    names = files["train" if split == "train" else "test"]
    missing = [n for n in names if not (base / n).exists()]
    if missing:
        raise DataError(
            f"{source}: {base} lacks {', '.join(missing)}; expected the torchvision on-disk layout "
            f"(DIR/{folder}/{names[0]} ...) as written by torchvision.datasets.{source.upper()}(DIR, download=True)"
        )
    xs, ys = [], []
    for n in names:
        with open(base / n, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.extend(entry[label_key])
    with open(base / meta[0], "rb") as f:
        classes = [c.decode() for c in pickle.load(f, encoding="bytes")[meta[1]]]
    x = torch.from_numpy(np.concatenate(xs))
    return ImageData(x, torch.tensor(ys, dtype=torch.long), torch.arange(len(ys)), classes)


@DATA_SOURCES.register("cifar10")
def _cifar10(arg: str, split: str, opts: dict) -> ImageData:
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    return _cifar(arg, split, "cifar-10-batches-py", files, b"labels", ("batches.meta", b"label_names"), "cifar10", opts)


@DATA_SOURCES.register("cifar100")
def _cifar100(arg: str, split: str, opts: dict) -> ImageData:
    files = {"train": ["train"], "test": ["test"]}
    return _cifar(arg, split, "cifar-100-python", files, b"fine_labels", ("meta", b"fine_label_names"), "cifar100", opts)


# ------------------------------------------------------------------------------------ folders of images
DECODE_ERRORS = (OSError, ValueError, SyntaxError)  # PIL: truncated/corrupt (OSError), UnidentifiedImageError, bad headers


def _decode_one(path: Path, size: int | None, center_crop: bool) -> torch.Tensor:
    """Decode one image file to uint8 [3, H, W]: Resize(size * 256/224) + CenterCrop(size) when ``center_crop``."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    with Image.open(path) as im:
        t = TF.pil_to_tensor(im.convert("RGB"))
    if size is not None:
        if center_crop:
            t = TF.center_crop(TF.resize(t, int(round(size * 256 / 224)), antialias=True), [size, size])
        else:
            t = TF.resize(t, [size, size], antialias=True)
    return t


def _decode(paths: list[Path], size: int | None, center_crop: bool, skip_bad: bool = False) -> tuple[torch.Tensor, list[int]]:
    """Decode image files to uint8 [N, 3, H, W]; returns (images, positions in ``paths`` that decoded).

    An unreadable file is a DataError naming it, or with ``skip_bad`` it is left out (the caller lists it).
    """
    out, kept = [], []
    for i, p in enumerate(paths):
        try:
            out.append(_decode_one(p, size, center_crop))
        except DECODE_ERRORS as e:
            if not skip_bad:
                raise DataError(
                    f"cannot read image {str(p)!r} ({type(e).__name__}: {_first_line(e)}); replace or delete it, "
                    "or add '?skip_bad=true' to the data spec to skip unreadable files (they are listed)"
                ) from None
            continue
        kept.append(i)
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise DataError(f"images have different sizes ({sorted(shapes)[:3]} ...); add '?size=S' to the data spec to resize them")
    return (torch.stack(out) if out else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)), kept


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _warn_skipped(skipped: list[Path]) -> None:
    """One warning that lists the unreadable files ``skip_bad=true`` left out."""
    shown = ", ".join(str(p) for p in skipped[:20]) + (f" ... and {len(skipped) - 20} more" if len(skipped) > 20 else "")
    warn(f"skip_bad=true: skipped {len(skipped)} unreadable image file(s): {shown}")


def _class_folder_files(root: Path) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files, labels = [], []
    for ci, c in enumerate(classes):
        for f in sorted((root / c).rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(ci)
    return files, labels, classes


@DATA_SOURCES.register("imagefolder")
def _imagefolder(arg: str, split: str, opts: dict) -> Listing:
    _options(opts, "imagefolder", ("size", "crop", "skip_bad"))
    root = _need_dir(arg, "imagefolder")
    sub = root / split
    if split == "test" and not sub.is_dir() and (root / "val").is_dir():
        sub = root / "val"
    base = sub if sub.is_dir() else root
    files, labels, classes = _class_folder_files(base)
    if not classes:
        raise DataError(f"imagefolder: {base} has no class subfolders; expected DIR/<class>/<image> or DIR/{split}/<class>/<image>")
    size = _int_option(opts, "size", "imagefolder", None)
    return _lazy_files(files, labels, classes, size, center_crop=_flag(opts, "crop", "imagefolder"),
                       skip_bad=_flag(opts, "skip_bad", "imagefolder"))


def _lazy_files(files: list[Path], labels: list[int], classes: list[str], size: int | None, center_crop: bool,
                skip_bad: bool = False) -> Listing:
    """A listing of image files that decodes only the rows asked for (``skip_bad``: leaves unreadable ones out)."""

    def take(rows: torch.Tensor) -> ImageData:
        chosen = [files[i] for i in rows.tolist()]
        x, kept = _decode(chosen, size, center_crop, skip_bad)
        skipped = [chosen[i] for i in sorted(set(range(len(chosen))) - set(kept))]
        if skipped:
            _warn_skipped(skipped)
        if not kept:
            raise DataError(f"none of the {len(chosen)} chosen image files could be read (e.g. {str(chosen[0])!r})")
        rows = rows[torch.tensor(kept, dtype=torch.long)]
        y = torch.tensor([labels[i] for i in rows.tolist()], dtype=torch.long)
        meta = {"files": [str(chosen[i]) for i in kept], "skipped": [str(p) for p in skipped]}
        return ImageData(x, y, rows.clone(), classes, meta=meta)

    return Listing(len(files), take, torch.tensor(labels, dtype=torch.long))


@DATA_SOURCES.register("imagenet-val")
def _imagenet_val(arg: str, split: str, opts: dict) -> Listing:
    _options(opts, "imagenet-val", ("size", "skip_bad"))
    root = _need_dir(arg, "imagenet-val")
    size = _int_option(opts, "size", "imagenet-val", 224)
    solution = root / "LOC_val_solution.csv"
    if solution.exists():
        with open(solution, newline="") as f:
            rows = [(r["ImageId"], r["PredictionString"].split()[0]) for r in csv.DictReader(f)]
        classes = sorted({w for _, w in rows})
        rows.sort()
        files = [root / f"{img}.JPEG" for img, _ in rows]
        missing = [f for f in files if not f.exists()]
        if missing:
            raise DataError(f"imagenet-val: {len(missing)} images listed in {solution.name} are missing, e.g. {missing[0]}")
        labels = [classes.index(w) for _, w in rows]
    else:
        files, labels, classes = _class_folder_files(root)
        if not classes:
            raise DataError(
                f"imagenet-val: {root} has neither <wnid>/ class folders nor LOC_val_solution.csv beside flat *.JPEG files"
            )
    return _lazy_files(files, labels, classes, size, center_crop=True, skip_bad=_flag(opts, "skip_bad", "imagenet-val"))


# ================================================================================== bring your own data
# Analyses read images through one re-iterable, ordered source of batches (:func:`as_batches`): a data spec or an
# ImageData (layerlab's convention: uint8 or [0, 1] floats, the model wrapper normalises), or the user's own
# tensors, arrays, Dataset or DataLoader, whose images are fed to the model as given (their own preprocessing;
# only uint8 is divided by 255).


def as_model_input(images: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """User images as the model gets them: uint8 (0..255) is divided by 255, floating images are passed as they
    are (normalised, any range: the user's own preprocessing); other dtypes are an error."""
    if images.dtype == torch.uint8:
        return images.to(device).float().div_(255)
    if images.is_floating_point():
        return images.to(device)
    raise ShapeError(f"images: expected uint8 (0..255) or floating tensors, got dtype {images.dtype}")


def _as_tensor(x, what: str) -> torch.Tensor:
    """A torch tensor from a tensor, a numpy array or a PIL image (PIL: uint8 [C, H, W])."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if type(x).__module__.startswith("PIL."):
        from torchvision.transforms.v2 import functional as TF

        return TF.pil_to_tensor(x)
    raise ShapeError(f"{what}: expected a tensor, a numpy array or a PIL image, got {type(x).__name__}")


def _as_labels(y, n: int, what: str) -> torch.Tensor:
    """Integer class labels [n] (int64); -1 marks an unlabelled image."""
    if y is None:
        return torch.full((n,), -1, dtype=torch.long)
    t = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    if t.ndim != 1 or t.shape[0] != n or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ShapeError(f"{what}: expected integer class labels of shape ({n},), one per image, got dtype "
                         f"{t.dtype} and shape {tuple(t.shape)}; one-hot or soft labels: pass labels.argmax(1)")
    return t.to(torch.long)


def _check_images(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.ndim != 4:
        raise ShapeError(f"{what}: expected images [N, C, H, W], got shape {tuple(x.shape)}"
                         + ("; add a batch dimension with x.unsqueeze(0)" if x.ndim == 3 else ""))
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ShapeError(f"{what}: expected uint8 (0..255) or floating images, got dtype {x.dtype}")
    return x


def check_batch_labels(num_outputs: int, labels: torch.Tensor, what: str, data: str = "the data") -> None:
    """Raise DataError when a batch holds a label the model's ``num_outputs`` logits cannot predict."""
    if labels.numel() and int(labels.max()) >= num_outputs:
        needed = int(labels.max()) + 1
        raise DataError(
            f"{what} has {num_outputs} outputs but {data} has labels up to {needed - 1} ({needed} classes); use a model "
            f"with at least {needed} outputs, or pass only images of classes 0..{num_outputs - 1}"
        )


class Batches(ABC):
    """A re-iterable, ordered source of ``(inputs, labels)`` batches: what an analysis reads its images from.

    Every pass yields the same images in the same order. ``inputs`` are what the model is fed (float; spec data in
    [0, 1]); ``labels`` are int64, -1 where an image has no label. ``len()`` and ``indices`` (the position of each
    image in the data the user passed, or its source index for spec data) are known up front for in-memory data
    and indexable datasets, and after the first pass for a DataLoader.
    """

    spec: str = ""
    split: str = ""
    classes: list[str] | None = None
    streamed = False  # True: images are produced batch by batch and never all held

    @abstractmethod
    def batches(self, device: str | torch.device = "cpu"):
        """Yield ``(inputs, labels)`` on ``device``, the same images in the same order on every pass."""

    def __iter__(self):
        return self.batches()

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    @abstractmethod
    def indices(self) -> torch.Tensor:
        """Each image's position in the data the user passed (its source index for spec data)."""

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else 0

    def known_len(self) -> int | None:
        """The number of images when known without reading the data (a DataLoader's only after a full pass)."""
        return len(self)

    @abstractmethod
    def describe(self) -> str:
        """How error messages name this data."""

    def check_outputs(self, num_outputs: int, what: str) -> None:
        """Up-front label check where all labels are known (in-memory data); streams check batch by batch."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A store key for these images and labels."""


class TensorBatches(Batches):
    """Images held in memory (an ImageData, a tensor or an ``(images, labels)`` pair), cut into batches."""

    def __init__(self, data: ImageData | None = None, *, images: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, indices: torch.Tensor | None = None, batch_size: int = 128,
                 what: str = "the in-memory images") -> None:
        self.data, self.batch_size, self.what = data, int(batch_size), what
        if data is not None:  # layerlab's convention: uint8 or [0, 1] floats, through to_unit_float
            self.images, self.labels, self._indices = data.images, data.labels, data.indices
            self.spec, self.split, self.classes = data.spec, data.split, data.classes
        else:  # the user's own images, fed as given
            assert images is not None and labels is not None and indices is not None
            self.images, self.labels, self._indices = images, labels, indices

    @property
    def indices(self) -> torch.Tensor:
        return self._indices

    def describe(self) -> str:
        return self.data.describe() if self.data is not None else self.what

    def batches(self, device: str | torch.device = "cpu"):
        convert = to_unit_float if self.data is not None else as_model_input
        for i in range(0, len(self.labels), self.batch_size):
            yield convert(self.images[i : i + self.batch_size], device), self.labels[i : i + self.batch_size].to(device)

    def check_outputs(self, num_outputs: int, what: str) -> None:
        if self.data is not None:
            check_label_coverage(num_outputs, self.data, what)
        else:
            check_batch_labels(num_outputs, self.labels, what, self.what)

    def fingerprint(self) -> str:
        import hashlib

        if self.data is not None:  # as criticality has always keyed ImageData (store keys stay valid)
            d = self.data
            h = hashlib.sha256(f"{d.spec}|{d.split}|{tuple(d.images.shape)}".encode())
            h.update(d.indices.cpu().contiguous().numpy().tobytes())
            if not d.spec:  # an in-memory data set: hash the pixels themselves
                h.update(d.images.cpu().contiguous().numpy().tobytes())
            h.update(d.labels.cpu().contiguous().numpy().tobytes())
            return h.hexdigest()[:16]
        h = hashlib.sha256(f"tensor|{tuple(self.images.shape)}|{self.images.dtype}".encode())
        h.update(self._indices.numpy().tobytes())
        x = self.images.detach().cpu().contiguous()
        h.update(x.reshape(-1).view(torch.uint8).numpy())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()[:16]


class DatasetBatches(Batches):
    """A map-style torch ``Dataset`` (items ``(image, label, ...)`` or ``image``), read lazily at ``rows``."""

    streamed = True

    def __init__(self, dataset, rows: torch.Tensor, batch_size: int = 128) -> None:
        self.dataset, self.rows, self.batch_size = dataset, rows, int(batch_size)
        self.classes = list(getattr(dataset, "classes", []) or []) or None

    @property
    def indices(self) -> torch.Tensor:
        return self.rows

    def describe(self) -> str:
        return f"the {type(self.dataset).__name__}"

    def batches(self, device: str | torch.device = "cpu"):
        rows = self.rows.tolist()
        for i in range(0, len(rows), self.batch_size):
            xs, ys = [], []
            for r in rows[i : i + self.batch_size]:
                item = self.dataset[r]
                if isinstance(item, (tuple, list)):  # (image, label, ...) or (image,)
                    x, y = item[0], (item[1] if len(item) >= 2 else None)
                else:
                    x, y = item, None
                x = _as_tensor(x, f"{self.describe()}[{r}]")
                if x.ndim != 3:
                    raise ShapeError(f"{self.describe()}[{r}]: expected an image [C, H, W], got shape {tuple(x.shape)}")
                xs.append(x)
                try:
                    ys.append(-1 if y is None else int(y))
                except (TypeError, ValueError, RuntimeError):
                    raise ShapeError(f"{self.describe()}[{r}]: expected an integer class label, got {type(y).__name__}"
                                     f"{' of shape ' + str(tuple(y.shape)) if hasattr(y, 'shape') else ''}") from None
            try:
                x = torch.stack(xs)
            except RuntimeError:
                raise DataError(f"{self.describe()}: images of different shapes ({sorted({tuple(t.shape) for t in xs})[:3]}); "
                                "add a Resize/CenterCrop transform to the dataset") from None
            yield as_model_input(_check_images(x, self.describe()), device), torch.tensor(ys, dtype=torch.long).to(device)

    def fingerprint(self) -> str:
        return _stream_fingerprint(self, f"dataset|{type(self.dataset).__name__}|{len(self.rows)}")


def batch_checksum(x: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, int]:
    """(sum, sum of squares, label sum) of one batch in float64: what the same batch must give on a later pass."""
    xd = x.detach().double()
    return float(xd.sum()), float(xd.square().sum()), int(labels.sum())


def changed_between_passes(source: str, batch: int) -> DataError:
    """The error for data that yielded different images on another pass (shuffling, random augmentation)."""
    return DataError(f"{source} yielded different images on another pass (batch {batch}): an analysis reads its data "
                     "several times and needs the same images in the same order; turn off shuffling and random "
                     "augmentation")


class LoaderBatches(Batches):
    """A ``DataLoader`` (or any re-iterable of batches): its batches in the order it yields them, the first
    ``limit`` images (all when None). Batches are ``images``, ``(images, labels, ...)`` or a dict with an image and a
    label key. Every pass must yield the same images in the same order (no shuffling, no random augmentation):
    a batch that differs from the first pass is a DataError."""

    streamed = True
    IMAGE_KEYS = ("image", "images", "pixel_values", "input", "x")
    LABEL_KEYS = ("label", "labels", "target", "targets", "y")

    def __init__(self, loader, limit: int | None = None) -> None:
        from torch.utils.data import DataLoader, RandomSampler

        if isinstance(loader, DataLoader) and isinstance(loader.sampler, RandomSampler):
            raise DataError("the DataLoader shuffles (shuffle=True): an analysis needs the same images in the same "
                            "order on every pass; build it with shuffle=False")
        self.loader, self.limit = loader, limit
        dataset = getattr(loader, "dataset", None)
        self.classes = list(getattr(dataset, "classes", []) or []) or None
        self._count: int | None = None
        self._sums: list[tuple[float, float, int]] | None = None

    @property
    def indices(self) -> torch.Tensor:
        if self._count is None:
            for _ in self.batches():  # one pass to count (also records the checksums later passes must match)
                pass
        return torch.arange(self._count)  # type: ignore[arg-type]

    def known_len(self) -> int | None:
        return self._count

    def describe(self) -> str:
        return f"the {type(self.loader).__name__}"

    def _split(self, batch) -> tuple[torch.Tensor, object]:
        if isinstance(batch, dict):
            x = next((batch[k] for k in self.IMAGE_KEYS if k in batch), None)
            if x is None:
                raise ShapeError(f"{self.describe()} yields dicts without an image key ({', '.join(self.IMAGE_KEYS)}); "
                                 f"got keys {sorted(batch)[:6]}")
            return x, next((batch[k] for k in self.LABEL_KEYS if k in batch), None)
        if isinstance(batch, (tuple, list)):
            if not batch:
                raise ShapeError(f"{self.describe()} yields empty batches")
            return batch[0], batch[1] if len(batch) >= 2 else None
        return batch, None

    def batches(self, device: str | torch.device = "cpu"):
        seen, sums = 0, []
        for k, batch in enumerate(self.loader):
            if self.limit is not None and seen >= self.limit:
                break
            x, y = self._split(batch)
            x = _check_images(_as_tensor(x, self.describe()), self.describe())
            labels = _as_labels(y, x.shape[0], f"{self.describe()} labels")
            if self.limit is not None and seen + x.shape[0] > self.limit:
                x, labels = x[: self.limit - seen], labels[: self.limit - seen]
            check = batch_checksum(x, labels)
            if self._sums is not None and (k >= len(self._sums) or self._sums[k] != check):
                raise changed_between_passes(self.describe(), k)
            sums.append(check)
            seen += x.shape[0]
            yield as_model_input(x, device), labels.to(device)
        if self._sums is not None and len(sums) != len(self._sums):
            raise DataError(f"{self.describe()} yielded {len(sums)} batches on this pass, {len(self._sums)} before; "
                            "it must yield the same images every pass")
        if seen == 0:
            raise DataError(f"{self.describe()} yielded no images")
        if self.limit is not None and seen < self.limit:  # never silently fewer than asked for
            raise DataError(f"asked for {self.limit} images but {self.describe()} yields {seen}; pass images={seen} "
                            "or fewer (or omit it for all)")
        self._sums, self._count = sums, seen

    def fingerprint(self) -> str:
        return _stream_fingerprint(self, f"loader|{type(self.loader).__name__}|{self.limit}")


#: what :func:`as_batches` accepts
DataLike = Union[str, ImageData, torch.Tensor, np.ndarray, tuple, Dataset, DataLoader, Batches, Iterable]


def _stream_fingerprint(source: Batches, head: str) -> str:
    """sha256 over every batch's inputs and labels (one pass): a store key for data that is not held."""
    import hashlib

    h = hashlib.sha256(head.encode())
    n = 0
    for x, y in source.batches():
        t = x.detach().cpu().contiguous()
        h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
        h.update(y.numpy().tobytes())
        n += t.shape[0]
    h.update(str(n).encode())
    return h.hexdigest()[:16]


def as_batches(
    data: DataLike,
    batch_size: int = 128,
    *,
    images: int | None = None,
    seed: int = 0,
    split: str = "test",
    arg: str = "--images",
) -> Batches:
    """Any image data as one re-iterable, ordered source of ``(inputs, labels)`` batches (:class:`Batches`).

    ``data`` may be

    * a data spec (``"digits"``): ``load_data(data, split, images, seed)``, images in [0, 1];
    * an :class:`ImageData`: its seeded subset of ``images`` (``ImageData.sample``), images in [0, 1];
    * a tensor ``[N, C, H, W]`` (unlabelled) or an ``(images, labels)`` pair of tensors or numpy arrays;
    * a map-style torch ``Dataset`` whose items are ``(image, label, ...)`` or ``image`` (tensor, array or PIL);
    * a ``DataLoader`` (or any re-iterable of batches: ``images``, ``(images, labels, ...)`` or dicts).

    The user's own images (all but the first two) are fed to the model as given: floating images keep their own
    preprocessing (normalised, any range) and only uint8 is divided by 255. For indexable data (a spec, ImageData,
    tensors, arrays, a Dataset) ``images``/``seed`` pick the same fixed seeded subset as :func:`load_data`
    (``indices`` are the chosen positions, in order); a DataLoader yields its batches in its own order and
    ``images=N`` takes the first N images it yields (``seed`` does not apply). ``batch_size`` does not apply to a
    DataLoader either: its batches are its own.
    """
    import inspect

    from torch.utils.data import IterableDataset

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(data, Batches):
        return data
    if isinstance(data, str):
        return TensorBatches(load_data(data, split, images, seed, arg=arg), batch_size=batch_size)
    if isinstance(data, ImageData):
        return TensorBatches(data.sample(images, seed, arg), batch_size=batch_size)
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return _in_memory(data, None, images, seed, arg, batch_size)
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(d, (torch.Tensor, np.ndarray, list)) for d in data):
        return _in_memory(data[0], data[1], images, seed, arg, batch_size)
    if inspect.isgenerator(data) or inspect.isgeneratorfunction(data):
        raise DataError("data: a generator can be read only once, and an analysis reads its data several times; "
                        "pass a DataLoader, a Dataset or tensors")
    if isinstance(data, IterableDataset):
        data = DataLoader(data, batch_size=batch_size)
    if isinstance(data, DataLoader) or (not isinstance(data, Dataset) and hasattr(data, "__iter__")
                                        and not hasattr(data, "__getitem__")):
        if images is not None and (isinstance(images, bool) or not isinstance(images, int) or images < 1):
            raise DataError(f"{arg.rstrip('=')}: expected a positive number of images, got {images!r}")
        return LoaderBatches(data, images)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (dict, bytes)):
        count = len(data)
        rows = subset_rows(count, images, seed, f"the {type(data).__name__} ({count} items)", arg)
        return DatasetBatches(data, rows, batch_size)
    raise DataError(
        f"data: expected a data spec such as 'digits', an ImageData, a tensor [N, C, H, W], an (images, labels) pair, "
        f"a torch Dataset or a DataLoader, got {type(data).__name__}"
    )


def _in_memory(x, y, images: int | None, seed: int, arg: str, batch_size: int) -> TensorBatches:
    x = _check_images(_as_tensor(x, "images"), "images")
    labels = _as_labels(y, x.shape[0], "labels")
    what = f"the data passed in ({x.shape[0]} images)"
    rows = subset_rows(x.shape[0], images, seed, what, arg)
    if images is not None and images != x.shape[0]:
        x, labels = x[rows], labels[rows]
    return TensorBatches(images=x, labels=labels, indices=rows, batch_size=batch_size, what=what)
