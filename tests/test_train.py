from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from layerlab import runs
from layerlab.errors import LayerlabError, NonFiniteError, SpecError
from layerlab.models import load_model
from layerlab.train import RECIPES, checkpoint_epochs, load_zoo, noisy_labels, recipe, train, train_zoo
from layerlab.train.adversarial import pgd

FAST = dict(epochs=1, batch_size=32)


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=False)["state_dict"]


@pytest.mark.parametrize("name", RECIPES.names())
def test_every_recipe_trains(name, tmp_path, tiny_arch):
    r = recipe(name, **FAST)
    run = train(tiny_arch, "digits", r, tmp_path / name, train_n=64, progress=False)
    m = runs.run_metrics(run)
    assert runs.is_done(run) and len(m) == 1 and m["train_loss"].notna().all()
    assert [e for e, _ in runs.checkpoints(run)] == [0, 1]
    assert not (run / "last.pt").exists()
    final = load_model(f"file:{run / 'final.pt'}")
    assert final(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_training_learns_the_digits(tmp_path, tiny_arch):
    run = train(tiny_arch, "digits", recipe("baseline", epochs=3, batch_size=32), tmp_path / "r", train_n=600, progress=False)
    assert runs.run_metrics(run)["test_acc"].iloc[-1] > 0.7


def test_deterministic_under_seed(tmp_path, tiny_arch):
    r = recipe("cropflip", epochs=2, batch_size=32)
    a = train(tiny_arch, "digits", r, tmp_path / "a", train_n=96, seed=5, progress=False)
    b = train(tiny_arch, "digits", r, tmp_path / "b", train_n=96, seed=5, progress=False)
    c = train(tiny_arch, "digits", r, tmp_path / "c", train_n=96, seed=6, progress=False)
    sa, sb, sc = _state(a / "final.pt"), _state(b / "final.pt"), _state(c / "final.pt")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])


@pytest.mark.parametrize("name", ["randaugment", "improved", "adam"])  # augment stream; EMA + mixup; Adam moments
def test_resume_after_crash_equals_uninterrupted(tmp_path, tiny_arch, monkeypatch, name):
    """The resume state (last.pt) is read with weights_only=True and restores every stream bit for bit."""
    import layerlab.train.loop as loop

    r = recipe(name, epochs=3, batch_size=32)
    ref = train(tiny_arch, "digits", r, tmp_path / "ref", train_n=64, seed=1, progress=False)
    real = loop.save_checkpoint

    def crash_at_2(model, path, **meta):
        if meta.get("epoch") == 2:
            raise KeyboardInterrupt("killed")
        return real(model, path, **meta)

    monkeypatch.setattr(loop, "save_checkpoint", crash_at_2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_arch, "digits", r, tmp_path / "run", train_n=64, seed=1, progress=False)
    assert (tmp_path / "run" / "last.pt").exists() and not runs.is_done(tmp_path / "run")
    monkeypatch.setattr(loop, "save_checkpoint", real)
    run = train(tiny_arch, "digits", r, tmp_path / "run", train_n=64, seed=1, progress=False)
    s_ref, s_run = _state(ref / "final.pt"), _state(run / "final.pt")
    assert all(torch.equal(s_ref[k], s_run[k]) for k in s_ref)
    pd.testing.assert_frame_equal(runs.run_metrics(ref).drop(columns="seconds"), runs.run_metrics(run).drop(columns="seconds"))


def test_nan_loss_is_a_clear_error_and_keeps_written_work(tmp_path, tiny_arch):
    with pytest.raises(NonFiniteError, match="lower the learning rate"):
        train(tiny_arch, "digits", recipe("baseline", epochs=2, lr=1e30, batch_size=32), tmp_path / "r", train_n=96, progress=False)
    assert (tmp_path / "r" / "run.json").exists()
    first = runs.checkpoint_path(tmp_path / "r", 0)  # the initialisation, written before the loss blew up
    stored, loaded = _state(first), load_model(f"file:{first}").state_dict()
    assert sorted(loaded) == sorted(stored) and all(torch.equal(loaded[k], stored[k]) for k in stored)
    assert all(torch.isfinite(v).all() for v in stored.values() if v.is_floating_point())


def test_a_different_run_in_the_same_folder_is_refused(tmp_path, tiny_arch):
    train(tiny_arch, "digits", recipe("baseline", epochs=1), tmp_path / "r", train_n=32, progress=False)
    mtime = (tmp_path / "r" / "final.pt").stat().st_mtime_ns
    train(tiny_arch, "digits", recipe("baseline", epochs=1), tmp_path / "r", train_n=32, progress=False)  # no-op
    assert (tmp_path / "r" / "final.pt").stat().st_mtime_ns == mtime
    with pytest.raises(LayerlabError, match="different run"):
        train(tiny_arch, "digits", recipe("adam", epochs=1), tmp_path / "r", train_n=32, progress=False)


def test_finetune_and_linear_probe(tmp_path, tiny_arch):
    pre = train(tiny_arch, "digits?classes=0-4", recipe("baseline", epochs=1), tmp_path / "pre", train_n=64, progress=False)
    lin = train(tiny_arch, "digits?classes=5-9", recipe("baseline", epochs=1), tmp_path / "lin", train_n=64,
                init=str(pre / "final.pt"), trainable="head", progress=False)
    s_pre, s_lin = _state(pre / "final.pt"), _state(lin / "final.pt")
    assert all(torch.equal(s_pre[k], s_lin[k]) for k in s_pre if not k.startswith("fc."))  # backbone frozen, BN too
    assert s_lin["fc.weight"].shape[0] == 5 and not torch.equal(s_pre["fc.weight"], s_lin["fc.weight"])
    full = train(tiny_arch, "digits?classes=5-9", recipe("baseline", epochs=1), tmp_path / "full", train_n=64,
                 init=str(pre / "final.pt"), progress=False)
    assert not torch.equal(_state(full / "final.pt")["conv1.weight"], s_pre["conv1.weight"])


def test_checkpoint_schedules():
    assert checkpoint_epochs("every", 3) == [0, 1, 2, 3]
    assert checkpoint_epochs("log", 10) == [0, 1, 2, 4, 8, 10]
    assert checkpoint_epochs("final", 5) == [0, 5]
    assert checkpoint_epochs([2], 4) == checkpoint_epochs("2", 4) == [0, 2, 4]
    assert checkpoint_epochs("1,3", 4) == [0, 1, 3, 4]
    with pytest.raises(LayerlabError, match=r"\[99\] lie outside 0..4"):  # never silently dropped
        checkpoint_epochs([2, 99], 4)
    with pytest.raises(LayerlabError):
        checkpoint_epochs("weekly", 3)


def test_symmetric_label_noise():
    y = torch.arange(1000) % 10
    z = noisy_labels(y, 0.3, 10, seed=0)
    changed = z != y
    assert int(changed.sum()) == 300  # exactly the fraction, and a changed label is always another class
    assert torch.equal(z, noisy_labels(y, 0.3, 10, seed=0))
    counts = torch.bincount(z[changed], minlength=10)
    assert counts.min() > 10  # spread over classes


@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pgd_stays_in_budget_and_raises_loss(norm, eps, tiny_arch):
    torch.manual_seed(0)
    m = load_model(tiny_arch)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    adv = pgd(m, x, y, norm=norm, eps=eps, steps=5)
    d = (adv - x).flatten(1)
    size = d.abs().max(1).values if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-5).all() and adv.min() >= 0 and adv.max() <= 1
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert ce(m(adv), y) > ce(m(x), y)


def test_recipe_validation():
    with pytest.raises(SpecError, match="augment"):
        recipe("baseline", augment="cutout")
    with pytest.raises(SpecError, match="has no field"):
        recipe("baseline", learning_rate=0.1)
    with pytest.raises(SpecError, match="unknown recipe"):
        recipe("sgd-fancy")


def test_zoo_file_errors(tmp_path):
    bad = tmp_path / "z.yaml"
    bad.write_text("models:\n  a: {recipe: nope}\narch: timm:resnet18\n")
    with pytest.raises(SpecError, match="model 'a'"):
        load_zoo(bad)
    bad.write_text("name: x\n")
    with pytest.raises(SpecError, match="models:"):
        load_zoo(bad)
    with pytest.raises(LayerlabError, match="does not exist"):
        load_zoo(tmp_path / "missing.yaml")
    assert len(load_zoo("demo").entries) >= 8


def test_zoo_kill9_resumes_without_retraining(tmp_path, tiny_arch):
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(
        f'arch: "{tiny_arch}"\ndata: digits\ndefaults: {{train_n: 64, batch_size: 32}}\n'
        "models:\n  quick: {recipe: baseline, epochs: 1}\n  slow: {recipe: baseline, epochs: 8}\n"
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "layerlab.cli", "zoo", "train", str(zoo), "--out", str(out), "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # an epoch is finished once both its resume state and its metrics row are written (two files, in that order)
    while not ((out / "slow" / "last.pt").exists() and (out / "slow" / "metrics.csv").exists()) \
            and time.time() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert runs.is_done(out / "quick") and not runs.is_done(out / "slow")
    done_at = (out / "quick" / "final.pt").stat().st_mtime_ns
    epochs_before = len(runs.run_metrics(out / "slow"))
    table = train_zoo(zoo, out, progress=False)
    assert (out / "quick" / "final.pt").stat().st_mtime_ns == done_at  # not retrained
    m = runs.run_metrics(out / "slow")
    assert len(m) == 8 and m["epoch"].tolist() == list(range(1, 9)) and epochs_before >= 1
    assert sorted(table["model"]) == ["quick", "slow"]


def test_train_and_test_splits_with_different_classes_are_refused(tmp_path, tiny_arch):
    from PIL import Image

    for split, classes in (("train", ("cat", "dog")), ("test", ("cat", "cow"))):
        for c in classes:
            (tmp_path / "d" / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), 40).save(tmp_path / "d" / split / c / "0.png")
    with pytest.raises(LayerlabError, match=r"labels do not line up \(only in train: \['dog'\], only in test: \['cow'\]\)"):
        train(tiny_arch, f"imagefolder:{tmp_path / 'd'}", recipe("baseline", **FAST), tmp_path / "r", progress=False)


def test_a_refused_request_leaves_no_run_behind(tmp_path, tiny_arch, monkeypatch, capsys):
    """Errors found before training (unknown model, bad schedule, images that do not fit) leave no run.json, so the
    corrected command is not refused as 'a different run'."""
    from helpers import run_cli

    out = tmp_path / "r"
    for args in (["timm:resnet19"], [tiny_arch, "--checkpoints", "weekly"], [tiny_arch, "--checkpoints", "0,9"],
                 [f"{tiny_arch}&in_chans=1"]):
        code, _, err = run_cli(monkeypatch, capsys, "train", *args, "--data", "digits?size=16", "--epochs", "1",
                               "--train-n", "32", "--out", str(out))
        assert code == 2 and "Traceback" not in err and err.startswith("error: "), (args, err)
        assert not out.exists(), args
    code, _, err = run_cli(monkeypatch, capsys, "train", tiny_arch, "--data", "digits?size=16", "--epochs", "1",
                           "--train-n", "32", "--checkpoints", "1", "--out", str(out))
    assert code == 0, err
    assert runs.is_done(out) and [e for e, _ in runs.checkpoints(out)] == [0, 1]
