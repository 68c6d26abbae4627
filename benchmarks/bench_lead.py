"""Issue 23: peftlab against HF PEFT, HF PEFT + Liger and Unsloth, back to back on one GPU (``bench_gpu.py --suite lead``).

Shapes (random weights from the configs shipped in ``peftlab/models/configs``, built on the GPU in bf16):

* ``gpt2``: GPT-2-124M, batch 8 x 1024, LoRA r8 alpha16 on ``c_attn``, no gradient checkpointing;
* ``qwen3b``: Qwen2.5-3B, batch 4 x 1024, gradient checkpointing, LoRA r16 alpha32 on q/k/v/o;
* ``llama8b``: Llama-3-8B, batch 4 x 1024, gradient checkpointing, LoRA r16 alpha32 on q/k/v/o.

Sides (each case: one side x one method x one shape, eager unless ``_c`` (compiled) or ``_cg`` (compiled with CUDA
graphs, ``mode="reduce-overhead"``; peftlab: ``system.compile_mode=reduce-overhead``) or ``_cb`` (each transformer
block compiled in place; peftlab: ``system.compile_scope=blocks``; HF PEFT: ``block.compile()`` on each block)):

* ``hf`` / ``hf_c``: ``AutoModelForCausalLM.from_config(cfg, dtype=bf16)`` on the GPU + ``get_peft_model``
  (adapters float32), a minimal loop: bf16 autocast forward with ``labels``, backward, fused AdamW, zero_grad;
  ``hf_c`` compiles the model. Gradient checkpointing in transformers' default form.
* ``liger``: the same with ``liger_kernel``'s ``apply_liger_kernel_to_<family>(model=...)`` first (RoPE,
  RMSNorm, SwiGLU, fused linear cross-entropy); run in a child process (Liger patches transformers' classes).
* ``unsloth``: ``FastLanguageModel.from_pretrained`` of the same random model saved to a temporary folder,
  ``FastLanguageModel.get_peft_model`` (same targets, rank, alpha, dropout 0, its own checkpointing), the same
  minimal loop; run in a child process whose ``PYTHONPATH`` starts with ``$BENCH_UNSLOTH_SITE`` (default
  ``/tmp/site-unsloth``: install the unsloth, unsloth_zoo and bitsandbytes wheels there, so that the other
  cases never import them). Any failure (import, load, step) is recorded with its exact error.
* ``peftlab`` / ``peftlab_c``: ``peftlab.train.loop.Trainer`` (the ``train`` path: token bins, logging every
  10 steps, method hooks) with the levers' ``auto``, i.e. on CUDA ``model.base_dtype=auto`` (bf16 base),
  ``lora.fused=auto`` (fused LoRA/DoRA linear) and ``system.fused_cross_entropy=auto``.
* ``peftlab_off``: the levers of issue 23 off: ``lora.fused=off``, ``system.fused_cross_entropy=off`` and at
  GPT-2 ``model.base_dtype=float32`` (the earlier path; at 3B/8B the base stays bf16 so that the build takes
  seconds, the float32 base was measured before: BENCHMARKS.md); ``peftlab_chunked``: peftlab with
  ``system.fused_cross_entropy=chunked`` (its own kernel instead of Liger's, each chunk's elementwise work eager, the
  default; ``peftlab_chunkedcomp``: with ``system.chunked_cross_entropy=auto``, that work compiled on CUDA); ``peftlab_nofce`` (the plain loss) and
  ``peftlab_nofused`` (peft's unfused LoRA layers): one lever off at a time. A ``_c`` suffix compiles any peftlab side;
  ``_gcNN`` checkpoints only NN% of the blocks (``model.gradient_checkpointing_fraction``) at the shapes that checkpoint;
  ``_re`` (after ``_gcNN``) checkpoints in torch's reentrant form (``model.gradient_checkpointing_reentrant``).

Per case: ``--warmup`` then ``--steps`` timed steps (capped per shape), host clock around a device sync;
peak memory = ``max_memory_allocated`` over the timed window; tokens/s; MFU = tokens/s x model FLOPs per
token / the bf16 matmul peak measured here (FLOPs: 4 x frozen matmul weights + 6 x trained + 12 L d_q T for
attention, no recompute); ``init_s`` (model build); the largest batch that fits (eager sides: doubling the
batch from the case's one step at a time until out of memory, ``--max-batch-s`` seconds per case at most:
``max_batch_capped`` says whether time, not memory, stopped it).

Every case is wrapped: a failure writes its exact error as the case's JSON line and the run goes on.
Cases run in priority order under a wall-clock budget (``--budget-s``); a case whose estimate does not fit
what is left is written as skipped. ``--quick`` runs every case on the CPU with toy shapes in seconds
(compiled sides skipped), to test the plumbing.

    python benchmarks/bench_gpu.py --suite lead --part 1 --out DIR [--budget-s 420] [--only gpt2:hf,qwen3b:peftlab]
    python benchmarks/bench_gpu.py --suite lead --part 2 --out DIR
    python benchmarks/bench_gpu.py --suite lead --part 4 --out DIR        # each lever alone at 3B / 8B
    python benchmarks/bench_gpu.py --suite lead --part 5 --out DIR        # the saved memory spent on less recomputation
    python benchmarks/bench_gpu.py --suite lead --part all --only qwen3b:peftlab:lora --lead-profile qwen3b:peftlab:lora --out DIR
    python benchmarks/bench_gpu.py --suite lead --out DIR --quick
"""

from __future__ import annotations

import collections
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import re
import traceback
import warnings
from pathlib import Path
from typing import Optional

import torch

from _common import (cleanup, hf_config, peak_mb, reset_peak, sync, time_trainer_steps, timed_loop, write_token_bins,
                     write_word_tokenizer)

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "peftlab/models/configs"
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]

# timed steps per row at 3B/8B: 10 (5 until 2026-12-07, when the same row moved by up to 30% between runs minutes apart)
SHAPES = {
    "gpt2": dict(config="gpt2", family="gpt2", batch=8, seq=1024, targets=["c_attn"], r=8, alpha=16, gc=False,
                 tokens=50257, eot=50256, max_warmup=5, max_steps=15,
                 tiny=dict(n_embd=32, n_layer=2, n_head=2, vocab_size=512, n_positions=64)),
    "qwen3b": dict(config="qwen2.5-3b", family="qwen2", batch=4, seq=1024, targets=QKVO, r=16, alpha=32, gc=True,
                   tokens=151665, eot=151643, max_warmup=3, max_steps=10,
                   tiny=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=64, vocab_size=512, bos_token_id=511, eos_token_id=511)),
    "llama8b": dict(config="llama-3-8b", family="llama", batch=4, seq=1024, targets=QKVO, r=16, alpha=32, gc=True,
                    tokens=128256, eot=128001, max_warmup=3, max_steps=10,
                    tiny=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=64, vocab_size=512, bos_token_id=510, eos_token_id=511)),
}
TINY_RUN = dict(batch=2, seq=32, tokens=512, eot=511)

# (part, shape, side, method, estimated seconds on a cold H200[, "nomb": no largest-batch search]), each part in
# priority order and sized for one device command of about 7 minutes. Part 1 is the comparison (HF eager and
# compiled, Unsloth, Liger, peftlab with the levers on and off, LoRA and DoRA, at the three shapes); part 2 the
# methods built on LoRA/DoRA at GPT-2 (with their references), the compiled 3B pair and the chunked loss.
PLAN = [
    (1, "gpt2", "hf", "lora", 8, "nomb"), (1, "gpt2", "peftlab", "lora", 12, "nomb"), (1, "gpt2", "peftlab_off", "lora", 8),
    (1, "qwen3b", "hf", "lora", 18), (1, "qwen3b", "peftlab", "lora", 22), (1, "qwen3b", "peftlab_off", "lora", 10),
    (1, "llama8b", "hf", "lora", 22), (1, "llama8b", "peftlab", "lora", 26), (1, "llama8b", "peftlab_off", "lora", 12),
    (1, "qwen3b", "unsloth", "lora", 40),
    (1, "qwen3b", "liger", "lora", 35), (1, "llama8b", "liger", "lora", 35),
    (1, "qwen3b", "hf", "dora", 12), (1, "qwen3b", "peftlab", "dora", 12),
    (1, "llama8b", "hf", "dora", 12), (1, "llama8b", "peftlab", "dora", 12),
    (1, "gpt2", "hf_c", "lora", 45), (1, "gpt2", "peftlab_c", "lora", 45),
    (2, "gpt2", "peftlab", "lora", 12, "nomb"), (2, "gpt2", "hf", "dora", 6), (2, "gpt2", "peftlab", "dora", 8),
    (2, "gpt2", "peftlab", "sora", 8), (2, "gpt2", "peftlab", "sdora", 8), (2, "gpt2", "peftlab", "ba_lora", 10),
    (2, "gpt2", "peftlab", "sublora", 10),
    (2, "qwen3b", "hf", "lora", 10, "nomb"), (2, "qwen3b", "hf_c", "lora", 110), (2, "qwen3b", "peftlab_c", "lora", 110),
    (2, "qwen3b", "peftlab_chunked", "lora", 12, "nomb"), (2, "llama8b", "peftlab_chunked", "lora", 15, "nomb"),
    (2, "llama8b", "unsloth", "lora", 60),
    (3, "gpt2", "hf", "lora", 8, "nomb"), (3, "gpt2", "peftlab_off", "lora", 8, "nomb"), (3, "gpt2", "peftlab", "lora", 10, "nomb"),
    (3, "gpt2", "peftlab_nofce", "lora", 8, "nomb"), (3, "gpt2", "peftlab_nofused", "lora", 8, "nomb"),
    (3, "gpt2", "peftlab_chunked", "lora", 8, "nomb"), (3, "qwen3b", "unsloth", "lora", 40),
    (3, "gpt2", "hf_c", "lora", 45), (3, "gpt2", "peftlab_nofce_c", "lora", 45),
    (3, "gpt2", "peftlab_chunked_c", "lora", 45), (3, "gpt2", "peftlab_off_c", "lora", 45),
    (3, "gpt2", "hf_cg", "lora", 60), (3, "gpt2", "peftlab_nofce_cg", "lora", 60),  # CUDA graphs (reduce-overhead), both sides
    # part 4: the levers one at a time at 3B and 8B (part 1 has them all on or all off): which buys the memory, which costs speed
    (4, "qwen3b", "hf", "lora", 18), (4, "qwen3b", "peftlab_nofce", "lora", 12, "nomb"), (4, "qwen3b", "peftlab_chunked", "lora", 22),
    (4, "qwen3b", "peftlab", "lora", 22), (4, "llama8b", "hf", "lora", 22, "nomb"), (4, "llama8b", "peftlab_nofce", "lora", 14, "nomb"),
    (4, "llama8b", "peftlab_chunked", "lora", 26, "nomb"), (4, "qwen3b", "hf", "dora", 12), (4, "qwen3b", "peftlab_chunked", "dora", 14),
    # part 5: the memory the levers save, spent on less recomputation (model.gradient_checkpointing_fraction); the
    # speed targets count at <= HF PEFT's peak on the same batch (qwen3b hf 13.9 GB, llama8b 22.7 GB in part 1)
    (5, "qwen3b", "hf", "lora", 18, "nomb"), (5, "qwen3b", "peftlab_chunked", "lora", 22, "nomb"),
    (5, "qwen3b", "peftlab_chunked_gc75", "lora", 22, "nomb"), (5, "qwen3b", "peftlab_chunked_gc50", "lora", 22, "nomb"),
    (5, "qwen3b", "peftlab_chunked_gc25", "lora", 22, "nomb"), (5, "llama8b", "hf", "lora", 22, "nomb"),
    (5, "llama8b", "peftlab_chunked_gc75", "lora", 26, "nomb"), (5, "llama8b", "peftlab_chunked_gc50", "lora", 26, "nomb"),
    (5, "qwen3b", "hf", "dora", 12, "nomb"), (5, "qwen3b", "peftlab_chunked_gc50", "dora", 14, "nomb"),
    (5, "qwen3b", "peftlab_chunked_gc75", "dora", 14, "nomb"), (5, "llama8b", "hf", "dora", 16, "nomb"),
    (5, "llama8b", "peftlab_chunked_gc75", "dora", 18, "nomb"), (5, "llama8b", "peftlab_chunked_gc50", "dora", 18, "nomb"),
    # the fractions that should land at HF's peak (0.36 GB per uncheckpointed 3B block, 2026-12-04): the targets' condition
    (5, "qwen3b", "peftlab_chunked_gc60", "lora", 22, "nomb"), (5, "qwen3b", "peftlab_chunked_gc60", "dora", 14, "nomb"),
    (5, "llama8b", "peftlab_chunked_gc80", "dora", 18, "nomb"),
    # part 6: each transformer block compiled in place (system.compile_scope=blocks; one compilation for all blocks), on
    # both sides, at 3B and 8B: the norms, rotary embedding, SwiGLU and residual adds that eager mode runs one by one
    (6, "qwen3b", "hf", "lora", 18, "nomb"), (6, "qwen3b", "hf_cb", "lora", 30, "nomb"),
    (6, "qwen3b", "peftlab_chunked_gc60_cb", "lora", 30, "nomb"), (6, "qwen3b", "peftlab_chunked_cb", "lora", 30, "nomb"),
    (6, "qwen3b", "unsloth", "lora", 90),  # same run as the rows above: the issue's ">= Unsloth" target (its child needs ~60 s to load)
    (6, "qwen3b", "hf", "dora", 12, "nomb"), (6, "qwen3b", "peftlab_chunked_gc60_cb", "dora", 30, "nomb"),
    (6, "llama8b", "hf", "lora", 22, "nomb"), (6, "llama8b", "hf_cb", "lora", 30, "nomb"),
    (6, "llama8b", "peftlab_chunked_gc75_cb", "lora", 30, "nomb"),
    (6, "llama8b", "hf", "dora", 16, "nomb"), (6, "llama8b", "peftlab_chunked_gc80_cb", "dora", 30, "nomb"),
    # part 7: the issue's "compiled HF PEFT" read strictly, HF compiled as a whole model (138 s / 120 s to compile at
    # 3B / 8B on an H100, 2026-12-07), beside peftlab's fastest form and Unsloth in the same run
    (7, "qwen3b", "hf_c", "lora", 150, "nomb"), (7, "qwen3b", "peftlab_chunked_gc60_cb", "lora", 30, "nomb"),
    (7, "qwen3b", "unsloth", "lora", 90),
    (7, "llama8b", "hf_c", "lora", 130, "nomb"), (7, "llama8b", "peftlab_chunked_gc75_cb", "lora", 30, "nomb"),
    (7, "llama8b", "unsloth", "lora", 90),
    # part 8: the 8B row against Unsloth again, in the order A B A (the repeated row is a second JSON line; the summary
    # table keeps the last), the chunked loss's compiled chunk body (``peftlab_chunkedcomp``) against the eager one,
    # reentrant checkpointing (``_re``) and fewer checkpointed blocks (21 of 32 at gc66: near 22.9 GB by part 5's
    # 0.54 GB per block, just over HF PEFT's 22.7 GB; compiled blocks may keep less); the 3B DoRA/SoRA/SDoRA steps
    # next to LoRA's with the same recipe
    (8, "llama8b", "peftlab_chunked_gc75_cb", "lora", 30, "nomb"), (8, "llama8b", "unsloth", "lora", 90),
    (8, "llama8b", "peftlab_chunkedcomp_gc75_cb", "lora", 30, "nomb"),
    (8, "llama8b", "peftlab_chunked_gc75_re_cb", "lora", 30, "nomb"), (8, "llama8b", "peftlab_chunked_gc66_re_cb", "lora", 30, "nomb"),
    (8, "llama8b", "peftlab_chunked_gc75_cb", "lora", 30, "nomb"),
    (8, "qwen3b", "peftlab_chunked_gc60_cb", "lora", 30, "nomb"), (8, "qwen3b", "peftlab_chunkedcomp_gc60_cb", "lora", 30, "nomb"),
    (8, "qwen3b", "peftlab_chunked_gc60_cb", "dora", 30, "nomb"),
    (8, "qwen3b", "peftlab_chunked_gc60_cb", "sora", 30, "nomb"), (8, "qwen3b", "peftlab_chunked_gc60_cb", "sdora", 30, "nomb"),
    (8, "qwen3b", "peftlab_chunked_gc60_re_cb", "lora", 30, "nomb"), (8, "qwen3b", "peftlab_chunked_gc60_re_cb", "dora", 30, "nomb"),
    # part 9: every adapter at GPT-2 with the fastest GPT-2 recipe (bf16 base, fused LoRA, plain loss), eager and
    # compiled: the "<= 1.05x the step of the adapter it builds on" targets (SoRA, BA-LoRA, SubLoRA on LoRA; SDoRA on DoRA)
    *[(9, "gpt2", side, m, est, "nomb") for side, est in (("peftlab_nofce", 10), ("peftlab_nofce_c", 45))
      for m in ("lora", "sora", "ba_lora", "sublora", "dora", "sdora")],
]
CHILD_SIDES = ("liger", "unsloth")  # they patch transformers globally: one child process per case


# ------------------------------------------------------------------ helpers
def _err(e: BaseException) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"[:500]


def _oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def bf16_peak_tflops(dev, n=8192, reps=10) -> Optional[float]:
    if dev.type != "cuda":
        return None
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    out = 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12
    del a, b
    return out


def shape_spec(name: str, quick: bool) -> dict:
    s = dict(SHAPES[name], name=name, quick=quick)
    cfg = json.loads((CONFIG_DIR / f"{s['config']}.json").read_text())
    cfg.pop("architectures", None)
    if quick:
        cfg.update(s["tiny"])
        s.update(TINY_RUN)
    s["hf_config"] = cfg
    return s


def model_flops(model, s: dict) -> dict:  # noqa: D401
    """FLOPs per token: 4 x frozen matmul weights + 6 x trained ones (adapters) + 12 L d_q T (attention)."""
    from transformers.pytorch_utils import Conv1D

    frozen = trained = 0
    seen = set()
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, Conv1D)) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            if m.weight.requires_grad:  # adapters (and every weight under full fine-tuning)
                trained += m.weight.numel()
            else:
                frozen += m.weight.numel()
    c = hf_config(s)
    L = getattr(c, "num_hidden_layers", None) or c.n_layer
    heads = getattr(c, "num_attention_heads", None) or c.n_head
    d = getattr(c, "hidden_size", None) or c.n_embd
    hd = getattr(c, "head_dim", None) or d // heads
    attn = 12 * L * heads * hd * s["seq"]
    return {"flops_per_token": float(4 * frozen + 6 * trained + attn), "n_frozen_matmul": frozen, "n_trained_matmul": trained}


_DATA: dict = {}


def shape_data(s: dict, root: Path, n_steps: int) -> dict:
    """Token bins (uint32, random tokens) and a tokenizer for peftlab's ``train`` path; a model folder for tiny configs."""
    key = (s["name"], s["quick"], n_steps)
    if key in _DATA:
        return _DATA[key]
    sub = root / f"{s['name']}{'_tiny' if s['quick'] else ''}_{n_steps}"
    tok = write_word_tokenizer(sub / "tokenizer", s["tokens"], s["eot"])
    T, B = s["seq"], s["batch"]
    bins = write_token_bins(sub / "bins", T * B * (n_steps + 12), T * B, s["tokens"], s["eot"], tok, "random tokens (bench_lead.py)")
    name = s["config"]
    if s["quick"]:  # a local folder with config.json: the from_scratch path for a config peftlab does not ship
        (sub / "model").mkdir(exist_ok=True)
        (sub / "model" / "config.json").write_text(json.dumps(s["hf_config"]))
        name = str(sub / "model")
    _DATA[key] = {"dataset": str(bins), "tokenizer": str(tok), "model": name}
    return _DATA[key]


def max_batch_search(step, start: int, seq: int, dev, cap_s: float, limit: int = 1024) -> dict:
    """Largest batch (doubling from ``start``) for which ``step(batch)`` runs, within ``cap_s`` seconds."""
    if cap_s <= 0:
        return {}
    t_begin = time.perf_counter()
    best, best_peak, bs, last, capped = None, None, start, 0.0, False
    while bs <= limit:
        if best is not None and time.perf_counter() - t_begin + 2.2 * last > cap_s:
            capped = True
            break
        try:
            reset_peak(dev)
            t = time.perf_counter()
            step(bs)
            sync(dev)
            last = time.perf_counter() - t
            best, best_peak = bs, peak_mb(dev)
            bs *= 2
        except Exception as e:  # noqa: BLE001
            if not _oom(e):
                return {"max_batch": best, "max_batch_error": _err(e)}
            break
        finally:
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return {"max_batch": best, "max_batch_peak_mb": best_peak, "max_batch_capped": capped or bs > limit,
            "max_batch_s": time.perf_counter() - t_begin}


def random_batches(s: dict, dev, n: int = 4, batch: Optional[int] = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B = batch or s["batch"]
    return [torch.randint(0, s["eot"], (B, s["seq"]), generator=g).to(dev) for _ in range(n)]


# ------------------------------------------------------------------ HF PEFT (+ Liger / Unsloth)
def build_hf(s: dict, method: str, dev, liger: bool = False, seed: int = 42):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(hf_config(s), dtype=torch.bfloat16)
        if liger:
            import liger_kernel.transformers as lk

            getattr(lk, f"apply_liger_kernel_to_{s['family']}")(model=model)
        if s["gc"]:
            model.gradient_checkpointing_enable()
        model = get_peft_model(model, LoraConfig(r=s["r"], lora_alpha=s["alpha"], lora_dropout=0.0, target_modules=list(s["targets"]),
                                                 task_type="CAUSAL_LM", use_dora=method == "dora"))
    return model.to(dev)


def make_profiler(dev):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    return profile(activities=acts)


#: CUDA runtime calls that make the host wait (or allocate from the driver): counted per step in a profile
HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync",
              "cudaMalloc", "cudaFree", "cudaHostAlloc")


def profile_report(prof, steps: int, path: Path) -> dict:
    """The profiled window into ``path``: the top 25 ops by device time, then the top 30 by host (self CPU) time, and
    the CUDA runtime calls that make the host wait (:data:`HOST_WAITS`) with their host time; returns GPU busy ms,
    kernels per step and those calls per step."""
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time_total for e in kernels) / 1e3 / steps
    waits: dict = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CPU and e.name in HOST_WAITS:
            n, us = waits.get(e.name, (0, 0.0))
            waits[e.name] = (n + 1, us + e.cpu_time_total)
    sort = "cuda_time_total" if kernels else "cpu_time_total"
    avg = prof.key_averages()
    lines = [f"GPU kernels busy {busy:.1f} ms/step, {len(kernels) / steps:.0f} kernels/step over {steps} steps",
             "host-waiting runtime calls per step: " + (", ".join(f"{k} {n / steps:.1f} ({us / 1e3 / steps:.1f} ms)"
                                                                  for k, (n, us) in sorted(waits.items())) or "none"),
             avg.table(sort_by=sort, row_limit=25), "", "by host time:", avg.table(sort_by="self_cpu_time_total", row_limit=30)]
    path.write_text("\n".join(lines))
    return {"profiled": True, "gpu_busy_ms": busy, "kernels_per_step": len(kernels) / steps, "profile_file": path.name,
            "host_waits_per_step": {k: round(n / steps, 1) for k, (n, _) in waits.items()}}


class SyncWatch:
    """A stand-in for a profiler over the timed steps: ``torch.cuda.set_sync_debug_mode("warn")`` on, and every
    synchronising call recorded with the Python frames that made it (the innermost frames outside torch).
    :meth:`report` writes the call sites, most frequent first."""

    def __init__(self, frames: int = 4):
        self.frames, self.sites, self._old = frames, collections.Counter(), None

    def _show(self, message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return self._old(message, category, filename, lineno, file, line)
        stack = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename and "/warnings.py" not in f.filename]
        self.sites[" <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in stack[-self.frames:][::-1])] += 1

    def __enter__(self):
        self._old, warnings.showwarning = warnings.showwarning, self._show
        self._filters = warnings.filters[:]
        warnings.simplefilter("always")
        if torch.cuda.is_available():  # without CUDA only warnings raised by hand are recorded (the CPU test)
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):  # a second call (a case that failed mid-way is closed again) does nothing
        if self._old is None:
            return False
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning, warnings.filters[:] = self._old, self._filters
        self._old = None
        return False

    def report(self, steps: int, path: Path) -> dict:
        total = sum(self.sites.values())
        path.write_text(f"{total / steps:.1f} synchronising calls per step over {steps} steps\n"
                        + "".join(f"{n / steps:8.1f}  {site}\n" for site, n in self.sites.most_common()))
        return {"syncs_per_step": total / steps, "sync_file": path.name}


def compile_mode(side: str):
    """A side's ``torch.compile`` mode: ``X_c`` compiled (default mode), ``X_cg`` compiled with CUDA graphs
    (``reduce-overhead``: the step's kernels replayed as one graph), else None (eager)."""
    return "reduce-overhead" if side.endswith("_cg") else "default" if side.endswith(("_c", "_cb")) else None


def compile_scope(side: str) -> str:
    """``X_cb``: each transformer block compiled in place (peftlab ``system.compile_scope=blocks``), else the whole model."""
    return "blocks" if side.endswith("_cb") else "model"


def lever_set(side: str) -> str:
    """The side without its compile suffix (``peftlab_nofce_cg`` -> ``peftlab_nofce``)."""
    return side.rsplit("_", 1)[0] if compile_mode(side) else side


def minimal_loop(model, s: dict, dev, warmup: int, steps: int, compile_: Optional[str], prof=None, scope: str = "model") -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev.type == "cuda")
    model.train()
    if compile_ is not None and scope == "blocks":  # what system.compile_scope=blocks does, by hand on HF PEFT
        from peftlab.train.sharding import transformer_blocks

        for block in transformer_blocks(model):
            block.compile(mode=None if compile_ == "default" else compile_)
    fwd = model if compile_ is None or scope == "blocks" else torch.compile(model, mode=None if compile_ == "default" else compile_)
    batches = random_batches(s, dev)

    def step(x):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t = timed_loop(lambda i: step(batches[i % len(batches)]), warmup, steps, dev, at_start=prof.__enter__ if prof is not None else None)
    if prof is not None:
        prof.__exit__(None, None, None)
    out = {"step_ms": 1e3 * t["seconds"] / steps, "peak_mb": peak_mb(dev), "last_loss": float(t["last"].detach()),
           "trainable": sum(p.numel() for p in params), "new_graphs_after_warmup": t["new_graphs"]}
    out["_step"] = lambda b: step(torch.randint(0, s["eot"], (b, s["seq"]), device=dev))
    out["_opt"] = opt
    return out


def run_hf(s: dict, side: str, method: str, dev, a) -> dict:
    t = time.perf_counter()
    model = build_hf(s, method, dev, liger=side == "liger")
    init_s = time.perf_counter() - t
    prof = make_profiler(dev) if a.case in a.profile else None
    r = minimal_loop(model, s, dev, a.warmup_n, a.steps_n, compile_mode(side), prof=prof, scope=compile_scope(side))
    if prof is not None:
        r.update(profile_report(prof, a.steps_n, a.out_dir / f"profile_{a.case.replace(':', '_')}.txt"))
    r.update(init_s=init_s, base_dtype=str(next(p for p in model.parameters() if not p.requires_grad).dtype), **model_flops(model, s))
    step = r.pop("_step")
    opt = r.pop("_opt")
    if compile_mode(side) is None and method == "lora":
        opt.zero_grad(set_to_none=True)
        r.update(max_batch_search(step, s["batch"], s["seq"], dev, a.max_batch_s))
    del model, opt, step
    return r


def run_unsloth(s: dict, method: str, dev, a) -> dict:
    """Unsloth's LoRA path; each stage's failure is recorded with the stage's name."""
    stage = "import unsloth"
    try:
        import unsloth  # noqa: F401  (patches transformers; this runs in a child process)
        from unsloth import FastLanguageModel

        stage = "save the random model"
        from transformers import AutoModelForCausalLM

        folder = Path(tempfile.mkdtemp(prefix="bench_unsloth_"))
        torch.manual_seed(42)
        with torch.device(dev):
            base = AutoModelForCausalLM.from_config(hf_config(s), dtype=torch.bfloat16)
        base.save_pretrained(folder, safe_serialization=True)
        # a pad token of its own: Unsloth refuses one equal to end-of-text on Llama (it failed so on 2026-12-07)
        write_word_tokenizer(folder, s["tokens"], s["eot"], pad="<|finetune_right_pad_id|>" if s["eot"] < s["tokens"] - 1 else "")
        del base
        cleanup(dev)
        stage = "FastLanguageModel.from_pretrained"
        t = time.perf_counter()
        model, _ = FastLanguageModel.from_pretrained(str(folder), max_seq_length=s["seq"], dtype=torch.bfloat16, load_in_4bit=False)
        stage = "FastLanguageModel.get_peft_model"
        model = FastLanguageModel.get_peft_model(model, r=s["r"], target_modules=list(s["targets"]), lora_alpha=s["alpha"], lora_dropout=0,
                                                 bias="none", use_gradient_checkpointing="unsloth" if s["gc"] else False, random_state=42)
        init_s = time.perf_counter() - t
        stage = "training steps"
        r = minimal_loop(model, s, dev, a.warmup_n, a.steps_n, False)
        step, opt = r.pop("_step"), r.pop("_opt")
        opt.zero_grad(set_to_none=True)
        r.update(init_s=init_s, unsloth=getattr(unsloth, "__version__", None), **model_flops(model, s))
        r.update(max_batch_search(step, s["batch"], s["seq"], dev, a.max_batch_s))
        return r
    except BaseException as e:  # noqa: BLE001  (an import may raise anything, even SystemExit)
        return {"error": f"{stage}: {_err(e)}", "traceback_tail": traceback.format_exc()[-1500:]}


# ------------------------------------------------------------------ peftlab
class _Done(Exception):
    """Raised from the step hook once the timed window ends (no evaluation or export is timed or needed)."""


def peftlab_raw(s: dict, side: str, method: str, data: dict, run_dir: Path, dev, steps_total: int, quick: bool) -> dict:
    raw = {
        "method": method,
        "model": {"name": data["model"], "from_scratch": True, "target_modules": list(s["targets"]),
                  "gradient_checkpointing": s["gc"]},
        "data": {"dataset": data["dataset"], "tokenizer": data["tokenizer"], "block_size": s["seq"], "max_val_examples": s["batch"]},
        "training": {"seed": 42, "epochs": 1, "max_steps": steps_total + 1, "batch_size": s["batch"], "learning_rate": 1e-4,
                     "log_steps": 10, "save_steps": 0, "max_grad_norm": None, "eval_max_batches": 1},
        "output": {"dir": str(run_dir), "overwrite": True},
        "logging": {"progress_bar": False},
        "system": {"device": dev.type, "dtype": "bf16", "compile": compile_mode(side) is not None,
                   "compile_mode": compile_mode(side) or "default", "compile_scope": compile_scope(side)},
        "lora": {"r": s["r"], "alpha": s["alpha"], "dropout": 0.0},
    }
    if method == "ba_lora":
        raw["ba_lora"] = {"base_rank": s["r"], "gradient_samples": 8 * s["batch"]}
    if method == "sublora":
        raw["sublora"] = {"intrinsic_dim": 1000 if not quick else 64}
    # the levers' switches are named here: their config defaults stay off until their GPU tests have passed
    raw["lora"]["fused"] = "auto"
    raw["system"]["fused_cross_entropy"] = "auto"
    raw["model"]["base_dtype"] = "auto"
    lever = lever_set(side)  # peftlab_X_c / peftlab_X_cg: lever set X, compiled
    reentrant = lever.endswith("_re")  # peftlab_X_re: torch's reentrant checkpointing (model.gradient_checkpointing_reentrant)
    if reentrant:
        lever = lever[:-3]
        if s["gc"]:
            raw["model"]["gradient_checkpointing_reentrant"] = True
    gc = re.fullmatch(r"(.+)_gc(\d+)", lever)  # peftlab_X_gcNN: lever set X, NN% of the blocks checkpointed
    if gc:
        lever = gc.group(1)
        if s["gc"]:
            raw["model"]["gradient_checkpointing_fraction"] = int(gc.group(2)) / 100
    if lever == "peftlab_off":
        raw["lora"]["fused"] = "off"
        raw["system"]["fused_cross_entropy"] = "off"
        if s["name"] == "gpt2":
            raw["model"]["base_dtype"] = "float32"
    elif lever in ("peftlab_chunked", "peftlab_chunkedcomp"):  # chunkedcomp: each chunk's elementwise work compiled
        raw["system"]["fused_cross_entropy"] = "chunked"
        if lever == "peftlab_chunkedcomp":
            raw["system"]["chunked_cross_entropy"] = "auto"
    elif lever == "peftlab_nofce":  # bf16 base and fused LoRA, the plain loss: one lever's share at a time
        raw["system"]["fused_cross_entropy"] = "off"
    elif lever == "peftlab_nofused":  # bf16 base and the fused loss, peft's unfused LoRA layers
        raw["lora"]["fused"] = "off"
    elif quick:  # on the CPU the levers' auto is off: force them on to run their code
        raw["lora"]["fused"] = "on"
        if method != "sublora":  # SubLoRA's own forward keeps the plain loss (auto skips it on CUDA)
            raw["system"]["fused_cross_entropy"] = "chunked"
        raw["model"]["base_dtype"] = "bfloat16"
    return raw


def run_peftlab(s: dict, side: str, method: str, dev, a) -> dict:
    from peftlab.config import config_from_dict
    from peftlab.train.loop import Trainer

    warmup, steps = a.warmup_n, a.steps_n
    data = shape_data(s, a.work, warmup + steps)
    cfg = config_from_dict(peftlab_raw(s, side, method, data, a.work / "runs" / f"{s['name']}_{side}_{method}", dev, warmup + steps, a.quick))
    t = time.perf_counter()
    trainer = Trainer(cfg, console=False)
    init_s = time.perf_counter() - t
    model = trainer.unwrapped()
    prof = make_profiler(dev) if a.case in a.profile else None

    def done():
        if prof is not None:
            prof.__exit__(None, None, None)
        raise _Done

    mark = time_trainer_steps(trainer, dev, warmup, steps, at_start=prof.__enter__ if prof is not None else None, at_end=done)
    try:
        trainer.run()
    except _Done:
        pass
    frozen = next((p for p in model.parameters() if not p.requires_grad), None)
    fused_layers = sum(1 for m in model.modules() if getattr(m.__dict__.get("forward"), "__name__", "") == "fused_forward")
    opt = trainer.optimizer
    r = {"step_ms": 1e3 * (mark["t1"] - mark["t0"]) / steps, "peak_mb": mark["peak"], "init_s": init_s,
         "new_graphs_after_warmup": mark["g1"] - mark["g0"],
         "base_dtype": str(frozen.dtype) if frozen is not None else None, "fused_lora_layers": fused_layers,
         "fused_ce": getattr(trainer.train_loss, "kind", None), "optimizer": type(getattr(opt, "optimizer", opt)).__name__,
         "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), **model_flops(model, s)}
    if prof is not None:
        r.update(profile_report(prof, steps, a.out_dir / f"profile_{a.case.replace(':', '_')}.txt"))
    if compile_mode(side) is None and method == "lora" and side == "peftlab":
        loss_fn = trainer.train_loss or (lambda b: trainer._loss(trainer.model, b))

        def step(bs):
            x = torch.randint(0, s["eot"], (bs, s["seq"]), device=dev)
            b = {"input_ids": x, "labels": x}
            with trainer.attention():
                loss = loss_fn(b)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        opt.zero_grad(set_to_none=True)
        r.update(max_batch_search(step, s["batch"], s["seq"], dev, a.max_batch_s))
    try:
        from peftlab.tracking import close_logger
        from peftlab.train import lock

        lock.release(Path(cfg.output.dir))
        close_logger()
    except Exception:  # noqa: BLE001
        pass
    del trainer, model, frozen, opt
    return r


# ------------------------------------------------------------------ driver
def run_case(shape: str, side: str, method: str, a, nomb: bool = False) -> dict:
    dev = torch.device(a.device)
    a.max_batch_s = 0.0 if nomb else a.max_batch_s_default
    s = shape_spec(shape, a.quick)
    if a.quick:  # the largest-batch search runs too, briefly
        a.max_batch_s = min(a.max_batch_s, 1.0)
    a.warmup_n = max(1, min(a.warmup, s["max_warmup"], 1 if a.quick else 99))
    a.steps_n = max(1, min(a.steps, s["max_steps"], 2 if a.quick else 999))
    a.case = f"{shape}:{side}:{method}"
    row = {"case": a.case, "shape": shape, "side": side, "method": method, "batch": s["batch"], "seq": s["seq"],
           "warmup": a.warmup_n, "steps": a.steps_n, "quick": a.quick}
    if dev.type == "cuda":  # what earlier cases left allocated (a leak would show here)
        row["mem_before_mb"] = torch.cuda.memory_allocated(dev) / 2**20
    t = time.perf_counter()
    try:
        if side in ("hf", "hf_c", "hf_cg", "hf_cb", "liger"):
            r = run_hf(s, side, method, dev, a)
        elif side == "unsloth":
            r = run_unsloth(s, method, dev, a)
        else:
            r = run_peftlab(s, side, method, dev, a)
    except BaseException as e:  # noqa: BLE001  one failing case must not lose the others
        if isinstance(e, KeyboardInterrupt):
            raise
        r = {"error": _err(e), "traceback_tail": traceback.format_exc()[-1500:]}
    row.update(r)
    if "step_ms" in row:
        row["tok_s"] = s["batch"] * s["seq"] / (row["step_ms"] / 1e3)
        if a.peak and "flops_per_token" in row:
            row["mfu"] = row["tok_s"] * row["flops_per_token"] / (a.peak * 1e12)
    if row.get("peak_mb") is None:
        row.pop("peak_mb", None)
    row["wall_s"] = time.perf_counter() - t
    cleanup(dev)
    return row


def child_cases(cases: list[tuple[str, str, str]], a, timeout: float) -> list[dict]:
    """Cases in one fresh Python process (sides that patch transformers); their JSON lines, or why there are none."""
    spec = ",".join(":".join(c) for c in cases)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", spec, "--device", a.device,
           "--warmup", str(a.warmup), "--steps", str(a.steps), "--max-batch-s", str(a.max_batch_s_default), "--work", str(a.work),
           "--peak", str(a.peak or 0), "--out", str(a.out_dir), "--profile", ",".join(sorted(a.profile))] + (["--quick"] if a.quick else [])
    env = dict(os.environ)
    extra = os.environ.get("BENCH_UNSLOTH_SITE", "/tmp/site-unsloth")
    if cases[0][1] == "unsloth" and os.path.isdir(extra):  # unsloth (and bitsandbytes) only on this child's path
        env["PYTHONPATH"] = extra + os.pathsep + env.get("PYTHONPATH", "")
    t = time.perf_counter()
    out_lines, why, tail = [], None, ""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10, timeout), env=env)
        out_lines, tail = p.stdout.splitlines(), p.stderr[-1500:]
        why = f"child process exited {p.returncode} without a result"
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        out_lines, tail = stdout.splitlines(), stderr[-1500:]
        why = f"timed out after {timeout:.0f} s (child process)"
    got = {}
    for line in out_lines:
        if line.startswith("{") and '"case"' in line:
            try:
                r = json.loads(line)
                got[r["case"]] = r
            except ValueError:
                pass
    rows = []
    for shape, side, method in cases:
        key = f"{shape}:{side}:{method}"
        rows.append(got.get(key) or {"case": key, "shape": shape, "side": side, "method": method, "error": why,
                                      "stderr_tail": tail, "wall_s": time.perf_counter() - t})
    return rows


def summary(rows: list[dict], out: Path) -> str:
    by = {(r["shape"], r["side"], r["method"]): r for r in rows if "shape" in r}
    lines = ["| shape | method | side | step ms | tok/s | peak MB | MFU | max batch | init s | tok/s vs hf | vs hf_c (else hf_cb) | peak vs hf | "
             "step vs its adapter | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    built_on = {"dora": "lora", "sora": "lora", "ba_lora": "lora", "sublora": "lora", "sdora": "dora"}
    for (shape, side, method), r in by.items():
        def ratio(other):
            o = by.get((shape, other, method))
            return f"{r['tok_s'] / o['tok_s']:.2f}x" if o and "tok_s" in o and "tok_s" in r else "-"

        def mem(other):
            o = by.get((shape, other, method))
            return f"{r['peak_mb'] / o['peak_mb']:.2f}x" if o and o.get("peak_mb") and r.get("peak_mb") else "-"

        def adapter():
            o = by.get((shape, side, built_on.get(method, "")))
            return f"{r['step_ms'] / o['step_ms']:.2f}x {built_on[method]}" if o and "step_ms" in o and "step_ms" in r else "-"

        if "tok_s" in r:
            mb = r.get("max_batch")
            mbs = "-" if mb is None else f"{mb}{'+' if r.get('max_batch_capped') else ''}"
            note = f"base {r.get('base_dtype')}" + (f", fused LoRA {r['fused_lora_layers']}" if r.get("fused_lora_layers") else "") + \
                   (f", CE {r['fused_ce']}" if r.get("fused_ce") else "")
            lines.append(f"| {shape} | {method} | {side} | {r['step_ms']:.1f} | {r['tok_s'] / 1e3:.1f}k | {r.get('peak_mb', 0):.0f} | "
                         f"{100 * r.get('mfu', 0):.1f}% | {mbs} | {r.get('init_s', 0):.1f} | {ratio('hf')} | {ratio('hf_c') if (shape, 'hf_c', method) in by else ratio('hf_cb')} | {mem('hf')} | "
                         f"{adapter()} | {note} |")
        else:
            lines.append(f"| {shape} | {method} | {side} | - | - | - | - | - | - | - | - | - | - | {str(r.get('error') or r.get('skipped'))[:160]} |")
    text = "\n".join(lines)
    (out / "bench_lead_summary.md").write_text(text + "\n")
    return text


def main_lead(a) -> None:
    """The suite (``bench_gpu.py --suite lead``); ``a`` has out, part, budget_s, only, quick, warmup, steps, max_batch_s."""
    t_start = time.perf_counter()
    a.device = "cpu" if a.quick else "cuda"
    dev = torch.device(a.device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    a.work = Path(tempfile.mkdtemp(prefix="bench_lead_"))
    import peft
    import transformers

    info = {"suite": "lead", "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "warmup": a.warmup, "steps": a.steps, "budget_s": a.budget_s, "quick": a.quick, "part": a.part}
    from importlib.metadata import version

    for mod in ("liger-kernel", "unsloth", "unsloth_zoo", "triton"):
        try:
            info[mod] = version(mod)
        except Exception:  # noqa: BLE001
            info[mod] = None
    a.peak = bf16_peak_tflops(dev)
    a.max_batch_s_default = a.max_batch_s
    a.out_dir = out
    a.profile = set(x for x in (getattr(a, "lead_profile", "") or "").split(",") if x)
    info["bf16_peak_tflops"] = a.peak
    jl = open(out / "bench_lead.jsonl", "a")
    jl.write(json.dumps(info) + "\n")
    jl.flush()
    print(json.dumps(info), flush=True)
    plan = [p[1:] for p in PLAN if a.part == "all" or p[0] == int(a.part)]
    if a.only:
        want = [tuple(x.split(":")) for x in a.only.split(",") if x]
        plan = [p for p in plan if any(tuple(p[:len(w)]) == w for w in want)]
    rows = []

    def emit(row):
        rows.append(row)
        jl.write(json.dumps(row, default=str) + "\n")
        jl.flush()
        print(json.dumps(row, default=str), flush=True)
        summary(rows, out)  # kept current: a run cut short still has its table

    i = 0
    while i < len(plan):
        shape, side, method, est, *opts = plan[i]
        i += 1
        left = a.budget_s - (time.perf_counter() - t_start)
        base = {"case": f"{shape}:{side}:{method}", "shape": shape, "side": side, "method": method}
        no_unsloth = next((r for r in rows if r.get("side") == "unsloth" and str(r.get("error", "")).startswith("import unsloth")), None)
        if side == "unsloth" and no_unsloth is not None:
            emit({**base, "error": f"not run: {no_unsloth['error']} (row {no_unsloth['case']})"})
        elif a.quick and compile_mode(side):
            emit({**base, "skipped": "compiled sides are skipped in --quick"})
        elif not a.quick and est > left:
            emit({**base, "skipped": f"time budget: about {est} s needed, {left:.0f} s left of --budget-s {a.budget_s}"})
        elif side in CHILD_SIDES:  # this and the following cases of the same side in one child process
            group, total = [(shape, side, method)], est
            while i < len(plan) and plan[i][2] == side and (a.quick or total + plan[i][4] <= left):
                group.append(plan[i][1:4])
                total += plan[i][4]
                i += 1
            for row in child_cases(group, a, timeout=300 if a.quick else min(max(2.5 * total, 60), left)):
                emit(row)
        else:
            emit(run_case(shape, side, method, a, nomb="nomb" in opts))
    text = summary(rows, out)
    print(text, flush=True)
    print(f"total wall time {time.perf_counter() - t_start:.0f} s", flush=True)


def main_child(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--child", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--max-batch-s", type=float, default=12.0)
    ap.add_argument("--work", required=True)
    ap.add_argument("--peak", type=float, default=0.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile", default="")
    a = ap.parse_args(argv)
    a.work, a.peak, a.max_batch_s_default = Path(a.work), a.peak or None, a.max_batch_s
    a.out_dir, a.profile = Path(a.out), set(x for x in a.profile.split(",") if x)
    for case in a.child.split(","):
        shape, side, method = case.split(":")
        print(json.dumps(run_case(shape, side, method, a), default=str), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main_child()
