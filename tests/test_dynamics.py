"""Training dynamics (layerlab.dynamics): CKA / probe / DRS tables on a tiny fake run, checked independently."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import layerlab.dynamics as dyn
from layerlab import load_data, load_model, save_checkpoint
from layerlab.errors import LayerlabError
from layerlab.regions import decision_region_similarity, sample_triplets
from layerlab.runs import checkpoint_path
from layerlab.store import Store

torch.set_num_threads(1)

ARCH = "timm:resnet18?channels=4,8,8,8&stem_width=4&in_chans=1"
DATA = "digits?size=16&channels=1"
SMALL = dict(images=32, batch_size=8, triplets=3, resolution=6, probe_train=120, probe_iter=30)
LAYER = "layer2.1"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as `layerlab train` writes it: run.json, three checkpoints (epoch 0 = init), metrics.csv."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    (out / "checkpoints").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"arch": ARCH, "data": DATA, "seed": 0}))
    torch.manual_seed(0)
    model = load_model(ARCH, num_classes=10)
    data = load_data(DATA, "train", n=120)
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
    x = load_data(DATA, "test", n=32, seed=0).float()
    fa, fb = _features(checkpoint_path(run, 0), LAYER, x), _features(checkpoint_path(run, 2), LAYER, x)
    ab = aa = bb = 0.0
    for s in range(0, 32, 8):
        ka, kb = fa[s : s + 8] @ fa[s : s + 8].T, fb[s : s + 8] @ fb[s : s + 8].T  # raw (uncentred) Grams
        ab, aa, bb = ab + _hsic_unbiased(ka, kb), aa + _hsic_unbiased(ka, ka), bb + _hsic_unbiased(kb, kb)
    got = _matrix(t["cka"], LAYER, "cka")[0, 2]
    assert got == pytest.approx(ab / np.sqrt(aa * bb), abs=1e-8)


def test_network_drs_matches_decision_region_similarity_of_the_checkpoints(run: Path, tables) -> None:
    t, _ = tables
    train = load_data(DATA, "train")
    trip = train.float()[sample_triplets(train.labels, 3, seed=0)]
    a, b = load_model(f"file:{checkpoint_path(run, 0)}"), load_model(f"file:{checkpoint_path(run, 1)}")
    expect = decision_region_similarity(a, b, trip, resolution=6)
    assert _matrix(t["drs"], "output", "drs")[0, 1] == pytest.approx(expect, abs=1e-12)


def test_probe_rows_and_accuracies(run: Path, tables) -> None:
    t, _ = tables
    p = t["probes"]
    assert len(p) == 3 * 3 and set(p["layer"]) == {"conv1", LAYER, "fc"}
    assert p[["train_acc", "test_acc"]].apply(lambda c: c.between(0, 1)).all().all()
    assert set(p["n_train"]) == {120} and set(p["n_test"]) == {364}
    # the head's probe reads the logits: it is at least as good as chance and its dimension is the class count
    assert set(p.loc[p["layer"] == "fc", "dim"]) == {10}
    assert set(p.loc[p["layer"] == LAYER, "dim"]) == {8 * 2 * 2}  # 8 channels pooled to 2 x 2
    assert t["training"]["first_fit_epoch"].iloc[0] == 2


def test_second_call_computes_nothing(run: Path, tables, monkeypatch: pytest.MonkeyPatch) -> None:
    t, store = tables

    def boom(*args, **kwargs):
        raise AssertionError("recomputed a checkpoint although every shard exists")

    monkeypatch.setattr(dyn, "_checkpoint_pass", boom)
    again = dyn.dynamics(run, store=store, layers=["conv1", LAYER, "fc"], **SMALL)
    for name in ("cka", "probes", "drs"):
        pd.testing.assert_frame_equal(again[name], t[name])
    assert len(Store(store).paths("dynamics-cka")) == 4 and len(Store(store).paths("dynamics-probes")) == 3


def test_a_lost_shard_is_recomputed_alone(run: Path, tables, monkeypatch: pytest.MonkeyPatch) -> None:
    t, store = tables
    cka_shards = Store(store).paths("dynamics-cka")
    victim = next(p for p in cka_shards if set(pd.read_parquet(p)["layer"]) == {"conv1"})
    victim.unlink()
    seen: list[tuple] = []
    real = dyn._checkpoint_pass

    def spy(model, cfg, inputs, cka_views, probe_layers, drs_views, *rest):
        seen.append((tuple(cka_views), tuple(probe_layers), tuple(drs_views)))
        return real(model, cfg, inputs, cka_views, probe_layers, drs_views, *rest)

    monkeypatch.setattr(dyn, "_checkpoint_pass", spy)
    again = dyn.dynamics(run, store=store, layers=["conv1", LAYER, "fc"], **SMALL)
    assert seen == [(("conv1",), (), ())] * 3
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
    r = dyn.decision_regions(run, epochs=[0, 2], layers=[LAYER], resolution=5, probe_train=120, probe_iter=20)
    assert len(r["regions"]) == 2 * 2 * 25 and r["regions"]["confidence"].between(0.1, 1).all()
    assert sorted(r["regions"]["layer"].unique()) == sorted([LAYER, "output"])
    assert len(set(r["anchors"]["class"])) == 3
    assert save_figure(decision_regions(r["regions"], r["anchors"]), tmp_path, "regions")[0].exists()


def test_cli_dynamics_and_compare(run: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from layerlab.cli import app

    res = CliRunner().invoke(app, ["dynamics", str(run), "--out", str(tmp_path), "--layers", f"conv1,{LAYER}",
                                   "--images", "16", "--batch-size", "8", "--triplets", "2", "--resolution", "4",
                                   "--probe-train", "100"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "figures" / "dynamics" / "tiny" / "dynamics_cka.png").exists()
    spec = f"file:{checkpoint_path(run, 1)}"
    res = CliRunner().invoke(app, ["compare", spec, spec, "--out", str(tmp_path), "--data", DATA, "--layers-a", "conv1",
                                   "--layers-b", "conv1", "--images", "16", "--batch-size", "8"])
    assert res.exit_code == 0, res.output
    assert list((tmp_path / "figures" / "compare").glob("*.svg"))
