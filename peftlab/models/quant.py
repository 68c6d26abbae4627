"""Quantized frozen bases (QLoRA-style) through transformers' ``BitsAndBytesConfig``.

``model.quantization: nf4 | fp4 | int8`` loads the base with bitsandbytes: transformers swaps every
linear layer but the output head for ``bnb.nn.Linear4bit`` / ``Linear8bitLt`` and quantizes the
weights as they load (``from_pretrained(..., quantization_config=...)``); nothing here quantizes by
hand. A model that peftlab builds from a config (the built-in tiny models, ``model.from_scratch``)
is built exactly as an unquantized run builds it (same seed, same weights), saved to a temporary
folder and loaded back through the same path, so a quantized run's prior is Q(the unquantized
run's base). The tensors that stay unquantized (embeddings, norms, the head) are stored in
``model.compute_dtype``; what trains (adapters, heads) is float32 (``build.trainable_to_float32``). What cannot run is refused when the configuration is read
(:func:`peftlab.config.sections.quantization_problems`).

bitsandbytes 0.48 and later run nf4, fp4 and int8 on the CPU too (slowly), so the plumbing is
tested in CI without a GPU where bitsandbytes is installed.
"""

from __future__ import annotations

import tempfile
from typing import Optional

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype(cfg) -> torch.dtype:
    """``model.compute_dtype`` (auto: the mixed-precision dtype of ``system.dtype``)."""
    name = cfg.model.compute_dtype
    return DTYPES[cfg.system.dtype if name == "auto" else name]


#: modules kept unquantized in a classification model: its head, which trains in full
CLASSIFIER_HEADS = ["classifier", "score"]


def bnb_config(cfg, task: str = "causal_lm"):
    """transformers' ``BitsAndBytesConfig`` of ``cfg.model``. A causal LM keeps transformers' default
    unquantized modules (the output head); a classifier keeps its head unquantized, since it trains."""
    from transformers import BitsAndBytesConfig

    m = cfg.model
    skip = {"llm_int8_skip_modules": list(CLASSIFIER_HEADS)} if task == "classification" else {}
    if m.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=m.quantization, bnb_4bit_use_double_quant=m.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype(cfg), **skip)


def device_map(cfg) -> dict:
    """Where bitsandbytes puts (and quantizes) the base: this process's GPU, else the CPU."""
    if torch.cuda.is_available() and cfg.system.device != "cpu":
        return {"": torch.cuda.current_device()}
    return {"": "cpu"}


def load_quantized(auto_cls, source: str, cfg, task: str, **kwargs):
    """``auto_cls.from_pretrained(source)`` with the base quantized on load."""
    return auto_cls.from_pretrained(source, quantization_config=bnb_config(cfg, task), dtype=compute_dtype(cfg),
                                    device_map=device_map(cfg), **kwargs)


def quantize_built(model, auto_cls, cfg, task: str, **kwargs):
    """A model built from a config in memory, quantized through the same loader: saved (safetensors,
    float32, exactly its weights) to a temporary folder and loaded back quantized."""
    with tempfile.TemporaryDirectory(prefix="peftlab-quant-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        out = load_quantized(auto_cls, tmp, cfg, task, **kwargs)
    out.config._name_or_path = out.name_or_path = model.name_or_path  # not the deleted folder (adapters record it)
    return out


def float_weight(module: torch.nn.Module) -> torch.Tensor:
    """A layer's weight as floats: a bitsandbytes layer's packed 4-/8-bit weight dequantized, any other returned as it is.

    A 4-bit weight (it carries its ``quant_state``) goes straight to ``bitsandbytes.functional.dequantize_4bit``, the call
    peft's ``dequantize_module_weight`` makes after reading the weight's ``__class__`` and, on the CPU, re-assigning
    ``module.weight``: both are graph breaks under ``torch.compile`` (18 per Llama block with DoRA on q/k/v/o), so a
    compiled block (``system.compile_scope=blocks``) on an NF4 base would fall apart into 19 graphs. The 8-bit weight
    keeps peft's helper. Under ``system.quant_linear`` the layer's dequantization is the one its forward uses (the same
    values, from the per-block scales dequantized once)."""
    w = module.weight
    if w.is_floating_point():
        return w
    quant_state = getattr(w, "quant_state", None)
    fast = module.__dict__.get("_peftlab_dequant")  # system.quant_linear's cached scales (peftlab.train.quant_linear)
    if fast is not None and module._peftlab_absmax[0] is quant_state:
        return fast(w)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w, quant_state)
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(module)


@torch.no_grad()
def dequantized_into(quantized, plain, dtype: torch.dtype):
    """``plain`` (the same architecture built unquantized) holding the weights of ``quantized``:
    every bitsandbytes layer's weight dequantized (:func:`float_weight`), the rest as loaded, all in
    ``dtype``: the base an adapter trained on ``quantized`` is merged into (the numbers it was
    trained on, unquantized). Written into the plain architecture rather than with transformers'
    ``dequantize()``, which leaves GPT-2's Conv1D layers as nn.Linear (a model its class cannot load)."""
    plain = plain.to(dtype)
    targets = dict(plain.named_modules())
    for name, mod in quantized.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.is_floating_point() or name not in targets:
            continue
        deq = float_weight(mod).to(dtype)
        target = targets[name]
        if type(target).__name__ == "Conv1D":  # stored (d_in, d_out)
            deq = deq.T
        target.weight.data = deq.contiguous().to(target.weight.device)
    return plain


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def describe(cfg) -> str:
    """One phrase naming the quantized base (for logs, bounds_metrics.json, export notes)."""
    m = cfg.model
    if m.quantization == "none":
        return "unquantized"
    extra = ", double quantization" if m.quantization != "int8" and m.double_quant else ""
    return f"bitsandbytes {m.quantization}{extra}, compute dtype {str(compute_dtype(cfg)).replace('torch.', '')}"


@torch.no_grad()
def num_params(model) -> int:
    """Parameters of the model counted as numbers, not as packed 4-bit storage."""
    fn = getattr(model, "num_parameters", None)
    if not is_quantized(model) or fn is None:
        return sum(p.numel() for p in model.parameters())
    return int(fn())
