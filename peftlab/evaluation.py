"""Evaluation: validation and test metrics of a model, exactly as training computes them.

:func:`evaluate` is the one evaluation that the training loop, ``load_run`` and ``bounds``
share; ``accuracy``, ``f1_score`` and ``perplexity`` are computed exactly (no sklearn).

Test-split evaluation runs once, at the end of a run, with the best checkpoint.

A task whose data carries a test split (``RawTask.test``: food-reviews, the IMDB, AG News
and TweetEval samples, SST-2/IMDB/AG News from the hub or a local ``<task>_test.csv``) is
evaluated on it after training with the weights of ``best/`` (the checkpoint the validation
metric chose), never during training, so the test set plays no part in any choice. The
metrics are those of validation with a ``test_`` prefix: ``test_loss``, ``test_accuracy``,
``test_f1`` for classification, ``test_loss`` and ``test_perplexity`` for causal LM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any, Optional

import torch

from .data import ClassificationDataset, LMBlockDataset, build_datasets
from .data.batches import example_lengths
from .data.instruction import is_instruction


def split_size(raw) -> int:
    """Examples (classification) or documents (LM) in the test split; 0 when there is none."""
    t = getattr(raw, "test", None)
    if t is None:
        return 0
    if isinstance(t, dict):
        return len(t.get("label", t.get("text", [])))
    try:
        return len(t)
    except TypeError:
        return 1


def make_test_dataset(raw, tokenizer, cfg, model=None) -> Optional[Any]:
    """The tokenized test split of ``raw`` built exactly as validation is (None without one)."""
    if split_size(raw) == 0 or cfg.data.max_test_examples == 0:
        return None

    if raw.task == "classification":
        return ClassificationDataset.from_raw(raw.test, tokenizer, cfg.data.max_length)
    if isinstance(raw.test, list) and not is_instruction(raw):
        ds = LMBlockDataset.from_documents(raw.test, tokenizer, cfg.data.block_size)
        return ds if len(ds) else None
    # token bins and instruction data: build the test split through the validation path
    _, ds, _ = build_datasets(dataclasses.replace(raw, val=raw.test), tokenizer, cfg, model=model)
    return ds


def best_model_state(run_dir: Path) -> Optional[Path]:
    """The model tensors of ``best/`` (a full copy or a pointer to a checkpoint), or None."""
    best = Path(run_dir) / "best"
    for cand in (best / "model_state.safetensors", best / "model_state.dcp"):  # .dcp: a sharded run's (directory)
        if cand.is_file() or (cand / ".metadata").is_file():
            return cand
    pointer = best / "checkpoint.txt"
    if pointer.is_file():
        target = Path(run_dir) / "checkpoints" / pointer.read_text().strip() / "model_state.safetensors"
        if target.is_file():
            return target
    return None


def accuracy(preds: list[int], labels: list[int]) -> float:
    return sum(int(p == y) for p, y in zip(preds, labels)) / max(len(labels), 1)


def f1_score(preds: list[int], labels: list[int], num_labels: int) -> float:
    """Binary F1 of class 1 when there are two classes; macro-F1 over classes otherwise."""

    def f1_for(c: int) -> float:
        tp = sum(1 for p, y in zip(preds, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(preds, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(preds, labels) if p != c and y == c)
        return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)

    if num_labels == 2:
        return f1_for(1)
    return sum(f1_for(c) for c in range(num_labels)) / num_labels


def mixed_precision_autocast(system_dtype: str, device):
    """The autocast context the training loop computed under for ``system.dtype`` on ``device`` (what
    accelerate's ``Accelerator(mixed_precision=...)`` enters: bf16/fp16 autocast, none for fp32), as a factory.
    Evaluating a rebuilt run under it gives the numbers training logged."""
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(system_dtype)
    if dt is None:
        return contextlib.nullcontext
    kind = torch.device(device).type
    return lambda: torch.autocast(kind, dtype=dt)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


@torch.no_grad()
def evaluate(model, val_ds, collate, cfg, task: str, num_labels: Optional[int], device, *, autocast=contextlib.nullcontext,
             rank: int = 0, world: int = 1, reduce=None, prefix: str = "val", cap: bool = True,
             lockstep: bool = False) -> dict[str, float]:
    """Validation metrics of ``model`` as the loop computes them, in float64: classification
    ``val_loss`` is the mean cross-entropy over examples (from the logits: a method's training regulariser, such as
    AdaLoRA's orthogonality penalty in peft's ``loss``, is not part of it), with accuracy and F1; causal LM ``val_loss`` is the
    mean over supervised tokens (sum of token losses / number of tokens with a label, across all
    batches), with perplexity = exp(val_loss). ``rank``/``world``/``reduce`` split the work
    across processes (``reduce`` is ``accelerator.reduce``); alone, leave them. ``prefix`` names
    the metrics (``test`` for the test split); ``cap=False`` ignores training.eval_max_batches.
    ``lockstep``: every process runs as many forwards as the one with the most batches (process 0),
    repeating its first batch without counting it: a sharded model (FSDP) gathers its weights
    collectively at every forward, so no process may stop early."""
    t = cfg.training
    was_training = model.training
    model.eval()
    bs = t.eval_batch_size or t.batch_size
    n = len(val_ds)
    # the cap is eval_max_batches x eval batch size examples in all, whatever the process count
    limit = min(n, t.eval_max_batches * bs) if t.eval_max_batches and cap else n
    idx = list(range(rank, limit, world))
    lengths = example_lengths(val_ds)
    if lengths is not None:  # longest first: batches of similar length pad less; the metrics do not depend on the order
        idx.sort(key=lambda i: -lengths[i])
    batches = [idx[i:i + bs] for i in range(0, len(idx), bs)]
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    preds, labels = [], []
    rounds = len(batches)
    if lockstep:  # process 0 has the most examples (ceil); its batch count is known without communication
        rounds = -(-len(range(0, limit, world)) // bs)
    for j in range(rounds):
        if j >= len(batches):  # a forward that only keeps the sharded model's collectives in step
            with autocast():
                model(**{k: v.to(device) for k, v in collate([val_ds[0]]).items()})
            continue
        b = batches[j]
        batch = {k: v.to(device) for k, v in collate([val_ds[i] for i in b]).items()}
        with autocast():
            out = model(**batch)
        if task == "causal_lm" and "labels" in batch:
            # token-weighted: every supervised token counts once, whatever its batch (response-only labels vary per batch)
            shift = batch["labels"][:, 1:]
            logits = out.logits[:, :-1]
            loss_sum += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shift.reshape(-1),
                                                          ignore_index=-100, reduction="sum").double()
            count += (shift != -100).sum()
        elif task == "classification" and out.logits.shape[-1] > 1 and not batch["labels"].is_floating_point():
            # the task's cross-entropy from the logits, not the model's `loss`: peft's AdaLoRA adds its orthogonality
            # penalty (a training regulariser) to `loss` in evaluation too
            loss_sum += torch.nn.functional.cross_entropy(out.logits.float(), batch["labels"].view(-1), reduction="sum").double()
            count += batch["labels"].numel()
        else:
            k = batch["input_ids"].shape[0]
            loss_sum += out.loss.double() * k
            count += k
        if task == "classification":
            preds += out.logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
    if reduce is not None:
        loss_sum, count = reduce(loss_sum, "sum"), reduce(count, "sum")
    model.train(was_training)
    val_loss = (loss_sum / count.clamp(min=1)).item()
    metrics = {f"{prefix}_loss": val_loss}
    if task == "classification":
        from accelerate.utils import gather_object

        if world > 1:
            preds, labels = gather_object(preds), gather_object(labels)
        metrics[f"{prefix}_accuracy"] = accuracy(preds, labels)
        metrics[f"{prefix}_f1"] = f1_score(preds, labels, num_labels)
    else:
        metrics[f"{prefix}_perplexity"] = perplexity(val_loss)
    return metrics
