"""What one checkpoint contributes to a dynamics analysis (Sharon & Dar 2024, arXiv 2405.17377), in one pass over
it: the b x b Gram matrix of every probe-set batch (formed inside the forward hook, so memory is independent of
layer width), the fitted linear probes (:mod:`layerlab.probes`) with their accuracies, and the predicted class of
every decision-region plane point (:mod:`layerlab.regions`), per layer through its probe and for the network's own
output."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..data import ImageData
from ..errors import warn
from ..features import OUTPUT_KEY, Extractor, as_input
from ..probes import ProbeConvergenceWarning, fit_probe
from ..regions import iter_plane_batches
from .config import PROBE_TOKENS, DynamicsConfig
from .views import _features, _slices, probe_features

__all__: list[str] = []


def _warn_probe_rows(frame: pd.DataFrame, what: str) -> None:
    """One warning line when any probe row of ``frame`` did not converge (ProbeConvergenceWarning)."""
    if frame is None or frame.empty or "probe_converged" not in frame:
        return
    bad = frame[~frame["probe_converged"].astype(bool)]
    if bad.empty:
        return
    capped = int((bad["probe_iterations"] >= bad["probe_max_iter"]).sum())
    where = ", ".join(f"{l}@{int(e)}" for l, e in list(zip(bad["layer"], bad["epoch"]))[:4])
    where += ", ..." if len(bad) > 4 else ""
    warn(
        f"{what}: {len(bad)} of {len(frame)} linear probes did not converge ({capped} stopped at the L-BFGS cap "
        f"probe_iter={'/'.join(str(int(v)) for v in sorted(set(bad['probe_max_iter'])))}: {where}); their accuracies "
        "are biased low; raise probe_iter (rows: probe_converged == False)",
        ProbeConvergenceWarning,
    )


@dataclass
class _Inputs:
    cka_images: torch.Tensor  # float [N, C, H, W]
    cka_batch: int
    probe_train: ImageData | None
    probe_test: ImageData | None
    triplets: torch.Tensor | None  # float [T, 3, C, H, W]
    num_classes: int


def _checkpoint_pass(model: nn.Module, cfg: DynamicsConfig, inputs: _Inputs, cka_views: list[str],
                     probe_layers: list[str], drs_views: list[str], device: str | torch.device,
                     gram: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Everything one checkpoint contributes: Gram matrices (formed by ``gram`` inside the hooks), fitted probes
    and their scores, plane predictions."""
    result: dict[str, Any] = {"grams": {}, "probes": {}, "preds": {}}
    if cka_views:
        inner = [v for v in cka_views if v != OUTPUT_KEY]
        feats = _features(model, inner, _slices(inputs.cka_images, inputs.cka_batch), device, gram,
                          OUTPUT_KEY in cka_views, cfg.tokens)
        result["grams"] = {v: torch.stack(feats[v]) for v in cka_views}
    if probe_layers:
        view = lambda t: probe_features(t, cfg.probe_pool).float()  # noqa: E731
        tokens = PROBE_TOKENS[cfg.tokens]
        tr = _features(model, probe_layers, _slices(inputs.probe_train.float(), 256), device, view, tokens=tokens)
        te = _features(model, probe_layers, _slices(inputs.probe_test.float(), 256), device, view, tokens=tokens)
        for layer in probe_layers:
            xtr, xte = torch.cat(tr[layer]), torch.cat(te[layer])
            p = fit_probe(xtr, inputs.probe_train.labels, num_classes=inputs.num_classes, method=cfg.probe_method,
                          l2=cfg.probe_l2, max_iter=cfg.probe_iter, tol=cfg.probe_tol, warn=False)
            w, b = p.fold(torch.float32)
            acc = lambda x, y: float(((x @ w + b).argmax(1) == y).double().mean())  # noqa: E731
            result["probes"][layer] = (p, acc(xtr, inputs.probe_train.labels), acc(xte, inputs.probe_test.labels), xtr.shape[1])
    if drs_views:
        result["preds"] = _plane_predictions(model, cfg, inputs, drs_views, result["probes"], device)
    return result


def _view_logits(model: nn.Module, layers: list[str], probes: dict[str, tuple], pool: int,
                 device: str | torch.device, tokens: str = "flatten") -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """images -> {view: logits}: each layer through its probe, and the network output."""
    folded = {l: probes[l][0].fold(torch.float32, device) for l in layers}
    ex = Extractor(model, layers, pool=False, flatten=False, include_output=True, tokens=PROBE_TOKENS[tokens],
                   transform=lambda t: probe_features(t, pool).float()) if layers else None

    def fn(x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = as_input(x.to(device))
        with torch.inference_mode():
            if ex is None:
                return {OUTPUT_KEY: model(x).float()}
            feats = ex(x)
            out = {l: feats[l] @ folded[l][0] + folded[l][1] for l in layers}
            out[OUTPUT_KEY] = feats[OUTPUT_KEY].float()
            return out

    return fn


def _plane_predictions(model: nn.Module, cfg: DynamicsConfig, inputs: _Inputs, views: list[str],
                       probes: dict[str, tuple], device: str | torch.device) -> dict[str, np.ndarray]:
    layers = [v for v in views if v != OUTPUT_KEY]
    fn = _view_logits(model, layers, probes, cfg.probe_pool, device, cfg.tokens)
    chunks: dict[str, list[np.ndarray]] = {v: [] for v in views}
    for pts in iter_plane_batches(inputs.triplets, cfg.resolution, cfg.margin, batch_size=512):
        logits = fn(pts)
        for v in views:
            chunks[v].append(logits[v].argmax(1).to("cpu", torch.uint8).numpy())
    return {v: np.concatenate(chunks[v]) for v in views}
