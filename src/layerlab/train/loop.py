"""Train one model with one recipe into a run folder (layout: ``layerlab.runs``), resumable after a kill.

Every epoch ends with an atomic ``last.pt`` (model, optimiser, schedule, EMA, RNG states), so a killed run
continues from its last finished epoch; a finished run (``DONE``) is never retrained.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import runs
from ..data import ImageData, check_label_coverage, load_data, to_unit_float
from ..errors import DataError, LayerlabError, NonFiniteError, input_mismatch
from ..models import load_model, num_outputs, save_checkpoint
from ..runtime import resolve_device
from ..seeds import derive_seed, generator, global_seed
from ..store import atomic_write, atomic_write_text, resumed
from .adversarial import pgd
from .augment import augmenter, mixer
from .recipes import Recipe

RNG_STREAMS = "purpose-streams/1"  # recorded in run.json: runs seeded the old way (seed, seed + 1, ...) differ


def checkpoint_epochs(schedule: str | list[int], epochs: int) -> list[int]:
    """Epochs to checkpoint: 'every', 'log' (0, 1, 2, 4, 8, ... and the last), 'final', or a list of epochs
    (a list or a string such as '1,5,10'); an epoch outside 0..epochs is an error, never silently dropped.

    Epoch 0 (the initialisation, Zhang et al.'s theta_0) is always included.

    >>> checkpoint_epochs("log", 10)
    [0, 1, 2, 4, 8, 10]
    >>> checkpoint_epochs("3,5", 6)
    [0, 3, 5, 6]
    """
    if isinstance(schedule, str) and schedule.replace(",", "").replace(" ", "").isdigit():
        schedule = [int(e) for e in schedule.split(",") if e.strip()]
    if isinstance(schedule, (list, tuple)):
        outside = sorted(int(e) for e in schedule if not 0 <= int(e) <= epochs)
        if outside:
            raise LayerlabError(f"checkpoint epochs {outside} lie outside 0..{epochs} (the run's epochs); drop them "
                                "or raise --epochs")
        chosen = {int(e) for e in schedule}
    elif schedule == "every":
        chosen = set(range(epochs + 1))
    elif schedule == "log":
        chosen = {0} | {2**k for k in range(int(math.log2(epochs)) + 1)}
    elif schedule == "final":
        chosen = set()
    else:
        raise LayerlabError(
            f"checkpoint schedule {schedule!r} is not 'every', 'log', 'final' or a list of epochs such as '1,5,10'"
        )
    return sorted(chosen | {0, epochs})


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, *, labels: torch.Tensor | None = None, batch_size: int = 500,
             device: str | torch.device = "cpu", what: str = "the model",
             hint: str = "its weights may have diverged (lower the learning rate it was trained with)") -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) of ``model`` on ``data`` (or on ``labels`` in its place), eval mode.

    Raises DataError when the model has fewer outputs than ``data`` has classes, and NonFiniteError when its
    outputs are NaN or inf (``what`` and ``hint`` word that message): NaN logits would score a chance-level
    accuracy that looks like a result.
    """
    was = model.training
    model.eval()
    labels = data.labels if labels is None else labels
    total_loss, correct = 0.0, 0
    try:
        for i, (x, _) in enumerate(data.batches(batch_size, device)):
            y = labels[i * batch_size : i * batch_size + x.shape[0]].to(device)
            with _autocast(device):
                logits = model(_layout(x, device)).float()
            if i == 0:
                check_label_coverage(logits.shape[-1], data, what)
            if not bool(torch.isfinite(logits).all()):
                raise NonFiniteError(f"{what} gives NaN or inf outputs on {data.describe()}; {hint}")
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    finally:
        model.train(was)
    return total_loss / len(data), correct / len(data)


def _cuda(device: str | torch.device) -> list[torch.device]:
    dev = torch.device(device)
    return [dev] if dev.type == "cuda" else []


def _autocast(device: str | torch.device):
    dev = torch.device(device)
    return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)


def _layout(x: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if torch.device(device).type == "cuda" else x


def noisy_labels(labels: torch.Tensor, fraction: float, num_classes: int, seed: int) -> torch.Tensor:
    """Symmetric label noise: a seeded ``fraction`` of the labels moved to a different class, uniformly
    (stream ``train/label-noise`` of ``seed``)."""
    if fraction <= 0:
        return labels.clone()
    g = generator("train/label-noise", seed)
    n = labels.shape[0]
    rows = torch.randperm(n, generator=g)[: int(round(fraction * n))]
    shift = torch.randint(1, num_classes, (rows.numel(),), generator=g)
    out = labels.clone()
    out[rows] = (labels[rows] + shift) % num_classes
    return out


def _optimizer(model: nn.Module, r: Recipe) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if r.optimizer == "sgd":
        return torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay, nesterov=r.momentum > 0)
    cls = torch.optim.Adam if r.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=r.lr, weight_decay=r.weight_decay)


def _lr_lambda(r: Recipe, steps_per_epoch: int):
    total, warm = r.epochs * steps_per_epoch, r.warmup_epochs * steps_per_epoch

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if r.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return f


def train(arch: str, data: str, recipe: Recipe, out: str | Path, *, seed: int = 0,
          checkpoints: str | list[int] = "every", device: str | torch.device | None = "cpu", train_n: int | None = None,
          attrs: dict[str, Any] | None = None, progress: bool = True, trainable: str | None = None,
          init: str | None = None) -> Path:
    """Train ``arch`` on ``data`` with ``recipe`` into ``out``; returns ``out``. Deterministic under ``seed``.

    ``init`` starts from a checkpoint's weights (finetuning; the head is re-made when the class count differs);
    ``trainable='head'`` trains only the last Linear layer (linear probing). ``device``: ``"cpu"`` (default),
    ``"cuda"``, ``"auto"`` or None (the CPU: there is no model yet), see :func:`layerlab.runtime.resolve_device`.
    """
    out = Path(out)
    device = resolve_device(device)
    config = {"arch": arch, "data": data, "recipe": recipe.to_dict(), "seed": seed, "checkpoints": checkpoints,
              "train_n": train_n, "trainable": trainable, "init": init, "rng": RNG_STREAMS, "attrs": attrs or {}}
    if (out / "run.json").exists():
        old = json.loads((out / "run.json").read_text())
        if {k: v for k, v in old.items() if k != "attrs"} != {k: v for k, v in json.loads(json.dumps(config)).items() if k != "attrs"}:
            raise LayerlabError(f"{out} holds a different run (its run.json differs); choose another --out or delete it")
        if runs.is_done(out):
            return out
    train_set = load_data(data, "train", images=train_n, seed=seed, arg="--train-n")
    test_set = load_data(data, "test")
    _check_same_classes(train_set, test_set)
    ckpt_epochs = checkpoint_epochs(checkpoints, recipe.epochs)
    if trainable not in (None, "all", "head"):
        raise LayerlabError(f"trainable must be 'all' or 'head', got {trainable!r}")

    # Four independent streams (layerlab.seeds): init, data order, augmentation, label noise. None of them is
    # the integer ``seed`` itself, so no analysis stream (a criticality trial, say) can rebuild this init.
    with global_seed("train/init", seed, devices=_cuda(device)):
        model = _build(arch, train_set.num_classes, init, device)
    sample = to_unit_float(test_set.images[:1])
    try:
        outputs = num_outputs(model, sample)
    except RuntimeError as e:
        if (mismatch := input_mismatch(e, f"model {arch!r}", tuple(sample.shape[1:]))) is not None:
            raise mismatch from None
        raise
    check_label_coverage(outputs, train_set, f"model {arch!r}")
    arch_spec = model.layerlab_arch
    if trainable == "head":
        _freeze_all_but_head(model)
    # Only now, with every input checked, does the folder become a run: a refused request leaves nothing behind
    # that a corrected re-run would take for a different run.
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "run.json", json.dumps(config, indent=2))
    torch.manual_seed(derive_seed("train/augment", seed))  # torchvision transforms and PGD take no generator
    if recipe.tract > 0:
        from ..tract import apply as apply_tract

        apply_tract(model, lam=recipe.tract)
    model.layerlab_arch = arch_spec
    labels = noisy_labels(train_set.labels, recipe.label_noise, train_set.num_classes, seed)
    steps_per_epoch = math.ceil(len(train_set) / recipe.batch_size)
    opt = _optimizer(model, recipe)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe, steps_per_epoch))
    ema = None
    if recipe.ema > 0:
        from timm.utils import ModelEmaV3  # EMA with decay warm-up, so short runs are not dominated by the init

        ema = ModelEmaV3(model, decay=recipe.ema, use_warmup=True)
    shuffle = generator("train/order", seed)
    augment = augmenter(recipe.augment, train_set.shape[-1])
    mix = mixer(recipe.mixup, recipe.cutmix, train_set.num_classes)
    rows: list[dict[str, Any]] = []
    start = 1

    resume = out / "last.pt"
    if resume.exists():
        state = torch.load(resume, map_location=device, weights_only=True)  # tensors, numbers, lists, dicts only
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"])
        shuffle.set_state(state["shuffle"])
        rows, start = state["rows"], state["epoch"] + 1
        resumed(start - 1, recipe.epochs, out, unit="epochs", doing="training")
    elif 0 in ckpt_epochs:
        loss0, acc0 = evaluate(model, test_set, device=device, what=f"the initial model {arch!r}",
                               hint="check the architecture and the init checkpoint")
        save_checkpoint(_eval_model(model, ema), runs.checkpoint_path(out, 0), epoch=0, step=0, test_acc=acc0, test_loss=loss0)

    bar = tqdm(range(start, recipe.epochs + 1), desc=f"train {out.name}", disable=not progress, unit="ep", leave=False)
    for epoch in bar:
        t0 = time.time()
        model.train()
        if trainable == "head":  # linear probing: the frozen backbone keeps its BN statistics
            model.eval()
            _head(model).train()
        order = torch.randperm(len(train_set), generator=shuffle)
        run_loss = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * recipe.batch_size : (b + 1) * recipe.batch_size]
            x = to_unit_float(augment(train_set.images[idx]), device)
            y = labels[idx].to(device)
            target = y
            if mix is not None:
                x, target = mix(x, y)
            if recipe.adversarial is not None:
                x = pgd(model, x, y, norm=recipe.adversarial, eps=recipe.eps, steps=recipe.pgd_steps)
            with _autocast(device):
                logits = model(_layout(x, device))
            loss = F.cross_entropy(logits.float(), target, label_smoothing=recipe.label_smoothing)
            if not torch.isfinite(loss):
                raise _diverged(f"the training loss became {loss.item()}", epoch, b + 1, steps_per_epoch, recipe, out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model, step=sched.last_epoch)
            run_loss += loss.item()
        evaluated = _eval_model(model, ema)
        # A last step can leave finite batch losses but broken weights (NaN, or so large the outputs overflow):
        # check the weights and the evaluated losses before anything of this epoch is written.
        _check_finite_state(model, evaluated, epoch, steps_per_epoch, recipe, out)
        try:
            train_loss, train_acc = evaluate(evaluated, train_set, labels=labels, device=device)
            _, train_acc_clean = evaluate(evaluated, train_set, device=device) if recipe.label_noise > 0 else (None, train_acc)
            test_loss, test_acc = evaluate(evaluated, test_set, device=device)
        except NonFiniteError:
            raise _diverged("the evaluated model's outputs are NaN or inf (its weights overflow)", epoch, steps_per_epoch,
                            steps_per_epoch, recipe, out) from None
        if not math.isfinite(train_loss) or not math.isfinite(test_loss):
            raise _diverged(f"the evaluated loss is {train_loss} (train), {test_loss} (test)", epoch, steps_per_epoch,
                            steps_per_epoch, recipe, out)
        rows.append({"epoch": epoch, "step": epoch * steps_per_epoch, "lr": opt.param_groups[0]["lr"],
                     "batch_loss": run_loss / steps_per_epoch, "train_loss": train_loss, "train_acc": train_acc,
                     "train_acc_clean": train_acc_clean, "test_loss": test_loss, "test_acc": test_acc,
                     "seconds": time.time() - t0})
        bar.set_postfix(loss=f"{train_loss:.3f}", train=f"{train_acc:.3f}", test=f"{test_acc:.3f}")
        if epoch in ckpt_epochs:
            save_checkpoint(evaluated, runs.checkpoint_path(out, epoch), epoch=epoch, step=epoch * steps_per_epoch,
                            train_acc=train_acc, test_acc=test_acc, test_loss=test_loss)
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "ema": ema.state_dict() if ema is not None else None, "rng": torch.get_rng_state(),
                 "shuffle": shuffle.get_state(), "rows": rows, "epoch": epoch}
        atomic_write(resume, lambda f: torch.save(state, f))
        atomic_write_text(out / "metrics.csv", pd.DataFrame(rows).to_csv(index=False))

    final = _eval_model(model, ema)
    save_checkpoint(final, out / "final.pt", epoch=recipe.epochs, test_acc=rows[-1]["test_acc"], train_acc=rows[-1]["train_acc"],
                    recipe=recipe.to_dict(), data=data, seed=seed, attrs=attrs or {})
    atomic_write_text(out / "DONE", json.dumps({"test_acc": rows[-1]["test_acc"], "train_acc": rows[-1]["train_acc"]}))
    resume.unlink(missing_ok=True)
    return out


def _diverged(problem: str, epoch: int, step: int, steps: int, recipe: Recipe, out: Path) -> NonFiniteError:
    """The one-line error for a diverged run: where it happened, and that the run is not marked done."""
    return NonFiniteError(
        f"training diverged at epoch {epoch}, step {step}/{steps} of run {str(out)!r}: {problem}; lower the learning "
        f"rate (now {recipe.lr:g}, --lr) or check the data. The run is not marked done; the checkpoints of earlier "
        f"epochs are kept. Train again into a new --out (or delete {str(out)!r})"
    )


def _check_finite_state(model: nn.Module, evaluated: nn.Module, epoch: int, steps: int, recipe: Recipe, out: Path) -> None:
    """Raise NonFiniteError when a weight or buffer (BN statistics included) of the model or its EMA is NaN/inf."""
    for m in {id(model): model, id(evaluated): evaluated}.values():
        for name, t in m.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise _diverged(f"{name} holds NaN or inf", epoch, steps, steps, recipe, out)


def _check_same_classes(train_set: ImageData, test_set: ImageData) -> None:
    """Raise DataError when the train and test splits name different classes (label i would mean two things)."""
    if train_set.classes != test_set.classes:
        only_train = sorted(set(train_set.classes) - set(test_set.classes))
        only_test = sorted(set(test_set.classes) - set(train_set.classes))
        raise DataError(
            f"{train_set.spec!r}: the train split has {train_set.num_classes} classes and the test split "
            f"{test_set.num_classes}, so their labels do not line up (only in train: {only_train[:5]}, only in test: "
            f"{only_test[:5]}); give both splits the same class folders"
        )


def _eval_model(model: nn.Module, ema) -> nn.Module:
    """The model to evaluate and checkpoint: the EMA average when the recipe keeps one."""
    if ema is None:
        return model
    m = ema.module
    m.layerlab_arch = model.layerlab_arch
    return m


def _build(arch: str, num_classes: int, init: str | None, device: torch.device) -> nn.Module:
    model = load_model(arch, num_classes=num_classes, device=device)
    if init is None:
        return model
    source = load_model(init if ":" in init else f"file:{init}", device=device)
    src_state = source.state_dict()
    own = model.state_dict()
    compatible = {k: v for k, v in src_state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(compatible))
    if len(compatible) < len(own) // 2:
        raise LayerlabError(f"init {init!r} does not match architecture {arch!r} ({len(compatible)} of {len(own)} tensors fit)")
    model.load_state_dict(compatible, strict=False)
    model.layerlab_init_skipped = skipped  # the re-made head, for the record
    return model


def _head(model: nn.Module) -> nn.Linear:
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise LayerlabError("linear probing needs a final nn.Linear head; this model has none")
    return heads[-1]


def _freeze_all_but_head(model: nn.Module) -> None:
    head = _head(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
