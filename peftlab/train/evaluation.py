"""Test-split evaluation: once, at the end of a run, with the best checkpoint.

A task whose data carries a test split (``RawTask.test``: food-reviews, the IMDB, AG News
and TweetEval samples, SST-2/IMDB/AG News from the hub or a local ``<task>_test.csv``) is
evaluated on it after training with the weights of ``best/`` (the checkpoint the validation
metric chose), never during training, so the test set plays no part in any choice. The
metrics are those of validation with a ``test_`` prefix: ``test_loss``, ``test_accuracy``,
``test_f1`` for classification, ``test_loss`` and ``test_perplexity`` for causal LM.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional


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
    from ..data import ClassificationDataset, LMBlockDataset, build_datasets
    from ..data.instruction import is_instruction

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
    for cand in (best / "model_state.safetensors",):
        if cand.is_file():
            return cand
    pointer = best / "checkpoint.txt"
    if pointer.is_file():
        target = Path(run_dir) / "checkpoints" / pointer.read_text().strip() / "model_state.safetensors"
        if target.is_file():
            return target
    return None
