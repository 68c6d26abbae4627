"""``system.quant_linear``: the 4-bit base's frozen linears computed by :func:`peftlab.kernels.linear4bit.linear_4bit`.

:func:`install_quant_linear` gives every ``bnb.nn.Linear4bit`` of a model (the adapted layers' bases and the frozen
MLPs alike) a forward with bitsandbytes' numbers and a fraction of its host work (the kernel's docstring says where
that goes). It falls back to bitsandbytes' own forward wherever the two could differ: a trainable or not yet cast
bias, an unset compute dtype, a weight re-quantized since the install, CPU inference where bitsandbytes packs the
weight for AVX-512, and on CUDA batches of at most :data:`BNB_DEQUANT_ROWS` rows (bitsandbytes' fused small-batch
kernel). ``auto`` = on CUDA only: CPU runs keep
bitsandbytes' forward call for call (the numbers are the same either way; tests/test_quant.py checks both on the CPU).
"""

from __future__ import annotations

import functools
import types

import torch

from ..kernels.linear4bit import dequantize_weight, linear_4bit
from .fast import auto_on

#: bitsandbytes' CUDA ``gemm_4bit`` dequantizes and calls ``F.linear`` past this many rows (fewer may take its own
#: fused kernel, whose numbers differ): peftlab's forward takes over only there (bitsandbytes' ``_gemm_4bit_custom_max_m``)
BNB_DEQUANT_ROWS = 1536


def quant_linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The forward installed on a ``bnb.nn.Linear4bit`` by :func:`install_quant_linear`: the same numbers as the class's
    forward through :func:`peftlab.kernels.linear4bit.linear_4bit`, or the class's forward where that does not hold."""
    w, cached = self.weight, self._peftlab_absmax
    qs = getattr(w, "quant_state", None)
    bias = self.bias
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    if (qs is None or qs is not cached[0] or not self.compute_type_is_set or self.compute_dtype is None
            or (bias is not None and (bias.requires_grad or bias.dtype != self.compute_dtype))
            or (x.device.type == "cuda" and rows <= BNB_DEQUANT_ROWS) or rows == 0 or x.shape[-1] != qs.shape[1]
            or (x.device.type == "cpu" and getattr(self, "support_avx512bf16_for_cpu", False) and not self.training)):
        return type(self).forward(self, x)
    inp_dtype = x.dtype
    out = linear_4bit(x.to(self.compute_dtype), w, cached[1], qs.code, qs.blocksize, qs.shape, qs.quant_type, bias)
    return out.to(inp_dtype)


def _float_absmax(qs) -> torch.Tensor:
    """A 4-bit weight's per-block scales in float32: the double-quantized ones dequantized as bitsandbytes does each call."""
    if not qs.nested:
        return qs.absmax.float()
    import bitsandbytes.functional as bnbf

    return (bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()


def quant_linear_enabled(setting: str, device) -> bool:
    """``system.quant_linear`` on ``device``: ``auto`` = on CUDA only."""
    return auto_on(setting, device, "system.quant_linear")


@torch.no_grad()
def install_quant_linear(model: torch.nn.Module) -> int:
    """Give every 4-bit ``bnb.nn.Linear4bit`` of ``model`` :func:`quant_linear_forward`; return how many.

    Each keeps its per-block scales dequantized once (float32: 4 bytes per block of 64 weights, 0.5 bit per weight,
    beside double quantization's 0.127); the module's parameters, state dict and ``quant_state`` are untouched. Layers
    whose weight does not divide into its blocks keep bitsandbytes' forward."""
    n = 0
    for mod in model.modules():
        qs = getattr(getattr(mod, "weight", None), "quant_state", None)
        if qs is None or not hasattr(mod, "compute_type_is_set") or len(qs.shape) != 2:
            continue
        if qs.shape[0] * qs.shape[1] % qs.blocksize or getattr(qs, "packing_format_for_cpu", False):
            continue
        absmax = _float_absmax(qs)
        mod._peftlab_absmax = (qs, absmax)
        # what models.quant.float_weight returns (DoRA's row norm, SDoRA, BA-LoRA's scores): the weight in its
        # quant_state's dtype, from the same cached scales
        mod._peftlab_dequant = functools.partial(dequantize_weight, absmax=absmax, code=qs.code, blocksize=qs.blocksize,
                                                 shape=tuple(qs.shape), quant_type=qs.quant_type, dtype=qs.dtype)
        mod.forward = types.MethodType(quant_linear_forward, mod)
        n += 1
    return n


def uninstall_quant_linear(model: torch.nn.Module) -> int:
    """Undo :func:`install_quant_linear` (the class's forward again, the cached scales dropped)."""
    n = 0
    for mod in model.modules():
        if "_peftlab_absmax" in mod.__dict__:
            del mod._peftlab_absmax, mod._peftlab_dequant
            mod.__dict__.pop("forward", None)
            n += 1
    return n


__all__ = ["BNB_DEQUANT_ROWS", "install_quant_linear", "uninstall_quant_linear", "quant_linear_enabled", "quant_linear_forward"]
