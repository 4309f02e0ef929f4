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
import tempfile
import time
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    k, n = args.checkpoints, args.images

    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp), k)
        layers = default_layers(load_model(f"file:{checkpoint_path(run, 0)}"))
        x = load_data(DATA, "test", images=n, seed=0).float()
        n = x.shape[0]
        print(f"narrow ResNet-18 on {DATA}: {k} checkpoints, {len(layers)} layers + output, {n} probe images, "
              f"{args.threads} threads, torch {torch.__version__}")

        # warm up imports and allocators on both paths
        dynamics(run, layers=layers[:1], epochs=[0, 1], images=n, batch_size=n, tables=("cka",))

        t0 = time.perf_counter()
        ref = naive_cka(run, k, layers, x)
        t_naive = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = dynamics(run, layers=layers, images=n, batch_size=n, tables=("cka",))["cka"]
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        dynamics(run, layers=layers, images=n, batch_size=64, tables=("cka",))
        t_mini = time.perf_counter() - t0
        got = {(r.layer, r.epoch_a, r.epoch_b): r.cka for r in fast.itertuples()}
        diff = max(abs(got[key] - v) for key, v in ref.items())
        pairs = k * (k - 1) // 2
        print("\nCKA over training (all layers, every checkpoint pair)")
        print(f"  naive  per pair: reload + re-extract + full-N unbiased CKA  {t_naive:8.2f} s  ({pairs} pairs)")
        print(f"  fast   one pass, Grams in hooks, batch = N (same estimator) {t_fast:8.2f} s  ratio {t_naive / t_fast:5.1f}x")
        print(f"  fast   one pass, minibatch b = 64 (the default)            {t_mini:8.2f} s  ratio {t_naive / t_mini:5.1f}x")
        print(f"  max |naive - fast| over {len(ref)} (layer, pair) values: {diff:.2e}")

        train = load_data(DATA, "train")
        trip = train.float()[sample_triplets(train.labels, args.triplets, seed=0)]
        t0 = time.perf_counter()
        ref_drs = naive_drs(run, k, trip, args.resolution)
        t_naive = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast_drs = dynamics(run, layers=["output"], triplets=args.triplets, resolution=args.resolution,
                            tables=("drs",))["drs"]
        t_fast = time.perf_counter() - t0
        got = {(r.epoch_a, r.epoch_b): r.drs for r in fast_drs.itertuples()}
        diff = max(abs(got[key] - v) for key, v in ref_drs.items())
        print(f"\nNetwork decision-region similarity ({args.triplets} planes at {args.resolution}x{args.resolution})")
        print(f"  naive  per pair: both networks over every plane again       {t_naive:8.2f} s  ({pairs} pairs)")
        print(f"  fast   each checkpoint over the planes once                 {t_fast:8.2f} s  ratio {t_naive / t_fast:5.1f}x")
        print(f"  max |naive - fast|: {diff:.2e}")


if __name__ == "__main__":
    main()
