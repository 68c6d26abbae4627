"""Causal-LM corpora as token bins, the nanoGPT layout plus what the bounds need.

A prepared directory holds:

    train.bin          every training token, documents back to back, each followed by EOT
    val.bin            the same for the validation documents
    eot_indices.npy    int64 positions of the EOT tokens in train.bin (one per document)
    doc_lengths.npy    int64 tokens per training document, EOT included (sums to len(train.bin))
    meta.json          dtype, vocab_size, eot_token_id, tokenizer, token and document counts

``*.bin`` files are flat arrays of ``uint16`` when every id fits (vocabulary of at most
65,536 tokens, e.g. GPT-2's 50,257) and ``uint32`` otherwise, read back with
``np.memmap``. :func:`prepare_token_bins` streams: it tokenizes ``chunk_docs``
documents at a time and appends them to the files, so a corpus larger than memory
works; the per-document arrays are streamed to disk as well.

Which documents go to validation is a pure function of the document's position and
``split_seed`` (systematic sampling with a seeded phase): among any ``n`` consecutive
documents, ``floor(n*f)`` or ``ceil(n*f)`` are validation documents, spread evenly,
whatever the chunk size.

Training samples blocks as nanoGPT does: item ``i`` of the training dataset is the
``block_size`` tokens starting at a pseudo-random offset that is a pure function of
``(training.seed, split, i)``, so runs are deterministic and resumable. Validation
items are consecutive, non-overlapping blocks, the same for every seed, so validation
losses of different seeds are measured on the same tokens.
"""

from __future__ import annotations

import json
import os
import random
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch

from ..errors import PeftlabError
from .raw import RawTask

FORMAT = "peftlab-token-bins"
FORMAT_VERSION = 1
INCOMPLETE = ".prepare-incomplete"  # present while a directory is being prepared
# A directory prepared by nanoGPT's data/openwebtext/prepare.py has no meta.json; it is GPT-2 BPE in uint16.
NANOGPT_META = {"format": "nanoGPT", "dtype": "uint16", "vocab_size": 50257, "eot_token_id": 50256, "tokenizer": "gpt2"}
_M64 = (1 << 64) - 1


def bin_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id ``0..vocab_size-1`` fits in 16 bits, else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def is_val_document(index: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask: which document positions belong to validation.

    Document ``i`` is a validation document when ``floor((i+1)f + u) > floor(i f + u)``
    with a phase ``u`` in [0, 1) drawn from ``seed``: exactly one validation document in
    every stretch of ``1/f`` documents, independent of how the stream is chunked.
    """
    if fraction <= 0:
        return np.zeros(len(index), dtype=bool)
    u = random.Random(seed).random()
    i = np.asarray(index, dtype=np.float64)
    return np.floor((i + 1) * fraction + u) > np.floor(i * fraction + u)


def _chunks(docs: Iterable[str], n: int) -> Iterator[list[str]]:
    buf: list[str] = []
    for d in docs:
        buf.append(d)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


class _SplitWriter:
    """Appends tokens of one split to ``<split>.bin`` (and, for train, EOT positions and
    document lengths to raw int64 side files), keeping only the current chunk in memory."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, with_docs: bool):
        self.dtype, self.n_tokens, self.n_docs = dtype, 0, 0
        self.paths = {"bin": out_dir / f"{split}.bin.tmp"}
        if with_docs:
            self.paths.update(eot=out_dir / f"{split}.eot.tmp", len=out_dir / f"{split}.len.tmp")
        self.files = {k: open(p, "wb") for k, p in self.paths.items()}

    def write(self, docs: list[list[int]]) -> None:
        if not docs:
            return
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        tokens = np.fromiter((t for d in docs for t in d), dtype=self.dtype, count=int(lengths.sum()))
        tokens.tofile(self.files["bin"])
        if "eot" in self.files:
            (self.n_tokens + np.cumsum(lengths) - 1).tofile(self.files["eot"])
            lengths.tofile(self.files["len"])
        self.n_tokens += int(lengths.sum())
        self.n_docs += len(docs)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def discard(self) -> None:
        self.close()
        for p in self.paths.values():
            p.unlink(missing_ok=True)


def _raw_to_npy(raw: Path, dest: Path, chunk: int = 1 << 22) -> None:
    """Turn a raw int64 file into ``.npy`` without loading it whole."""
    n = raw.stat().st_size // 8
    src = np.memmap(raw, dtype=np.int64, mode="r", shape=(n,)) if n else np.zeros(0, dtype=np.int64)
    out = np.lib.format.open_memmap(dest, mode="w+", dtype=np.int64, shape=(n,))
    for s in range(0, n, chunk):
        out[s:s + chunk] = src[s:s + chunk]
    out.flush()
    del out, src
    raw.unlink()


def prepare_token_bins(documents: Iterable[str], tokenizer, out_dir, val_fraction: float = 0.1, *, chunk_docs: int = 1024,
                       val_documents: Optional[Iterable[str]] = None, tokenizer_name: Optional[str] = None, split_seed: int = 42,
                       source: str = "", total: Optional[int] = None, progress: bool = True) -> dict:
    """Tokenize a stream of documents into token bins in ``out_dir`` (see the module docstring).

    Args:
        documents: iterable of document strings, consumed once, ``chunk_docs`` at a time.
        tokenizer: a Hugging Face tokenizer with an end-of-text token (``eos_token_id``).
        out_dir: the directory to write (created; existing bins in it are replaced).
        val_fraction: share of ``documents`` that goes to ``val.bin`` (ignored when
            ``val_documents`` is given).
        chunk_docs: documents tokenized and held in memory at once.
        val_documents: an explicit validation stream (a dataset's own validation split).
        tokenizer_name: recorded in meta.json so that training can name the right tokenizer.
        split_seed: seeds which documents go to validation.
        source: where the documents came from, recorded in meta.json.
        total: number of documents, if known (for the progress bar only).
        progress: show a tqdm progress bar.

    Returns:
        The meta dict written to ``meta.json``, plus ``peak_chunk_tokens``: the most
        tokens held in memory at once (one chunk), which tests use to check streaming.
    """
    from tqdm.auto import tqdm

    if chunk_docs < 1:
        raise PeftlabError(f"chunk_docs must be at least 1, got {chunk_docs}.")
    if val_documents is None and not 0.0 < val_fraction < 1.0:
        raise PeftlabError(f"--val-fraction must lie strictly between 0 and 1, got {val_fraction}.")
    eot = tokenizer.eos_token_id
    if eot is None:
        raise PeftlabError("The tokenizer has no end-of-text token, which token bins need between documents; choose another tokenizer.")
    vocab = len(tokenizer)
    dtype = bin_dtype(vocab)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / INCOMPLETE).touch()  # removed only when meta.json is in place
    (out / "meta.json").unlink(missing_ok=True)  # a half-written directory must not look prepared
    writers = {"train": _SplitWriter(out, "train", dtype, with_docs=True), "val": _SplitWriter(out, "val", dtype, with_docs=False)}
    peak = 0
    bar = tqdm(total=total, unit="doc", desc="tokenizing", disable=not progress, dynamic_ncols=True)

    def encode(chunk: list[str], first_index: int) -> list[list[int]]:
        bad = next((i for i, d in enumerate(chunk) if not isinstance(d, str)), None)
        if bad is not None:
            raise PeftlabError(f"Document {first_index + bad} is not a string but {type(chunk[bad]).__name__}; give the text field of each record.")
        ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        return [list(d) + [eot] for d in ids]

    try:
        seen = 0
        for chunk in _chunks(documents, chunk_docs):
            docs = encode(chunk, seen)
            peak = max(peak, sum(len(d) for d in docs))
            if val_documents is None:
                mask = is_val_document(np.arange(seen, seen + len(docs)), val_fraction, split_seed)
                writers["train"].write([d for d, v in zip(docs, mask) if not v])
                writers["val"].write([d for d, v in zip(docs, mask) if v])
            else:
                writers["train"].write(docs)
            seen += len(chunk)
            bar.update(len(chunk))
        if val_documents is not None:
            vseen = 0
            for chunk in _chunks(val_documents, chunk_docs):
                docs = encode(chunk, vseen)
                peak = max(peak, sum(len(d) for d in docs))
                writers["val"].write(docs)
                vseen += len(chunk)
        bar.close()
        for w in writers.values():
            w.close()
        tr, va = writers["train"], writers["val"]
        if tr.n_docs == 0:
            raise PeftlabError(f"No training documents in {source or 'the corpus'}: the input is empty.")
        if va.n_docs == 0:
            raise PeftlabError(
                f"The validation split of {source or 'the corpus'} is empty ({tr.n_docs} documents, val_fraction={val_fraction}); "
                f"raise --val-fraction to at least {1 / max(tr.n_docs, 1):.3g} or add documents."
            )
    except BaseException:
        bar.close()
        for w in writers.values():
            w.discard()
        raise
    for split, w in writers.items():
        os.replace(w.paths["bin"], out / f"{split}.bin")
    _raw_to_npy(writers["train"].paths["eot"], out / "eot_indices.npy")
    _raw_to_npy(writers["train"].paths["len"], out / "doc_lengths.npy")
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": vocab, "eot_token_id": int(eot),
        "tokenizer": tokenizer_name or getattr(tokenizer, "name_or_path", "") or "", "train_tokens": tr.n_tokens, "val_tokens": va.n_tokens,
        "train_documents": tr.n_docs, "val_documents": va.n_docs,
        "val_split": "given" if val_documents is not None else f"every {1 / val_fraction:.4g}th document (val_fraction={val_fraction}, split_seed={split_seed})",
        "source": source,
    }
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, out / "meta.json")  # written last: its presence marks a complete directory
    (out / INCOMPLETE).unlink()
    return {**meta, "peak_chunk_tokens": peak}


def is_bin_dir(path: Path) -> bool:
    return path.is_dir() and (path / "train.bin").is_file()


def read_meta(directory: Path) -> dict:
    directory = Path(directory)
    if (directory / INCOMPLETE).exists():
        raise PeftlabError(
            f"{directory} is a token-bin directory whose preparation did not finish (it holds {INCOMPLETE}); "
            "re-run `peftlab data prepare ... --overwrite` for it."
        )
    p = directory / "meta.json"
    if not p.is_file():
        return dict(NANOGPT_META, assumed=True)
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise PeftlabError(f"{p} is not valid JSON ({e.msg}); re-run `peftlab data prepare` to rewrite the directory.") from None
    missing = [k for k in ("dtype", "vocab_size", "eot_token_id") if k not in meta]
    if missing:
        raise PeftlabError(f"{p} lacks {', '.join(missing)}; re-run `peftlab data prepare` to rewrite the directory.")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise PeftlabError(f"{p} says dtype={meta['dtype']!r}; token bins are uint16 or uint32.")
    return meta


class TokenBin:
    """One split (``train`` or ``val``) of a prepared token-bin directory, memory-mapped."""

    def __init__(self, directory, split: str = "train"):
        self.dir = Path(directory).expanduser()
        self.split = split
        self.meta = read_meta(self.dir)
        self.path = self.dir / f"{split}.bin"
        if not self.path.is_file():
            raise PeftlabError(f"Token-bin directory {self.dir} has no {split}.bin; re-run `peftlab data prepare` for it.")
        self.dtype = np.dtype(self.meta["dtype"])
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise PeftlabError(
                f"{self.path} is {size} bytes, not a whole number of {self.dtype.name} tokens: its dtype does not match meta.json. "
                "Re-run `peftlab data prepare`."
            )
        self.n_tokens = size // self.dtype.itemsize
        expected = self.meta.get(f"{split}_tokens")
        if expected is not None and expected != self.n_tokens:
            raise PeftlabError(
                f"{self.path} holds {self.n_tokens} {self.dtype.name} tokens but meta.json says {expected}: the file is truncated "
                "or its dtype differs from meta.json. Re-run `peftlab data prepare`."
            )
        if self.n_tokens == 0:
            raise PeftlabError(f"{self.path} is empty; re-run `peftlab data prepare` with more text or a larger --val-fraction.")

    def tokens(self) -> np.memmap:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))

    def eot_indices(self) -> np.ndarray:
        return np.load(self.dir / "eot_indices.npy", mmap_mode="r")

    def doc_lengths(self) -> np.ndarray:
        return np.load(self.dir / "doc_lengths.npy", mmap_mode="r")

    def describe(self) -> str:
        m = self.meta
        tok = f"tokenizer {m.get('tokenizer') or '?'}" + (" (assumed: nanoGPT layout without meta.json)" if m.get("assumed") else "")
        return f"{self.n_tokens:,} {self.dtype.name} tokens, vocabulary {m['vocab_size']}, {tok}"

    def check_tokenizer(self, tokenizer) -> None:
        """Raise when the run's tokenizer is not the one the bin was written with."""
        m = self.meta
        vocab, made_with = len(tokenizer), m.get("tokenizer") or "?"
        fix = (f"Set --data.tokenizer={made_with} (and a model with that vocabulary), or re-prepare the corpus with this run's "
               f"tokenizer: peftlab data prepare ... --tokenizer NAME.")
        needed = bin_dtype(vocab)
        if needed.itemsize > self.dtype.itemsize:
            raise PeftlabError(
                f"{self.path} stores {self.dtype.name} tokens but this run's tokenizer has {vocab} tokens, which need {needed.name}: "
                f"the bin dtype does not match the tokenizer. {fix}"
            )
        if vocab != m["vocab_size"]:
            raise PeftlabError(
                f"{self.dir} was prepared with tokenizer {made_with!r} (vocabulary {m['vocab_size']}) but this run's tokenizer has "
                f"{vocab} tokens. {fix}"
            )
        if tokenizer.eos_token_id != m["eot_token_id"]:
            raise PeftlabError(
                f"{self.dir} marks document ends with token {m['eot_token_id']} but this run's tokenizer's end-of-text token is "
                f"{tokenizer.eos_token_id}. {fix}"
            )
        head = self.tokens()[: 1 << 20]
        top = int(head.max())
        if top >= vocab:
            raise PeftlabError(
                f"{self.path} holds token id {top}, outside the vocabulary of {vocab}: the file was not written as {self.dtype.name} "
                f"for this tokenizer. {fix}"
            )

    def make_dataset(self, cfg, split: Optional[str] = None) -> "BinBlockDataset":
        split = split or self.split
        d = cfg.data
        bs = d.block_size
        if self.n_tokens < bs:
            raise PeftlabError(
                f"{self.path} holds {self.n_tokens} tokens, fewer than one block of data.block_size={bs}; lower --data.block_size "
                "or prepare more text."
            )
        cap = d.max_train_examples if split == "train" else d.max_val_examples
        return BinBlockDataset(self.path, self.dtype, self.n_tokens, bs, seed=cfg.training.seed, split=split,
                               random_offsets=split == "train", max_items=cap)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def block_offset(seed: int, split: str, i: int, n_tokens: int, block_size: int) -> int:
    """Start of random block ``i``: uniform over ``0..n_tokens-block_size``, a pure function of
    ``(seed, split, i)`` (SplitMix64 of the three; modulo bias below 2^-40 for any real corpus)."""
    key = _splitmix64(_splitmix64(_splitmix64(seed & _M64) ^ zlib.crc32(split.encode())) ^ i)
    return key % (n_tokens - block_size + 1)


class BinBlockDataset(torch.utils.data.Dataset):
    """Blocks of ``block_size`` tokens from a memory-mapped bin; item ``i`` is
    ``{"input_ids": LongTensor[block_size]}``. Length ``n_tokens // block_size`` (capped by
    ``max_items``): one epoch reads about as many tokens as the split holds."""

    def __init__(self, path: Path, dtype: np.dtype, n_tokens: int, block_size: int, seed: int, split: str,
                 random_offsets: bool, max_items: Optional[int] = None):
        self.path, self.dtype, self.n_tokens, self.block_size = Path(path), np.dtype(dtype), n_tokens, block_size
        self.seed, self.split, self.random_offsets = seed, split, random_offsets
        n = n_tokens // block_size
        self.length = min(n, max_items) if max_items else n
        self._data: Optional[np.memmap] = None

    def __len__(self) -> int:
        return self.length

    def offset(self, i: int) -> int:
        if self.random_offsets:
            return block_offset(self.seed, self.split, i, self.n_tokens, self.block_size)
        return i * self.block_size

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(f"block {i} out of range 0..{self.length - 1}")
        if self._data is None:  # opened lazily, so that the dataset pickles cheaply into worker processes
            self._data = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        o = self.offset(i)
        return {"input_ids": torch.from_numpy(self._data[o:o + self.block_size].astype(np.int64))}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_data"] = None
        return state


def load_token_bins(path: Path, cfg):
    """A :class:`~peftlab.data.RawTask` for a prepared directory (train.bin + meta.json)."""

    train, val = TokenBin(path, "train"), TokenBin(path, "val")
    info = {"source": f"token bins {path}", "train_tokens": train.describe(), "val_tokens": f"{val.n_tokens:,}"}
    if "train_documents" in train.meta:
        info["documents"] = f"{train.meta['train_documents']:,} train, {train.meta.get('val_documents', 0):,} val"
    return RawTask("causal_lm", path.name, train, val, info=info)


__all__ = ["prepare_token_bins", "TokenBin", "BinBlockDataset", "bin_dtype", "block_offset", "is_val_document", "read_meta",
           "load_token_bins", "is_bin_dir"]
