"""Distribution shifts: corruptions checked against closed forms and invariants, PGD against its constraints and
a trained model, shifted data against the data it wraps, and the NAME:SEVERITY grammar."""
from __future__ import annotations

import colorsys
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerlab.data import as_batches
from layerlab.errors import DataError, LayerlabError
from layerlab.shift import (
    CORRUPTIONS,
    SHIFTS,
    Shift,
    ShiftedBatches,
    corrupt,
    parse_shift,
    parse_shifts,
    pgd,
    shifted,
)
from layerlab.shift.corruptions import jpeg_round_trip, pixelate_to

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["gaussian-noise", "shot-noise", "impulse-noise", "gaussian-blur", "contrast", "brightness", "saturate",
         "jpeg", "pixelate"]
RANDOM = {"gaussian-noise", "shot-noise", "impulse-noise"}


def _images(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth colour images in [0, 1] (random 8x8 colours, upsampled), with a black and a grey patch."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=size, mode="bilinear", align_corners=False)
    x[:, :, :2, :2] = 0.0  # black pixels
    x[:, :, -2:, -2:] = 0.4  # grey pixels
    return x.clamp(0, 1)


def _run(x: torch.Tensor, name: str, severity: int, seed: int = 0, start: int = 0) -> torch.Tensor:
    return corrupt(x, Shift(name, severity), seed=seed, positions=torch.arange(start, start + x.shape[0]))


# -- corruptions -------------------------------------------------------------------------------------------------

def test_the_registry_holds_the_nine_corruptions():
    assert sorted(CORRUPTIONS.names()) == sorted(NAMES) and SHIFTS is CORRUPTIONS
    assert all(len(CORRUPTIONS.get(n).levels) == 5 for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_a_corruption_is_seeded_bounded_and_keeps_shape_and_dtype(name):
    x = _images(4, 16)
    assert torch.equal(_run(x, name, 0), x)
    for severity in range(1, 6):
        a, b, other = _run(x, name, severity), _run(x, name, severity), _run(x, name, severity, seed=1)
        assert torch.equal(a, b)
        assert torch.equal(a, other) != (name in RANDOM)  # only the random ones depend on the seed
        assert a.shape == x.shape and a.dtype == x.dtype and 0 <= float(a.min()) and float(a.max()) <= 1
        assert not torch.equal(a, x)
    x64 = x.double()
    assert _run(x64, name, 3).dtype == torch.float64


@pytest.mark.parametrize("name", NAMES)
def test_an_image_is_corrupted_the_same_in_any_batch(name):
    x = _images(5, 16)
    whole = _run(x, name, 4, start=10)
    one_by_one = torch.cat([_run(x[i : i + 1], name, 4, start=10 + i) for i in range(5)])
    assert torch.allclose(whole, one_by_one, atol=1e-6, rtol=0)
    perm = torch.tensor([3, 0, 4, 1, 2])
    shuffled = corrupt(x[perm], Shift(name, 4), seed=0, positions=10 + perm)
    assert torch.allclose(shuffled, whole[perm], atol=1e-6, rtol=0)
    twins = _run(x[:1].expand(2, -1, -1, -1), name, 4)  # one image at two positions: two draws
    assert torch.equal(twins[0], twins[1]) != (name in RANDOM)


@pytest.mark.parametrize("name", NAMES)
def test_damage_grows_with_severity(name):
    x = _images(8, 32)
    damage = [float((_run(x, name, s) - x).abs().mean()) for s in range(1, 6)]
    if name == "saturate":  # desaturates at 1-2, oversaturates at 3-5: monotone within each half
        assert damage[0] < damage[1] and damage[2] < damage[3] < damage[4]
    else:
        assert all(a < b for a, b in pairwise(damage)), damage


def test_contrast_pulls_each_image_towards_its_mean():
    x = _images()
    for severity, c in enumerate(CORRUPTIONS.get("contrast").levels, start=1):
        y = _run(x, "contrast", severity)
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        assert torch.allclose(y.mean(dim=(1, 2, 3), keepdim=True), m, atol=1e-6)
        assert torch.allclose(y - m, c * (x - m), atol=1e-6)


def _hsv_reference(x: torch.Tensor, edit) -> torch.Tensor:
    """Each pixel through colorsys: RGB -> HSV, ``edit(h, s, v)``, -> RGB (float64, one pixel at a time)."""
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        for r in range(x.shape[2]):
            for c in range(x.shape[3]):
                h, s, v = colorsys.rgb_to_hsv(*x[i, :, r, c].tolist())
                out[i, :, r, c] = torch.tensor(colorsys.hsv_to_rgb(*edit(h, s, v)), dtype=x.dtype)
    return out


def test_brightness_raises_the_hsv_value_as_colorsys_does():
    x = _images(2, 8).double()
    x[0, :, 0, 0] = torch.tensor([0.9, 0.2, 0.5], dtype=torch.float64)  # near the top: V clips at 1
    for severity, c in enumerate(CORRUPTIONS.get("brightness").levels, start=1):
        expected = _hsv_reference(x, lambda h, s, v, c=c: (h, s, min(1.0, v + c)))
        assert torch.allclose(_run(x, "brightness", severity), expected, atol=1e-9)
    assert torch.allclose(_run(x, "brightness", 5)[:, :, 0, 1], torch.full((2, 3), 0.3, dtype=torch.float64))  # black


def test_saturate_scales_the_hsv_saturation_as_colorsys_does_and_keeps_grey():
    x = _images(2, 8).double()
    grey = (x.amax(1) - x.amin(1)) == 0
    assert grey.any() and (~grey).any()
    for severity, (c1, c2) in enumerate(CORRUPTIONS.get("saturate").levels, start=1):
        expected = _hsv_reference(x, lambda h, s, v, c1=c1, c2=c2: (h, min(1.0, max(0.0, s * c1 + c2)), v))
        y = _run(x, "saturate", severity)
        colour = (~grey).unsqueeze(1).expand_as(x)
        assert torch.allclose(y[colour], expected[colour], atol=1e-9)
        assert torch.equal(y[~colour], x[~colour])


def test_pixelate_at_an_integer_factor_gives_constant_blocks_of_the_block_mean():
    x = _images(3, 32)
    y = pixelate_to(x, 0.25)
    blocks = F.avg_pool2d(x, 4)
    assert torch.allclose(y, blocks.repeat_interleave(4, -2).repeat_interleave(4, -1), atol=1e-6)


def test_jpeg_at_quality_100_is_close_to_the_image():
    x = _images(4, 32)
    grey = x.mean(1, keepdim=True)
    for images in (grey, grey.expand(-1, 3, -1, -1)):
        assert float((jpeg_round_trip(images, 100) - images).abs().max()) < 0.02
    colour = float((jpeg_round_trip(x, 100) - x).abs().mean())
    assert colour < 0.03 and colour < float((jpeg_round_trip(x, 40) - x).abs().mean())


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_noise_has_the_distribution_it_claims(name):
    x = torch.full((4, 3, 32, 32), 0.5)
    for severity, c in enumerate(CORRUPTIONS.get(name).levels, start=1):
        d = (_run(x, name, severity) - x).flatten()
        if name == "gaussian-noise":  # 0.5 +- 5 sigma never clips
            assert abs(float(d.std()) - c) < 0.05 * c and abs(float(d.mean())) < 0.1 * c
        elif name == "shot-noise":  # Poisson(0.5 c) / c: mean 0.5, variance 0.5 / c
            assert abs(float(d.mean())) < 0.01 and abs(float(d.var()) / (0.5 / c) - 1) < 0.1
        else:  # half of the flipped values become 1, half 0
            assert abs(float((d != 0).float().mean()) - c) < 0.25 * c + 0.003
            assert abs(float((d > 0).float().mean()) - float((d < 0).float().mean())) < 0.25 * c + 0.003


def test_blur_keeps_flat_images_and_fits_tiny_ones():
    flat = torch.full((2, 3, 16, 16), 0.3)
    assert torch.allclose(_run(flat, "gaussian-blur", 5), flat, atol=1e-6)
    assert _run(_images(2, 4), "gaussian-blur", 5).shape == (2, 3, 4, 4)


# -- PGD ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained():
    """A tiny MLP with BatchNorm trained on a linearly separable 2-class problem of 3x4x4 images; the attacks
    run on 64 held-out images (it classifies them at ~98%)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3 * 4 * 4, generator=g)
    x = torch.rand(2048 + 64, 3, 4, 4, generator=g)
    y = ((x - 0.5).flatten(1) @ w > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(100):
        batch = torch.arange(step * 128, step * 128 + 128) % 2048
        opt.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    model.train()  # the attack must switch to eval mode and back
    return model, x[2048:], y[2048:]


def _accuracy_and_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    return float((logits.argmax(-1) == y).float().mean()), float(F.cross_entropy(logits, y))


@pytest.mark.parametrize("norm,eps", [("linf", 16 / 255), ("l2", 0.5)])
def test_pgd_stays_in_budget_and_fools_the_model_without_touching_it(trained, norm, eps):
    model, x, y = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acc0, loss0 = _accuracy_and_loss(model, x, y)
    adv = pgd(model, x, y, norm=norm, eps=eps, seed=3)
    delta = (adv - x).flatten(1)
    bound = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert float(bound.max()) <= eps + (1e-6 if norm == "linf" else 1e-5)
    assert 0 <= float(adv.min()) and float(adv.max()) <= 1 and adv.shape == x.shape
    acc1, loss1 = _accuracy_and_loss(model, adv, y)
    assert acc0 > 0.9 and acc1 < 0.5 and loss1 > loss0 + 1
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics too
    assert torch.equal(adv, pgd(model, x, y, norm=norm, eps=eps, seed=3))
    assert not torch.equal(adv, pgd(model, x, y, norm=norm, eps=eps, seed=4))


def test_pgd_attacks_the_prediction_of_unlabelled_images_and_runs_under_inference_mode(trained):
    model, x, _ = trained
    model.eval()
    with torch.no_grad():
        predicted = model(x).argmax(-1)
    model.train()
    unlabelled = torch.full_like(predicted, -1)
    a = pgd(model, x, unlabelled, norm="linf", eps=4 / 255, steps=3)
    assert torch.equal(a, pgd(model, x, predicted, norm="linf", eps=4 / 255, steps=3))
    with torch.inference_mode():
        b = pgd(model, x, unlabelled, norm="linf", eps=4 / 255, steps=3)
    assert torch.allclose(a, b, atol=1e-6)
    halves = torch.cat([pgd(model, x[:32], unlabelled[:32], norm="linf", eps=4 / 255, steps=3),
                        pgd(model, x[32:], unlabelled[32:], norm="linf", eps=4 / 255, steps=3,
                            positions=torch.arange(32, 64))])
    assert torch.allclose(a, halves, atol=1e-6)  # each image's start comes from its position


# -- shifted data ------------------------------------------------------------------------------------------------

def _labelled(batch_size: int = 4):
    x = _images(10, 16)
    return as_batches((x, torch.arange(10) % 3), batch_size=batch_size), x


def test_shifted_data_keeps_labels_and_order_and_does_not_depend_on_batching():
    data, x = _labelled(4)
    s = shifted(data, "gaussian-noise:2", seed=5)
    assert isinstance(s, ShiftedBatches) and "gaussian-noise:2" in s.describe()
    assert len(s) == 10 and s.known_len() == 10 and torch.equal(s.indices, data.indices)
    pairs = list(s.batches())
    assert [b[0].shape[0] for b in pairs] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in pairs]), torch.arange(10) % 3)
    images = torch.cat([b[0] for b in pairs])
    assert torch.equal(images, corrupt(x, parse_shift("gaussian-noise:2"), seed=5, positions=torch.arange(10)))
    regrouped = torch.cat([b[0] for b in shifted(_labelled(3)[0], "gaussian-noise:2", seed=5, batch_size=2)])
    assert torch.equal(images, regrouped)


def test_shifted_fingerprints_tell_shifts_and_seeds_apart():
    data, _ = _labelled()
    prints = [data.fingerprint()] + [shifted(data, s, seed=seed).fingerprint()
                                     for s in ("contrast:1", "contrast:2", "jpeg:2") for seed in (0, 1)]
    assert len(set(prints)) == len(prints)
    assert shifted(data, "contrast:1").fingerprint() == shifted(data, "contrast:1").fingerprint()


def test_a_clean_shift_returns_the_data_itself():
    data, _ = _labelled()
    assert shifted(data, "clean") is data and shifted(data, Shift("contrast", 0)) is data


def test_shifted_refuses_normalised_images_and_an_attack_without_a_model():
    x = _images(4, 8) * 4 - 2
    with pytest.raises(DataError, match=r"defined on \[0, 1\] images.*Normalized"):
        next(iter(shifted(as_batches(x), "contrast:1").batches()))
    with pytest.raises(LayerlabError, match="model="):
        shifted(_labelled()[0], "pgd-linf:2")


def test_shifted_attacks_once_and_replays(trained):
    model, x, y = trained
    data = as_batches((x[:20], y[:20]), batch_size=8)
    s = shifted(data, "pgd-linf:4", model=model, seed=1)
    first, second = list(s.batches()), list(s.batches())
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    adv = torch.cat([b[0] for b in first])
    assert float((adv - x[:20]).abs().max()) <= 4 / 255 + 1e-6
    assert torch.allclose(adv, pgd(model, x[:20], y[:20], norm="linf", eps=4 / 255, seed=1), atol=1e-6)
    assert s.fingerprint() != shifted(data, "pgd-l2:4", model=model, seed=1).fingerprint()


# -- the NAME:SEVERITY grammar -----------------------------------------------------------------------------------

def test_shifts_print_as_they_are_written():
    assert str(parse_shift("gaussian-noise:3")) == "gaussian-noise:3" and str(parse_shift("clean")) == "clean"
    assert str(parse_shift("pgd-linf:2")) == "pgd-linf:2" and str(parse_shift("pgd-l2:0.5")) == "pgd-l2:0.5"
    assert parse_shift("Gaussian_Noise:3") == Shift("gaussian-noise", 3)
    assert parse_shift("contrast:0").clean and not parse_shift("contrast:1").clean
    assert parse_shift("pgd-l2:1").adversarial and not parse_shift("jpeg:1").adversarial


@pytest.mark.parametrize("text,match", [
    ("gausian-noise:3", r"unknown shift 'gausian-noise' \(did you mean 'gaussian-noise'.*known: clean, "),
    ("contrast:6", r"integer 0\.\.5"),
    ("contrast:2.5", r"integer 0\.\.5"),
    ("pgd-linf:0", r"must be > 0"),
    ("pgd-l2:-1", r"must be > 0"),
    ("contrast", r"severity is missing.*NAME:SEVERITY"),
    ("jpeg:high", r"not a number"),
])
def test_bad_shifts_say_what_is_allowed(text, match):
    with pytest.raises(LayerlabError, match=match) as info:
        parse_shift(text)
    assert "\n" not in str(info.value)


def test_parse_shifts_puts_clean_first_once_and_drops_duplicates():
    got = parse_shifts(["jpeg:2", "contrast:0", "pgd-linf:2", "jpeg:2", "clean", "pgd-linf:2.0"])
    assert [str(s) for s in got] == ["clean", "jpeg:2", "pgd-linf:2"]
    assert parse_shifts([]) == [Shift("clean")] and parse_shifts("jpeg:1") == [Shift("clean"), Shift("jpeg", 1)]
