"""Data specs: one registry, one way in (``load_data(spec, split, n, seed)``).

Spec forms::

    digits[?size=32&channels=3]   the embedded default: scikit-learn's handwritten digits (1,797 real 8x8 scans,
                                  10 classes, shipped inside the scikit-learn wheel, so no network), upsampled
    cifar10:DIR / cifar100:DIR    the torchvision on-disk format (cifar-10-batches-py / cifar-100-python)
    imagefolder:DIR[?size=S]      DIR/<split>/<class>/*.png|jpg (or DIR/<class>/... for every split)
    imagenet-val:DIR[?size=224]   ImageNet validation: DIR/<wnid>/*.JPEG, or flat DIR/*.JPEG + LOC_val_solution.csv

Any spec takes ``classes=0-4`` (or ``1,3,5``): only those classes, relabelled 0..k-1 (for finetuning splits).

Images are decoded once into a uint8 tensor [N, C, H, W] (memoised per process), and a fixed seeded subset
records the indices it chose, so every layer, trial and checkpoint sees the same images in the same order.
"""
from __future__ import annotations

import csv
import functools
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qsl

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError, SpecError
from .registry import Registry

DATA_SOURCES: Registry[Callable[..., "ImageData | Listing"]] = Registry("data source")
SPLITS = ("train", "test", "val")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class ImageData:
    """Decoded images (uint8 [N, C, H, W]), labels (int64 [N]) and the source indices they came from."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    classes: list[str]
    spec: str = ""
    split: str = ""
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def float(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """Images as float32 in [0, 1] on ``device``."""
        return self.images.to(device).float().div_(255)

    def subset(self, rows: torch.Tensor | np.ndarray | list[int]) -> "ImageData":
        rows = torch.as_tensor(rows, dtype=torch.long)
        return ImageData(self.images[rows], self.labels[rows], self.indices[rows], self.classes, self.spec, self.split, dict(self.meta))

    def batches(self, batch_size: int, device: str | torch.device = "cpu"):
        """Yield (float images in [0, 1], labels) batches in order."""
        for i in range(0, len(self), batch_size):
            yield self.images[i : i + batch_size].to(device).float().div_(255), self.labels[i : i + batch_size].to(device)


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


def load_data(spec: str, split: str = "test", n: int | None = None, seed: int = 0) -> ImageData:
    """Load ``split`` of the data set ``spec``; ``n`` picks a fixed seeded subset (indices in ``.indices``).

    Only the chosen images are decoded, once per process (memoised): repeated evaluations reuse the tensor.
    """
    if split not in SPLITS:
        raise SpecError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if n is not None and n <= 0:
        raise DataError(f"n must be a positive number of images, got {n}")
    data = _load(spec, split, n, seed)
    return ImageData(data.images, data.labels, data.indices, data.classes, spec, split, dict(data.meta, seed=seed))


@functools.lru_cache(maxsize=16)
def _load(spec: str, split: str, n: int | None, seed: int) -> ImageData:
    source, arg, opts = parse_data_spec(spec)
    classes = _parse_classes(opts.pop("classes")) if "classes" in opts else None
    listing = _listing(source, arg, tuple(sorted(opts.items())), split)
    pool = torch.arange(listing.count)
    if classes is not None:  # a class subset, relabelled 0..k-1 in the order given
        pool = pool[torch.isin(listing.labels, torch.tensor(classes))]
    if pool.numel() == 0:
        raise DataError(f"data set {spec!r} split {split!r} holds no images; check the path, its layout and any classes= option")
    rows = pool
    if n is not None and n < pool.numel():
        rows = pool[torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(seed))[:n].sort().values]
    data = listing.take(rows)
    data.images = data.images.contiguous()
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

    size, channels = int(opts.get("size", 32)), int(opts.get("channels", 3))
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
def _cifar(arg: str, split: str, folder: str, files: dict[str, list[str]], label_key: bytes, meta: tuple[str, bytes], source: str) -> ImageData:
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
    return _cifar(arg, split, "cifar-10-batches-py", files, b"labels", ("batches.meta", b"label_names"), "cifar10")


@DATA_SOURCES.register("cifar100")
def _cifar100(arg: str, split: str, opts: dict) -> ImageData:
    files = {"train": ["train"], "test": ["test"]}
    return _cifar(arg, split, "cifar-100-python", files, b"fine_labels", ("meta", b"fine_label_names"), "cifar100")


# ------------------------------------------------------------------------------------ folders of images
def _decode(paths: list[Path], size: int | None, center_crop: bool) -> torch.Tensor:
    """Decode image files to uint8 [N, 3, H, W]: Resize(size * 256/224) + CenterCrop(size) when ``center_crop``."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    out = []
    for p in paths:
        with Image.open(p) as im:
            t = TF.pil_to_tensor(im.convert("RGB"))
        if size is not None:
            if center_crop:
                t = TF.center_crop(TF.resize(t, int(round(size * 256 / 224)), antialias=True), [size, size])
            else:
                t = TF.resize(t, [size, size], antialias=True)
        out.append(t)
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise DataError(f"images have different sizes ({sorted(shapes)[:3]} ...); add '?size=S' to the data spec to resize them")
    return torch.stack(out) if out else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)


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
    root = _need_dir(arg, "imagefolder")
    sub = root / split
    if split == "test" and not sub.is_dir() and (root / "val").is_dir():
        sub = root / "val"
    base = sub if sub.is_dir() else root
    files, labels, classes = _class_folder_files(base)
    if not classes:
        raise DataError(f"imagefolder: {base} has no class subfolders; expected DIR/<class>/<image> or DIR/{split}/<class>/<image>")
    size = int(opts["size"]) if "size" in opts else None
    return _lazy_files(files, labels, classes, size, center_crop=bool(int(opts.get("crop", 0))))


def _lazy_files(files: list[Path], labels: list[int], classes: list[str], size: int | None, center_crop: bool) -> Listing:
    """A listing of image files that decodes only the rows asked for."""

    def take(rows: torch.Tensor) -> ImageData:
        chosen = [files[i] for i in rows.tolist()]
        x = _decode(chosen, size, center_crop)
        y = torch.tensor([labels[i] for i in rows.tolist()], dtype=torch.long)
        return ImageData(x, y, rows.clone(), classes, meta={"files": [str(f) for f in chosen]})

    return Listing(len(files), take, torch.tensor(labels, dtype=torch.long))


@DATA_SOURCES.register("imagenet-val")
def _imagenet_val(arg: str, split: str, opts: dict) -> Listing:
    root = _need_dir(arg, "imagenet-val")
    size = int(opts.get("size", 224))
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
    return _lazy_files(files, labels, classes, size, center_crop=True)
