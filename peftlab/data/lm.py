"""Causal-LM text: documents -> tokens (+ end-of-text between documents) -> fixed blocks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import PeftlabError
from ..io import check_text_head, read_text
from .classification import DataWarning


def iter_jsonl_documents(path: Path):
    """Stream the ``text`` field of each line of a JSON Lines file (used by token-bin preparation too)."""
    check_text_head(path, "text data file")  # UTF-16/32: named, not read as garbage
    with open(path, encoding="utf-8", errors="replace") as f:  # bad bytes -> U+FFFD, counted by read_documents
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise PeftlabError(f"{path}:{i} is not valid JSON; each line must be an object like {{\"text\": \"...\"}}.") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise PeftlabError(f"{path}:{i} has no string field `text`; found keys {list(row) if isinstance(row, dict) else type(row).__name__}.")
            yield row["text"]


def read_documents(path: Path) -> list[str]:
    """A .txt file is one document; a .jsonl file holds one ``{"text": ...}`` per line."""
    path = Path(path)
    if not path.is_file():
        raise PeftlabError(f"Text file {path} does not exist.")
    if path.suffix.lower() == ".jsonl":
        docs = list(iter_jsonl_documents(path))
    else:
        docs = [read_text(path, "text data file", errors="replace")]
    if not any(d.strip() for d in docs):
        raise PeftlabError(f"{path} holds no text.")
    bad = sum(d.count("\ufffd") for d in docs)
    if bad:
        import warnings


        n_docs = sum(1 for d in docs if "\ufffd" in d)
        where = f"{n_docs} of {len(docs)} document(s)"
        warnings.warn(f"{path} is not valid UTF-8: {bad} undecodable byte sequence(s) in {where}, read as U+FFFD. "
                      "Re-save the file as UTF-8 to keep those characters.", DataWarning, stacklevel=2)
    return docs


class LMBlockDataset(torch.utils.data.Dataset):
    """Consecutive blocks of ``block_size`` tokens from the concatenated documents.

    Each document is followed by the end-of-text token; the remainder that does not
    fill a block is dropped. ``labels`` equal ``input_ids`` (the model shifts them).
    """

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    @classmethod
    def from_documents(cls, docs: list[str], tokenizer, block_size: int) -> "LMBlockDataset":
        eos = tokenizer.eos_token_id
        if eos is None:
            raise PeftlabError("The tokenizer has no end-of-text token, which document packing needs; choose another tokenizer.")
        ids: list[int] = []
        enc = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
        for doc in enc:
            ids.extend(doc)
            ids.append(eos)
        n = len(ids) // block_size
        t = torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)
        return cls(t)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i]}


def lm_collate(items: list[dict]) -> dict:
    x = torch.stack([it["input_ids"] for it in items])
    return {"input_ids": x, "labels": x.clone()}
