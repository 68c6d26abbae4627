"""Rigor of the bounds (issue 24): the union over choices in both terms, mutation-catching tests
of k-means, QAT, the sequence count and the projectors, projector checksums and the gate codebook."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from peftlab.bounds import formulas as F
from peftlab.bounds.config import bounds_config
from peftlab.bounds.evaluate import bound_table, compute_bounds, confidence_statement, delta_split, write_metrics
from peftlab.data.bins import prepare_token_bins
from peftlab.models.tokenizers import byte_tokenizer

LN2 = math.log(2.0)


def _by_hand(risk, kl, m, n, delta, value_range, bits):
    """The bound in float64, written out: δ split r·δ / (1−r)·δ, 2^bits choices paid in both terms."""
    if n == m:
        return risk + value_range * math.sqrt((kl + math.log(1 / delta)) / (2 * m))
    r = n / (n + m)
    occam = math.sqrt((kl - math.log(r * delta)) / (2 * m))
    sampling = math.sqrt(-math.log((1 - r) * delta / 2 ** bits) / (2 * n))  # each choice's Hoeffding at (1−r)·δ/2^bits
    return risk + value_range * (occam + sampling)


# ------------------------------------------------------------------ defect 1: the union in the sampling term


def test_sampling_term_pays_the_union_by_hand():
    # R=3.5 bits, KL=1000 nats, m=1e6, n=1e4, δ=0.05, Δ=1, 10 bits of choices (8 α = 3 bits, misc 7)
    # occam = sqrt((1000 − ln(r·δ))/2e6) = 0.0224456; sampling without the union sqrt(−ln((1−r)δ)/2e4) = 0.0122590,
    # with it sqrt((10·ln 2 − ln((1−r)δ))/2e4) = 0.0222903 (numbers worked out separately)
    got = F.hoeffding_subsampled_bound(3.5, 1000.0, 1_000_000, 10_000, 0.05, 1.0, 10)
    assert got == pytest.approx(3.5447359159310103, abs=1e-12)
    assert got == pytest.approx(3.5 + 0.0224456 + 0.0222903, abs=1e-6)
    assert got == pytest.approx(_by_hand(3.5, 1000.0, 1_000_000, 10_000, 0.05, 1.0, 10), rel=1e-14)
    # the union grows only the sampling term
    assert F.hoeffding_subsampled_bound(3.5, 1000.0, 1_000_000, 10_000, 0.05, 1.0, 0) == pytest.approx(3.534704653197517, abs=1e-12)
    # equivalently: the sampling statement of each of the 2^b choices holds with (1−r)·δ/2^b
    r = 1e4 / (1e4 + 1e6)
    per_choice = (1 - r) * 0.05 / 2 ** 10
    assert got == pytest.approx(3.5 + math.sqrt((1000 - math.log(r * 0.05)) / 2e6) + math.sqrt(-math.log(per_choice) / 2e4), rel=1e-14)
    # every unit scored: no sampling term, the union is paid in KL only (the caller's kl holds the bits)
    assert F.hoeffding_subsampled_bound(3.5, 1000.0, 500, 500, 0.05, 2.0, 10) == pytest.approx(
        3.5 + 2.0 * math.sqrt((1000 + math.log(20)) / 1000), rel=1e-14)
    with pytest.raises(ValueError):
        F.hoeffding_subsampled_bound(3.5, 1000.0, 500, 50, 0.05, 2.0, -1)


def test_confidence_split_sums_to_delta():
    occam, sampling = F.confidence_split(2_640_067, 1000, 0.05)
    assert occam + sampling == pytest.approx(0.05, rel=1e-15)
    assert occam == pytest.approx(0.05 * 1000 / 2_641_067, rel=1e-15)
    assert F.confidence_split(10, 10, 0.05) == (0.05, 0.0)
    s = delta_split(2_640_067, 1000, 0.05, 10)
    assert s["choices"] == 1024 and s["union_bits"] == 10
    assert s["sampling_per_choice"] * 1024 == pytest.approx(s["sampling"], rel=1e-15)
    assert s["occam"] + s["sampling"] == pytest.approx(0.05, rel=1e-15)


def test_bound_table_pays_the_union_in_both_terms():
    """Every per-α bound and every top-k bound of the table against the float64 formula with the union."""
    rng = np.random.default_rng(0)
    alphas = (0.01, 0.05, 0.1, 0.25)
    V, m, n, delta, bits = 49_152, 2_640_067, 1000, 0.05, 10
    units = 700
    loss = rng.uniform(2.0, 6.0, size=(len(alphas) + 1, units))
    err = rng.uniform(0.0, 1.0, size=(3, units))
    weights = rng.integers(1, 3, size=units)
    kl = (3637.6 + bits) * LN2  # the prior pays the bits (K + extra)
    t = bound_table(loss, err, weights, alphas, V, kl, m, int(weights.sum()), delta, union_bits=bits)
    nn = int(weights.sum())
    for i, row in enumerate(t["per_alpha"]):
        risk = float((loss[i] * weights).sum() / weights.sum())
        dlt = math.log2(1 + (1 - alphas[i]) * V / alphas[i])
        assert row["bound_value"] == pytest.approx(_by_hand(risk, kl, m, nn, delta, dlt, bits), rel=1e-12)
        # and it is larger than the old formula by exactly the sampling union
        old = _by_hand(risk, kl, m, nn, delta, dlt, 0)
        r = nn / (nn + m)
        grow = dlt * (math.sqrt((bits * LN2 - math.log((1 - r) * delta)) / (2 * nn)) - math.sqrt(-math.log((1 - r) * delta) / (2 * nn)))
        assert row["bound_value"] - old == pytest.approx(grow, rel=1e-9)
    assert t["best"]["bound_value"] == min(r["bound_value"] for r in t["per_alpha"])
    e1 = float((err[0] * weights).sum() / weights.sum())
    assert t["top1_error_bound"] == pytest.approx(min(1.0, _by_hand(e1, kl, m, nn, delta, 1.0, bits)), rel=1e-12)


def test_smollm2_documented_row_formula_effect():
    """The documented SmolLM2 token-level row (n = 1,000 of m = 2,640,067, KL 2,528.4 nats, α = 0.05, Δ = 19.83,
    10 extra bits): the complexity terms grow from 1.2026 to 1.8322 bits per token, i.e. by 0.63 (0.23 of it
    would be the α grid's 3 bits alone)."""
    V, m, n, kl, delta = 49_152, 2_640_067, 1000, 2528.4, 0.05
    dlt = F.smoothing_delta(0.05, V)
    assert dlt == pytest.approx(19.833, abs=1e-3)
    before = F.hoeffding_subsampled_bound(0.0, kl, m, n, delta, dlt, 0)
    grid_only = F.hoeffding_subsampled_bound(0.0, kl, m, n, delta, dlt, 3)
    after = F.hoeffding_subsampled_bound(0.0, kl, m, n, delta, dlt, 10)
    assert before == pytest.approx(1.2026, abs=1e-4)
    assert grid_only - before == pytest.approx(0.2315, abs=1e-4)
    assert after - before == pytest.approx(0.6297, abs=1e-4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random one-layer GPT-2 (not trained: the formula checks need no good model) on a small byte corpus."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("bins")
    docs = [("the cat sat. " if i % 2 else "a dog ran. ") * (1 + i % 3) for i in range(400)]
    prepare_token_bins(docs, byte_tokenizer(), d, 0.02, tokenizer_name="byte", progress=False)
    cfg = GPT2Config(vocab_size=260, n_positions=32, n_embd=8, n_layer=1, n_head=2, bos_token_id=256, eos_token_id=256)
    model = GPT2LMHeadModel(cfg).eval()
    run_cfg = SimpleNamespace(data=SimpleNamespace(dataset=str(d), block_size=32, tokenizer="byte"), model=SimpleNamespace(name="x"))
    return model, run_cfg, d


class _AllParams:
    def compressible_state(self, model):
        return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _bounds(tiny, **kw):
    model, run_cfg, d = tiny
    base = {"bounds.progress_bar": False, "bounds.full_precision_units": 0, "bounds.bound_type": "token_level",
            "bounds.num_docs": 300, "bounds.levels": 5}
    base.update({f"bounds.{k}": v for k, v in kw.items()})
    return compute_bounds(model, _AllParams(), run_cfg, bounds_config(base), d, torch.device("cpu"), log=lambda s: None)


def test_pipeline_bound_recomputed_from_its_own_metrics(tiny, tmp_path):
    m = _bounds(tiny, alphas=[0.01, 0.1, 0.5], misc_extra_bits=4)
    bits = 4 + 2  # misc 4 + ⌈log₂ 3⌉
    assert m["extra_bits"] == bits and m["subsampled"]
    assert m["kl_divergence"] == pytest.approx((m["prefix_message_len"] + bits) * LN2, rel=1e-12)
    for row in m["per_alpha"]:
        want = _by_hand(row["empirical_bpd"], m["kl_divergence"], m["m"], m["n"], m["delta"], row["delta_range_bits"], bits)
        assert row["bound_value"] == pytest.approx(want, rel=1e-12)
    assert m["bound_value"] == min(r["bound_value"] for r in m["per_alpha"])
    assert m["top10_error_bound"] == pytest.approx(
        min(1.0, _by_hand(m["top10_error"], m["kl_divergence"], m["m"], m["n"], m["delta"], 1.0, bits)), rel=1e-12)
    split = m["delta_split"]
    assert split["occam"] + split["sampling"] == pytest.approx(m["delta"], rel=1e-15)
    assert split["choices"] == 2 ** bits and split["sampling_per_choice"] == pytest.approx(split["sampling"] / 2 ** bits)
    st = m["statement"]
    assert "r*delta" in st and "(1-r)*delta" in st and "union" in st and f"2^{bits} = {2 ** bits} choices" in st
    assert "3 values of alpha" in st and "misc_extra_bits = 4" in st
    write_metrics(m, tmp_path / "b.json")
    assert json.loads((tmp_path / "b.json").read_text())["delta_split"] == split


def test_statement_when_every_unit_is_scored(tiny):
    m = _bounds(tiny, bound_type="sequence_level", num_docs=10_000, alphas=[0.1], misc_extra_bits=0)
    assert not m["subsampled"] and m["n"] == m["m"]
    assert m["delta_split"]["sampling"] == 0.0 and m["delta_split"]["occam"] == m["delta"]
    assert "no sampling term" in m["statement"]
    row = m["per_alpha"][0]
    assert row["bound_value"] == pytest.approx(
        row["empirical_bpd"] + row["delta_range_bits"] * math.sqrt((m["kl_divergence"] + math.log(20)) / (2 * m["m"])), rel=1e-12)
    assert "no sampling term" in confidence_statement(5, 5, 0.05, 1, 0, 0)
