"""Each training recipe does what its name says (issue 15, item 4).

A :class:`Spy` wraps the seams of ``layerlab.train.loop`` (the model's forward, the augmenter, the mixer, PGD, the
training loss, ``evaluate``, the optimiser's steps and the EMA) and records what one tiny ``train`` run passed
through them. Every effect is then checked against an expectation computed here by hand: the raw images and the
batch order from the documented streams, a padded crop found by search, the mixup/cutmix algebra, the
label-smoothed cross-entropy written out, the EMA and SGD/Adam update formulas, and the TrAct weight gradient
``grad_W (x^T x / b + lam I)^-1`` from a plain copy of the model.
"""
from __future__ import annotations

import copy
import math

import pytest
import timm.utils
import torch
import torch.nn.functional as F

from layerlab import runs
from layerlab.data import load_data, to_unit_float
from layerlab.models import load_model
from layerlab.seeds import generator
from layerlab.tract import TrAct
from layerlab.train import RECIPES, Recipe, loop, noisy_labels, recipe, train
from layerlab.train.augment import mixer

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "timm:resnet18?channels=8,16,32,64&num_classes=10"  # conftest.TINY_ARCH; its conv1 has 64 channels
DATA = "digits?size=16"
CLASSES = 10
PAD = 2  # the RandomCrop padding of every augmentation at 16 x 16: max(1, 16 // 8)

# The real seams, taken once: a second Spy in the same test wraps these, never the first Spy's wrappers.
REAL = {name: getattr(loop, name) for name in ("_build", "augmenter", "mixer", "pgd", "_optimizer", "evaluate")}
REAL_CE = F.cross_entropy
REAL_EMA = timm.utils.ModelEmaV3


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Spy:
    """What one ``train`` run passed through the loop's seams, in order.

    Hooks and wrappers are closures, never bound methods: the EMA deep-copies the model with its hooks, and a
    bound method would be copied along with this recorder.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.model: torch.nn.Module | None = None
        self.log: list[tuple[str, object]] = []  # ("train", (input, logits)) and ("pgd", record), in call order
        self.augments: list[tuple[torch.Tensor, torch.Tensor]] = []  # (raw uint8 batch, augmented batch)
        self.mixes: list[tuple[torch.Tensor, ...]] = []  # (x, y, mixed x, soft targets)
        self.pgds: list[dict] = []
        self.targets: list[torch.Tensor] = []  # the targets of each training loss
        self.evals: list[dict] = []  # one per evaluate call: split, labels given, inputs, targets
        self.steps: list[dict] = []  # one per optimiser step
        self.emas: list[dict] = []  # one per EMA update
        self.opt: torch.optim.Optimizer | None = None
        self.ema = None
        self._eval: dict | None = None
        self._quiet = False
        self._install(monkeypatch)

    @property
    def train_forwards(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [payload for kind, payload in self.log if kind == "train"]

    def _install(self, mp: pytest.MonkeyPatch) -> None:
        spy = self

        def seen(module, args, output):
            if spy._quiet:
                return
            x = args[0].detach().clone()
            if module.training:
                spy.log.append(("train", (x, output.detach().clone())))
            elif spy._eval is not None:
                spy._eval["inputs"].append(x)

        def build(*args, **kwargs):
            spy.model = REAL["_build"](*args, **kwargs)
            spy.model.register_forward_hook(seen)
            return spy.model

        def augmenter(*args):
            augment = REAL["augmenter"](*args)

            def recording(images):
                out = augment(images)
                spy.augments.append((images.clone(), out.clone()))
                return out

            return recording

        def mixer_(*args):
            mix = REAL["mixer"](*args)
            if mix is None:
                return None

            def recording(x, y):
                x0, y0 = x.clone(), y.clone()
                out, target = mix(x, y)
                spy.mixes.append((x0, y0, out.detach().clone(), target.detach().clone()))
                return out, target

            return recording

        def pgd(model, x, y, **kwargs):
            adv = REAL["pgd"](model, x, y, **kwargs)
            spy._quiet = True
            try:  # the loss of the current model (its train mode, as PGD saw it) on a copy: BN stats untouched
                twin = copy.deepcopy(model)
                with torch.no_grad():
                    clean, attacked = float(REAL_CE(twin(x), y)), float(REAL_CE(twin(adv), y))
            finally:
                spy._quiet = False
            record = {"x": x.detach().clone(), "y": y.clone(), "adv": adv.clone(), "clean_loss": clean,
                      "adv_loss": attacked, **kwargs}
            spy.pgds.append(record)
            spy.log.append(("pgd", record))
            return adv

        def cross_entropy(logits, target, *args, **kwargs):
            value = REAL_CE(logits, target, *args, **kwargs)
            if "label_smoothing" in kwargs:  # the training loss (PGD's and evaluate's calls do not pass it)
                spy.targets.append(target.detach().clone())
            elif kwargs.get("reduction") == "sum" and spy._eval is not None:
                spy._eval["targets"].append(target.clone())
            return value

        def evaluate(model, data, *, labels=None, **kwargs):
            spy._eval = {"split": data.split, "labels_given": labels is not None, "inputs": [], "targets": []}
            spy.evals.append(spy._eval)
            try:
                return REAL["evaluate"](model, data, labels=labels, **kwargs)
            finally:
                spy._eval = None

        def optimizer(model, r):
            opt = REAL["_optimizer"](model, r)
            spy.opt = opt

            def before(o, args, kwargs):
                m = spy.model
                grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
                spy.steps.append({"lr": o.param_groups[0]["lr"], "before": _params(m), "grads": grads,
                                  "state": {k: v.clone() for k, v in m.state_dict().items()}, "stem": m.conv1})

            def after(o, args, kwargs):
                spy.steps[-1]["after"] = _params(spy.model)

            opt.register_step_pre_hook(before)
            opt.register_step_post_hook(after)
            return opt

        class RecordingEma(REAL_EMA):
            def update(self, model, step=None):
                spy.ema = self
                before = _params(self.module)
                super().update(model, step=step)
                spy.emas.append({"step": step, "before": before, "model": _params(model),
                                 "after": _params(self.module)})

        for name, wrapper in (("_build", build), ("augmenter", augmenter), ("mixer", mixer_), ("pgd", pgd),
                              ("_optimizer", optimizer), ("evaluate", evaluate)):
            mp.setattr(loop, name, wrapper)
        mp.setattr(F, "cross_entropy", cross_entropy)
        mp.setattr(timm.utils, "ModelEmaV3", RecordingEma)


def _run(tmp_path, monkeypatch, name: str, *, seed: int = 0, train_n: int = 32, tag: str = "", **overrides):
    """Train ``name`` for one tiny run under a fresh Spy: (spy, run folder)."""
    overrides = {"epochs": 1, "batch_size": 32, **overrides}
    spy = Spy(monkeypatch)
    out = train(ARCH, DATA, recipe(name, **overrides), tmp_path / f"{name}-{seed}{tag}", seed=seed, train_n=train_n,
                progress=False)
    return spy, out


def _rows(n: int, batch_size: int, seed: int, epochs: int = 1) -> list[torch.Tensor]:
    """The training images of each step: the documented stream ``train/order`` (one permutation per epoch)."""
    g = generator("train/order", seed)
    out = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        out += [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return out


def _check_rows(spy: Spy, train_set, rows: list[torch.Tensor]) -> None:
    """The batch order reconstructed here is the run's: the augmenter got exactly these raw images."""
    assert len(spy.augments) == len(rows)
    for (raw, _), idx in zip(spy.augments, rows):
        assert torch.equal(raw, train_set.images[idx])


def _check_eval_clean(spy: Spy, train_set, test_set) -> None:
    """Every evaluation saw its split's images as stored, unaugmented, and the test split with its own labels."""
    splits = {"train": train_set, "test": test_set}
    assert {e["split"] for e in spy.evals} == {"train", "test"}
    for e in spy.evals:
        data = splits[e["split"]]
        assert torch.equal(torch.cat(e["inputs"]), to_unit_float(data.images)), e["split"]
        if e["split"] == "test":
            assert not e["labels_given"] and torch.equal(torch.cat(e["targets"]), test_set.labels)


def _placements(raw: torch.Tensor, out: torch.Tensor, flips: bool) -> list[tuple[int, int, bool]]:
    """Every (top, left, mirrored) at which ``out`` is a crop of ``raw`` zero-padded by PAD."""
    size = raw.shape[-1]
    padded = F.pad(raw, (PAD,) * 4)
    found = []
    for top in range(2 * PAD + 1):
        for left in range(2 * PAD + 1):
            window = padded[:, top : top + size, left : left + size]
            for mirrored in (False, True) if flips else (False,):
                if torch.equal(out, window.flip(-1) if mirrored else window):
                    found.append((top, left, mirrored))
    return found


def _mix_kind(x, y, out, target, *, exact_box: bool) -> str:
    """'mixup', 'cutmix' or 'either' after checking that (out, target) is one of them (torchvision pairs image i
    with image i - 1): targets lam * onehot(y) + (1 - lam) * onehot(y of the partner); inputs the same convex
    combination, or the partner pasted into one box of area (1 - lam) of the image (exactly so for ``exact_box``,
    at most so when equal pixels hide part of the box)."""
    onehot = F.one_hot(y, CLASSES).float()
    partner_x, partner_y = x.roll(1, 0), onehot.roll(1, 0)
    i = int((y != y.roll(1, 0)).nonzero()[0, 0])
    lam = float(target[i, y[i]])
    assert 0.0 <= lam <= 1.0
    torch.testing.assert_close(target, lam * onehot + (1 - lam) * partner_y, atol=1e-6, rtol=0)
    as_mixup = torch.allclose(out, lam * x + (1 - lam) * partner_x, atol=1e-6, rtol=0)
    changed = (out != x).any(0).any(0)  # [H, W]
    if changed.any():
        r = changed.any(1).nonzero().flatten()
        c = changed.any(0).nonzero().flatten()
        box = (slice(int(r[0]), int(r[-1]) + 1), slice(int(c[0]), int(c[-1]) + 1))
        pasted = torch.equal(out[..., box[0], box[1]], partner_x[..., box[0], box[1]])
        area = (box[0].stop - box[0].start) * (box[1].stop - box[1].start) / changed.numel()
    else:
        pasted, area = True, 0.0
    as_cutmix = pasted and (abs(area - (1 - lam)) < 1e-6 if exact_box else area <= 1 - lam + 1e-6)
    assert as_mixup or as_cutmix, f"neither a mixup nor a cutmix of the batch (lam {lam:.4f})"
    return "either" if as_mixup and as_cutmix else "mixup" if as_mixup else "cutmix"


# ---------------------------------------------------------------------------------------------- the presets

METHOD = {  # what each recipe changes relative to Recipe() (the baseline), and nothing else
    "baseline": {},
    "adam": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
    "cropflip": {"augment": "cropflip"},
    "randaugment": {"augment": "randaugment"},
    "augmix": {"augment": "augmix"},
    "trivialaugment": {"augment": "trivialaugment"},
    "label-noise": {"label_noise": 0.2},
    "pgd-linf": {"adversarial": "linf", "eps": 8 / 255},
    "pgd-l2": {"adversarial": "l2", "eps": 0.5},
    "improved": {"augment": "crop", "label_smoothing": 0.1, "mixup": 0.2, "cutmix": 1.0, "ema": 0.99, "epochs": 15},
    "tract": {"tract": 0.1},
}


def test_every_recipe_changes_only_its_method():
    assert sorted(RECIPES.names()) == sorted(METHOD)  # a new recipe needs its row here and its test below
    base = Recipe().to_dict()
    assert (base["optimizer"], base["momentum"], base["schedule"], base["augment"]) == ("sgd", 0.9, "cosine", "none")
    for name, changes in METHOD.items():
        r = recipe(name).to_dict()
        assert r["name"] == name
        assert {k: v for k, v in r.items() if k != "name" and v != base[k]} == changes, name


# ---------------------------------------------------------------------------------------------- optimisers

@pytest.mark.parametrize("name, cls, group", [
    ("baseline", torch.optim.SGD,
     {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "dampening": 0}),
    ("adam", torch.optim.Adam, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False}),
])
def test_optimizer_and_cosine_schedule(name, cls, group, tmp_path, monkeypatch):
    spy, out = _run(tmp_path, monkeypatch, name, train_n=64, epochs=2)
    assert type(spy.opt) is cls  # Adam, not AdamW; SGD
    g = spy.opt.param_groups[0]
    assert len(spy.opt.param_groups) == 1 and {k: g["initial_lr"] if k == "lr" else g[k] for k in group} == group
    assert {id(p) for p in g["params"]} == {id(p) for p in spy.model.parameters()}

    base, total = group["lr"], 4  # 2 epochs of 2 steps; cosine from base to 0, no warm-up
    lrs = [s["lr"] for s in spy.steps]
    assert lrs == pytest.approx([base * 0.5 * (1 + math.cos(math.pi * k / total)) for k in range(total)], rel=1e-12)
    assert runs.run_metrics(out)["lr"].tolist() == pytest.approx([base / 2, 0.0], abs=1e-12)

    first = spy.steps[0]  # one step by hand: momentum and Adam's moments start at zero
    for n, w in first["before"].items():
        grad = first["grads"][n]
        if name == "baseline":  # Nesterov: buf = d, step along d + m * buf = (1 + m) d, d = g + wd * w
            expected = w - base * (1 + group["momentum"]) * (grad + group["weight_decay"] * w)
        else:  # bias-corrected moments are g and g^2: the step is lr * g / (|g| + eps)
            expected = w - base * grad / (grad.abs() + group["eps"])
        torch.testing.assert_close(first["after"][n], expected, atol=1e-7, rtol=1e-5, msg=n)


# ---------------------------------------------------------------------------------------------- augmentation

@pytest.mark.parametrize("name", ["baseline", "cropflip", "randaugment", "trivialaugment", "augmix"])
def test_augmentation_changes_training_inputs_only_and_follows_the_seed(name, tmp_path, monkeypatch):
    train_set, test_set = load_data(DATA, "train", images=32, seed=0), load_data(DATA, "test")
    spy, _ = _run(tmp_path, monkeypatch, name)
    rows = _rows(32, 32, seed=0)
    _check_rows(spy, train_set, rows)
    (raw, augmented), [(seen, _)] = spy.augments[0], spy.train_forwards
    assert torch.equal(seen, to_unit_float(augmented))  # the model trains on the augmenter's output
    changed = (seen != to_unit_float(raw)).flatten(1).any(1)
    if name == "baseline":
        assert not changed.any()  # the control: no augmentation, the raw images
    else:
        assert changed.float().mean() >= 0.75, f"only {int(changed.sum())} of 32 images augmented"
    _check_eval_clean(spy, train_set, test_set)

    again, _ = _run(tmp_path, monkeypatch, name, tag="-again")
    assert torch.equal(again.train_forwards[0][0], seen)  # the same seed augments the same way


def test_cropflip_is_a_padded_crop_with_random_mirroring(tmp_path, monkeypatch):
    spy, _ = _run(tmp_path, monkeypatch, "cropflip")
    raw, out = spy.augments[0]
    found = [_placements(r, o, flips=True) for r, o in zip(raw, out)]
    assert all(found), "an augmented image that is no padded crop of its raw image"
    offsets = {p[:2] for f in found for p in f}
    only_mirrored = sum(all(p[2] for p in f) for f in found)
    only_plain = sum(not any(p[2] for p in f) for f in found)
    assert len(offsets) > 3 and only_mirrored > 0 and only_plain > 0


# ---------------------------------------------------------------------------------------------- label noise

def test_label_noise_flips_its_fraction_of_training_labels_only(tmp_path, monkeypatch):
    train_set, test_set = load_data(DATA, "train", images=64, seed=3), load_data(DATA, "test")
    clean, test_labels = train_set.labels.clone(), test_set.labels.clone()
    spy, _ = _run(tmp_path, monkeypatch, "label-noise", seed=3, train_n=64)
    rows = _rows(64, 32, seed=3)
    _check_rows(spy, train_set, rows)
    used = torch.empty_like(clean)
    for idx, target in zip(rows, spy.targets, strict=True):
        used[idx] = target
    # exactly round(0.2 * 64) labels moved, each to another class (a flip to the same class would count less)
    assert int((used != clean).sum()) == round(0.2 * 64) == 13
    assert torch.equal(used, noisy_labels(clean, 0.2, CLASSES, seed=3))  # the run's flips are its seed's
    assert torch.equal(train_set.labels, clean) and torch.equal(test_set.labels, test_labels)  # nothing in place
    _check_eval_clean(spy, train_set, test_set)  # the test split is scored on its own labels
    train_evals = [torch.cat(e["targets"]) for e in spy.evals if e["split"] == "train"]
    assert any(torch.equal(t, used) for t in train_evals) and any(torch.equal(t, clean) for t in train_evals)


def test_symmetric_label_noise_is_seeded_exact_and_uniform():
    y = torch.arange(5000) % CLASSES
    z = noisy_labels(y, 0.2, CLASSES, seed=0)
    moved = (z != y).nonzero().flatten()
    assert moved.numel() == 1000 and torch.equal(y, torch.arange(5000) % CLASSES)  # exact count, input kept
    assert torch.equal(z, noisy_labels(y, 0.2, CLASSES, seed=0))
    other = (noisy_labels(y, 0.2, CLASSES, seed=1) != y).nonzero().flatten()
    overlap = len(set(moved.tolist()) & set(other.tolist()))
    assert other.numel() == 1000 and overlap < 300  # independent draws share ~200 of 1000 rows (sd ~13)
    shifts = torch.bincount((z[moved] - y[moved]) % CLASSES, minlength=CLASSES)
    assert shifts[0] == 0 and (shifts[1:] - 1000 / 9).abs().max() < 55  # uniform over the 9 other classes (sd ~10)
    assert abs(int((moved < 2500).sum()) - 500) < 80  # rows spread over the data set (sd ~16)
    assert torch.equal(noisy_labels(y, 0.0, CLASSES, seed=0), y)


# ---------------------------------------------------------------------------------------------- adversarial

@pytest.mark.parametrize("name", ["pgd-linf", "pgd-l2"])
def test_pgd_training_inputs_stay_in_budget_and_raise_the_loss(name, tmp_path, monkeypatch):
    train_set, test_set = load_data(DATA, "train", images=64, seed=0), load_data(DATA, "test")
    spy, _ = _run(tmp_path, monkeypatch, name, train_n=64)
    rows = _rows(64, 32, seed=0)
    _check_rows(spy, train_set, rows)
    r = recipe(name)
    assert len(spy.pgds) == len(rows) == 2
    for p, idx in zip(spy.pgds, rows):
        assert (p["norm"], p["eps"], p["steps"]) == (r.adversarial, r.eps, r.pgd_steps)
        assert torch.equal(p["x"], to_unit_float(train_set.images[idx])) and torch.equal(p["y"], train_set.labels[idx])
        delta = (p["adv"] - p["x"]).flatten(1)
        size = delta.abs().max(1).values if r.adversarial == "linf" else delta.norm(dim=1)
        slack = 1e-6 if r.adversarial == "linf" else 1e-5
        assert (size <= r.eps + slack).all() and 0 <= p["adv"].min() and p["adv"].max() <= 1
        assert (size > r.eps / 4).all()  # an attack, not a rounding error
        assert p["adv_loss"] > p["clean_loss"]
    # the model then trains on the adversarial batch: the forward after each attack is that batch
    kinds = [kind for kind, _ in spy.log]
    for at in (i for i, kind in enumerate(kinds) if kind == "pgd"):
        assert kinds[at + 1] == "train" and torch.equal(spy.log[at + 1][1][0], spy.log[at][1]["adv"])
    _check_eval_clean(spy, train_set, test_set)


# ---------------------------------------------------------------------------------------------- improved

def test_mixup_and_cutmix_mix_inputs_and_targets():
    r = recipe("improved")
    mix = mixer(r.mixup, r.cutmix, CLASSES)
    torch.manual_seed(0)
    kinds = []
    for _ in range(30):
        x, y = torch.rand(8, 3, 16, 16), torch.randint(0, CLASSES, (8,))
        out, target = mix(x.clone(), y)
        kinds.append(_mix_kind(x, y, out, target, exact_box=True))
    assert "mixup" in kinds and "cutmix" in kinds  # one of the two per batch, both in use


def test_improved_smooths_mixes_and_averages(tmp_path, monkeypatch):
    r = recipe("improved")
    train_set, test_set = load_data(DATA, "train", images=96, seed=0), load_data(DATA, "test")
    spy, out = _run(tmp_path, monkeypatch, "improved", train_n=96)
    rows = _rows(96, 32, seed=0)
    _check_rows(spy, train_set, rows)
    _check_eval_clean(spy, train_set, test_set)
    forwards = spy.train_forwards
    assert len(spy.mixes) == len(forwards) == len(spy.emas) == 3

    # crop, no mirror; then mixup or cutmix; the model trains on the mixed batch
    for (raw, cropped), (x, y, mixed, target), (seen, _), idx in zip(spy.augments, spy.mixes, forwards, rows):
        assert all(_placements(a, b, flips=False) for a, b in zip(raw, cropped))
        assert torch.equal(x, to_unit_float(cropped)) and torch.equal(y, train_set.labels[idx])
        _mix_kind(x, y, mixed, target, exact_box=False)
        assert torch.equal(seen, mixed)

    # the loss: cross-entropy against the mixed targets smoothed by 0.1, written out, equals the recorded loss
    def hand(smoothing: float, soft: bool) -> float:
        losses = []
        for (_, y, _, target), (_, logits) in zip(spy.mixes, forwards):
            t = target if soft else F.one_hot(y, CLASSES).float()
            q = (1 - smoothing) * t.double() + smoothing / CLASSES
            losses.append(float(-(q * logits.double().log_softmax(1)).sum(1).mean()))
        return sum(losses) / len(losses)

    recorded = float(runs.run_metrics(out)["batch_loss"].iloc[0])
    assert recorded == pytest.approx(hand(r.label_smoothing, soft=True), rel=1e-5)
    assert abs(recorded - hand(0.0, soft=True)) > 1e-4 and abs(recorded - hand(r.label_smoothing, soft=False)) > 1e-4

    # EMA: each update is e <- d e + (1 - d) w, d warmed up as timm's ModelEmaV3 does (1 - step^(-2/3), capped
    # at the stated decay; the first update copies the weights)
    assert [u["step"] for u in spy.emas] == [1, 2, 3]
    for u in spy.emas:
        d = 0.0 if u["step"] <= 1 else min(r.ema, 1 - u["step"] ** (-2 / 3))
        for n, e in u["before"].items():
            torch.testing.assert_close(u["after"][n], d * e + (1 - d) * u["model"][n], atol=1e-6, rtol=1e-5, msg=n)
    last = spy.emas[-1]["after"]
    raw_weights = _params(spy.model)
    assert not torch.allclose(last["conv1.weight"], raw_weights["conv1.weight"])  # the average lags the weights
    saved = torch.load(out / "final.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(saved[n], v) for n, v in last.items())  # the EMA is what is evaluated and saved

    before = _params(spy.ema.module)  # past the warm-up the decay is the stated 0.99
    spy.ema.update(spy.model, step=10**6)
    for n, e in before.items():
        torch.testing.assert_close(_params(spy.ema.module)[n], r.ema * e + (1 - r.ema) * raw_weights[n], atol=1e-7,
                                   rtol=1e-6, msg=n)


# ---------------------------------------------------------------------------------------------- TrAct

def test_tract_preconditions_the_stem_gradient_only(tmp_path, monkeypatch):
    lam = recipe("tract").tract
    spy, _ = _run(tmp_path, monkeypatch, "tract")
    [step], [(x, _)], [target] = spy.steps, spy.train_forwards, spy.targets
    assert isinstance(step["stem"], TrAct) and step["stem"].lam == lam

    plain = load_model(ARCH, num_classes=CLASSES)  # the same weights and batch, ordinary backprop
    plain.load_state_dict(step["state"])
    plain.train()
    REAL_CE(plain(x), target).backward()
    grads = {n: p.grad for n, p in plain.named_parameters()}
    assert set(grads) == set(step["grads"])
    for n, g in grads.items():
        if n != "conv1.weight":
            torch.testing.assert_close(step["grads"][n], g, atol=1e-6, rtol=1e-4, msg=n)

    conv = plain.conv1
    rows = F.unfold(x.double(), conv.kernel_size, padding=conv.padding, stride=conv.stride).transpose(1, 2)
    rows = rows.reshape(-1, rows.shape[-1])
    gram = rows.T @ rows / rows.shape[0] + lam * torch.eye(rows.shape[1], dtype=torch.double)
    vanilla = grads["conv1.weight"].double().reshape(conv.out_channels, -1)
    expected = torch.linalg.solve(gram, vanilla.T).T.reshape(conv.weight.shape)  # grad_W (x^T x / b + lam I)^-1
    got = step["grads"]["conv1.weight"].double()
    # float32 solve against float64: the error is a rounding error relative to the whole gradient
    assert (got - expected).norm() < 1e-4 * expected.norm(), float((got - expected).norm() / expected.norm())
    assert (got - vanilla.reshape(got.shape)).norm() > 0.1 * got.norm()
