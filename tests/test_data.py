from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from layerlab.data import load_data, subset_rows
from layerlab.errors import DataError, LayerlabError, SpecError


def test_digits_is_real_offline_data_with_disjoint_fixed_split():
    from sklearn.datasets import load_digits

    tr, te = load_data("digits", "train"), load_data("digits", "test")
    assert len(tr) + len(te) == 1797 and tr.shape == (3, 32, 32) and tr.images.dtype == torch.uint8
    assert set(tr.indices.tolist()).isdisjoint(te.indices.tolist())
    assert sorted(te.labels.unique().tolist()) == list(range(10))
    d = load_digits()
    assert torch.equal(te.labels, torch.from_numpy(d.target[te.indices.numpy()]))
    small = load_data("digits?size=8&channels=1", "test")
    expect = np.round(d.images[small.indices.numpy()] * 255 / 16).astype(np.uint8)
    assert np.array_equal(small.images[:, 0].numpy(), expect)


def test_seeded_subset_is_recorded_and_reproducible():
    a, b, c = (load_data("digits", "test", images=50, seed=s) for s in (3, 3, 4))
    assert len(a) == 50 and torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
    full = load_data("digits", "test")
    pos = {int(i): k for k, i in enumerate(full.indices)}
    assert torch.equal(a.images, full.images[[pos[int(i)] for i in a.indices]])
    assert a.meta["seed"] == 3
    with pytest.raises(DataError, match="positive"):
        load_data("digits", "test", images=0)


def test_one_subset_choice_for_disk_and_memory():
    """load_data(spec, split, n, seed) and load_data(spec, split).sample(n, seed) choose the same images."""
    for spec in ("digits?size=8", "digits?size=8&classes=2,7"):
        full = load_data(spec, "test")
        for n, seed in ((5, 0), (30, 11)):
            a, b = load_data(spec, "test", images=n, seed=seed), full.sample(n, seed)
            assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
            assert b.meta["seed"] == seed
        assert full.sample(None, 3) is full and full.sample(len(full), 3) is full
    rows = subset_rows(100, 10, 4, "x")
    assert rows.tolist() == sorted(rows.tolist()) and len(set(rows.tolist())) == 10
    assert torch.equal(rows, subset_rows(100, 10, 4, "x")) and not torch.equal(rows, subset_rows(100, 10, 5, "x"))
    assert subset_rows(7, None, 0, "x").tolist() == list(range(7))
    with pytest.raises(DataError, match="asked for 8 images but the toy set holds 7; pass --train-n 7 or fewer"):
        subset_rows(7, 8, 0, "the toy set", "--train-n")


def test_unknown_or_bad_spec_options_are_errors():
    with pytest.raises(SpecError, match="data source 'digits' has no option 'sise'; its options are: size, channels"):
        load_data("digits?sise=16", "test")
    with pytest.raises(SpecError, match="size='x' is not a positive integer"):
        load_data("digits?size=x", "test")
    with pytest.raises(SpecError, match="has classes 0-9"):
        load_data("digits?size=8&classes=8-12", "test")


def test_class_subset_relabels():
    d = load_data("digits?classes=5-9", "train")
    assert d.labels.unique().tolist() == [0, 1, 2, 3, 4] and d.classes == ["5", "6", "7", "8", "9"]
    with pytest.raises(SpecError, match="class list"):
        load_data("digits?classes=a-b", "train")
    with pytest.raises(DataError, match="no images"):
        load_data("digits?classes=42", "train")


def _write_cifar(root: Path, kind: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if kind == "cifar10":
        base = root / "cifar-10-batches-py"
        base.mkdir(parents=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            x = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
            with open(base / name, "wb") as f:
                pickle.dump({b"data": x, b"labels": [1, 2, 3, 4]}, f)
        with open(base / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
        return x
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    for name in ("train", "test"):
        x = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
        with open(base / name, "wb") as f:
            pickle.dump({b"data": x, b"fine_labels": [0, 5, 99, 3, 2, 1], b"coarse_labels": [0] * 6}, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, f)
    return x


def test_cifar10_on_disk_format(tmp_path):
    last = _write_cifar(tmp_path, "cifar10")
    tr, te = load_data(f"cifar10:{tmp_path}", "train"), load_data(f"cifar10:{tmp_path}", "test")
    assert len(tr) == 20 and len(te) == 4 and te.classes[3] == "c3"
    assert np.array_equal(te.images.numpy().reshape(4, -1), last)
    assert te.labels.tolist() == [1, 2, 3, 4]


def test_cifar100_on_disk_format(tmp_path):
    _write_cifar(tmp_path, "cifar100")
    te = load_data(f"cifar100:{tmp_path / 'cifar-100-python'}", "test")
    assert len(te) == 6 and te.num_classes == 100 and te.labels.tolist()[2] == 99


def test_cifar_missing_files_says_layout(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DataError, match="torchvision on-disk layout"):
        load_data(f"cifar10:{tmp_path}", "test")


def _png(path: Path, value: int, size=(12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def test_imagefolder_split_folders_and_resize(tmp_path):
    for split in ("train", "val"):
        for c, v in (("cat", 10), ("dog", 200)):
            for i in range(3):
                _png(tmp_path / split / c / f"{i}.png", v + i)
    te = load_data(f"imagefolder:{tmp_path}", "test")  # falls back to val/
    assert te.classes == ["cat", "dog"] and len(te) == 6 and te.shape == (3, 10, 12)
    assert te.images[4, 0, 0, 0] == 201 and te.labels.tolist() == [0, 0, 0, 1, 1, 1]
    resized = load_data(f"imagefolder:{tmp_path}?size=8", "train", images=2, seed=0)
    assert resized.shape == (3, 8, 8) and len(resized) == 2


def test_imagefolder_mixed_sizes_and_empty(tmp_path):
    _png(tmp_path / "a" / "0.png", 1, (8, 8))
    _png(tmp_path / "a" / "1.png", 1, (9, 8))
    with pytest.raises(DataError, match="size="):
        load_data(f"imagefolder:{tmp_path}", "train")
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        load_data(f"imagefolder:{empty}", "train")
    with pytest.raises(DataError, match="no class subfolders"):
        load_data(f"imagefolder:{empty / 'cls'}", "train")


def test_imagenet_val_both_layouts(tmp_path):
    folder = tmp_path / "folders"
    for w, v in (("n01440764", 5), ("n01443537", 99)):
        _png(folder / w / f"ILSVRC2012_val_{v:08d}.JPEG", v, (300, 260))
    d = load_data(f"imagenet-val:{folder}", "val")
    assert d.shape == (3, 224, 224) and d.labels.tolist() == [0, 1]
    flat = tmp_path / "flat"
    flat.mkdir()
    rows = [("ILSVRC2012_val_00000002", "n01443537"), ("ILSVRC2012_val_00000001", "n01440764")]
    for img, w in rows:
        _png(flat / f"{img}.JPEG", 50, (64, 64))
    with open(flat / "LOC_val_solution.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["ImageId", "PredictionString"])
        for img, w in rows:
            wr.writerow([img, f"{w} 1 2 3 4"])
    d = load_data(f"imagenet-val:{flat}?size=32", "val")
    assert d.shape == (3, 32, 32) and d.labels.tolist() == [0, 1]  # sorted by image id
    assert d.meta["files"][0].endswith("00000001.JPEG")


@pytest.mark.parametrize("spec, err, match", [
    ("cifar10:/no/such/dir", DataError, "does not exist"),
    ("cifar10:", SpecError, "needs a directory"),
    ("mnist:/x", SpecError, "unknown data source"),
    ("", SpecError, "empty"),
])
def test_bad_data_specs(spec, err, match):
    with pytest.raises(err, match=match):
        load_data(spec, "test")


def test_bad_split():
    with pytest.raises(LayerlabError, match="split"):
        load_data("digits", "validation")


def test_load_data_subset_size_is_images_and_n_is_its_old_name():
    """One name for the subset size everywhere (issue 12): ``images``; ``n`` still works with a FutureWarning that
    points at the caller's line, not at layerlab's."""
    new = load_data("digits?size=8", "test", images=12, seed=1)
    with pytest.warns(FutureWarning, match=r"load_data\(images=") as caught:
        old = load_data("digits?size=8", "test", n=12, seed=1)
    assert caught[0].filename == __file__
    assert torch.equal(new.images, old.images) and new.indices.tolist() == old.indices.tolist()
    with pytest.raises(SpecError, match="images= only"):
        load_data("digits?size=8", "test", images=12, n=12)
