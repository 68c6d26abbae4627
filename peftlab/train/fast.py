"""What keeps the training loop from throttling a GPU, each piece with a CPU fallback.

* :func:`adamw_options`: ``fused=True`` for ``torch.optim.AdamW`` when every parameter is a
  floating CUDA tensor (``system.fused_optimizer``: ``auto`` = on CUDA only, so CPU numbers
  stay those of torch's default implementation; ``on`` = wherever torch offers it; ``off``).
* :class:`DeviceLosses`: per-step losses stay on the device and are read in one transfer
  every ``log_steps`` (and before anything that needs them: epoch ends, checkpoints), so
  the loop does not wait for the GPU each step. The host sums the read values in step
  order with Python floats, exactly as a per-step ``.item()`` did: the numbers are
  bit-identical.
* :func:`device_batches`: collates the next micro-batch on the host while the GPU runs the
  current one, and copies it from pinned memory with a non-blocking copy
  (``system.prefetch``: ``auto`` = on CUDA, the plain synchronous path on CPU).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Optional

import torch

from ..errors import PeftlabError
from ..kernels.cross_entropy import linear_cross_entropy, pad_rows


class DeviceLosses:
    """Per-step losses kept as device tensors until :meth:`flush` reads them in one transfer."""

    def __init__(self):
        self._pending: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self._pending)

    def append(self, loss: torch.Tensor) -> None:
        self._pending.append(loss.detach().reshape(()))

    def flush(self) -> list[float]:
        """The pending losses as Python floats, in step order (one device-to-host copy)."""
        if not self._pending:
            return []
        vals = torch.stack(self._pending).tolist() if len(self._pending) > 1 else [self._pending[0].item()]
        self._pending.clear()
        return vals


def auto_on(setting: str, device, key: str) -> bool:
    """An ``auto``/``on``/``off`` switch: ``auto`` is on for a CUDA device only (CPU numbers stay as they were)."""
    if setting not in ("auto", "on", "off"):
        raise PeftlabError(f"{key} must be auto, on or off, got {setting!r}.")
    return setting == "on" or (setting == "auto" and torch.device(device).type == "cuda")


def prefetch_enabled(setting: str, device: torch.device) -> bool:
    return auto_on(setting, device, "system.prefetch")


def device_batches(indices: Iterable[list[int]], load: Callable[[list[int]], dict], device: torch.device,
                   prefetch: bool) -> Iterator[dict]:
    """Yield ``load(idx)`` moved to ``device`` for each index list, in order.

    With ``prefetch`` (and a CUDA device) each batch is pinned and copied non-blocking, and the
    next one is loaded while the consumer works on the current one. Without, each batch is
    loaded and copied when asked for (the plain path). Both yield the same batches.
    """
    device = torch.device(device)
    if not prefetch or device.type != "cuda":
        for idx in indices:
            yield {k: v.to(device) for k, v in load(idx).items()}
        return
    ahead = None
    for idx in indices:
        b = {k: v.pin_memory().to(device, non_blocking=True) for k, v in load(idx).items()}
        if ahead is not None:
            yield ahead
        ahead = b
    if ahead is not None:
        yield ahead


def fused_lm_loss(model: torch.nn.Module, setting: str, task: str, device: torch.device, world: int, compile_backbone: bool,
                  autocast: Optional[Callable] = None, chunk_kernel: str = "eager"):
    """A training-loss function ``f(batch) -> loss`` that never materialises the LM-head logits, or None.

    ``system.fused_cross_entropy``:

    * ``liger``: Liger-Kernel's fused linear + cross-entropy (Triton, CUDA only);
    * ``chunked``: peftlab's own, :func:`peftlab.kernels.cross_entropy.linear_cross_entropy` (torch ops,
      any device): chunks of rows, each chunk's logits and their gradient computed and dropped at once;
    * ``auto``: on CUDA, Liger's when it imports, else the chunked one; off elsewhere;
    * ``off``: ``model(**batch).loss``.

    ``chunk_kernel`` (``system.chunked_cross_entropy``): the chunked loss's per-chunk elementwise work ``compiled``
    (one ``torch.compile``'d function) or ``eager``; ``auto`` = compiled on CUDA.

    Used for a causal LM on one process (it calls the backbone directly, not through a DDP wrapper)
    whose model is a peft or transformers model (its forward is the backbone and the head; a wrapper
    with its own forward, such as SubLoRA's, keeps the plain loss) with a bias-free head. The backbone
    runs under ``autocast`` (the loop's mixed precision), gets every batch key but the labels, and
    the loss sees the hidden states of the positions that have a next-token label (the last position
    of each row has none) and the head weight in the autocast dtype, as the head's matmul would.
    """
    if setting not in ("auto", "liger", "chunked", "off"):
        raise PeftlabError(f"system.fused_cross_entropy must be auto, liger, chunked or off, got {setting!r}.")
    if chunk_kernel not in ("auto", "compiled", "eager"):
        raise PeftlabError(f"system.chunked_cross_entropy must be auto, compiled or eager, got {chunk_kernel!r}.")
    if setting == "off":
        return None
    compiled_chunks = chunk_kernel == "compiled" or (chunk_kernel == "auto" and torch.device(device).type == "cuda")
    why = None
    if task != "causal_lm":
        why = "the task is not causal LM"
    elif setting in ("auto", "liger") and torch.device(device).type != "cuda":
        why = "the device is not CUDA"
    elif world != 1:
        why = "it runs on one process only (it bypasses the DDP wrapper)"
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    backbone = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
    if why is None and not _plain_lm(model):
        why = f"the model ({type(model).__name__}) has its own forward around the transformers model"
    if why is None and (head is None or backbone is None or getattr(head, "bias", None) is not None
                        or getattr(getattr(hf, "config", None), "final_logit_softcapping", None)):
        why = "the model has no bias-free output embedding and backbone (or caps its logits)"
    kind = "chunked" if setting == "chunked" else "liger"
    if why is None and kind == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except Exception as e:  # ImportError, or a triton/torch mismatch at import
            if setting == "liger":
                why = f"Liger-Kernel does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            kind = "chunked"
    if why is not None:
        if setting in ("liger", "chunked"):
            raise PeftlabError(f"system.fused_cross_entropy={setting} cannot be used: {why}. Use system.fused_cross_entropy=auto or off"
                               + (" (install liger-kernel for its fused kernel)." if setting == "liger" else "."))
        return None
    lce = LigerFusedLinearCrossEntropyLoss(ignore_index=-100) if kind == "liger" else None
    body = torch.compile(backbone) if compile_backbone else backbone
    ctx = autocast or contextlib.nullcontext

    def loss(batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with ctx():
            h = body(**inputs).last_hidden_state
            w = head.weight
            dev = h.device.type
            if torch.is_autocast_enabled(dev):
                dt = torch.get_autocast_dtype(dev)
                h, w = h.to(dt), w.to(dt)
        h = h[:, :-1].reshape(-1, h.shape[-1])
        y = batch["labels"][:, 1:].reshape(-1)
        if lce is not None:
            return lce(w, h, y)
        return linear_cross_entropy(h, w, y, pad_multiple=64 if h.is_cuda else 0,  # aligned GEMMs (system.pad_vocab's reason)
                                    compiled=compiled_chunks)

    loss.kind = kind + ("/compiled" if kind == "chunked" and compiled_chunks else "")
    return loss


def _plain_lm(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a peft model or a transformers model (forward = backbone + head)."""
    try:
        from peft import PeftModel

        if isinstance(model, PeftModel):
            return True
    except ImportError:  # pragma: no cover - peft is a dependency
        pass
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def drop_output_upcast(accelerator, model: torch.nn.Module, device) -> torch.nn.Module:
    """Remove accelerate's forward wrapper (autocast + every output cast to float32) on one CUDA process.

    Under bf16/fp16 ``Accelerator.prepare`` wraps ``model.forward`` so that all outputs come
    back in float32: for a causal LM that is an extra float32 copy of the logits
    (batch x seq x vocab) on every step. The loop already runs each forward inside
    ``accelerator.autocast()`` and the models compute their loss in float32, so the wrapper
    only costs time and memory. CPU runs and several processes keep it (unchanged numbers).
    """
    if torch.device(device).type != "cuda" or accelerator.num_processes != 1 or "_original_forward" not in model.__dict__:
        return model
    return accelerator.unwrap_model(model, keep_fp32_wrapper=False)


def optimizer_step(optimizer) -> None:
    """``optimizer.step()`` for an accelerate-wrapped optimizer, without its per-step package probes.

    ``AcceleratedOptimizer.step`` looks up whether the LOMO package is installed twice on every
    call (an importlib search, ~0.5 ms of host time). With no gradient scaler, no XLA and
    gradients synchronised, all it then does is call the inner optimizer's ``step``, which this
    does directly; anything else goes through accelerate.
    """
    inner = getattr(optimizer, "optimizer", None)
    state = getattr(optimizer, "accelerator_state", None)
    grad_state = getattr(optimizer, "gradient_state", None)
    if (inner is None or state is None or grad_state is None or getattr(optimizer, "scaler", None) is not None
            or not grad_state.sync_gradients or getattr(state.distributed_type, "value", "") == "XLA"):
        optimizer.step()
        return
    inner.step()


def _matmul_module_types() -> tuple[type, ...]:
    types_: list[type] = [torch.nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        types_.append(Conv1D)
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return tuple(types_)


def frozen_cast_dtype(setting: str, device, dtype: str) -> Optional[torch.dtype]:
    """``system.frozen_weights`` -> the dtype to store frozen matmul weights in, or None to keep them."""
    if setting not in ("auto", "compute", "fp32"):
        raise PeftlabError(f"system.frozen_weights must be auto, compute or fp32, got {setting!r}.")
    target = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    if setting == "fp32" or target is None:
        return None
    if setting == "auto" and torch.device(device).type != "cuda":
        return None
    return target


@torch.no_grad()
def cast_frozen_weights(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen weights and biases of every Linear / Conv1D in ``dtype``; return how many numbers moved.

    Under autocast a frozen float32 weight is cast to the compute dtype at every use (autocast
    caches only leaves that require grad), so each step reads 4 bytes and writes 2 per weight
    and saves the cast copy for the backward pass. Stored in that dtype once, the matmuls see
    exactly the values they saw before. Only parameters of the matmul modules themselves
    are cast: trainable ones (adapters, heads, full fine-tuning) stay float32, and so does any
    parameter shared with another module (a head tied to the input embedding: the embedding
    lookup is not autocast, so casting it would change the residual stream).
    """
    mm_types = _matmul_module_types()
    owners: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    moved = 0
    for mod in model.modules():
        if not isinstance(mod, mm_types):
            continue
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.requires_grad or owners[id(p)] > 1 or p.dtype != torch.float32:
                continue
            p.data = p.data.to(dtype)
            moved += p.numel()
    return moved


def pad_vocab_enabled(setting: str, device) -> bool:
    return auto_on(setting, device, "system.pad_vocab")


def pad_lm_head(model: torch.nn.Module, multiple: int = 64) -> Optional[int]:
    """Make the output embedding compute its matmul at a vocabulary padded to ``multiple``; return the padded size.

    GPU matmul libraries pick their fast kernels only for aligned sizes; GPT-2's head
    (``d x 50257``) falls back to a slow kernel. The head's forward pads the (autocast-cast)
    weight with zero rows, multiplies, and returns the first ``V`` columns: the same logits,
    from a fast kernel. The parameter itself is untouched (state dicts, tying and exports see
    the original), and nothing happens when the size is already aligned or the head is not a
    plain ``nn.Linear``.
    """
    import types as _types

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or "forward" in head.__dict__:
        return None
    vocab = head.out_features
    pad = (-vocab) % multiple
    if pad == 0:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            x, w = x.to(dt), w.to(dt)
            b = b.to(dt) if b is not None else None
        w = pad_rows(w, multiple)
        b = pad_rows(b, multiple) if b is not None else None
        return torch.nn.functional.linear(x, w, b)[..., :vocab]

    head.forward = _types.MethodType(forward, head)
    return vocab + pad


def attention_context(setting: str, device) -> Callable[[], "contextlib.AbstractContextManager"]:
    """``system.attention_kernel`` -> a factory of the context the training forward runs in.

    torch chooses a scaled-dot-product-attention kernel by a fixed priority (cuDNN's on an H100
    with torch 2.11 for GPT-2's training shape, which benchmarks/bench_attention.py measured the
    fastest of the four there); ``auto`` and ``default`` keep that choice.
    ``flash``/``cudnn``/``efficient`` put that kernel first and keep the others (math last) as
    fallbacks for inputs it does not support (an explicit mask, say); benchmarks/bench_attention.py
    times each kernel on a shape.
    Dropout inside attention draws its masks from the kernel's own random stream, so a different
    kernel gives different (equally distributed) dropout masks. On CPU nothing changes.
    """
    import contextlib

    if setting not in ("auto", "default", "flash", "cudnn", "efficient"):
        raise PeftlabError(f"system.attention_kernel must be auto, default, flash, cudnn or efficient, got {setting!r}.")
    if torch.device(device).type != "cuda" or setting in ("default", "auto"):
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = setting
    names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    order = [names[first]] + [b for k, b in names.items() if k != first and k != "cudnn"] + [SDPBackend.MATH]
    if first == "cudnn":
        order = [names["cudnn"], names["flash"], names["efficient"], SDPBackend.MATH]

    def ctx():
        try:
            return sdpa_kernel(order, set_priority=True)
        except TypeError:  # torch without set_priority: only the listed kernels are allowed, in torch's order
            return sdpa_kernel(order)

    return ctx


class GcControl:
    """``system.gc_control``: no full garbage collection in the middle of training steps.

    After ``torch.compile`` the Python heap holds millions of objects (FX graphs, guards, the
    model), and each of Python's automatic full collections walks all of them, a pause of
    tens of milliseconds that the GPU waits through. With the control on, the objects that
    exist after the first step are frozen (``gc.freeze``: never scanned again), automatic
    collection is off, and the young generations are collected every ``log_steps`` steps,
    which frees the cyclic garbage a step makes. :meth:`close` restores Python's settings.
    Nothing here changes a number; ``auto`` turns it on for CUDA only.
    """

    def __init__(self, setting: str, device, every: int):
        self.on = auto_on(setting, device, "system.gc_control")  # the config's default is off
        self.every = max(1, int(every))
        self._was_enabled = None

    def step(self, global_step: int) -> None:
        import gc

        if not self.on:
            return
        if self._was_enabled is None:  # after the first step: compiled graphs and caches exist now
            self._was_enabled = gc.isenabled()
            gc.collect()
            gc.freeze()
            gc.disable()
        elif global_step % self.every == 0:
            gc.collect(1)

    def close(self) -> None:
        import gc

        if self._was_enabled is None:
            return
        gc.unfreeze()
        if self._was_enabled:
            gc.enable()
        self._was_enabled = None
