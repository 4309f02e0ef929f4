"""Layer criticality (Gavrikov et al. 2024), Zhang et al. 2022 resets and Chatterji et al. 2020 module criticality.

Small models and few images keep the file fast; the hand computations use plain matrix products on a 3-layer MLP
whose layers carry ResNet-style names (``layer1.0.conv1``) so that block units exist.
"""
from __future__ import annotations

import copy
import json
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from torch import nn
from typer.testing import CliRunner

import layerlab.criticality as crit
from layerlab import fresh_model, list_layers, load_data, load_model, save_checkpoint
from layerlab.criticality import driver, engine, metrics, references
from layerlab.errors import LayerlabError, NonFiniteError
from layerlab.seeds import derive_seed, generator
from layerlab.store import Store

SPEC = "timm:resnet18?channels=8,16,32,64&stem_width=8&num_classes=10"
DATA = "digits?size=16"


# ------------------------------------------------------------------------------------------------ fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return load_data(DATA, "test", images=40, seed=0)


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """A tiny ResNet that behaves like a trained one, built in well under a second: BatchNorm scales set to 1
    (timm zero-inits the last one of each block, which would make those blocks inert), running statistics from
    digits, and a softmax-regression head fitted on the pooled features."""
    torch.manual_seed(1234)
    model = load_model(SPEC)
    train = load_data(DATA, "train")
    x = train.float()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.momentum = None  # cumulative average: one pass sets the statistics of these images
                m.reset_running_stats()
        model.train()
        model(x)
        model.eval()
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    head = nn.Linear(feats.shape[1], 10)
    opt = torch.optim.Adam(head.parameters(), lr=0.05, weight_decay=1e-3)
    mean, scale = feats.mean(0), 1.0 / (feats.std(0) + 1e-6)
    z = (feats - mean) * scale
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(head(z), train.labels).backward()
        opt.step()
    with torch.no_grad():  # fold the standardisation into the head
        model.fc.weight.copy_(head.weight * scale)
        model.fc.bias.copy_(head.bias - (head.weight * scale) @ mean)
    return model


def _mlp() -> nn.Sequential:
    block = nn.Sequential(OrderedDict(conv1=nn.Linear(192, 16), act=nn.ReLU(), conv2=nn.Linear(16, 16)))
    return nn.Sequential(OrderedDict(
        flatten=nn.Flatten(), layer1=nn.Sequential(OrderedDict({"0": block})), act=nn.ReLU(), fc=nn.Linear(16, 10)
    ))


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory) -> Path:
    """A training run of the MLP on 8x8 digits with checkpoints at epochs 0 (init), 1 and 2 (final)."""
    root = tmp_path_factory.mktemp("mlp")
    torch.manual_seed(0)
    net = _mlp()
    torch.save(net, root / "arch.pt")  # a whole pickled module: loading it (and this run) needs trust_pickle=True
    net.layerlab_arch = "file:" + str(root / "arch.pt")
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"arch": net.layerlab_arch, "data": "digits?size=8"}))
    train = load_data("digits?size=8", "train")
    x, y = train.float(), train.labels
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for epoch in range(3):
        save_checkpoint(net, run / "checkpoints" / f"epoch_{epoch:04d}.pt", epoch=epoch)
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    save_checkpoint(net, run / "checkpoints" / "epoch_0003.pt", epoch=3)
    save_checkpoint(net, run / "final.pt", epoch=3)
    return run


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["state_dict"]


def _mlp_logits(x: torch.Tensor, s: dict[str, torch.Tensor]) -> torch.Tensor:
    """The MLP's forward pass written out by hand (float64)."""
    d = {k: v.double() for k, v in s.items()}
    h = torch.relu(x.double().flatten(1) @ d["layer1.0.conv1.weight"].T + d["layer1.0.conv1.bias"])
    h = torch.relu(h @ d["layer1.0.conv2.weight"].T + d["layer1.0.conv2.bias"])
    return h @ d["fc.weight"].T + d["fc.bias"]


def _numbers(ref: torch.Tensor, out: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Cosine of softmaxes, agreement, accuracy and KL, computed independently with numpy."""
    a, b = ref.numpy(), out.numpy()
    p = np.exp(a - a.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.exp(b - b.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    cos = (p * q).sum(1) / np.linalg.norm(p, axis=1) / np.linalg.norm(q, axis=1)
    return {
        "criticality": 100 * (1 - cos.mean()),
        "agreement": float((a.argmax(1) == b.argmax(1)).mean()),
        "accuracy": float((b.argmax(1) == labels.numpy()).mean()),
        "kl": float((p * (np.log(p) - np.log(q))).sum(1).mean()),
    }


# -------------------------------------------------------------------------------------------- pure metrics
def test_metrics_match_hand_values():
    ref = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    out = torch.zeros(1, 2)
    got = crit.layer_criticality(ref, out, torch.tensor([1]))
    cos = (0.25 * 0.5 + 0.75 * 0.5) / (math.hypot(0.25, 0.75) * math.hypot(0.5, 0.5))
    assert got["similarity"] == pytest.approx(cos, abs=1e-12)
    assert got["criticality"] == pytest.approx(100 * (1 - cos), abs=1e-10)
    assert got["kl"] == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-12)
    assert got["agreement"] == 0.0  # argmax 1 vs argmax 0 (ties go to the first class)
    assert got["accuracy"] == 0.0
    with pytest.raises(LayerlabError, match=r"\[N, classes\]"):
        crit.softmax_cosine(torch.zeros(3), torch.zeros(3))


# ------------------------------------------------------------------------------------------ the procedure
def test_layer_equal_to_its_fresh_weights_has_zero_criticality(trained, data):
    model = copy.deepcopy(trained)
    fresh = fresh_model(model, seed=derive_seed("criticality/fresh", 0, 0), device="cpu")  # trial 0's documented draw
    with torch.no_grad():
        model.layer2[0].conv1.weight.copy_(fresh.layer2[0].conv1.weight)
    table = crit.criticality(model, data, trials=2, layers=["layer2.0.conv1", "layer3.0.conv1"])
    row = table.set_index(["layer", "trial"])["criticality"]
    assert abs(row["layer2.0.conv1", 0]) < 1e-9  # trial 0 swaps in exactly the weights it already has
    assert row["layer2.0.conv1", 1] > 1e-3  # trial 1 (its own stream) does not
    assert row["layer3.0.conv1", 0] > 1e-3


def test_randomising_the_head_of_a_trained_model_is_critical(trained, data):
    table = crit.criticality(trained, data, trials=3, layers=["fc"])
    assert (table["base_accuracy"] >= 0.3).all()  # the fitted head works (chance: 0.1)
    assert table["criticality"].min() > 20
    assert table["accuracy"].max() < table["base_accuracy"].iloc[0] - 0.15
    assert (table["agreement"] < 0.5).all()


def test_only_conv_and_linear_weights_are_swapped(trained, data, monkeypatch):
    swapped: list[str] = []
    original = driver._overrides

    def spy(model, unit, source, what):
        out = original(model, unit, source, what)
        swapped.extend(out)
        return out

    monkeypatch.setattr(driver, "_overrides", spy)
    table = crit.criticality(trained, data, trials=1)
    modules = dict(trained.named_modules())
    assert set(table["layer"]) == {i.name for i in list_layers(trained)}
    assert not any("bn" in n or "norm" in n for n in table["layer"])
    assert swapped and all(isinstance(modules[n.rpartition(".")[0]], (nn.Conv2d, nn.Linear)) for n in swapped)
    assert {n.rpartition(".")[2] for n in swapped} <= {"weight", "bias"}
    with pytest.raises(LayerlabError, match="bn1"):
        crit.criticality(trained, data, trials=1, layers=["bn1"])


def test_deterministic_under_a_seed(trained):
    a = crit.criticality(trained, DATA, images=24, seed=3, trials=2, layers=["conv1", "layer3.1.conv2"])
    b = crit.criticality(trained, DATA, images=24, seed=3, trials=2, layers=["conv1", "layer3.1.conv2"])
    c = crit.criticality(trained, DATA, images=24, seed=4, trials=2, layers=["conv1", "layer3.1.conv2"])
    pd.testing.assert_frame_equal(a, b)
    assert a.attrs["indices"] == b.attrs["indices"] != c.attrs["indices"]
    assert not np.allclose(a["criticality"], c["criticality"])
    assert list(a["seed"]) == [3, 3, 3, 3] and list(a["trial"]) == [0, 1, 0, 1]
    assert list(a["draw_seed"]) == [derive_seed("criticality/fresh", 3, t) for t in (0, 1, 0, 1)]
    assert all(d > 2**32 for d in a["draw_seed"])  # far off the small-integer line users train with


# ------------------------------------------------------------------------------------------ exact restore
def _snapshot(model: nn.Module, x: torch.Tensor):
    flags = [m.training for m in model.modules()]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        logits = model(x)
    for m, f in zip(model.modules(), flags):
        m.training = f
    return flags, state, logits


def _assert_restored(model: nn.Module, x: torch.Tensor, snap) -> None:
    flags, state, logits = snap
    assert [m.training for m in model.modules()] == flags
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), logits)  # bit for bit


@pytest.mark.parametrize("naive", [False, True])
def test_model_reproduces_its_logits_after_a_run(trained, data, naive):
    model = copy.deepcopy(trained).train()  # mixed flags must come back too
    model.layer1.eval()
    x = data.float()[:8]
    snap = _snapshot(model, x)
    crit.criticality(model, data, trials=2, naive=naive, layers=["conv1", "layer2.0.downsample.0", "fc"])
    crit.criticality(model, data, trials=1, units="blocks", naive=naive, layers=["layer3.1"])
    _assert_restored(model, x, snap)


def test_model_is_restored_after_a_run_that_raises(trained, data, monkeypatch):
    model = copy.deepcopy(trained).train()
    x = data.float()[:8]
    snap = _snapshot(model, x)
    calls = {"n": 0}
    original = engine._batch_stats

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom midway")
        return original(*args)

    monkeypatch.setattr(engine, "_batch_stats", failing)
    with pytest.raises(RuntimeError, match="boom midway"):
        crit.criticality(model, data, trials=2, batch_size=16)
    assert calls["n"] == 3
    _assert_restored(model, x, snap)


# ------------------------------------------------------------------------------------------- fast == naive
def test_fast_matches_naive(trained, data):
    fast = crit.criticality(trained, data, trials=2, batch_size=16)
    naive = crit.criticality(trained, data, trials=2, batch_size=16, naive=True)
    assert len(crit.Pipeline(trained, torch.device("cpu"), amp=False, channels_last=False).stages) == 14
    assert (fast["criticality"] - naive["criticality"]).abs().max() < 0.01
    assert (fast["agreement"] - naive["agreement"]).abs().max() == 0
    blocks_fast = crit.criticality(trained, data, trials=2, units="blocks", layers=["conv1", "layer2.0", "fc"])
    blocks_naive = crit.criticality(trained, data, trials=2, units="blocks", layers=["conv1", "layer2.0", "fc"], naive=True)
    assert (blocks_fast["criticality"] - blocks_naive["criticality"]).abs().max() < 0.01
    assert list(blocks_fast["label"].unique()) == ["conv1", "[2.0]", "fc"]


def test_cuda_style_options_run_and_agree(trained, data):
    """bf16 autocast and channels_last (the CUDA defaults) exercised on the CPU: same rows, close numbers."""
    picked = ["conv1", "layer2.0.conv2", "fc"]
    plain = crit.criticality(trained, data, trials=2, layers=picked)
    last = crit.criticality(trained, data, trials=2, layers=picked, channels_last=True)
    bf16 = crit.criticality(trained, data, trials=2, layers=picked, channels_last=True, amp=True)
    assert (plain["criticality"] - last["criticality"]).abs().max() < 0.01
    assert (plain["criticality"] - bf16["criticality"]).abs().max() < 3  # bf16 keeps ~3 significant digits
    assert list(bf16["layer"]) == list(plain["layer"])


def test_stage_chains_reproduce_the_forward_pass():
    import torchvision

    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    tv = torchvision.models.resnet18(num_classes=10).eval()
    chain = crit.Pipeline(tv, torch.device("cpu"), amp=False, channels_last=False)
    assert [s.path for s in chain.stages][-3:] == ["avgpool", "flatten", "fc"]
    with torch.no_grad():
        assert torch.equal(chain.trace(x, ())[0], tv(x))


class _Odd(nn.Module):
    """ResNet-shaped names, but a forward that skips ``maxpool``: the decomposition must notice and fall back."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.global_pool(self.layer1(self.act1(self.bn1(self.conv1(x))))))


def test_unknown_architectures_fall_back_to_the_full_forward(data):
    torch.manual_seed(0)
    odd = _Odd().eval()
    with pytest.warns(UserWarning, match="falling back"):
        fast = _odd_run(odd, data, naive=False)
    naive = _odd_run(odd, data, naive=True)
    assert (fast["criticality"] - naive["criticality"]).abs().max() < 0.01


def _odd_run(odd: nn.Module, data, naive: bool) -> pd.DataFrame:
    """Criticality of ``_Odd`` against a fixed reference made by hand (it has no registered architecture)."""
    torch.manual_seed(1)
    other = _Odd()
    pipe = crit.Pipeline(odd, torch.device("cpu"), amp=False, channels_last=False)
    units = crit.units_of(odd)
    refs = [crit.Reference("randomize", 0, seed=0)]
    tasks = [engine._Task(u, refs, [references._overrides(odd, u, dict(other.named_parameters()), "other")]) for u in units]
    rows = []
    engine._evaluate("odd", pipe, data, tasks, batch_size=16, naive=naive, max_bytes=2**30,
                   on_done=lambda t, base: rows.append({"layer": t.unit.name, **metrics._stats_compute(t.stats[0])}),
                   advance=lambda n: None)
    return pd.DataFrame(rows)


def test_chunked_cache_gives_the_same_numbers(trained, data):
    whole = crit.criticality(trained, data, trials=2, batch_size=8, layers=["layer1.0.conv1", "fc"])
    chunked = crit.criticality(trained, data, trials=2, batch_size=8, layers=["layer1.0.conv1", "fc"], cache_mb=0)
    pd.testing.assert_frame_equal(whole, chunked)


# ------------------------------------------------------------------------------------ Zhang et al. resets
def test_checkpoint_resets_of_blocks_and_layers_match_a_hand_computation(mlp_run):
    data = load_data("digits?size=8", "test", images=120, seed=0)
    final = _state(mlp_run / "final.pt")
    model = load_model("file:" + str(mlp_run / "final.pt"), trust_pickle=True)
    table = crit.criticality(model, data, mode=["reinit", "checkpoint"], run=mlp_run, checkpoint=[1, 2],
                             units="blocks")
    assert set(table["layer"]) == {"layer1.0", "fc"}
    assert set(zip(table["mode"], table["epoch"])) == {("reinit", 0), ("checkpoint", 1), ("checkpoint", 2)}
    x, y = data.float(), data.labels
    reference = _mlp_logits(x, final)
    for _, row in table.iterrows():
        epoch_state = _state(mlp_run / "checkpoints" / f"epoch_{int(row['epoch']):04d}.pt")
        prefix = "layer1.0." if row["layer"] == "layer1.0" else "fc."
        mixed = {k: (epoch_state[k] if k.startswith(prefix) else v) for k, v in final.items()}
        want = _numbers(reference, _mlp_logits(x, mixed), y)
        for k, v in want.items():
            assert row[k] == pytest.approx(v, abs=1e-4), (row["layer"], row["epoch"], k)
    assert table.loc[table["layer"] == "layer1.0", "criticality"].max() > 1  # the reset matters
    one = crit.criticality(model, data, mode="reinit", run=mlp_run, layers=["layer1.0.conv2"])
    mixed = dict(final)
    epoch0 = _state(mlp_run / "checkpoints" / "epoch_0000.pt")
    mixed.update({k: epoch0[k] for k in ("layer1.0.conv2.weight", "layer1.0.conv2.bias")})
    assert one["criticality"].iloc[0] == pytest.approx(_numbers(reference, _mlp_logits(x, mixed), y)["criticality"], abs=1e-4)


def _expected_mlp_loss(x, y, final, init, names, z, a, s) -> float:
    """E_u loss(theta_alpha + sigma z) over the draws z, with the hand-written float64 forward pass."""
    losses = []
    for zd in z:
        state = {**final, **{n: ((1 - a) * init[n] + a * final[n] + s * zd[n]).float() for n in names}}
        losses.append(float(nn.functional.cross_entropy(_mlp_logits(x, state), y)))
    return float(np.mean(losses))


def test_module_criticality_matches_an_independent_grid(mlp_run):
    """Chatterji et al.'s mu at the paper's epsilon = 1.01 x loss: the bisection's answer against a fine log grid
    of sigma evaluated with a hand-written forward pass (no layerlab code on the reference side but the
    documented noise stream)."""
    data = load_data("digits?size=8", "test", images=60, seed=0)
    model = load_model("file:" + str(mlp_run / "final.pt"), trust_pickle=True)
    table = crit.module_criticality(model, data, run=mlp_run, seed=5).set_index("layer")
    final = _state(mlp_run / "final.pt")
    init = _state(mlp_run / "checkpoints" / "epoch_0000.pt")
    x, y = data.float(), data.labels
    eps = 1.01 * float(nn.functional.cross_entropy(_mlp_logits(x, final), y))
    sigmas = np.logspace(-6, 0, 240)  # ratio 1.06 between neighbours
    ratio2 = (sigmas[1] / sigmas[0]) ** 2
    for pos, layer in enumerate(["layer1.0.conv1", "layer1.0.conv2", "fc"]):
        names = [f"{layer}.weight", f"{layer}.bias"]
        g = generator("criticality/noise", 5, pos)
        z = [{n: torch.randn(final[n].shape, generator=g) for n in names} for _ in range(10)]
        dist = sum(float(((final[n] - init[n]).double() ** 2).sum()) for n in names)
        row = table.loc[layer]
        assert row["distance"] == pytest.approx(dist, rel=1e-6)
        assert row["epsilon"] == pytest.approx(eps, rel=1e-6)
        # the reported (alpha, sigma) is feasible, and rtol more noise is not (the bisection's bracket)
        assert _expected_mlp_loss(x, y, final, init, names, z, row["alpha"], row["sigma"]) <= eps * (1 + 1e-6)
        if row["sigma"] < 1:
            assert _expected_mlp_loss(x, y, final, init, names, z, row["alpha"], row["sigma"] * (1 + crit.SIGMA_RTOL)) > eps
        best = math.inf
        for a in np.linspace(0, 1, 11):
            def ok(i: int) -> bool:
                return _expected_mlp_loss(x, y, final, init, names, z, a, sigmas[i]) <= eps

            if not ok(0):
                continue
            lo, hi = 0, len(sigmas) - 1  # the largest feasible grid sigma (feasibility falls as sigma grows)
            if ok(hi):
                lo = hi
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if ok(mid) else (lo, mid)
            best = min(best, a * a * dist / sigmas[lo] ** 2)
        assert 0 < best < math.inf, layer  # every layer moved; at 1.01 x loss the old linear grid said inf
        # grid and bisection bracket the same boundary: the grid may be off by one step, the bisection by rtol
        upper = best * (1 + crit.SIGMA_RTOL) ** 2 * 1.001
        assert best / ratio2 * 0.999 <= row["criticality"] <= upper, (layer, row["criticality"], best)
    net = crit.network_criticality(table.reset_index())
    assert net["network_criticality"].iloc[0] == pytest.approx(table["criticality"].sum())


def _edited_run(mlp_run: Path, tmp_path: Path, edit) -> Path:
    """A copy of the MLP run whose final model is ``edit(final_state, init_state)``."""
    import shutil

    run = tmp_path / "edited"
    shutil.copytree(mlp_run, run)
    model = load_model("file:" + str(run / "final.pt"), trust_pickle=True)
    state = edit(_state(run / "final.pt"), _state(run / "checkpoints" / "epoch_0000.pt"))
    model.load_state_dict(state)
    save_checkpoint(model, run / "final.pt", epoch=3)
    return run


def test_module_criticality_of_unmoved_and_barely_moved_modules(mlp_run, tmp_path):
    """A module with theta_F = theta_0 has mu = 0 (the old linear sigma grid reported inf); one barely moved has
    a small finite mu; both at the paper's epsilon."""
    def edit(final, init):
        out = dict(final)
        out["layer1.0.conv2.weight"] = init["layer1.0.conv2.weight"].clone()  # unmoved
        out["layer1.0.conv2.bias"] = init["layer1.0.conv2.bias"].clone()
        g = torch.Generator().manual_seed(7)
        out["fc.weight"] = init["fc.weight"] + 1e-4 * torch.randn(init["fc.weight"].shape, generator=g)  # barely
        out["fc.bias"] = init["fc.bias"].clone()
        return out

    run = _edited_run(mlp_run, tmp_path, edit)
    data = load_data("digits?size=8", "train", images=80, seed=0)
    model = load_model("file:" + str(run / "final.pt"), trust_pickle=True)
    table = crit.module_criticality(model, data, run=run, layers=["layer1.0.conv2", "fc"]).set_index("layer")
    assert table.loc["layer1.0.conv2", "criticality"] == 0.0
    assert table.loc["layer1.0.conv2", "distance"] == 0.0
    barely = table.loc["fc"]
    assert 0 <= barely["criticality"] < 1e-3  # finite: rewinding it to theta_0 (alpha = 0) costs almost nothing
    assert barely["distance"] == pytest.approx(float((1e-4 * torch.randn(10, 16, generator=torch.Generator().manual_seed(7))).double().pow(2).sum()), rel=1e-4)
    for col in ("alpha", "sigma", "draws", "sigma_min", "evaluated"):
        assert col in table.columns


def test_module_criticality_measures_on_training_data_by_default(mlp_run):
    model = load_model("file:" + str(mlp_run / "final.pt"), trust_pickle=True)
    table = crit.module_criticality(model, "digits?size=8", run=mlp_run, images=40, layers=["fc"])
    assert table.attrs["split"] == "train"


# ------------------------------------------------------------------ re-randomisation vs a run's own init
@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    """A run of the training lab with every setting at its default (seed 0 included): the case that used to make
    trial 0 re-install the run's own initial weights."""
    from layerlab.train import recipe, train

    out = tmp_path_factory.mktemp("default") / "run"
    return train(SPEC, DATA, recipe("baseline", epochs=1, batch_size=64), out, train_n=256, progress=False)


def test_no_randomize_trial_equals_the_reset_to_init(default_run):
    model = load_model("file:" + str(default_run / "final.pt"))
    layers_ = ["conv1", "layer1.0.conv1", "layer2.0.downsample.0", "layer4.1.conv2", "fc"]
    table = crit.criticality(model, DATA, images=64, trials=3, mode=["randomize", "reinit"], run=default_run,
                             layers=layers_)
    rand = table[table["mode"] == "randomize"]
    # exact 63-bit seeds, also in a table whose reinit rows have none (a float64 column would round them)
    assert [int(d) for d in rand["draw_seed"]] == [derive_seed("criticality/fresh", 0, int(t)) for t in rand["trial"]]
    assert table.loc[table["mode"] == "reinit", "draw_seed"].isna().all()
    for layer, rows in table.groupby("layer"):
        reinit = rows.loc[rows["mode"] == "reinit", "criticality"].iloc[0]
        trials = rows.loc[rows["mode"] == "randomize", "criticality"]
        assert len(trials) == 3
        assert (trials != reinit).all(), (layer, list(trials), reinit)  # the old trial 0 equalled it to every digit
        if layer in ("conv1", "layer2.0.downsample.0", "fc"):  # critical layers; the block convs barely matter yet
            assert (abs(trials - reinit) > 1e-3).all(), (layer, list(trials), reinit)
    # an independent look at the weights: no trial's fresh instance shares a random tensor with epoch 0
    init = _state(default_run / "checkpoints" / "epoch_0000.pt")
    for t in range(3):
        fresh = fresh_model(model, seed=derive_seed("criticality/fresh", 0, t), device="cpu").state_dict()
        for name in (f"{l}.weight" for l in layers_):
            assert not torch.equal(fresh[name], init[name]), (t, name)


def test_a_fresh_instance_equal_to_the_runs_init_is_refused(tmp_path):
    """Where the run is known, a trial whose fresh weights are the run's epoch-0 weights is an error that says
    why; another seed runs."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"arch": SPEC, "data": DATA}))
    start = fresh_model(SPEC, seed=derive_seed("criticality/fresh", 0, 0), device="cpu")  # initialised on trial 0's stream
    start.layerlab_arch = SPEC
    save_checkpoint(start, run / "checkpoints" / "epoch_0000.pt", epoch=0)
    with torch.no_grad():
        start.fc.bias.add_(0.5)
    save_checkpoint(start, run / "final.pt", epoch=1)
    model = load_model("file:" + str(run / "final.pt"))
    with pytest.raises(LayerlabError, match=r"reset to init .*Pass another seed"):
        crit.criticality(model, DATA, images=16, trials=1, layers=["conv1"])
    with pytest.raises(LayerlabError, match="initial weights"):  # also with the run named explicitly
        crit.criticality(load_model("file:" + str(run / "checkpoints" / "epoch_0000.pt")), DATA, images=16, trials=1,
                         layers=["conv1"], run=run)
    ok = crit.criticality(model, DATA, images=16, trials=1, layers=["conv1"], seed=1)
    assert ok["criticality"].iloc[0] > 0


# -------------------------------------------------------------------------------------------- the store
def test_finished_jobs_are_never_recomputed(trained, data, tmp_path, monkeypatch):
    store = Store(tmp_path)
    first = crit.criticality({"a": trained}, data, trials=2, layers=["conv1", "fc"], store=store)
    assert len(store.paths(crit.ANALYSIS)) == 4  # one shard per (model, layer, trial)
    computed: list[tuple[str, int]] = []
    original = driver._evaluate

    def spy(name, pipe, data_, tasks, **kw):
        computed.extend((t.unit.name, r.trial) for t in tasks for r in t.refs)
        return original(name, pipe, data_, tasks, **kw)

    monkeypatch.setattr(driver, "_evaluate", spy)
    again = crit.criticality({"a": trained}, data, trials=2, layers=["conv1", "fc"], store=store)
    assert computed == []
    pd.testing.assert_frame_equal(first, again, check_dtype=False)
    victim = next(p for p in store.paths(crit.ANALYSIS)
                  if pd.read_parquet(p)[["layer", "trial"]].values.tolist() == [["fc", 1]])
    victim.unlink()
    other = copy.deepcopy(trained)
    with torch.no_grad():
        other.fc.bias.add_(1.0)
    crit.criticality({"a": trained, "b": other}, data, trials=2, layers=["conv1", "fc"], store=store)
    assert sorted(computed) == sorted([("fc", 1), ("conv1", 0), ("conv1", 1), ("fc", 0), ("fc", 1)])


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_input_fails_clearly(trained, data, mlp_run):
    with pytest.raises(LayerlabError, match=r"layer 'layer9.conv1' does not exist"):
        crit.criticality(trained, data, layers=["layer9.conv1"])
    with pytest.raises(LayerlabError, match="block 'layer9.0' does not exist"):
        crit.criticality(trained, data, units="blocks", layers=["layer9.0"])
    with pytest.raises(LayerlabError, match="--run"):
        crit.criticality(trained, data, mode="reinit")
    with pytest.raises(LayerlabError, match="trials must be a positive integer"):
        crit.criticality(trained, data, trials=0)
    with pytest.raises(LayerlabError, match="no checkpoint for epoch 7"):
        crit.criticality(load_model("file:" + str(mlp_run / "final.pt"), trust_pickle=True), "digits?size=8", mode="checkpoint",
                         run=mlp_run, checkpoint=7)
    with pytest.raises(LayerlabError, match="same architecture"):
        crit.criticality(trained, data, mode="reinit", run=mlp_run, layers=["fc"])
    broken = copy.deepcopy(trained)
    with torch.no_grad():
        broken.fc.bias[0] = float("nan")
    with pytest.raises(NonFiniteError, match="not finite"):
        crit.criticality(broken, data, trials=1, layers=["conv1"])


# --------------------------------------------------------------------------------------------- CLI, plots
def _cli() -> typer.Typer:
    from layerlab.cli.criticality import register

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """layerlab (test harness)."""

    register(app)
    return app


def test_cli_writes_tables_figures_and_indices(tmp_path):
    out = tmp_path / "out"
    args = ["criticality", SPEC, "--data", DATA, "--images", "16", "--trials", "2", "--out", str(out),
            "--layers", "conv1,fc", "--no-progress"]
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    table = pd.read_parquet(out / "criticality.parquet")
    assert len(table) == 4 and set(table["trial"]) == {0, 1}
    summary = pd.read_csv(out / "criticality_summary.csv")
    want = table.groupby("layer")["criticality"].std(ddof=1)
    assert summary.set_index("layer")["std"].to_dict() == pytest.approx(want.to_dict())
    assert summary["sem"].tolist() == pytest.approx((summary["std"] / math.sqrt(2)).tolist())
    images = pd.read_csv(out / "criticality_images.csv")
    assert images["index"].tolist() == load_data(DATA, "test", images=16, seed=0).indices.tolist()
    for name in ("criticality_heatmap", "criticality_std"):
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.svg").stat().st_size > 0
    from layerlab.plots.criticality import heatmap, std_heatmap  # the figures of the summary written beside them

    rows = summary.sort_values("index")
    for fig, value in ((heatmap(summary), "criticality"), (std_heatmap(summary), "std")):
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_yticklabels()] == rows["label"].tolist()
        (tick,) = [t.get_text() for t in ax.get_xticklabels()]  # one model, its long spec shortened head...tail
        assert tick == SPEC[:11] + "..." + SPEC[-10:]
        np.testing.assert_allclose(np.asarray(ax.images[0].get_array())[:, 0], rows[value])
    bad = CliRunner().invoke(_cli(), [*args[:-3], "--layers", "nope", "--no-progress"])
    assert isinstance(bad.exception, LayerlabError) and "nope" in str(bad.exception)


def test_cli_checkpoint_and_module_modes(mlp_run, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERLAB_TRUST_PICKLE", "1")  # the MLP's architecture is a pickled module: the CLI's opt-in
    out = tmp_path / "zhang"
    result = CliRunner().invoke(_cli(), ["criticality", "--run", str(mlp_run), "--data", "digits?size=8", "--images",
                                         "30", "--mode", "checkpoint", "--units", "blocks", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    table = pd.read_csv(out / "criticality.csv")
    assert sorted(set(table["epoch"])) == [0, 1, 2, 3]
    assert table.loc[table["epoch"] == 3, "criticality"].abs().max() < 1e-9  # the last checkpoint is the model
    assert (out / "criticality_checkpoints.png").exists()
    from layerlab.plots.criticality import checkpoint_heatmap  # the figure of the summary written beside it

    summary = pd.read_csv(out / "criticality_summary.csv").sort_values(["index", "epoch"])
    ax = checkpoint_heatmap(summary).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"epoch {e}" for e in range(4)]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(dict.fromkeys(summary["label"]))
    want = 100 * (1 - summary["accuracy"].to_numpy().reshape(-1, 4))  # units x epochs: the test error [%]
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), want)
    result = CliRunner().invoke(_cli(), ["criticality", "--run", str(mlp_run), "--data", "digits?size=8", "--images",
                                         "30", "--module", "--layers", "fc", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert pd.read_csv(out / "module_criticality_summary.csv")["units"].tolist() == [1]


def _synthetic_summary() -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    rows = []
    for m in ("baseline", "adv1", "adv3", "augmix"):
        for k, layer in enumerate(["conv1", "layer1.0.conv1", "layer1.0.conv2", "fc"]):
            rows.append({"model": m, "layer": layer, "label": layer, "index": k, "mode": "randomize", "epoch": pd.NA,
                         "criticality": float(rng.uniform(0, 100)), "std": float(rng.uniform(0, 5)), "accuracy": 0.5})
    summary = pd.DataFrame(rows)
    attrs = pd.DataFrame({"model": ["baseline", "adv1", "adv3", "augmix"], "category": ["base", "adv", "adv", "aug"],
                          "budget": [0.0, 1.0, 3.0, np.nan], "accuracy": [0.9, 0.8, 0.7, 0.92]})
    return summary, attrs


def test_figures_show_the_tables(tmp_path):
    from scipy.stats import spearmanr

    from layerlab.plots import criticality as plots

    summary, attrs = _synthetic_summary()
    fig = plots.diff_to_baseline(summary, "baseline")
    shown = np.asarray(fig.axes[0].images[0].get_array())
    pivot = summary.pivot(index="layer", columns="model", values="criticality").loc[
        ["conv1", "layer1.0.conv1", "layer1.0.conv2", "fc"]]
    want = pivot[["adv1", "adv3", "augmix"]].sub(pivot["baseline"], axis=0).to_numpy()
    assert np.allclose(shown, want)
    avg = summary.groupby("model", sort=False)["criticality"].mean()
    rho = spearmanr(avg.loc[attrs["model"]], attrs["accuracy"]).statistic
    assert f"rho = {rho:+.2f}" in plots.vs_accuracy(summary, attrs).axes[0].get_title()
    line_x = sorted(plots.vs_attribute(summary, attrs).axes[0].lines[0].get_xdata().tolist())
    assert line_x in ([0.0], [1.0, 3.0])
    paths = plots.save_all(summary, tmp_path, attrs=attrs)
    names = {p.name for p in paths}
    assert {"criticality_heatmap.png", "criticality_heatmap.svg", "criticality_diff.png", "criticality_std.svg",
            "criticality_vs_budget.png", "criticality_vs_accuracy.png"} <= names
    assert all(p.stat().st_size > 0 for p in paths)


def test_demo_step_over_a_small_zoo(tmp_path):
    from layerlab.demos.criticality import demo_step

    zoo = tmp_path / "zoo"
    for k, name in enumerate(["baseline", "other"]):
        torch.manual_seed(k)
        m = load_model("timm:resnet10t?channels=4,8,8,8&stem_width=4&num_classes=10")
        save_checkpoint(m, zoo / name / "final.pt")
    attrs = pd.DataFrame({"model": ["baseline", "other"], "recipe": ["baseline", "x"], "category": ["base", "x"],
                          "budget": [0.0, 1.0], "accuracy": [0.5, 0.6]})
    paths = demo_step(zoo, tmp_path / "out", attrs, images=24)
    names = {p.name for p in paths}
    assert {"criticality_summary.csv", "criticality_heatmap.png", "criticality_diff.png"} <= names
    summary = pd.read_csv(tmp_path / "out" / "criticality_summary.csv")
    assert set(summary["model"]) == {"baseline", "other"} and (summary["trials"] == 3).all()


# ------------------------------------------------------------------ normalisation layers (opt-in extension)
def test_norm_layers_are_units_only_on_request(trained, data):
    assert not any(isinstance(trained.get_submodule(u.name), nn.BatchNorm2d) for u in crit.units_of(trained))
    units = {u.name: u for u in crit.units_of(trained, norm=True)}
    bn = units["layer3.1.bn1"]
    assert (bn.label, bn.kind) == ("[3.1] bn1", "BatchNorm2d")
    assert bn.params == ("layer3.1.bn1.weight", "layer3.1.bn1.bias")  # the running statistics are never swapped
    assert [i.label for i in list_layers(trained, norm=True)][:3] == ["conv1", "bn1", "[1.0] conv1"]
    for named in ("bn1", "[3.1] bn1"):
        with pytest.raises(LayerlabError, match=r"is a normalisation layer \(BatchNorm2d\).*pass norm=True"):
            crit.criticality(trained, data, trials=1, layers=[named])
    table = crit.criticality(trained, data, trials=1, layers=["[3.1] bn1"], norm=True)
    assert table["layer"].tolist() == ["layer3.1.bn1"]


def test_reinit_resets_norm_layers_to_the_runs_init(default_run):
    """Zhang et al.'s reset of a norm layer: its weight and bias from the run's epoch-0 checkpoint, its running
    statistics the trained model's; checked against a deep copy changed in place."""
    model = load_model("file:" + str(default_run / "final.pt"))
    images = load_data(DATA, "test", images=48, seed=0)
    names = ["bn1", "layer2.0.bn1", "layer4.1.bn2"]
    table = crit.criticality(model, images, mode="reinit", run=default_run, norm=True, layers=names)
    init = _state(default_run / "checkpoints" / "epoch_0000.pt")
    x = images.float()
    with torch.no_grad():
        p = torch.softmax(model.eval()(x).double(), -1)
        for name in names:
            reset = copy.deepcopy(model)
            for param in ("weight", "bias"):
                getattr(reset.get_submodule(name), param).copy_(init[f"{name}.{param}"])
            assert not torch.equal(reset.get_submodule(name).weight, model.get_submodule(name).weight)  # it trained
            q = torch.softmax(reset(x).double(), -1)
            want = 100 * (1 - float(torch.nn.functional.cosine_similarity(p, q, dim=-1).mean()))
            got = float(table.loc[table["layer"] == name, "criticality"].iloc[0])
            assert got == pytest.approx(want, abs=1e-4), name


def test_a_block_with_its_norms_is_another_job(trained, data, tmp_path, monkeypatch):
    store = Store(tmp_path)
    plain = crit.criticality(trained, data, trials=1, units="blocks", layers=["layer1.0"], store=store)
    with_norms = crit.criticality(trained, data, trials=1, units="blocks", layers=["layer1.0"], norm=True, store=store)
    assert len(store.paths(crit.ANALYSIS)) == 2
    assert abs(plain["criticality"].iloc[0] - with_norms["criticality"].iloc[0]) > 1e-3
    computed: list[str] = []
    original = driver._evaluate

    def spy(name, pipe, data_, tasks, **kw):
        computed.extend(t.unit.name for t in tasks)
        return original(name, pipe, data_, tasks, **kw)

    monkeypatch.setattr(driver, "_evaluate", spy)
    crit.criticality(trained, data, trials=1, units="blocks", layers=["layer1.0"], norm=True, store=store)
    crit.criticality(trained, data, trials=1, layers=["conv1"], store=store)
    crit.criticality(trained, data, trials=1, layers=["conv1", "bn1"], norm=True, store=store)
    assert computed == ["conv1", "bn1"]  # a layer's job is the same with and without the flag


def test_cli_norm_flag(tmp_path):
    args = ["criticality", SPEC, "--data", DATA, "--images", "16", "--trials", "1", "--out", str(tmp_path),
            "--layers", "bn1,[3.1] bn2,fc", "--no-figures", "--no-progress"]
    refused = CliRunner().invoke(_cli(), args)
    assert isinstance(refused.exception, LayerlabError) and "--norm" in str(refused.exception)
    result = CliRunner().invoke(_cli(), [*args, "--norm"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    table = pd.read_csv(tmp_path / "criticality.csv")
    assert table["label"].tolist() == ["bn1", "[3.1] bn2", "fc"]
    assert table["kind"].tolist() == ["BatchNorm2d", "BatchNorm2d", "Linear"]
