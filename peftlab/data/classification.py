"""Text classification: tables with text (+ optional pair) and label columns."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import PeftlabError
from ..io import read_text
from .raw import RawTask

DEFAULT_TEXT_COLUMNS = ("text", "sentence", "content", "review", "tweet")
_INT_RE = re.compile(r"[+-]?\d+(\.0*)?")


class DataWarning(UserWarning):
    """Data that loads but holds something the user should know about (empty texts, bad bytes)."""


def _rows(idx: list[int], limit: int = 8) -> str:
    """Data rows, 1-based, as a file's reader counts them (header excluded)."""
    shown = ", ".join(str(i + 1) for i in idx[:limit])
    return shown + (f", ... ({len(idx)} in all)" if len(idx) > limit else "")


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
    text = None
    if suf in (".csv", ".tsv", ".json", ".jsonl"):
        # undecodable bytes become U+FFFD and the rows holding them are reported, instead of a traceback
        text = read_text(path, "data file", errors="replace")  # UTF-16/32: an error naming it
    try:
        if suf == ".csv":
            df = pd.read_csv(io.StringIO(text))
        elif suf == ".tsv":
            df = pd.read_csv(io.StringIO(text), sep="\t")
        elif suf == ".jsonl":
            df = pd.read_json(io.StringIO(text), lines=True)
        elif suf == ".json":
            try:
                df = pd.read_json(io.StringIO(text))
            except ValueError:
                df = pd.read_json(io.StringIO(text), lines=True)
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
    if text is not None and "\ufffd" in text:
        bad = [i for i, row in enumerate(df.itertuples(index=False)) if any("\ufffd" in str(c) for c in row)]
        df.attrs["undecodable_rows"] = bad
        warnings.warn(f"{path} is not valid UTF-8: {len(bad)} row(s) hold undecodable bytes, read as U+FFFD "
                      f"(data rows {_rows(bad)}). Re-save the file as UTF-8 to keep those characters.", DataWarning, stacklevel=2)
    return df


def _label_kind(v: Any) -> Optional[int]:
    """The integer a label value stands for (1, 1.0, "1", "1.0"), or None when it is not an integer."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return int(v) if v.is_integer() else None
    if hasattr(v, "item") and not isinstance(v, str):  # numpy scalars
        return _label_kind(v.item())
    if isinstance(v, str) and _INT_RE.fullmatch(v.strip()):
        return int(float(v.strip()))
    return None


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
    # Labels are never remapped silently: integers must be 0..K-1; non-integer labels (names such as
    # "positive") are mapped in sorted order and the mapping is logged and saved (label_names); a column
    # mixing integers with other values is an error listing the rows.
    where = source or name
    train_labels = train_df[label_col]
    if train_labels.isna().any():
        rows = [i for i, m in enumerate(train_labels.isna().tolist()) if m]
        raise PeftlabError(f"{where}: {len(rows)} training rows have no label in column {label_col!r} (data rows {_rows(rows)}).")
    all_values = [(split, i, v) for split, df in frames.items() if df is not None for i, v in enumerate(df[label_col].tolist())]
    as_int = [(split, i, v, _label_kind(v)) for split, i, v in all_values]
    n_int = sum(1 for *_, k in as_int if k is not None)
    if 0 < n_int < len(as_int):
        stray = [(split, i, v) for split, i, v, k in as_int if k is None]
        ints = [(split, i, v) for split, i, v, k in as_int if k is not None]
        odd, usual = (stray, "integer") if len(stray) <= len(ints) else (ints, "non-integer")
        listing = "; ".join(f"{sp} row {i + 1}: {v!r}" for sp, i, v in odd[:8]) + (f"; ... ({len(odd)} in all)" if len(odd) > 8 else "")
        raise PeftlabError(
            f"{where}: column {label_col!r} mixes integer and non-integer labels; most are {usual} but these are not: {listing}. "
            "Fix those rows so every label is an integer class id 0..K-1 (or every label is a class name)."
        )
    if n_int == len(as_int):
        ints_all = sorted({k for *_, k in as_int})
        ints_train = sorted({k for sp, *_, k in as_int if sp == "train"})
        explicit_k = num_labels or d_num_labels(cfg)
        k = explicit_k or (max(ints_all) + 1)
        if min(ints_train) < 0 or max(ints_train) >= k:
            raise PeftlabError(f"{where}: labels must lie in 0..{k - 1} for {k} classes, found {min(ints_train)}..{max(ints_train)}. Fix the labels or set --model.num_labels.")
        absent = [c for c in range(k) if c not in set(ints_all)]
        if absent and not explicit_k:
            raise PeftlabError(
                f"{where}: integer labels must be the class ids 0..K-1, but column {label_col!r} holds {ints_all} "
                f"(no example of class(es) {absent[:10]}{' ...' if len(absent) > 10 else ''}), so it is unclear whether there are "
                f"{k} classes or {len(ints_all)}. Relabel them 0..{len(ints_all) - 1}, or write the labels as class names "
                f"(mapped in sorted order, saved as label2id), or set --model.num_labels={k} if there really are {k} classes."
            )
        mapping = None
        names = label_names or [str(i) for i in range(k)]
    else:
        values = sorted(set(train_labels.tolist()), key=lambda v: (str(type(v)), v))
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
            labels = [_label_kind(v) for v in labels]
            bad = [v for v in labels if not 0 <= v < k]
            if bad:
                raise PeftlabError(f"The {split} split of {source or name} has labels outside 0..{k - 1}: {sorted(set(bad))[:5]}.")
        out = {"text": df[text_col].fillna("").astype(str).tolist(), "label": labels}
        if d.text_pair_column:
            out["text_pair"] = df[d.text_pair_column].fillna("").astype(str).tolist()
        empty = [i for i, t in enumerate(out["text"]) if not t.strip()]
        if empty:
            report[f"empty_texts_{split}"] = f"{len(empty)} (data rows {_rows(empty)})"
        if df.attrs.get("undecodable_rows"):
            report[f"undecodable_rows_{split}"] = f"{len(df.attrs['undecodable_rows'])} (data rows {_rows(df.attrs['undecodable_rows'])})"
        return out

    report: dict[str, str] = {}

    if k < 2:
        raise PeftlabError(f"{source or name}: the training labels hold only one class ({names}); classification needs at least two.")
    train, val, test = conv(train_df, "train"), conv(val_df, "validation"), conv(test_df, "test")
    info = {"source": source, "text_column": text_col, "label_column": label_col}
    if mapping is not None:
        info["label2id"] = {str(v): i for v, i in mapping.items()}  # logged; saved in config.json as label_names
    for key, val_ in report.items():
        info[key] = val_
    if report:
        warnings.warn(f"{where}: " + "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in report.items())
                      + ". Empty texts train on the label alone; clean the file if that is not meant.", DataWarning, stacklevel=2)
    return RawTask("classification", name, train, val, num_labels=k, label_names=names, test=test, info=info)


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

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

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
