"""Decision regions on a plane through three images, and the similarity of two classifiers' regions.

Construction (Somepalli et al. 2022, "Can Neural Nets Learn the Same Model Twice?"; used by Sharon & Dar 2024;
METHODS.md section 2): for three images x1, x2, x3 of three distinct classes, in the model's input space,

    a = (x2 - x1) / |x2 - x1|,   b = x3 - x1,   b_perp = (b - <b, a> a) / |b - <b, a> a|
    point(c1, c2) = x1 + c1 a + c2 b_perp

so x1, x2, x3 sit at plane coordinates (0, 0), (|x2 - x1|, 0) and (<x3 - x1, a>, |b - <b, a> a|). The grid spans the
three anchors plus a ``margin`` (10%) of the anchors' extent on every side, ``resolution`` points per axis.
Points are not clipped to the valid pixel range (the plane leaves it, as in the original construction).

Decision-region similarity of two classifiers = the fraction of grid points where their argmax agrees, averaged
over random triplets (default 500 at 50 x 50). Geometry is computed in float64 and cast to the images' dtype.

Pure functions: :func:`plane_basis`, :func:`plane_coords`, :func:`plane_points`, :func:`plane`,
:func:`sample_triplets`, :func:`iter_plane_batches`, :func:`region_agreement`; the one-call
:func:`decision_region_similarity` runs two classifiers over the planes. :func:`layerlab.dynamics.dynamics` uses the
geometry but not that function (it compares the stored predictions of all checkpoint pairs at once), and the tests
check it against :func:`decision_region_similarity`, the reference implementation.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from .errors import DataError, LayerlabError, ShapeError
from .seeds import generator

__all__ = [
    "PlaneBasis",
    "PlaneGrid",
    "decision_region_similarity",
    "grid_coords",
    "iter_plane_batches",
    "plane",
    "plane_basis",
    "plane_coords",
    "plane_points",
    "region_agreement",
    "region_predictions",
    "sample_triplets",
]

PredictFn = Callable[[torch.Tensor], torch.Tensor]


class PlaneBasis(NamedTuple):
    """origin x1 [D], orthonormal directions a, b [D] (float64, flattened), anchors [3, 2] (x1, x2, x3 coords)."""

    origin: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    anchors: torch.Tensor


class PlaneGrid(NamedTuple):
    """points [R*R, C, H, W], coords [R*R, 2] (c1, c2; c1 varies fastest), anchors [3, 2]."""

    points: torch.Tensor
    coords: torch.Tensor
    anchors: torch.Tensor


def _check_image(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ShapeError(f"{name}: expected a torch.Tensor image of shape [C, H, W], got {type(x).__name__}")
    if x.ndim != 3:
        raise ShapeError(f"{name}: expected one image of shape [C, H, W], got shape {tuple(x.shape)}; index a batch with x[i]")
    return x


def plane_basis(x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> PlaneBasis:
    """The plane through three images [C, H, W]: origin x1, orthonormal a and b_perp, and the anchors' coordinates."""
    imgs = [_check_image(x, n) for x, n in ((x1, "x1"), (x2, "x2"), (x3, "x3"))]
    if len({tuple(x.shape) for x in imgs}) != 1:
        raise ShapeError(f"x1, x2, x3 must have the same shape, got {[tuple(x.shape) for x in imgs]}")
    o, p2, p3 = (x.detach().to("cpu", torch.float64).reshape(-1) for x in imgs)
    d2 = p2 - o
    n2 = torch.linalg.vector_norm(d2)
    if n2 == 0:
        raise LayerlabError("x1 and x2 are the same image, so they span no direction; pick three different images")
    a = d2 / n2
    d3 = p3 - o
    along = torch.dot(d3, a)
    perp = d3 - along * a
    perp = perp - torch.dot(perp, a) * a  # second Gram-Schmidt pass: a stays orthogonal in float64
    n3 = torch.linalg.vector_norm(perp)
    eps = torch.finfo(x1.dtype).eps if x1.dtype.is_floating_point else torch.finfo(torch.float64).eps
    if n3 <= 100 * eps * float(torch.linalg.vector_norm(d3)):  # collinear up to the inputs' rounding
        raise LayerlabError("x3 lies on the line through x1 and x2, so the three images span no plane; pick another x3")
    b = perp / n3
    anchors = torch.tensor([[0.0, 0.0], [float(n2), 0.0], [float(along), float(n3)]], dtype=torch.float64)
    return PlaneBasis(o, a, b, anchors)


def plane_coords(anchors: torch.Tensor, resolution: int = 50, margin: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Axis values (c1 [R], c2 [R]) spanning the anchors [3, 2] plus ``margin`` x their extent on each side."""
    if not isinstance(resolution, int) or resolution < 2:
        raise LayerlabError(f"resolution: expected an integer >= 2 grid points per axis, got {resolution!r}")
    if margin < 0:
        raise LayerlabError(f"margin: expected a fraction >= 0 of the anchors' extent, got {margin}")
    lo, hi = anchors.min(dim=0).values, anchors.max(dim=0).values
    pad = (hi - lo) * margin
    lo, hi = lo - pad, hi + pad
    return (torch.linspace(float(lo[0]), float(hi[0]), resolution, dtype=torch.float64),
            torch.linspace(float(lo[1]), float(hi[1]), resolution, dtype=torch.float64))


def grid_coords(c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """[R*R, 2] coordinates, row-major over (c2, c1): index = j * R + i for c1[i], c2[j]."""
    g2, g1 = torch.meshgrid(c2, c1, indexing="ij")
    return torch.stack([g1.reshape(-1), g2.reshape(-1)], dim=1)


def plane_points(basis: PlaneBasis, coords: torch.Tensor, shape: tuple[int, ...],
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Images [M, *shape] at plane coordinates [M, 2]: x1 + c1 a + c2 b_perp (computed in float64)."""
    coords = torch.as_tensor(coords, dtype=torch.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ShapeError(f"coords: expected plane coordinates of shape [M, 2], got {tuple(coords.shape)}")
    pts = basis.origin + coords[:, :1] * basis.a + coords[:, 1:] * basis.b
    return pts.reshape(coords.shape[0], *shape).to(dtype)


def plane(x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor, resolution: int = 50,
          margin: float = 0.1) -> PlaneGrid:
    """Grid points on the plane through x1, x2, x3 ([C, H, W] each): (points [R*R, C, H, W], coords, anchors).

    >>> x = torch.eye(3).reshape(3, 3, 1, 1)
    >>> pts, coords, anchors = plane(x[0], x[1], x[2], resolution=5)
    >>> pts.shape, coords.shape, anchors.shape
    (torch.Size([25, 3, 1, 1]), torch.Size([25, 2]), torch.Size([3, 2]))
    """
    basis = plane_basis(x1, x2, x3)
    coords = grid_coords(*plane_coords(basis.anchors, resolution, margin))
    dtype = x1.dtype if x1.dtype.is_floating_point else torch.float32
    return PlaneGrid(plane_points(basis, coords, tuple(x1.shape), dtype), coords, basis.anchors)


# ------------------------------------------------------------------------------------------------ triplets
def sample_triplets(labels: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` rows [i1, i2, i3] of images with three distinct classes (classes, then images, uniformly).

    Seeded by the stream ``dynamics/triplets`` of ``seed`` (:mod:`layerlab.seeds`): per triplet, three distinct
    classes by a random permutation of the classes present, then one image of each class uniformly. The rows index
    ``labels``; :func:`layerlab.dynamics.training_images` gives a run's own training set to draw from.
    """
    labels = torch.as_tensor(labels).long().reshape(-1)
    if not isinstance(count, int) or count < 1:
        raise LayerlabError(f"count: expected a positive number of triplets, got {count!r}")
    classes = torch.unique(labels)
    if classes.numel() < 3:
        raise DataError(f"decision regions need images of at least 3 classes, got classes {classes.tolist()}")
    g = generator("dynamics/triplets", seed)
    members = [torch.nonzero(labels == c).flatten() for c in classes]
    out = torch.empty(count, 3, dtype=torch.long)
    for t in range(count):
        chosen = torch.randperm(classes.numel(), generator=g)[:3]
        for j, c in enumerate(chosen.tolist()):
            rows = members[c]
            out[t, j] = rows[torch.randint(rows.numel(), (1,), generator=g)]
    return out


def _check_triplet_images(triplets: torch.Tensor) -> torch.Tensor:
    if not isinstance(triplets, torch.Tensor) or triplets.ndim != 5 or triplets.shape[1] != 3:
        shape = tuple(triplets.shape) if isinstance(triplets, torch.Tensor) else type(triplets).__name__
        raise ShapeError(
            f"triplets: expected images of shape [T, 3, C, H, W] (three images per plane), got {shape}; "
            "build them with images[sample_triplets(labels, T)]"
        )
    return triplets


def iter_plane_batches(triplets: torch.Tensor, resolution: int = 50, margin: float = 0.1,
                       batch_size: int = 1024) -> Iterator[torch.Tensor]:
    """Grid points of every triplet's plane, in order (triplet-major), in batches of ``batch_size`` images.

    Only one batch of points exists at a time, so planes of large images never fill memory.
    """
    triplets = _check_triplet_images(triplets)
    shape = tuple(triplets.shape[2:])
    dtype = triplets.dtype if triplets.dtype.is_floating_point else torch.float32
    bases = [plane_basis(*t) for t in triplets]
    per = resolution * resolution
    grids = [grid_coords(*plane_coords(b.anchors, resolution, margin)) for b in bases]
    total = len(bases) * per
    for start in range(0, total, batch_size):
        stop = min(total, start + batch_size)
        parts = []
        t0, t1 = start // per, (stop - 1) // per
        for t in range(t0, t1 + 1):
            lo, hi = max(start, t * per) - t * per, min(stop, (t + 1) * per) - t * per
            parts.append(plane_points(bases[t], grids[t][lo:hi], shape, dtype))
        yield torch.cat(parts)


def _to_pred(out: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.as_tensor(out)
    if out.ndim == 2:
        out = out.argmax(dim=1)
    if out.ndim != 1 or out.shape[0] != n:
        raise ShapeError(f"a classifier returned shape {tuple(out.shape)} for {n} images; expected logits [n, K] or classes [n]")
    return out.long().cpu()


def region_predictions(predict: PredictFn, triplets: torch.Tensor, resolution: int = 50, margin: float = 0.1,
                       batch_size: int = 1024) -> torch.Tensor:
    """Predicted classes [T, R*R] of ``predict`` (images -> logits [n, K] or classes [n]) on every triplet's grid."""
    triplets = _check_triplet_images(triplets)
    preds = []
    with torch.inference_mode():
        for pts in iter_plane_batches(triplets, resolution, margin, batch_size):
            preds.append(_to_pred(predict(pts), pts.shape[0]))
    return torch.cat(preds).reshape(triplets.shape[0], resolution * resolution)


def region_agreement(preds_a: torch.Tensor, preds_b: torch.Tensor) -> torch.Tensor:
    """Per-triplet fraction of grid points where two classifiers agree: [T, P] x [T, P] -> [T] (float64)."""
    if preds_a.shape != preds_b.shape or preds_a.ndim != 2:
        raise ShapeError(f"preds_a and preds_b: expected equal shapes [T, P], got {tuple(preds_a.shape)} and {tuple(preds_b.shape)}")
    return (preds_a == preds_b).double().mean(dim=1)


def decision_region_similarity(predict_a: PredictFn, predict_b: PredictFn, triplets: torch.Tensor,
                               resolution: int = 50, margin: float = 0.1, batch_size: int = 1024) -> float:
    """Mean over triplets [T, 3, C, H, W] of the fraction of plane grid points where the two argmaxes agree.

    ``predict_*``: images [n, C, H, W] -> logits [n, K] (or class indices [n]); 1.0 means identical regions.

    The reference implementation of the DRS: :func:`layerlab.dynamics.dynamics` runs every checkpoint over the planes
    once, keeps its predicted classes and compares all K x K pairs from those (the same agreement, far fewer
    forward passes); the tests and ``benchmarks/dynamics.py`` check it against this function.
    """
    pa = region_predictions(predict_a, triplets, resolution, margin, batch_size)
    pb = region_predictions(predict_b, triplets, resolution, margin, batch_size)
    return float(region_agreement(pa, pb).mean())
