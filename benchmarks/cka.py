"""All-pairs CKA of a timm ResNet-18: layerlab beside the PyPI peers and an independent float64 reference.

Layers: every Conv2d and the fc output (21 for ResNet-18), self-similarity (all pairs of one model), N images of
32x32, batches of --batch in a fixed order so that every method sees the same minibatches. Each method runs in its
own subprocess, so that its peak memory and thread pools are its own, and --repeat rounds run all methods in turn
(interleaved, so that on a shared machine they see the same load); the table prints the best round, and one JSON
record per N (benchmarks/records/cka_<device>_n<N>.json, benchmarks/record.py) keeps every round, the paired
per-round ratios with 95 % intervals, and each method's max abs difference from the float64 reference:

* layerlab          minibatch unbiased CKA (Nguyen et al. 2021), the defaults: batches handed to the model in
                    channels_last layout (weights untouched), b x b Grams formed inside the forward hooks from
                    mean-centred features in the features' precision (float32), U-centred and accumulated in
                    float64 (CKAAccumulator + iter_features(transform=acc.gram)).
* layerlab-float64  the same stream with gram_dtype=torch.float64 (centring and Gram matmul in float64 too).
* layerlab-biased   the same stream with the biased HSIC_0 summed over batches (depends on the batch size).
* pytorch-cka       `cka.compute_cka` (import name `cka`): minibatch unbiased HSIC_1, float32, clamped to [0, 1].
* torch-cka         `torch_cka.CKA(...).compare`: minibatch unbiased HSIC_1 (batch mean), float32.
* ckatorch          `ckatorch.CKA` is tried first; its `cka_batch` (minibatch unbiased HSIC_1, float64) is then
                    run on the full-N features reshaped to [N/b, b, D], once per layer pair (upper triangle).
* forward-only(-cl) the same batches through the model with no hooks and no CKA, in the default NCHW layout
                    (what the peers run) and channels_last (what layerlab runs): the floors.
* reference         full-N features kept in float64 numpy; the textbook formulas written independently: biased
                    full-N CKA (H-centring), unbiased full-N (Song et al. 2012), and the minibatch unbiased and
                    biased estimators over the same batches.

Each method's error is taken against the reference of the SAME estimator. Memory: peak RSS above the post-warm-up
baseline (includes the forward pass); tracemalloc is printed too but does not see torch's CPU allocator (it only
sees Python and numpy), and torch.cuda.max_memory_allocated on CUDA.

    .venv/bin/python benchmarks/cka.py --n 512,2048 --batch 256 --threads 2
    PYTHONPATH=<folder with the peers> .venv/bin/python benchmarks/cka.py --n 512 --repeat 5   # with the peers
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

# Run as a script, this file's folder heads sys.path, and this file is named cka.py: drop the folder so that
# `import cka` finds the pytorch-cka package, not this benchmark.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

METHODS = [
    "forward-only", "forward-only-cl", "reference", "layerlab", "layerlab-float64", "layerlab-biased",
    "pytorch-cka", "torch-cka", "ckatorch",
]
PEERS = ["pytorch-cka", "torch-cka", "ckatorch"]
ESTIMATOR = {  # which reference matrix each method is compared with
    "layerlab": "unbiased_mb",
    "layerlab-biased": "biased_mb",
    "layerlab-float64": "unbiased_mb",
    "pytorch-cka": "unbiased_mb",
    "torch-cka": "unbiased_mb",
    "ckatorch": "unbiased_mb",
}
REF_LABEL = {
    "unbiased_mb": "unbiased minibatch",
    "biased_mb": "biased minibatch",
    "biased_full": "biased full-N",
    "unbiased_full": "unbiased full-N",
}


# ---------------------------------------------------------------------------------------------------- memory
class PeakRSS:
    """Sample this process's resident set size every ~1 ms; report the peak above the starting value (MiB)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self.page
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


# ---------------------------------------------------------------------------------------------------- setup
def build(args: argparse.Namespace, n: int):
    import timm
    import torch
    from torch import nn

    torch.manual_seed(args.seed)
    model = timm.create_model("resnet18", num_classes=10)
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
        model.load_state_dict({k.removeprefix("module.").removeprefix("net."): v for k, v in state.items()})
    model.eval().to(args.device)
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)] + ["fc"]
    g = torch.Generator().manual_seed(args.seed + 1)
    if args.data == "digits":
        from sklearn.datasets import load_digits

        digits = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0  # [1797, 8, 8] in [0, 1]
        idx = torch.arange(n) % digits.shape[0]  # cycles when n > 1797
        images = torch.nn.functional.interpolate(digits[idx, None], size=32, mode="bilinear", align_corners=False)
        images = images.expand(-1, 3, -1, -1).contiguous()
    else:
        images = torch.rand(n, 3, 32, 32, generator=g)
    return model, names, images


def loader(images, batch: int, as_dict: bool = False):
    import torch
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    if as_dict:

        class Dicts(Dataset):
            def __len__(self) -> int:
                return len(images)

            def __getitem__(self, i: int) -> dict:
                return {"x": images[i]}

        return DataLoader(Dicts(), batch_size=batch, shuffle=False)
    labels = torch.zeros(len(images), dtype=torch.long)
    return DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=False)


def full_features(model, names, images, batch: int, device: str) -> dict:
    """All N rows of every layer, flattened, float32 (what the N-dependent methods must hold)."""
    import torch

    modules = dict(model.named_modules())
    store: dict[str, list] = {n: [] for n in names}
    hooks = [
        modules[n].register_forward_hook(lambda m, i, o, n=n: store[n].append(o.detach().flatten(1).cpu()))
        for n in names
    ]
    try:
        with torch.inference_mode():
            for s in range(0, len(images), batch):
                model(images[s : s + batch].to(device))
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


# ---------------------------------------------------------------------------------------------------- methods
def run_layerlab(model, names, images, args, estimator: str = "unbiased", gram64: bool = False):
    import torch

    from layerlab.features import iter_features
    from layerlab.similarity import CKAAccumulator

    dtype = torch.float64 if gram64 else None  # None: the default, float32 Grams for float32 features
    acc = CKAAccumulator(len(names), names_a=names, estimator=estimator, gram_dtype=dtype)
    for grams in iter_features(model, names, images, args.batch, args.device, transform=acc.gram, flatten=False):
        acc.update_grams(grams)
    how = f"{'+'.join(sorted(acc.gram_dtypes))} Gram matmul, float64 U-centring/sums, channels_last input"
    return {"cka": acc.compute().numpy()}, f"{estimator} minibatch, {how}"


def run_pytorch_cka(model, names, images, args):
    import cka  # the import name of the PyPI package pytorch-cka

    out = cka.compute_cka(model, model, loader(images, args.batch), layers=names, device=args.device, progress=False)
    return {"cka": out[0].double().cpu().numpy()}, "unbiased minibatch, float32, clamped to [0,1]"


def run_torch_cka(model, names, images, args):
    import copy
    import warnings

    from torch_cka import CKA

    model = copy.deepcopy(model)  # torch_cka.CKA registers hooks it never removes: keep the shared model clean
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ck = CKA(model, model, "resnet18", "resnet18-copy", model1_layers=names, model2_layers=names,
                 device=args.device)
        ck.compare(loader(images, args.batch))
    res = ck.export()
    order = [res["model1_layers"].index(n) for n in names]
    return {"cka": res["CKA"].double().cpu().numpy()[order][:, order]}, "unbiased minibatch (batch mean), float32"


def run_ckatorch(model, names, images, args):
    import copy
    import warnings

    import numpy as np

    seaborn = sys.modules.get("seaborn")
    note = "seaborn (plot-only dependency) missing: stubbed; " if getattr(seaborn, "__file__", None) is None else ""
    import ckatorch

    attempt, fresh = copy.deepcopy(model), copy.deepcopy(model)  # ckatorch.CKA registers hooks it never removes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckatorch.CKA(attempt, attempt, layers=names, device=args.device)(loader(images, args.batch, True), epochs=1)
        note += "ckatorch.CKA ran; "
    except Exception as exc:  # noqa: BLE001 - report and fall back to the package's core function
        note += f"ckatorch.CKA failed ({type(exc).__name__}: {str(exc).splitlines()[0][:60]}); used cka_batch; "
    feats = full_features(fresh, names, images, args.batch, args.device)
    nb = len(images) // args.batch
    stacked = [feats[n].to(args.device).reshape(nb, args.batch, -1) for n in names]
    out = np.eye(len(names))
    for i in range(len(names)):
        for j in range(i, len(names)):
            out[i, j] = out[j, i] = float(ckatorch.cka_batch(stacked[i], stacked[j]))
    return {"cka": out}, note + "unbiased minibatch, float64"


def run_forward_only(model, names, images, args, channels_last: bool = False):
    """The same batches through the model with no hooks and no CKA: the floor every method pays."""
    import torch

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.inference_mode():
        for s in range(0, len(images), args.batch):
            model(images[s : s + args.batch].to(args.device).contiguous(memory_format=fmt))
    return {}, "no CKA: the forward passes alone"


def run_reference(model, names, images, args):
    """Independent numpy float64 reference: keeps all N features; textbook formulas, no layerlab code."""
    import numpy as np

    feats = full_features(model, names, images, args.batch, args.device)
    xs = []
    for n in names:
        x = feats.pop(n).numpy().astype(np.float64)
        xs.append(x - x.mean(axis=0))
    n_img, n_lay, b = len(images), len(xs), args.batch

    def song(t_kl, s_k, s_l, tot_k, tot_l, n):  # HSIC_1 from tr(K~L~), K~1, 1^T K~ 1 (Song et al. 2012)
        return (t_kl + np.outer(tot_k, tot_l) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (s_k @ s_l.T)) / (n * (n - 3))

    def ratio(h):
        d = np.sqrt(np.diag(h))
        return h / np.outer(d, d)

    # full N, in row blocks so that only [L, block, N] Gram rows exist at a time
    t_biased = np.zeros((n_lay, n_lay))
    t_tilde = np.zeros((n_lay, n_lay))
    rowsum = np.zeros((n_lay, n_img))
    for r0 in range(0, n_img, b):
        r1 = min(r0 + b, n_img)
        rows = np.stack([x[r0:r1] @ x.T for x in xs])  # centred over N: these are rows of H K H
        flat = rows.reshape(n_lay, -1)
        t_biased += flat @ flat.T
        idx = np.arange(r0, r1)
        rows[:, idx - r0, idx] = 0.0  # K~: zero diagonal
        t_tilde += flat @ flat.T
        rowsum[:, r0:r1] = rows.sum(axis=2)
    biased_full = ratio(t_biased)
    unbiased_full = ratio(song(t_tilde, rowsum, rowsum, rowsum.sum(1), rowsum.sum(1), n_img))

    # the same minibatches as every streaming method
    h_u = np.zeros((n_lay, n_lay))
    h_b = np.zeros((n_lay, n_lay))
    hb = np.eye(b) - np.ones((b, b)) / b
    for s in range(0, n_img, b):
        k = np.stack([x[s : s + b] @ x[s : s + b].T for x in xs])
        kc = np.stack([hb @ ki @ hb for ki in k]).reshape(n_lay, -1)
        h_b += kc @ kc.T / (b - 1) ** 2
        kt = k.copy()
        kt[:, np.arange(b), np.arange(b)] = 0.0
        sums = kt.sum(axis=2)
        flat = kt.reshape(n_lay, -1)
        h_u += song(flat @ flat.T, sums, sums, sums.sum(1), sums.sum(1), b)
    mats = {
        "biased_full": biased_full,
        "unbiased_full": unbiased_full,
        "unbiased_mb": ratio(h_u),
        "biased_mb": ratio(h_b),
    }
    return mats, "float64 numpy, full-N features kept"


IMPORTS = {  # imported before the clock starts
    "forward-only": "",
    "forward-only-cl": "",
    "reference": "",
    "layerlab": "import layerlab.features, layerlab.similarity",
    "layerlab-biased": "import layerlab.features, layerlab.similarity",
    "layerlab-float64": "import layerlab.features, layerlab.similarity",
    "pytorch-cka": "import cka",
    "torch-cka": "import torch_cka",
    "ckatorch": "",  # imported inside its runner, behind the seaborn check (cheap once torch is loaded)
}

RUNNERS = {
    "forward-only": run_forward_only,
    "forward-only-cl": lambda *a: run_forward_only(*a, channels_last=True),
    "reference": run_reference,
    "layerlab": run_layerlab,
    "layerlab-biased": lambda *a: run_layerlab(*a, estimator="biased"),
    "layerlab-float64": lambda *a: run_layerlab(*a, gram64=True),
    "pytorch-cka": run_pytorch_cka,
    "torch-cka": run_torch_cka,
    "ckatorch": run_ckatorch,
}


def worker(args: argparse.Namespace) -> None:
    """Run one method once in this process; save its matrices and print one JSON line."""
    import tracemalloc

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    if IMPORTS[args.worker]:
        exec(IMPORTS[args.worker], {})
    if args.worker == "ckatorch":
        import types

        try:
            import seaborn  # noqa: F401
        except ImportError:
            sys.modules["seaborn"] = types.ModuleType("seaborn")
        import ckatorch  # noqa: F401
    model, names, images = build(args, args.n)
    with torch.inference_mode():  # warm-up: thread pools, allocator, MKL
        model(images[: args.batch].to(args.device))
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = {"method": args.worker, "n": args.n, "layers": len(names)}
    try:
        tracemalloc.start()
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            mats, note = RUNNERS[args.worker](model, names, images, args)
            if cuda:
                torch.cuda.synchronize()
            result["time_s"] = time.perf_counter() - t0
        result["tracemalloc_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        result["rss_mib"] = rss.mib
        if cuda:
            result["cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["note"] = note
        for key, m in mats.items():
            np.save(Path(args.out) / f"{args.worker}_{args.n}_{key}.npy", np.asarray(m, dtype=np.float64))
        result["keys"] = list(mats)
    except Exception as exc:  # noqa: BLE001 - a failing peer is reported, not fatal
        result["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        traceback.print_exc(file=sys.stderr)
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------- driver
def availability() -> dict[str, str]:
    """Import each peer in a subprocess: name -> '' if importable, else the reason."""
    stub = (
        "import sys, types\ntry:\n import seaborn\nexcept ImportError:\n"
        " sys.modules['seaborn'] = types.ModuleType('seaborn')\nimport ckatorch"
    )
    probes = {"pytorch-cka": "import cka", "torch-cka": "import torch_cka", "ckatorch": stub}
    out = {}
    for name, code in probes.items():
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        out[name] = "" if r.returncode == 0 else (r.stderr.strip().splitlines() or ["import failed"])[-1]
    return out


def run_method(method: str, n: int, args: argparse.Namespace, out: str) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    if args.exact_rss:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, __file__, "--worker", method, "--n", str(n), "--batch", str(args.batch),
           "--device", args.device, "--threads", str(args.threads), "--data", args.data, "--seed", str(args.seed),
           "--out", out]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"method": method, "n": n, "error": f"timed out after {args.timeout} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"method": method, "n": n, "error": f"worker crashed (rc={r.returncode}): {tail[:200]}"}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default="512,2048", help="comma-separated numbers of images (each a multiple of --batch)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", choices=["random", "digits"], default="random")
    p.add_argument("--checkpoint", default="", help="ResNet-18 (10 classes) state dict; random init if omitted")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=5,
                   help="rounds; each round runs every method once, interleaved, so that all see the same machine "
                        "load; printed time = min over rounds, memory = max; the record keeps every round")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per method and N")
    p.add_argument("--exact-rss", action="store_true",
                   help="run workers with MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns freed blocks and peak RSS "
                        "tracks live memory (otherwise freed heap is retained and RSS creeps up with run length); "
                        "slows allocation-heavy code, so compare times only between runs with the same setting")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.n = int(args.n)
        worker(args)
        return

    import numpy as np

    ns = [int(v) for v in args.n.split(",")]
    bad = [n for n in ns if n % args.batch or n < args.batch]
    if bad:
        p.error(f"--n values {bad} are not positive multiples of --batch {args.batch} (equal batches are compared)")
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f"unknown --methods {sorted(unknown)}; choose from {METHODS}")
    for required in ("reference", "forward-only-cl", "forward-only"):
        if required not in methods:
            methods.insert(0, required)
    avail = availability()
    import torch

    weights = f"checkpoint {args.checkpoint}" if args.checkpoint else "seeded random init"
    print(f"# CKA benchmark: timm resnet18 (num_classes=10, {weights}),"
          f" every Conv2d + fc, self-similarity all pairs; data={args.data} 32x32; batch={args.batch};"
          f" device={args.device}; threads={args.threads}; exact_rss={args.exact_rss}; torch {torch.__version__}")
    for name, why in avail.items():
        if why:
            print(f"# {name}: not importable ({why}); skipped")
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for n in ns:
            runs: dict[str, list[dict]] = {m: [] for m in methods if not (m in PEERS and avail.get(m))}
            for rnd in range(args.repeat):  # interleaved: every method once per round, the reference too
                for m, done in runs.items():
                    if done and "error" in done[0]:
                        continue
                    res = run_method(m, n, args, out)
                    if "keys" in res and not done:
                        res["mats"] = {k: np.load(Path(out) / f"{m}_{n}_{k}.npy") for k in res["keys"]}
                    done.append(res)
                    status = res.get("error") or f"{res['time_s']:.2f} s"
                    print(f"#   round {rnd + 1} N={n} {m}: {status}", file=sys.stderr, flush=True)
            for m, done in runs.items():
                first = dict(done[0])
                ok = [r for r in done if "time_s" in r]
                if ok:
                    first["time_s"] = min(r["time_s"] for r in ok)
                    first["rss_mib"] = max(r["rss_mib"] for r in ok)
                    first["tracemalloc_mib"] = max(r["tracemalloc_mib"] for r in ok)
                    if "cuda_mib" in first:
                        first["cuda_mib"] = max(r["cuda_mib"] for r in ok)
                first["runs"] = len(ok)
                first["times"] = [r["time_s"] for r in ok]
                rows.append(first)
    report(rows, ns, args)
    for n in ns:
        record(rows, n, args, avail)


def record(rows: list[dict], n: int, args: argparse.Namespace, avail: dict[str, str]) -> None:
    """One JSON record per N (benchmarks/records/cka_<device>_n<N>.json): every method a side, its per-round times
    being the worker's own clock (model built and warmed up, imports done: the subprocess start is not counted)."""
    import numpy as np

    sys.path.insert(0, str(_HERE))
    from record import Recorder

    here = [r for r in rows if r["n"] == n]
    ref = next((r for r in here if r["method"] == "reference" and "mats" in r), None)
    weights = f"checkpoint {args.checkpoint}" if args.checkpoint else "seeded random init (untrained)"
    data = ("sklearn digits upsampled to 3x32x32" if args.data == "digits"
            else "uniform noise U[0,1) 3x32x32 (not images)")
    missing = [f"{p} ({why})" for p, why in avail.items() if why]
    rec = Recorder(
        f"cka_{args.device.split(':')[0]}_n{n}", f"All-pairs CKA of ResNet-18, N = {n}: layerlab vs peers and naive",
        device=args.device, conditions={
            "model": "timm resnet18, num_classes=10", "weights": weights, "data": data, "images": n,
            "batch": args.batch, "layers": "every Conv2d + fc (21), self-similarity, all pairs",
            "rounds": args.repeat, "exact_rss": args.exact_rss},
        notes=("Each side runs in its own subprocess, in turn within a round (floors, naive reference, layerlab "
               "and its variants, peers); a side's time is the worker's own clock after model build and warm-up. "
               "naive = the float64 numpy reference (keeps all N features, textbook formulas). Errors are max abs "
               "difference against that reference of the same estimator (minibatch unbiased unless named), "
               f"computed on a {weights} model fed {data}: they say how close the arithmetic is, not how CKA "
               "behaves on trained features. Peers not importable, so not measured: "
               + (", ".join(missing) if missing else "none") + "."))
    ok = {r["method"]: r for r in here if r.get("times")}
    for m, r in ok.items():
        rec.record["times"][m] = list(r["times"])
    rec.record["times"] = {m: rec.record["times"][m] for m in METHODS if m in rec.record["times"]}
    if "layerlab" in ok:
        for p in PEERS:
            if p in ok:
                rec.ratio(p, "layerlab", target=2.0, label=f"speed-up {p} / layerlab")
        if "reference" in ok:
            rec.ratio("reference", "layerlab", label="speed-up naive (float64 reference) / layerlab")
        for v in ("layerlab-float64", "layerlab-biased", "forward-only-cl", "forward-only"):
            if v in ok:
                rec.ratio(v, "layerlab", label=f"{v} / layerlab")
    for r in here:
        m = r["method"]
        if "error" in r:
            rec.measure(f"{m}_error", r["error"])
        elif m in ESTIMATOR and ref:
            key = ESTIMATOR[m]
            rec.measure(f"{m}_max_abs_diff_vs_float64_{key}", float(np.abs(r["mats"]["cka"] - ref["mats"][key]).max()))
        if "rss_mib" in r:
            rec.measure(f"{m}_peak_rss_mib", round(float(r["rss_mib"]), 1))
    if ref:
        m = ref["mats"]
        rec.measure("gap_biased_full_vs_unbiased_mb", float(np.abs(m["biased_full"] - m["unbiased_mb"]).max()))
        rec.measure("gap_unbiased_full_vs_unbiased_mb", float(np.abs(m["unbiased_full"] - m["unbiased_mb"]).max()))
    rec.write()


def report(rows: list[dict], ns: list[int], args: argparse.Namespace) -> None:
    import numpy as np

    cuda = args.device.startswith("cuda")
    mem_col = "cuda_MiB" if cuda else "tracemalloc_MiB"
    head = (f"{'N':>5}  {'method':<18}{'estimator (reference compared with)':<38}{'runs':>5}{'time_s':>8}"
            f"{'peak_RSS_MiB':>14}{mem_col:>17}{'max_abs_err':>13}")
    print(head)
    print("-" * len(head))
    for n in ns:
        ref = next((r for r in rows if r["n"] == n and r["method"] == "reference" and "mats" in r), None)
        for r in (r for r in rows if r["n"] == n):
            if "error" in r:
                print(f"{n:>5}  {r['method']:<18}FAILED: {r['error']}")
                continue
            if r["method"] == "reference":
                est, err = "float64 ref: all four estimators", "-"
            elif r["method"].startswith("forward-only"):
                layout = "channels_last" if r["method"].endswith("-cl") else "NCHW"
                est, err = f"none (floor: {layout} forwards)", "-"
            else:
                key = ESTIMATOR[r["method"]]
                est = REF_LABEL[key]
                err = f"{np.abs(r['mats']['cka'] - ref['mats'][key]).max():.2e}" if ref else "no ref"
            mem = r.get("cuda_mib", 0.0) if cuda else r["tracemalloc_mib"]
            print(f"{n:>5}  {r['method']:<18}{est:<38}{r['runs']:>5}{r['time_s']:>8.2f}{r['rss_mib']:>14.0f}"
                  f"{mem:>17.1f}{err:>13}")
    print()
    for r in rows:
        if "note" in r and r["method"] not in ("reference", "forward-only", "forward-only-cl"):
            print(f"# N={r['n']} {r['method']}: {r['note']}")
    for n in ns:
        ref = next((r for r in rows if r["n"] == n and r["method"] == "reference" and "mats" in r), None)
        if ref:
            m = ref["mats"]
            gap = {k: np.abs(m[k] - m[v]).max() for k, v in
                   (("biased_full", "unbiased_mb"), ("unbiased_full", "unbiased_mb"), ("biased_mb", "biased_full"))}
            print(f"# N={n} estimator gaps (float64 reference): max |biased full-N - unbiased minibatch| = "
                  f"{gap['biased_full']:.3f}; max |unbiased full-N - unbiased minibatch| = {gap['unbiased_full']:.3f}; "
                  f"max |biased minibatch - biased full-N| = {gap['biased_mb']:.3f}")
        ok = {r["method"]: r for r in rows if r["n"] == n and "time_s" in r}
        peers = [ok[p] for p in PEERS if p in ok]
        if "layerlab" in ok and peers:
            fastest = min(peers, key=lambda r: r["time_s"])
            print(f"# N={n} layerlab {ok['layerlab']['time_s']:.2f} s vs fastest peer {fastest['method']} "
                  f"{fastest['time_s']:.2f} s: speed-up x{fastest['time_s'] / ok['layerlab']['time_s']:.2f}")
            if "forward-only" in ok and "forward-only-cl" in ok:
                floor, floor_cl = ok["forward-only"]["time_s"], ok["forward-only-cl"]["time_s"]
                extra = ", ".join(f"{r['method']} {r['time_s'] - floor:.2f} s" for r in peers)
                print(f"# N={n} time beyond the forward passes: layerlab {ok['layerlab']['time_s'] - floor_cl:.2f} s "
                      f"(channels_last floor {floor_cl:.2f} s); {extra} (NCHW floor {floor:.2f} s)")
                print(f"# N={n} ceiling: a CKA that cost nothing beyond layerlab's forward passes would be "
                      f"x{fastest['time_s'] / floor_cl:.2f} the speed of {fastest['method']}")
    if len(ns) > 1:
        for method in dict.fromkeys(r["method"] for r in rows):
            mem = {r["n"]: r["rss_mib"] for r in rows if r["method"] == method and "rss_mib" in r}
            if len(mem) > 1:
                print(f"# peak RSS by N, {method}: " + ", ".join(f"N={k}: {v:.0f} MiB" for k, v in sorted(mem.items())))


if __name__ == "__main__":
    main()
