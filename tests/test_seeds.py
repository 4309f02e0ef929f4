"""Random streams: one per purpose, seeded from (purpose, indices); none on the line users train with."""
from __future__ import annotations

import hashlib

import pytest
import torch

from layerlab import fresh_model, load_data
from layerlab.seeds import PURPOSES, derive_seed, generator
from layerlab.store import Store, job_key


def test_derived_seeds_are_sha256_of_purpose_and_indices():
    digest = hashlib.sha256(b"criticality/fresh|0|2").digest()
    assert derive_seed("criticality/fresh", 0, 2) == int.from_bytes(digest[:8], "little") % 2**63
    a = torch.randn(5, generator=generator("data/subset", 3))
    b = torch.randn(5, generator=torch.Generator().manual_seed(derive_seed("data/subset", 3)))
    assert torch.equal(a, b)


def test_purposes_never_share_a_stream():
    seeds = {(p, s, t): derive_seed(p, s, t) for p in PURPOSES for s in range(4) for t in range(4)}
    assert len(set(seeds.values())) == len(seeds)
    assert min(seeds.values()) > 2**32  # nowhere near the small integers people seed training with
    with pytest.raises(KeyError, match="unknown random purpose"):
        derive_seed("criticality/fersh", 0)


def test_a_default_run_is_initialised_on_its_own_stream(tmp_path, tiny_arch):
    """The training lab's init is drawn from stream train/init: not torch.manual_seed(0), and not any
    criticality trial's fresh instance (the bug that made trial 0 a reset to init)."""
    from layerlab.train import recipe, train

    run = train(tiny_arch, "digits?size=16", recipe("baseline", epochs=1, batch_size=32), tmp_path / "r", train_n=32,
                progress=False)
    init = torch.load(run / "checkpoints" / "epoch_0000.pt", weights_only=False)["state_dict"]["conv1.weight"]
    assert torch.equal(init, fresh_model(tiny_arch, seed=derive_seed("train/init", 0)).state_dict()["conv1.weight"])
    assert not torch.equal(init, fresh_model(tiny_arch, seed=0).state_dict()["conv1.weight"])
    for trial in range(3):
        fresh = fresh_model(tiny_arch, seed=derive_seed("criticality/fresh", 0, trial)).state_dict()["conv1.weight"]
        assert not torch.equal(init, fresh)


def test_subsets_come_from_their_own_stream():
    full = load_data("digits?size=8", "test")
    sub = load_data("digits?size=8", "test", images=20, seed=4)
    rows = torch.randperm(len(full), generator=generator("data/subset", 4))[:20].sort().values
    assert sub.indices.tolist() == full.indices[rows].tolist()


def test_bumping_the_store_version_retires_old_shards(monkeypatch, tmp_path):
    import layerlab.store as store

    new = job_key("m", "criticality", {"layer": "fc"})
    monkeypatch.setattr(store, "STORE_VERSION", store.STORE_VERSION - 1)
    old = job_key("m", "criticality", {"layer": "fc"})
    assert old != new
    Store(tmp_path).write("criticality", old, __import__("pandas").DataFrame({"x": [1]}))
    assert not Store(tmp_path).has("criticality", new)
