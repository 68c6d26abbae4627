"""A fused LoRA linear: ``y = x W^T + b + s * ((drop(x) A^T) * g) B^T`` in one autograd node.

The unfused path (peft's ``lora.Linear.forward``) runs the base layer, then ``lora_B(lora_A(dropout(x))) * s``
and an add, each a separate autograd node; under autocast it also casts ``x`` to the adapter's float32
and back to bf16 (two ``N x d_in`` copies per layer and step) and scales and adds ``N x d_out`` results
elementwise. :class:`LoraLinearFunction` computes the same function with three
matmuls forward (the low-rank product is accumulated into the base output by ``addmm``) and saves
only what the backward needs, knowing the base weight is frozen:

* the dropped input ``drop(x)`` (``x`` itself when there is no dropout: the input gradient of the
  base GEMM needs ``W``, not ``x``), for A's gradient;
* the rank-``r`` intermediate ``h = drop(x) A^T`` (``N x r``), for B's (and the gate's) gradient;
* references to ``W``, ``A``, ``B`` (and the gate ``g``).

Backward: ``dx = dy W`` (only when ``x`` needs a gradient), ``dh' = s dy B``, ``dB = s dy^T h'``,
``dg = sum_rows(dh' * h)``, ``dh = dh' * g``, ``dA = dh^T drop(x)``, ``d drop(x) = dh A``; no
gradient for ``W`` or the bias (frozen). Dropout runs outside the node (its own autograd node keeps
the mask), so the random stream is drawn exactly as in peft. Everything is plain torch (GEMMs and a
few elementwise ops), which ``torch.compile`` traces through.

Weights stored ``d_in x d_out`` (GPT-2's ``Conv1D``, ``fan_in_fan_out``) are handled by a transposed
view, without a copy. Inputs enter in the compute dtype (:func:`lora_linear` casts them: the autocast
dtype under autocast, as the unfused layers would compute).
"""

from __future__ import annotations

from typing import Optional

import torch


def _wt(W: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """The base weight as a ``d_in x d_out`` matrix (a view)."""
    return W if fan_in_fan_out else W.t()


def _low_rank_backward(ctx, dz2, xd2, h, W, A, B, g, need_x, need_xd, need_A, need_B, need_g, same):
    """Gradients of ``z = x W^T + s ((xd A^T) * g) B^T`` given ``dz`` (rows): ``(dx, dxd, dA, dB, dg)``,
    None where not needed (see the module docstring); ``same``: ``xd`` is ``x``, ``dx`` includes both paths."""
    s, shape = ctx.scale, ctx.shape
    dhg = (dz2 @ B).mul_(s)  # d(h * g), N x r
    dB = dg = dA = dx = dxd = None
    if need_B:
        dB = (dz2.t() @ (h if g is None else h * g)).mul_(s)
    if need_g and g is not None:
        dg = (dhg * h).sum(0)
    dh = dhg if g is None else dhg * g
    if need_A:
        dA = dh.t() @ xd2
    if need_x:
        dx = dz2 @ _wt(W, ctx.fan_in_fan_out).t()
        if same:
            dx = dx.addmm_(dh, A)
        dx = dx.view(shape)
    if need_xd and not same:
        dxd = (dh @ A).view(shape)
    return dx, dxd, dA, dB, dg


def _low_rank_forward(ctx, x, xd, W, b, A, B, g, scale, fan_in_fan_out):
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xd2 = x2 if xd is None else xd.reshape(-1, shape[-1])
    Wt = _wt(W, fan_in_fan_out)
    y = torch.addmm(b, x2, Wt) if b is not None else x2 @ Wt
    h = xd2 @ A.t()
    y = y.addmm_(h if g is None else h * g, B.t(), alpha=scale)
    ctx.scale, ctx.fan_in_fan_out, ctx.shape = scale, fan_in_fan_out, shape
    return y, xd2, h


class LoraLinearFunction(torch.autograd.Function):
    """``(x, xd, W, b, A, B, g, scale, fan_in_fan_out) -> x W^T + b + scale * ((xd A^T) * g) B^T``.

    ``xd`` is the dropped input, or None when it is ``x`` itself; ``b`` and ``g`` may be None.
    ``W`` and ``b`` get no gradient (the caller uses this only for a frozen base).
    """

    @staticmethod
    def forward(ctx, x, xd, W, b, A, B, g, scale: float, fan_in_fan_out: bool):
        y, xd2, h = _low_rank_forward(ctx, x, xd, W, b, A, B, g, scale, fan_in_fan_out)
        ctx.same = xd is None
        ctx.save_for_backward(xd2, h, W, A, B, g)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        xd2, h, W, A, B, g = ctx.saved_tensors
        n = ctx.needs_input_grad  # (x, xd, W, b, A, B, g, ...)
        dx, dxd, dA, dB, dg = _low_rank_backward(ctx, dy.reshape(-1, dy.shape[-1]), xd2, h, W, A, B, g,
                                                 n[0], n[1], n[4], n[5], n[6], ctx.same)
        return dx, dxd, None, None, dA, dB, dg, None, None


class DoraLinearFunction(torch.autograd.Function):
    """DoRA without dropout: ``(x, W, b, A, B, g, c, scale, fan_in_fan_out) -> c * (x W^T + s ((x A^T) * g) B^T) + b``.

    ``c = m / ||W + s B diag(g) A||_row`` (``d_out``) is DoRA's magnitude scale, computed by the caller
    with the norm detached, so its gradient reaches the magnitude ``m`` through that division. This
    is peft's ``(c - 1) * W x + c * s * B A x`` plus the base output, regrouped. Saved: ``x``, ``h``
    and the unscaled ``z = x W^T + s h B^T`` (the magnitude's gradient is ``sum_rows(dy * z)``).
    """

    @staticmethod
    def forward(ctx, x, W, b, A, B, g, c, scale: float, fan_in_fan_out: bool):
        z, x2, h = _low_rank_forward(ctx, x, None, W, None, A, B, g, scale, fan_in_fan_out)
        cz = c.to(z.dtype)  # c may be float32 (its gradient then accumulates in float32)
        y = torch.addcmul(b, z, cz) if b is not None else z * cz
        ctx.save_for_backward(x2, h, W, A, B, g, c, z)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, h, W, A, B, g, c, z = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dc = torch.sum(dy2 * z, 0, dtype=c.dtype) if ctx.needs_input_grad[6] else None
        n = ctx.needs_input_grad  # (x, W, b, A, B, g, c, ...)
        dx, _, dA, dB, dg = _low_rank_backward(ctx, dy2 * c.to(dy2.dtype), x2, h, W, A, B, g, n[0], False, n[3], n[4], n[5], True)
        return dx, None, None, dA, dB, dg, dc, None, None


class DoraDropoutLinearFunction(torch.autograd.Function):
    """DoRA with dropout: ``(x, xd, W, b, A, B, g, c, ...) -> x W^T + b + (c - 1) * (xd W^T) + c * s ((xd A^T) * g) B^T``.

    peft's DoRA with dropout active: the base output of ``x`` plus the DoRA terms of the dropped input
    ``xd`` (two base GEMMs forward, as in peft). With ``z = xd W^T + s h B^T``, ``y = x W^T + b + c z - xd W^T``;
    saved: ``xd``, ``h``, ``z``. Backward: ``dc = sum_rows(dy * z)``, ``dx = dy W``,
    ``d xd = (dy * (c - 1)) W + dh A``, and A, B, g from ``dz = dy * c``.
    """

    @staticmethod
    def forward(ctx, x, xd, W, b, A, B, g, c, scale: float, fan_in_fan_out: bool):
        shape = x.shape
        x2, xd2 = x.reshape(-1, shape[-1]), xd.reshape(-1, shape[-1])
        Wt = _wt(W, fan_in_fan_out)
        y = torch.addmm(b, x2, Wt) if b is not None else x2 @ Wt
        u = xd2 @ Wt
        h = xd2 @ A.t()
        z = torch.addmm(u, h if g is None else h * g, B.t(), alpha=scale)
        y = y.addcmul_(z, c.to(z.dtype)).sub_(u)
        ctx.scale, ctx.fan_in_fan_out, ctx.shape = scale, fan_in_fan_out, shape
        ctx.save_for_backward(xd2, h, W, A, B, g, c, z)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        xd2, h, W, A, B, g, c, z = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        n = ctx.needs_input_grad  # (x, xd, W, b, A, B, g, c, ...)
        cz = c.to(dy2.dtype)
        dc = torch.sum(dy2 * z, 0, dtype=c.dtype) if n[7] else None
        _, dxd, dA, dB, dg = _low_rank_backward(ctx, dy2 * cz, xd2, h, W, A, B, g, False, n[1], n[4], n[5], n[6], False)
        Wback = _wt(W, ctx.fan_in_fan_out).t()
        dx = (dy2 @ Wback).view(ctx.shape) if n[0] else None
        if dxd is not None:  # the (c - 1) * (xd W^T) term's share
            dxd = dxd.view(-1, dxd.shape[-1]).addmm_(dy2 * (cz - 1), Wback).view(ctx.shape)
        return dx, dxd, None, None, dA, dB, dg, dc, None, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's when it is on for ``x``'s device, else ``x``'s."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def lora_linear(x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], A: torch.Tensor, B: torch.Tensor, scale: float,
                dropout=None, gate: Optional[torch.Tensor] = None, fan_in_fan_out: bool = False,
                magnitude_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fused LoRA linear of ``x`` (any leading shape), in the compute dtype.

    With ``magnitude_scale`` (DoRA's ``m / ||W + s B A||_row``) it is the fused DoRA linear (with dropout:
    :class:`DoraDropoutLinearFunction`, peft's DoRA of the dropped input on top of the base output of ``x``).

    ``dropout`` is a callable (``nn.Dropout``) applied to LoRA's input, or None / ``nn.Identity`` for
    none. Under autocast every operand is cast to the autocast dtype first (the casts of ``A``, ``B`` and
    the gate are ordinary autograd ops, so their float32 gradients arrive through them), and the
    node itself runs with autocast off.
    """
    dt = compute_dtype(x)
    dev = x.device.type
    x = x.to(dt)
    xd = None
    if dropout is not None and not isinstance(dropout, torch.nn.Identity):
        xd = dropout(x)
        if xd is x:  # a dropout of p = 0 that returned its input
            xd = None
    args = (W.to(dt), None if b is None else b.to(dt), A.to(dt), B.to(dt), None if gate is None else gate.to(dt))
    with torch.autocast(dev, enabled=False):
        if magnitude_scale is not None:
            # the scale enters in float32 (as peft's m / ||.|| is): its gradient, a sum over every row, accumulates there
            c = magnitude_scale.to(torch.promote_types(dt, torch.float32))
            if xd is not None:
                return DoraDropoutLinearFunction.apply(x, xd, *args, c, float(scale), bool(fan_in_fan_out))
            return DoraLinearFunction.apply(x, *args, c, float(scale), bool(fan_in_fan_out))
        return LoraLinearFunction.apply(x, xd, *args, float(scale), bool(fan_in_fan_out))


def lora_linear_reference(x, W, b, A, B, scale, dropout=None, gate=None, fan_in_fan_out=False, magnitude_scale=None):
    """The same function from separate torch ops (the autograd graph peft builds), for tests."""
    Wt = _wt(W, fan_in_fan_out)
    y = x @ Wt
    if b is not None:
        y = y + b
    xd = x if dropout is None else dropout(x)
    h = xd @ A.t()
    if gate is not None:
        h = h * gate
    if magnitude_scale is not None:  # peft's DoRA: (c - 1) * W xd + c * s * B A xd on top of W x + b
        base = xd @ Wt
        return y + (magnitude_scale - 1) * base + magnitude_scale * (h @ B.t()) * scale
    return y + (h @ B.t()) * scale
