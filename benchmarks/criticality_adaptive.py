"""Adaptive sampling (``--precision P``) against the fixed-N study at the same precision, on the demo zoo.

fixed:    every (model, layer, trial) evaluates all N images (the paper's protocol; N = the whole digits test split);
adaptive: a (model, layer, trial) stops once the half-width of its 95 % interval over images is below P points
          (layerlab.criticality.intervals.halfwidth), checked after every batch of ``--adaptive-batch`` images.

"At the same precision": the fixed study needs, for its worst (layer, trial), the most images any adaptive row
used (capped at N), so its forwards are that N times the rows. Both runs are timed side by side in one process on
the same trained models, and the largest difference between their per-(model, layer) estimates is printed next
to P. Forwards count the re-run suffix passes of swapped models, in images (the original forward, once per image,
is the same in both).

    python benchmarks/criticality_adaptive.py                          # the demo zoo (trained if absent), P = 1
    python benchmarks/criticality_adaptive.py --zoo layerlab-demo/zoo --precision 0.5 --threads 1
    python benchmarks/criticality_adaptive.py --split train             # 1,433 images: the models' training set
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from layerlab.criticality import criticality, summarize
from layerlab.criticality.intervals import MIN_IMAGES, Z95
from record import Recorder
from zoo import demo_zoo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", type=Path, default=Path("layerlab-demo/zoo"), help="a trained zoo (<model>/final.pt)")
    ap.add_argument("--split", default="test", help="digits split: test (364 images) or train (1,433: more room "
                    "for adaptive sampling to stop early)")
    ap.add_argument("--precision", type=float, default=1.0, help="target half-width in criticality points")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--adaptive-batch", type=int, default=32, help="images per check of the stopping rule")
    ap.add_argument("--batch-size", type=int, default=128, help="the fixed study's batch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (fixed, adaptive, fixed, ...)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    models = demo_zoo(args.zoo)
    opts = dict(data="digits", split=args.split, trials=args.trials)
    rec = Recorder(
        f"criticality_adaptive_{args.split}", f"Adaptive sampling (P = {args.precision:g}) vs fixed N, demo zoo, digits "
        f"{args.split}", conditions={
            "models": f"the demo zoo: {len(models)} trained narrow ResNet-18s (timm, channels 16-128), digits 32 px",
            "data": f"digits {args.split} split, all images", "trials": args.trials, "precision_points": args.precision,
            "adaptive_batch": args.adaptive_batch, "fixed_batch": args.batch_size, "rounds": args.rounds},
        notes="forwards = images through the re-run suffix of a swapped model (the original forward is the same in both)")
    for _ in range(args.rounds):  # interleaved: fixed, adaptive, fixed, adaptive, ...
        fixed = rec.time("fixed", lambda: criticality(models, batch_size=args.batch_size, **opts))
        adaptive = rec.time("adaptive", lambda: criticality(models, batch_size=args.adaptive_batch,
                                                             precision=args.precision, **opts))
    wall = rec.ratio("fixed", "adaptive", label="wall time fixed / adaptive")

    n = int(fixed["images"].max())
    rows = len(adaptive)
    used = int(adaptive["images"].sum())
    needed = min(n, int(adaptive["images"].max()))
    reached = adaptive["images"] < n
    sf, sa = summarize(fixed), summarize(adaptive)
    diff = (sf["criticality"] - sa["criticality"]).abs()
    # Projection (not a measurement): with a larger evaluation set, the images each row needs for +-P from its
    # per-image spread measured here, n_r = (100 * 1.96 * sd_r / P)^2; a fixed study needs the largest n_r for all.
    sd = fixed["per_image"].map(lambda v: float(np.std(v, ddof=1)))
    need = np.maximum(MIN_IMAGES, np.ceil((100 * Z95 * sd / args.precision) ** 2)).astype(int)
    for key, value in {"images": n, "rows": rows, "rows_reaching_target": int(reached.sum()),
                       "forwards_fixed": needed * rows, "forwards_adaptive": used,
                       "forwards_ratio": needed * rows / used, "largest_difference_points": float(diff.max()),
                       "projected_fixed_images": int(need.max()), "projected_forwards_ratio": float(need.max() * rows / need.sum()),
                       "forwards_target": 3.0, "forwards_target_met": bool(needed * rows / used >= 3.0)}.items():
        rec.measure(key, value)
    print(f"demo zoo: {len(models)} models, {rows // args.trials // len(models)} layers, T={args.trials}, N={n} digits "
          f"{args.split} images, P={args.precision:g} points; load average {os.getloadavg()[0]:.2f}, {args.threads} thread(s)")
    print(f"rows that reached +-{args.precision:g} before N: {int(reached.sum())} of {rows} "
          f"(the others used all {n} images)")
    print(f"forwards (suffix passes, images): fixed N={n} {n * rows}, fixed at the same precision N={needed} "
          f"{needed * rows}, adaptive {used}; ratio {needed * rows / used:.2f}x (vs N={n}: {n * rows / used:.2f}x)")
    print(f"wall time over {args.rounds} interleaved rounds: fixed {np.median(rec.record['times']['fixed']):.1f} s, "
          f"adaptive {np.median(rec.record['times']['adaptive']):.1f} s (medians); ratio {wall['median']:.2f}x "
          f"[{wall['ci'][0]:.2f}, {wall['ci'][1]:.2f}]")
    print(f"largest |fixed - adaptive| per (model, layer): {diff.max():.2f} points (median {diff.median():.3f}); "
          f"largest fixed-N half-width: {((sf['ci_high'] - sf['ci_low']) / 2).max():.2f} points")
    print(f"projected with enough images for every row: fixed N={need.max()} x {rows} rows, adaptive "
          f"{int(need.sum())} images; ratio {need.max() * rows / need.sum():.1f}x "
          f"(rows needing <= {n} images: {int((need <= n).sum())} of {rows})")
    per_layer = adaptive.groupby("label", sort=False)["images"].mean().round(0).astype(int)
    print("mean images per layer (adaptive):", ", ".join(f"{k} {v}" for k, v in per_layer.items()))
    rec.write()


if __name__ == "__main__":
    main()
