"""Text classification: tables with text (+ optional pair) and label columns."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..errors import PeftlabError

DEFAULT_TEXT_COLUMNS = ("text", "sentence", "content", "review", "tweet")


def load_table(path: Path):
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise PeftlabError(f"Data file {path} does not exist.")
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head.strip():
        raise PeftlabError(f"Data file {path} is empty; it needs a header row and at least one example. Re-create it (e.g. with `peftlab data prepare`).")
    suf = path.suffix.lower()
    try:
        if suf == ".csv":
            df = pd.read_csv(path)
        elif suf == ".tsv":
            df = pd.read_csv(path, sep="\t")
        elif suf == ".jsonl":
            df = pd.read_json(path, lines=True)
        elif suf == ".json":
            try:
                df = pd.read_json(path)
            except ValueError:
                df = pd.read_json(path, lines=True)
        elif suf == ".parquet":
            df = pd.read_parquet(path)
        else:
            raise PeftlabError(f"Cannot read {path}: use .csv, .tsv, .json, .jsonl or .parquet.")
    except PeftlabError:
        raise
    except Exception as e:  # pandas raises many types for malformed files
        raise PeftlabError(f"Could not read {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Check the file format.") from None
    if len(df) == 0:
        raise PeftlabError(f"{path} has column(s) {', '.join(map(str, df.columns))} but no rows; it needs at least one example.")
    return df


def _pick_text_column(df, wanted: Optional[str], where: str) -> str:
    cols = [str(c) for c in df.columns]
    if wanted:
        if wanted not in cols:
            raise PeftlabError(f"{where} has no column {wanted!r} (data.text_column); columns found: {', '.join(cols)}.")
        return wanted
    for c in DEFAULT_TEXT_COLUMNS:
        if c in cols:
            return c
    raise PeftlabError(f"{where} has no text column (looked for {', '.join(DEFAULT_TEXT_COLUMNS)}); columns found: {', '.join(cols)}. Set --data.text_column.")


def raw_classification_from_frames(name: str, train_df, val_df, cfg, source: str = "", num_labels: Optional[int] = None,
                                   label_names: Optional[list[str]] = None, test_df=None):
    """Build a classification RawTask from pandas frames, validating columns and labels."""
    from . import RawTask

    d = cfg.data
    label_col = d.label_column or "label"
    text_col = _pick_text_column(train_df, d.text_column, f"{source or name} (train)")
    frames = {"train": train_df, "validation": val_df, "test": test_df}
    for split, df in frames.items():
        if df is None:
            continue
        missing = [c for c in (text_col, label_col, d.text_pair_column) if c and c not in df.columns]
        if missing:
            raise PeftlabError(
                f"The {split} split of {source or name} lacks column(s) {missing}; columns found: {', '.join(map(str, df.columns))}. "
                "Set --data.text_column / --data.label_column / --data.text_pair_column."
            )
    # Labels: integers 0..K-1 are kept; anything else (strings, other integers) is mapped by sorted value.
    train_labels = train_df[label_col]
    if train_labels.isna().any():
        raise PeftlabError(f"{source or name}: {int(train_labels.isna().sum())} training rows have no label in column {label_col!r}.")
    values = sorted(set(train_labels.tolist()), key=lambda v: (str(type(v)), v))
    is_int = all(isinstance(v, (int,)) or (hasattr(v, "is_integer") and float(v).is_integer()) for v in values) and not any(isinstance(v, str) for v in values)
    if is_int:
        ints = [int(v) for v in values]
        k = num_labels or d_num_labels(cfg) or (max(ints) + 1)
        if min(ints) < 0 or max(ints) >= k:
            raise PeftlabError(f"{source or name}: labels must lie in 0..{k - 1} for {k} classes, found {min(ints)}..{max(ints)}. Fix the labels or set --model.num_labels.")
        mapping = None
        names = label_names or [str(i) for i in range(k)]
    else:
        mapping = {v: i for i, v in enumerate(values)}
        k = len(values)
        names = [str(v) for v in values]

    def conv(df, split):
        if df is None:
            return None
        labels = df[label_col].tolist()
        if mapping is not None:
            unknown = sorted({str(v) for v in labels if v not in mapping})
            if unknown:
                raise PeftlabError(f"The {split} split of {source or name} has labels not seen in train: {unknown[:5]}.")
            labels = [mapping[v] for v in labels]
        else:
            labels = [int(v) for v in labels]
            bad = [v for v in labels if not 0 <= v < k]
            if bad:
                raise PeftlabError(f"The {split} split of {source or name} has labels outside 0..{k - 1}: {sorted(set(bad))[:5]}.")
        out = {"text": df[text_col].fillna("").astype(str).tolist(), "label": labels}
        if d.text_pair_column:
            out["text_pair"] = df[d.text_pair_column].fillna("").astype(str).tolist()
        return out

    if k < 2:
        raise PeftlabError(f"{source or name}: the training labels hold only one class ({names}); classification needs at least two.")
    return RawTask("classification", name, conv(train_df, "train"), conv(val_df, "validation"), num_labels=k,
                   label_names=names, test=conv(test_df, "test"), info={"source": source, "text_column": text_col, "label_column": label_col})


def d_num_labels(cfg) -> Optional[int]:
    return cfg.model.num_labels


class ClassificationDataset(torch.utils.data.Dataset):
    def __init__(self, input_ids: list[list[int]], labels: list[int], token_type_ids=None):
        self.input_ids, self.labels, self.token_type_ids = input_ids, labels, token_type_ids

    @classmethod
    def from_raw(cls, split: dict, tokenizer, max_length: int) -> "ClassificationDataset":
        args = (split["text"], split["text_pair"]) if "text_pair" in split else (split["text"],)
        enc = tokenizer(*args, truncation=True, max_length=max_length)
        return cls(enc["input_ids"], list(split["label"]), enc.get("token_type_ids"))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.input_ids[i], "labels": self.labels[i]}
        if self.token_type_ids is not None:
            item["token_type_ids"] = self.token_type_ids[i]
        return item


def classification_collate(pad_id: int):
    def collate(items: list[dict]) -> dict:
        n = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        tt = torch.zeros((len(items), n), dtype=torch.long) if "token_type_ids" in items[0] else None
        for i, it in enumerate(items):
            L = len(it["input_ids"])
            ids[i, :L] = torch.tensor(it["input_ids"])
            mask[i, :L] = 1
            if tt is not None:
                tt[i, :L] = torch.tensor(it["token_type_ids"])
        out = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([it["labels"] for it in items])}
        if tt is not None:
            out["token_type_ids"] = tt
        return out

    return collate
