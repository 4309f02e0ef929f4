"""Invariances under finetuning: inversion, STIR, the cached grid, summaries, figures and the CLI, on tiny models."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import layerlab.invariance as inv
import layerlab.invariance.inversion as inversion
from layerlab.errors import LayerlabError, ShapeError
from layerlab.invariance import InversionCache, initial_noise, invariance_grid, invert, matching_loss, stir, summarize
from layerlab.seeds import generator
from layerlab.similarity import linear_cka
from layerlab.store import Store

LAYERS = ["conv1", "conv2", "fc"]


class Tiny(nn.Module):
    """1x8x8 images -> conv(4) -> BN -> ReLU -> conv(6, stride 2) -> ReLU -> mean pool -> Linear(3)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(6, 3)
        with torch.no_grad():  # non-trivial BN statistics, so eval mode matters
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act2(self.conv2(self.act(self.bn(self.conv1(x)))))
        return self.fc(h.mean(dim=(2, 3)))


class Rotate(nn.Module):
    """Wraps a layer and applies a fixed map Q to its flattened output (orthogonal Q: a rotation)."""

    def __init__(self, inner: nn.Module, q: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("q", q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return (y.flatten(1) @ self.q).view_as(y)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def images() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(16, 1, 8, 8, generator=gen)


def _finetuned(model: nn.Module, seed: int = 5, scale: float = 0.3) -> nn.Module:
    """A perturbed copy: the same architecture with moved weights, standing in for a finetuned model."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=gen))
    return other


# ------------------------------------------------------------------------------------------- inversion


def test_stir_with_itself_approaches_one_as_the_inversion_converges(images):
    model = Tiny()
    values = []
    for steps in (0, 3, 60):
        x_inv, _ = invert(model, "conv1", images, steps=steps, step_size=0.5)
        values.append(stir(model, "conv1", images, x_inv))
    assert values[0] < values[1] < values[2]
    assert values[2] > 0.99 and values[2] - values[0] > 0.2


def test_final_matching_loss_is_reported_per_image_and_decreases_with_steps(images):
    model = Tiny()
    losses = {s: invert(model, "conv2", images, steps=s)[1] for s in (0, 5, 40)}
    assert all(tuple(l.shape) == (16,) and l.dtype == torch.float32 for l in losses.values())
    # 0 steps: the loss of the seeded noise itself
    with torch.no_grad():
        model.eval()
        feats = {}
        h = model.conv2.register_forward_hook(lambda m, a, o: feats.__setitem__("out", o))
        model(images)
        target = feats["out"]
        model(initial_noise(images.shape, 0))
        h.remove()
    assert torch.allclose(losses[0], matching_loss(feats["out"], target), rtol=1e-5)
    # the best iterate is kept along one deterministic trajectory: never worse per image, clearly better on average
    assert bool((losses[5] <= losses[0]).all()) and bool((losses[40] <= losses[5]).all())
    assert losses[40].mean() < 0.5 * losses[0].mean()


def test_inversion_is_in_range_seeded_and_independent_of_batch_size(images):
    model = Tiny()
    a, la = invert(model, "conv2", images, steps=8, seed=3, batch_size=16)
    b, lb = invert(model, "conv2", images, steps=8, seed=3, batch_size=5)
    c, _ = invert(model, "conv2", images, steps=8, seed=4, batch_size=16)
    assert a.shape == images.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(la, lb, atol=1e-6)
    assert not torch.allclose(a, c)


def test_model_is_restored_after_inversion_and_grid(images):
    model = Tiny()
    model.train()
    model.bn.eval()
    model.conv1.weight.requires_grad_(False)
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    modes = [(n, m.training) for n, m in model.named_modules()]
    state = copy.deepcopy(model.state_dict())
    invert(model, "conv2", images, steps=3)
    invariance_grid(model, _finetuned(model), data=images, layers=LAYERS, steps=2)
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags
    assert [(n, m.training) for n, m in model.named_modules()] == modes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------------------- STIR


def test_orthogonal_rotation_of_the_evaluated_features_leaves_stir_unchanged(images):
    m1, m2 = Tiny(0), Tiny(1)
    x_inv, _ = invert(m1, "conv2", images, steps=10)
    d = 6 * 4 * 4
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(2)))
    rotated = copy.deepcopy(m2)
    rotated.conv2 = Rotate(rotated.conv2, q)
    plain = stir(m2, "conv2", images, x_inv)
    assert stir(rotated, "conv2", images, x_inv) == pytest.approx(plain, abs=1e-6)
    # a non-orthogonal map changes it (so the check above can fail)
    skew = copy.deepcopy(m2)
    skew.conv2 = Rotate(skew.conv2, torch.diag(torch.linspace(0.01, 10, d)))
    assert abs(stir(skew, "conv2", images, x_inv) - plain) > 1e-3


def test_stir_uses_all_images_not_the_last_batch(images):
    m1, m2 = Tiny(0), Tiny(1)
    x_inv, _ = invert(m1, "conv1", images, steps=5)
    value = stir(m2, "conv2", images, x_inv, batch_size=5)  # batches of 5, 5, 5, 1
    feats = {}
    h = m2.conv2.register_forward_hook(lambda m, a, o: feats.setdefault(len(feats), o.detach()))
    with torch.no_grad():
        m2.eval()
        m2(images)
        m2(x_inv)
    h.remove()
    assert value == pytest.approx(linear_cka(feats[0], feats[1]), abs=1e-9)
    last = linear_cka(feats[0][-5:], feats[1][-5:])
    assert abs(value - last) > 1e-4


# ------------------------------------------------------------------------------------------- the grid


def test_identical_pretrained_and_finetuned_models_give_a_symmetric_grid(images):
    pt = Tiny()
    ft = copy.deepcopy(pt)
    res = invariance_grid(pt, ft, data=images, layers=LAYERS, steps=6)
    g = res["grid"]
    m = {(r, e): inv.grid_matrix(g, r, e).to_numpy() for r in ("pretrained", "finetuned") for e in ("pretrained", "finetuned")}
    assert np.allclose(m["pretrained", "finetuned"], m["finetuned", "pretrained"], atol=1e-12)
    assert np.allclose(m["pretrained", "finetuned"], m["pretrained", "pretrained"], atol=1e-12)
    assert np.allclose(m["finetuned", "finetuned"], m["pretrained", "pretrained"], atol=1e-12)
    cka = inv.grid_matrix(g, "pretrained", "finetuned", "cka").to_numpy()
    assert np.allclose(cka, cka.T, atol=1e-12) and np.allclose(np.diag(cka), 1.0)
    s = res["summary"]
    assert np.allclose(s["retention"], s["reverse"], atol=1e-12)
    # different weights break the symmetry
    res2 = invariance_grid(pt, _finetuned(pt), data=images, layers=LAYERS, steps=6)
    a = inv.grid_matrix(res2["grid"], "pretrained", "finetuned").to_numpy()
    b = inv.grid_matrix(res2["grid"], "finetuned", "pretrained").to_numpy()
    assert not np.allclose(a, b, atol=1e-6)


def test_each_inversion_is_computed_once_in_memory_on_disk_and_in_the_store(images, tmp_path, monkeypatch):
    calls: list[tuple[int, str]] = []
    real = inversion.invert

    def counting(model, layer, *args, **kwargs):
        calls.append((id(model), layer))
        return real(model, layer, *args, **kwargs)

    monkeypatch.setattr(inversion, "invert", counting)  # the cache calls it there
    pt = Tiny(0)
    ft, sc = _finetuned(pt, seed=5), Tiny(9)
    cache = InversionCache(tmp_path / "inversions")
    res = invariance_grid(pt, ft, sc, data=images, layers=LAYERS, steps=4, cache=cache)
    assert len(calls) == 3 * len(LAYERS) and len(set(calls)) == len(calls)  # 3L, not 3L^2
    assert cache.computed == 3 * len(LAYERS)
    g = res["grid"]
    assert len(g) == 3 * 3 * len(LAYERS) ** 2 * 3  # references x evaluated x i x j x metrics
    # same cache again: memory hits only
    invariance_grid(pt, ft, sc, data=images, layers=LAYERS, steps=4, cache=cache)
    assert len(calls) == 3 * len(LAYERS) and cache.memory_hits == 3 * len(LAYERS)
    # a fresh cache on the same folder: read from disk, same numbers
    disk = InversionCache(tmp_path / "inversions")
    again = invariance_grid(pt, ft, sc, data=images, layers=LAYERS, steps=4, cache=disk)
    assert len(calls) == 3 * len(LAYERS) and disk.disk_hits == 3 * len(LAYERS)
    pd.testing.assert_frame_equal(again["grid"], g)
    # different steps is a different inversion
    invariance_grid(pt, ft, data=images, layers=["conv1"], steps=5, cache=cache)
    assert len(calls) == 3 * len(LAYERS) + 2


def test_store_run_resumes_without_recomputing(images, tmp_path, monkeypatch, caplog):
    pt = Tiny(0)
    ft = _finetuned(pt)
    store = Store(tmp_path / "out")
    first = invariance_grid(pt, ft, data=images, layers=LAYERS, steps=3, store=store)
    assert len(store.paths("invariance")) == 2 * len(LAYERS)
    assert len(list((tmp_path / "out" / "cache" / "inversions").glob("*.pt"))) == 2 * len(LAYERS)
    monkeypatch.setattr(inversion, "invert", lambda *a, **k: pytest.fail("an inversion was recomputed"))
    with caplog.at_level("INFO", logger="layerlab"):
        second = invariance_grid(pt, ft, data=images, layers=LAYERS, steps=3, store=store)
    n = 2 * len(LAYERS)
    assert [r.getMessage() for r in caplog.records if r.name == "layerlab"] == [  # said before the work (issue 16)
        f"{n} of {n} invariance jobs (model x layer) already done (in {tmp_path / 'out'}); running 0"]
    pd.testing.assert_frame_equal(first["grid"], second["grid"])
    pd.testing.assert_frame_equal(first["summary"], second["summary"])
    assert len(store.read("invariance")) == len(first["grid"])


def test_noise_floor_is_stir_of_the_zero_step_inversion(images):
    pt = Tiny(0)
    ft = _finetuned(pt)
    g = invariance_grid(pt, ft, data=images, layers=LAYERS, steps=5)["grid"]
    noise_inv, _ = invert(pt, "conv2", images, steps=0)
    expected = stir(ft, "fc", images, noise_inv)
    row = g[(g.metric == "noise") & (g.reference == "pretrained") & (g.evaluated == "finetuned") & (g.eval_layer == "fc")]
    assert np.allclose(row["value"], expected, atol=1e-12)  # the same for every reference layer i
    stir_row = g[(g.metric == "stir") & (g.reference == "pretrained") & (g.evaluated == "finetuned")
                 & (g.ref_layer == "conv2") & (g.eval_layer == "fc")]
    x_inv, _ = invert(pt, "conv2", images, steps=5)
    assert float(stir_row["value"].iloc[0]) == pytest.approx(stir(ft, "fc", images, x_inv), abs=1e-12)


def test_summary_retention_transfer_and_compression():
    rows = []
    values = {  # STIR(ev_j | pt_i) for a 3-layer toy grid
        "finetuned": [[0.9, 0.5, 0.1], [0.7, 0.6, 0.3], [0.2, 0.8, 0.4]],
        "scratch": [[0.6, 0.2, 0.1], [0.3, 0.5, 0.2], [0.1, 0.2, 0.45]],
        "pretrained": [[1.0, 0.4, 0.1], [0.5, 0.95, 0.3], [0.2, 0.5, 0.9]],
    }
    names = ["a", "b", "c"]
    for ev, mat in values.items():
        for i in range(3):
            for j in range(3):
                for metric, v in (("stir", mat[i][j]), ("noise", 0.6 if j == 0 else 0.05), ("cka", 0.5)):
                    rows.append({"reference": "pretrained", "ref_layer": names[i], "ref_label": names[i], "ref_index": i,
                                 "evaluated": ev, "eval_layer": names[j], "eval_label": names[j], "eval_index": j,
                                 "metric": metric, "value": v})
    s = summarize(pd.DataFrame(rows))
    assert s["retention"].tolist() == [0.9, 0.6, 0.4]
    assert s["scratch"].tolist() == [0.6, 0.5, 0.45]
    assert np.allclose(s["transfer"], [0.3, 0.1, -0.05])
    assert s["ceiling"].tolist() == [1.0, 0.95, 0.9]
    assert s["best_label"].tolist() == ["a", "a", "b"] and s["shift"].tolist() == [0, -1, -1]
    assert s["scratch_shift"].tolist() == [0, 0, 0]
    # above the noise floor (high at layer a) layer b wins for pt layer b: (0.7 - 0.6) / 0.4 < (0.6 - 0.05) / 0.95
    assert s["best_label_above_noise"].tolist() == ["a", "b", "b"] and s["shift_above_noise"].tolist() == [0, 0, -1]
    assert s["noise"].tolist() == [0.6, 0.05, 0.05]


# ------------------------------------------------------------------------------------------- bad input


def test_bad_input_fails_with_a_teaching_message(images):
    model = Tiny()
    with pytest.raises(LayerlabError, match=r"unknown layer 'conv3'.*did you mean"):
        invert(model, "conv3", images, steps=1)
    with pytest.raises(ShapeError, match=r"4-D image batch"):
        invert(model, "conv1", images[0], steps=1)
    with pytest.raises(ShapeError, match=r"float images in \[0, 1\]"):
        invert(model, "conv1", (images * 255).to(torch.uint8), steps=1)
    with pytest.raises(ShapeError, match=r"values in \[0, 1\]"):
        invert(model, "conv1", images * 3 - 1, steps=1)
    with pytest.raises(ShapeError, match=r"do not fit Tiny.*channel count"):
        invert(model, "conv1", images.expand(-1, 3, -1, -1), steps=1)
    with pytest.raises(LayerlabError, match="steps"):
        invert(model, "conv1", images, steps=-1)
    with pytest.raises(ShapeError, match="same images"):
        stir(model, "conv1", images, images[:4])
    with pytest.raises(LayerlabError, match="unknown layer"):
        invariance_grid(model, Tiny(1), data=images, layers=["conv1", "nope"], steps=1)
    with pytest.raises(LayerlabError, match="estimator"):
        invariance_grid(model, Tiny(1), data=images, layers=["conv1"], steps=1, estimator="minibatch")


# ------------------------------------------------------------------------------------------- figures and CLI


def test_figures_and_cli(images, tmp_path, monkeypatch):
    from typer.testing import CliRunner
    import typer

    monkeypatch.setenv("LAYERLAB_TRUST_PICKLE", "1")  # the models below are whole pickled modules: opt in

    from layerlab.cli import invariance as cli_inv
    from layerlab.plots.invariance import save_all

    pt = Tiny(0)
    ft, sc = _finetuned(pt), Tiny(3)
    cache = InversionCache()
    res = invariance_grid(pt, ft, sc, data=images, layers=LAYERS, steps=2, cache=cache)
    examples = inv.example_inversions(cache, res["inversions"], k=3)
    paths = save_all(res, tmp_path / "fig", originals=images[:3], examples=examples)
    assert sorted(p.name for p in paths) == sorted(f"{n}.{e}" for n in ("stir_grids", "layer_curves", "inversions")
                                                   for e in ("png", "svg"))
    assert all(p.stat().st_size > 1000 for p in paths)

    for name, m in (("pt", pt), ("ft", ft)):
        torch.save(m, tmp_path / f"{name}.pt")
    app = typer.Typer()
    cli_inv.register(app)
    app.command("noop")(lambda: None)  # a second command keeps typer in multi-command mode
    out = tmp_path / "cli"
    args = ["invariance", str(tmp_path / "pt.pt"), f"file:{tmp_path / 'ft.pt'}", "--data", "digits?size=8&channels=1",
            "--out", str(out), "--layers", "conv1,fc", "--images", "12", "--steps", "2", "--examples", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "retention" in result.output
    # the CLI's part is writing the files; what the figures draw: below and in test_figure_content.py
    assert (out / "figures" / "invariance" / "stir_grids.png").stat().st_size > 1000
    assert (out / "figures" / "invariance" / "inversions.svg").stat().st_size > 1000
    from layerlab.plots.invariance import grid_heatmaps

    panels = [ax for ax in grid_heatmaps(res["grid"]).axes if ax.images]
    assert panels[0].get_title() == "STIR(ft_j | pt_i)" and len(panels) == 7  # pt, ft, scratch: every grid
    want = inv.grid_matrix(res["grid"], "pretrained", "finetuned")
    assert [t.get_text() for t in panels[0].get_yticklabels()] == list(want.index) and len(want) == len(LAYERS)
    np.testing.assert_allclose(np.asarray(panels[0].images[0].get_array()), want.to_numpy())
    assert len(Store(out).read("invariance")) == 2 * 2 * 2 * 2 * 3
    bad = CliRunner().invoke(app, [*args[:7], "--layers", "conv9"])
    assert bad.exit_code != 0 and "unknown layer 'conv9'" in str(bad.exception or bad.output)


# ------------------------------------------------------------------------------------------- input range


class Normalising(Tiny):
    """Tiny on 3-channel images with the normalisation (x - mean) / std inside (``inner=False`` leaves it out)."""

    def __init__(self, mean, std, inner: bool = True, seed: int = 0) -> None:
        super().__init__(seed)
        torch.manual_seed(seed + 100)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.inner = inner
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x - self.mean) / self.std if self.inner else x)


def _reference_invert(model, layer, images, steps, step_size, seed):
    """A copy of the inversion as it was before ``input_range`` (start and every step clamped to [0, 1])."""
    from layerlab.features import forward_until

    def feats(x):
        return forward_until(model, layer, x).reshape(x.shape[0], -1)

    model.eval()
    x = torch.randn(tuple(images.shape), generator=generator("invariance/start", seed), dtype=torch.float32).clamp_(0.0, 1.0)
    with torch.no_grad():
        target = feats(images).float()
    best, best_loss = x.clone(), torch.full((x.shape[0],), float("inf"))
    for i in range(steps + 1):
        last = i == steps
        x.requires_grad_(not last)
        with torch.set_grad_enabled(not last):
            loss = matching_loss(feats(x), target)
        with torch.no_grad():
            better = loss.detach() < best_loss
            best[better] = x.detach()[better]
            best_loss = torch.where(better, loss.detach(), best_loss)
        if last:
            break
        (grad,) = torch.autograd.grad(loss.sum(), x)
        with torch.no_grad():
            norm = grad.reshape(grad.shape[0], -1).norm(dim=1).clamp_min(1e-12)
            x = (x.detach() - step_size * grad / norm.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
    return best, best_loss


def test_default_input_range_is_bit_for_bit_the_original_inversion_and_keeps_cache_keys(images):
    model = Tiny()
    want_x, want_loss = _reference_invert(copy.deepcopy(model), "conv2", images, steps=6, step_size=0.5, seed=2)
    start = torch.randn(tuple(images.shape), generator=generator("invariance/start", 2)).clamp_(0.0, 1.0)
    for rng in (None, (0.0, 1.0), (0, 1), (torch.zeros(1), torch.ones(1))):
        kw = {} if rng is None else {"input_range": rng}
        x, loss = invert(model, "conv2", images, steps=6, seed=2, **kw)
        assert torch.equal(x, want_x) and torch.equal(loss, want_loss)
        assert torch.equal(initial_noise(images.shape, 2, **kw), start)
    key = {"seed": 0, "steps": 3, "step_size": 0.5, "precision": "fp32"}
    assert InversionCache.key("w", "conv2", "i", **key) == "9ec588882f4c948a7f2f"  # the key before input_range
    assert InversionCache.key("w", "conv2", "i", **key, input_range=(0.0, 1.0)) == "9ec588882f4c948a7f2f"
    assert InversionCache.key("w", "conv2", "i", **key, input_range=(-1.0, 1.0)) != "9ec588882f4c948a7f2f"


@pytest.mark.parametrize("bounds", ["floats", "per-channel"])
def test_normalised_inputs_with_their_range_give_the_same_inversion_as_normalisation_inside(bounds):
    x = torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    inside = Normalising(0.5, 0.5, inner=True)
    outside = Normalising(0.5, 0.5, inner=False)
    outside.load_state_dict(inside.state_dict())
    x_norm = (x - 0.5) / 0.5  # in [-1, 1]
    rng = (-1.0, 1.0) if bounds == "floats" else (torch.full((3,), -1.0), torch.full((3, 1, 1), 1.0))
    for steps in (0, 12):
        a, la = invert(inside, "conv2", x, steps=steps, step_size=0.5, seed=1)
        # the same geometry: std 0.5 everywhere, so a step of 0.5 on [0, 1] is a step of 1.0 on [-1, 1]
        b, lb = invert(outside, "conv2", x_norm, steps=steps, step_size=1.0, seed=1, input_range=rng)
        assert float(b.min()) >= -1.0 and float(b.max()) <= 1.0
        assert torch.allclose((a - 0.5) / 0.5, b, atol=1e-4), float(((a - 0.5) / 0.5 - b).abs().max())
        assert torch.allclose(la, lb, rtol=1e-4, atol=1e-6)
    assert float(b.min()) < 0.0  # the inversion uses the lower half of the range
    assert float(lb.mean()) < 0.5 * float(invert(outside, "conv2", x_norm, steps=0, seed=1, input_range=rng)[1].mean())


def test_per_channel_imagenet_style_range_keeps_every_channel_in_its_bounds():
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    lo, hi = (0 - mean) / std, (1 - mean) / std
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    x_norm = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    model = Normalising(mean, std, inner=False)
    start, _ = invert(model, "conv2", x_norm, steps=0, input_range=(lo, hi))
    want = (initial_noise(x.shape, 0) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert torch.allclose(start, want, atol=1e-6)  # the [0, 1] start, normalised
    out, loss = invert(model, "conv2", x_norm, steps=10, step_size=2.0, input_range=(lo, hi))
    assert bool((out.amin(dim=(0, 2, 3)) >= lo).all()) and bool((out.amax(dim=(0, 2, 3)) <= hi).all())
    assert bool(torch.isfinite(loss).all())


def test_input_range_in_the_grid_matches_normalisation_inside_and_changes_the_keys(tmp_path):
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    pt_in = Normalising(0.5, 0.5, inner=True)
    ft_in = _finetuned(pt_in)
    pt_out, ft_out = Normalising(0.5, 0.5, inner=False), Normalising(0.5, 0.5, inner=False)
    pt_out.load_state_dict(pt_in.state_dict())
    ft_out.load_state_dict(ft_in.state_dict())
    a = invariance_grid(pt_in, ft_in, data=x, layers=["conv1", "fc"], steps=3, step_size=0.5)
    store = Store(tmp_path / "out")
    b = invariance_grid(pt_out, ft_out, data=(x - 0.5) / 0.5, layers=["conv1", "fc"], steps=3, step_size=1.0,
                        input_range=(-1.0, 1.0), store=store)
    assert np.allclose(a["grid"]["value"], b["grid"]["value"], atol=1e-4)
    assert not set(a["inversions"]["key"]) & set(b["inversions"]["key"])
    metas = [store.shard_meta(p) for p in store.paths("invariance")]
    assert metas and all(m["config"]["input_range"] == [-1.0, 1.0] for m in metas)
    plain = Store(tmp_path / "plain")
    invariance_grid(pt_in, ft_in, data=x, layers=["conv1"], steps=1, store=plain)
    assert all("input_range" not in plain.shard_meta(p)["config"] for p in plain.paths("invariance"))


def test_bad_input_range_fails_with_one_line():
    model = Normalising(0.5, 0.5, inner=False)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    cases = [
        (x * 3 - 1, (0.0, 1.0), r"values in \[0, 1\]"),
        (x * 3 - 1, (-1.0, 1.0), r"outside input_range \[-1, 1\]"),
        (x - 0.5, (torch.tensor([-0.5, 0.0, -0.5]), 0.5), r"outside input_range.*per channel"),
        (x, (1.0, 0.0), r"lo < hi"),
        (x, (torch.tensor([0.0, 0.0, 1.0]), 1.0), r"lo < hi"),
        (x, (torch.zeros(4), 1.0), r"4 per-channel bounds but the images have 3 channels"),
        (x, (torch.zeros(3, 2), 1.0), r"not per-channel"),
        (x, (0.0,), r"expected \(lo, hi\)"),
        (x, (0.0, float("nan")), r"finite"),
    ]
    for images, rng, pattern in cases:
        with pytest.raises(LayerlabError, match=pattern) as err:
            invert(model, "conv1", images, steps=1, input_range=rng)
        assert "\n" not in str(err.value)
    with pytest.raises(LayerlabError, match="outside input_range"):
        invariance_grid(model, Normalising(0.5, 0.5, inner=False, seed=1), data=x * 3 - 1, layers=["conv1"], steps=1,
                        input_range=(-1.0, 1.0))


def _biased_cka_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """Kornblith et al.'s biased linear CKA with the centring matrix H, in float64 numpy."""
    n = a.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    ka, kb = h @ a @ a.T @ h, h @ b @ b.T @ h
    return float((ka * kb).sum() / np.sqrt((ka * ka).sum() * (kb * kb).sum()))


def _hooked_numpy(model: nn.Module, layer: str, x: torch.Tensor) -> np.ndarray:
    got = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, a, o: got.append(o))
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    return got[0].reshape(x.shape[0], -1).double().numpy()


def test_stir_takes_the_input_range_of_a_model_on_normalised_inputs():
    gen = torch.Generator().manual_seed(7)
    x, x_inv = torch.rand(12, 3, 8, 8, generator=gen), torch.rand(12, 3, 8, 8, generator=gen)
    inside = Normalising(0.5, 0.5, inner=True)
    outside = Normalising(0.5, 0.5, inner=False)
    outside.load_state_dict(inside.state_dict())
    xn, xn_inv = (x - 0.5) / 0.5, (x_inv - 0.5) / 0.5  # in [-1, 1]
    per_channel = (torch.full((3,), -1.0), torch.full((3, 1, 1), 1.0))
    for layer in ("conv1", "conv2"):
        want = _biased_cka_numpy(_hooked_numpy(outside, layer, xn), _hooked_numpy(outside, layer, xn_inv))
        for rng in ((-1.0, 1.0), per_channel):
            assert stir(outside, layer, xn, xn_inv, input_range=rng) == pytest.approx(want, abs=1e-6)
        assert stir(inside, layer, x, x_inv) == pytest.approx(want, abs=1e-5)  # normalisation inside: the same
    assert stir(outside, "conv2", xn, xn_inv, input_range=(-1.0, 1.0), estimator="unbiased") != pytest.approx(want)
    with pytest.raises(ShapeError, match=r"X: expected values in \[0, 1\]"):
        stir(outside, "conv2", xn, xn_inv)  # the default range still guards [0, 1] models
    with pytest.raises(ShapeError, match=r"X_inv: values outside input_range \[-1, 0.5\]"):
        stir(outside, "conv2", xn.clamp(max=0.5), xn_inv, input_range=(-1.0, 0.5))
    with pytest.raises(LayerlabError, match="lo < hi"):
        stir(outside, "conv2", xn, xn_inv, input_range=(1.0, -1.0))
    picked = inv.grid_images(xn, images=5, seed=3, input_range=(-1.0, 1.0))
    assert picked.shape == (5, 3, 8, 8) and float(picked.min()) < 0.0
    with pytest.raises(ShapeError, match=r"values in \[0, 1\]"):
        inv.grid_images(xn, images=5)
