"""`peftlab data prepare DATASET --output-dir DIR`: token bins or classification CSVs.

- A language-modelling corpus (a registered LM dataset such as `lm-sample`, a local
  `.txt` / `.jsonl` file or folder, `openwebtext` or another text dataset on the
  hub) is tokenized, streaming, into `train.bin` / `val.bin` / `eot_indices.npy` /
  `doc_lengths.npy` / `meta.json` (format: docs/data.md).
- A classification task (`sst2`, `imdb`, `ag_news`, `tweet_eval`, their
  `-sample` copies, a local table, a hub dataset with a label column) is written as
  `DIR/<task>_dataset/<task>_{train,validation,test}.csv`, the layout
  `--data.data_dir=DIR` reads back. Splits are written as the source has them: a
  missing validation split stays missing and is carved at training time.

`--data.*` overrides (`--data.text_column`, `--data.label_column`,
`--data.data_dir`, `--data.split_seed`) apply as they do for `peftlab train`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from .. import hub
from ..errors import PeftlabError
from ..io import output_path_problem, read_text
from ..models import _load_tokenizer
from ..options import suggest
from . import DATASETS, _is_document_jsonl, _split_files, load_local
from .bins import is_bin_dir, prepare_token_bins
from .lm import iter_jsonl_documents
from .tasks import HUB_CORPORA, TASKS, HubCorpus, load_hub_classification

DEFAULT_TOKENIZER = "gpt2"
DEFAULT_VAL_FRACTION = 0.1


# ---------------------------------------------------------------- what is the dataset?


@dataclass
class _Corpus:
    """Documents to tokenize: iterables consumed once (streams for big sources)."""

    name: str
    train: object
    val: object = None
    total: Optional[int] = None
    val_fraction: Optional[float] = None
    source: str = ""


def prepare(cfg, out_dir: Path, tokenizer: str = DEFAULT_TOKENIZER, val_fraction: Optional[float] = None, chunk_docs: int = 1024,
            overwrite: bool = False, progress: bool = True) -> str:
    """Write token bins or CSV splits for ``cfg.data.dataset`` into ``out_dir``; returns a summary."""

    if val_fraction is not None and not 0.0 < val_fraction < 1.0:
        raise PeftlabError(f"--val-fraction must lie strictly between 0 and 1, got {val_fraction}.")
    name = cfg.data.dataset
    out_dir = Path(out_dir).expanduser()

    problem = output_path_problem(str(out_dir))
    if problem:  # before any tokenizing
        raise PeftlabError(f"--output-dir: {problem}")
    if name in HUB_CORPORA:
        return _write_bins(_hub_corpus(name, HUB_CORPORA[name]), cfg, out_dir, tokenizer, val_fraction, chunk_docs, overwrite, progress)
    if name in DATASETS:
        raw = DATASETS[name](cfg)
        if raw.task == "classification":
            return _write_csvs(raw, name, out_dir, overwrite)
        if not isinstance(raw.train, list):
            raise PeftlabError(f"{name!r} is already token bins; train on it directly with --data.dataset={name}.")
        corpus = _Corpus(name, raw.train, raw.val, len(raw.train), source=raw.info.get("source", name))
        return _write_bins(corpus, cfg, out_dir, tokenizer, val_fraction, chunk_docs, overwrite, progress)
    path = Path(name).expanduser()
    if path.exists():

        if is_bin_dir(path):
            raise PeftlabError(f"{path} already holds token bins (train.bin); train on it with --data.dataset={path}.")
        corpus = _local_corpus(path, cfg, _split_files)
        if corpus is not None:
            return _write_bins(corpus, cfg, out_dir, tokenizer, val_fraction, chunk_docs, overwrite, progress)

        return _write_csvs(load_local(path, cfg), path.stem, out_dir, overwrite)

    if hub.looks_like_name(name) and hub.reachable():
        return _prepare_from_hub(name, cfg, out_dir, tokenizer, val_fraction, chunk_docs, overwrite, progress)

    raise PeftlabError(
        f"Cannot prepare {name!r}: it is neither a registered dataset, nor an existing path, nor a reachable hub dataset."
        f"{suggest(name, [*DATASETS, *HUB_CORPORA])} Registered: {', '.join(sorted([*DATASETS, *HUB_CORPORA]))}."
    )


def _iter_file(path: Path) -> Iterator[str]:
    if path.suffix.lower() == ".jsonl":
        yield from iter_jsonl_documents(path)
    else:  # a .txt file is one document, as in peftlab.data.lm.read_documents
        yield read_text(path, "text data file", errors="replace")


def _local_corpus(path: Path, cfg, split_files) -> Optional[_Corpus]:
    """A streaming corpus for a local LM source, or None when it is a classification table."""

    def is_docs(f: Path) -> bool:
        return f.suffix.lower() == ".txt" or (f.suffix.lower() == ".jsonl" and _is_document_jsonl(f, cfg))

    if path.is_file():
        return _Corpus(path.stem, _iter_file(path), source=str(path)) if is_docs(path) else None
    files = split_files(path)
    if "train" in files:
        if not is_docs(files["train"]):
            return None
        val = _iter_file(files["validation"]) if "validation" in files else None
        return _Corpus(path.name, _iter_file(files["train"]), val, source=str(path))
    txt = sorted(path.rglob("*.txt"))
    if txt:  # a folder of documents, read one at a time
        return _Corpus(path.name, (read_text(p, "text data file", errors="replace") for p in txt), total=len(txt), source=str(path))
    raise PeftlabError(f"Folder {path} has no training file (train.jsonl, <name>_train.csv, ...) and no .txt documents.")


def _stream_hub(path: str, config: Optional[str], split: str = "train"):
    import datasets


    if not hub.reachable():
        raise PeftlabError(f"Could not stream {path!r}: the Hugging Face hub cannot be reached (a cached copy loads with HF_DATASETS_OFFLINE=1). Offline? Save the corpus as "
                           ".jsonl ({\"text\": ...} per line) and prepare that file.")
    try:
        return datasets.load_dataset(path, config, split=split, streaming=True)
    except Exception as first:  # datasets >= 4 refuses loading scripts; the hub keeps a parquet conversion
        try:
            return datasets.load_dataset(path, config, split=split, streaming=True, revision="refs/convert/parquet")
        except Exception:
            msg = str(first).splitlines()[0] if str(first) else ""
            raise PeftlabError(f"Could not stream {path!r} from the Hugging Face hub ({type(first).__name__}: {msg[:200]}). "
                               "Offline? Save the corpus as .jsonl ({\"text\": ...} per line) and prepare that file.") from None


def _hub_corpus(name: str, spec: HubCorpus) -> _Corpus:
    stream = _stream_hub(spec.path, spec.config)
    return _Corpus(name, (row[spec.text_column] for row in stream), total=spec.documents, val_fraction=spec.val_fraction,
                   source=f"hub {spec.path}")


def _prepare_from_hub(name, cfg, out_dir, tokenizer, val_fraction, chunk_docs, overwrite, progress) -> str:
    path, _, config = name.partition(":")
    stream = _stream_hub(path, config or None)
    first = next(iter(stream), None)
    if first is None:
        raise PeftlabError(f"Hub dataset {name!r} has an empty train split.")
    label = cfg.data.label_column or "label"
    if label in first:

        return _write_csvs(load_hub_classification(name, cfg), path.split("/")[-1], out_dir, overwrite)
    text = cfg.data.text_column or "text"
    if text not in first:
        raise PeftlabError(f"Hub dataset {name!r} has no {text!r} column (columns: {', '.join(first)}); set --data.text_column.")
    return _write_bins(_Corpus(name, (row[text] for row in stream), source=f"hub {name}"), cfg, out_dir, tokenizer, val_fraction,
                       chunk_docs, overwrite, progress)


# ---------------------------------------------------------------- writers


def _write_bins(corpus: _Corpus, cfg, out_dir: Path, tokenizer_name: str, val_fraction, chunk_docs, overwrite, progress) -> str:
    if any((out_dir / f).exists() for f in ("meta.json", "train.bin", "val.bin")) and not overwrite:
        raise PeftlabError(f"{out_dir} already holds prepared token bins; pass --overwrite to replace them or choose another --output-dir.")
    tok = _load_tokenizer(tokenizer_name, cfg.model, False)
    f = val_fraction or corpus.val_fraction or DEFAULT_VAL_FRACTION
    meta = prepare_token_bins(corpus.train, tok, out_dir, f, chunk_docs=chunk_docs, val_documents=corpus.val,
                              tokenizer_name=tokenizer_name, split_seed=cfg.data.split_seed, source=corpus.source or corpus.name,
                              total=corpus.total, progress=progress)
    return (
        f"wrote token bins to {out_dir}: train.bin {meta['train_tokens']:,} tokens ({meta['train_documents']:,} documents), "
        f"val.bin {meta['val_tokens']:,} tokens ({meta['val_documents']:,} documents), {meta['dtype']}, tokenizer {tokenizer_name} "
        f"(vocabulary {meta['vocab_size']}, end-of-text {meta['eot_token_id']}); eot_indices.npy, doc_lengths.npy, meta.json.\n"
        f"train on it with --data.dataset={out_dir} (the model's tokenizer must be {tokenizer_name}: set --data.tokenizer={tokenizer_name} if it is not the model's own)"
    )


def _write_csvs(raw, name: str, out_dir: Path, overwrite: bool) -> str:
    """``out_dir/<task>_dataset/<task>_{train,validation,test}.csv`` with the task's own columns."""
    import pandas as pd


    task = name[: -len("-sample")] if name.endswith("-sample") and name[: -len("-sample")] in TASKS else name
    spec = TASKS.get(task)
    text_col = spec.text_column if spec else "text"
    folder = out_dir / f"{task}_dataset"
    parts = {"train": raw.train, "validation": raw.val, "test": raw.test}
    targets = {s: folder / f"{task}_{s}.csv" for s, part in parts.items() if part is not None}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise PeftlabError(f"{', '.join(existing)} already exist; pass --overwrite to replace them.")
    folder.mkdir(parents=True, exist_ok=True)
    counts = []
    for split, path in targets.items():
        part = parts[split]
        cols = {text_col: part["text"]}
        if "text_pair" in part:
            cols["text_pair"] = part["text_pair"]
        cols["label"] = part["label"]
        pd.DataFrame(cols).to_csv(path, index=False)
        counts.append(f"{split} {len(part['label']):,}")
    note = "" if raw.val is not None else "; no validation split (carved from train at training time)"
    load = f"--data.dataset={task} --data.data_dir={out_dir}" if spec else f"--data.dataset={folder}"
    names = f", labels {raw.label_names}" if raw.label_names else ""
    return f"wrote {folder}: {', '.join(counts)} examples{names}{note}.\nload it with {load}"
