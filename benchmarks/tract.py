"""TrAct benchmark (a): per-step training overhead and gradient agreement with the reference package.

Times one SGD training step (forward, cross-entropy, backward, optimiser step) for vanilla training,
``layerlab.tract`` and, when installed, the authors' reference package ``torch-tract`` (import name
``torch_tract``; Petersen et al. 2024, https://github.com/Felix-Petersen/tract), on a CIFAR-size timm
ResNet-18 (ImageNet stem, 32x32 input) and a small timm ViT (patch 4, dim 64, depth 2). Variants are
interleaved (one step of each per repetition, rotating their order) and the median of ``--steps`` steps after
warm-up is reported, so slow drifts of a shared machine hit all variants alike.

Each model writes a record ``benchmarks/records/tract_<model>.json`` (``tract_<model>_cuda`` on a GPU; see
record.py): every timed step of every variant is one interleaved round, with the paired per-round ratios
layerlab/vanilla, torch-tract/vanilla and torch-tract/layerlab, each with its median and 95 % bootstrap interval.
The target "layerlab no slower than torch-tract" (torch-tract / layerlab >= 1) is met only when the interval's low
end clears 1; an interval that straddles 1 means the difference is not resolved at this noise. The models are
untrained (seeded random init) and fed random inputs and labels: the cost of a step does not depend on the weights'
values. ``python benchmarks/render.py`` puts the records into RESULTS.md.

It also compares the first-layer weight gradient of layerlab and torch-tract on the same layer and batch in
float32 (relative max error, threshold 1e-5).

    pip install --no-deps torch-tract          # benchmark extra only, never a runtime dependency
    python benchmarks/tract.py --threads 2 --steps 30
    python benchmarks/tract.py --device cuda    # bf16 autocast + channels_last
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import timm
import torch
import torch.nn.functional as F
from record import Recorder
from torch import nn

import layerlab.tract as tract

try:  # the reference implementation, optional
    import torch_tract
except ImportError:  # pragma: no cover - depends on the environment
    torch_tract = None

MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "resnet18": (lambda: timm.create_model("resnet18", num_classes=10), "conv1"),
    "vit": (
        lambda: timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=10
        ),
        "patch_embed.proj",
    ),
}


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def make_variants(name: str, lam: float, device: torch.device, channels_last: bool) -> dict[str, nn.Module]:
    """Vanilla, layerlab and (if installed) torch-tract copies of one model with identical initial weights."""
    factory, stem = MODELS[name]
    torch.manual_seed(0)
    base = factory()
    variants = {"vanilla": copy.deepcopy(base), "layerlab": tract.apply(copy.deepcopy(base), lam=lam)}
    if torch_tract is not None:
        ref = copy.deepcopy(base)
        _set_submodule(ref, stem, torch_tract.TrAct(ref.get_submodule(stem), l=lam))
        variants["torch-tract"] = ref
    for model in variants.values():
        model.to(device).train()
        if channels_last:
            model.to(memory_format=torch.channels_last)
    return variants


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_models(
    variants: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor | None, steps: int, warmup: int, amp: bool,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] = F.cross_entropy,
) -> dict[str, list[tuple[float, float]] | str]:
    """Interleaved per-step (wall, process CPU) times in ms, or the error text of a variant that cannot train.

    CPU time counts all torch threads; on a machine shared with other processes it is the steadier figure.
    """
    device = x.device
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in variants.items()}

    def step(key: str) -> tuple[float, float]:
        model, opt = variants[key], opts[key]
        _sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        _sync(device)
        return (time.perf_counter() - start) * 1e3, (time.process_time() - cpu) * 1e3

    results: dict[str, list[tuple[float, float]] | str] = {}
    for key in variants:
        try:
            for _ in range(warmup):
                step(key)
            results[key] = []
        except Exception as err:  # e.g. the reference code under bf16 autocast
            results[key] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:60]}"
    live = [k for k, v in results.items() if isinstance(v, list)]
    for rep in range(steps):
        shift = rep % len(live)
        for key in live[shift:] + live[:shift]:
            results[key].append(step(key))  # type: ignore[union-attr]
    return results


def time_stems(name: str, lam: float, x: torch.Tensor, steps: int, warmup: int, amp: bool) -> dict[str, Any]:
    """Interleaved (wall, CPU) ms of forward + backward + SGD step of the stem layer alone, per variant."""
    factory, stem = MODELS[name]
    torch.manual_seed(0)
    layer = factory().get_submodule(stem).to(x.device)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        layer.to(memory_format=torch.channels_last)
    variants = {"vanilla": copy.deepcopy(layer), "layerlab": tract.TrAct(copy.deepcopy(layer), lam)}
    if torch_tract is not None:
        variants["torch-tract"] = torch_tract.TrAct(copy.deepcopy(layer), l=lam)
    with torch.no_grad():
        g = torch.randn_like(layer(x)) / x.shape[0]

    # cross_entropy is replaced by <out, g>: same backward work through the layer, nothing else.
    return time_models(variants, x, None, steps, warmup, amp, loss_fn=lambda out, _y: (out.float() * g).sum())


def _first_layer_grad(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    out = layer(x)
    (grad,) = torch.autograd.grad(out, [layer.weight], g)
    return grad


def grad_agreement(lam: float, device: torch.device, batch: int) -> list[tuple[str, str]]:
    """Relative max difference of the weight gradient, layerlab vs torch-tract, on identical layers/batches."""
    if torch_tract is None:
        return [("(torch-tract not installed)", "skipped")]
    torch.manual_seed(0)
    cases: list[tuple[str, nn.Module, torch.Tensor]] = []
    for name, (factory, stem) in MODELS.items():
        layer = factory().get_submodule(stem)
        cases.append((f"{name} {stem}, batch {batch}", layer, torch.randn(batch, 3, 32, 32)))
    cases.append(("conv 7x7/2 b < n (batch 1, 8x8)", nn.Conv2d(3, 16, 7, 2, 3), torch.randn(1, 3, 8, 8)))
    cases.append(("linear 2-D [512, 48]", nn.Linear(48, 32), torch.randn(512, 48)))
    cases.append(("linear 2-D b < n [20, 48]", nn.Linear(48, 32), torch.randn(20, 48)))
    rows = []
    for label, layer, x in cases:
        layer, x = layer.to(device).float(), x.to(device)
        ours, theirs = tract.TrAct(copy.deepcopy(layer), lam), torch_tract.TrAct(copy.deepcopy(layer), l=lam)
        g = torch.randn_like(layer(x))
        try:
            a, b = _first_layer_grad(ours, x, g), _first_layer_grad(theirs, x, g)
            rel = ((a - b).abs().max() / b.abs().max()).item()
            rows.append((label, f"{rel:.2e} {'ok' if rel <= 1e-5 else 'MISMATCH'}"))
        except Exception as err:
            rows.append((label, f"torch-tract failed: {type(err).__name__}"))
    # A 3-D non-contiguous Linear input (ViT-style tokens): supported by layerlab, see METHODS.md section 3.
    lin, xt = nn.Linear(48, 32).to(device), torch.randn(64, 8, 48, device=device).transpose(0, 1)
    g = torch.randn(8, 64, 32, device=device)
    try:
        a = _first_layer_grad(tract.TrAct(copy.deepcopy(lin), lam), xt, g)
        b = _first_layer_grad(torch_tract.TrAct(copy.deepcopy(lin), l=lam), xt, g)
        rel = ((a - b).abs().max() / b.abs().max()).item()
        rows.append(("linear 3-D non-contiguous", f"{rel:.2e} {'ok' if rel <= 1e-5 else 'MISMATCH'}"))
    except Exception as err:
        rows.append(("linear 3-D non-contiguous", f"torch-tract failed: {type(err).__name__}"))
    return rows


def _rows(name: str, res: dict[str, Any]) -> list[tuple[str, ...]]:
    """Table rows for one timing result: median/min/IQR wall ms, ratios to vanilla, median CPU ms and ratio.

    "paired" is the median over repetitions of (variant step / vanilla step of the same repetition): the steps
    of one repetition are adjacent in time, so this ratio is the one least moved by other processes' load.
    """
    vanilla = res["vanilla"]
    base_wall = statistics.median(t[0] for t in vanilla)
    base_cpu = statistics.median(t[1] for t in vanilla)
    rows: list[tuple[str, ...]] = []
    for key, times in res.items():
        if isinstance(times, str):
            rows.append((name, key, times))
            continue
        wall, cpu = [t[0] for t in times], [t[1] for t in times]
        q = statistics.quantiles(wall, n=4) if len(wall) > 1 else [wall[0]] * 3
        med, med_cpu = statistics.median(wall), statistics.median(cpu)
        paired = statistics.median(t[0] / v[0] for t, v in zip(times, vanilla))
        rows.append((
            name, key, f"{med:.1f}", f"{min(wall):.1f}", f"{q[0]:.0f}-{q[2]:.0f}", f"{med / base_wall:.3f}",
            f"{paired:.3f}", f"{med_cpu:.1f}", f"{med_cpu / base_cpu:.3f}",
        ))
    return rows


def _ref_version() -> str | None:
    """torch-tract's version (from its package metadata), or None when it is not importable."""
    if torch_tract is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-tract")
    except PackageNotFoundError:
        return getattr(torch_tract, "__version__", "installed")


def _record(name: str, res: dict[str, Any], stem_res: dict[str, Any], args: argparse.Namespace,
            device: torch.device, amp: bool, started: tuple[str, float], grads: list[tuple[str, str]]) -> None:
    """One record per model: per-step wall times of every variant as interleaved rounds, and the paired ratios."""
    _, stem = MODELS[name]
    live = {k: v for k, v in res.items() if isinstance(v, list)}
    ref_version = _ref_version()
    rec = Recorder(
        f"tract_{name}" + ("_cuda" if device.type == "cuda" else "")
        + (f"_t{torch.get_num_threads()}" if device.type == "cpu" and torch.get_num_threads() > 1 else ""),
        f"TrAct training-step overhead, {name}",
        device=str(device), conditions={
            "model": {"resnet18": "timm resnet18, 10 classes, 32x32 input (ImageNet stem)",
                      "vit": "timm vit_tiny_patch16_224 at img 32, patch 4, dim 64, depth 2, 2 heads, 10 classes"}[name],
            "TrAct layer": stem, "lambda": args.lam,
            "weights": "untrained (seeded random init, identical for every variant): a step's cost does not depend "
                       "on the weights' values",
            "data": f"random inputs N(0, 1) [{args.batch}, 3, 32, 32], random labels",
            "step": "forward, cross-entropy, backward, SGD (lr 0.01, momentum 0.9)",
            "amp bf16 + channels_last": amp, "warm-up steps": args.warmup,
            "torch-tract": ref_version or "not installed",
            "rounds": "one step of each variant per round, order rotating"})
    rec.record["started"], rec.record["load_before"] = started
    for key, times in live.items():
        rec.record["times"][key] = [t[0] / 1e3 for t in times]  # wall seconds per step, one per round
        rec.measure(f"{key}: median CPU ms/step (all threads)", statistics.median(t[1] for t in times))
    for key, text in res.items():
        if isinstance(text, str):
            rec.measure(f"{key}: whole step", text)
    if "layerlab" in live:
        rec.ratio("layerlab", "vanilla", label="layerlab TrAct / vanilla (overhead)")
    verdict = ""
    if "torch-tract" in live:
        rec.ratio("torch-tract", "vanilla", label="torch-tract / vanilla (overhead)")
        r = rec.ratio("torch-tract", "layerlab", target=1.0,
                      label="torch-tract / layerlab (layerlab no slower: >= 1)")
        lo, hi = r["ci"]
        verdict = ("torch-tract / layerlab: the interval clears 1, layerlab is no slower" if lo >= 1.0 else
                   "torch-tract / layerlab: the interval lies below 1, layerlab is slower here" if hi < 1.0 else
                   f"torch-tract / layerlab: the interval [{lo:.3f}, {hi:.3f}] contains 1, so 'not met' means not "
                   "resolved at this noise (neither is shown slower)")
    for key, times in stem_res.items():  # the TrAct layer alone (forward, <out, g>, backward, SGD step)
        if isinstance(times, str):
            rec.measure(f"stem only, {key}", times)
            continue
        rec.measure(f"stem only, {key}: median ms", statistics.median(t[0] for t in times))
        if key != "vanilla" and isinstance(stem_res.get("vanilla"), list):
            rec.measure(f"stem only, {key} / vanilla: paired median",
                        statistics.median(t[0] / v[0] for t, v in zip(times, stem_res["vanilla"])))
    for r in rec.record["ratios"]:  # the rendered table rounds to 2 decimals; these ratios differ in the third
        rec.measure(f"{r['label']}: median [95 % interval]", f"{r['median']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]")
    for label, verdict_ in grads:
        rec.measure(f"first-layer weight gradient vs torch-tract (float32, max abs diff / max abs grad): {label}", verdict_)
    rec.record["notes"] = verdict
    rec.write()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list from {sorted(MODELS)}")
    p.add_argument("--no-record", action="store_true", help="print only; write no record")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = channels_last = device.type == "cuda"
    load0 = os.getloadavg()
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, torch-tract "
        f"{_ref_version() or 'not installed'}, "
        f"device {device} ({platform.processor() or platform.machine()}), threads {torch.get_num_threads()}, "
        f"batch {args.batch}, steps {args.steps} (+{args.warmup} warm-up), lam {args.lam}, "
        f"amp bf16 {amp}, channels_last {channels_last}, loadavg(1m) at start {load0[0]:.2f}"
    )
    grads = grad_agreement(args.lam, device, args.batch)  # before the timings: a correctness check, < 1 s
    table: list[tuple[str, ...]] = []
    for name in args.models.split(","):
        torch.manual_seed(1)
        x = torch.randn(args.batch, 3, 32, 32, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (args.batch,), device=device)
        variants = make_variants(name, args.lam, device, channels_last)
        started = (time.strftime("%Y-%m-%d %H:%M:%S"), os.getloadavg()[0])
        res = time_models(variants, x, y, args.steps, args.warmup, amp)
        table += _rows(name, res)
        stem_res = time_stems(name, args.lam, x, args.steps, args.warmup, amp)
        table += _rows(f"{name} stem only", stem_res)
        if not args.no_record:
            _record(name, res, stem_res, args, device, amp, started, grads)
    head = ("model", "variant", "ms/step", "min ms", "IQR ms", "vs vanilla", "paired", "cpu ms", "cpu vs van.")
    widths = (18, 12, 9, 8, 11, 10, 7, 8, 11)
    print()
    for row in [head, *table]:  # a variant that failed has its error text as the only cell after its name
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        print(" ".join(cells + [c.rjust(w) for c, w in zip(row[2:], widths[2:])]))
    print("\nfirst-layer weight gradient, layerlab vs torch-tract (float32, max|diff| / max|grad|):")
    for label, verdict in grads:
        print(f"  {label:38s} {verdict}")
    print(f"\nloadavg(1m) at end {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
