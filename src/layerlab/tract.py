"""TrAct: train the first layer's activations instead of its weights (Petersen et al., NeurIPS 2024).

The weight gradient of a vision model's first layer, ``grad_z^T x``, is proportional to pixel values, so
high-contrast images dominate its updates and the layer learns slowly. TrAct (Petersen, Borgelt, Ermon 2024,
arXiv:2410.23970) replaces it by the closed-form ridge solution for the weight step that best realises a
gradient step on the activations ``z = x W^T``::

    grad_W = grad_z^T x (x^T x / b + lam I_n)^(-1)

with ``x`` the ``b x n`` matrix of unfolded input rows (conv: one row per output position holding its
``C k_h k_w`` patch; linear: one row per input vector). The forward pass, the bias gradient and the input
gradient are unchanged, so the optimiser (SGD, Adam, schedules) just sees a different weight gradient.

Public API: :class:`TrAct` wraps one ``nn.Conv2d`` / ``nn.Linear``; :func:`apply` finds any model's first layer
and wraps it in place; :func:`remove` undoes it; :func:`tract_gradient` is the pure formula on row matrices.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from layerlab.errors import LayerlabError, ShapeError
from layerlab.runtime import eval_mode, resolve_device

__all__ = ["TrAct", "apply", "remove", "tract_gradient"]

_SUPPORTED = "an nn.Conv2d with groups=1 or an nn.Linear"


# ----------------------------------------------------------------------------------------------------------
# Pure core: the preconditioned gradient on row matrices
# ----------------------------------------------------------------------------------------------------------


def _solve_spd(a: Tensor, rhs: Tensor) -> Tensor:
    """Solve ``a @ out = rhs`` for symmetric positive definite ``a`` by Cholesky (LU if that fails)."""
    chol, info = torch.linalg.cholesky_ex(a)
    # ``a`` is x^T x / b + lam I with lam > 0, so Cholesky only fails when rounding makes it indefinite
    # (lam tiny against the Gram scale); a pivoted LU solve is the robust fallback.
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.solve(a, rhs)


def _tract_from_rows(rows: Tensor, grad_rows: Tensor, lam: float) -> Tensor:
    """``grad_rows^T rows (rows^T rows / b + lam I)^-1`` as an ``m x n`` matrix, choosing the cheaper form.

    ``rows`` is ``b x n``, ``grad_rows`` is ``b x m``, both in the solve dtype. For ``b >= n`` the ``n x n``
    system is solved; for ``b < n`` the push-through identity
    ``x (x^T x / b + lam I_n)^-1 = (x x^T / b + lam I_b)^-1 x`` gives the same result from a ``b x b`` system.
    """
    b, n = rows.shape
    if b == 0:
        return rows.new_zeros(grad_rows.shape[1], n)
    if b >= n:
        eye = torch.eye(n, dtype=rows.dtype, device=rows.device).mul_(lam)
        gram = torch.addmm(eye, rows.T, rows, alpha=1.0 / b)
        return _solve_spd(gram, rows.T @ grad_rows).T
    eye = torch.eye(b, dtype=rows.dtype, device=rows.device).mul_(lam)
    kernel = torch.addmm(eye, rows, rows.T, alpha=1.0 / b)
    return _solve_spd(kernel, grad_rows).T @ rows


def tract_gradient(rows: Tensor, grad_rows: Tensor, lam: float = 0.1) -> Tensor:
    """TrAct weight gradient ``grad_z^T x (x^T x / b + lam I_n)^-1`` (Petersen et al. 2024, eq. for TrAct).

    Args:
        rows: the layer's input rows ``x``, shape ``[b, n]`` (conv: unfolded patches).
        grad_rows: the gradient of the loss w.r.t. the layer output ``grad_z``, shape ``[b, m]``.
        lam: the ridge strength lambda > 0; larger values approach ``vanilla / lam``.

    Returns:
        The ``[m, n]`` gradient in the dtype of ``rows``, solved in at least float32 without autocast.

    Example:
        >>> x, g = torch.randn(64, 27), torch.randn(64, 8)
        >>> tract_gradient(x, g, lam=0.1).shape
        torch.Size([8, 27])
    """
    _check_lam(lam)
    if rows.ndim != 2 or grad_rows.ndim != 2 or rows.shape[0] != grad_rows.shape[0]:
        raise ShapeError(
            f"tract_gradient: expected rows [b, n] and grad_rows [b, m] with the same b, got "
            f"{tuple(rows.shape)} and {tuple(grad_rows.shape)}; flatten all leading dimensions into b first"
        )
    dtype = torch.promote_types(rows.dtype, torch.float32)
    with _no_autocast(rows.device.type):
        out = _tract_from_rows(rows.to(dtype), grad_rows.to(dtype), float(lam))
    return out.to(rows.dtype)


def _check_lam(lam: float) -> None:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
        raise LayerlabError(
            f"TrAct: lam must be a finite number > 0 (the paper uses 0.1, or 0.2 for long runs), got {lam!r}"
        )


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager[Any]:
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype autocast would run a conv/linear on ``t`` in (``t.dtype`` when autocast is off)."""
    dev = t.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        if t.is_floating_point() and t.dtype != torch.float64:
            return torch.get_autocast_dtype(dev)
    return t.dtype


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _conv_rows(
    x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int], dtype: torch.dtype,
) -> Tensor:
    """Unfold ``x [N, C, H, W]`` into patch rows ``[N*Ho*Wo, C*kh*kw]`` with one copy (any memory layout).

    Rows are ordered (N, Ho, Wo) and columns (C, kh, kw), matching ``weight.reshape(out, -1)``. The patches
    are a strided view of the (zero-padded) input; the only materialisation is one copy into a ``[n, b]``
    buffer (faster to fill than ``[b, n]`` and free to use transposed in the Gram GEMM).
    """
    if padding[0] or padding[1]:
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    n_img, chans, height, width = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    out_h = (height - dh * (kh - 1) - 1) // sh + 1
    out_w = (width - dw * (kw - 1) - 1) // sw + 1
    s_n, s_c, s_h, s_w = x.stride()
    shape = (chans, kh, kw, n_img, out_h, out_w)
    patches = x.as_strided(shape, (s_c, s_h * dh, s_w * dw, s_n, s_h * sh, s_w * sw))
    cols = torch.empty(shape, dtype=dtype, device=x.device)
    cols.copy_(patches)
    return cols.view(chans * kh * kw, n_img * out_h * out_w).T


# ----------------------------------------------------------------------------------------------------------
# Autograd functions
# ----------------------------------------------------------------------------------------------------------


class _TrActConv2dFn(torch.autograd.Function):
    """conv2d forward; backward with the ordinary input/bias gradients and the TrAct weight gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, lam: float, stride: tuple[int, int],
        padding: tuple[int, int], dilation: tuple[int, int], dtype: torch.dtype,
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conf = (lam, stride, padding, dilation, dtype, bias is not None)
        with _no_autocast(x.device.type):
            return F.conv2d(x.to(dtype), weight.to(dtype), _cast(bias, dtype), stride, padding, dilation, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        lam, stride, padding, dilation, dtype, has_bias = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        solve_dtype = torch.promote_types(weight.dtype, torch.float32)
        with _no_autocast(x.device.type):
            rows = _conv_rows(x, weight.shape[2:], stride, padding, dilation, solve_dtype) if need_w else None
            # b >= n (the usual case): precondition the native weight gradient grad_z^T x from the right,
            # which is cheaper than forming grad_z^T x from the unfolded rows. b < n: the b x b form.
            native_w = need_w and rows.shape[0] >= rows.shape[1] > 0
            need_b = need_b and has_bias
            if need_x or native_w or need_b:  # input and bias gradients exactly as autograd computes them
                grad_x, grad_native, grad_b = torch.ops.aten.convolution_backward(
                    grad_out, x.to(dtype), weight.to(dtype), [weight.shape[0]] if need_b else None,
                    list(stride), list(padding), list(dilation), False, [0, 0], 1, [need_x, native_w, need_b],
                )
                grad_x = grad_x.to(x.dtype) if need_x else None
                grad_b = grad_b.to(weight.dtype) if need_b else None
            if native_w:
                b, n = rows.shape
                eye = torch.eye(n, dtype=solve_dtype, device=rows.device).mul_(lam)
                gram = torch.addmm(eye, rows.T, rows, alpha=1.0 / b)
                del rows
                rhs = grad_native.reshape(weight.shape[0], n).T.to(solve_dtype)
                grad_w = _solve_spd(gram, rhs).T.reshape(weight.shape).to(weight.dtype)
            elif need_w:
                grad_rows = grad_out.permute(0, 2, 3, 1).reshape(rows.shape[0], -1).to(solve_dtype)
                grad_w = _tract_from_rows(rows, grad_rows, lam).reshape(weight.shape).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


class _TrActLinearFn(torch.autograd.Function):
    """linear forward on ``[..., n]``; backward with the TrAct weight gradient over all leading rows."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, lam: float, dtype: torch.dtype,
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conf = (lam, dtype, bias is not None)
        with _no_autocast(x.device.type):
            return F.linear(x.to(dtype), weight.to(dtype), _cast(bias, dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        lam, dtype, has_bias = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        with _no_autocast(x.device.type):
            if need_x:
                grad_x = grad_out.to(dtype).matmul(weight.to(dtype)).to(x.dtype)
            solve_dtype = torch.promote_types(weight.dtype, torch.float32)
            grad_rows = grad_out.reshape(-1, weight.shape[0])
            if need_w:
                # One copy at most: a non-contiguous (e.g. transposed 3-D) input becomes contiguous rows here.
                rows = x.to(dtype=solve_dtype, memory_format=torch.contiguous_format)
                rows = rows.reshape(-1, weight.shape[1])
                grad_w = _tract_from_rows(rows, grad_rows.to(solve_dtype), lam).to(weight.dtype)
            if need_b and has_bias:
                grad_b = grad_rows.sum(0, dtype=solve_dtype).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None


# ----------------------------------------------------------------------------------------------------------
# Module wrapper
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# apply / remove on whole models
# ----------------------------------------------------------------------------------------------------------


# Known stems by structure: timm's ``patch_embed.proj`` (ViT, DeiT, Swin, ...) and torchvision ViT's ``conv_proj``.
# Used to size the probe, and as the answer when the probe forward cannot run at all.
_STEM_HINTS = ("patch_embed.proj", "conv_proj")
# Layer types that count as "a layer" when looking for the first one (norms and activations do not).
_LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def _stem_hint(model: nn.Module) -> tuple[str, nn.Module] | None:
    for path in _STEM_HINTS:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, _LAYER_TYPES):
            return path, module
    return None


def _probe_input(model: nn.Module) -> Tensor:
    """A tiny image batch the model accepts.

    Size from timm/torchvision ``img_size``/``image_size`` attributes (fixed-size ViTs), else 32x32 (enough
    for a ResNet's five halvings); channels from the patch embedding, else the first registered Conv2d, else 3.
    """
    size: tuple[int, int] = (32, 32)
    for module in model.modules():
        value = getattr(module, "img_size", None) or getattr(module, "image_size", None)
        if isinstance(value, int):
            size = (value, value)
            break
        if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
            size = (int(value[0]), int(value[1]))
            break
    hint = _stem_hint(model)
    if hint is not None and isinstance(hint[1], nn.Conv2d):
        chans = hint[1].in_channels
    else:
        chans = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = resolve_device(None, model)  # where the model is: layerlab never moves a model
    dtype = param.dtype if param is not None else torch.float32
    return torch.randn(2, chans, *size, device=device, dtype=dtype)


def _learnable(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.requires_grad


def _describe(name: str, module: nn.Module) -> str:
    """``'conv1' (Conv2d)``, with the reason when TrAct cannot wrap it or it is frozen."""
    kind = type(module).__name__
    if not _learnable(module):
        return f"'{name}' ({kind}, frozen)"
    try:
        _check_layer(module, where=name)
    except LayerlabError:
        groups = getattr(module, "groups", 1)
        why = f"groups={groups}" if isinstance(module, nn.Conv2d) and groups != 1 else "not wrappable"
        return f"'{name}' ({kind}, {why})"
    return f"'{name}' ({kind})"


def _forward_order(model: nn.Module, example_input: Tensor | None) -> tuple[list[nn.Module], BaseException | None]:
    """The conv/linear modules in the order a forward pass on ``example_input`` first calls them.

    Eval mode, no grad, hooks and training flags restored. Returns the order (possibly partial) and the
    exception the forward raised, if any.
    """
    probe = _probe_input(model) if example_input is None else example_input
    order: list[nn.Module] = []
    seen: set[int] = set()

    def hook(module: nn.Module, _args: Any) -> None:
        if id(module) not in seen:
            seen.add(id(module))
            order.append(module)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, _LAYER_TYPES)]
    error: BaseException | None = None
    try:
        with eval_mode(model), torch.no_grad():
            model(probe)
    except Exception as err:  # noqa: BLE001 - the probe is a guess; the caller reports it when it matters
        error = err
    finally:
        for handle in handles:
            handle.remove()
    if error is not None:
        error.probe_shape = tuple(probe.shape)  # type: ignore[attr-defined]
    return order, error


def _first_layer(model: nn.Module, example_input: Tensor | None) -> tuple[str, nn.Module]:
    """Name and module of the first learnable Conv/Linear in forward order; refuse one TrAct cannot wrap."""
    names: dict[int, str] = {}
    for qual, module in model.named_modules():
        names.setdefault(id(module), qual or "<model>")
    order, error = _forward_order(model, example_input)
    learnable = [m for m in order if _learnable(m)]
    if not learnable:
        hint = _stem_hint(model)
        if hint is not None and _learnable(hint[1]):
            return hint  # the probe could not run: fall back on the known patch-embedding path
        if error is not None:
            raise LayerlabError(
                f"TrAct.apply: could not run the model on a probe input of shape {error.probe_shape} to find "
                f"its first layer ({type(error).__name__}: {error}); pass example_input=<one batch> or "
                "layer='<module path>' (e.g. 'conv1' or 'patch_embed.proj')"
            ) from error
        ran = ", ".join(_describe(names[id(m)], m) for m in order[:4])
        raise LayerlabError(
            f"TrAct.apply: no learnable nn.Conv2d or nn.Linear ran in the forward pass of {type(model).__name__}"
            + (f" (only {ran})" if ran else "")
            + "; TrAct needs a convolutional or linear first layer (pass layer='<module path>' to choose one)"
        )
    target = learnable[0]
    name = names[id(target)]
    try:
        _check_layer(target, where=f"'{name}'")
    except LayerlabError as err:
        candidates = ", ".join(_describe(names[id(m)], m) for m in order[:5])
        more = f" (+{len(order) - 5} more)" if len(order) > 5 else ""
        reason = str(err).removeprefix("TrAct: ")
        raise LayerlabError(
            f"TrAct.apply: the first learnable layer of {type(model).__name__} in forward order cannot be "
            f"wrapped: {reason}. Conv/Linear layers in forward order: {candidates}{more}; pass "
            "layer='<module path>' to wrap another one explicitly"
        ) from None
    return name, target


def _iter_tract(model: nn.Module) -> Iterator[tuple[str, TrAct]]:
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, TrAct):
            yield name, module


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> list[str]:
    """Point every attribute of ``model`` that holds ``old`` at ``new``; return the qualified names."""
    names = []
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, child_name, new)
                names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


def apply(
    model: nn.Module, lam: float = 0.1, *, layer: str | nn.Module | None = None, name: str | None = None,
    example_input: Tensor | None = None,
) -> nn.Module:
    """Wrap the model's first layer (its stem) in :class:`TrAct` in place and return the model.

    The stem is found from the model's structure, not its class or attribute names: a tiny forward pass
    with pre-hooks on every conv/linear module (on ``example_input``, by default a 2-image random batch sized
    from the model's ``img_size``/``image_size`` attribute, else 32x32) gives the real execution order, and
    the first one with a trainable weight is taken. This finds ``conv1`` of timm and torchvision ResNets,
    ``stem.0`` of ConvNeXt, ``conv_stem`` of EfficientNet, ``patch_embed.proj`` of timm ViTs and
    ``conv_proj`` of torchvision ViTs, also behind leading parameter-free modules. If the probe cannot run,
    a timm ``patch_embed.proj`` / torchvision ``conv_proj`` is used when present. The probe runs in eval mode
    under no_grad, so BatchNorm statistics are untouched; forward hooks on the model do see it.

    Args:
        model: the model, edited in place.
        lam: ridge strength lambda > 0.
        layer: pick the layer explicitly, as a module path (``"conv1"``) or the module itself; no probe runs.
        name: older spelling of ``layer`` (a module path).
        example_input: one batch for the probe, when the default guess does not fit the model.

    If ``model`` itself is the layer, the wrapper is returned instead (there is no parent to edit).
    Raises LayerlabError when TrAct is already applied, nothing suitable is found, or the first layer cannot
    be wrapped (not a Conv2d/Linear, groups != 1, a subclass with its own forward); that message lists the
    conv/linear layers in forward order so one can be passed as ``layer=``.

    Example:
        >>> import timm
        >>> net = apply(timm.create_model("resnet18", num_classes=10))
        >>> type(net.conv1).__name__
        'TrAct'
    """
    _check_lam(lam)
    if name is not None:
        if layer is not None and layer != name:
            raise LayerlabError(f"TrAct.apply: pass layer= or its older spelling name=, not both ({layer!r}, {name!r})")
        layer = name
    present = [n or "<model>" for n, _ in _iter_tract(model)]
    if present:
        raise LayerlabError(
            f"TrAct.apply: TrAct is already applied at {', '.join(present)}; call layerlab.tract.remove(model) "
            "first to change lam or the layer"
        )
    if isinstance(layer, nn.Module):
        target = layer
        where = next((n or "<model>" for n, m in model.named_modules() if m is target), None)
        if where is None:
            raise LayerlabError(
                f"TrAct.apply: layer= is a {type(target).__name__} that is not a submodule of "
                f"{type(model).__name__}; pass one of its modules or a path from dict(model.named_modules())"
            )
    elif isinstance(layer, str):
        try:
            target = model.get_submodule(layer)
        except AttributeError as err:
            raise LayerlabError(
                f"TrAct.apply: the model has no submodule {layer!r} ({err}); pass a path from "
                "dict(model.named_modules()), e.g. 'conv1' or 'patch_embed.proj'"
            ) from None
        where = layer or "<model>"
    elif layer is None:
        where, target = _first_layer(model, example_input)
    else:
        raise LayerlabError(
            f"TrAct.apply: layer= must be a module path (str) or an nn.Module, got {type(layer).__name__}"
        )
    _check_layer(target, where=f"'{where}'")
    wrapper = TrAct(target, lam=lam)
    if target is model:
        return wrapper
    _replace(model, target, wrapper)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: put every TrAct-wrapped layer back (with the wrapper's current Parameters).

    Returns ``model``, or the original layer when ``model`` itself is a TrAct wrapper. Raises LayerlabError
    when the model holds no TrAct wrapper.
    """
    if isinstance(model, TrAct):
        return _unwrap(model)
    found = list(_iter_tract(model))
    if not found:
        raise LayerlabError(
            f"TrAct.remove: {type(model).__name__} holds no TrAct wrapper; nothing to remove "
            "(apply it with layerlab.tract.apply(model))"
        )
    for _, wrapper in {id(w): (n, w) for n, w in found}.values():
        _replace(model, wrapper, _unwrap(wrapper))
    return model


def _unwrap(wrapper: TrAct) -> nn.Module:
    layer = wrapper.layer
    # Re-attach the wrapper's Parameters: .to()/.cuda() may have swapped them for new objects.
    layer.weight = wrapper.weight
    if wrapper.bias is not None:
        layer.bias = wrapper.bias
    layer.train(wrapper.training)
    return layer
