"""Data: resolve ``data.dataset`` to raw splits, then tokenize into torch datasets.

Two steps, so that the task type and number of labels are known before the model is
built, and tokenization happens only after the tokenizer is known:

    raw = load_raw(cfg)                                  # RawTask (no tokenizer needed)
    train_ds, val_ds, collate = build_datasets(raw, tokenizer, cfg)

``data.dataset`` may name a shipped sample (``lm-sample``, ``sst2-sample``), a
registered task (``DATASETS``), a local file/folder (.txt/.jsonl documents for
causal LM; .csv/.json/.jsonl/.parquet with text + label columns for classification;
a token-bin directory written by ``peftlab data prepare``), or any classification
dataset on the Hugging Face hub (``name`` or ``name:config``).
"""

from __future__ import annotations

from pathlib import Path

from .. import hub
from ..errors import PeftlabError
from ..io import check_text_head
from ..options import suggest
from . import instruction, offline, tasks  # noqa: F401  (each registers its datasets in DATASETS)
from .bins import is_bin_dir, load_token_bins
from .classification import ClassificationDataset, classification_collate, load_table, raw_classification_from_frames
from .lm import LMBlockDataset, lm_collate, read_documents
from .raw import DATASETS, SAMPLES_DIR, RawTask, _split_files, register_dataset
from .splits import finalize_splits
from .tasks import load_hub_classification


@register_dataset("lm-sample")
def _lm_sample(cfg) -> RawTask:
    d = SAMPLES_DIR / "lm-sample"
    return RawTask("causal_lm", "lm-sample", read_documents(d / "train.jsonl"), read_documents(d / "validation.jsonl"),
                   info={"source": f"shipped synthetic sample {d}"})


def load_raw(cfg) -> RawTask:
    """Resolve ``cfg.data.dataset`` into a :class:`RawTask` (cheap; no tokenization)."""

    name = cfg.data.dataset
    if name in DATASETS:
        raw = DATASETS[name](cfg)
    elif (raw := instruction.maybe_load(name, cfg)) is not None:
        pass
    else:
        path = Path(name).expanduser()
        hub_note = ""
        if not path.exists() and hub.looks_like_name(name):
            import difflib

            # A near-miss of a known name is a typo, not a hub dataset: say so at once.
            if not difflib.get_close_matches(name, list(DATASETS), n=1, cutoff=0.8):
                if hub.reachable():

                    return postprocess(load_hub_classification(name, cfg), cfg)
                hub_note = " The Hugging Face hub cannot be reached, so it was not looked up there."
        if not path.exists():

            raise PeftlabError(
                f"data.dataset={name!r} is neither a known dataset nor an existing path.{suggest(name, DATASETS)}{hub_note} "
                f"Known datasets: {', '.join(sorted(DATASETS))}; or give a local .txt/.jsonl (language modelling) or "
                ".csv/.json/.jsonl/.parquet file with text and label columns (classification)."
            )
        raw = load_local(path, cfg)
    return postprocess(raw, cfg)


def load_local(path: Path, cfg) -> RawTask:
    """Load a local file or folder, deciding LM vs classification by its contents."""

    if is_bin_dir(path):
        return load_token_bins(path, cfg)
    if path.is_dir():
        files = _split_files(path)
        if "train" not in files:
            txt = sorted(path.rglob("*.txt"))
            if txt:  # a folder of plain-text documents
                return RawTask("causal_lm", path.name, [p.read_text(encoding="utf-8", errors="replace") for p in txt], None,
                               info={"source": str(path), "files": len(txt)})
            raise PeftlabError(
                f"Folder {path} has no training file: expected train.csv/train.jsonl/..., <task>_train.csv, or .txt documents."
            )
        train_f, val_f, test_f = files["train"], files.get("validation"), files.get("test")
    else:
        train_f, val_f, test_f = path, None, None
    if train_f.suffix.lower() == ".txt" or (train_f.suffix.lower() == ".jsonl" and _is_document_jsonl(train_f, cfg)):
        return RawTask("causal_lm", path.stem, read_documents(train_f), read_documents(val_f) if val_f else None,
                       test=read_documents(test_f) if test_f else None, info={"source": str(path)})
    train_df = load_table(train_f)
    val_df = load_table(val_f) if val_f else None
    test_df = load_table(test_f) if test_f else None
    return raw_classification_from_frames(path.stem, train_df, val_df, cfg, source=str(path), test_df=test_df)


def _is_document_jsonl(path: Path, cfg) -> bool:
    import json

    check_text_head(path, "data file")
    with open(path, encoding="utf-8", errors="replace") as f:  # bad bytes later in the file are counted by the readers
        first = f.readline()
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        raise PeftlabError(f"{path} is not JSON Lines (first line does not parse); one JSON object per line is expected.") from None
    label = cfg.data.label_column or "label"
    return isinstance(row, dict) and label not in row


def postprocess(raw: RawTask, cfg) -> RawTask:
    """Carve a validation split if missing, subsample, k-shot (shared by every source)."""

    if instruction.is_instruction(raw):
        return instruction.finalize(raw, cfg)
    instruction.check_options(raw, cfg)
    return finalize_splits(raw, cfg)


def build_datasets(raw: RawTask, tokenizer, cfg, model=None):
    """Tokenize ``raw`` into ``(train_dataset, val_dataset, collate_fn)``; ``model`` (optional)
    lets instruction packing check that the model keeps packed examples apart."""

    if instruction.is_instruction(raw):
        return instruction.build(raw, tokenizer, cfg, model=model)
    if raw.task == "causal_lm":
        if hasattr(raw.train, "make_dataset"):  # token bins bring their own dataset
            for part in (raw.train, raw.val):
                part.check_tokenizer(tokenizer)  # the tokenizer is known only here
            return raw.train.make_dataset(cfg, "train"), raw.val.make_dataset(cfg, "val"), lm_collate
        tr = LMBlockDataset.from_documents(raw.train, tokenizer, cfg.data.block_size)
        va = LMBlockDataset.from_documents(raw.val, tokenizer, cfg.data.block_size)
        if len(tr) == 0:
            raise PeftlabError(
                f"The training text of {raw.name!r} is shorter than one block of {cfg.data.block_size + 1} tokens; lower --data.block_size or add text."
            )
        if len(va) == 0:
            raise PeftlabError(
                f"The validation text of {raw.name!r} is shorter than one block of {cfg.data.block_size + 1} tokens; lower --data.block_size or raise --data.val_fraction."
            )
        return tr, va, lm_collate
    tr = ClassificationDataset.from_raw(raw.train, tokenizer, cfg.data.max_length)
    va = ClassificationDataset.from_raw(raw.val, tokenizer, cfg.data.max_length)
    return tr, va, classification_collate(tokenizer.pad_token_id)


__all__ = ["RawTask", "DATASETS", "register_dataset", "load_raw", "build_datasets", "SAMPLES_DIR"]
