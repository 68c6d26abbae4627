"""The frozen linear of a 4-bit (bitsandbytes) base as one autograd node, without bitsandbytes' per-call Python.

bitsandbytes trains a ``Linear4bit`` at batch sizes past 1,536 rows by dequantizing the packed weight and calling
``F.linear`` (its ``gemm_4bit`` fallback, and again in ``MatMul4Bit.backward`` for the input gradient). The numbers
are those two torch calls; what costs is the Python around them: ``Linear4bit.forward``, ``MatMul4Bit``, the
``gemm_4bit`` custom op's dispatch and heuristics, and the double-quantized ``absmax`` dequantized again on every call.
Profiled on an H100 (BENCHMARKS.md, 2026-12-07, a Qwen2.5-3B-shaped LoRA step): 0.27 ms of host time per 4-bit
matmul forward and 0.31 ms per backward, about 200 ms of host work per step beside 232 ms of GPU work. A compiled
block runs that Python too: a custom op with a Python body stays Python inside the compiled graph. With this node
the 3B step measured 2.08x HF PEFT + bitsandbytes (1.43x without it; BENCHMARKS.md, 2026-12-08).

:func:`linear_4bit` computes the same function from the same pieces: the weight dequantized to the input's dtype
(``absmax`` given already dequantized: a frozen base's never changes), ``F.linear`` forward, ``dy @ W`` backward; it
saves only the packed weight (no dequantized copy lives between forward and backward). The dequantization is
bitsandbytes' own kernel (``torch.ops.bitsandbytes.dequantize_4bit``, one launch) in eager mode, and under
``torch.compile`` for NF4 the torch-op form of :func:`dequantize_nf4` (a 16-entry table lookup times the block's
absmax in float32, rounded once to the output dtype: what bitsandbytes' kernel computes), which inductor fuses into
one kernel with no host work. Both give bitsandbytes' values bit for bit (tests/test_quant.py checks every path
against ``bnb.nn.Linear4bit``, forward and input gradients). Torch ops only: bitsandbytes registers its ops when the
quantized base is loaded; nothing here imports it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                   shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A packed 4-bit weight (two codes per byte, the first in the high nibble) as ``dtype``: ``code[q] * absmax[block]``
    in float32, then cast. ``absmax`` is float32, one per ``blocksize`` weights (``numel`` a multiple of it)."""
    p = packed.reshape(-1)
    if p.dtype != torch.uint8:
        p = p.view(torch.uint8)
    q = torch.stack((p >> 4, p & 15), dim=1).reshape(-1).long()
    vals = code.float()[q].view(-1, blocksize) * absmax.view(-1, 1)
    return vals.view(*shape).to(dtype)


def dequantize_weight(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, shape: Sequence[int],
                      quant_type: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4-bit weight as ``dtype`` (``absmax`` float32): bitsandbytes' kernel, or under ``torch.compile`` for NF4
    :func:`dequantize_nf4` (the same values, fused by inductor)."""
    if quant_type == "nf4" and torch.compiler.is_compiling():
        return dequantize_nf4(packed, absmax, code, blocksize, shape, dtype)
    return torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, blocksize, quant_type, list(shape), dtype)


class _Linear4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, packed, absmax, code, blocksize, shape, quant_type):
        W = dequantize_weight(packed, absmax, code, blocksize, shape, quant_type, x.dtype)
        ctx.save_for_backward(packed, absmax, code)
        ctx.meta = (blocksize, tuple(shape), quant_type)
        return F.linear(x, W, bias)

    @staticmethod
    def backward(ctx, dy):
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        packed, absmax, code = ctx.saved_tensors
        blocksize, shape, quant_type = ctx.meta
        W = dequantize_weight(packed, absmax, code, blocksize, shape, quant_type, dy.dtype)
        return torch.matmul(dy, W), None, None, None, None, None, None, None


def linear_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                shape: Sequence[int], quant_type: str, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with ``W`` the frozen 4-bit weight (``shape`` = (out, in)) dequantized to ``x.dtype``;
    the gradient flows to ``x`` only (``bias``, if given, must not require grad)."""
    return _Linear4bit.apply(x, bias, packed, absmax, code, blocksize, tuple(shape), quant_type)


__all__ = ["dequantize_nf4", "dequantize_weight", "linear_4bit"]
