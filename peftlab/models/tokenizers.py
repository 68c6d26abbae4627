"""Offline tokenizers that need no download.

The built-in tiny models use a byte-level tokenizer: 256 byte tokens plus four
specials. It round-trips any UTF-8 text exactly and keeps the tiny models' embedding
tables small, which is what CPU tests and the quickstart want.
"""

from __future__ import annotations

from functools import lru_cache

BYTE_SPECIALS = ["<|endoftext|>", "[PAD]", "[CLS]", "[SEP]"]


def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable-character map used by byte-level BPE (GPT-2).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=2)
def byte_tokenizer(for_classification: bool = False):
    """A ``PreTrainedTokenizerFast`` over raw bytes (vocab 260).

    Args:
        for_classification: add ``[CLS] ... [SEP]`` around every sequence (BERT style).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in sorted(_bytes_to_unicode().items())}
    for i, tok in enumerate(BYTE_SPECIALS):
        vocab[tok] = 256 + i
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(BYTE_SPECIALS)
    if for_classification:
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 258), ("[SEP]", 259)]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        unk_token=None,
    )
    tok.model_max_length = 1 << 20
    return tok
