"""Packing variable-length examples into sequences of at most ``max_length`` tokens.

A packed row is several examples back to back with ``position_ids`` restarting at 0 at
every example. transformers (>= 4.5x, and 5.x) turns such ``position_ids``, passed with
no 2-D attention mask, into a block-diagonal causal mask for every decoder whose
attention builds its mask through ``transformers.masking_utils.create_causal_mask``
(GPT-2, Llama/SmolLM2, Qwen2/3, Mistral, Gemma, ...; eager, SDPA, flex and flash
attention alike). A custom 4-D mask would also be accepted by those models, but its
expected format depends on the attention implementation (boolean for SDPA, additive
float for eager), so peftlab lets transformers build it from the positions.

:func:`packing_isolates_examples` checks this on the actual model with one tiny
forward pass; models for which it fails get the documented fallback (examples in one
row attend to each other, as in TRL's old ``ConstantLengthDataset``).

Padding inside a batch of packed rows is a segment of its own (positions restart at 0),
so real tokens never see it and its labels are -100.
"""

from __future__ import annotations

import bisect
import inspect
from typing import Sequence

import torch


def pack_lengths(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing bin packing of example indices into bins of ``max_length`` tokens.

    Deterministic: examples are taken longest first (ties by index) and each goes into
    the fullest bin that still has room (ties: the bin opened first). Every index appears
    in exactly one bin; inside a bin, indices keep their original order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id)
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length={max_length}")
        j = bisect.bisect_left(room, (n, -1))
        if j < len(room):
            cap, b = room.pop(j)
            bins[b].append(i)
            bisect.insort(room, (cap - n, b))
        else:
            bins.append([i])
            bisect.insort(room, (max_length - n, len(bins) - 1))
    return [sorted(b) for b in bins]


def pack_examples(examples: Sequence[dict], max_length: int) -> list[dict]:
    """Concatenate examples (``input_ids``, ``labels`` 1-D tensors) into packed rows.

    Each row gets ``position_ids`` restarting at 0 per example and ``num_examples``.
    """
    bins = pack_lengths([len(e["input_ids"]) for e in examples], max_length)
    rows = []
    for b in bins:
        parts = [examples[i] for i in b]
        rows.append({
            "input_ids": torch.cat([p["input_ids"] for p in parts]),
            "labels": torch.cat([p["labels"] for p in parts]),
            "position_ids": torch.cat([torch.arange(len(p["input_ids"])) for p in parts]),
            "num_examples": len(parts),
        })
    return rows


def padding_per_epoch(lengths: Sequence[int], batch_size: int, seed: int) -> tuple[int, int]:
    """``(padding tokens, token positions)`` of one epoch when rows of these lengths are
    batched ``batch_size`` at a time in a seeded random order and padded to each batch's
    longest row (as the collate does; the last incomplete batch is dropped, as training does)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    pad = total = 0
    for s in range(0, len(perm) - batch_size + 1, batch_size):
        ls = [lengths[i] for i in perm[s:s + batch_size]]
        total += max(ls) * len(ls)
        pad += max(ls) * len(ls) - sum(ls)
    return pad, total


def accepts_position_ids(model: torch.nn.Module) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "position_ids" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@torch.no_grad()
def packing_isolates_examples(model: torch.nn.Module, atol: float = 1e-4) -> bool:
    """Whether ``model`` keeps packed examples apart: the logits of two short sequences
    packed into one row (``position_ids`` restarting, no attention mask, no KV cache)
    equal their logits computed one at a time. Uses a private generator; restores
    train/eval mode."""
    if not accepts_position_ids(model):
        return False
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 100
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, min(vocab, 200), (1, 5), generator=g)
    b = torch.randint(0, min(vocab, 200), (1, 7), generator=g)
    device = next(model.parameters()).device
    a, b = a.to(device), b.to(device)
    was_training = model.training
    model.eval()
    try:
        la = model(input_ids=a, use_cache=False).logits.float()
        lb = model(input_ids=b, use_cache=False).logits.float()
        pos = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0).to(device)
        lp = model(input_ids=torch.cat([a, b], 1), position_ids=pos, use_cache=False).logits.float()
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        model.train(was_training)
    return torch.allclose(lp, torch.cat([la, lb], 1), atol=atol, rtol=1e-4)


def prepare_model_for_packing(model: torch.nn.Module) -> bool:
    """Check :func:`packing_isolates_examples`; when it holds, turn the model's KV cache off
    for training forwards (``config.use_cache = False``): transformers derives the packed
    mask from ``position_ids`` only when no cache is passed, and decoders such as GPT-2 and
    Llama create an empty cache on every forward while ``use_cache`` is on. Generation is
    unaffected (``generate`` takes ``use_cache`` from its generation config)."""
    ok = packing_isolates_examples(model)
    if ok and getattr(model, "config", None) is not None:
        model.config.use_cache = False
    return ok


__all__ = ["pack_lengths", "pack_examples", "padding_per_epoch", "accepts_position_ids", "packing_isolates_examples", "prepare_model_for_packing"]
