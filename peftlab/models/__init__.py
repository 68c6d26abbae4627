"""Model and tokenizer loading: built-in tiny models, shipped architecture configs,
real models available offline, local paths and the Hugging Face hub.

``load_model(cfg, task, num_labels)`` returns ``(model, tokenizer, info)`` where
``info`` says which target modules LoRA-style methods adapt by default.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .. import hub
from ..errors import PeftlabError
from ..options import suggest
from . import offline  # noqa: F401  (registers the offline models and tokenizers)
from . import quant
from .registry import OFFLINE_MODELS, OFFLINE_TOKENIZERS
from .tokenizers import byte_tokenizer

CONFIG_DIR = Path(__file__).parent / "configs"

# Built-in tiny architectures (random weights, byte-level tokenizer, vocab 260).
TINY_MODELS = {
    "tiny-gpt2": dict(task="causal_lm", model_type="gpt2", vocab_size=260, n_positions=512, n_embd=64, n_layer=2, n_head=4,
                      bos_token_id=256, eos_token_id=256, pad_token_id=257),
    "tiny-bert": dict(task="classification", model_type="bert", vocab_size=260, hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=128, max_position_embeddings=512, pad_token_id=257),
}

# Sensible LoRA targets per architecture (model_type -> module names).
DEFAULT_TARGETS = {
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt_neox": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
}


@dataclass
class ModelInfo:
    name: str
    model_type: str
    task: str
    target_modules: list[str]
    builtin: bool = False
    num_params: int = 0
    source: str = ""
    extra: dict = field(default_factory=dict)


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _auto_cls(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification


def known_names() -> list[str]:
    """Every model name peftlab resolves without the hub (built-ins, offline assets, shipped configs)."""

    return sorted({*TINY_MODELS, *OFFLINE_MODELS, *shipped_configs()})


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name or name.endswith(("/", ".json", ".safetensors", ".bin"))


def check_name(name: str, what: str, key: str, extra: tuple[str, ...] = ()) -> None:
    """Fail in seconds on a name that cannot load: a missing local path says so; a near-miss of a
    known name is a typo (did-you-mean), and an unknown name fails at once when the hub cannot be
    reached and it is not in the local Hugging Face cache (instead of a minute of retries)."""

    known = sorted({*known_names(), *extra})
    if name in known or os.path.exists(os.path.expanduser(name)):
        return
    if _looks_like_path(name):
        raise PeftlabError(f"{key}={name!r}: the path {os.path.abspath(os.path.expanduser(name))} does not exist. Check the path, "
                           f"or use a name peftlab knows ({', '.join(known)}).")
    import difflib

    scratch = [n for n in shipped_configs() if n not in TINY_MODELS and n not in OFFLINE_MODELS]
    listing = (f"Names peftlab knows: {', '.join(known)} (offline, {', '.join(scratch)} only with model.from_scratch=true); "
               "or a local folder with config.json and weights.")
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
    if close:
        raise PeftlabError(f"{key}={name!r} is not a {what} peftlab knows. Did you mean `{close[0]}`? {listing}")
    if hub.in_cache(name):
        return

    if not hub.reachable():
        raise PeftlabError(
            f"{key}={name!r} is not a {what} peftlab knows, not an existing path, not in the Hugging Face cache, and the hub "
            f"cannot be reached to look it up.{suggest(name, known)} {listing}"
        )


def _load_tokenizer(name: str, cfg_model, for_classification: bool):
    """Resolve ``data.tokenizer`` / the model's tokenizer, offline first."""
    from transformers import AutoTokenizer


    if name in ("byte", *TINY_MODELS):
        return byte_tokenizer(for_classification)
    if name in OFFLINE_TOKENIZERS:
        return OFFLINE_TOKENIZERS[name]()
    if name in OFFLINE_MODELS:
        return AutoTokenizer.from_pretrained(str(OFFLINE_MODELS[name]()))
    check_name(name, "tokenizer", "data.tokenizer", ("byte", *OFFLINE_TOKENIZERS))
    try:
        return AutoTokenizer.from_pretrained(name, revision=cfg_model.revision, trust_remote_code=cfg_model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise PeftlabError(
            f"Could not load tokenizer {name!r} from a local path or the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Offline? Set --data.tokenizer to a local tokenizer folder, to `gpt2` (genuine GPT-2 BPE, offline) or to `byte`."
        ) from None


def init_from_config(hf_cfg, task: str, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None,
                     cpu_init: bool = False) -> torch.nn.Module:
    """Random weights of the architecture ``hf_cfg`` for ``task``: on the CPU in float32 (the init every earlier
    run had) when neither ``dtype`` nor ``device`` asks otherwise, or with ``cpu_init`` (the built-in tiny models:
    the same base values on every device, rounded to ``dtype``); else initialised where it trains, in its storage
    dtype (a 3B model in seconds, not a minute)."""
    cls = _auto_cls(task)
    if cpu_init or (device is None and dtype in (None, torch.float32)):
        model = cls.from_config(hf_cfg)
        return model if dtype in (None, torch.float32) else model.to(dtype)
    with torch.device(device or "cpu"):
        return cls.from_config(hf_cfg, dtype=dtype or torch.float32)


def load_model(cfg, task: str, num_labels: Optional[int] = None, *, dtype: Optional[torch.dtype] = None,
               device: Optional[torch.device] = None):
    """Build or load the model named by ``cfg.model`` for ``task``.

    Args:
        cfg: the run configuration.
        task: ``causal_lm`` or ``classification``.
        num_labels: number of classes (classification).
        dtype: storage dtype of the weights (default float32, see ``model.base_dtype``).
        device: where a model built from a shipped or loaded config (``model.from_scratch``) is
            initialised (default the CPU); its random weights then come from that device's
            generator. Built-in tiny models are always initialised on the CPU, loaded weights
            are loaded on the CPU.

    Returns:
        ``(model, tokenizer, ModelInfo)``. The model is in float32 (or ``dtype``) on the CPU
        (or ``device`` for a from-scratch model); with ``model.quantization``, quantized by
        bitsandbytes on this process's GPU (or the CPU), its unquantized tensors in ``model.compute_dtype``.
    """
    from transformers import AutoConfig


    m = cfg.model
    name = m.name
    seed = cfg.training.seed
    tok_name = cfg.data.tokenizer or name
    is_cls = task == "classification"
    cls_kwargs = {"num_labels": num_labels} if is_cls else {}
    torch.manual_seed(seed)  # random weights (tiny, from_scratch, new heads) depend on the seed only
    builtin = False
    if name in TINY_MODELS:
        spec = dict(TINY_MODELS[name])
        spec.pop("task")
        model_type = spec.pop("model_type")
        hf_cfg = AutoConfig.for_model(model_type, **spec, **cls_kwargs)
        model = init_from_config(hf_cfg, task, dtype, cpu_init=True)
        builtin, source = True, "built-in tiny config"
        if m.quantization != "none":  # the same weights as an unquantized run, quantized on load
            model = quant.quantize_built(model, _auto_cls(task), cfg, task)
        if cfg.data.tokenizer is None:
            tok_name = "byte"
    elif m.from_scratch:
        path = CONFIG_DIR / f"{name}.json"
        if path.is_file():
            spec = json.loads(path.read_text())
            model_type = spec.pop("model_type")
            spec.pop("architectures", None)
            hf_cfg = AutoConfig.for_model(model_type, **spec, **cls_kwargs)
            source = f"shipped config {path.name} (random weights)"
        else:
            if name not in OFFLINE_MODELS:
                check_name(name, "model", "model.name")
            local = OFFLINE_MODELS[name]() if name in OFFLINE_MODELS else name
            try:
                hf_cfg = AutoConfig.from_pretrained(str(local), revision=m.revision, trust_remote_code=m.trust_remote_code, **cls_kwargs)
            except (OSError, ValueError) as e:
                raise PeftlabError(
                    f"model.from_scratch needs the architecture config of {name!r}, which is neither shipped with peftlab "
                    f"({', '.join(shipped_configs())}) nor loadable ({type(e).__name__}). Use one of the shipped names or a local folder with config.json."
                ) from None
            source = "config (random weights)"
        model = init_from_config(hf_cfg, task, dtype, device)
        if m.quantization != "none":
            model = quant.quantize_built(model, _auto_cls(task), cfg, task)
    else:
        if name not in OFFLINE_MODELS:
            check_name(name, "model", "model.name")
        local = str(OFFLINE_MODELS[name]()) if name in OFFLINE_MODELS else name
        if name in OFFLINE_MODELS and cfg.data.tokenizer is None:
            tok_name = name
        try:
            if m.quantization != "none":
                model = quant.load_quantized(_auto_cls(task), local, cfg, task, revision=m.revision,
                                             trust_remote_code=m.trust_remote_code, **cls_kwargs)
            else:
                model = _auto_cls(task).from_pretrained(
                    local, revision=m.revision, trust_remote_code=m.trust_remote_code, dtype=dtype or torch.float32, **cls_kwargs
                )
        except Exception as e:  # noqa: BLE001  truncated/mismatched weights raise safetensors/torch errors too
            if not isinstance(e, (OSError, ValueError, RuntimeError)) and type(e).__name__ != "SafetensorError":
                raise
            if os.path.isdir(local) and not isinstance(e, ValueError):
                raise PeftlabError(
                    f"Could not load the weights of model {name!r} from {local} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                    "The weight files are truncated, corrupted or belong to another architecture than its config.json; "
                    "copy or download the model again."
                ) from None
            hint = "" if os.path.exists(name) else " If you are offline, use a local folder, a built-in tiny model (tiny-gpt2, tiny-bert) or an offline model (smollm2-135m, minilm-l6)."
            raise PeftlabError(
                f"Could not load model {name!r} as a {task} model ({type(e).__name__}: {str(e).splitlines()[0]}).{hint}"
            ) from None
        source = "local folder" if os.path.isdir(local) else "hub"
    tokenizer = _load_tokenizer(tok_name, m, is_cls)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    emb = model.get_input_embeddings()
    if emb is not None and len(tokenizer) > emb.num_embeddings:
        raise PeftlabError(
            f"The tokenizer has {len(tokenizer)} tokens but model {name!r} embeds only {emb.num_embeddings}. "
            "Pick the tokenizer that belongs to the model (leave data.tokenizer unset) or a model built for this tokenizer."
        )
    need, key = (cfg.data.block_size, "data.block_size") if task == "causal_lm" else (cfg.data.max_length, "data.max_length")
    check_positions(model, need, key, name)
    if m.dropout is not None:
        set_dropout(model, m.dropout)
    model_type = model.config.model_type
    targets = list(m.target_modules) if m.target_modules else DEFAULT_TARGETS.get(model_type)
    if targets is None:
        targets = ["q_proj", "v_proj"]
    info = ModelInfo(name=name, model_type=model_type, task=task, target_modules=targets, builtin=builtin,
                     num_params=quant.num_params(model), source=source + (f", {quant.describe(cfg)}" if m.quantization != "none" else ""))
    return model, tokenizer, info


def check_positions(model, need: int, key: str, name: str) -> None:
    """Refuse a sequence length above the positions the model embeds (an IndexError deep in torch otherwise)."""
    positions = next((getattr(model.config, k) for k in ("n_positions", "max_position_embeddings")
                      if isinstance(getattr(model.config, k, None), int)), None)
    if positions is not None and need > positions:
        raise PeftlabError(
            f"{key}={need} is above the {positions} positions model {name!r} can attend to (its position embeddings end there). "
            f"Lower {key if key.startswith('--') else '--' + key} to at most {positions}."
        )


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Set every dropout probability of the base model (modules and attention-dropout config)."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = p
    for key in ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob"):
        if hasattr(model.config, key):
            setattr(model.config, key, p)


def check_targets(model, targets: list[str]) -> list[str]:
    """Names of modules whose last name component is in ``targets``; error if none match."""
    names = [n for n, _ in model.named_modules()]
    hits = [n for n in names if n.split(".")[-1] in targets]
    if not hits:
        leaves = sorted({n.split(".")[-1] for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"})
        raise PeftlabError(
            f"No module of the model matches target_modules={targets}. Linear layers in this model: {', '.join(leaves)}. "
            "Set --model.target_modules to some of these."
        )
    return hits


def load_tokenizer(cfg, task: str):
    """The tokenizer :func:`load_model` gives ``cfg`` for ``task``, without building the model."""

    name = cfg.data.tokenizer or ("byte" if cfg.model.name in TINY_MODELS else cfg.model.name)
    tokenizer = _load_tokenizer(name, cfg.model, task == "classification")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
