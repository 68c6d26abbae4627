"""The arithmetic of compression bounds: message length, prior, smoothed loss, bounds.

Everything here is pure (floats in, floats out, or a torch tensor op) and is checked by
hand-worked examples in ``tests/test_bounds_formulas.py``. References:

* Lotfi et al. 2023, "Non-Vacuous Generalization Bounds for Large Language Models"
  (SubLoRA): document-level bound with prediction smoothing and subsampling.
* Lotfi et al. 2024, "Unlocking Tokens as Data Points for Generalization Bounds on
  Larger Language Models": token-level bound through a martingale (Azuma) argument.

Units: lengths in bits, the complexity term ``kl_nats`` in nats (``ln 1/P(h)``), risks
in bits per token.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

LN2 = math.log(2.0)

#: α grid of the public SubLoRA evaluation
DEFAULT_ALPHAS = (1e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.25, 0.5)
#: bits per codebook entry (the centroids are sent as float16)
CODEBOOK_BITS = 16


def message_length_bits(coded_bits: float, levels: int, d: int) -> float:
    """Bits to send the quantized vector: arithmetic-coded symbols + fp16 codebook + symbol counts.

    The decoder needs the codebook (``16·L`` bits) and the count of every symbol, each at
    most ``d`` (``L·⌈log₂ d⌉`` bits) to rebuild the coding distribution.
    """
    if levels < 1 or d < 1:
        raise ValueError(f"levels and d must be positive, got levels={levels}, d={d}")
    return float(coded_bits) + CODEBOOK_BITS * levels + levels * math.ceil(math.log2(max(d, 2)))


def prefix_free_length(length_bits: float) -> float:
    """Length of a prefix-free code for a message of ``length_bits`` bits: ``ℓ + 2·log₂ ℓ``.

    (An Elias-style prefix announcing ℓ costs about 2·log₂ ℓ bits; this makes the code
    lengths satisfy Kraft's inequality, so ``P(h) = 2^{-K}`` is a prior.)
    """
    if length_bits <= 1:
        raise ValueError(f"message length must exceed 1 bit, got {length_bits}")
    return float(length_bits) + 2.0 * math.log2(length_bits)


def hyperparameter_bits(num_combinations: int) -> int:
    """``⌈log₂ N⌉`` bits that pay for a union bound over ``N`` hyperparameter combinations."""
    if num_combinations < 1:
        raise ValueError(f"need at least one combination, got {num_combinations}")
    return math.ceil(math.log2(num_combinations)) if num_combinations > 1 else 0


def extra_bits(num_alphas: int, misc_extra_bits: int) -> int:
    """Bits added to the prefix-free length for the union over the search.

    ``misc_extra_bits`` pays for every other choice the user tried (levels, learning
    rates, …); the α grid is paid once, ``⌈log₂ |α grid|⌉`` bits. The public SubLoRA code
    adds 8 bits *per α* (a union over α counted ``|grid|`` times); that is a bug that only
    loosens the bound, fixed here. These bits are paid in both terms of the bound: in the
    prior (:func:`kl_nats`) and in the sampling term (``union_bits`` of
    :func:`hoeffding_subsampled_bound`), since the choices are made on the same sample.
    """
    if misc_extra_bits < 0:
        raise ValueError(f"misc_extra_bits must be >= 0, got {misc_extra_bits}")
    return int(misc_extra_bits) + hyperparameter_bits(num_alphas)


def kl_nats(prefix_len_bits: float, extra: float = 0.0) -> float:
    """``ln 1/P(h)`` in nats for the prior ``P(h) = 2^{-(K + extra)}``: ``(K + extra)·ln 2``."""
    return (float(prefix_len_bits) + float(extra)) * LN2


def smoothing_delta(alpha: float, vocab_size: int) -> float:
    """Range Δ of the smoothed loss: ``log₂(1 + (1−α)·V/α)`` bits.

    The smoothed loss ``−log₂((1−α)p + α/V)`` runs from ``a = −log₂(1−α+α/V)`` (p = 1) to
    ``log₂(V/α)`` (p = 0); the difference is Δ. Hoeffding needs the width of the range.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return math.log2(1.0 + (1.0 - alpha) * vocab_size / alpha)


def smoothed_loss_floor(alpha: float, vocab_size: int) -> float:
    """Smallest value of the smoothed loss, ``−log₂(1−α+α/V)`` (≥ 0, tiny for small α)."""
    return -math.log2(1.0 - alpha + alpha / vocab_size)


def smoothed_nll_bits(log_probs_target: torch.Tensor, alphas: Sequence[float], vocab_size: int) -> torch.Tensor:
    """Smoothed negative log-likelihood in bits for every α.

    Args:
        log_probs_target: natural-log probability of the target token, any shape ``S``.
        alphas: the α grid.
        vocab_size: V.

    Returns:
        ``(len(alphas), *S)`` float64 tensor of ``−log₂((1−α)·p + α/V)``, computed in log
        space (``logaddexp``) so that it is exact for p near 0 and near 1.
    """
    lp = log_probs_target.double().unsqueeze(0)
    a = torch.tensor(list(alphas), dtype=torch.float64, device=lp.device).view(-1, *([1] * (lp.dim() - 1)))
    mixed = torch.logaddexp(torch.log1p(-a) + lp, torch.log(a / vocab_size))
    return -mixed / LN2


def hoeffding_subsampled_bound(risk: float, kl: float, m: int, n: int, delta: float, value_range: float,
                               union_bits: float = 0.0) -> float:
    """Bound on the expected risk from a risk ``risk`` estimated on ``n`` of ``m`` units.

    With ``r = n/(n+m)`` the failure probability δ is split into ``r·δ`` for the PAC-Bayes
    (Occam) term over all ``m`` units and ``(1−r)·δ`` for the Hoeffding term of sampling
    ``n`` units uniformly with replacement. ``union_bits`` = ``b`` pays for the choices made
    *on this sample* (the α grid, everything counted in ``misc_extra_bits``): the bound is
    reported for the best of ``2^b`` choices, so each choice's sampling statement gets
    ``(1−r)·δ/2^b``. The Occam term pays the same union through the prior: ``kl`` must
    already hold the ``b`` bits (``kl = (K + b)·ln 2``, :func:`kl_nats`), which gives each
    choice and hypothesis ``r·δ·2^{−K−b}``:

        bound = R̂ + Δ·( sqrt((KL − ln(r·δ)) / (2m)) + sqrt((b·ln 2 − ln((1−r)·δ)) / (2n)) )

    Summed over the choices and hypotheses the two failure probabilities are at most
    ``r·δ + (1−r)·δ = δ``. (The public SubLoRA code and the reference token-level code pay
    the union only in the Occam term, so their failure probability is up to ``2^b·δ``.)

    When every unit was evaluated (``n >= m`` and the estimate is the full empirical
    risk, signalled by ``n == m``) there is no sampling term and the whole δ goes to the
    first: ``R̂ + Δ·sqrt((KL + ln 1/δ)/(2m))``.
    """
    if m < 1 or n < 1:
        raise ValueError(f"need m >= 1 and n >= 1, got m={m}, n={n}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if union_bits < 0:
        raise ValueError(f"union_bits must be >= 0, got {union_bits}")
    if n == m:
        return risk + value_range * math.sqrt((kl + math.log(1.0 / delta)) / (2 * m))
    occam_delta, sampling_delta = confidence_split(m, n, delta)
    occam = math.sqrt((kl - math.log(occam_delta)) / (2 * m))
    sampling = math.sqrt((union_bits * LN2 - math.log(sampling_delta)) / (2 * n))
    return risk + value_range * (occam + sampling)


def confidence_split(m: int, n: int, delta: float) -> tuple[float, float]:
    """``(r·δ, (1−r)·δ)`` with ``r = n/(n+m)``: the Occam and the sampling shares of δ.

    When every unit is scored (``n == m``) the whole δ is the Occam share: ``(δ, 0.0)``.
    """
    if n == m:
        return float(delta), 0.0
    r = n / (n + m)
    return r * delta, (1 - r) * delta


def target_rank(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The number of vocabulary entries with a strictly larger logit than the target's (``*targets.shape``).

    The target is in the top k when ``rank < k``: ties are resolved in the target's favour.
    """
    return (logits > logits.gather(-1, targets.unsqueeze(-1))).sum(-1)


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Whether the target is among the top-k predictions (``target_rank < k``), for each k.

    Returns:
        ``(len(ks), *targets.shape)`` bool tensor.
    """
    rank = target_rank(logits, targets)
    return torch.stack([rank < k for k in ks])


__all__ = [
    "DEFAULT_ALPHAS", "CODEBOOK_BITS", "LN2", "message_length_bits", "prefix_free_length", "hyperparameter_bits", "extra_bits",
    "kl_nats", "smoothing_delta", "smoothed_loss_floor", "smoothed_nll_bits", "hoeffding_subsampled_bound", "confidence_split",
    "target_rank", "topk_correct",
]
