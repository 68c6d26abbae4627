"""Token bins: round trip, EOT indices, document lengths, streaming in chunks, the dataset, errors, CLI, training."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from peftlab.data.bins import TokenBin, bin_dtype, block_offset, is_val_document, prepare_token_bins
from peftlab.errors import PeftlabError
from peftlab.models.tokenizers import byte_tokenizer

from conftest import make_cfg

EOT = 256  # the byte tokenizer's <|endoftext|>; ids 0..255 are the bytes themselves


def corpus(n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "naïve", "café", "δέλτα", "🙂", "line\nbreak", "tab\there"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, 25))) for _ in range(n)]


def expected_tokens(docs: list[str]) -> np.ndarray:
    """The reference: UTF-8 bytes of each document followed by EOT, by hand."""
    out: list[int] = []
    for d in docs:
        out.extend(d.encode("utf-8"))
        out.append(EOT)
    return np.array(out, dtype=np.int64)


def decode_docs(tokens: np.ndarray) -> list[str]:
    docs, cur = [], []
    for t in tokens.tolist():
        if t == EOT:
            docs.append(bytes(cur).decode("utf-8"))
            cur = []
        else:
            cur.append(t)
    assert not cur, "the bin must end with EOT"
    return docs


def test_round_trip_eot_indices_and_doc_lengths(tmp_path):
    docs = corpus(60)
    meta = prepare_token_bins(docs, byte_tokenizer(), tmp_path, 0.1, chunk_docs=7, tokenizer_name="byte", progress=False)
    mask = is_val_document(np.arange(len(docs)), 0.1, 42)
    train_docs = [d for d, v in zip(docs, mask) if not v]
    val_docs = [d for d, v in zip(docs, mask) if v]
    assert len(val_docs) == 6  # systematic sampling: exactly 10% of 60
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    np.testing.assert_array_equal(train, expected_tokens(train_docs))
    np.testing.assert_array_equal(val, expected_tokens(val_docs))
    assert decode_docs(train) == train_docs and decode_docs(val) == val_docs  # decode(bin) == corpus
    eot = np.load(tmp_path / "eot_indices.npy")
    lengths = np.load(tmp_path / "doc_lengths.npy")
    assert eot.dtype == np.int64 and lengths.dtype == np.int64
    assert len(eot) == len(train_docs) and (train[eot] == EOT).all() and (train == EOT).sum() == len(eot)
    assert lengths.sum() == len(train) and eot[-1] == len(train) - 1
    np.testing.assert_array_equal(lengths, [len(d.encode("utf-8")) + 1 for d in train_docs])
    np.testing.assert_array_equal(np.diff(np.concatenate([[-1], eot])), lengths)
    on_disk = json.loads((tmp_path / "meta.json").read_text())
    assert on_disk["dtype"] == "uint16" and on_disk["vocab_size"] == 260 and on_disk["eot_token_id"] == EOT
    assert on_disk["tokenizer"] == "byte" and on_disk["train_tokens"] == len(train) and on_disk["val_tokens"] == len(val)
    assert (on_disk["train_documents"], on_disk["val_documents"]) == (54, 6)
    assert meta["train_tokens"] == len(train)


def test_validation_choice_is_exact_and_chunk_independent():
    for f in (0.1, 0.03, 0.5, 0.0005):
        for n in (1, 7, 100, 2001):
            k = int(is_val_document(np.arange(n), f, 3).sum())
            assert np.floor(n * f) <= k <= np.ceil(n * f), (f, n, k)
    whole = is_val_document(np.arange(500), 0.1, 9)
    pieces = np.concatenate([is_val_document(np.arange(s, min(s + 13, 500)), 0.1, 9) for s in range(0, 500, 13)])
    np.testing.assert_array_equal(whole, pieces)
    assert not np.array_equal(whole, is_val_document(np.arange(500), 0.1, 10))


class CountingTokenizer:
    """The byte tokenizer, recording how many documents each call tokenizes."""

    def __init__(self):
        self.inner = byte_tokenizer()
        self.eos_token_id = self.inner.eos_token_id
        self.calls: list[int] = []

    def __len__(self):
        return len(self.inner)

    def __call__(self, texts, add_special_tokens=False):
        self.calls.append(len(texts))
        return self.inner(texts, add_special_tokens=add_special_tokens)


def test_large_corpus_prepares_in_chunks(tmp_path):
    docs = corpus(400, seed=1)
    pulled = []

    def stream():  # a generator: no length, read once; record how far ahead of tokenization it is read
        for i, d in enumerate(docs):
            pulled.append((i, len(tok.calls)))
            yield d

    tok = CountingTokenizer()
    chunk = 16
    meta = prepare_token_bins(stream(), tok, tmp_path / "a", 0.1, chunk_docs=chunk, progress=False)
    total = len(expected_tokens(docs))
    # never more than one chunk of documents (and their tokens) in memory
    assert max(tok.calls) == chunk and sum(tok.calls) == len(docs)
    assert all(i < (calls + 1) * chunk for i, calls in pulled)  # doc i is read only while chunk i // 16 is built
    cap = max(len(expected_tokens(docs[s:s + chunk])) for s in range(0, len(docs), chunk))
    assert meta["peak_chunk_tokens"] <= cap < total / 10
    # the chunk size changes nothing in the output
    prepare_token_bins(docs, byte_tokenizer(), tmp_path / "b", 0.1, chunk_docs=1000, progress=False)
    for f in ("train.bin", "val.bin", "eot_indices.npy", "doc_lengths.npy"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


class WideTokenizer:
    """A stub with a 70,000-token vocabulary: ids above 65,535 need uint32 bins."""

    eos_token_id = 69_999

    def __len__(self):
        return 70_000

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[60_000 + ord(c) for c in t] for t in texts]}


def test_dtype_follows_the_vocabulary(tmp_path):
    assert bin_dtype(260) == np.uint16 and bin_dtype(50_257) == np.uint16 and bin_dtype(65_536) == np.uint16
    assert bin_dtype(65_537) == np.uint32 and bin_dtype(151_936) == np.uint32
    docs = ["ab", "c", "def", "g"]
    meta = prepare_token_bins(docs, WideTokenizer(), tmp_path, 0.5, chunk_docs=3, progress=False)
    assert meta["dtype"] == "uint32"
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint32)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint32)
    mask = is_val_document(np.arange(4), 0.5, 42)
    assert mask.sum() == 2

    def ref(ds):
        return [t for d in ds for t in [60_000 + ord(c) for c in d] + [69_999]]

    assert train.tolist() == ref([d for d, v in zip(docs, mask) if not v])
    assert val.tolist() == ref([d for d, v in zip(docs, mask) if v])
    assert max(train.max(), val.max()) > 65_535 or 69_999 in train.tolist()
    assert (train[np.load(tmp_path / "eot_indices.npy")] == 69_999).all()
    assert TokenBin(tmp_path, "train").n_tokens == len(train)


def _prepared(tmp_path, n=80):
    d = tmp_path / "bins"
    prepare_token_bins(corpus(n, seed=2), byte_tokenizer(), d, 0.2, chunk_docs=8, tokenizer_name="byte", progress=False)
    return d


def test_block_dataset_is_a_pure_function_of_seed_split_and_index(tmp_path):
    d = _prepared(tmp_path)
    cfg = make_cfg(tmp_path, "lm", data__block_size=16, data__max_train_examples=None, data__max_val_examples=None)
    train_bin = TokenBin(d, "train")
    ds = train_bin.make_dataset(cfg, "train")
    tokens = np.fromfile(d / "train.bin", dtype=np.uint16)
    assert len(ds) == len(tokens) // 16
    for i in (len(ds) - 1, 0, 5, 3):  # any access order
        o = block_offset(42, "train", i, len(tokens), 16)
        assert 0 <= o <= len(tokens) - 16
        item = ds[i]["input_ids"]
        assert item.dtype == torch.long and item.shape == (16,)
        assert item.tolist() == tokens[o:o + 16].tolist()
    # offsets cover 0..n-block_size uniformly (hand-checkable on a 20-token bin with blocks of 16)
    counts = np.bincount([block_offset(42, "train", i, 20, 16) for i in range(5000)], minlength=5)
    assert len(counts) == 5 and counts.min() > 850 and counts.max() < 1150
    offsets = [ds.offset(i) for i in range(len(ds))]
    assert all(0 <= o <= len(tokens) - 16 for o in offsets)
    assert len(set(offsets)) > len(ds) // 2  # random starts, not a fixed grid
    assert offsets == [TokenBin(d, "train").make_dataset(cfg, "train").offset(i) for i in range(len(ds))]
    other = TokenBin(d, "train").make_dataset(make_cfg(tmp_path, "lm", data__block_size=16, training__seed=7), "train")
    assert [other.offset(i) for i in range(10)] != offsets[:10]
    # validation: consecutive blocks, identical for every training seed
    val = TokenBin(d, "val").make_dataset(cfg, "val")
    vt = np.fromfile(d / "val.bin", dtype=np.uint16)
    assert len(val) == len(vt) // 16 and val[2]["input_ids"].tolist() == vt[32:48].tolist()
    # caps and pickling (for DataLoader workers)
    capped = train_bin.make_dataset(make_cfg(tmp_path, "lm", data__block_size=16, data__max_train_examples=5), "train")
    assert len(capped) == 5
    import pickle

    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[4]["input_ids"], ds[4]["input_ids"])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_tokenizer_and_dtype_mismatches_are_clear_errors(tmp_path):
    d = _prepared(tmp_path)
    binfile = TokenBin(d, "train")
    binfile.check_tokenizer(byte_tokenizer())  # the right one passes
    with pytest.raises(PeftlabError, match="stores uint16 tokens but this run's tokenizer has 70000 tokens, which need uint32"):
        binfile.check_tokenizer(WideTokenizer())

    class Gpt2Sized:
        eos_token_id = 50_256

        def __len__(self):
            return 50_257

    with pytest.raises(PeftlabError, match=r"prepared with tokenizer 'byte' \(vocabulary 260\) but this run's tokenizer has 50257"):
        binfile.check_tokenizer(Gpt2Sized())
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "dtype": "uint32"}))
    with pytest.raises(PeftlabError, match="not a whole number of uint32 tokens|meta.json says"):
        TokenBin(d, "train")
    (d / "meta.json").write_text(json.dumps({**meta, "train_tokens": meta["train_tokens"] + 1}))
    with pytest.raises(PeftlabError, match="truncated"):
        TokenBin(d, "train")
    (d / "meta.json").write_text(json.dumps({**meta, "vocab_size": 100}))
    with pytest.raises(PeftlabError, match="vocabulary 100"):
        TokenBin(d, "train").check_tokenizer(byte_tokenizer())


def test_nanogpt_directory_without_meta_is_read_as_gpt2(tmp_path):
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(40, dtype=np.uint16).tofile(tmp_path / "val.bin")
    b = TokenBin(tmp_path, "train")
    assert b.n_tokens == 100 and b.meta["vocab_size"] == 50_257 and b.meta["assumed"]
    with pytest.raises(PeftlabError, match="tokenizer 'gpt2'"):
        b.check_tokenizer(byte_tokenizer())


def test_bad_corpora(tmp_path):
    with pytest.raises(PeftlabError, match="validation split .* is empty"):
        prepare_token_bins(["only", "two"], byte_tokenizer(), tmp_path / "a", 0.01, progress=False)
    assert not (tmp_path / "a" / "meta.json").exists() and not list((tmp_path / "a").glob("*.tmp"))
    with pytest.raises(PeftlabError, match="No training documents"):
        prepare_token_bins([], byte_tokenizer(), tmp_path / "b", 0.1, progress=False)
    with pytest.raises(PeftlabError, match="Document 1 is not a string but int"):
        prepare_token_bins(["x", 3], byte_tokenizer(), tmp_path / "c", 0.5, progress=False)


def test_cli_prepare_and_train_on_the_bins(tmp_path, capsys, run_train):
    from peftlab.cli import main
    from peftlab.data import load_raw

    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus(120, seed=3)))
    out = tmp_path / "bins"
    args = ["data", "prepare", str(src), "--output-dir", str(out), "--tokenizer", "byte", "--val-fraction", "0.2", "--no-progress"]
    assert main(args) == 0
    assert "train.bin" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["train_documents"], meta["val_documents"]) == (96, 24)
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--chunk-docs", "5"]) == 0
    # lm-sample keeps its own validation file
    assert main(["data", "prepare", "lm-sample", "--output-dir", str(tmp_path / "s"), "--tokenizer", "byte", "--no-progress"]) == 0
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["val_documents"] == 24

    cfg = make_cfg(tmp_path, "lm", data__dataset=str(out), data__block_size=32, training__max_steps=4, data__max_val_examples=8)
    raw = load_raw(cfg)
    assert raw.task == "causal_lm" and isinstance(raw.train, TokenBin) and isinstance(raw.val, TokenBin)
    res = run_train(cfg)
    assert res["status"] == "completed" and np.isfinite(res["final"]["val_loss"])
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"token bins {out}" in log


def test_round_trip_with_the_genuine_gpt2_bpe(tmp_path):
    try:
        from peftlab.models.offline import gpt2_tokenizer

        tok = gpt2_tokenizer()
    except Exception as e:  # the offline asset is optional
        pytest.skip(f"GPT-2 BPE not installed ({type(e).__name__})")
    docs = corpus(40, seed=4)
    prepare_token_bins(docs, tok, tmp_path, 0.25, chunk_docs=6, tokenizer_name="gpt2", progress=False)
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    mask = is_val_document(np.arange(len(docs)), 0.25, 42)
    assert tok.decode(train.tolist()) == "".join(d + "<|endoftext|>" for d, v in zip(docs, mask) if not v)
    assert (train[np.load(tmp_path / "eot_indices.npy")] == 50_256).all()
    assert np.load(tmp_path / "doc_lengths.npy").sum() == len(train)


def test_interrupted_prepare_is_refused_not_misread(tmp_path):
    """A directory whose preparation was interrupted must not load as nanoGPT-style bins."""
    import pytest

    from peftlab.data.bins import INCOMPLETE, prepare_token_bins, read_meta
    from peftlab.errors import PeftlabError
    from peftlab.models.tokenizers import byte_tokenizer

    out = tmp_path / "bins"

    def docs():
        yield "first document"
        yield "second document"
        raise KeyboardInterrupt  # the user stops it halfway

    with pytest.raises(KeyboardInterrupt):
        prepare_token_bins(docs(), byte_tokenizer(), out, 0.5, chunk_docs=1, progress=False)
    assert (out / INCOMPLETE).exists() and not (out / "meta.json").exists()
    with pytest.raises(PeftlabError, match="did not finish"):
        read_meta(out)
    prepare_token_bins(iter(["a b c", "d e f", "g h i", "j k l"]), byte_tokenizer(), out, 0.5, progress=False)
    assert not (out / INCOMPLETE).exists() and read_meta(out)["vocab_size"] == 260
