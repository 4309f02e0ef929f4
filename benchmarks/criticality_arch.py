"""Layer criticality per architecture: naive vs fast, and the ceiling that suffix-only work allows.

For each architecture the same criticality job (every Conv2d/Linear layer, T trials, the same images) runs
three ways:

naive:   ``criticality(..., naive=True)``: the whole network over all images for every (layer, trial).
fast:    the default: per batch the input of every stage of the model's chain (:func:`layerlab.structure.stage_chain`,
         checked by ``Pipeline.validate``) is computed once; a swap of layer l re-runs only from l's stage on, the
         T trials of a layer stacked along the batch.
ceiling: what suffix-only work allows at best, computed from timed stage costs c_i (each stage of
         ``Pipeline.stages`` timed over all images; per stage the fastest of ``--stage-reps`` passes after a
         warm-up pass, as other jobs on a shared machine only ever add time):

             naive_model   = layers * T * sum_i c_i
             ceiling_model = sum over layers l of T * sum_{i >= stage(l)} c_i  +  sum_i c_i  (one full trace)
             ceiling speed-up = naive_model / ceiling_model

         It leaves out every overhead (validation pass, statistics, parameter dicts) and what stacking the trials
         saves, so the measured speed-up can come near it but is not bounded by it exactly.

Naive and fast are interleaved round by round (``--rounds``; the order alternates between rounds); the table shows
the median time of each, the median of the per-round paired ratios naive/fast and their min and max.

    python benchmarks/criticality_arch.py               # all eleven, 128 images, T = 2, 3 rounds, 1 thread (~25 min)
    python benchmarks/criticality_arch.py --archs vit,sequential --images 64 --rounds 1
    python benchmarks/criticality_arch.py --archs resnet18,vit,convnext_atto,tv_mobilenet_v2 --rounds 2

Each architecture writes a record ``benchmarks/records/criticality_arch_<arch>.json`` (record.py): naive and fast
as interleaved rounds, the paired speed-up naive/fast with its median and 95 % bootstrap interval, the ceiling and
the other figures as measures; ``python benchmarks/render.py`` puts the records into RESULTS.md.

The models are untrained (nothing is downloaded). To make criticality mean something (an untrained head gives
near-uniform softmax outputs, so every criticality would be ~0, and fast and naive would agree trivially), every
BatchNorm scale is set to 1 (timm zero-initialises the last one of each residual block, which makes the block
inert) and its running statistics are measured on the benchmark images (one pass in train mode: without it an
untrained net's features hardly vary between images), every layer-scale ``gamma`` is set to 1 (timm ConvNeXt
initialises it to 1e-6), and the head (the last Linear) is replaced by a ridge-regression fit of its standardised
input features to ``--target`` * (one-hot - 1/classes) on the benchmark images themselves: confident, mostly
correct outputs that a swapped layer can move. Normalisation layers are never swapped, so all of this holds for
every trial. The timings hardly depend on the weights.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from record import Recorder
from torch import nn

from layerlab import load_data, load_model
from layerlab.criticality import Pipeline, criticality, units_of
from layerlab.data import ImageData
from layerlab.runtime import eval_mode

VIT = "timm:vit_tiny_patch16_224?img_size=32&patch_size=4&depth=6&num_classes=10"
SWIN = "timm:swin_tiny_patch4_window7_224?img_size=32&window_size=4&num_classes=10"  # stages at 8, 4, 2, 1 px


def sequential() -> nn.Module:
    """A hand-written plain nn.Sequential CNN for 3x32x32 inputs, 10 classes."""

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32, 1), *block(32, 64, 2), *block(64, 64, 1), *block(64, 128, 2), *block(128, 128, 1),
        *block(128, 256, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def tv_vit() -> nn.Module:
    """torchvision's VisionTransformer at the timm ViT's geometry (32 px, patch 4, 6 layers, width 192, 3 heads)."""
    import torchvision

    return torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=6, num_heads=3, hidden_dim=192,
                                                mlp_dim=768, num_classes=10)


def _spec(spec: str) -> tuple[str, Callable[[], nn.Module], None]:
    """An architecture given by its layerlab spec (which also builds the fresh instances)."""
    return spec, lambda: load_model(spec), None


# name -> (what it is, builder of the model, fresh= callable or None: the spec builds the fresh instances)
ARCHS: dict[str, tuple[str, Callable[[], nn.Module], Callable[[], nn.Module] | None]] = {
    "resnet18": _spec("timm:resnet18?num_classes=10"),
    "vit": _spec(VIT),
    "convnext_atto": _spec("timm:convnext_atto?num_classes=10"),
    "efficientnet_b0": _spec("timm:efficientnet_b0?num_classes=10"),
    "swin": _spec(SWIN),
    "regnetx_002": _spec("timm:regnetx_002?num_classes=10"),
    "tv_resnet18": _spec("torchvision:resnet18?num_classes=10"),
    "tv_vit": ("torchvision VisionTransformer (32 px, patch 4, 6 layers, width 192, 3 heads, mlp 768)", tv_vit, tv_vit),
    "tv_mobilenet_v2": _spec("torchvision:mobilenet_v2?num_classes=10"),
    "tv_densenet121": _spec("torchvision:densenet121?num_classes=10"),
    "sequential": ("hand-written nn.Sequential (6 conv-BN-ReLU, pool, 2 Linear)", sequential, sequential),
}


@torch.no_grad()
def make_confident(model: nn.Module, data: ImageData, target: float, batch_size: int) -> str:
    """BatchNorm scales and layer-scale gammas to 1, BatchNorm statistics from the images, then the head refit by
    ridge regression (see the module docstring). Returns what was done, in words."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        if m.weight is not None:
            m.weight.fill_(1.0)
    gamma = 0
    for name, p in model.named_parameters():
        if name.split(".")[-1] == "gamma":
            p.fill_(1.0)
            gamma += 1
    if bns:  # running statistics = the average of the batch statistics over one pass (momentum None)
        flags = [(m, m.training) for m in model.modules()]
        saved = [(m, m.momentum) for m in bns]
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for x, _ in data.batches(batch_size):
            model(x)
        for m, momentum in saved:
            m.momentum = momentum
        for m, flag in flags:
            m.training = flag
    head_name, head = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    feats: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0].detach().flatten(1).double()))
    with eval_mode(model):
        for x, _ in data.batches(batch_size):
            model(x)
    hook.remove()
    x = torch.cat(feats)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-12)
    z = torch.cat([(x - mu) / sd, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # standardised features, bias column
    classes = head.out_features
    y = target * (nn.functional.one_hot(data.labels, classes).double() - 1.0 / classes)
    lam = 1e-1 * len(x)  # the standardised Gram's diagonal is ~N
    w = torch.linalg.solve(z.T @ z + lam * torch.eye(z.shape[1], dtype=z.dtype), z.T @ y)  # [d + 1, classes]
    weight = w[:-1] / sd[:, None]
    head.weight.copy_(weight.T.to(head.weight.dtype))
    bias = w[-1] - mu @ weight
    if head.bias is not None:
        head.bias.copy_(bias.to(head.bias.dtype))
    with eval_mode(model):
        logits = torch.cat([model(xb) for xb, _ in data.batches(batch_size)])
    acc = float((logits.argmax(1) == data.labels).float().mean())
    conf = float(logits.softmax(1).max(1).values.mean())
    return (f"{len(bns)} BatchNorms: scale 1, running statistics from these images; {gamma} layer-scale gammas -> 1; "
            f"head {head_name!r} ridge-fit (standardised features, lambda = 0.1 N) to {target:g} x (one-hot - "
            f"1/{classes}) on these images: accuracy {acc:.3f}, mean max-softmax {conf:.3f}")


@torch.no_grad()
def stage_costs(model: nn.Module, data: ImageData, batch_size: int, reps: int) -> tuple[list[float], Pipeline]:
    """Seconds per stage of the validated chain over all images (per stage the fastest of ``reps`` passes after a
    warm-up pass)."""
    pipe = Pipeline(model, torch.device("cpu"), amp=False, channels_last=False)
    with eval_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fallback shows as a 1-stage chain in the table
        first = next(iter(data.batches(batch_size)))[0]
        pipe.validate(pipe.input(first), "benchmark")
        times: list[list[float]] = []
        for rep in range(reps + 1):
            per = [0.0] * len(pipe.stages)
            for x, _ in data.batches(batch_size):
                with pipe.autocast():
                    y = pipe.input(x)
                    for i in range(len(pipe.stages)):
                        t0 = time.perf_counter()
                        y = pipe.stage(i, y)
                        per[i] += time.perf_counter() - t0
            if rep:  # the first pass warms up
                times.append(per)
    return [min(t[i] for t in times) for i in range(len(pipe.stages))], pipe


@dataclass
class Row:
    arch: str
    params: float
    layers: int
    stages: int
    fell_back: bool
    naive: list[float]
    fast: list[float]
    ceiling: float
    diff: float
    mean_crit: float
    detail: str
    weights: str = ""
    costs: tuple[float, ...] = ()
    started: tuple[str, float] = ("", 0.0)  # when the timed rounds began, and the load average then


def bench(arch: str, data: ImageData, args: argparse.Namespace) -> Row:
    what, build, fresh = ARCHS[arch]
    torch.manual_seed(1234)  # the model's own weights (trials draw from their own stream, layerlab.seeds)
    model = build().eval()
    detail = make_confident(model, data, args.target, args.batch_size)
    n_params = sum(p.numel() for p in model.parameters())
    units = units_of(model)
    opts = {"trials": args.trials, "batch_size": args.batch_size, "device": "cpu", "seed": args.seed, "fresh": fresh}

    costs, pipe = stage_costs(model, data, args.batch_size, args.stage_reps)
    full = sum(costs)
    starts = [min(pipe.stage_of(p) for p in u.params) if len(pipe.stages) > 1 else 0 for u in units]
    naive_model = len(units) * args.trials * full
    ceiling_model = sum(args.trials * sum(costs[s:]) for s in starts) + full
    ceiling = naive_model / ceiling_model

    fell_back = len(pipe.stages) == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        last = [units[-1].name]
        criticality(model, data, layers=last, naive=True, **{**opts, "trials": 1})  # warm-up (kernels, fresh draws)
        criticality(model, data, layers=last, **{**opts, "trials": 1})
        started = (time.strftime("%Y-%m-%d %H:%M:%S"), os.getloadavg()[0])
        t_naive: list[float] = []
        t_fast: list[float] = []
        diff = 0.0
        for r in range(args.rounds):
            tables = {}
            for way in (("naive", "fast") if r % 2 == 0 else ("fast", "naive")):
                t0 = time.perf_counter()
                tables[way] = criticality(model, data, naive=way == "naive", **opts)
                (t_naive if way == "naive" else t_fast).append(time.perf_counter() - t0)
            a, b = tables["fast"], tables["naive"]
            assert list(a["layer"]) == list(b["layer"]) and list(a["trial"]) == list(b["trial"])
            diff = max(diff, float((a["criticality"] - b["criticality"]).abs().max()))
    fell_back = fell_back or any("falling back" in str(w.message) for w in caught)
    mean_crit = float(tables["fast"]["criticality"].mean())
    worst = tables["fast"].sort_values("criticality").iloc[[0, -1]]
    weights = detail
    detail += (f"; mean criticality {mean_crit:.2f}% (min {worst['criticality'].iloc[0]:.2f}% at "
               f"{worst['label'].iloc[0]}, max {worst['criticality'].iloc[1]:.2f}% at {worst['label'].iloc[1]}); "
               f"stage costs (ms, all images) {', '.join(f'{c * 1e3:.1f}' for c in costs)}")
    return Row(arch, n_params / 1e6, len(units), len(pipe.stages), fell_back, t_naive, t_fast, ceiling, diff,
               mean_crit, f"{arch}: {what}\n    {detail}", weights, tuple(costs), started)


def write_record(r: Row, data: ImageData, args: argparse.Namespace) -> None:
    """``records/criticality_arch_<arch>.json``: the interleaved rounds, the paired speed-up, the ceiling."""
    rec = Recorder(f"criticality_arch_{r.arch}", f"Layer criticality per architecture: {r.arch}, naive vs fast",
                   conditions={
                       "model": ARCHS[r.arch][0],
                       "weights": "untrained (torch.manual_seed(1234) init), made confident: " + r.weights,
                       "parameters_M": round(r.params, 2), "layers": r.layers,
                       "stages": f"{r.stages}" + (" (fell back to full forwards)" if r.fell_back else ""),
                       "data": f"digits test, {len(data)} seeded images, {'x'.join(map(str, data.shape))}",
                       "trials": args.trials, "batch": args.batch_size,
                       "rounds": f"{args.rounds}, order alternating (naive first in even rounds)"})
    rec.record["started"], rec.record["load_before"] = r.started
    rec.record["times"] = {"naive": list(r.naive), "fast": list(r.fast)}
    rec.ratio("naive", "fast", label="speed-up naive / fast")
    rec.measure("ceiling speed-up (stage-cost model)", r.ceiling)
    rec.measure("stage costs ms (all images, fastest of --stage-reps)", ", ".join(f"{c * 1e3:.1f}" for c in r.costs))
    rec.measure("max_abs_difference_points", r.diff)
    rec.measure("mean_criticality", r.mean_crit)
    rec.write()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated subset of {', '.join(ARCHS)}")
    ap.add_argument("--images", type=int, default=128, help="a seeded subset of the digits test split (364 images)")
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved naive/fast rounds per architecture")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--stage-reps", type=int, default=5, help="timed passes per stage for the ceiling (fastest)")
    ap.add_argument("--target", type=float, default=8.0, help="head fit target scale (logit margin)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-record", action="store_true", help="print only; write no record")
    args = ap.parse_args()
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    if unknown := [a for a in archs if a not in ARCHS]:
        ap.error(f"unknown architecture(s) {unknown}; choose from {', '.join(ARCHS)}")

    torch.set_num_threads(args.threads)
    data = load_data("digits", "test", args.images, args.seed)
    load_before = os.getloadavg()
    print(f"data    digits test, {len(data)} images {'x'.join(map(str, data.shape))}; T = {args.trials} trials; "
          f"batch {args.batch_size}; {args.rounds} interleaved rounds")
    print(f"machine cpu, torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {load_before[0]:.2f} before", flush=True)
    t_all = time.perf_counter()
    rows = []
    for arch in archs:
        row = bench(arch, data, args)
        print(row.detail, flush=True)
        rows.append(row)
        if not args.no_record:
            write_record(row, data, args)
    load_after = os.getloadavg()

    print()
    print("| architecture | params | layers | stages | naive s | fast s | speed-up (median [min, max]) "
          "| ceiling | max abs diff | mean crit. |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratios = [n / f for n, f in zip(r.naive, r.fast)]
        stages = f"{r.stages}" + (" (fell back)" if r.fell_back else "")
        print(f"| {r.arch} | {r.params:.2f} M | {r.layers} | {stages} | {statistics.median(r.naive):.2f} | "
              f"{statistics.median(r.fast):.2f} | **{statistics.median(ratios):.2f}x** [{min(ratios):.2f}, "
              f"{max(ratios):.2f}] | {r.ceiling:.2f}x | {r.diff:.1e} | {r.mean_crit:.1f}% |")
    print()
    print(f"machine cpu, torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; {time.perf_counter() - t_all:.0f} s")
    bad = [r.arch for r in rows if r.diff > 1e-4]
    back = [r.arch for r in rows if r.fell_back]
    print(f"fast vs naive beyond 1e-4 points: {', '.join(bad) or 'none'}; chain fell back: {', '.join(back) or 'none'}")


if __name__ == "__main__":
    main()
