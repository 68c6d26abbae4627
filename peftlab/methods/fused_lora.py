"""``lora.fused``: peft's LoRA (and DoRA) ``Linear`` forward computed by peftlab's fused kernel.

:func:`install_fused_lora` gives every peft ``lora.Linear`` whose base is a plain ``nn.Linear`` or
GPT-2 ``Conv1D`` a forward that calls :func:`peftlab.kernels.lora.lora_linear` (base GEMM and the
low-rank path in one autograd node that saves only ``x`` and the rank-``r`` intermediate). The module,
its parameters and state-dict keys are untouched: only the instance's ``forward`` is replaced, and it
falls back to peft's own forward whenever the fused one does not compute the same function:
adapters disabled or merged, several active adapters, a trainable base weight or bias, LoRA biases,
per-call arguments (mixed-adapter batches), operands of different dtypes without autocast, or a LoRA
variant other than DoRA.

Covered: plain LoRA (any dropout, drawn by peft's own dropout module, so the random stream is the
one peft draws), SoRA's gated A (:class:`~peftlab.methods.sora.layers.GatedLoraA`), DoRA and
SDoRA, with or without dropout (the magnitude scale ``m / ||W + s B A||_row`` from the factored, detached row
norm of :func:`~peftlab.methods.sora.layers.dora_row_norm`, the same function as peft's dense norm).

``lora.fused``: ``auto`` = on CUDA only (CPU numbers stay peft's, bit for bit), ``on``, ``off``.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ..errors import PeftlabError
from ..kernels.lora import compute_dtype, lora_linear
from .sora.layers import DoraLinearLayer, GatedLoraA, dora_row_norm


def use_fused(setting: str, device) -> bool:
    """``lora.fused`` on ``device`` -> whether to install the fused forward."""
    if setting not in ("auto", "on", "off"):
        raise PeftlabError(f"lora.fused must be auto, on or off, got {setting!r}.")
    return setting == "on" or (setting == "auto" and torch.device(device).type == "cuda")


def _base_types() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def _dora_variant():
    try:
        from peft.tuners.lora.variants import DoraLinearVariant
    except ImportError:  # pragma: no cover - older peft
        return None
    return DoraLinearVariant


_DORA_VARIANT = _dora_variant()  # resolved once: the forward below runs inside torch.compile's traces


def _peft_forward(self, x, *args, **kwargs):
    return type(self).forward(self, x, *args, **kwargs)


def fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The forward installed on a peft ``lora.Linear``: the fused kernel, or peft's forward (module docstring)."""
    if args or kwargs or self.disable_adapters or self.merged:
        return _peft_forward(self, x, *args, **kwargs)
    active = self.active_adapters
    if len(active) != 1 or active[0] not in self.lora_A:
        return _peft_forward(self, x)
    name = active[0]
    base = self.get_base_layer()
    W, b = base.weight, base.bias
    A_mod, B_mod = self.lora_A[name], self.lora_B[name]
    if (W.requires_grad or (b is not None and b.requires_grad) or type(A_mod) not in (nn.Linear, GatedLoraA)
            or type(B_mod) is not nn.Linear or A_mod.bias is not None or B_mod.bias is not None):
        return _peft_forward(self, x)
    A, B = A_mod.weight, B_mod.weight
    if not torch.is_autocast_enabled(x.device.type) and not (x.dtype == W.dtype == A.dtype == B.dtype):
        return _peft_forward(self, x)  # peft casts between dtypes here; keep its exact numbers
    gate = getattr(A_mod, "gate", None)
    scaling, fif, dropout = self.scaling[name], self.fan_in_fan_out, self.lora_dropout[name]
    variant = self.lora_variant.get(name) if hasattr(self, "lora_variant") else None
    if variant is None:
        return lora_linear(x, W, b, A, B, scaling, dropout=dropout, gate=gate, fan_in_fan_out=fif)
    dora_cls = _DORA_VARIANT
    mag = self.lora_magnitude_vector[name] if self.lora_magnitude_vector is not None and name in self.lora_magnitude_vector else None
    if dora_cls is None or not (isinstance(variant, dora_cls) or variant is dora_cls) or not isinstance(mag, DoraLinearLayer):
        return _peft_forward(self, x)
    # the norm kept in float32 (peft's would be in the bf16 base's dtype): the magnitude scale is a ratio near 1
    norm = dora_row_norm(W, A.detach(), B.detach(), None if gate is None else gate.detach(), scaling, fif,
                         base_sq=getattr(mag, "base_sq", None), out_dtype=torch.promote_types(W.dtype, torch.float32))
    c = mag.weight / norm.to(mag.weight.dtype)
    # peft drops the DoRA input only in training (eval: the base output is reused); nn.Dropout does the same
    return lora_linear(x, W, b, A, B, scaling, dropout=dropout if self.training else None, gate=gate, fan_in_fan_out=fif,
                       magnitude_scale=c)


def install_fused_lora(model: nn.Module) -> int:
    """Give every peft ``lora.Linear`` over a plain Linear / Conv1D the fused forward; return how many."""
    from peft.tuners.lora import Linear as LoraLinear

    bases = _base_types()
    n = 0
    for mod in model.modules():
        if type(mod) is not LoraLinear or type(mod.get_base_layer()) not in bases:
            continue
        mod.forward = types.MethodType(fused_forward, mod)
        n += 1
    return n


def uninstall_fused_lora(model: nn.Module) -> int:
    """Give the modules back peft's forward; return how many."""
    n = 0
    for mod in model.modules():
        fwd = mod.__dict__.get("forward")
        if getattr(fwd, "__func__", None) is fused_forward:
            del mod.forward
            n += 1
    return n


__all__ = ["use_fused", "install_fused_lora", "uninstall_fused_lora", "fused_forward", "compute_dtype"]
