"""Benchmark: the cached STIR grid vs the uncached per-pair way, side by side on the same models and images.

The per-pair way is how the STIR reference code is driven for a layer grid: for every (reference layer i,
evaluated layer j) it inverts the reference model's layer i again and then evaluates layer j (4 L^2 inversions for
the four grids ft|pt, pt|ft, pt|pt, ft|ft). ``invariance_grid`` inverts each (model, layer) once and evaluates
every j on it (2 L inversions). Both must give the same STIR values (max abs diff printed: a cache-consistency
check, since both are layerlab), and the time ratio is the speed-up. The models are random-init (a trained pair
is not needed for timing: the inversion's cost does not depend on the weights). Writes
benchmarks/records/invariance_grid.json.

    .venv/bin/python benchmarks/invariance.py [--images 64] [--steps 30] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import numpy as np
import torch
from record import Recorder

from layerlab import load_data, load_model
from layerlab.invariance import invariance_grid, invert, stir

ARCH = "timm:resnet18?channels=16,32,64,128&stem_width=8&stem_type=deep&in_chans=1&num_classes=5"
DATA = "digits?size=16&channels=1&classes=5-9"
LAYERS = ["conv1", "layer1", "layer3", "fc"]


def perturbed(model: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    """A stand-in for the finetuned model: the same weights moved by seeded noise (no training needed)."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=gen))
    return other


def per_pair(models: dict[str, torch.nn.Module], X: torch.Tensor, steps: int) -> tuple[dict, int]:
    out, inversions = {}, 0
    for ref in models:
        for ev in models:
            for i, li in enumerate(LAYERS):
                for j, lj in enumerate(LAYERS):
                    x_inv, _ = invert(models[ref], li, X, steps=steps)  # re-inverted for every pair
                    inversions += 1
                    out[(ref, ev, i, j)] = stir(models[ev], lj, X, x_inv)
    return out, inversions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (cached, per pair, ...)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pt = load_model(ARCH)
    models = {"pretrained": pt, "finetuned": perturbed(pt)}
    X = load_data(DATA, "test", images=args.images, seed=0).float()
    L = len(LAYERS)
    print(f"models: {ARCH} and a perturbed copy; {args.images} images of {DATA}; layers {LAYERS}; "
          f"{args.steps} steps; torch threads {args.threads}")

    rec = Recorder("invariance_grid", "STIR grid, cached vs per pair", conditions={
        "models": f"{ARCH}, random init, and a seeded perturbation of it (a stand-in for a finetuned model)",
        "data": f"{args.images} images of {DATA}", "layers": ", ".join(LAYERS), "steps": args.steps,
        "rounds": args.rounds}, notes=(
        "max_abs_difference compares the cached grid with the per-pair way, both layerlab: a cache-consistency "
        "check, not accuracy; STIR's accuracy is tested against its definition in tests/test_invariance.py "
        "(STIR of a model with itself -> 1 as the inversion converges, invariance to orthogonal rotations, the "
        "noise floor = STIR of the zero-step inversion)"))
    for _ in range(args.rounds):  # interleaved: cached, per pair, cached, per pair, ...
        res = rec.time("cached grid", lambda: invariance_grid(pt, models["finetuned"], data=X, layers=LAYERS,
                                                              images=None, steps=args.steps))
        naive, n_naive = rec.time("per pair", lambda: per_pair(models, X, args.steps))
    speed = rec.ratio("per pair", "cached grid", label="speed-up per pair / cached")
    g = res["grid"]
    g = g[g["metric"] == "stir"]
    cached = {(r.reference, r.evaluated, r.ref_index, r.eval_index): r.value for r in g.itertuples()}
    diff = max(abs(cached[k] - v) for k, v in naive.items())
    rec.measure("inversions_cached", 2 * L)
    rec.measure("inversions_per_pair", n_naive)
    rec.measure("stir_values_compared", len(naive))
    rec.measure("max_abs_difference", float(diff))
    cached_s, naive_s = (float(np.median(rec.record["times"][k])) for k in ("cached grid", "per pair"))
    print(f"{'way':<24}{'inversions':>11}{'wall s (median)':>17}")
    print(f"{'cached grid':<24}{2 * L:>11}{cached_s:>17.2f}")
    print(f"{'per pair (uncached)':<24}{n_naive:>11}{naive_s:>17.2f}")
    print(f"STIR values compared: {len(naive)}; max abs diff {diff:.3g} (cache consistency, not accuracy)")
    print(f"speed-up (per pair / cached): {speed['median']:.1f}x [{speed['ci'][0]:.1f}, {speed['ci'][1]:.1f}]")
    ok = np.isfinite(diff) and diff < 1e-9
    print("same result" if ok else "RESULTS DIFFER")
    rec.write()


if __name__ == "__main__":
    main()
