"""The built-in data sources, each registered by name in :data:`~layerlab.data.specs.DATA_SOURCES`.

``digits`` (scikit-learn's handwritten digits, embedded), ``cifar10``/``cifar100`` (the torchvision on-disk
format), ``imagefolder`` and ``imagenet-val`` (folders of image files, decoded lazily: an unreadable file is an
error naming it, or skipped and listed with ``skip_bad=true``). Adding a source is adding a function here.
"""
from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError, SpecError, warn
from .images import ImageData
from .specs import DATA_SOURCES, Listing, _flag, _int_option, _need_dir, _options

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


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

