"""Arithmetic (range) coding of quantized symbols with ``constriction``.

The coding distribution is the empirical one, rebuilt by the decoder from the symbol
counts that the message header carries (``L·⌈log₂ d⌉`` bits, see
:func:`peftlab.bounds.formulas.message_length_bits`). The reported length is the length
of the compressed words the encoder emits (32-bit words), i.e. what would actually be
sent, for any number of symbols: no entropy estimate stands in for the code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _model(counts: np.ndarray):
    import constriction

    counts = np.asarray(counts, dtype=np.float64)
    if counts.sum() <= 0:
        raise ValueError("no symbols to code")
    # a deterministic function of the counts: the decoder builds the very same model
    return constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)


@dataclass
class Encoded:
    words: np.ndarray  #: uint32 compressed words
    counts: np.ndarray  #: int64 (L,) symbol counts (header)

    @property
    def num_bits(self) -> int:
        """Real code length of the symbols in bits (whole 32-bit words)."""
        return 32 * int(self.words.size)

    @property
    def num_symbols(self) -> int:
        return int(self.counts.sum())


def encode(symbols: np.ndarray, levels: int) -> Encoded:
    """Range-code ``symbols`` (ints in ``[0, levels)``) under their empirical distribution."""
    import constriction

    sym = np.asarray(symbols).reshape(-1)
    if sym.size == 0:
        raise ValueError("no symbols to code")
    if sym.min() < 0 or sym.max() >= levels:
        raise ValueError(f"symbols must lie in [0, {levels}), got range [{sym.min()}, {sym.max()}]")
    counts = np.bincount(sym, minlength=levels).astype(np.int64)
    enc = constriction.stream.queue.RangeEncoder()
    enc.encode(sym.astype(np.int32), _model(counts))
    return Encoded(words=enc.get_compressed().copy(), counts=counts)


def decode(encoded: Encoded) -> np.ndarray:
    """Decode the symbols back (int64) from the words and the header counts."""
    import constriction

    dec = constriction.stream.queue.RangeDecoder(encoded.words)
    return np.asarray(dec.decode(_model(encoded.counts), encoded.num_symbols), dtype=np.int64)


def empirical_entropy_bits(symbols: np.ndarray) -> float:
    """``n·H(empirical)`` in bits: the ideal code length under the empirical distribution."""
    counts = np.bincount(np.asarray(symbols).reshape(-1))
    counts = counts[counts > 0].astype(np.float64)
    n = counts.sum()
    return float(-(counts * np.log2(counts / n)).sum())


__all__ = ["Encoded", "encode", "decode", "empirical_entropy_bits"]
