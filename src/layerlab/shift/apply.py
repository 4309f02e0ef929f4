"""One way to corrupt a batch: :func:`corrupt`, deterministic per image whatever the batch."""
from __future__ import annotations

import torch

from ..errors import LayerlabError, ShapeError, check_images
from ..seeds import derive_seed
from .corruptions import CORRUPTIONS, Draws, corruption_id
from .spec import Shift, parse_shift

__all__ = ["corrupt", "image_generators"]


def image_generators(shift: Shift, seed: int, positions: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per image, seeded with ``derive_seed("shift/corruption", seed, id, severity, position)``:
    an image's draws depend on its position in the stream, never on the batch it arrives in."""
    cid, severity = corruption_id(shift.name), int(shift.severity)
    return [torch.Generator().manual_seed(derive_seed("shift/corruption", seed, cid, severity, int(p)))
            for p in positions.tolist()]


def corrupt(x: torch.Tensor, shift: Shift | str, *, seed: int, positions: torch.Tensor) -> torch.Tensor:
    """``x`` [B, C, H, W] (floats in [0, 1]) under the corruption ``shift``, clamped to [0, 1], same dtype and
    device; ``positions`` [B] are the images' positions in the stream (their random streams). Severity 0 and
    ``clean`` return the images unchanged (a copy).

    >>> x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    >>> y = corrupt(x, "contrast:5", seed=0, positions=torch.arange(2))
    >>> torch.allclose(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3))), torch.equal(
    ...     corrupt(x, "contrast:0", seed=0, positions=torch.arange(2)), x)
    (True, True)
    """
    shift = parse_shift(shift)
    check_images(x, name="corrupt: x")
    if not x.is_floating_point():
        raise ShapeError(f"corrupt: x must be floating images in [0, 1], got dtype {x.dtype}; use x.float() / 255")
    positions = torch.as_tensor(positions).reshape(-1)
    if positions.shape[0] != x.shape[0]:
        raise ShapeError(f"corrupt: positions must hold one position per image ({x.shape[0]}), got shape "
                         f"{tuple(positions.shape)}")
    if shift.adversarial:
        raise LayerlabError(f"corrupt: {shift} is an attack, not a corruption; use layerlab.shift.pgd or shifted()")
    if shift.clean:
        return x.clone()
    draws = Draws(image_generators(shift, seed, positions), x.device, x.dtype)
    with torch.no_grad():
        out = CORRUPTIONS.get(shift.name)(x.detach(), int(shift.severity), draws)
    return out.clamp_(0, 1).to(dtype=x.dtype)
