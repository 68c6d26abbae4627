"""Score a causal LM on the units of a bound: documents, aligned sequences or tokens.

All three levels reduce to *rows*: a row is one forward pass over ``length`` tokens of the
training stream starting at global position ``start`` (position ``-1`` is a virtual
end-of-text token in front of the first document, acting as beginning-of-text), of which
the last ``n_new`` predictions count towards unit ``unit``:

* document level: a document is the span between two EOT tokens of ``train.bin``
  (its own EOT included, as ``doc_lengths.npy`` counts it); every one of its tokens is
  predicted, the first from the previous document's EOT. A document longer than the
  context is scored with a sliding window: windows start every ``stride`` tokens, each
  predicts the tokens the previous one did not reach, so every token is predicted exactly
  once with between ``context − stride`` and ``context`` tokens of context
  (:func:`sliding_windows`).
* sequence level: unit ``j`` is the aligned chunk ``train[jC : jC+C]`` predicting
  ``train[jC+1 : jC+C+1]`` (the blocks a nanoGPT-style loader would form), ``C`` the context.
* token level: unit ``p`` is the single prediction of ``train[p]`` from the ``C`` tokens
  before it (fewer at the start of the stream).

Rows are sorted by length and packed into batches of about ``batch_tokens`` tokens. The
default layout pads on the right: every row starts at column 0, and causal attention alone
keeps a row's real tokens from seeing the padding after them, so no attention mask and no
position ids are passed and the fused (flash / memory-efficient) attention kernels run; a
mask would send SDPA to its slow path. The LM head runs only on the columns from the first
counted prediction of the batch to its end (``logits_to_keep``), which for sliding windows
and single tokens is most of the saving. ``layout="left"`` is the earlier layout (left
padding, an attention mask and position ids when a batch mixes lengths), kept as the
reference the tests compare against. Per-token losses are reduced to per-row sums on the
device (a dense masked sum, deterministic on GPUs); inputs go to the device from pinned
memory without blocking and the row sums stay there until the end, so the host never waits
for the GPU inside the loop; per-unit sums are formed on the host. There is no Python loop
over tokens. The model is put in ``eval()`` mode (dropout off) and run under
``torch.inference_mode``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..errors import PeftlabError
from .fastpath import ScoringView, scoring_view
from .formulas import LN2, smoothed_nll_bits, target_rank

TOPK = (1, 10, 100)


# ------------------------------------------------------------------ units -> rows


def sliding_windows(n_targets: int, context: int, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows over a sequence ``s[0..n_targets]`` whose targets are ``s[1..n_targets]``.

    Returns ``(begin, end, n_new)``: window ``k`` feeds ``s[begin:end]`` (at most
    ``context`` tokens) and counts its last ``n_new`` predictions, the targets
    ``s[end-n_new+1 .. end]``. The windows tile ``1..n_targets`` exactly once.
    """
    if context < 1 or stride < 1:
        raise ValueError(f"context and stride must be positive, got {context}, {stride}")
    if stride > context:
        raise ValueError(f"stride ({stride}) must not exceed the context ({context}): tokens would be skipped")
    if n_targets <= context:
        return np.array([0]), np.array([n_targets]), np.array([n_targets])
    k = -(-(n_targets - context) // stride) + 1  # ceil((T - C) / stride) + 1 windows
    begin = np.arange(k, dtype=np.int64) * stride
    end = np.minimum(begin + context, n_targets)
    prev = np.concatenate([[0], end[:-1]])
    return begin, end, end - prev


@dataclass
class Rows:
    """Forward passes to run: global start (−1 = virtual EOT), length, counted tail, unit."""

    start: np.ndarray
    length: np.ndarray
    n_new: np.ndarray
    unit: np.ndarray

    def __len__(self) -> int:
        return len(self.start)


def document_spans(eot_indices: np.ndarray, doc_lengths: np.ndarray, n_tokens: int) -> np.ndarray:
    """Start positions of the documents, checked against the EOT indices and lengths."""
    eot = np.asarray(eot_indices, dtype=np.int64)
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    if eot.shape != lengths.shape or eot.ndim != 1 or eot.size == 0:
        raise PeftlabError(
            f"eot_indices.npy ({eot.shape}) and doc_lengths.npy ({lengths.shape}) must be 1-D arrays of the same, non-zero length; "
            "re-run `peftlab data prepare` to rewrite them."
        )
    starts = eot - lengths + 1
    ok = (lengths >= 1).all() and starts[0] == 0 and (starts[1:] == eot[:-1] + 1).all() and eot[-1] == n_tokens - 1
    if not ok:
        raise PeftlabError(
            "eot_indices.npy and doc_lengths.npy do not describe consecutive documents of train.bin (each document must end "
            "with its EOT and start right after the previous one); they belong to another train.bin. Re-run `peftlab data prepare`."
        )
    return starts


def document_rows(starts: np.ndarray, lengths: np.ndarray, docs: np.ndarray, context: int, stride: int) -> Rows:
    """Rows for documents ``docs`` (indices), unit ``i`` = ``docs[i]``'s position in ``docs``."""
    out_s, out_l, out_n, out_u = [], [], [], []
    lengths = np.asarray(lengths, dtype=np.int64)
    for u, d in enumerate(np.asarray(docs, dtype=np.int64)):
        # sequence s = [token before the document] + document; position j of s is global start-1+j
        b, e, n = sliding_windows(int(lengths[d]), context, stride)
        out_s.append(starts[d] - 1 + b)
        out_l.append(e - b)
        out_n.append(n)
        out_u.append(np.full(len(b), u, dtype=np.int64))
    cat = lambda xs: np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, dtype=np.int64)  # noqa: E731
    return Rows(cat(out_s), cat(out_l), cat(out_n), cat(out_u))


def sequence_rows(chunks: np.ndarray, context: int) -> Rows:
    """Rows for aligned chunks: chunk ``j`` feeds ``train[jC : jC+C]`` and counts all ``C`` predictions."""
    chunks = np.asarray(chunks, dtype=np.int64)
    n = len(chunks)
    return Rows(chunks * context, np.full(n, context, dtype=np.int64), np.full(n, context, dtype=np.int64), np.arange(n, dtype=np.int64))


def token_rows(positions: np.ndarray, context: int) -> Rows:
    """Rows for single tokens: ``train[p]`` predicted from up to ``context`` tokens before it."""
    p = np.asarray(positions, dtype=np.int64)
    start = np.maximum(p - context, -1)
    n = len(p)
    return Rows(start, p - start, np.ones(n, dtype=np.int64), np.arange(n, dtype=np.int64))


def num_sequences(n_tokens: int, context: int) -> int:
    """Aligned chunks with a full set of ``context`` targets: ``⌊(N − 1) / C⌋``."""
    return max((n_tokens - 1) // context, 0)


def sample_units(m: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """``n`` units drawn uniformly with replacement from ``m`` (seeded), as unique ids and multiplicities.

    When ``n >= m`` every unit is taken once instead (the full empirical risk, no
    sampling term). Returns ``(units, counts, sampled)``.
    """
    if n >= m:
        return np.arange(m, dtype=np.int64), np.ones(m, dtype=np.int64), False
    draw = np.random.default_rng(seed).integers(0, m, size=n)
    units, counts = np.unique(draw, return_counts=True)
    return units.astype(np.int64), counts.astype(np.int64), True


# ------------------------------------------------------------------ scoring


@dataclass
class UnitScores:
    """Per-unit sums: ``loss_bits`` is ``(len(alphas) + 1, U)`` (the last row unsmoothed), ``topk`` ``(3, U)``."""

    loss_bits: np.ndarray
    topk_correct: np.ndarray
    tokens: np.ndarray
    alphas: tuple[float, ...]
    vocab_size: int
    path: str = "model"

    def unit_means(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-unit mean loss (bits/token) and top-k error."""
        t = np.maximum(self.tokens, 1)
        return self.loss_bits / t, 1.0 - self.topk_correct / t


def _padded_stream(tokens: np.ndarray, eot_id: int):
    """Index function: global position (−1 allowed) -> token id, on a memmap without copying it."""

    def take(idx: np.ndarray) -> np.ndarray:
        out = np.empty(idx.shape, dtype=np.int64)
        virtual = idx < 0
        out[virtual] = eot_id
        out[~virtual] = tokens[idx[~virtual]]
        return out

    return take


def _batches(rows: Rows, batch_tokens: int) -> list[np.ndarray]:
    order = np.argsort(-rows.length, kind="stable")
    out, cur, cur_len = [], [], 0
    for i in order:
        L = int(rows.length[i])
        width = max(cur_len, L)
        if cur and width * (len(cur) + 1) > batch_tokens:
            out.append(np.array(cur))
            cur, cur_len = [], 0
            width = L
        cur.append(i)
        cur_len = width
    if cur:
        out.append(np.array(cur))
    return out


_KEEP_UNSUPPORTED: set[type] = set()

def _forward(model: torch.nn.Module, x: torch.Tensor, keep: int, extra: dict) -> torch.Tensor:
    """Logits of the last ``keep`` positions (``logits_to_keep`` when the model accepts it,
    which skips the LM head on the other positions; otherwise all positions)."""
    if type(model) not in _KEEP_UNSUPPORTED:
        try:
            return model(input_ids=x, logits_to_keep=keep, **extra).logits
        except TypeError:
            _KEEP_UNSUPPORTED.add(type(model))
    return model(input_ids=x, **extra).logits


def _head_chunk_rows(vocab: int) -> int:
    """Counted positions per LM-head chunk: about 1 GiB of float32 logits."""
    return max(256, (1 << 28) // max(vocab, 1))


def target_scores(logits: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Natural-log probability of each target and its rank (:func:`~.formulas.target_rank`)."""
    lg = logits.float()
    lp = lg.gather(-1, tgt[:, None])[:, 0] - torch.logsumexp(lg, dim=-1)
    return lp, target_rank(lg, tgt)


@dataclass
class BatchSums:
    """Per-row sums of some of the batches of a scoring: ``batch[i]`` holds the indices (into
    the rows) of batch ``index[i]``, whose sums are the columns ``offset[i] : offset[i+1]`` of
    ``sums`` (``(len(alphas) + 1 + 3, rows)``: smoothed bits per α, unsmoothed bits, top-k hits)."""

    index: list[int]
    batch: list[np.ndarray]
    sums: np.ndarray
    vocab_size: int
    path: str = "model"  # "view": scored through fastpath.scoring_view; "model": the model's own logits

    @property
    def offset(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([len(b) for b in self.batch])]).astype(np.int64)


def reduce_scores(rows: Rows, num_units: int, alphas: Sequence[float], parts: Sequence[BatchSums]) -> UnitScores:
    """Per-unit sums from the per-row sums of every batch, added in batch order (so that the
    result does not depend on how the batches were shared between processes)."""
    A = len(alphas)
    got = sorted((i, p, k) for p in parts for k, i in enumerate(p.index))
    if len({i for i, _, _ in got}) != len(got):
        raise ValueError("a batch was scored twice")
    vocab = max((p.vocab_size for p in parts), default=0)
    if not got or not vocab:
        raise PeftlabError("nothing to score: the sample holds no tokens.")
    row_order = np.concatenate([p.batch[k] for _, p, k in got])
    sums = np.concatenate([p.sums[:, p.offset[k]:p.offset[k + 1]] for _, p, k in got], axis=1)
    units = rows.unit[row_order]
    loss = np.zeros((A + 1, num_units))
    hits = np.zeros((len(TOPK), num_units))
    np.add.at(loss.T, units, sums[:A + 1].T)
    np.add.at(hits.T, units, sums[A + 1:].T)
    count = np.bincount(rows.unit, weights=rows.n_new, minlength=num_units).astype(np.float64)
    paths = {p.path for p in parts if p.index}
    return UnitScores(loss, hits, count, tuple(alphas), int(vocab), "view" if paths == {"view"} else "model")


_COMPILED: list = []


def compiled_target_scores():
    """:func:`target_scores` through ``torch.compile`` (compiled once per process, dynamic in the rows)."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(target_scores, dynamic=True))
    return _COMPILED[0]


def score_rows(model: torch.nn.Module, tokens: np.ndarray, rows: Rows, num_units: int, eot_id: int, alphas: Sequence[float],
               **kw) -> UnitScores:
    """Run the model over ``rows`` and sum losses and top-k hits per unit (see :func:`score_batches`
    for the arguments)."""
    return reduce_scores(rows, num_units, alphas, [score_batches(model, tokens, rows, eot_id, alphas, **kw)])


def score_batches(
    model: torch.nn.Module,
    tokens: np.ndarray,
    rows: Rows,
    eot_id: int,
    alphas: Sequence[float],
    device: torch.device | str = "cpu",
    batch_tokens: int = 8192,
    autocast_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    desc: str = "scoring",
    layout: str = "right",
    head: str = "auto",
    batch_filter: Optional[Callable[[int], bool]] = None,
    compile: bool = False,
    compile_body: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> BatchSums:
    """Run the model over ``rows``: per-row sums of losses and top-k hits, batch by batch.

    Args:
        model: causal LM returning ``.logits`` of shape ``(B, T, V)``.
        tokens: the training stream (a memmap is fine).
        rows: forward passes, see :class:`Rows`.
        eot_id: token standing at virtual position −1.
        alphas: smoothing grid.
        batch_tokens: padded tokens per forward pass.
        autocast_dtype: e.g. ``torch.bfloat16`` for mixed precision on a GPU (losses are
            always computed from float32 log-probabilities).
        layout: ``right`` (padding after each row, causal attention without a mask; the
            default) or ``left`` (the earlier layout with an attention mask and the model's
            own logits; same numbers up to the kernels' rounding).
        head: ``auto`` (score through :func:`~peftlab.bounds.fastpath.scoring_view`: merged
            adapters, fused GELU, the LM head only on the counted positions; checked on the
            first batch, else the model's own logits are used) or ``model`` (the model's own
            logits on the ``logits_to_keep`` columns of every batch).
        compile: reduce each chunk of logits to (log-probability, rank) with a
            ``torch.compile``d :func:`target_scores` (one pass over the logits instead of
            the five of eager ``logsumexp`` + compare; same function, float rounding aside).
        compile_body: run the view's body (every block) through ``torch.compile`` too, checked on the
            first batch against the eager body (:meth:`~peftlab.bounds.fastpath.ScoringView.compile_body`;
            eager when the check fails). ``log`` says which.
        batch_filter: run only the batches ``i`` (in the fixed batch order) for which this
            is true; the others count as done. Data-parallel scoring gives each process a
            share of the same batches, so every row is computed exactly as on one process.
    """
    if layout not in ("right", "left"):
        raise ValueError(f"layout must be 'right' or 'left', got {layout!r}")
    if head not in ("auto", "model"):
        raise ValueError(f"head must be 'auto' or 'model', got {head!r}")
    from tqdm.auto import tqdm

    device = torch.device(device)
    model.eval()
    take = _padded_stream(tokens, eot_id)
    A = len(alphas)
    num_units = int(rows.unit.max()) + 1 if len(rows) else 0
    remaining = np.bincount(rows.unit, minlength=num_units)
    vocab = None
    bar = tqdm(total=num_units, desc=desc, unit="unit", disable=not progress, dynamic_ncols=True)
    pin = device.type == "cuda"
    stack = contextlib.ExitStack()
    view: Optional[ScoringView] = None
    checked = head != "auto" or layout != "right"
    scores_fn = compiled_target_scores() if compile else target_scores
    topk = torch.tensor(TOPK, device=device)

    def to_device(a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(a)
        return x.pin_memory().to(device, non_blocking=True) if pin else x.to(device)

    done: list[tuple[int, np.ndarray]] = []  # (batch index, its rows)
    pending: list[torch.Tensor] = []  # their per-row sums, on the device
    try:
        for b_i, idx in enumerate(_batches(rows, batch_tokens)):
            start, length, n_new, unit = rows.start[idx], rows.length[idx], rows.n_new[idx], rows.unit[idx]
            if batch_filter is None or batch_filter(b_i):
                T = int(length.max())
                col = np.arange(T)[None, :]
                extra = {}
                if layout == "left":
                    # every row ends at column T-1, so the counted predictions are the last n_new columns
                    keep = int(n_new.max())
                    pad = (T - length)[:, None]
                    rel = col - pad  # position inside the row (negative: padding)
                    valid = rel >= 0
                    kcol = np.arange(T - keep, T)[None, :]
                    counted = kcol >= (T - n_new)[:, None]
                    target = start[:, None] + (kcol - pad) + 1
                    if bool((pad > 0).any()):
                        extra["attention_mask"] = to_device(valid.astype(np.int64))
                        extra["position_ids"] = to_device(np.maximum(rel, 0))
                else:
                    # every row starts at column 0; its counted predictions are columns [length-n_new, length)
                    first = length - n_new
                    keep = T - int(first.min())
                    valid = col < length[:, None]
                    kcol = np.arange(T - keep, T)[None, :]
                    counted = (kcol >= first[:, None]) & (kcol < length[:, None])
                    target = start[:, None] + kcol + 1
                    rel = col
                x = take(np.where(valid, start[:, None] + rel, -1))
                y = take(np.where(counted, target, -1))  # (B, keep); -1 (virtual EOT) where nothing counts
                # the counted predictions as flat indices known on the host: selecting them by index
                # (not by a boolean mask, whose result size the host would have to wait for) keeps
                # the loop free of device-to-host synchronisation
                flat = np.flatnonzero(counted.ravel())
                x_t, f_t, tgt = to_device(x), to_device(flat), to_device(y.ravel()[flat])
                if not checked:  # once per call, on two rows of the first batch
                    checked = True
                    view = stack.enter_context(scoring_view(model, x_t[:2], autocast_dtype))
                    if view is None and log is not None:
                        log("bounds: the scoring view (merged adapters, head on counted positions only) does not apply to "
                            "this model or did not give its numbers; scoring through the model's own logits (slower)")
                with torch.inference_mode():
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        if compile_body and view is not None:
                            compile_body = False  # once per call
                            used = view.compile_body(x_t[:2])
                            if log is not None:
                                log("bounds.compile_body: the scoring body " + ("compiled" if used else
                                    "did not compile to the eager body's numbers; scored eagerly"))
                        if view is not None:
                            h = view.hidden(x_t)
                            # the counted positions as flat indices among all (B, T) columns
                            f_all = to_device(flat + (flat // keep) * (T - keep) + (T - keep))
                            sel = h.reshape(-1, h.shape[-1]).index_select(0, f_all)  # (K, d): the head runs on these only
                            vocab = view.vocab
                            step = _head_chunk_rows(vocab)
                            parts = [scores_fn(view.logits(sel[i:i + step], autocast_dtype), tgt[i:i + step])
                                     for i in range(0, len(flat), step)]
                            lp = torch.cat([p[0] for p in parts])
                            rank = torch.cat([p[1] for p in parts])
                        else:
                            logits = _forward(model, x_t, keep, extra)[:, -keep:]
                            vocab = logits.shape[-1]
                            lp, rank = target_scores(logits.reshape(-1, vocab).index_select(0, f_t), tgt)
                    per_tok = torch.cat([smoothed_nll_bits(lp, alphas, vocab), (-lp.double() / LN2)[None]], 0)  # (A+1, K)
                    top = (rank[None, :] < topk[:, None]).double()  # (3, K)
                    # per-row sums by a dense masked reduction (deterministic on GPUs, unlike atomic
                    # scatter-adds); they stay on the device until the end (no host sync per batch)
                    dense = torch.zeros(A + 1 + len(TOPK), counted.size, dtype=torch.float64, device=device)
                    dense[:, f_t] = torch.cat([per_tok, top], 0)
                    pending.append(dense.view(-1, *counted.shape).sum(-1))  # (A+1+3, B)
                done.append((b_i, idx))
            before = int((remaining == 0).sum())
            np.subtract.at(remaining, unit, 1)
            bar.update(int((remaining == 0).sum()) - before)
    finally:
        stack.close()  # the model as it was
        bar.close()
    # one device-to-host transfer for the whole sample
    sums = torch.cat(pending, 1).cpu().numpy() if pending else np.zeros((A + 1 + len(TOPK), 0))
    return BatchSums([i for i, _ in done], [r for _, r in done], sums, int(vocab or 0), "view" if view is not None else "model")


__all__ = [
    "TOPK", "sliding_windows", "Rows", "document_spans", "document_rows", "sequence_rows", "token_rows", "num_sequences",
    "sample_units", "UnitScores", "BatchSums", "score_rows", "score_batches", "reduce_scores", "target_scores",
]
