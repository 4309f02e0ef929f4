"""Naive vs streaming checkpoint x checkpoint similarity, side by side (layerlab.dynamics).

naive  = what a per-pair script does: for every pair of checkpoints (t1 < t2), load both, extract the probe set's
         features of every layer again, and compute full-N unbiased linear CKA (``linear_cka(..., unbiased=True)``,
         float64) per layer; for decision regions, run both networks over every plane again
         (``decision_region_similarity``).
fast   = ``layerlab.dynamics.dynamics``: each checkpoint is loaded and run once; per-batch Gram matrices are formed
         inside the forward hooks and all K x K pairs are summed from them; plane predictions are stored once per
         checkpoint and compared.

With ``batch_size = N`` the streaming estimator is exactly full-N unbiased CKA, so both sides compute the same
numbers; the script prints the largest difference next to the times. A tiny training run (narrow ResNet-18 on
digits, one short SGD phase per checkpoint) is written to a temporary folder first.

    python benchmarks/dynamics.py --checkpoints 8 --images 256 --threads 2
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from itertools import combinations
from pathlib import Path

import torch
import torch.nn.functional as F

from layerlab import load_data, load_model, save_checkpoint
from layerlab.dynamics import default_layers, dynamics
from layerlab.features import Extractor
from layerlab.regions import decision_region_similarity, sample_triplets
from layerlab.runs import checkpoint_path
from layerlab.similarity import linear_cka

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import Recorder  # noqa: E402

ARCH = "timm:resnet18?channels=16,32,64,128&stem_width=16"
DATA = "digits?size=16"


def make_run(root: Path, k: int, seed: int = 0) -> Path:
    run = root / "bench-run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"arch": ARCH, "data": DATA, "seed": seed}))
    torch.manual_seed(seed)
    model = load_model(ARCH, num_classes=10)
    data = load_data(DATA, "train", images=512, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(k):
        save_checkpoint(model, checkpoint_path(run, epoch), epoch=epoch)
        model.train()
        for x, y in data.batches(64):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        model.eval()
    return run


def naive_cka(run: Path, k: int, layers: list[str], x: torch.Tensor) -> dict[tuple[str, int, int], float]:
    out = {}
    for i, j in combinations(range(k), 2):
        feats = []
        for e in (i, j):
            model = load_model(f"file:{checkpoint_path(run, e)}")
            with torch.inference_mode():
                feats.append(Extractor(model, layers, include_output=True)(x))
        for name in layers + ["output"]:
            out[(name, i, j)] = linear_cka(feats[0][name], feats[1][name], unbiased=True)
    return out


def naive_drs(run: Path, k: int, triplets: torch.Tensor, resolution: int) -> dict[tuple[int, int], float]:
    out = {}
    for i, j in combinations(range(k), 2):
        a = load_model(f"file:{checkpoint_path(run, i)}")
        b = load_model(f"file:{checkpoint_path(run, j)}")
        out[(i, j)] = decision_region_similarity(a, b, triplets, resolution=resolution)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoints", type=int, default=8)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--triplets", type=int, default=10)
    ap.add_argument("--resolution", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (naive, fast, fast b=64, naive, ...)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    k, n = args.checkpoints, args.images
    pairs = k * (k - 1) // 2

    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp), k)
        layers = default_layers(load_model(f"file:{checkpoint_path(run, 0)}"))
        x = load_data(DATA, "test", images=n, seed=0).float()
        n = x.shape[0]
        print(f"narrow ResNet-18 on {DATA}: {k} checkpoints, {len(layers)} layers + output, {n} probe images, "
              f"{args.threads} threads, torch {torch.__version__}")
        trained = (f"trained by this script in seconds: checkpoint e = the weights after e short SGD epochs "
                   f"(lr 0.05, momentum 0.9, batch 64) on 512 {DATA} training images, seed 0; checkpoint 0 is "
                   f"the random init")
        common = {"model": f"{ARCH}, 10 classes", "checkpoints": k, "weights": trained, "pairs": pairs}
        notes = ("The same run is measured by both sides; sides timed in turn within each round. Checkpoints are "
                 "barely trained (a few epochs on a small digits subset): the timings do not depend on the weights; "
                 "the differences are between two computations of the same numbers.")

        # warm up imports and allocators on both paths
        dynamics(run, layers=layers[:1], epochs=[0, 1], images=n, batch_size=n, tables=("cka",))

        rec = Recorder("dynamics_cka", "CKA over training, naive per pair vs layerlab.dynamics", conditions={
            **common, "layers": f"{len(layers)} + output", "data": f"{DATA} test, {n} probe images",
            "naive": "per pair: reload both, re-extract, full-N unbiased linear CKA (float64)",
            "fast": "one pass per checkpoint, Grams in hooks; batch = N (same estimator) and b = 64",
            "rounds": args.rounds}, notes=notes)
        for _ in range(args.rounds):
            ref = rec.time("naive", lambda: naive_cka(run, k, layers, x))
            fast = rec.time("fast (batch = N)", lambda: dynamics(run, layers=layers, images=n, batch_size=n,
                                                                  tables=("cka",))["cka"])
            rec.time("fast (b = 64)", lambda: dynamics(run, layers=layers, images=n, batch_size=64, tables=("cka",)))
        got = {(r.layer, r.epoch_a, r.epoch_b): r.cka for r in fast.itertuples()}
        diff = max(abs(got[key] - v) for key, v in ref.items())
        r1 = rec.ratio("naive", "fast (batch = N)", label="speed-up naive / fast (batch = N, same estimator)")
        r2 = rec.ratio("naive", "fast (b = 64)", label="speed-up naive / fast (b = 64, the default)")
        rec.measure("values_compared", len(ref))
        rec.measure("max_abs_diff_naive_vs_fast_batchN", float(diff))
        rec.write()
        print("\nCKA over training (all layers, every checkpoint pair)")
        for side, r in (("fast (batch = N)", r1), ("fast (b = 64)", r2)):
            print(f"  naive / {side}: {r['median']:.2f}x [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]")
        print(f"  max |naive - fast| over {len(ref)} (layer, pair) values: {diff:.2e}")

        train = load_data(DATA, "train")
        trip = train.float()[sample_triplets(train.labels, args.triplets, seed=0)]
        rec = Recorder("dynamics_drs", "Decision-region similarity over training, naive per pair vs "
                       "layerlab.dynamics", conditions={
            **common, "planes": f"{args.triplets} triplet planes of {DATA} train images at "
                                f"{args.resolution}x{args.resolution}",
            "naive": "per pair: both networks over every plane again",
            "fast": "each checkpoint over the planes once", "rounds": args.rounds}, notes=notes)
        for _ in range(args.rounds):
            ref_drs = rec.time("naive", lambda: naive_drs(run, k, trip, args.resolution))
            fast_drs = rec.time("fast", lambda: dynamics(run, layers=["output"], triplets=args.triplets,
                                                         resolution=args.resolution, tables=("drs",))["drs"])
        got = {(r.epoch_a, r.epoch_b): r.drs for r in fast_drs.itertuples()}
        diff = max(abs(got[key] - v) for key, v in ref_drs.items())
        r = rec.ratio("naive", "fast", label="speed-up naive / fast")
        rec.measure("pairs_compared", len(ref_drs))
        rec.measure("max_abs_diff_naive_vs_fast", float(diff))
        rec.write()
        print(f"\nNetwork decision-region similarity ({args.triplets} planes at {args.resolution}x{args.resolution})")
        print(f"  naive / fast: {r['median']:.2f}x [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]; max |naive - fast|: {diff:.2e}")


if __name__ == "__main__":
    main()
