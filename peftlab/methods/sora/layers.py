"""Building blocks of SoRA / SDoRA: the gated LoRA down-projection, the gated DoRA
magnitude layer, the low-memory DoRA row norm and the proximal (soft-threshold) step.

SoRA (Ding et al., 2023, "Sparse Low-rank Adaptation of Pre-trained Language Models")
puts a gate vector g (one entry per rank) between LoRA's A and B::

    h = W x + s * B diag(g) A x            s = alpha / r  (alpha / sqrt(r) with rsLoRA)

and trains g with a proximal gradient step so entries become exactly zero. The gate
lives on the down-projection: :class:`GatedLoraA` computes ``(A x) * g``, so every
peft code path that calls ``lora_B(lora_A(x))`` (plain LoRA forward, DoRA's
``get_lora_weight``) sees the gated product without further changes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...models.quant import float_weight

try:  # peft is a dependency of peftlab; the DoRA layer is optional for plain SoRA
    from peft.tuners.lora.dora import DoraLinearLayer
except ImportError:  # pragma: no cover
    DoraLinearLayer = nn.Module  # type: ignore[misc,assignment]


FEW_KERNELS: bool = False
"""The default of ``few_kernels`` in :func:`dora_row_norm` and :func:`dora_output`: the term-by-term form (False) everywhere.
The few-kernel form (True) was built for launch-bound 4-bit DoRA steps but measured no faster on NF4 bases in either
order of a same-run comparison (2026-12-07, BENCHMARKS.md: 0.98x / 0.98x at 8B, 16% slower at 3B); it stays for
benchmarks (``benchmarks/bench_quant.py``'s ``peftlab_few`` side sets it) and is tested equal to the default."""


def _few(flag: Optional[bool]) -> bool:
    return FEW_KERNELS if flag is None else flag


class GatedLoraA(nn.Linear):
    """LoRA's A (``r x d_in``, no bias) followed by an elementwise gate ``g`` (shape ``(r,)``).

    ``forward(x) = (x @ A.T) * g``. The weight is the very ``nn.Parameter`` of the peft
    module it replaces, so optimizer references, ``requires_grad`` and state-dict key
    (``...lora_A.<adapter>.weight``) are unchanged; the gate adds ``...lora_A.<adapter>.gate``.
    """

    def __init__(self, linear: nn.Linear, gate: torch.Tensor):
        nn.Module.__init__(self)
        if linear.bias is not None:
            raise ValueError("SoRA gates a bias-free LoRA A; got an A with a bias")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", None)
        if gate.shape != (self.out_features,):
            raise ValueError(f"gate shape {tuple(gate.shape)} does not match rank {self.out_features}")
        self.gate = nn.Parameter(gate.to(device=linear.weight.device, dtype=linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) * self.gate

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.out_features}, gated=True"


@torch.no_grad()
def w0_row_sq_norm(weight: torch.Tensor, fan_in_fan_out: bool = False) -> torch.Tensor:
    """``||W_i||^2`` per output row of a base weight (stored ``d_in x d_out`` when ``fan_in_fan_out``), float32 or wider."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    return torch.linalg.vector_norm(weight, dim=0 if fan_in_fan_out else 1, dtype=acc).square()


@torch.no_grad()
def dora_row_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gate: Optional[torch.Tensor], scaling: float,
                  fan_in_fan_out: bool = False, base_sq: Optional[torch.Tensor] = None,
                  out_dtype: Optional[torch.dtype] = None, few_kernels: Optional[bool] = None) -> torch.Tensor:
    """Row norms ``||W_i + s (B diag(g) A)_i||_2`` without forming a ``d_out x d_in`` matrix.

    With ``W`` (``d_out x d_in``; stored transposed when ``fan_in_fan_out``), ``A`` (``r x d_in``),
    ``B`` (``d_out x r``), ``Bg = B diag(g)`` and the Gram matrix ``G = A A^T`` (``r x r``)::

        ||W_i + s (Bg A)_i||^2 = ||W_i||^2 + 2 s <Bg_i, (W A^T)_i> + s^2 Bg_i G Bg_i^T

    Extra memory is ``O(d_out r + r^2)``; the cost is one ``d_out x d_in x r`` product
    (``W A^T``, in W's dtype) instead of DoRA's materialised ``d_out x d_in`` sum; the rest
    accumulates in at least float32. Rounding can make the squared norm slightly negative
    when the update cancels a row of W almost exactly: it is clamped at zero.

    ``gate=None`` is plain DoRA (all gates 1). ``base_sq``, when given, is the constant
    ``||W_i||^2`` (``(d_out,)``, float32 or wider) of a frozen ``W``, so that ``W`` is read once
    per call (by ``W A^T``) instead of twice.

    ``few_kernels`` (default :data:`FEW_KERNELS`: off) sums the two update terms as one ``addmm``,
    ``Bg_i . (2s (W A^T)_i + s^2 (Bg G)_i)``, and finishes in place: 11 kernel launches instead of 16
    per call, meant for GPU steps that are bound by launches (a 4-bit base's DoRA). Same value up to rounding
    (tested against the term-by-term form in float64).

    Returns:
        ``(d_out,)`` tensor in ``weight``'s dtype, or ``out_dtype`` (no gradient, as in DoRA section 4.3).
    """
    acc = torch.promote_types(weight.dtype, torch.float32)
    Af = A.to(acc)
    Bg = B.to(acc) if gate is None else B.to(acc) * gate.to(acc)
    A_w = A.to(weight.dtype)  # W A^T in W's dtype (no up-cast copy of W), accumulated by the matmul
    if base_sq is None:
        base_sq = w0_row_sq_norm(weight, fan_in_fan_out)
    base_sq = base_sq.to(acc)
    if fan_in_fan_out:  # weight is d_in x d_out (GPT-2 Conv1D)
        WAt = (A_w @ weight).T.to(acc)
    else:
        WAt = (weight @ A_w.T).to(acc)
    gram = Af @ Af.T
    if _few(few_kernels):
        update = torch.addmm(WAt, Bg, gram, beta=2.0 * scaling, alpha=scaling * scaling)  # 2s WAt + s^2 Bg G
        sq = (Bg * update).sum(dim=1).add_(base_sq)
    else:
        cross = (Bg * WAt).sum(dim=1)
        quad = ((Bg @ gram) * Bg).sum(dim=1)
        sq = base_sq + (2.0 * scaling) * cross + (scaling * scaling) * quad
    return sq.clamp_min_(0.0).sqrt_().to(out_dtype or weight.dtype)  # sq is this call's own tensor: in place is safe


def dora_output(layer, x, norm, lora_A, lora_B, scaling, base_layer, base_result=None, cast_scale: bool = False,
                few_kernels: Optional[bool] = None):
    """DoRA's layer output from the row norm: (m/‖W‖ − 1)·(W₀x) + (m/‖W‖)·s·B(A(x)), reusing peft's
    base result (bias removed) when given. ``cast_scale`` casts m/‖W‖ to the input's dtype.

    ``few_kernels`` (default :data:`FEW_KERNELS`: off) folds s into the per-row scale and adds the LoRA term with one
    ``addcmul``: two elementwise passes over the output instead of four (tested equal, values and
    gradients, to the four-pass form)."""
    mag_norm_scale = layer.weight / norm.to(layer.weight.dtype)
    if cast_scale:
        mag_norm_scale = mag_norm_scale.to(x.dtype)
    mag_norm_scale = mag_norm_scale.view(1, -1)
    lora_result = lora_B(lora_A(x))
    if base_result is not None:
        if base_layer.bias is not None:
            base_result = base_result - base_layer.bias
    else:
        weight = float_weight(base_layer)
        w = weight.T if layer.fan_in_fan_out else weight
        base_result = F.linear(x, w.to(x.dtype))
    if _few(few_kernels):
        return torch.addcmul((mag_norm_scale - 1) * base_result, mag_norm_scale * scaling, lora_result)
    return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling


class GatedDoraLayer(DoraLinearLayer):
    """DoRA's magnitude layer for a gated LoRA (SDoRA).

    Same output as peft's ``DoraLinearLayer`` (``(m / ||W + s ΔV||_row - 1) * W x +
    m / ||.||_row * s * B diag(g) A x``, norm detached per DoRA section 4.3), but the row
    norm comes from :func:`dora_row_norm` instead of the dense ``W + s B A``.

    Built with ``base_weight`` (``sora.fast_path``), the constant ``||W0_i||^2`` is kept in a
    non-persistent buffer ``base_sq`` (not in any state dict; :meth:`refresh_base_norm` recomputes
    it if ``W0`` is changed in place) instead of being recomputed from ``W0`` at every forward.
    The value is the same either way (the same function of the same frozen weight).
    """

    @classmethod
    def from_dora(cls, layer: "DoraLinearLayer", base_weight: Optional[torch.Tensor] = None) -> "GatedDoraLayer":
        new = cls(fan_in_fan_out=layer.fan_in_fan_out)
        new.weight = layer.weight  # the magnitude vector m: same Parameter
        if base_weight is not None:
            new.register_buffer("base_sq", w0_row_sq_norm(base_weight.detach(), layer.fan_in_fan_out), persistent=False)
        return new

    @torch.no_grad()
    def refresh_base_norm(self, base_weight: torch.Tensor) -> None:
        if getattr(self, "base_sq", None) is not None:
            self.base_sq = w0_row_sq_norm(base_weight, self.fan_in_fan_out).to(self.base_sq.device)

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default", **kwargs):
        weight = float_weight(base_layer)
        norm = dora_row_norm(weight, lora_A.weight, lora_B.weight, lora_A.gate, scaling, self.fan_in_fan_out,
                             base_sq=getattr(self, "base_sq", None))
        return dora_output(self, x, norm, lora_A, lora_B, scaling, base_layer, base_result, cast_scale=True)

    def __repr__(self) -> str:
        return "sora.gated_dora." + nn.Module.__repr__(self)


def soft_threshold_(t: torch.Tensor, tau: float) -> torch.Tensor:
    """In place ``t <- sign(t) * max(|t| - tau, 0)``: the proximal operator of ``tau * ||.||_1``."""
    if tau > 0:
        t.copy_(torch.sign(t) * (t.abs() - tau).clamp_min(0.0))
    return t


def reference_threshold_(t: torch.Tensor, tau: float) -> torch.Tensor:
    """The public SoRA code's thresholding, applied in place in sequence (for reproducing its numbers).

    ``t[t > tau] -= tau; t[t < -tau] += tau; t[|t| < tau] = 0``: the third assignment sees
    the already shrunk values, so entries that started in ``(tau, 2 tau)`` (or the negative
    mirror) end at zero instead of ``|t| - tau``. Prefer :func:`soft_threshold_`.
    """
    if tau > 0:
        t[t > tau] -= tau
        t[t < -tau] += tau
        t[t.abs() < tau] = 0.0
    return t
