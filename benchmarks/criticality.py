"""Layer criticality, naive vs fast, side by side in one process on the same model and data.

naive: for every (layer, trial) the whole network runs over all images (what the reference code does).
fast:  per batch the input of every stage (stem modules, residual blocks, pool, head) is computed once with the
       original weights; a swap of layer l re-runs only from l's block on, and the T trials of a layer share that
       pass stacked along the batch (layerlab.criticality).

    python benchmarks/criticality.py                       # timm resnet18, 10 classes, 32x32 digits, 364 images, T=3
    python benchmarks/criticality.py --images 64 --trials 2 --threads 1
    python benchmarks/criticality.py --model file:layerlab-demo/zoo/baseline/final.pt   # a trained model, as it is

Each run writes benchmarks/records/criticality_<device>.json (record.py): the sides interleaved round by round,
the paired speed-up with its 95 % interval; ``python benchmarks/render.py`` puts it into RESULTS.md.

The default model is untrained (a full-width ResNet-18 has no trained digits checkpoint here; the demo zoo's are
narrow, see ``--model``); timm zero-initialises the last BatchNorm scale of every residual block, which
makes those blocks inert (criticality exactly 0 for their convolutions), and an untrained head gives near-uniform
softmax outputs (every criticality ~0). So the benchmark sets every BatchNorm scale to 1 (``--keep-zero-init``
leaves it) and multiplies the head's weights by ``--head-scale`` (20): every layer then moves confident outputs
and the comparison of the numbers means something. Timings on a shared machine vary; the load average is printed
with them.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from record import Recorder
from torch import nn

from layerlab import list_layers, load_data, load_model
from layerlab.criticality import criticality


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="timm:resnet18?num_classes=10", help="model spec")
    ap.add_argument("--data", default="digits", help="data spec (digits: 3x32x32, test split of 364 images)")
    ap.add_argument("--images", type=int, default=None, help="a seeded subset of this many images (default: all)")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (naive, fast, naive, ...)")
    ap.add_argument("--keep-zero-init", action="store_true", help="leave timm's zero-initialised BatchNorm scales")
    ap.add_argument("--head-scale", type=float, default=20.0, help="multiply the head's weights (confident outputs)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(1234)  # the model's own weights (trials draw from their own stream, layerlab.seeds)
    model = load_model(args.model, device=args.device)
    trained = args.model.startswith("file:")  # a trained checkpoint (e.g. the demo zoo's) is measured as it is
    with torch.no_grad():
        if not args.keep_zero_init and not trained:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                    m.weight.fill_(1.0)
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
        for m in head[: 0 if trained else 1]:
            m.weight.mul_(args.head_scale)
    data = load_data(args.data, "test", args.images, args.seed)
    n_layers = len(list_layers(model))
    params = sum(p.numel() for p in model.parameters())
    opts = dict(trials=args.trials, batch_size=args.batch_size, device=args.device, seed=args.seed)

    print(f"model   {args.model} ({params / 1e6:.1f}M parameters, {n_layers} Conv2d/Linear layers)")
    print(f"data    {args.data} test, {len(data)} images {'x'.join(map(str, data.shape))}; T = {args.trials} trials "
          f"-> {n_layers * args.trials} (layer, trial) jobs; batch {args.batch_size}")
    print(f"machine {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} before")

    criticality(model, data, layers=[list_layers(model)[-1].name], **{**opts, "trials": 1})  # warm-up (imports, kernels)
    rec = Recorder(
        f"criticality_{args.device.split(':')[0]}" + ("_trained" if trained else ""),
        "Layer criticality, naive vs fast", device=args.device, conditions={
            "model": args.model, "weights": "trained (a layerlab checkpoint)" if trained else (
                "untrained; BatchNorm scales set to 1" * (not args.keep_zero_init) + f", head x{args.head_scale:g}"),
            "parameters_M": round(params / 1e6, 2), "layers": n_layers, "data": f"{args.data} test, {len(data)} images",
            "trials": args.trials, "batch": args.batch_size, "rounds": args.rounds})
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    for _ in range(args.rounds):  # interleaved: naive, fast, naive, fast, ...
        naive = rec.time("naive", lambda: criticality(model, data, naive=True, **opts), sync)
        fast = rec.time("fast", lambda: criticality(model, data, **opts), sync)
    speed = rec.ratio("naive", "fast", target=2.0, label="speed-up naive / fast")

    diff = (fast["criticality"] - naive["criticality"]).abs().max()
    agree = (fast["agreement"] - naive["agreement"]).abs().max()
    jobs = len(fast)
    rec.measure("jobs", jobs)
    rec.measure("max_abs_difference_points", float(diff))
    rec.measure("mean_criticality", float(fast["criticality"].mean()))
    t_naive, t_fast = (float(np.median(rec.record["times"][k])) for k in ("naive", "fast"))
    print(f"naive   {t_naive:8.2f} s  ({t_naive / jobs * 1e3:.0f} ms per job; median of {args.rounds} rounds)")
    print(f"fast    {t_fast:8.2f} s  ({t_fast / jobs * 1e3:.0f} ms per job)")
    print(f"speed-up {speed['median']:.2f}x [{speed['ci'][0]:.2f}, {speed['ci'][1]:.2f}] (paired rounds)")
    print(f"max |criticality fast - naive| = {diff:.2e} points over {jobs} jobs; max |agreement diff| = {agree:.2e}")
    print(f"mean criticality {fast['criticality'].mean():.2f}% (naive {naive['criticality'].mean():.2f}%); "
          f"load average {os.getloadavg()[0]:.1f} after")
    rec.write()


if __name__ == "__main__":
    main()
