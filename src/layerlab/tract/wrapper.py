"""The :class:`TrAct` module: wraps one first-layer ``nn.Conv2d`` / ``nn.Linear`` so its weight trains by TrAct
(Petersen et al. 2024); the forward value, state_dict keys and Parameters stay those of the wrapped layer."""
from __future__ import annotations

from typing import Any

import torch  # noqa: F401  (the examples use it)
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LayerlabError, ShapeError
from .gradient import _check_lam, _compute_dtype, _TrActConv2dFn, _TrActLinearFn

_SUPPORTED = "an nn.Conv2d with groups=1 or an nn.Linear"


def _check_layer(layer: nn.Module, where: str = "layer") -> None:
    """Raise LayerlabError unless ``layer`` is a plain Conv2d (groups=1) or Linear that TrAct can reproduce."""
    if isinstance(layer, TrAct):
        raise LayerlabError(f"TrAct: {where} is already a TrAct wrapper; wrap the original layer once")
    if not isinstance(layer, (nn.Conv2d, nn.Linear)):
        raise LayerlabError(
            f"TrAct: expected {where} to be {_SUPPORTED}, got {type(layer).__name__}; "
            "wrap the model's first Conv2d/Linear (e.g. model.conv1 or model.patch_embed.proj)"
        )
    base = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Linear
    overridden = [
        name for name in ("forward", "_conv_forward")
        if hasattr(base, name) and getattr(type(layer), name) is not getattr(base, name)
    ]
    if overridden:
        raise LayerlabError(
            f"TrAct: {where} is a {type(layer).__name__}, which overrides {', '.join(overridden)} of "
            f"nn.{base.__name__}; TrAct would silently change its forward pass. Replace it by a plain "
            f"nn.{base.__name__} with the same output first"
        )
    weight = layer.weight
    if not isinstance(weight, nn.Parameter) or isinstance(weight, nn.parameter.UninitializedParameter):
        raise LayerlabError(
            f"TrAct: {where}.weight must be an initialised nn.Parameter, got {type(layer.weight).__name__}; "
            "run one forward pass on lazy layers and remove weight parametrisations before wrapping"
        )
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise LayerlabError(
            f"TrAct: {where} is a grouped/depthwise Conv2d (groups={layer.groups}); the TrAct solve is "
            "defined for one shared patch matrix, i.e. groups=1. Apply TrAct to a groups=1 first layer"
        )


class TrAct(nn.Module):
    """Wrap a first-layer ``nn.Conv2d`` / ``nn.Linear`` so its weight trains by TrAct (Petersen et al. 2024).

    The forward value is that of ``layer``; only the weight gradient changes to
    ``grad_z^T x (x^T x / b + lam I)^-1``. The wrapper registers the layer's own ``weight`` and ``bias``
    Parameter objects under the same names, so optimisers built before wrapping keep working and
    **state_dict keys are unchanged** (``conv1.weight`` stays ``conv1.weight``): checkpoints load in either
    direction. The original module is kept (unregistered) as :attr:`layer` for :func:`remove`; its other
    attributes (``in_channels``, ``kernel_size``, ...) are readable through the wrapper. Hooks registered on
    the original module do not fire while it is wrapped.

    Conv2d keeps stride, padding (ints, tuples, ``'valid'``, ``'same'`` incl. asymmetric), dilation and
    padding_mode; groups != 1 is refused. Linear accepts any ``[..., n]`` input, contiguous or not. Under
    autocast the layer runs in the autocast dtype like the plain layer; the TrAct solve runs in float32 with
    autocast off and the gradient is returned in the weight's dtype.

    Args:
        layer: the layer to wrap.
        lam: ridge strength lambda > 0 (0.1 by default, 0.2 suggested for long training).

    Example:
        >>> conv = nn.Conv2d(3, 16, 3, padding=1)
        >>> tr = TrAct(conv, lam=0.1)
        >>> tr(torch.randn(2, 3, 8, 8)).sum().backward()
        >>> tr.weight is conv.weight and conv.weight.grad is not None
        True
    """

    def __init__(self, layer: nn.Conv2d | nn.Linear, lam: float = 0.1) -> None:
        _check_layer(layer)
        _check_lam(lam)
        super().__init__()
        self.register_parameter("weight", layer.weight)
        self.register_parameter("bias", layer.bias)
        self.lam = float(lam)
        self.training = layer.training
        # Kept outside _modules on purpose: state_dict keys stay those of the plain layer (conv1.weight).
        self.__dict__["_layer"] = layer
        if isinstance(layer, nn.Conv2d):
            self._pad_lrtb, self._conv_padding = self._resolve_padding(layer)

    @staticmethod
    def _resolve_padding(conv: nn.Conv2d) -> tuple[tuple[int, int, int, int] | None, tuple[int, int]]:
        """Split the conv's padding into an explicit F.pad (or None) and the symmetric padding conv2d gets."""
        kh, kw = conv.kernel_size
        dh, dw = conv.dilation
        if conv.padding == "valid":
            pairs = [(0, 0), (0, 0)]
        elif conv.padding == "same":
            # Same split as PyTorch: the extra pixel of an odd total goes to the right/bottom.
            pairs = [(t // 2, t - t // 2) for t in (dh * (kh - 1), dw * (kw - 1))]
        else:
            ph, pw = conv.padding
            pairs = [(ph, ph), (pw, pw)]
        (top, bottom), (left, right) = pairs
        if conv.padding_mode == "zeros" and top == bottom and left == right:
            return None, (top, left)
        return (left, right, top, bottom), (0, 0)

    @property
    def layer(self) -> nn.Conv2d | nn.Linear:
        """The wrapped original module (sharing this wrapper's Parameters)."""
        return self.__dict__["_layer"]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.__dict__.get("_layer")
            if layer is None or name.startswith("__"):
                raise
            return getattr(layer, name)

    def forward(self, x: Tensor) -> Tensor:
        layer = self.layer
        dtype = _compute_dtype(x)
        if isinstance(layer, nn.Linear):
            return _TrActLinearFn.apply(x, self.weight, self.bias, self.lam, dtype)
        if x.ndim not in (3, 4):
            raise ShapeError(
                f"TrAct(Conv2d): expected input [N, C, H, W] or [C, H, W], got shape {tuple(x.shape)}"
            )
        unbatched = x.ndim == 3
        if unbatched:
            x = x.unsqueeze(0)
        if self._pad_lrtb is not None:
            mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
            x = F.pad(x, self._pad_lrtb, mode=mode)
        out = _TrActConv2dFn.apply(
            x, self.weight, self.bias, self.lam, tuple(layer.stride), self._conv_padding,
            tuple(layer.dilation), dtype,
        )
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return f"{self.layer!r}, lam={self.lam}"

