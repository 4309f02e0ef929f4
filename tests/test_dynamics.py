"""Training dynamics (layerlab.dynamics): CKA / probe / DRS tables on a tiny fake run, checked independently."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import layerlab.dynamics as dyn
import layerlab.dynamics.series as series
from layerlab import load_data, load_model, save_checkpoint
from layerlab.errors import LayerlabError
from layerlab.probes import ProbeConvergenceWarning
from layerlab.regions import decision_region_similarity
from layerlab.runs import checkpoint_path
from layerlab.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "timm:resnet18?channels=4,8,8,8&stem_width=4&in_chans=1"
DATA = "digits?size=16&channels=1"
SMALL = dict(images=32, batch_size=8, triplets=3, resolution=6, probe_train=120)
LAYER = "layer2.1"


def _new_run(tmp_path_factory: pytest.TempPathFactory, name: str, arch: str) -> tuple[Path, torch.nn.Module]:
    """An empty run folder (run.json, checkpoints/) and its model, initialised under manual_seed(0)."""
    out = tmp_path_factory.mktemp("runs") / name
    (out / "checkpoints").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"arch": arch, "data": DATA, "seed": 0}))
    torch.manual_seed(0)
    return out, load_model(arch, num_classes=10)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as `layerlab train` writes it: run.json, three checkpoints (epoch 0 = init), metrics.csv."""
    out, model = _new_run(tmp_path_factory, "tiny", ARCH)
    data = load_data(DATA, "train", images=120)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(3):
        save_checkpoint(model, checkpoint_path(out, epoch), epoch=epoch)
        model.train()
        for x, y in data.batches(40):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        model.eval()
    pd.DataFrame({"epoch": [1, 2], "train_acc": [0.5, 1.0], "train_acc_clean": [0.5, 1.0],
                  "test_acc": [0.3, 0.4]}).to_csv(out / "metrics.csv", index=False)
    return out


@pytest.fixture(scope="module")
def tables(run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, pd.DataFrame], Path]:
    store = tmp_path_factory.mktemp("store")
    return dyn.dynamics(run, store=store, layers=["conv1", LAYER, "fc"], **SMALL), store


def _matrix(frame: pd.DataFrame, layer: str, value: str) -> np.ndarray:
    rows = frame[frame["layer"] == layer]
    return rows.pivot_table(index="epoch_a", columns="epoch_b", values=value).to_numpy()


def test_cka_and_drs_matrices_are_symmetric_with_unit_diagonal(tables) -> None:
    t, _ = tables
    assert set(t["cka"]["layer"]) == {"conv1", LAYER, "fc", "output"}
    assert set(t["drs"]["layer"]) == {"conv1", LAYER, "fc", "output"}
    for layer in ("conv1", LAYER, "fc", "output"):
        for table, value in (("cka", "cka"), ("drs", "drs")):
            m = _matrix(t[table], layer, value)
            assert m.shape == (3, 3)
            np.testing.assert_allclose(m, m.T, atol=1e-12)
            np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-10)
            assert np.all(m[~np.eye(3, dtype=bool)] < 1.0 - 1e-9), (table, layer)  # training changed every layer
    assert set(t["cka"]["estimator"]) == {"unbiased"} and set(t["cka"]["n"]) == {32}
    assert set(t["cka"]["n_batches"]) == {4}
    assert set(t["cka"]["gram_dtype"]) == {"float32"}  # float32 checkpoints: float32 Grams, recorded
    assert set(t["drs"]["kind"]) == {"probe", "network"}


def _hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012), the textbook form of METHODS.md (float64, zero-diagonal Grams)."""
    n = k.shape[0]
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    return float((np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                  - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3)))


def _features(path: Path, layer: str, x: torch.Tensor) -> np.ndarray:
    model = load_model(f"file:{path}")
    got = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, a, o: got.append(o))
    with torch.no_grad():
        model(x)
    handle.remove()
    return got[0].reshape(len(x), -1).double().numpy()


def test_cka_matches_an_independent_minibatch_computation(run: Path, tables) -> None:
    t, _ = tables
    x = load_data(DATA, "test", images=32, seed=0).float()
    fa, fb = _features(checkpoint_path(run, 0), LAYER, x), _features(checkpoint_path(run, 2), LAYER, x)
    ab = aa = bb = 0.0
    for s in range(0, 32, 8):
        ka, kb = fa[s : s + 8] @ fa[s : s + 8].T, fb[s : s + 8] @ fb[s : s + 8].T  # raw (uncentred) Grams
        ab, aa, bb = ab + _hsic_unbiased(ka, kb), aa + _hsic_unbiased(ka, ka), bb + _hsic_unbiased(kb, kb)
    got = _matrix(t["cka"], LAYER, "cka")[0, 2]
    assert got == pytest.approx(ab / np.sqrt(aa * bb), abs=1e-8)


def _images_by_index(indices: np.ndarray) -> torch.Tensor:
    """Training-split images looked up by data-set index (independent of the triplet machinery)."""
    full = load_data(DATA, "train")
    where = {int(i): r for r, i in enumerate(full.indices.tolist())}
    return full.float()[torch.tensor([where[int(i)] for i in indices])]


def test_network_drs_matches_decision_region_similarity_of_the_checkpoints(run: Path, tables) -> None:
    t, _ = tables
    anchors = t["triplets"].sort_values(["triplet", "point"])
    assert len(anchors) == 3 * 3 and list(anchors["point"][:3]) == ["x1", "x2", "x3"]
    trip = _images_by_index(anchors["index"].to_numpy()).reshape(3, 3, 1, 16, 16)  # the planes the table names
    a, b = load_model(f"file:{checkpoint_path(run, 0)}"), load_model(f"file:{checkpoint_path(run, 1)}")
    expect = decision_region_similarity(a, b, trip, resolution=6)
    assert _matrix(t["drs"], "output", "drs")[0, 1] == pytest.approx(expect, abs=1e-12)


def test_probe_rows_and_accuracies(run: Path, tables) -> None:
    t, _ = tables
    p = t["probes"]
    assert len(p) == 3 * 3 and set(p["layer"]) == {"conv1", LAYER, "fc"}
    assert p[["train_acc", "test_acc"]].apply(lambda c: c.between(0, 1)).all().all()
    assert set(p["n_train"]) == {120} and set(p["n_test"]) == {364}
    # every probe ran to convergence under the defaults, and says so
    assert p["probe_converged"].all() and (p["probe_iterations"] < p["probe_max_iter"]).all()
    assert (p["probe_iterations"] >= 1).all() and set(p["probe_max_iter"]) == {1000}
    # the head's probe reads the logits: it is at least as good as chance and its dimension is the class count
    assert set(p.loc[p["layer"] == "fc", "dim"]) == {10}
    assert set(p.loc[p["layer"] == LAYER, "dim"]) == {8 * 2 * 2}  # 8 channels pooled to 2 x 2
    assert t["training"]["first_fit_epoch"].iloc[0] == 2


def test_second_call_computes_nothing(run: Path, tables, monkeypatch: pytest.MonkeyPatch) -> None:
    t, store = tables

    def boom(*args, **kwargs):
        raise AssertionError("recomputed a checkpoint although every shard exists")

    monkeypatch.setattr(series, "_checkpoint_pass", boom)
    again = dyn.dynamics(run, store=store, layers=["conv1", LAYER, "fc"], **SMALL)
    for name in ("cka", "probes", "drs", "triplets"):
        pd.testing.assert_frame_equal(again[name], t[name])
    assert len(Store(store).paths("dynamics-cka")) == 4 and len(Store(store).paths("dynamics-probes")) == 3
    assert len(Store(store).paths("dynamics-triplets")) == 1


def test_a_lost_shard_is_recomputed_alone(run: Path, tables, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    t, store = tables
    n = sum(len(Store(store).paths(f"dynamics-{table}")) for table in ("cka", "probes", "drs"))
    cka_shards = Store(store).paths("dynamics-cka")
    victim = next(p for p in cka_shards if set(pd.read_parquet(p)["layer"]) == {"conv1"})
    victim.unlink()
    seen: list[tuple] = []
    real = series._checkpoint_pass

    def spy(model, cfg, inputs, cka_views, probe_layers, drs_views, *rest):
        seen.append((tuple(cka_views), tuple(probe_layers), tuple(drs_views)))
        return real(model, cfg, inputs, cka_views, probe_layers, drs_views, *rest)

    monkeypatch.setattr(series, "_checkpoint_pass", spy)
    with caplog.at_level("INFO", logger="layerlab"):
        again = dyn.dynamics(run, store=store, layers=["conv1", LAYER, "fc"], **SMALL)
    assert seen == [(("conv1",), (), ())] * 3
    assert [r.getMessage() for r in caplog.records if r.name == "layerlab"] == [  # said before the work (issue 16)
        f"{n - 1} of {n} dynamics results (table x layer) of {run.name} already done (in {store}); computing 1"]
    pd.testing.assert_frame_equal(again["cka"], t["cka"])


def test_bad_input_teaches(run: Path, tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(LayerlabError, match="no run.json"):
        dyn.dynamics(tmp_path, **SMALL)
    with pytest.raises(LayerlabError, match="unknown layer 'layer9.0'"):
        dyn.dynamics(run, layers=["layer9.0"], **SMALL)
    with pytest.raises(LayerlabError, match=r"no checkpoint for epoch\(s\) \[7\]"):
        dyn.dynamics(run, epochs=[0, 7], **SMALL)
    with pytest.raises(LayerlabError, match="unknown option"):
        dyn.dynamics(run, triplet=3)
    with pytest.raises(LayerlabError, match="batches of >= 4"):
        dyn.dynamics(run, batch_size=2)


def test_select_epochs_is_log_spaced_and_keeps_the_ends() -> None:
    assert dyn.select_epochs(range(31), max_checkpoints=6) == [0, 1, 3, 7, 15, 30]
    assert dyn.select_epochs(range(5), max_checkpoints=4) == [0, 1, 2, 4]
    assert dyn.select_epochs([0, 2, 4], epochs=[4, 0]) == [0, 4]


def test_compare_a_model_with_itself(run: Path) -> None:
    spec = f"file:{checkpoint_path(run, 2)}"
    f = dyn.compare(spec, spec, DATA, layers_a=["conv1", LAYER], layers_b=["conv1", LAYER], images=24, batch_size=8)
    m = f.pivot_table(index="layer_a", columns="layer_b", values="cka").loc[["conv1", LAYER, "output"], ["conv1", LAYER, "output"]]
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-10)
    np.testing.assert_allclose(m.to_numpy(), m.to_numpy().T, atol=1e-12)
    assert set(f["estimator"]) == {"unbiased"} and set(f["n"]) == {24}


def test_figures_and_decision_regions(run: Path, tables, tmp_path: Path) -> None:
    from layerlab.plots.dynamics import decision_regions, save_dynamics, save_figure

    t, _ = tables
    paths = save_dynamics(t, tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"dynamics_{v}.{e}" for v in ("cka", "drs", "probes", "accuracy") for e in ("png", "svg"))
    assert all(p.stat().st_size > 1000 for p in paths)
    r = dyn.decision_regions(run, epochs=[0, 2], layers=[LAYER], resolution=5, probe_train=120)
    assert len(r["regions"]) == 2 * 2 * 25 and r["regions"]["confidence"].between(0.1, 1).all()
    assert sorted(r["regions"]["layer"].unique()) == sorted([LAYER, "output"])
    assert len(set(r["anchors"]["class"])) == 3
    fig = decision_regions(r["regions"], r["anchors"])
    axes = np.array(fig.axes).reshape(2, 2)  # views (the network first) x epochs
    assert [ax.get_title() for ax in axes[0]] == ["epoch 0", "epoch 2"]
    probe = r["regions"].loc[r["regions"]["layer"] == LAYER, "label"].iloc[0]
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["network", f"probe {probe}"]
    for (view, epoch), ax in (((LAYER, 2), axes[1, 1]), (("output", 0), axes[0, 0])):
        cells = r["regions"][(r["regions"]["layer"] == view) & (r["regions"]["epoch"] == epoch)]
        alpha = np.asarray(ax.images[0].get_array())[..., 3]
        np.testing.assert_allclose(alpha[cells["j"], cells["i"]], cells["confidence"])  # opacity = confidence
        dots = np.concatenate([c.get_offsets().data for c in ax.collections])  # one dot per anchor
        np.testing.assert_allclose(dots, r["anchors"][["c1", "c2"]].to_numpy(dtype=float))
    assert save_figure(fig, tmp_path, "regions")[0].stat().st_size > 1000


def test_cli_dynamics_and_compare(run: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from layerlab.cli import app

    res = CliRunner().invoke(app, ["dynamics", str(run), "--out", str(tmp_path), "--layers", f"conv1,{LAYER}",
                                   "--images", "16", "--batch-size", "8", "--triplets", "2", "--resolution", "4",
                                   "--probe-train", "100"])
    assert res.exit_code == 0, res.output
    # the CLI's part is writing the files; what matrix_grid draws is checked in test_figure_content.py
    assert (tmp_path / "figures" / "dynamics" / "tiny" / "dynamics_cka.png").stat().st_size > 1000
    assert (tmp_path / "figures" / "dynamics" / "tiny" / "dynamics_cka.svg").stat().st_size > 1000
    spec = f"file:{checkpoint_path(run, 1)}"
    res = CliRunner().invoke(app, ["compare", spec, spec, "--out", str(tmp_path), "--data", DATA, "--layers-a", "conv1",
                                   "--layers-b", "conv1", "--images", "16", "--batch-size", "8"])
    assert res.exit_code == 0, res.output
    assert list((tmp_path / "figures" / "compare").glob("*.svg"))


# ------------------------------------------------------------------------------- planes through the run's own images
@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A run trained by the real training loop on a 60-image subset with 30% label noise; a spy records what the
    loop itself trained on (the subset's data-set indices, its clean labels and the labels it fed the loss)."""
    import layerlab.train.loop as loop
    from layerlab.train import recipe, train

    seen: dict[str, torch.Tensor] = {}
    real_load, real_noise = loop.load_data, loop.noisy_labels

    def spy_load(spec, split="test", n=None, seed=0, **kwargs):
        d = real_load(spec, split, n=n, seed=seed, **kwargs)
        if split == "train":
            seen["indices"], seen["clean"] = d.indices.clone(), d.labels.clone()
        return d

    def spy_noise(labels, fraction, num_classes, seed):
        seen["trained"] = real_noise(labels, fraction, num_classes, seed).clone()
        return seen["trained"]

    mp = pytest.MonkeyPatch()
    mp.setattr(loop, "load_data", spy_load)
    mp.setattr(loop, "noisy_labels", spy_noise)
    try:
        out = train(ARCH, DATA, recipe("label-noise", epochs=2, batch_size=30, label_noise=0.3),
                    tmp_path_factory.mktemp("noisy") / "noisy", seed=3, train_n=60, progress=False)
    finally:
        mp.undo()
    return out, seen


def test_training_images_rebuild_what_the_loop_trained_on(noisy_run) -> None:
    run, seen = noisy_run
    train = dyn.training_images(run)
    assert torch.equal(train.indices, seen["indices"]) and len(train) == 60
    assert torch.equal(train.labels, seen["trained"])  # the labels the network was trained with
    assert torch.equal(train.meta["clean_labels"], seen["clean"])
    assert torch.equal(train.meta["noisy"], seen["trained"] != seen["clean"]) and int(train.meta["noisy"].sum()) == 18


def test_planes_go_through_the_runs_own_training_images(noisy_run, tmp_path: Path) -> None:
    """Acceptance (issue 11): every anchor is an image the run trained on, with the label it trained with; noisy
    images are included (triplets are drawn by training label, so an anchor's class is the label the net fitted)."""
    run, seen = noisy_run
    trained = dict(zip(seen["indices"].tolist(), seen["trained"].tolist()))
    clean = dict(zip(seen["indices"].tolist(), seen["clean"].tolist()))
    t = dyn.dynamics(run, layers=["conv1"], tables=("drs",), triplets=24, resolution=4, probe_train=60)
    a = t["triplets"]
    assert len(a) == 24 * 3 and set(a["point"]) == {"x1", "x2", "x3"}
    assert set(a["index"]) <= set(trained)  # data-set indices of the 60 training images, nothing else
    assert a["label"].tolist() == [trained[i] for i in a["index"]]
    assert a["clean_label"].tolist() == [clean[i] for i in a["index"]]
    assert a["noisy"].tolist() == [trained[i] != clean[i] for i in a["index"]]
    assert a["noisy"].any()  # the noisy-label images the network memorised are among the anchors
    assert (a.groupby("triplet")["label"].nunique() == 3).all()  # three distinct training labels per plane
    # the plane of triplet 0 in decision_regions is the same plane, anchored at the same training images
    r = dyn.decision_regions(run, epochs=[2], layers=[], resolution=4, triplet=0, probe_train=60)
    first = a[a["triplet"] == 0]
    assert r["anchors"]["index"].tolist() == first["index"].tolist()
    assert r["anchors"]["class"].tolist() == first["label"].tolist()
    # and the plane passes through those images: x2 sits at (|x2 - x1|, 0) in plane coordinates
    x = _images_by_index(first["index"].to_numpy()).double()
    assert r["anchors"]["c1"].iloc[1] == pytest.approx(float((x[1] - x[0]).norm()), rel=1e-6)


def test_runs_seeded_the_old_way_cannot_be_rebuilt(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"arch": ARCH, "data": DATA, "seed": 0, "train_n": 60,
                                                   "recipe": {"label_noise": 0.2}}))
    with pytest.raises(LayerlabError, match="cannot be\\s+rebuilt"):
        dyn.training_images(tmp_path)


def test_capped_probes_are_recorded_and_warned_once(run: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = dyn.dynamics(run, layers=["conv1", LAYER], tables=("probes",), probe_iter=2, **SMALL)
    p = t["probes"]
    assert not p["probe_converged"].any() and set(p["probe_iterations"]) == {2} and set(p["probe_max_iter"]) == {2}
    mine = [w for w in caught if issubclass(w.category, ProbeConvergenceWarning)]
    assert len(mine) == 1 and "6 of 6 linear probes did not converge" in str(mine[0].message)
    assert "\n" not in str(mine[0].message)


def test_phase_contrast_against_a_direct_count() -> None:
    # sharp blocks: within 0.9, across 0.3 (closed form: contrast 0.6 at the true boundaries)
    m = np.full((7, 7), 0.3)
    for a, b in ((0, 3), (3, 7)):
        m[a:b, a:b] = 0.9
    assert dyn.phase_contrast(m) == (pytest.approx(0.6), (3,))
    m3 = np.full((9, 9), 0.1)
    for a, b in ((0, 2), (2, 5), (5, 9)):
        m3[a:b, a:b] = 0.8
    assert dyn.phase_contrast(m3, blocks=3) == (pytest.approx(0.7), (2, 5))
    assert dyn.phase_contrast(np.ones((5, 5)))[0] == pytest.approx(0.0)
    # a random symmetric matrix: the best split by explicit pair loops
    rng = np.random.default_rng(0)
    r = rng.random((8, 8))
    r = (r + r.T) / 2
    best = -np.inf
    for cut in range(2, 7):
        within, across = [], []
        for i in range(8):
            for j in range(8):
                if i != j:
                    (within if (i < cut) == (j < cut) else across).append(r[i, j])
        best = max(best, np.mean(within) - np.mean(across))
    assert dyn.phase_contrast(r)[0] == pytest.approx(best, abs=1e-12)


def test_fit_summary_reads_the_fit_off_the_curves() -> None:
    m = pd.DataFrame({"run": "r", "epoch": [1, 2, 3, 4, 5, 6], "lr": [0.1, 0.08, 0.05, 0.02, 0.01, 0.01],
                      "train_acc": [0.5, 0.9, 1.0, 0.96, 1.0, 1.0]})
    f = dyn.fit_summary(m, {"r": [0, 2, 4, 6]}).iloc[0]
    assert f["first_fit_epoch"] == 3 and f["epochs"] == 6 and f["checkpoints_after_fit"] == 2  # epochs 4 and 6
    assert f["lr_at_fit"] == pytest.approx(0.05) and f["lr_fraction_of_peak"] == pytest.approx(0.5)
    assert f["train_acc_after_fit_min"] == pytest.approx(0.96)


# ----------------------------------------------------------------------- any model: layer selectors and ViT tokens
VIT = "timm:vit_tiny_patch16_224?img_size=16&patch_size=4&depth=2&embed_dim=32&num_heads=2&in_chans=1"
BLOCKS = ["blocks.0", "blocks.1"]
#: the three token choices written out independently of layerlab.features.TOKENS
TOKEN_VIEWS = {"flatten": lambda t: t.reshape(len(t), -1), "cls": lambda t: t[:, 0], "mean": lambda t: t.mean(axis=1)}


def _vit(seed: int, **kwargs) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2,
                             in_chans=1, num_classes=10, **kwargs).eval()


def _hooked(model: torch.nn.Module, layers: list[str], batches: list[torch.Tensor]) -> dict[str, list[np.ndarray]]:
    """Each layer's raw output per batch (float64 numpy), from forward hooks of the test's own."""
    got: dict[str, list[np.ndarray]] = {l: [] for l in layers}
    modules = dict(model.named_modules())
    handles = [modules[l].register_forward_hook(lambda m, a, o, l=l: got[l].append(o.double().numpy())) for l in layers]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    return got


def _minibatch_cka(fa: list[np.ndarray], fb: list[np.ndarray]) -> float:
    """Minibatch unbiased CKA (sum of Song et al.'s HSIC_1 over batches) of per-batch features [b, d]."""
    ab = aa = bb = 0.0
    for a, b in zip(fa, fb, strict=True):
        ka, kb = a @ a.T, b @ b.T
        ab, aa, bb = ab + _hsic_unbiased(ka, kb), aa + _hsic_unbiased(ka, ka), bb + _hsic_unbiased(kb, kb)
    return ab / np.sqrt(aa * bb)


def _full_biased_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Kornblith et al.'s full-N biased linear CKA, with the centring matrix H."""
    n = len(a)
    h = np.eye(n) - np.ones((n, n)) / n
    ka, kb = h @ a @ a.T @ h, h @ b @ b.T @ h
    return float((ka * kb).sum() / np.sqrt((ka * ka).sum() * (kb * kb).sum()))


@pytest.mark.parametrize("tokens", ["flatten", "cls", "mean"])
def test_compare_bare_vits_on_a_dataloader_matches_hooked_tokens(tokens: str) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    import layerlab as ll

    a, b = _vit(0), _vit(1)
    data = load_data(DATA, "test", images=40, seed=0)
    x = data.float()
    loader = DataLoader(TensorDataset(x, data.labels), batch_size=16)  # 16, 16 and a short 8 (left out)
    f = ll.compare(a, b, loader, layers_a="blocks", layers_b=["blocks.1", "[1] attn.qkv"], tokens=tokens)
    assert list(dict.fromkeys(f["layer_a"])) == BLOCKS + ["output"]
    assert list(dict.fromkeys(f["layer_b"])) == ["blocks.1", "blocks.1.attn.qkv", "output"]
    assert list(dict.fromkeys(f["label_b"])) == ["blocks.1", "[1] attn.qkv", "output"]
    assert set(f["model_a"]) == {"VisionTransformer"} and set(f["tokens"]) == {tokens}
    assert set(f["n"]) == {32} and set(f["n_batches"]) == {2} and set(f["batch_size"]) == {16}
    view = TOKEN_VIEWS[tokens]
    batches = [x[:16], x[16:32]]
    ha, hb = _hooked(a, BLOCKS, batches), _hooked(b, ["blocks.1", "blocks.1.attn.qkv"], batches)
    got = f.set_index(["layer_a", "layer_b"])["cka"]
    for la in BLOCKS:
        for lb in ("blocks.1", "blocks.1.attn.qkv"):
            want = _minibatch_cka([view(t) for t in ha[la]], [view(t) for t in hb[lb]])
            assert got[(la, lb)] == pytest.approx(want, abs=1e-6), (la, lb)
    # the same choice on an image tensor in one batch of all 40: Kornblith's full-N biased CKA
    g = ll.compare(a, b, x, layers_a="blocks.1", layers_b="blocks.0", tokens=tokens, estimator="biased", batch_size=40)
    fa, fb = _hooked(a, ["blocks.1"], [x])["blocks.1"][0], _hooked(b, ["blocks.0"], [x])["blocks.0"][0]
    want = _full_biased_cka(view(fa), view(fb))
    assert g.set_index(["layer_a", "layer_b"])["cka"][("blocks.1", "blocks.0")] == pytest.approx(want, abs=1e-6)


def test_the_token_choices_give_different_numbers_and_cls_needs_a_class_token() -> None:
    a, b = _vit(0), _vit(1)
    x = load_data(DATA, "test", images=32, seed=0).float()
    values = {t: float(dyn.compare(a, b, x, layers_a="blocks.1", layers_b="blocks.1", tokens=t, batch_size=16)["cka"][0])
              for t in TOKEN_VIEWS}
    assert len({round(v, 6) for v in values.values()}) == 3, values
    pooled = _vit(2, class_token=False, global_pool="avg")
    with pytest.raises(LayerlabError, match=r"tokens='cls': layer 'blocks.0' outputs tokens \[16, 16, 32\] but "
                                            r"VisionTransformer has no class token"):
        dyn.compare(pooled, b, x, layers_a="blocks", tokens="cls", batch_size=16)
    assert len(dyn.compare(pooled, b, x, layers_a="blocks", tokens="mean", batch_size=16)) == 3 * 4
    with pytest.raises(LayerlabError, match="tokens: expected one of"):
        dyn.compare(a, b, x, tokens="first")
    with pytest.raises(LayerlabError, match=r"model_b: expected a model spec .* got int"):
        dyn.compare(a, 3, x)


@pytest.mark.parametrize("spec, want", [
    (ARCH, ["conv1"] + [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)]),
    (ARCH.replace("resnet18?", "resnet18d?"), ["conv1.0", "conv1.3", "conv1.6"] + [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)]),
    (VIT, ["patch_embed.proj"] + BLOCKS),
])
def test_default_layers_are_the_stem_and_every_block(spec: str, want: list[str]) -> None:
    assert dyn.default_layers(load_model(spec, num_classes=10)) == want  # what the residual-block regexes gave


def test_default_layers_of_a_model_without_blocks_are_its_layers_but_the_head() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 12 * 12, 10))
    assert dyn.default_layers(net) == ["0", "2"]
    f = dyn.compare(net, net, load_data(DATA, "test", images=16, seed=0).float(), batch_size=8)
    assert list(dict.fromkeys(f["layer_a"])) == ["0", "2", "output"]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of a tiny ViT: run.json and two checkpoints (the second with moved weights)."""
    out, model = _new_run(tmp_path_factory, "vit", VIT)
    for epoch in range(2):
        save_checkpoint(model, checkpoint_path(out, epoch), epoch=epoch)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return out


def test_dynamics_tokens_match_hooked_tokens_and_only_a_non_default_choice_enters_the_keys(vit_run: Path,
                                                                                         tmp_path: Path) -> None:
    from layerlab.probes import fit_probe

    store = Store(tmp_path)
    opts = dict(layers="blocks", tables=("cka", "probes"), images=32, batch_size=8, probe_train=100)
    tables = {t: dyn.dynamics(vit_run, store=store, tokens=t, **opts) for t in ("flatten", "cls")}
    x = load_data(DATA, "test", images=32, seed=0).float()
    batches = list(x.split(8))
    models = [load_model(f"file:{checkpoint_path(vit_run, e)}") for e in (0, 1)]
    h0, h1 = (_hooked(m, ["blocks.1"], batches)["blocks.1"] for m in models)
    for tokens, t in tables.items():
        view = TOKEN_VIEWS[tokens]
        want = _minibatch_cka([view(f) for f in h0], [view(f) for f in h1])
        assert _matrix(t["cka"], "blocks.1", "cka")[0, 1] == pytest.approx(want, abs=1e-6), tokens
        assert set(t["cka"]["layer"]) == set(BLOCKS + ["output"])
    # probes: the class token with tokens="cls", else the token mean (32 features either way)
    train, test = load_data(DATA, "train", images=100, seed=0), load_data(DATA, "test")
    for tokens, reduce in (("cls", TOKEN_VIEWS["cls"]), ("flatten", TOKEN_VIEWS["mean"])):
        feats = [torch.from_numpy(reduce(_hooked(models[1], ["blocks.1"], [d.float()])["blocks.1"][0])).float()
                 for d in (train, test)]
        p = fit_probe(feats[0], train.labels, num_classes=10, method="softmax", l2=1e-3, warn=False)
        w, b = p.fold(torch.float32)
        acc = float(((feats[1] @ w + b).argmax(1) == test.labels).double().mean())
        row = tables[tokens]["probes"].set_index(["layer", "epoch"]).loc[("blocks.1", 1)]
        assert row["dim"] == 32 and row["test_acc"] == pytest.approx(acc, abs=1e-9), tokens
    configs = [store.shard_meta(p)["config"] for a in ("dynamics-cka", "dynamics-probes") for p in store.paths(a)]
    assert sorted(str(c.get("tokens")) for c in configs) == ["None"] * 5 + ["cls"] * 5  # 3 CKA views + 2 probes each


def test_cli_tokens_and_layer_selectors_fail_in_one_line(run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from helpers import run_cli

    cases = [
        (["dynamics", str(run), "--out", str(tmp_path / "a"), "--layers", "layer2.1,layr3.1"],
         "error: unknown layer 'layr3.1' in ResNet (did you mean 'layer3.1'"),
        (["dynamics", str(run), "--out", str(tmp_path / "a"), "--tokens", "CLS"], "error: tokens: expected one of"),
        (["compare", VIT, VIT, "--out", str(tmp_path / "b"), "--data", DATA, "--tokens", "first"],
         "error: tokens: expected one of"),
        (["compare", VIT, VIT, "--out", str(tmp_path / "b"), "--data", DATA, "--layers-b", "kind:Linar"],
         "error: layers: no module of class 'Linar' in VisionTransformer (did you mean 'kind:Linear'?)"),
    ]
    for args, line in cases:
        code, out, err = run_cli(monkeypatch, capsys, *args)
        assert code == 2 and "Traceback" not in out + err, out + err
        assert line in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------- is a similarity above chance? (--null, --bootstrap)
INFERENCE = ["null_mean", "null_high", "p_value", "ci_low", "ci_high", "distinguishable"]


def _batch_grams(path: Path, layer: str, x: torch.Tensor, b: int) -> torch.Tensor:
    """A checkpoint's layer features (the test's own hook; "output" read off fc) -> raw Grams [batches, b, b]."""
    f = _features(path, "fc" if layer == "output" else layer, x)
    return torch.from_numpy(np.stack([f[s:s + b] @ f[s:s + b].T for s in range(0, len(f), b)]))


def _assert_row(row: pd.Series, want: dict) -> None:
    for key, value in want.items():
        if key in ("p_value", "distinguishable"):
            assert row[key] == value, (key, row[key], value)
        else:  # the table's Grams are float32 matmuls of centred features, the test's float64 of raw ones
            assert row[key] == pytest.approx(value, abs=1e-6), (key, row[key], value)


def test_compare_null_and_bootstrap_columns_are_single_pair_inference(run: Path) -> None:
    from layerlab.similarity import cka_inference

    paths = [checkpoint_path(run, e) for e in (0, 2)]
    opts = dict(layers_a=["conv1", LAYER], layers_b=[LAYER], images=32, batch_size=8)
    plain = dyn.compare(f"file:{paths[0]}", f"file:{paths[1]}", DATA, **opts)
    f = dyn.compare(f"file:{paths[0]}", f"file:{paths[1]}", DATA, null=49, bootstrap=30, **opts)
    assert list(f.columns) == list(plain.columns) + INFERENCE  # 0 (the default) adds nothing
    pd.testing.assert_frame_equal(f[plain.columns], plain)
    x = load_data(DATA, "test", images=32, seed=0).float()
    assert len(f) == 3 * 2
    for _, row in f.iterrows():
        ga, gb = _batch_grams(paths[0], row["layer_a"], x, 8), _batch_grams(paths[1], row["layer_b"], x, 8)
        _assert_row(row, cka_inference(ga, gb, permutations=49, resamples=30, seed=0, unbiased=True))
    with pytest.raises(LayerlabError, match="fewer than 2 batches"):
        dyn.compare(f"file:{paths[0]}", f"file:{paths[1]}", DATA, images=8, batch_size=8, bootstrap=10)
    with pytest.raises(LayerlabError, match="at least 19"):
        dyn.compare(f"file:{paths[0]}", f"file:{paths[1]}", DATA, images=16, batch_size=8, null=5)


def test_dynamics_null_and_bootstrap_columns_and_keys(run: Path, tmp_path: Path) -> None:
    from layerlab.similarity import cka_inference

    store = Store(tmp_path)
    opts = dict(layers=[LAYER], tables=("cka",), images=32, batch_size=8)
    plain = dyn.dynamics(run, store=store, **opts)["cka"]
    dyn.dynamics(run, store=store, null=0, bootstrap=0, **opts)  # the neutral value: the same keys, no new shard
    assert len(store.paths("dynamics-cka")) == 2  # LAYER and output
    f = dyn.dynamics(run, store=store, null=49, bootstrap=30, **opts)["cka"]
    configs = [store.shard_meta(p)["config"] for p in store.paths("dynamics-cka")]
    assert sorted((c.get("null", 0), c.get("bootstrap", 0)) for c in configs) == [(0, 0)] * 2 + [(49, 30)] * 2
    assert list(f.columns) == list(plain.columns) + INFERENCE
    pd.testing.assert_frame_equal(f[plain.columns], plain)
    x = load_data(DATA, "test", images=32, seed=0).float()
    grams = [_batch_grams(checkpoint_path(run, e), LAYER, x, 8) for e in (0, 1, 2)]
    rows = f[f["layer"] == LAYER].set_index(["epoch_a", "epoch_b"])
    for i, j in ((0, 1), (0, 2), (1, 1)):
        want = cka_inference(grams[i], grams[j], permutations=49, resamples=30, seed=0, unbiased=True)
        _assert_row(rows.loc[(i, j)], want)
        pd.testing.assert_series_equal(rows.loc[(j, i)], rows.loc[(i, j)], check_names=False)  # symmetric
    assert rows.loc[(1, 1), "p_value"] == pytest.approx(1 / 50)  # a checkpoint against itself: beyond every shuffle
    with pytest.raises(LayerlabError, match="fewer than 2 batches"):
        dyn.dynamics(run, images=8, batch_size=8, bootstrap=10)
    with pytest.raises(LayerlabError, match=r"null: expected 0 \(off\) or >= 19"):
        dyn.dynamics(run, null=5)


def test_cli_null_and_bootstrap_report_chance_and_store_only_non_zero_draws(run: Path, tmp_path: Path, monkeypatch,
                                                                           capsys) -> None:
    from helpers import run_cli

    spec = f"file:{checkpoint_path(run, 1)}"
    base = ["compare", spec, f"file:{checkpoint_path(run, 2)}", "--out", str(tmp_path), "--data", DATA, "--layers-a",
            "conv1", "--layers-b", "conv1", "--images", "32", "--batch-size", "8"]
    code, out, err = run_cli(monkeypatch, capsys, *base)
    assert code == 0 and "chance" not in out, out + err
    code, out, err = run_cli(monkeypatch, capsys, *base, "--null", "0", "--bootstrap", "0")
    assert code == 0 and len(Store(tmp_path).paths("compare")) == 1  # 0 is the published key
    code, out, err = run_cli(monkeypatch, capsys, *base, "--null", "50", "--bootstrap", "40")
    assert code == 0, out + err
    assert "of 4 layer pairs indistinguishable from chance (p >= 0.05)" in out and "bootstrap intervals" in out
    configs = [Store(tmp_path).shard_meta(p)["config"] for p in Store(tmp_path).paths("compare")]
    assert sorted((c.get("null", 0), c.get("bootstrap", 0)) for c in configs) == [(0, 0), (50, 40)]
    code, out, err = run_cli(monkeypatch, capsys, "dynamics", str(run), "--out", str(tmp_path / "d"), "--layers",
                             LAYER, "--images", "32", "--batch-size", "8", "--triplets", "2", "--resolution", "4",
                             "--probe-train", "100", "--null", "30", "--bootstrap", "20")
    assert code == 0, out + err
    assert "of 6 checkpoint pairs indistinguishable from chance" in out  # 3 pairs x (LAYER, output)
