"""The ``bounds`` configuration section of ``peftlab bounds RUN_DIR --bounds.key=value``.

Built with peftlab's config machinery, so unknown keys, wrong types and bad values get
the same one-paragraph messages with suggestions as run configurations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Optional

from ..config import parse_overrides
from ..errors import ConfigError
from ..options import build_section, opt, suggest
from .formulas import DEFAULT_ALPHAS


@dataclass
class BoundsConfig:
    bound_type: Literal["document_level", "sequence_level", "token_level"] = opt(
        "document_level", "Unit of the bound: documents between EOT tokens, aligned context-length sequences, or tokens (Lotfi et al. 2024).")
    levels: int = opt(11, "Quantization levels L of the compressed vector.")
    use_kmeans: bool = opt(False, "Refine the bin-mean centroids with 1-D k-means.")
    quant_iters: int = opt(0, "Quantization-aware training steps (straight-through gradient) on training blocks; 0 skips.")
    quant_lr: float = opt(1e-4, "SGD learning rate of quantization-aware training (weights and centroids).")
    alphas: list[float] = opt(list(DEFAULT_ALPHAS), "Prediction-smoothing grid α (the best α is reported; the grid costs ⌈log₂ |grid|⌉ bits once).")
    delta: float = opt(0.05, "Failure probability δ of the bound.")
    num_docs: int = opt(10_000, "Units sampled (uniformly, with replacement) to estimate the empirical risk: documents, sequences or tokens; all units when there are fewer.")
    misc_extra_bits: int = opt(7, "Bits paid for every other choice tried (levels, learning rates, ...): a union bound over 2^bits combinations.")
    data: Optional[str] = opt(None, "Token-bin directory of the training data (from `peftlab data prepare`); default: the run's data.dataset when it is one.")
    stride: int = opt(100, "Sliding-window stride for documents longer than the context.")
    context_length: Optional[int] = opt(None, "Tokens of context per forward pass; default the run's data.block_size (at most the model's maximum).")
    seed: int = opt(0, "Seed of the unit sampling.")
    batch_tokens: int = opt(8192, "Padded tokens per forward pass (memory knob; the numbers do not depend on it).")
    full_precision_units: int = opt(1000, "Units also scored with the unquantized weights to report the quantization's own cost (0 skips).")
    head: Literal["auto", "model"] = opt(
        "auto", "How logits are formed: auto = the forward pass stops at the LM head's input and the head runs only on the "
        "counted positions, in chunks (used when a check on the first batch shows the model's logits are exactly its head's "
        "output, else the model's own logits); model = the model's own logits (the slower reference path).")
    compile: Literal["auto", "on", "off"] = opt(
        "auto", "Reduce the LM head's logits to log-probability and rank with a torch.compile'd function (one pass over the "
        "logits): auto = on a GPU only (CPU numbers stay those of the eager path), on, off. Used with bounds.head=auto.")
    compile_body: Literal["off", "on"] = opt(
        "off", "Also run the scoring model's body (every transformer block) through torch.compile, dynamic in batch and "
        "length: fuses the residual adds, layer norms and activations a GPU profile shows at about 40% of scoring time. "
        "Checked on the first batch against the eager body (else scored eagerly). Costs a compilation per process "
        "(tens of seconds, cached on disk by torch); on an H200 it made `peftlab bounds` slower, compilation included "
        "(BENCHMARKS.md). Used with bounds.head=auto.")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "Where to score; auto uses a GPU when there is one.")
    dtype: Literal["fp32", "bf16"] = opt("fp32", "Forward-pass precision (bf16: autocast on a GPU; log-probabilities are always float32).")
    progress_bar: bool = opt(True, "Show a progress bar of units scored.")
    output: Optional[str] = opt(None, "Where to write the metrics; default RUN_DIR/bounds_metrics.json.")

    def validate(self) -> list[str]:
        p = []
        if not 2 <= self.levels <= 65536:
            p.append(f"`bounds.levels` must be between 2 and 65536, got {self.levels}.")
        if self.quant_iters < 0:
            p.append(f"`bounds.quant_iters` must be >= 0, got {self.quant_iters}.")
        if not self.quant_lr > 0:
            p.append(f"`bounds.quant_lr` must be positive, got {self.quant_lr}.")
        if not self.alphas:
            p.append("`bounds.alphas` is empty; give at least one smoothing value, e.g. --bounds.alphas=0.01,0.1.")
        bad = [a for a in self.alphas if not 0.0 < a < 1.0]
        if bad:
            p.append(f"`bounds.alphas` must lie strictly between 0 and 1, got {bad}.")
        if len(set(self.alphas)) != len(self.alphas):
            p.append(f"`bounds.alphas` lists a value twice: {self.alphas}.")
        if not 0.0 < self.delta < 1.0:
            p.append(f"`bounds.delta` must be in (0, 1), got {self.delta}.")
        if self.num_docs < 1:
            p.append(f"`bounds.num_docs` must be at least 1, got {self.num_docs}.")
        if self.misc_extra_bits < 0:
            p.append(f"`bounds.misc_extra_bits` must be >= 0, got {self.misc_extra_bits}.")
        if self.stride < 1:
            p.append(f"`bounds.stride` must be at least 1, got {self.stride}.")
        if self.context_length is not None and self.context_length < 1:
            p.append(f"`bounds.context_length` must be at least 1, got {self.context_length}.")
        if self.context_length is not None and self.stride > self.context_length:
            p.append(f"`bounds.stride` ({self.stride}) must not exceed `bounds.context_length` ({self.context_length}).")
        if self.batch_tokens < 1:
            p.append(f"`bounds.batch_tokens` must be at least 1, got {self.batch_tokens}.")
        if self.full_precision_units < 0:
            p.append(f"`bounds.full_precision_units` must be >= 0, got {self.full_precision_units}.")
        return p


def bounds_config(overrides: dict[str, Any] | Iterable[str] = ()) -> BoundsConfig:
    """Build and validate the section from ``{"bounds.levels": 11}`` or ``["--bounds.levels=11"]``."""

    ov = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    problems: list[str] = []
    raw: dict[str, Any] = {}
    for key, value in ov.items():
        section, _, name = key.partition(".")
        if section != "bounds" or not name:
            hint = suggest(key, [f"bounds.{k}" for k in BoundsConfig.__dataclass_fields__])
            problems.append(f"`peftlab bounds` takes only --bounds.* options, got `--{key}`.{hint}")
            continue
        raw[name] = value
    cfg = build_section(BoundsConfig, "bounds", raw, problems)
    if not problems:
        problems.extend(cfg.validate())
    if problems:
        raise ConfigError(problems)
    return cfg


__all__ = ["BoundsConfig", "bounds_config"]
