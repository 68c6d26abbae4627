"""Scoring for bounds: sliding windows, units of the three levels, batched scores vs a per-token reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from peftlab.bounds import formulas as F
from peftlab.bounds.scoring import (document_rows, document_spans, sample_units, score_rows, sequence_rows, sliding_windows,
                                    token_rows)
from peftlab.errors import PeftlabError

EOT = 0


def covered_targets(rows) -> np.ndarray:
    """Global positions of the counted targets of every row (the reference: one by one)."""
    out = []
    for s, L, n in zip(rows.start, rows.length, rows.n_new):
        out.extend(range(s + L - n + 1, s + L + 1))
    return np.array(out)


@pytest.mark.parametrize("T,C,stride", [(1, 4, 1), (5, 5, 2), (6, 5, 2), (1000, 64, 100 // 4), (777, 128, 128), (300, 32, 7)])
def test_sliding_window_predicts_every_token_once(T, C, stride):
    b, e, n = sliding_windows(T, C, stride)
    assert ((e - b) <= C).all() and (n >= 1).all()
    counted = np.concatenate([np.arange(ee - nn + 1, ee + 1) for ee, nn in zip(e, n)])
    np.testing.assert_array_equal(np.sort(counted), np.arange(1, T + 1))  # each target exactly once
    if T > C:
        assert ((e - b)[:-1] == C).all()
        # every counted target sees at least C - stride tokens of context (the first window: its position)
        ctx = np.concatenate([np.arange(ee - nn, ee) - bb + 1 for bb, ee, nn in zip(b, e, n)])
        assert ctx[C:].min() >= C - stride + 1


def test_sliding_window_rejects_stride_above_context():
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(100, 10, 11)


def make_stream(lengths, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(1, vocab, size=L - 1), EOT) for L in lengths]
    tokens = np.concatenate(docs).astype(np.uint16)
    eot = np.cumsum(lengths) - 1
    return tokens, eot, np.array(lengths)


def test_document_rows_cover_every_document_token_once():
    lengths = [1, 5, 40, 3, 130, 64, 65]
    tokens, eot, lens = make_stream(lengths)
    starts = document_spans(eot, lens, len(tokens))
    rows = document_rows(starts, lens, np.arange(len(lengths)), context=16, stride=5)
    np.testing.assert_array_equal(np.sort(covered_targets(rows)), np.arange(len(tokens)))
    # unit ids follow the documents
    for u in range(len(lengths)):
        t = covered_targets(type(rows)(*(getattr(rows, f)[rows.unit == u] for f in ("start", "length", "n_new", "unit"))))
        np.testing.assert_array_equal(np.sort(t), np.arange(starts[u], eot[u] + 1))


def test_document_spans_reject_mismatched_files():
    tokens, eot, lens = make_stream([3, 4])
    with pytest.raises(PeftlabError, match="peftlab data prepare"):
        document_spans(eot, lens + 1, len(tokens))


def test_sequence_and_token_rows():
    rows = sequence_rows(np.array([0, 2]), 8)
    np.testing.assert_array_equal(covered_targets(rows), np.r_[1:9, 17:25])
    rows = token_rows(np.array([0, 3, 20]), 8)
    np.testing.assert_array_equal(covered_targets(rows), [0, 3, 20])
    assert rows.length.tolist() == [1, 4, 8]  # position 0 from the virtual EOT alone


def test_seeded_sampling_reproducible():
    a = sample_units(10_000, 500, seed=3)
    b = sample_units(10_000, 500, seed=3)
    c = sample_units(10_000, 500, seed=4)
    for x, y in zip(a[:2], b[:2]):
        np.testing.assert_array_equal(x, y)
    assert a[1].sum() == 500 and a[2]
    assert not np.array_equal(a[0], c[0])
    units, counts, sampled = sample_units(50, 80, seed=0)
    assert not sampled and units.tolist() == list(range(50)) and (counts == 1).all()


def tiny_lm(vocab=50, ctx=32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, bos_token_id=0, eos_token_id=0, n_positions=ctx, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)
    return GPT2LMHeadModel(cfg)


def reference_doc_losses(model, tokens, starts, eot, alphas, context, stride):
    """One document at a time, one window at a time, one token at a time (float64 maths)."""
    out = []
    model.eval()
    V = model.config.vocab_size
    for s, e in zip(starts, eot):
        seq = np.concatenate([[EOT] if s == 0 else tokens[s - 1:s], tokens[s:e + 1]]).astype(np.int64)
        T = len(seq) - 1
        per_alpha = np.zeros(len(alphas))
        done = 0
        b = 0
        while done < T:
            end = min(b + context, T)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor(seq[b:end])[None]).logits[0].double()
            lp = torch.log_softmax(logits, -1)
            for t in range(done + 1, end + 1):
                p = math.exp(float(lp[t - 1 - b, seq[t]]))
                per_alpha += [-math.log2((1 - a) * p + a / V) for a in alphas]
            done = end
            b += stride
        out.append(per_alpha / T)
    return np.array(out).T


def test_batched_scores_match_per_token_reference():
    lengths = [3, 20, 31, 45, 70, 2]
    tokens, eot, lens = make_stream(lengths)
    starts = document_spans(eot, lens, len(tokens))
    model = tiny_lm()
    model.train()  # scoring must switch dropout off itself
    alphas = (0.001, 0.1)
    rows = document_rows(starts, lens, np.arange(len(lengths)), context=16, stride=6)
    sc = score_rows(model, tokens, rows, len(lengths), EOT, alphas, batch_tokens=64, progress=False)
    assert not model.training
    np.testing.assert_array_equal(sc.tokens, lens)
    means, _ = sc.unit_means()
    ref = reference_doc_losses(model, tokens, starts, eot, alphas, 16, 6)
    np.testing.assert_allclose(means[:2], ref, rtol=1e-5)
    # batch size does not change the numbers; a second run gives the same ones
    sc2 = score_rows(model, tokens, rows, len(lengths), EOT, alphas, batch_tokens=1000, progress=False)
    np.testing.assert_allclose(sc2.loss_bits, sc.loss_bits, rtol=1e-6)
    sc3 = score_rows(model, tokens, rows, len(lengths), EOT, alphas, batch_tokens=64, progress=False)
    np.testing.assert_array_equal(sc3.loss_bits, sc.loss_bits)
    # unsmoothed row and top-k: top-100 of a 50-token vocabulary is always right
    raw_ref = reference_doc_losses(model, tokens, starts, eot, (1e-15,), 16, 6)[0]  # α → 0 is the plain NLL
    np.testing.assert_allclose(means[-1], raw_ref, rtol=1e-5)
    _, err = sc.unit_means()
    assert (err[2] == 0).all() and (err[0] >= err[1]).all()


def test_token_rows_score_matches_document_scoring_for_short_documents():
    # with documents shorter than the context, token-level scoring of a position equals the
    # document-level prediction only when the context starts at the stream start; check position sums
    tokens, eot, lens = make_stream([10, 12])
    model = tiny_lm()
    rows = token_rows(np.arange(10), context=32)  # first document: full prefix from the virtual EOT
    sc = score_rows(model, tokens, rows, 10, EOT, (0.01,), progress=False)
    doc = score_rows(model, tokens, document_rows(np.array([0]), np.array([10]), np.array([0]), 32, 32), 1, EOT, (0.01,),
                     progress=False)
    assert sc.loss_bits[0].sum() == pytest.approx(doc.loss_bits[0, 0], rel=1e-5)


@pytest.mark.parametrize("level", ["document", "token"])
def test_right_padded_layout_matches_the_masked_left_padded_one(level):
    """The default layout (right padding, causal attention, no mask) gives the numbers of the
    earlier masked left-padded layout, on batches that mix row lengths and counted tails."""
    lengths = [3, 20, 31, 45, 70, 2, 9, 64]
    tokens, eot, lens = make_stream(lengths)
    model = tiny_lm()
    if level == "document":
        rows = document_rows(document_spans(eot, lens, len(tokens)), lens, np.arange(len(lengths)), context=16, stride=6)
        n_units = len(lengths)
    else:
        rows = token_rows(np.arange(1, len(tokens), 7), 16)
        n_units = len(rows)
    assert len(set(rows.length.tolist())) > 1 and len(set(rows.n_new.tolist())) > 1 or level == "token"
    alphas = (0.001, 0.1)
    right = score_rows(model, tokens, rows, n_units, EOT, alphas, batch_tokens=64, progress=False)
    left = score_rows(model, tokens, rows, n_units, EOT, alphas, batch_tokens=64, progress=False, layout="left")
    np.testing.assert_allclose(right.loss_bits, left.loss_bits, rtol=1e-6)
    np.testing.assert_array_equal(right.topk_correct, left.topk_correct)
    np.testing.assert_array_equal(right.tokens, left.tokens)
    with pytest.raises(ValueError, match="layout must be"):
        score_rows(model, tokens, rows, n_units, EOT, alphas, progress=False, layout="middle")
