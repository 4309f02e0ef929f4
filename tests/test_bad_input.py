"""Issue 11, section 3: bad input is one clear error (or handled correctly), never a silently wrong number."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_cli

from layerlab import runs
from layerlab.data import ImageData, check_label_coverage, load_data, to_unit_float
from layerlab.errors import DataError, LayerlabError, NonFiniteError, ShapeError, SpecError
from layerlab.models import load_model, num_outputs, save_checkpoint
from layerlab.train import evaluate, recipe, train

SMALL = "digits?size=8"
ARCH = "timm:resnet18?channels=8,16,32,64"


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run ``layerlab ARGS`` in-process; (exit status, stdout + stderr)."""
    code, out, err = run_cli(monkeypatch, capsys, *args)
    return code, out + err


def _assert_one_line_error(code: int, out: str, *fragments: str) -> None:
    assert code == 2, out
    assert "Traceback" not in out
    line = next(ln for ln in out.splitlines() if ln.startswith("error: "))
    for f in fragments:
        assert f in line, (f, line)


# ------------------------------------------------------------------------ 1. more images than the split holds
def test_more_images_than_the_split_holds_names_its_size():
    held = len(load_data(SMALL, "test"))
    expect = re.escape(f"asked for 100000 images but the test split of '{SMALL}' holds {held}; pass --images {held} or fewer")
    with pytest.raises(DataError, match=expect):
        load_data(SMALL, "test", images=100000)
    with pytest.raises(DataError, match=expect):
        load_data(SMALL, "test").sample(100000, seed=0)
    for bad in (0, -3):
        with pytest.raises(DataError, match="positive number of images"):
            load_data(SMALL, "test").sample(bad, seed=0)


def test_train_n_larger_than_the_train_split_cli(monkeypatch, capsys, tmp_path):
    held = len(load_data("digits?size=16", "train"))
    code, out = _cli(monkeypatch, capsys, "train", ARCH, "--data", "digits?size=16", "--train-n", "100000",
                     "--epochs", "1", "--out", str(tmp_path / "r"))
    _assert_one_line_error(code, out, f"holds {held}", f"pass --train-n {held} or fewer")


# --------------------------------------------------------------------- 2. outputs that cannot cover the labels
def _data(num_classes: int, n: int = 6) -> ImageData:
    labels = torch.arange(n) % num_classes
    return ImageData(torch.zeros(n, 3, 8, 8, dtype=torch.uint8), labels, torch.arange(n), [str(c) for c in range(num_classes)],
                     spec="toy", split="test")


def test_label_coverage_names_both_counts():
    with pytest.raises(DataError, match="model 'm' has 5 outputs but 'toy' has 10 classes"):
        check_label_coverage(5, _data(10, 20), "model 'm'")
    check_label_coverage(10, _data(10), "exact")
    check_label_coverage(1000, _data(5), "an ImageNet model on classes=0-4")  # more outputs than classes: fine


def test_five_class_checkpoint_on_ten_class_digits(tmp_path, monkeypatch, capsys):
    five = load_model(f"{ARCH}&num_classes=5")
    path = save_checkpoint(five, tmp_path / "five.pt")
    data = load_data(SMALL, "test", images=20, seed=0)
    assert num_outputs(five, data.float()) == 5
    with pytest.raises(DataError, match=re.escape(f"has 5 outputs but '{SMALL}' has 10 classes")):
        evaluate(five, data)
    code, out = _cli(monkeypatch, capsys, "train", f"file:{path}", "--data", SMALL, "--epochs", "1",
                     "--out", str(tmp_path / "r"))
    _assert_one_line_error(code, out, "has 5 outputs", "has 10 classes")


# ------------------------------------------------------------------------------------ 3. float images in [0, 1]
def test_float_images_equal_their_uint8_original():
    u8 = load_data(SMALL, "test", images=40, seed=1)
    as_float = ImageData(u8.images.float() / 255, u8.labels, u8.indices, u8.classes, u8.spec, u8.split)
    assert torch.equal(as_float.float(), u8.float())
    for (xf, yf), (xu, yu) in zip(as_float.batches(16), u8.batches(16), strict=True):
        assert torch.equal(xf, xu) and torch.equal(yf, yu)
    assert torch.equal(as_float.sample(10, seed=3).indices, u8.sample(10, seed=3).indices)
    model = load_model(f"{ARCH}&num_classes=10")
    assert evaluate(model, as_float) == evaluate(model, u8)


def test_float_images_outside_unit_range_or_misshapen_are_errors():
    u8 = load_data(SMALL, "test", images=4, seed=0)
    with pytest.raises(DataError, match="images look like 0-255 floats: pass uint8 or divide by 255"):
        ImageData(u8.images.float(), u8.labels, u8.indices, u8.classes)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        to_unit_float(torch.full((1, 3, 4, 4), -0.5))
    with pytest.raises(ShapeError, match=r"\[N, C, H, W\], got shape \(3, 8, 8\)"):
        ImageData(u8.images[0], u8.labels[:1], u8.indices[:1], u8.classes)
    with pytest.raises(ShapeError, match="dtype torch.int32"):
        ImageData(u8.images.int(), u8.labels, u8.indices, u8.classes)
    with pytest.raises(ShapeError, match=r"ImageData.labels: expected a tensor of shape \(4,\)"):
        ImageData(u8.images, u8.labels[:3], u8.indices, u8.classes)


def test_to_unit_float_returns_a_new_tensor():
    x = torch.rand(2, 3, 4, 4)
    y = to_unit_float(x)
    y.mul_(0)
    assert x.abs().sum() > 0 and y.dtype == torch.float32
    assert torch.equal(to_unit_float((x * 255).round().to(torch.uint8)), (x * 255).round() / 255)


# ---------------------------------------------------------------------------------------- 4. a diverging run
def test_diverging_run_stops_with_epoch_and_step_and_is_not_done(tmp_path):
    # Two steps a epoch: both batch losses are finite, the last update leaves weights whose outputs overflow.
    out = tmp_path / "r"
    with pytest.raises(NonFiniteError, match=r"training diverged at epoch 1, step 2/2 .*lower the learning rate"):
        train(ARCH, "digits?size=16", recipe("baseline", epochs=1, lr=1e6, batch_size=32), out, train_n=64, progress=False)
    assert not runs.is_done(out)
    assert not (out / "DONE").exists() and not (out / "final.pt").exists() and not (out / "metrics.csv").exists()


def test_diverging_run_cli_exits_2(monkeypatch, capsys, tmp_path):
    out = tmp_path / "nan-run"
    code, text = _cli(monkeypatch, capsys, "train", ARCH, "--data", "digits?size=16", "--epochs", "1", "--lr", "1e6",
                      "--train-n", "64", "--out", str(out))
    _assert_one_line_error(code, text, "training diverged at epoch 1", "step 1/1", "not marked done")
    assert "final test accuracy" not in text
    assert not (out / "DONE").exists() and not (out / "final.pt").exists()


def test_non_finite_weights_are_caught_after_the_epoch(tmp_path):
    from layerlab.train.loop import _check_finite_state

    model = load_model(f"{ARCH}&num_classes=10")
    with torch.no_grad():
        model.bn1.running_var.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="epoch 3, step 7/7 .*bn1.running_var holds NaN or inf"):
        _check_finite_state(model, model, 3, 7, recipe("baseline"), tmp_path)


# ---------------------------------------------------------------------------------- 5. an unreadable image file
def _jpeg_folder(root: Path, truncate: str | None = "b/1.jpg") -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg", quality=90)
    if truncate:
        bad = root / truncate
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return root


def test_truncated_jpeg_names_the_file(tmp_path):
    root = _jpeg_folder(tmp_path / "imgs")
    with pytest.raises(DataError, match=r"cannot read image '.*b/1\.jpg' .*skip_bad=true") as info:
        load_data(f"imagefolder:{root}", "train")
    assert "\n" not in str(info.value)


def test_skip_bad_skips_and_lists_unreadable_files(tmp_path):
    root = _jpeg_folder(tmp_path / "imgs")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\): .*b/1\.jpg"):
        d = load_data(f"imagefolder:{root}?skip_bad=true", "train")
    assert len(d) == 5 and d.indices.tolist() == [0, 1, 2, 3, 5] and d.labels.tolist() == [0, 0, 0, 1, 1]
    assert d.meta["skipped"] == [str(root / "b" / "1.jpg")]
    good = load_data(f"imagefolder:{_jpeg_folder(tmp_path / 'good', None)}?skip_bad=true", "train")
    assert len(good) == 6 and good.meta["skipped"] == []
    with pytest.raises(SpecError, match="skip_bad='maybe' is not a boolean"):
        load_data(f"imagefolder:{root}?skip_bad=maybe", "train")
    with pytest.raises(SpecError, match="has no option 'skipbad'"):
        load_data(f"imagefolder:{root}?skipbad=true", "train")


def test_truncated_jpeg_cli(monkeypatch, capsys, tmp_path):
    root = _jpeg_folder(tmp_path / "imgs")
    code, out = _cli(monkeypatch, capsys, "train", ARCH, "--data", f"imagefolder:{root}", "--epochs", "1",
                     "--out", str(tmp_path / "r"))
    _assert_one_line_error(code, out, "cannot read image", str(root / "b" / "1.jpg"), "skip_bad=true")


# ------------------------------------------------------------------------------- 6. suggestions by closeness
@pytest.mark.parametrize("spec, first", [
    ("timm:resnet19", "resnet18"),
    ("torchvision:resnet19", "resnet18"),
    ("timm:convnext_tiny_x", "convnext_tiny"),
])
def test_unknown_model_suggests_the_closest_name_first(spec, first):
    with pytest.raises(SpecError, match=f"did you mean '{first}'"):
        load_model(spec)


def test_unknown_recipe_and_source_suggest_close_names():
    with pytest.raises(SpecError, match="did you mean 'baseline'"):
        recipe("baselin")
    with pytest.raises(SpecError, match="did you mean 'digits'"):
        load_data("digit", "test")


def test_unknown_model_cli(monkeypatch, capsys):
    code, out = _cli(monkeypatch, capsys, "layers", "timm:resnet19")
    _assert_one_line_error(code, out, "timm has no model 'resnet19' (did you mean 'resnet18'")


# ----------------------------------------------------------------------------- the same cases in the analyses
def test_criticality_refuses_what_it_cannot_measure(tmp_path, monkeypatch, capsys):
    """Too many images, a model with fewer outputs than classes: errors from the API and exit 2 from the CLI,
    before any job is written (nothing a later run could take for finished)."""
    import layerlab.criticality as crit

    data = load_data(SMALL, "test")
    five = load_model(f"{ARCH}&num_classes=5")
    five.layerlab_spec = "five"
    with pytest.raises(DataError, match=f"holds {len(data)}"):
        crit.criticality(load_model(f"{ARCH}&num_classes=10"), data, images=len(data) + 1, layers=["fc"])
    with pytest.raises(DataError, match="has 5 outputs but .* has 10 classes"):
        crit.criticality(five, data, layers=["fc"], trials=1, store=tmp_path / "api")
    assert not list((tmp_path / "api").rglob("*.parquet"))
    with pytest.raises(DataError, match="has 5 outputs"):
        crit.criticality(five, data, layers=["fc"], trials=1, naive=True)
    path = save_checkpoint(five, tmp_path / "five.pt")
    out = tmp_path / "cli"
    code, text = _cli(monkeypatch, capsys, "criticality", f"file:{path}", "--data", SMALL, "--layers", "fc",
                      "--out", str(out), "--no-progress")
    _assert_one_line_error(code, text, "has 5 outputs", "has 10 classes")
    assert not list(out.rglob("*.parquet"))
    code, text = _cli(monkeypatch, capsys, "criticality", f"{ARCH}&num_classes=10", "--data", SMALL, "--images",
                      "100000", "--out", str(out), "--no-progress")
    _assert_one_line_error(code, text, "asked for 100000 images", f"holds {len(data)}")


def test_criticality_of_float_images_equals_uint8():
    """Float images in [0, 1] were divided by 255 again (criticality 0.0 instead of the real value)."""
    import layerlab.criticality as crit

    u8 = load_data(SMALL, "test", images=48, seed=2)
    as_float = ImageData(u8.images.float() / 255, u8.labels, u8.indices, u8.classes, u8.spec, u8.split)
    torch.manual_seed(3)
    model = load_model(f"{ARCH}&num_classes=10")
    a = crit.criticality(model, u8, layers=["conv1", "fc"], trials=2)
    b = crit.criticality(model, as_float, layers=["conv1", "fc"], trials=2)
    assert (a["criticality"] > 0).all()
    assert np.allclose(a["criticality"], b["criticality"], atol=1e-9)


def test_images_that_do_not_fit_the_model_are_one_line(tmp_path, monkeypatch, capsys):
    """1-channel images into a 3-channel model: a ShapeError naming the model and the image shape, not torch's
    RuntimeError (API) or a traceback (CLI)."""
    import layerlab.criticality as crit

    one = load_data("digits?size=16&channels=1", "test", images=8, seed=0)
    model = load_model(f"{ARCH}&num_classes=10")
    for naive in (False, True):
        with pytest.raises(ShapeError, match=r"cannot run on images of shape \(1, 16, 16\).*channels"):
            crit.criticality(model, one, layers=["fc"], trials=1, naive=naive)
    code, out = _cli(monkeypatch, capsys, "criticality", f"{ARCH}&in_chans=1&num_classes=10", "--data",
                     "digits?size=16", "--images", "8", "--layers", "fc", "--trials", "1", "--out", str(tmp_path / "c"))
    _assert_one_line_error(code, out, "cannot run on images of shape (3, 16, 16)")


def test_a_loader_with_fewer_images_than_asked_is_an_error():
    import layerlab.criticality as crit
    from torch.utils.data import DataLoader, TensorDataset

    d = load_data(SMALL, "test", images=32, seed=0)
    loader = DataLoader(TensorDataset(d.float(), d.labels), batch_size=16)
    with pytest.raises(DataError, match="asked for 100000 images but .* yields 32"):
        crit.criticality(load_model(f"{ARCH}&num_classes=10"), loader, images=100000, layers=["fc"], trials=1)


def test_images_outside_unit_range_for_a_layerlab_model_are_an_error(tmp_path):
    """A layerlab model takes [0, 1] images and normalises inside: 0-255 floats or [-1, 1] images handed as a
    tensor pair gave criticality ~100 and chance accuracy, silently."""
    import layerlab.criticality as crit

    d = load_data(SMALL, "test", images=16, seed=0)
    model = load_model(f"{ARCH}&num_classes=10")
    for bad, shown in ((d.float() * 255, "[0, 255]"), (d.float() * 2 - 1, "[-1, 1]")):
        with pytest.raises(DataError, match=r"takes images in \[0, 1\]"):
            crit.criticality(model, (bad, d.labels), layers=["fc"], trials=1)
    ok = crit.criticality(model, (d.float(), d.labels), layers=["fc"], trials=1)
    assert ok["criticality"].notna().all()


def test_lazy_module_before_its_first_forward_is_a_clear_error():
    """A LazyLinear has no weight shape until a forward ran: listing or analysing it says so in one line."""
    from torch import nn

    from layerlab import list_layers

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(LayerlabError, match=r"lazy module .*run one forward pass first"):
        list_layers(net)
    net(torch.zeros(1, 3, 8, 8))
    assert [i.params for i in list_layers(net)] == [4 * 3 * 9 + 4, 4 * 36 * 10 + 10]
