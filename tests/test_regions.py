"""Decision-region planes and similarity (layerlab.regions)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from layerlab.errors import DataError, LayerlabError, ShapeError
from layerlab.regions import (
    decision_region_similarity,
    iter_plane_batches,
    plane,
    plane_basis,
    plane_points,
    region_predictions,
    sample_triplets,
)

torch.set_num_threads(1)


def _images(k: int = 3, shape=(2, 5, 4), seed: int = 0) -> torch.Tensor:
    return torch.rand(k, *shape, generator=torch.Generator().manual_seed(seed))


def test_plane_coordinates_reproduce_the_three_images() -> None:
    x1, x2, x3 = _images()
    basis = plane_basis(x1, x2, x3)
    at_anchors = plane_points(basis, basis.anchors, tuple(x1.shape), dtype=torch.float64)
    torch.testing.assert_close(at_anchors, torch.stack([x1, x2, x3]).double(), atol=1e-12, rtol=0)
    # orthonormal directions, x1 at the origin, x2 on the first axis
    assert abs(float(basis.a @ basis.a) - 1) < 1e-12 and abs(float(basis.b @ basis.b) - 1) < 1e-12
    assert abs(float(basis.a @ basis.b)) < 1e-12
    assert basis.anchors[0].tolist() == [0.0, 0.0] and basis.anchors[1, 1] == 0.0
    assert abs(float(basis.anchors[1, 0]) - float((x2 - x1).double().norm())) < 1e-12


def test_grid_spans_the_anchors_plus_ten_percent() -> None:
    x1, x2, x3 = _images(seed=1)
    pts, coords, anchors = plane(x1, x2, x3, resolution=11, margin=0.1)
    assert pts.shape == (121, *x1.shape) and pts.dtype == x1.dtype and coords.shape == (121, 2)
    lo, hi = anchors.min(0).values, anchors.max(0).values
    span = hi - lo
    torch.testing.assert_close(coords.min(0).values, lo - 0.1 * span)
    torch.testing.assert_close(coords.max(0).values, hi + 0.1 * span)
    # c1 varies fastest; each grid point is x1 + c1 a + c2 b
    assert coords[1, 1] == coords[0, 1] and coords[1, 0] > coords[0, 0]
    basis = plane_basis(x1, x2, x3)
    expect = (basis.origin + coords[37, 0] * basis.a + coords[37, 1] * basis.b).reshape(x1.shape).float()
    torch.testing.assert_close(pts[37], expect)


def test_batches_straddling_planes_equal_per_plane_grids() -> None:
    imgs = _images(6, seed=2).reshape(2, 3, 2, 5, 4)
    streamed = torch.cat(list(iter_plane_batches(imgs, resolution=7, margin=0.1, batch_size=10)))
    direct = torch.cat([plane(*t, resolution=7, margin=0.1).points for t in imgs])
    torch.testing.assert_close(streamed, direct)


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 2, 5)).eval()


def test_drs_of_a_classifier_with_itself_is_one() -> None:
    trip = _images(12, seed=3).reshape(4, 3, 2, 5, 4)
    net = _net(0)
    assert decision_region_similarity(net, net, trip, resolution=9) == 1.0
    other = _net(1)
    assert decision_region_similarity(net, other, trip, resolution=9) < 1.0


def test_drs_is_the_fraction_of_agreeing_grid_points() -> None:
    trip = _images(9, seed=4).reshape(3, 3, 2, 5, 4)

    def brightness(x: torch.Tensor) -> torch.Tensor:  # class 1 where the mean pixel exceeds 0.5
        return (x.mean(dim=(1, 2, 3)) > 0.5).long()

    def zero(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], dtype=torch.long)

    expect = torch.stack([(plane(*t, resolution=8).points.mean(dim=(1, 2, 3)) <= 0.5).double().mean() for t in trip]).mean()
    assert 0.0 < float(expect) < 1.0
    def one(x: torch.Tensor) -> torch.Tensor:
        return torch.ones(x.shape[0], dtype=torch.long)

    assert decision_region_similarity(brightness, zero, trip, resolution=8) == pytest.approx(float(expect), abs=1e-12)
    assert decision_region_similarity(brightness, one, trip, resolution=8) == pytest.approx(1 - float(expect), abs=1e-12)
    assert decision_region_similarity(zero, one, trip, resolution=8) == 0.0
    preds = region_predictions(brightness, trip, resolution=8)
    assert preds.shape == (3, 64)


def test_triplets_have_three_distinct_classes_and_are_seeded() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3])
    t = sample_triplets(labels, 50, seed=7)
    assert t.shape == (50, 3)
    assert all(len(set(labels[row].tolist())) == 3 for row in t)
    assert torch.equal(t, sample_triplets(labels, 50, seed=7))
    assert not torch.equal(t, sample_triplets(labels, 50, seed=8))
    with pytest.raises(DataError, match="at least 3 classes"):
        sample_triplets(torch.tensor([0, 1, 0, 1]), 2)


def test_degenerate_planes_and_bad_shapes_teach() -> None:
    x1, x2, _ = _images()
    with pytest.raises(LayerlabError, match="same image"):
        plane_basis(x1, x1.clone(), x2)
    with pytest.raises(LayerlabError, match="line through x1 and x2"):
        plane_basis(x1, x2, x1 + 2 * (x2 - x1))
    with pytest.raises(ShapeError, match=r"\[C, H, W\]"):
        plane(x1[None], x2[None], x2[None])
    with pytest.raises(ShapeError, match=r"\[T, 3, C, H, W\]"):
        decision_region_similarity(_net(0), _net(0), _images(3))
    with pytest.raises(LayerlabError, match="resolution"):
        plane(*_images(), resolution=1)


def test_triplets_come_from_the_dynamics_triplets_stream() -> None:
    """The draw is the documented one (classes by a permutation, then one image per class) on the generator seeded
    with SHA-256("dynamics/triplets|<seed>") (layerlab.seeds), recomputed here by hand; not on manual_seed(seed)."""
    import hashlib

    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3, 4])

    def by_hand(g: torch.Generator, count: int) -> torch.Tensor:
        classes = torch.unique(labels)
        rows = []
        for _ in range(count):
            chosen = torch.randperm(classes.numel(), generator=g)[:3]
            row = []
            for c in chosen.tolist():
                members = torch.nonzero(labels == classes[c]).flatten()
                row.append(int(members[torch.randint(members.numel(), (1,), generator=g)]))
            rows.append(row)
        return torch.tensor(rows)

    seed = int.from_bytes(hashlib.sha256(b"dynamics/triplets|5").digest()[:8], "little") & (2**63 - 1)
    expect = by_hand(torch.Generator().manual_seed(seed), 40)
    assert torch.equal(sample_triplets(labels, 40, seed=5), expect)
    assert not torch.equal(sample_triplets(labels, 40, seed=5), by_hand(torch.Generator().manual_seed(5), 40))
