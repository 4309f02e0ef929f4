"""TrAct epochs-to-accuracy (Petersen et al. 2024, the paper's central claim) on the embedded digits data.

Vanilla vs TrAct (first layer, lambda=0.1), SGD and Adam, several epoch budgets with a cosine schedule each,
>= 3 seeds; prints mean +- std test accuracy per budget and the smallest budget at which TrAct matches
vanilla's best. Runs are resumable training-lab runs under --out.

    python benchmarks/tract_epochs.py --out /tmp/tract-epochs --budgets 1 2 4 8 --seeds 0 1 2 --train-n 500
"""
from __future__ import annotations

import argparse
import time

import torch

from layerlab import tract_study


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
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    curves = tract_study.epochs_to_accuracy(a.out, arch=a.arch, data=a.data, budgets=a.budgets, seeds=a.seeds,
                                            optimizers=a.optimizers, lam=a.lam, train_n=a.train_n or None,
                                            device=a.device)
    summary = tract_study.summarize(curves)
    print(f"\n{a.arch} on {a.data} (train_n={a.train_n or 'all'}), lambda={a.lam}, {len(a.seeds)} seeds, "
          f"{time.time() - t0:.0f} s; final test accuracy, mean +- std over seeds:")
    wide = summary.assign(cell=summary["mean"].map("{:.3f}".format) + " +- " + summary["std"].map("{:.3f}".format))
    print(wide.pivot(index=["optimizer", "budget"], columns="method", values="cell").to_string())
    print("\nbudget at which TrAct matches vanilla's best:")
    print(tract_study.matching_budget(summary).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    from layerlab.plots.tract import plot_curves

    plot_curves(curves, __import__("pathlib").Path(a.out) / "curves")


if __name__ == "__main__":
    main()
