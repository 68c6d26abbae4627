"""What the step-timing benchmarks share (bench_lead.py, gpu_shapes.py, bench_quant.py): device
synchronisation and peak memory, a timed loop of training steps, the timing of peftlab's Trainer between
two optimizer steps, and the offline data they train on (a word-level tokenizer over ``t<id>`` tokens
and uint32 token bins of random ids).

Not a module of the package: the scripts run as ``python benchmarks/X.py`` (this folder is then on
``sys.path``) and their tests put ``benchmarks/`` on ``sys.path`` themselves.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch


# ------------------------------------------------------------------ device
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_mb(dev: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def graphs() -> int:
    """dynamo's count of compiled graphs so far (a recompile adds one); -1 when torch does not say."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001
        return -1


def cleanup(dev: torch.device) -> None:
    """Free what the last case left: garbage, the CUDA cache, dynamo's compiled graphs."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass


# ------------------------------------------------------------------ timing
def timed_loop(step: Callable[[int], torch.Tensor], warmup: int, steps: int, dev: torch.device,
               at_start: Optional[Callable[[], None]] = None) -> dict:
    """``step(i)`` for ``i < warmup + steps``, the peak memory statistics reset first; the last ``steps`` timed.

    The clock starts after a device synchronisation once ``warmup`` steps have run (``at_start``, e.g. a
    profiler's ``__enter__``, is called just before it) and stops after one at the end. Returns ``seconds``
    (of the timed steps), ``new_graphs`` (dynamo graphs compiled during them) and ``last`` (what the last
    step returned).
    """
    reset_peak(dev)
    t0 = g0 = last = None
    for i in range(warmup + steps):
        if i == warmup:
            sync(dev)
            if at_start is not None:
                at_start()
            t0, g0 = time.perf_counter(), graphs()
        last = step(i)
    sync(dev)
    t1, g1 = time.perf_counter(), graphs()
    return {"seconds": t1 - t0, "new_graphs": g1 - g0, "last": last}


def time_trainer_steps(trainer, dev: torch.device, warmup: int, steps: int, at_start: Optional[Callable[[], None]] = None,
                       at_end: Optional[Callable[[], None]] = None) -> dict:
    """Time peftlab's ``Trainer`` between optimizer steps ``warmup`` and ``warmup + steps``; call ``trainer.run()`` next.

    Wraps the method's ``after_optimizer_step`` hook: after a device synchronisation at step ``warmup`` the
    returned dict gets ``t0`` and ``g0`` (``at_start`` called just before), and at step ``warmup + steps``
    ``t1``, ``peak`` (MB) and ``g1`` (then ``at_end``, which may raise to stop the run). The peak memory
    statistics are reset here.
    """
    mark: dict = {}
    hook = trainer.method.after_optimizer_step

    def timed(m, lr):
        hook(m, lr)
        k = trainer.state.global_step + 1  # incremented after this hook
        if k == warmup:
            sync(dev)
            if at_start is not None:
                at_start()
            mark["t0"], mark["g0"] = time.perf_counter(), graphs()
        elif k == warmup + steps:
            sync(dev)
            mark["t1"], mark["peak"], mark["g1"] = time.perf_counter(), peak_mb(dev), graphs()
            if at_end is not None:
                at_end()

    trainer.method.after_optimizer_step = timed
    reset_peak(dev)
    return mark


# ------------------------------------------------------------------ models and data
def hf_config(s: dict):
    """The transformers config of a shape's architecture dict ``s["hf_config"]`` (``model_type`` included);
    ``num_labels`` added for a classification shape."""
    from transformers import AutoConfig

    spec = dict(s["hf_config"])
    extra = {"num_labels": s["num_labels"]} if s.get("task") == "classification" else {}
    return AutoConfig.for_model(spec.pop("model_type"), **spec, **extra)


def write_word_tokenizer(folder: Path, n: int, eot: int, pad: str = "") -> Path:
    """A word-level tokenizer over tokens ``t<id>`` with ``<|endoftext|>`` at ``eot`` (no download). It pads with the
    end-of-text token, or with ``pad``, a special token given the last id ``n - 1`` (Unsloth refuses a pad equal to
    the end-of-text token on Llama; the benchmarks' random data never draws that id, all ids being below ``eot``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    eos = "<|endoftext|>"
    if pad and not eot < n - 1:
        raise ValueError(f"a separate pad token takes id {n - 1}, which must be above the end-of-text id {eot}")
    vocab = {(eos if i == eot else pad if pad and i == n - 1 else f"t{i}"): i for i in range(n)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=eos))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens([eos] + ([pad] if pad else []))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, pad_token=pad or eos)
    tok.model_max_length = 1 << 20
    tok.save_pretrained(str(folder))
    return folder


def write_token_bins(folder: Path, train_tokens: int, val_tokens: int, vocab_size: int, eot: int, tokenizer: Path, source: str,
                     seed: int = 0) -> Path:
    """peftlab token bins (uint32) of random ids below ``eot``: ``train.bin``, ``val.bin`` and ``meta.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = {"train": train_tokens, "val": val_tokens}
    for split, n in counts.items():
        rng.integers(0, eot, size=n, dtype=np.uint32).tofile(folder / f"{split}.bin")
    (folder / "meta.json").write_text(json.dumps({
        "format": "peftlab-token-bins", "format_version": 1, "dtype": "uint32", "vocab_size": vocab_size, "eot_token_id": eot,
        "tokenizer": str(tokenizer), "train_tokens": counts["train"], "val_tokens": counts["val"], "source": source}))
    return folder
