"""The TrAct weight gradient (Petersen et al. 2024): the pure formula and the autograd functions that use it.

``grad_W = grad_z^T x (x^T x / b + lam I_n)^(-1)`` on the ``b x n`` matrix of a layer's input rows
(:func:`tract_gradient`), solved in the cheaper of its ``n x n`` and ``b x b`` forms; ``_TrActConv2dFn`` and
``_TrActLinearFn`` run the plain conv/linear forward and return this weight gradient in the backward pass, with
the ordinary input and bias gradients.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..errors import LayerlabError, ShapeError

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
