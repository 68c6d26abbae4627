"""Bounds maths: formulas against hand-worked numbers, quantization, arithmetic coding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from peftlab.bounds import coding, formulas as F
from peftlab.bounds.quantize import assign, flatten_state, quantize, unflatten_state

V = 50257


# ------------------------------------------------------------------ formulas


@pytest.mark.parametrize("alpha,expected", [(0.01, 22.25), (0.05, 19.87), (0.1, 18.79), (0.25, 17.20)])
def test_delta_hand_computed(alpha, expected):
    # Δ = log2(1 + (1-α)V/α); e.g. α=0.01: 1 + 0.99*50257/0.01 = 4,975,444 -> log2 = 22.246
    # the two-decimal figures (19.865 is quoted as 19.87)
    assert F.smoothing_delta(alpha, V) == pytest.approx(expected, abs=0.006)


def test_message_length_prefix_and_kl_by_hand():
    # 1000 coded bits, L=11, d=1000: 1000 + 16*11 + 11*ceil(log2 1000)=11*10 -> 1286
    assert F.message_length_bits(1000, 11, 1000) == 1286
    assert F.message_length_bits(0, 4, 1024) == 16 * 4 + 4 * 10  # ceil(log2 1024) = 10 exactly
    K = F.prefix_free_length(1286)
    assert K == pytest.approx(1286 + 2 * math.log2(1286))  # 1306.69
    assert K == pytest.approx(1306.6573, abs=1e-3)
    # 8 alphas -> 3 bits once, plus misc 7 -> 10 bits (the public code would add 8*8 = 64)
    assert F.extra_bits(8, 7) == 10
    assert F.extra_bits(1, 0) == 0 and F.extra_bits(9, 0) == 4
    assert F.kl_nats(K, 10) == pytest.approx((1306.6573 + 10) * math.log(2), abs=1e-3)


def test_bound_by_hand():
    # R=3.5 bits, KL=1000 nats, m=1e6 documents, n=1e4 sampled, δ=0.05, Δ=1
    r = 1e4 / (1e4 + 1e6)
    occam = math.sqrt((1000 - math.log(r * 0.05)) / 2e6)
    samp = math.sqrt(-math.log((1 - r) * 0.05) / 2e4)
    got = F.hoeffding_subsampled_bound(3.5, 1000.0, 1_000_000, 10_000, 0.05, 1.0)
    assert got == pytest.approx(3.5 + occam + samp, rel=1e-12)
    assert got == pytest.approx(3.5 + 0.022446 + 0.012259, abs=2e-5)  # numbers worked out separately
    # every unit evaluated: no sampling term, all of δ to the Occam term
    assert F.hoeffding_subsampled_bound(3.5, 1000.0, 500, 500, 0.05, 2.0) == pytest.approx(
        3.5 + 2.0 * math.sqrt((1000 + math.log(20)) / 1000))


def test_smoothed_loss_in_range_on_random_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=g)  # ordinary predictions (rows 0 and 1 are made extreme)
    logits[0, :] = -1e4
    logits[0, 5] = 1e4  # p ≈ 1 for target 5
    targets = torch.randint(0, 300, (64,), generator=g)
    targets[0] = 5
    logits[1, int(targets[1])] = -1e4  # p ≈ 0 for row 1's target
    lp = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    alphas = (1e-4, 0.01, 0.1, 0.5)
    out = F.smoothed_nll_bits(lp, alphas, 300)
    for i, a in enumerate(alphas):
        lo, delta = F.smoothed_loss_floor(a, 300), F.smoothing_delta(a, 300)
        assert lo >= 0
        assert (out[i] >= lo - 1e-9).all() and (out[i] <= lo + delta + 1e-9).all()
        # the Hoeffding range: loss − a lies in [0, Δ] (a = −log2(1−α+α/V) is the loss at p = 1, tiny but > 0)
        shifted = out[i] - lo
        assert (shifted >= -1e-9).all() and (shifted <= delta + 1e-9).all()
        assert shifted.max() == pytest.approx(delta, abs=1e-6)  # row 1: p ≈ 0 reaches the top of the range
        # exact against the float64 formula
        ref = -np.log2((1 - a) * np.exp(lp.double().numpy()) + a / 300)
        np.testing.assert_allclose(out[i].numpy(), ref, rtol=1e-10, atol=1e-12)
    assert out[0, 0] == pytest.approx(F.smoothed_loss_floor(1e-4, 300), abs=1e-9)


def test_topk_correct_ranks():
    logits = torch.tensor([[0.1, 0.5, 0.3, 0.9], [1.0, 1.0, 0.0, 0.0]])
    t = torch.tensor([2, 1])
    hit = F.topk_correct(logits, t, (1, 2, 3))
    assert hit.tolist() == [[False, True], [False, True], [True, True]]  # target 0.3 is 3rd; a tie counts as a hit


# ------------------------------------------------------------------ quantization


def test_quantize_bins_and_centroids_by_hand():
    v = np.array([-1.0, -0.9, 0.0, 0.1, 1.0])
    q = quantize(v, 2)
    # edges at -1, 0, 1: negatives in bin 0 (mean -0.95), the rest in bin 1 (mean 11/30)
    assert q.symbols.tolist() == [0, 0, 1, 1, 1]
    np.testing.assert_allclose(q.codebook.astype(np.float64), [-0.95, 1.1 / 3], atol=1e-3)
    assert q.codebook.dtype == np.float16
    np.testing.assert_array_equal(q.values(), q.codebook.astype(np.float32)[q.symbols])


def test_more_levels_longer_message_smaller_error():
    v = np.random.default_rng(0).standard_normal(20_000)
    lengths, errors = [], []
    for L in (3, 5, 11, 33):
        q = quantize(v, L)
        enc = coding.encode(q.symbols, L)
        lengths.append(F.message_length_bits(enc.num_bits, L, v.size))
        errors.append(float(np.mean((q.values() - v) ** 2)))
    assert all(a < b for a, b in zip(lengths, lengths[1:])), lengths
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_kmeans_does_not_increase_error():
    v = np.random.default_rng(1).standard_cauchy(5000).clip(-20, 20)
    e_bin = np.mean((quantize(v, 7).values() - v) ** 2)
    e_km = np.mean((quantize(v, 7, use_kmeans=True).values() - v) ** 2)
    assert e_km <= e_bin + 1e-9


def test_assign_nearest_and_state_round_trip():
    cb = np.array([0.5, -1.0, 2.0])
    assert assign(np.array([-3, -0.2, 0.8, 1.3, 9]), cb).tolist() == [1, 0, 0, 2, 2]
    state = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    back = unflatten_state(flatten_state(state), state)
    for k in state:
        torch.testing.assert_close(back[k], state[k])


# ------------------------------------------------------------------ coding


@pytest.mark.parametrize("levels,n", [(11, 20_000), (3, 257), (2, 1), (33, 50_000)])
def test_arithmetic_code_round_trip_and_length(levels, n):
    rng = np.random.default_rng(levels)
    p = rng.dirichlet(np.ones(levels) * 0.5)
    sym = rng.choice(levels, size=n, p=p)
    enc = coding.encode(sym, levels)
    np.testing.assert_array_equal(coding.decode(enc), sym)
    ideal = coding.empirical_entropy_bits(sym)
    # real length: whole 32-bit words, within a couple of words of n·H(empirical)
    assert ideal - 1e-6 <= enc.num_bits <= ideal + 0.002 * n + 96
    assert enc.num_bits % 32 == 0


def test_coding_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        coding.encode(np.array([0, 3]), 3)
