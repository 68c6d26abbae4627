"""A faster view of a causal LM for scoring, with the same numbers as the model's own forward pass.

Scoring a bound runs the frozen, adapted model over tens of millions of window tokens. A GPU
profile of GPT-2-124M + SubLoRA (benchmarks/bench_scoring.py, BENCHMARKS.md) showed matrix
products at a quarter of the GPU time and the rest in element-wise kernels: GPT-2's GELU
written as eight tensor operations, the LoRA branch beside every adapted layer (two small
products, casts, an add), autocast's fresh bf16 copy of every weight at every call, and an LM
head whose 50,257-column output has no 16-byte-aligned rows (an old, slow GEMM kernel).
:func:`scoring_view` removes each of these for the duration of a scoring and restores the
model exactly afterwards:

* adapters merged: every plain peft LoRA layer (not DoRA, not peftlab's gated or factored
  layers, which keep their own forward) gets ``W₀ + s·B·A`` in its base weight; the original
  weight is saved and written back bit for bit on exit (peft's ``unmerge`` subtracts, which
  would not restore it exactly);
* ``NewGELUActivation`` (the tanh GELU as Python arithmetic) replaced by torch's fused
  ``gelu(approximate="tanh")``, the same function;
* the forward pass split at the LM head: the model's body gives the final hidden states, and
  the head runs only on the positions that count, in chunks, with its weight padded to a
  multiple of 64 rows (the padding's logits are cut off before any reduction);
* under bf16 autocast, the weights of linear layers (not embeddings, not tied to one) are
  stored in bf16 for the duration: autocast would cast them to exactly these values at every
  call, so the numbers do not change.

The first three change rounding only. They are checked, before any scoring, on two rows of
real input: the view's logits (float32, TF32 off; a base stored in bf16 is upcast to float32 for
the check) must equal the model's own to 1e-4 of their largest magnitude, else the view is not used and the caller scores with the model's own
logits (a model that post-processes its logits, a merge peft gets wrong, a wrapper whose
forward substitutes weights all fail this check).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from ..kernels.cross_entropy import pad_rows
from ..train.sharding import transformer_blocks

# configuration attributes of models whose logits are not the plain output of their LM head
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
CHECK_TOLERANCE = 1e-4


class TanhGELU(torch.nn.Module):
    """``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` as one fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


def hf_model(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The innermost Hugging Face causal LM (the module with an LM head and a config)."""
    for m in model.modules():
        if callable(getattr(m, "get_output_embeddings", None)) and getattr(m, "config", None) is not None \
                and isinstance(getattr(m, "base_model_prefix", None), str) and hasattr(m, m.base_model_prefix):
            return m
    return None


class ScoringView:
    """Body + head of a causal LM: :meth:`hidden` and :meth:`logits` (of selected hidden states)."""

    def __init__(self, body: torch.nn.Module, head: torch.nn.Linear, vocab: int,
                 head_low_rank: tuple[tuple[torch.nn.Linear, torch.nn.Linear, float], ...] = ()):
        self.body, self.head, self.vocab = body, head, vocab
        # an adapted LM head (SubLoRA's lm_head, usually tied to the input embedding, so it is never merged):
        # its low-rank terms (A, B, scaling) are added to the base head's logits of the counted positions
        self.head_low_rank = head_low_rank
        self._w: Optional[torch.Tensor] = None
        self._lr: tuple[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], float], ...] = ()
        self._dtype: Optional[torch.dtype] = None
        # no key/value cache: it is never read here, and building it costs a copy per layer
        self._kw = {"use_cache": False} if "use_cache" in inspect.signature(body.forward).parameters else {}
        self._blocks: list[torch.nn.Module] = []  # blocks compiled in place by compile_body

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(input_ids=x, **self._kw)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def compile_body(self, x_check: torch.Tensor) -> bool:
        """``bounds.compile_body``: each transformer block of the body compiled in place (``block.compile``, dynamic in
        batch and length: one compilation that every block shares, its residual adds, layer norms and activations
        fused), used only if it gives the eager body's hidden states on ``x_check`` to :data:`CHECK_TOLERANCE` of
        their largest magnitude. Call it under the autocast the scoring runs in (it is compiled for that). Returns
        whether it is used; :meth:`uncompile` (called when the view closes) puts the blocks back."""
        ref = self.hidden(x_check).float()
        try:
            self._blocks = transformer_blocks(self.body, "bounds.compile_body=on", "bounds.compile_body=off")
            for block in self._blocks:
                block.compile(dynamic=True)
            got = self.hidden(x_check).float()
        except Exception:  # noqa: BLE001  a model the compiler cannot take is scored eagerly, as before
            self.uncompile()
            return False
        if got.shape != ref.shape or not bool((got - ref).abs().max() <= CHECK_TOLERANCE * (1.0 + ref.abs().max())):
            self.uncompile()
            return False
        return True

    def uncompile(self) -> None:
        for block in self._blocks:  # nn.Module.compile keeps its compiled call here; torch has no public undo
            block._compiled_call_impl = None
        self._blocks = []

    def drop_cache(self) -> None:
        self._w, self._lr, self._dtype = None, (), None

    def logits(self, h: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
        """``(K, vocab)`` logits of hidden states ``h`` (in ``dtype``; None = the head's own)."""
        dtype = dtype or self.head.weight.dtype
        if self._w is None or self._dtype != dtype:
            self._w = pad_rows(self.head.weight.detach(), 64).to(dtype)
            self._lr = tuple((a.weight.detach().to(dtype), b.weight.detach().to(dtype),
                              None if b.bias is None else b.bias.detach().to(dtype), float(s))
                             for a, b, s in self.head_low_rank)
            self._dtype = dtype
        b = self.head.bias
        h = h.to(dtype)
        out = F.linear(h, self._w)[:, :self.vocab]
        for wa, wb, bb, scale in self._lr:
            out = out + F.linear(F.linear(h, wa), wb, bb) * scale
        return out if b is None else out + b.to(dtype)


def _plain_lora_layers(model: torch.nn.Module):
    """peft LoRA layers whose forward is peft's own plain one (no DoRA, not subclassed, plain
    ``nn.Linear`` factors: SoRA's gated down-projection is not one)."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return
    for m in model.modules():
        if _is_plain_lora(m, LoraLinear):
            yield m


def _is_plain_lora(m: torch.nn.Module, lora_linear: type) -> bool:
    plain = all(type(f) is torch.nn.Linear for d in (m.lora_A, m.lora_B) for f in d.values()) if type(m) is lora_linear else False
    # a variant (DoRA, aLoRA, KaSA, ...) has its own forward: not the plain W·x + s·B·A·x merged or added here
    return plain and not any(getattr(m, "use_dora", {}).values()) and not getattr(m, "lora_variant", None) and not m.merged


def _split_head(head: torch.nn.Module) -> Optional[tuple[torch.nn.Linear, tuple]]:
    """(the plain ``nn.Linear`` under the LM head, the head's active low-rank terms (A, B, scaling)):
    ``(head, ())`` for a plain head, its base layer and adapters for a plain peft LoRA head, None for
    any other head (the model's own forward is scored)."""
    if type(head) is torch.nn.Linear:
        return head, ()
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    if not _is_plain_lora(head, LoraLinear) or getattr(head, "disable_adapters", False):
        return None
    base = head.get_base_layer()
    if type(base) is not torch.nn.Linear:
        return None
    active = [a for a in head.active_adapters if a in head.lora_A]
    return base, tuple((head.lora_A[a], head.lora_B[a], head.scaling[a]) for a in active)


@contextlib.contextmanager
def _merged(model: torch.nn.Module, skip: frozenset[int] = frozenset()) -> Iterator[None]:
    """Adapters of the plain LoRA layers merged into their base weights (those in ``skip`` left as they
    are), restored exactly on exit."""
    saved = []
    try:
        with torch.no_grad():
            for layer in _plain_lora_layers(model):
                if id(layer) in skip:
                    continue
                w = layer.get_base_layer().weight
                saved.append((layer, w, w.detach().clone()))
                layer.merge()
        yield
    finally:
        with torch.no_grad():
            for layer, w, orig in saved:
                w.copy_(orig)
                layer.merged_adapters.clear()


@contextlib.contextmanager
def _fused_gelu(model: torch.nn.Module) -> Iterator[None]:
    try:
        from transformers.activations import NewGELUActivation
    except ImportError:  # pragma: no cover
        yield
        return
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, TanhGELU())
                swapped.append((parent, name, child))
    for m in model.modules():  # GPT-2's MLP calls self.act, which may be a plain attribute
        act = getattr(m, "act", None)
        if type(act) is NewGELUActivation:
            swapped.append((m, "act", act))
            setattr(m, "act", TanhGELU())
    try:
        yield
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


@contextlib.contextmanager
def _float32(model: torch.nn.Module) -> Iterator[None]:
    """Every bf16/fp16 parameter and buffer of ``model`` in float32 for the duration (the base's size in float32,
    briefly); cast back on exit, which is exact: each value came from the lower precision."""
    low = [t for t in (*model.parameters(), *model.buffers()) if t.dtype in (torch.bfloat16, torch.float16)]
    dtypes = [t.dtype for t in low]
    try:
        for t in low:
            t.data = t.data.float()
        yield
    finally:
        for t, dt in zip(low, dtypes):
            t.data = t.data.to(dt)


def _linear_like(m: torch.nn.Module) -> bool:
    return isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"


@contextlib.contextmanager
def _low_precision_weights(model: torch.nn.Module, dtype: torch.dtype, keep: set[int]) -> Iterator[None]:
    """Store linear layers' weights (and biases) in ``dtype`` (those in ``keep``, embeddings and
    the layers of unmerged adapters, whose forward casts its own inputs, excepted)."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    saved = []
    try:
        for name_m, m in model.named_modules():
            if not _linear_like(m) or "lora_" in name_m:
                continue
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if isinstance(p, torch.nn.Parameter) and p.dtype == torch.float32 and id(p) not in embedded | keep:
                    saved.append((p, p.data))
                    p.data = p.data.to(dtype)
        yield
    finally:
        for p, data in saved:
            p.data = data


def _agrees(model: torch.nn.Module, view: ScoringView, x: torch.Tensor, ref: torch.Tensor) -> bool:
    with torch.autocast(x.device.type, enabled=False):
        h = view.hidden(x)
        ours = view.logits(h.reshape(-1, h.shape[-1]), None)
    ref = ref.reshape(-1, ref.shape[-1]).float()
    if ours.shape != ref.shape:
        return False
    return bool((ours.float() - ref).abs().max() <= CHECK_TOLERANCE * (1.0 + ref.abs().max()))


@contextlib.contextmanager
def scoring_view(model: torch.nn.Module, x_check: torch.Tensor,
                 autocast_dtype: Optional[torch.dtype] = None) -> Iterator[Optional[ScoringView]]:
    """A :class:`ScoringView` of ``model`` (checked on ``x_check``), or None when none applies.

    The model is changed in place while the context is open (merged adapters, fused GELU,
    low-precision linear weights) and restored exactly when it closes.
    """
    hf = hf_model(model)
    cfg = getattr(hf, "config", None)
    if hf is None or any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in _LOGIT_POSTPROCESSING):
        yield None
        return
    body, head = getattr(hf, hf.base_model_prefix), hf.get_output_embeddings()
    split = _split_head(head)
    if split is None:
        yield None
        return
    view = ScoringView(body, split[0], int(split[0].weight.shape[0]), split[1])
    skip = frozenset({id(head)})  # an adapted head stays unmerged: its weight is usually the tied input embedding
    cuda = torch.backends.cuda.matmul
    tf32 = cuda.allow_tf32, torch.backends.cudnn.allow_tf32
    # the check compares two float32 computations: a base stored in bf16 (model.base_dtype=auto on a GPU) is
    # upcast for it, else bf16 rounding of the reference alone would exceed the tolerance and the view would
    # never be used for such runs. Where the float32 copy does not fit the device, the model's own logits are scored.
    try:
        with _float32(model):
            with torch.inference_mode():
                cuda.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
                try:
                    with torch.autocast(x_check.device.type, enabled=False):
                        ref = model(input_ids=x_check).logits.float()
                finally:
                    cuda.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            with _merged(model, skip), _fused_gelu(model):
                cuda.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
                try:
                    with torch.inference_mode():
                        ok = _agrees(model, view, x_check, ref)
                finally:
                    cuda.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    except torch.OutOfMemoryError:  # the model is back as it was (every context above restores it on the way out)
        ok = False
        if x_check.device.type == "cuda":
            torch.cuda.empty_cache()
    view.drop_cache()  # the head's weight as the check saw it (float32); scoring takes it in its own dtype
    if not ok:  # the model is back as it was
        yield None
        return
    with contextlib.ExitStack() as stack:
        stack.callback(view.uncompile)  # last out: blocks compiled by compile_body run eagerly again
        stack.enter_context(_merged(model, skip))
        stack.enter_context(_fused_gelu(model))
        if autocast_dtype is not None:
            stack.enter_context(_low_precision_weights(model, autocast_dtype, keep={id(split[0].weight)}))
        yield view


__all__ = ["scoring_view", "ScoringView", "TanhGELU", "hf_model", "CHECK_TOLERANCE"]
