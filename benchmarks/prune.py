"""Block removal on the demo zoo: does criticality pick better blocks than block influence, angular distance and a
random choice, and how do all of them compare with magnitude pruning at the same parameter count?

For every model of the demo zoo (10 narrow ResNet-18s on digits, one per training method), every criterion
(criticality, block-influence, angular, random, magnitude), every budget (10, 25 and 50 % of the 8 removable
blocks: 1, 2 and 4 blocks) and every seed (0-2), layerlab.prune removes the blocks, scores the pruned model on the
digits test split (364 images), heals it with one epoch of fine-tuning on the train split and scores it again.
Criteria score blocks on 256 calibration images of the train split (seeded per seed), never on the test images.

The record (records/prune.json, via record.py) holds per (criterion, budget, stage) the zoo-average accuracy as
mean +- std over seeds, and per (budget, stage, other criterion) criticality's accuracy minus the other's (paired
by model and seed; mean +- std over seeds, and a verdict: "beats" only when every seed's difference is positive).
The full tables go to OUT/prune.csv, prune_summary.csv and prune_compare.csv, and into the record's "tables".
The store makes the run resumable: a killed run re-run with the same OUT continues where it stopped.

    python benchmarks/prune.py                                   # the demo zoo (trained if absent), ~35-45 min on 2 cores
    python benchmarks/prune.py --zoo layerlab-demo/zoo --out layerlab-demo/prune-bench --threads 2
    python benchmarks/prune.py --smoke                           # a 2-model tiny zoo, 1-2 min: checks the script
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import pandas as pd
import torch
from record import RECORDS, Recorder
from zoo import demo_zoo

CRITERIA = ("criticality", "block-influence", "angular", "random", "magnitude")
REFERENCE = "criticality"


def _tiny_zoo(path: Path) -> dict[str, str]:
    """Two tiny ResNets trained for one epoch on 200 digits (the --smoke zoo)."""
    from layerlab.train import recipe, train

    arch = "timm:resnet18?channels=8,16,32,64&stem_width=8"
    return {name: f"file:{train(arch, 'digits', recipe(name, epochs=1), path / name, train_n=200, checkpoints='final', progress=False) / 'final.pt'}"
            for name in ("baseline", "adam")}


def _spread(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.4f} +- {std:.4f} (seeds={seeds})" if seeds > 1 else f"{mean:.4f} (1 seed)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", type=Path, default=Path("layerlab-demo/zoo"), help="a trained zoo (<model>/final.pt)")
    ap.add_argument("--out", type=Path, default=Path("layerlab-demo/prune-bench"), help="the resumable store")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budgets", default="0.1,0.25,0.5", help="fractions of the removable blocks (or counts)")
    ap.add_argument("--criteria", default=",".join(CRITERIA))
    ap.add_argument("--finetune-epochs", type=int, default=1, help="healing epochs (every job is scored before too)")
    ap.add_argument("--images", type=int, default=256, help="calibration images of the train split")
    ap.add_argument("--trials", type=int, default=3, help="criticality's fresh instances per block")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smoke", action="store_true", help="a 2-model tiny zoo, 1 budget, 2 seeds, few images; the "
                    "record goes to a temporary folder, never to records/")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from layerlab.prune import compare, prune, summarize

    scratch = tempfile.mkdtemp(prefix="layerlab-prune-smoke-") if args.smoke else None
    if args.smoke:
        models = _tiny_zoo(Path(scratch) / "zoo")
        out, records = Path(scratch) / "prune", Path(scratch) / "records"
        opts = {"budgets": [0.25], "seeds": [0, 1], "images": 32, "eval_images": 64, "heal_images": 64, "trials": 1}
    else:
        models, out, records = demo_zoo(args.zoo), args.out, RECORDS
        opts = {"budgets": [float(b) if "." in b else int(b) for b in args.budgets.split(",")],
                "seeds": [int(s) for s in args.seeds.split(",")], "images": args.images, "trials": args.trials}
    criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    rec = Recorder(
        "prune_smoke" if args.smoke else "prune",
        "Block removal on the demo zoo: criticality vs block influence, angular distance, random and magnitude",
        device=args.device, conditions={
            "models": (f"{len(models)} tiny ResNet-18s (smoke)" if args.smoke else
                       f"the demo zoo: {len(models)} trained narrow ResNet-18s (timm, channels 16-128), digits 32 px"),
            "criteria": ", ".join(criteria), "budgets (fraction of the 8 blocks)": ", ".join(map(str, opts["budgets"])),
            "seeds": ", ".join(map(str, opts["seeds"])), "healing": f"{args.finetune_epochs} epoch(s), SGD lr 0.01",
            "calibration": f"{opts['images']} train images per seed", "evaluation": "digits test split",
            "criticality trials": opts["trials"]},
        notes="accuracy = zoo average per seed, then mean +- std over seeds (ddof=1); a difference is criticality "
              "minus the other criterion, paired by model and seed; magnitude zeroes as many weights as the budget's "
              "blocks hold on average and keeps dense FLOPs")
    table = rec.time("prune", lambda: prune(models, "digits", criteria=criteria, finetune_epochs=args.finetune_epochs,
                                            device=args.device, store=out, progress=True, **opts))
    summary = summarize(table)
    verdicts = compare(table, reference=REFERENCE) if REFERENCE in criteria and len(criteria) > 1 else pd.DataFrame()
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "prune.csv", index=False)
    summary.to_csv(out / "prune_summary.csv", index=False)
    verdicts.to_csv(out / "prune_compare.csv", index=False)
    for r in summary.itertuples():
        rec.measure(f"accuracy {r.stage} budget {r.budget} {r.criterion}", _spread(r.accuracy, r.accuracy_std, r.seeds))
    for r in verdicts.itertuples():
        rec.measure(f"{REFERENCE} - {r.other}, {r.stage}, budget {r.budget}",
                    f"{r.difference:+.4f} +- {r.std:.4f} [{r.min:+.4f}, {r.max:+.4f}] ahead {r.ahead:.0%}: {r.verdict}")
    rec.measure("accuracy unpruned (zoo mean)", round(float(table.drop_duplicates("model")["accuracy_base"].mean()), 4))
    rec.record["tables"] = {"summary": summary.to_dict("records"), "compare": verdicts.to_dict("records")}
    print(summary.to_string(index=False))
    if not verdicts.empty:
        print(verdicts[["other", "budget", "stage", "difference", "std", "ahead", "verdict"]].to_string(index=False))
    print(f"{len(table)} jobs, load average {os.getloadavg()[0]:.2f}; tables in {out}")
    rec.write(records)


if __name__ == "__main__":
    main()
