"""The GPU benchmark set (issue 15): criticality, all-pairs CKA and TrAct on ImageNet-size models, one record each.

Run by ``bash benchmarks/gpu.sh`` (which also installs the peers and times the demo); ``--smoke`` runs the same
code paths on tiny models on the CPU, for the test suite. Every measurement writes ``OUT/<name>.json`` through
:class:`record.Recorder` (commit, device, versions, threads, load before/after, conditions, per-round times of each
side with median, min and max, each paired ratio per round with its median and a 95 % bootstrap interval) plus
``mode``, ``device_type``, ``rounds_planned``, ``cut_by_budget`` and ``wall_s``. Sides are interleaved round by
round, the order rotating between rounds, so that drifts of the machine hit every side alike.

* ``gpu_criticality``  layer criticality of timm resnet50 at 224 px: all 54 Conv2d/Linear layers x 3 trials x 2,048
  random images, naive (a full forward per (layer, trial)) vs fast (cached stage inputs, suffix-only re-runs, trials
  stacked), both under bf16 autocast and channels_last; and the suffix-only ceiling of
  ``benchmarks/criticality_arch.py``: from the timed cost c_i of every stage over all images,
  naive_model = L T sum_i c_i, suffix_only = sum_l T sum_{i >= stage(l)} c_i + sum_i c_i, ceiling = their ratio.
* ``gpu_cka``          all-pairs linear CKA (minibatch unbiased) of resnet50's 54 layers at N = 10,000, 224 px:
  layerlab's ``CKAAccumulator`` over ``iter_features`` vs pytorch-cka's ``compute_cka`` (import name ``cka``),
  both float32, with the forward passes alone (channels_last, no hooks) as the floor.
* ``gpu_tract_resnet`` / ``gpu_tract_vit``  one SGD training step (forward, cross-entropy, backward, step; bf16
  autocast, channels_last) at batch 256 of resnet50 / vit_base_patch16_224: vanilla vs layerlab's TrAct vs
  torch-tract's, on identical initial weights.

Full-mode time on one H200 (an estimate: no GPU was lent when this was written; gpu.sh records the real one).
ResNet-50 bf16 channels_last inference at batch 256 runs at roughly 7,000-12,000 images/s in eager PyTorch on a
Hopper GPU. Criticality, naive: 54 x 3 x 2,048 = 331,776 image-forwards = 28-47 s; fast: the suffixes hold ~53 % of
the network's FLOPs averaged over the 54 layers (the ceiling is ~1.9x), ~16-27 s; plus ~2 s per call for the three
fresh resnet50 instances built on the CPU: 46-76 s a round, 3 rounds + warm-up + stage costs = 150-240 s. CKA at
N = 10,000: forwards alone ~1-2 s (float32), Grams 2 x 250^2 x ~11 M features x 40 batches = 55 TFLOP ~ 2 s,
pytorch-cka about the same plus its DataLoader: ~10-15 s a round of three sides, 3 rounds ~30-45 s plus 10 s set-up.
TrAct: 12 steps x 3 variants x ~80 ms (resnet50) and ~200 ms (ViT-B/16) ~ 10 s; if torch-tract fails under bf16
autocast (it does on the CPU) the float32 sides add ~20 s; plus builds: 20-45 s. So this script takes 3.5-5.5 min;
gpu.sh adds the demo (8.5 min on the 2-core CPU; estimated 1.5-2.5 min on the GPU machine's 16 cores and GPU) and
the installs: 5.5-8 min in all. To stay under 8 minutes whatever the real speeds, gpu.sh runs the demo first and
hands the time left of a 450 s budget to ``--budget``: criticality may use up to 60 % of it, CKA up to 85 %
cumulatively, TrAct the rest; a round starts only when the longest round so far still fits, at least one round
always runs, and a record says ``cut_by_budget`` when rounds were dropped.

    python benchmarks/gpu_set.py --out benchmarks/records/gpu-test            # full: needs CUDA
    python benchmarks/gpu_set.py --smoke --threads 1 --out /tmp/gpu-smoke       # tiny, CPU, ~5 s
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script, this folder heads sys.path and holds cka.py (the CKA benchmark): drop it so that `import cka`
# finds the pytorch-cka package; record.py, the one module needed from here, is loaded by its path.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def _load_record() -> Any:
    spec = importlib.util.spec_from_file_location("record", HERE / "record.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["record"] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


record = _load_record()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

TINY_RESNET = "timm:resnet18?channels=8,16,32,64&stem_width=8&num_classes=10"
TINY_VIT = "timm:vit_tiny_patch16_224?img_size=16&patch_size=4&embed_dim=32&depth=2&num_heads=2"
SHARES = {"criticality": 0.60, "cka": 0.85, "tract": 1.0}  # cumulative shares of --budget (see the docstring)


@dataclass(frozen=True)
class Plan:
    """What one mode measures; FULL is the issue's set, SMOKE the same code paths at toy sizes."""

    mode: str
    device: str
    crit_model: str
    crit_px: int
    crit_images: int
    crit_layers: int | None  # None: every Conv2d/Linear layer; k: k of them spread over the depth
    crit_trials: int
    crit_batch: int
    crit_rounds: int
    stage_reps: int
    cka_model: str
    cka_px: int
    cka_n: int
    cka_batch: int
    cka_rounds: int
    tract_models: dict[str, tuple[str, int]] = field(default_factory=dict)  # record key -> (model spec, pixels)
    tract_batch: int = 256
    tract_steps: int = 10
    tract_warmup: int = 3
    lam: float = 0.1

    @property
    def full(self) -> bool:
        return self.mode == "full"


FULL = Plan(
    mode="full", device="cuda",
    crit_model="timm:resnet50", crit_px=224, crit_images=2048, crit_layers=None, crit_trials=3, crit_batch=256,
    crit_rounds=3, stage_reps=2,
    cka_model="timm:resnet50", cka_px=224, cka_n=10_000, cka_batch=250, cka_rounds=3,  # 40 equal batches
    tract_models={"resnet": ("timm:resnet50", 224), "vit": ("timm:vit_base_patch16_224", 224)},
    tract_batch=256, tract_steps=10, tract_warmup=2,
)
SMOKE = Plan(
    mode="smoke", device="cpu",
    crit_model=TINY_RESNET, crit_px=16, crit_images=16, crit_layers=3, crit_trials=2, crit_batch=8,
    crit_rounds=3, stage_reps=1,
    cka_model=TINY_RESNET, cka_px=16, cka_n=64, cka_batch=16, cka_rounds=3,
    tract_models={"resnet": (TINY_RESNET, 16), "vit": (TINY_VIT, 16)},
    tract_batch=8, tract_steps=3, tract_warmup=1,
)


# ------------------------------------------------------------------------------------------------- plumbing
class Deadline:
    """When a measurement must be done (perf_counter seconds, None: never): a round starts only if the longest
    round so far still fits before it."""

    def __init__(self, at: float | None) -> None:
        self.at = at

    def fits(self, seconds: float) -> bool:
        return self.at is None or time.perf_counter() + seconds <= self.at


def run_rounds(rounds: int, deadline: Deadline, body: Callable[[int], None]) -> tuple[int, bool]:
    """``body(r)`` for r = 0 .. rounds-1 while the deadline allows (round 0 always); (rounds run, cut short?)."""
    longest = 0.0
    for r in range(rounds):
        if r and not deadline.fits(longest):
            return r, True
        t0 = time.perf_counter()
        body(r)
        longest = max(longest, time.perf_counter() - t0)
    return rounds, False


def syncer(device: str) -> Callable[[], None] | None:
    """What makes a wall-clock time mean the GPU's work is done (None on the CPU)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return None


def random_images(n: int, px: int, device: str, seed: int) -> torch.Tensor:
    """n seeded uniform images in [0, 1], [n, 3, px, px] float32, made on ``device`` (N = 10,000 at 224 px: 6 GB)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(n, 3, px, px, device=device, generator=g)


def order(sides: list[str], r: int) -> list[str]:
    """Round r's order of the sides: rotated by one each round."""
    k = r % len(sides)
    return sides[k:] + sides[:k]


def finish(rec: Any, out: Path, plan: Plan, planned: int, cut: bool, t_start: float) -> Path:
    rec.record.update({
        "mode": plan.mode, "device_type": torch.device(plan.device).type, "rounds_planned": planned,
        "cut_by_budget": cut, "wall_s": time.perf_counter() - t_start,
    })
    return rec.write(out)


def skipped(side: str, err: Exception) -> str:
    """A peer's failure in one line (printed, and returned for its record): the peer is skipped, the set goes on."""
    text = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
    print(f"warning: {side} failed in its warm-up ({text}); that side is dropped", file=sys.stderr, flush=True)
    return text


def release() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peers() -> dict[str, str]:
    """Peer name -> '' when importable here, else why not (pytorch-cka: import name ``cka``; torch-tract:
    ``torch_tract``)."""
    out = {}
    for name, module, attr in (("pytorch-cka", "cka", "compute_cka"), ("torch-tract", "torch_tract", "TrAct")):
        try:
            mod = importlib.import_module(module)
            out[name] = "" if hasattr(mod, attr) else f"module {module!r} has no {attr} (another package?)"
        except Exception as err:  # noqa: BLE001 - any failure means the peer is skipped, and why is recorded
            out[name] = f"not importable: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    return out


# --------------------------------------------------------------------------------------------- criticality
@torch.no_grad()
def calibrate(model: nn.Module, images: torch.Tensor, batch: int, logit_std: float = 4.0) -> str:
    """Make an untrained model's criticality mean something (timm zero-initialises the last BatchNorm scale of each
    residual block, which makes the block inert, and an untrained head gives near-uniform softmax outputs): every
    BatchNorm scale to 1, running statistics from one train-mode pass over ``images``, then the head (last Linear)
    rescaled so that the logits' spread over classes is ``logit_std``. Normalisation layers are never swapped, so
    this holds for every trial; the timings hardly depend on it. Returns what was done, in words."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        if m.weight is not None:
            m.weight.fill_(1.0)
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
        m.train()
    for s in range(0, len(images), batch):
        model(images[s : s + batch])
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
        m.eval()
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    logits = torch.cat([model(images[s : s + batch]) for s in range(0, len(images), batch)])
    scale = logit_std / float(logits.float().std(dim=1).mean().clamp_min(1e-12))
    head.weight.mul_(scale)
    if head.bias is not None:
        head.bias.mul_(scale)
    return (f"{len(bns)} BatchNorms: scale 1, running statistics from these images; head rescaled x{scale:.3g} to "
            f"logit std {logit_std:g}")


@torch.no_grad()
def stage_costs(model: nn.Module, images: torch.Tensor, batch: int, device: str, reps: int) -> tuple[list[float], Any]:
    """Seconds per stage of the validated chain over all images, bf16 autocast and channels_last like the fast
    path (per stage the fastest of ``reps`` passes after a warm-up pass; the GPU synchronised around each stage)."""
    from layerlab.criticality import Pipeline
    from layerlab.runtime import eval_mode

    pipe = Pipeline(model, torch.device(device), amp=True, channels_last=True)
    sync = syncer(device) or (lambda: None)
    best: list[float] | None = None
    with eval_mode(model):
        pipe.validate(pipe.input(images[:batch]), "benchmark")
        for rep in range(reps + 1):
            per = [0.0] * len(pipe.stages)
            for s in range(0, len(images), batch):
                with pipe.autocast():
                    y = pipe.input(images[s : s + batch])
                    for i in range(len(pipe.stages)):
                        sync()
                        t0 = time.perf_counter()
                        y = pipe.stage(i, y)
                        sync()
                        per[i] += time.perf_counter() - t0
            if rep:  # the first pass warms up
                best = per if best is None else [min(a, b) for a, b in zip(best, per)]
    return best or [], pipe


def bench_criticality(plan: Plan, out: Path, deadline: Deadline) -> Path:
    from layerlab import load_model
    from layerlab.criticality import criticality, units_of

    t_start = time.perf_counter()
    device, sync = plan.device, syncer(plan.device)
    torch.manual_seed(1234)  # the model's own weights (trials draw from their own stream, layerlab.seeds)
    model = load_model(plan.crit_model, device=device)
    images = random_images(plan.crit_images, plan.crit_px, device, seed=1)
    how = calibrate(model, images, plan.crit_batch)
    units = units_of(model)
    if plan.crit_layers is not None and plan.crit_layers < len(units):
        k = plan.crit_layers
        units = [units[round(i * (len(units) - 1) / (k - 1))] for i in range(k)] if k > 1 else units[-1:]
    layers = [u.name for u in units]
    opts = {"layers": layers, "trials": plan.crit_trials, "batch_size": plan.crit_batch, "device": device,
            "amp": True, "channels_last": True, "seed": 0}
    conditions = {
        "model": f"{plan.crit_model}, random init (seed 1234); {how}",
        "images": f"{plan.crit_images} seeded uniform random images in [0, 1], 3x{plan.crit_px}x{plan.crit_px}, "
                  f"held on {device}",
        "layers": f"{len(layers)} Conv2d/Linear layers" + (" (all)" if plan.crit_layers is None else " (spread)"),
        "trials": plan.crit_trials, "batch": plan.crit_batch, "jobs": len(layers) * plan.crit_trials,
        "precision": "bf16 autocast, channels_last (both sides)",
        "order": "naive and fast interleaved, order alternating by round; warm-up calls first",
        "cudnn.benchmark": bool(torch.backends.cudnn.benchmark),
    }
    rec = record.Recorder("gpu_criticality", "Layer criticality: naive vs fast, and the suffix-only ceiling",
                          conditions=conditions, device=device)

    # warm-up: the fast path on the first layer with every trial stacked runs each kernel shape once; naive one job
    criticality(model, images, naive=False, **{**opts, "layers": layers[:1]})
    criticality(model, images, naive=True, **{**opts, "layers": layers[-1:], "trials": 1})

    costs, pipe = stage_costs(model, images, plan.crit_batch, device, plan.stage_reps)
    full = sum(costs)
    starts = [min(pipe.stage_of(p) for p in u.params) if len(pipe.stages) > 1 else 0 for u in units]
    naive_model = len(units) * plan.crit_trials * full
    suffix_only = sum(plan.crit_trials * sum(costs[s:]) for s in starts) + full

    tables: dict[str, Any] = {}
    diff = 0.0

    def one_round(r: int) -> None:
        nonlocal diff
        for side in order(["naive", "fast"], r):
            tables[side] = rec.time(side, lambda side=side: criticality(model, images, naive=side == "naive", **opts),
                                    sync)
        a, b = tables["fast"], tables["naive"]
        assert list(a["layer"]) == list(b["layer"]) and list(a["trial"]) == list(b["trial"])
        diff = max(diff, float((a["criticality"] - b["criticality"]).abs().max()))

    _, cut = run_rounds(plan.crit_rounds, deadline, one_round)
    rec.ratio("naive", "fast", target=3.0 if plan.full else None, label="naive / fast (speed-up)")
    fast_median = statistics.median(rec.record["times"]["fast"])
    rec.measure("stages", len(costs))
    rec.measure("stage_costs_ms", [round(c * 1e3, 3) for c in costs])
    rec.measure("naive_model_s", naive_model)
    rec.measure("suffix_only_s", suffix_only)
    rec.measure("ceiling_speedup", naive_model / suffix_only if suffix_only > 0 else float("nan"))
    rec.measure("fast_over_suffix_only", fast_median / suffix_only if suffix_only > 0 else float("nan"))
    rec.measure("max_abs_diff_fast_naive_points", diff)
    rec.measure("mean_criticality_pct", float(tables["fast"]["criticality"].mean()))
    return finish(rec, out, plan, plan.crit_rounds, cut, t_start)


# ----------------------------------------------------------------------------------------------------- CKA
def cka_layerlab(model: nn.Module, names: list[str], images: torch.Tensor, batch: int, device: str) -> torch.Tensor:
    """layerlab's default all-pairs CKA: Grams formed inside the hooks (channels_last batches), float64 sums."""
    from layerlab.features import iter_features
    from layerlab.similarity import CKAAccumulator

    acc = CKAAccumulator(len(names), names_a=names)
    for grams in iter_features(model, names, images, batch, device, transform=acc.gram, flatten=False):
        acc.update_grams(grams)
    return acc.compute()


def cka_peer(model: nn.Module, names: list[str], images: torch.Tensor, batch: int, device: str) -> torch.Tensor:
    """pytorch-cka's all-pairs CKA over the same batches, as benchmarks/cka.py calls it (a DataLoader of
    (image, label) pairs; the images already on the device, so neither side pays a host-to-device copy)."""
    import cka  # the import name of the PyPI package pytorch-cka
    from torch.utils.data import DataLoader, TensorDataset

    labels = torch.zeros(len(images), dtype=torch.long, device=images.device)
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=False)
    out = cka.compute_cka(model, model, loader, layers=names, device=device, progress=False)
    return out[0].double().cpu()


@torch.inference_mode()
def forward_only(model: nn.Module, images: torch.Tensor, batch: int) -> None:
    """The same batches through the model, channels_last, no hooks and no CKA: the floor of every method."""
    for s in range(0, len(images), batch):
        model(images[s : s + batch].contiguous(memory_format=torch.channels_last))


def bench_cka(plan: Plan, out: Path, deadline: Deadline, available: dict[str, str]) -> Path:
    from layerlab import load_model
    from layerlab.criticality import units_of

    t_start = time.perf_counter()
    device, sync = plan.device, syncer(plan.device)
    torch.manual_seed(0)
    model = load_model(plan.cka_model, device=device)
    names = [u.name for u in units_of(model)]
    images = random_images(plan.cka_n, plan.cka_px, device, seed=2)
    peer_ok = not available["pytorch-cka"]
    conditions = {
        "model": f"{plan.cka_model}, random init (seed 0), eval mode, float32",
        "layers": f"{len(names)} Conv2d/Linear outputs, self-similarity (all pairs)",
        "images": f"N = {plan.cka_n} seeded uniform random images in [0, 1], 3x{plan.cka_px}x{plan.cka_px}, "
                  f"held on {device}",
        "batch": plan.cka_batch, "estimator": "linear kernel, minibatch unbiased HSIC_1 (Nguyen et al. 2021)",
        "layerlab": "CKAAccumulator + iter_features(transform=acc.gram): channels_last batches, float32 Grams, "
                    "float64 U-centring and sums",
        "pytorch-cka": "cka.compute_cka over a DataLoader of the same tensors, float32, clamped to [0, 1]"
                       if peer_ok else f"skipped ({available['pytorch-cka']})",
        "forward-only": "the same batches, channels_last, no hooks: the floor",
        "order": "sides interleaved, order rotating by round; one untimed warm-up call of each first",
    }
    rec = record.Recorder("gpu_cka", "All-pairs CKA: layerlab vs pytorch-cka", conditions=conditions, device=device)
    runners: dict[str, Callable[[], Any]] = {
        "forward-only": lambda: forward_only(model, images, plan.cka_batch),
        "layerlab": lambda: cka_layerlab(model, names, images, plan.cka_batch, device),
    }
    if peer_ok:
        runners["pytorch-cka"] = lambda: cka_peer(model, names, images, plan.cka_batch, device)
    warm = plan.cka_batch * 2  # warm-up on two batches: kernels, allocator, the peer's imports
    mats: dict[str, torch.Tensor] = {}
    for side in list(runners):
        try:
            if side == "layerlab":
                cka_layerlab(model, names, images[:warm], plan.cka_batch, device)
            elif side == "pytorch-cka":
                cka_peer(model, names, images[:warm], plan.cka_batch, device)
            else:
                forward_only(model, images[:warm], plan.cka_batch)
        except Exception as err:  # noqa: BLE001 - a failing peer is recorded and skipped, never fatal
            if side != "pytorch-cka":
                raise
            rec.measure("pytorch-cka_error", skipped(side, err))
            del runners[side]
    sides = list(runners)

    def one_round(r: int) -> None:
        for side in order(sides, r):
            result = rec.time(side, runners[side], sync)
            if isinstance(result, torch.Tensor):
                mats[side] = result

    _, cut = run_rounds(plan.cka_rounds, deadline, one_round)
    rec.ratio("layerlab", "forward-only", label="layerlab / forward-only (cost in forward passes)")
    if "pytorch-cka" in sides:
        rec.ratio("pytorch-cka", "layerlab", target=2.0 if plan.full else None,
                  label="pytorch-cka / layerlab (speed-up)")
        rec.measure("max_abs_diff_vs_pytorch_cka", float((mats["layerlab"] - mats["pytorch-cka"]).abs().max()))
    rec.measure("layers", len(names))
    rec.measure("n_images", plan.cka_n)
    rec.measure("mean_offdiag_cka", float((mats["layerlab"].sum() - mats["layerlab"].diagonal().sum())
                                          / max(1, len(names) * (len(names) - 1))))
    if torch.device(device).type == "cuda":
        rec.measure("cuda_peak_mib", torch.cuda.max_memory_allocated() / 2**20)
    return finish(rec, out, plan, plan.cka_rounds, cut, t_start)


# --------------------------------------------------------------------------------------------------- TrAct
def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def tract_variants(spec: str, px: int, lam: float, device: str, use_peer: bool) -> tuple[dict[str, nn.Module], str]:
    """Vanilla, layerlab and (if importable) torch-tract copies of one model with identical initial weights, on
    the device, channels_last, in train mode; and the stem's name (found by layerlab's probe, used for both)."""
    import layerlab.tract as tract
    from layerlab import load_model

    torch.manual_seed(0)
    base = load_model(spec)
    ours = tract.apply(copy.deepcopy(base), lam=lam, example_input=torch.rand(2, 3, px, px))
    stem = next(n for n, m in ours.named_modules() if isinstance(m, tract.TrAct))
    variants = {"vanilla": copy.deepcopy(base), "layerlab": ours}
    if use_peer:
        import torch_tract

        ref = copy.deepcopy(base)
        _set_submodule(ref, stem, torch_tract.TrAct(ref.get_submodule(stem), l=lam))
        variants["torch-tract"] = ref
    for model in variants.values():
        model.to(device).train()
        model.to(memory_format=torch.channels_last)
    return variants, stem


def bench_tract(plan: Plan, key: str, out: Path, deadline: Deadline, available: dict[str, str]) -> Path:
    """Step times of vanilla, layerlab and torch-tract under bf16 autocast. torch-tract's autograd function is not
    autocast-aware (its backward meets a bf16 gradient and a float32 input); when it fails there, all three also
    run in float32 (sides ``*_fp32``, interleaved in the same rounds) so that the peer comparison still exists."""
    from layerlab.models import num_outputs

    t_start = time.perf_counter()
    spec, px = plan.tract_models[key]
    device, sync = plan.device, syncer(plan.device)
    peer_ok = not available["torch-tract"]
    variants, stem = tract_variants(spec, px, plan.lam, device, peer_ok)
    g = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(plan.tract_batch, 3, px, px, device=device, generator=g).contiguous(
        memory_format=torch.channels_last)
    classes = num_outputs(variants["vanilla"], x)
    y = torch.randint(0, classes, (plan.tract_batch,), device=device, generator=g)
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in variants.items()}
    dev_type = torch.device(device).type
    sides: dict[str, tuple[str, bool]] = {k: (k, True) for k in variants}  # side -> (variant, bf16 autocast)

    def step(side: str) -> None:
        variant, amp = sides[side]
        model, opt = variants[variant], opts[variant]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        opt.step()

    conditions = {
        "model": f"{spec}, random init (seed 0), train mode; stem {stem!r} wrapped (layerlab's probe), "
                 f"lambda {plan.lam}",
        "batch": f"{plan.tract_batch} random normal images 3x{px}x{px}, random labels of {classes} classes, "
                 f"on {device}",
        "step": "zero_grad, forward under bf16 autocast (channels_last model and input), cross-entropy, backward, "
                "SGD(lr 0.01, momentum 0.9) step; one step per side per round",
        "torch-tract": "torch_tract.TrAct on the same stem" if peer_ok else f"skipped ({available['torch-tract']})",
        "tf32": f"matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn {torch.backends.cudnn.allow_tf32}",
        "order": f"{plan.tract_warmup} untimed warm-up steps per side, then sides interleaved, order rotating by round",
    }
    rec = record.Recorder(f"gpu_tract_{key}", f"TrAct step overhead: {spec}", conditions=conditions, device=device)

    def warm(names: list[str]) -> str:
        """Warm the sides up; the error text of the first that fails ('' when none did)."""
        for side in names:
            try:
                for _ in range(plan.tract_warmup):
                    step(side)
            except Exception as err:  # noqa: BLE001 - e.g. the peer under bf16 autocast; recorded, skipped
                if not side.startswith("torch-tract"):
                    raise
                return skipped(side, err)
        return ""

    if error := warm(list(sides)):
        rec.measure("torch-tract_bf16_error", error)
        print("torch-tract: all three variants also run in float32 (sides *_fp32)", flush=True)
        del sides["torch-tract"]
        fp32 = {f"{k}_fp32": (k, False) for k in variants}
        sides.update(fp32)
        if error := warm(list(fp32)):
            rec.measure("torch-tract_fp32_error", error)
            for k in fp32:
                del sides[k]
        else:
            rec.record["conditions"]["fp32 sides"] = ("torch-tract failed under bf16 autocast: all three also run "
                                                      "without autocast (float32), interleaved in the same rounds")
    names = list(sides)

    def one_round(r: int) -> None:
        for side in order(names, r):
            rec.time(side, lambda side=side: step(side), sync)

    _, cut = run_rounds(plan.tract_steps, deadline, one_round)
    for suffix in ("", "_fp32"):
        if f"layerlab{suffix}" in sides:
            rec.ratio(f"layerlab{suffix}", f"vanilla{suffix}", label=f"layerlab{suffix} / vanilla{suffix} (step time)")
        if f"torch-tract{suffix}" in sides:
            rec.ratio(f"torch-tract{suffix}", f"vanilla{suffix}",
                      label=f"torch-tract{suffix} / vanilla{suffix} (step time)")
            rec.ratio(f"torch-tract{suffix}", f"layerlab{suffix}",
                      label=f"torch-tract{suffix} / layerlab{suffix} (speed-up)")
    for r in rec.record["ratios"]:
        if r["denominator"].startswith("vanilla"):
            rec.measure(f"{r['numerator']}_overhead_pct", 100.0 * (r["median"] - 1.0))
    if dev_type == "cuda":
        rec.measure("cuda_peak_mib", torch.cuda.max_memory_allocated() / 2**20)
    return finish(rec, out, plan, plan.tract_steps, cut, t_start)


# ----------------------------------------------------------------------------------------------------- main
MEASUREMENTS = ("criticality", "cka", "tract")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU: the same code paths, for the tests")
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON records")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds this script may take (0: no limit); rounds that would not fit are dropped")
    p.add_argument("--only", default=",".join(MEASUREMENTS),
                   help=f"comma-separated subset of {', '.join(MEASUREMENTS)}")
    args = p.parse_args(argv)
    only = [m.strip() for m in args.only.split(",") if m.strip()]
    if bad := sorted(set(only) - set(MEASUREMENTS)):
        p.error(f"--only: unknown measurement(s) {bad}; choose from {', '.join(MEASUREMENTS)}")
    plan = SMOKE if args.smoke else FULL
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("error: gpu_set.py needs a CUDA GPU (torch.cuda.is_available() is False); run with --smoke for the "
              "CPU smoke test", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    available = peers()
    for name, why in available.items():
        print(f"peer {name}: {'available' if not why else why + '; its side is skipped'}", flush=True)

    t0 = time.perf_counter()

    def deadline(name: str) -> Deadline:
        return Deadline(t0 + SHARES[name] * args.budget if args.budget > 0 else None)

    if "criticality" in only:
        print(f"== criticality ({plan.crit_model}, {plan.crit_px} px)", flush=True)
        bench_criticality(plan, args.out, deadline("criticality"))
        release()  # the measurement's tensors went with its frame
    if "cka" in only:
        print(f"== CKA ({plan.cka_model}, N = {plan.cka_n})", flush=True)
        bench_cka(plan, args.out, deadline("cka"), available)
        release()
    if "tract" in only:
        for key in plan.tract_models:
            print(f"== TrAct ({plan.tract_models[key][0]}, batch {plan.tract_batch})", flush=True)
            bench_tract(plan, key, args.out, deadline("tract"), available)
            release()
    print(f"gpu_set ({plan.mode}): {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
