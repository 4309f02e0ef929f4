"""TrAct epochs-to-accuracy (Petersen et al. 2024, the paper's central claim) on the embedded digits data.

Vanilla vs TrAct (first layer, lambda=0.1), SGD and Adam, several epoch budgets with a cosine schedule each,
>= 3 seeds; prints mean +- std test accuracy per budget and the smallest budget at which TrAct matches
vanilla's best. Runs are resumable training-lab runs under --out.

    python benchmarks/tract_epochs.py --out /tmp/tract-epochs --budgets 1 2 4 8 --seeds 0 1 2 --train-n 500

A second table re-scores the same final weights with BatchNorm statistics recomputed on the training subset
(``tract_study.bn_recalibrated``): the training lab's running averages lag the weights after a short budget.
``--trace adam vanilla 2 0`` instead retrains one cell (optimizer, method, epochs, seed) in memory and prints,
every 4 steps, the test accuracy with running vs recomputed BN statistics.

A grid run writes the record ``benchmarks/records/tract_epochs.json`` (record.py): accuracies, not times; both
tables (running and recomputed BN) as measures, mean +- std over seeds per optimizer, budget and method, and every
run's scores. ``--rescore-only`` refuses to train: it re-scores a finished grid under --out (~30 s) and stops if a
run of the grid is missing. ``python benchmarks/render.py`` puts the record into RESULTS.md.
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
import torch
from record import Recorder
from torch import nn

from layerlab import runs, tract_study
from layerlab.data import load_data, to_unit_float
from layerlab.models import load_model
from layerlab.train import evaluate, recipe


def _table(summary) -> str:
    """optimizer x budget rows, vanilla/tract columns of 'mean +- std'."""
    cell = summary["mean"].map("{:.3f}".format) + " +- " + summary["std"].map("{:.3f}".format)
    return summary.assign(cell=cell).pivot(index=["optimizer", "budget"], columns="method", values="cell").to_string()


def bn_trace(optimizer: str, budget: int, seed: int, *, arch: str = tract_study.DEMO_ARCH, data: str = "digits",
             train_n: int | None = None, batch_size: int = 32, lam: float = 0.0, every: int = 4) -> pd.DataFrame:
    """Every ``every`` steps of one run of the grid (CPU, not saved): the lr, the last batch's loss, the test
    accuracy with BN running statistics (as the training lab scores it) and with BN statistics recomputed on the
    training subset (a copy), and the worst BN layer's ``running_var / population var`` (median over channels).

    A diagnostic (kept here, not in the library): mirrors :func:`layerlab.train.train` step for step (same init, order, optimiser and schedule; no
    augmentation, as the grid's recipes), so its last ``test_acc`` is the run's final test accuracy.
    """
    import copy
    import math

    import torch.nn.functional as F

    from layerlab.seeds import derive_seed, generator, global_seed
    from layerlab.train.loop import _lr_lambda, _optimizer

    train_set, test_set = load_data(data, "train", images=train_n, seed=seed), load_data(data, "test")
    r = recipe(tract_study.OPTIMIZER_RECIPES[optimizer], epochs=budget, batch_size=batch_size, tract=lam)
    if r.augment != "none" or r.mixup or r.cutmix or r.adversarial or r.label_noise or r.ema:
        raise ValueError(f"bn_trace mirrors plain recipes only; {r.name!r} is not one")
    with global_seed("train/init", seed):
        model = load_model(arch, num_classes=train_set.num_classes)
    torch.manual_seed(derive_seed("train/augment", seed))
    if lam > 0:
        from layerlab.tract import apply as apply_tract

        apply_tract(model, lam=lam)
    steps = math.ceil(len(train_set) / batch_size)
    opt = _optimizer(model, r)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(r, steps))
    order_rng = generator("train/order", seed)
    x_train = to_unit_float(train_set.images)
    rows, step = [], 0
    for _ in range(budget):
        order = torch.randperm(len(train_set), generator=order_rng)
        for b in range(steps):
            model.train()
            idx = order[b * batch_size : (b + 1) * batch_size]
            loss = F.cross_entropy(model(x_train[idx]), train_set.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % every and step != budget * steps:
                continue
            _, acc = evaluate(model, test_set)
            calibrated = tract_study.recalibrate_bn(copy.deepcopy(model), x_train)
            _, acc_bn = evaluate(calibrated, test_set)
            ratio = max(float((a.running_var / c.running_var).median())
                        for a, c in zip(model.modules(), calibrated.modules())
                        if isinstance(a, nn.modules.batchnorm._BatchNorm))
            rows.append({"step": step, "epoch": step / steps, "lr": opt.param_groups[0]["lr"],
                         "batch_loss": loss.item(), "test_acc": acc, "test_acc_bn": acc_bn, "worst_var_ratio": ratio})
    return pd.DataFrame(rows)


def write_record(a: argparse.Namespace, summary: pd.DataFrame, summary_bn: pd.DataFrame, recal: pd.DataFrame,
                 seconds: float) -> None:
    """``records/tract_epochs.json``: both accuracy tables as measures (no times: nothing here is a speed)."""
    rec = Recorder("tract_epochs", "TrAct epochs to accuracy", device=a.device, conditions={
        "model": f"{a.arch}, trained from its seeded init by the training lab", "data": f"{a.data}, training subset "
        f"{a.train_n or 'all'} images, scored on the full test split", "lambda": a.lam,
        "optimizers": ", ".join(f"{o} (recipe {r.name!r}, lr {r.lr:g}, weight decay {r.weight_decay:g})"
                                for o in a.optimizers for r in [recipe(tract_study.OPTIMIZER_RECIPES[o])]),
        "batch": 32, "schedule": "cosine over each budget, no warm-up, no augmentation",
        "budgets (epochs, cosine schedule each)": ", ".join(map(str, a.budgets)),
        "seeds": ", ".join(map(str, a.seeds)), "runs under": a.out,
        "scores": "final test accuracy, mean +- std (ddof 1) over seeds; running BN = the training lab's eval-mode "
                  "score; recomputed BN = the same weights, BatchNorm statistics recomputed on the run's training "
                  "subset"})
    for label, table in (("running BN", summary), ("recomputed BN", summary_bn)):
        order = {k: i for i, k in enumerate([*a.optimizers, "vanilla", "tract"])}
        rows = table.sort_values(["optimizer", "budget", "method"], key=lambda c: c if c.name == "budget" else c.map(order))
        for row in rows.itertuples(index=False):
            rec.measure(f"{row.optimizer} {row.budget} epochs, {row.method}, {label}",
                        f"{row.mean:.3f} +- {row.std:.3f} ({row.seeds} seeds)")
        for m in tract_study.matching_budget(table).itertuples(index=False):
            hit = "not reached" if pd.isna(m.tract_budget_to_match) else f"{int(m.tract_budget_to_match)} epochs"
            rec.measure(f"{m.optimizer}: TrAct budget to match vanilla's best ({m.vanilla_best:.3f} at "
                        f"{m.vanilla_best_budget} epochs), {label}", hit)
    rec.measure("seconds (training + re-scoring; re-scoring only when the runs were finished)", round(seconds, 1))
    rec.record["notes"] = ("accuracies, not times: the record has no timed rounds; 'runs' in the JSON holds every "
                           "run's final scores")
    rec.record["runs"] = recal.to_dict(orient="records")  # every run: test_acc, test_acc_bn, train_acc_bn
    rec.write()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/layerlab-tract-epochs")
    ap.add_argument("--arch", default=tract_study.DEMO_ARCH)
    ap.add_argument("--data", default="digits")
    ap.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--optimizers", nargs="+", default=["sgd", "adam"])
    ap.add_argument("--train-n", type=int, default=500, help="training subset (the low-data regime); 0 = all")
    ap.add_argument("--lam", type=float, default=0.1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trace", nargs=4, metavar=("OPTIMIZER", "METHOD", "EPOCHS", "SEED"),
                    help="per-step BatchNorm trace of one cell of the grid (METHOD: vanilla or tract), not saved")
    ap.add_argument("--rescore-only", action="store_true",
                    help="train nothing: re-score the finished runs under --out (stops if one is missing)")
    ap.add_argument("--no-record", action="store_true", help="print only; write no record")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.trace:
        opt, method, epochs, seed = a.trace
        if method not in ("vanilla", "tract"):
            ap.error(f"--trace METHOD must be vanilla or tract, got {method!r}")
        trace = bn_trace(opt, int(epochs), int(seed), arch=a.arch, data=a.data, train_n=a.train_n or None,
                                     lam=a.lam if method == "tract" else 0.0)
        print(trace.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        return
    if a.rescore_only:
        missing = [tract_study.run_dir(a.out, o, m, b, s).name for o in a.optimizers for b in a.budgets
                   for s in a.seeds for m in ("vanilla", "tract")
                   if not runs.is_done(tract_study.run_dir(a.out, o, m, b, s))]
        if missing:
            ap.error(f"--rescore-only: {len(missing)} run(s) not finished under {a.out}: {', '.join(missing[:6])}")
    t0 = time.time()
    curves = tract_study.epochs_to_accuracy(a.out, arch=a.arch, data=a.data, budgets=a.budgets, seeds=a.seeds,
                                            optimizers=a.optimizers, lam=a.lam, train_n=a.train_n or None,
                                            device=a.device)
    summary = tract_study.summarize(curves)
    print(f"\n{a.arch} on {a.data} (train_n={a.train_n or 'all'}), lambda={a.lam}, {len(a.seeds)} seeds, "
          f"{time.time() - t0:.0f} s; final test accuracy, mean +- std over seeds:")
    print(_table(summary))
    print("\nbudget at which TrAct matches vanilla's best:")
    print(tract_study.matching_budget(summary).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    recal = tract_study.bn_recalibrated(curves, a.out, data=a.data, train_n=a.train_n or None, device=a.device)
    summary_bn = tract_study.summarize(recal, value="test_acc_bn")
    print("\nthe same final weights, BatchNorm statistics recomputed on the training subset:")
    print(_table(summary_bn))
    print("\nbudget at which TrAct matches vanilla's best (recomputed BN statistics):")
    print(tract_study.matching_budget(summary_bn).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if not a.no_record:
        write_record(a, summary, summary_bn, recal, time.time() - t0)
    from layerlab.plots.tract import plot_curves

    plot_curves(curves, __import__("pathlib").Path(a.out) / "curves")


if __name__ == "__main__":
    main()
