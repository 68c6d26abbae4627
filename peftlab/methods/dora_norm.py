"""A faster DoRA layer: the row norm ||W0 + s B A||_row without the d_out x d_in product.

peft's ``DoraLinearLayer`` rebuilds the dense ``B A`` (by pushing an identity matrix of
size ``d_in`` through ``lora_A`` and ``lora_B``), adds it to ``W0`` and takes row norms:
two ``d_out x d_in`` temporaries and a ``d_in x d_in x r`` product per layer and step. Since
``W0`` is frozen, its squared row norms are a constant, and::

    ||W0_i + s (B A)_i||^2 = ||W0_i||^2 + 2 s B_i . (W0 A^T)_i + s^2 B_i (A A^T) B_i^T

needs only ``W0 A^T`` (``d_out x r``) and the Gram matrix ``A A^T`` (``r x r``); see
:func:`peftlab.methods.sora.layers.dora_row_norm`. The norm stays detached from the graph
(DoRA section 4.3), exactly as in peft, and the layer's output formula is peft's.

``lora.dora_norm`` chooses: ``peft`` keeps peft's layer, ``factored`` swaps in
:class:`FactoredDoraLayer`, ``auto`` (default) uses ``factored`` on CUDA and ``peft`` on
the CPU, so CPU runs keep the numbers they always had. On a quantized base (``model.quantization``) the 4-/8-bit
weight is dequantized for ``W0 A^T`` as peft dequantizes it for ``W0 + s B A``, and ``||W0_i||^2`` of the
dequantized weight is computed once. The swap keeps the magnitude
``Parameter`` and its state-dict key, so checkpoints, exports and merges are unchanged.
"""

from __future__ import annotations

import torch

from ..models.quant import float_weight
from .sora.layers import DoraLinearLayer, dora_output, dora_row_norm, w0_row_sq_norm


class FactoredDoraLayer(DoraLinearLayer):
    """peft's DoRA magnitude layer with the factored row norm and a cached ``||W0_i||^2``.

    The cache is a non-persistent buffer (not in any state dict): it follows the model across
    devices and is recomputed by :meth:`refresh_base_norm` (call it if ``W0`` is changed in place).
    """

    @classmethod
    def from_dora(cls, layer: DoraLinearLayer, base_weight: torch.Tensor) -> "FactoredDoraLayer":
        new = cls(fan_in_fan_out=layer.fan_in_fan_out)
        new.weight = layer.weight  # the magnitude vector m: the very same Parameter
        new.register_buffer("base_sq", w0_row_sq_norm(base_weight.detach(), layer.fan_in_fan_out), persistent=False)
        return new

    @torch.no_grad()
    def refresh_base_norm(self, base_weight: torch.Tensor) -> None:
        self.base_sq = w0_row_sq_norm(base_weight, self.fan_in_fan_out).to(self.base_sq.device)

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default", **kwargs):
        weight = float_weight(base_layer)  # a bitsandbytes base dequantized, as peft's layer does; W A^T needs no W + s B A
        # the norm in the magnitude's dtype (float32), as the fused path keeps it: no bf16 round trip of a ratio near 1
        norm = dora_row_norm(weight, lora_A.weight.detach(), lora_B.weight.detach(), None, scaling,
                             self.fan_in_fan_out, base_sq=self.base_sq, out_dtype=self.weight.dtype)
        return dora_output(self, x, norm, lora_A, lora_B, scaling, base_layer, base_result)

    def __repr__(self) -> str:
        return "peftlab.factored_dora." + torch.nn.Module.__repr__(self)


def use_factored(setting: str, device) -> bool:
    """``lora.dora_norm`` -> whether to swap in :class:`FactoredDoraLayer` on ``device``."""
    if setting == "factored":
        return True
    if setting == "peft":
        return False
    return torch.device(device).type == "cuda"


def install_factored_dora(model: torch.nn.Module) -> int:
    """Replace every peft ``DoraLinearLayer`` (exactly that class) by :class:`FactoredDoraLayer`; return how many."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for mod in model.modules():
        if not isinstance(mod, LoraLayer) or not hasattr(mod, "lora_magnitude_vector"):
            continue
        for name in list(mod.lora_magnitude_vector.keys()):
            layer = mod.lora_magnitude_vector[name]
            if type(layer) is DoraLinearLayer:
                mod.lora_magnitude_vector[name] = FactoredDoraLayer.from_dora(layer, float_weight(mod.get_base_layer()))
                n += 1
    return n
