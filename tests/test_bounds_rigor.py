"""Rigor of the bounds (issue 24): the union over choices in both terms, mutation-catching tests
of k-means, QAT, the sequence count and the projectors, projector checksums and the gate codebook."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import TrainableTensors
from peftlab.bounds import formulas as F
from peftlab.bounds.config import bounds_config
from peftlab.bounds.evaluate import (
    bound_table,
    compute_bounds,
    confidence_statement,
    delta_split,
    write_metrics,
)
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
    V, m, delta, bits = 49_152, 2_640_067, 0.05, 10
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


def _bounds(tiny, **kw):
    model, run_cfg, d = tiny
    base = {"bounds.progress_bar": False, "bounds.full_precision_units": 0, "bounds.bound_type": "token_level",
            "bounds.num_docs": 300, "bounds.levels": 5}
    base.update({f"bounds.{k}": v for k, v in kw.items()})
    return compute_bounds(model, TrainableTensors(), run_cfg, bounds_config(base), d, torch.device("cpu"), log=lambda s: None)


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


# ------------------------------------------------------------------ item 4: k-means against a hand-worked example


def test_kmeans_moves_the_bin_means_to_a_lloyd_fixed_point():
    from peftlab.bounds.quantize import quantize

    # 3 equal-width bins on ±10: [-10, -3.33), [-3.33, 3.33), [3.33, 10]. Bin means: bin 0 empty (its centre
    # -6.667), bin 1 (six zeros and 3.2) 3.2/7 = 0.457, bin 2 (3.4, 3.5, 10) 5.633. Lloyd, step 1: the midpoint
    # of 0.457 and 5.633 is 3.045, so 3.2 joins cluster 2: centres 0 and (3.2+3.4+3.5+10)/4 = 5.025; step 2
    # changes nothing (midpoint 2.5125). Without the iterations the codebook would stay at the bin means.
    vec = np.array([0.0] * 6 + [3.2, 3.4, 3.5, 10.0])
    top = 10.0 * (1 + 1e-7) + 1e-12
    binned = quantize(vec, 3)
    assert binned.codebook.tolist() == np.array([-2 * top / 3, 3.2 / 7, (3.4 + 3.5 + 10) / 3], dtype=np.float16).tolist()
    assert binned.symbols.tolist() == [1] * 7 + [2] * 3
    km = quantize(vec, 3, use_kmeans=True)
    assert km.codebook.tolist() == np.array([-2 * top / 3, 0.0, 5.025], dtype=np.float16).tolist()
    assert km.symbols.tolist() == [1] * 6 + [2] * 4
    # a fixed point: every non-empty centroid is the mean of its members (to fp16)
    for k in (1, 2):
        assert float(km.codebook[k]) == pytest.approx(vec[km.symbols == k].mean(), abs=2e-3)
    assert float(np.mean((km.values() - vec) ** 2)) < float(np.mean((binned.values() - vec) ** 2))


# ------------------------------------------------------------------ item 4: QAT against a float64 reference


def _qat_reference(w, codebook, target, lr, iters):
    """Straight-through SGD on loss = Σ (q(w) − t)², written out in float64: the forward sees the nearest centroid,
    ∂loss/∂w_i = 2(q_i − t_i) goes straight to w_i, and centroid k gets the sum over its members."""
    w = np.asarray(w, dtype=np.float64).copy()
    cb = np.asarray(codebook, dtype=np.float64).copy()
    for _ in range(iters):
        order = np.argsort(cb, kind="stable")
        mids = (cb[order][1:] + cb[order][:-1]) / 2
        sym = order[np.searchsorted(mids, w, side="left")]
        g = 2.0 * (cb[sym] - target)
        w = w - lr * g
        cb = cb - lr * np.bincount(sym, weights=g, minlength=len(cb))
    return w, cb


def _run_qat(w0, target, levels, lr, iters):
    from peftlab.bounds.quantize import quantization_aware_training, quantize

    p = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float32))
    t = torch.tensor(target, dtype=torch.float32)
    q0 = quantize(np.asarray(w0, dtype=np.float64), levels)
    q = quantization_aware_training({"p": p}, q0, lambda: ((p - t) ** 2).sum(), iters, lr)
    return q0, q, p.detach().double().numpy()


def test_qat_one_step_by_hand():
    # w = (-1, -0.9, 0.9, 1), 2 levels: codebook fp16(∓0.95) = ∓0.9501953125; t = 0, lr = 0.1.
    # g = 2·q = (-1.900390625, -1.900390625, 1.900390625, 1.900390625); w ← w − 0.1·g = (-0.80996, -0.70996,
    # 0.70996, 0.80996) (the gradient reaches w); centroid 0 ← -0.9501953125 + 0.1·2·1.900390625 = -0.5701171875
    # (the centroids move), rounded to fp16: -0.5703125.
    q0, q, w = _run_qat([-1.0, -0.9, 0.9, 1.0], [0.0] * 4, 2, 0.1, 1)
    assert q0.codebook.tolist() == [-0.9501953125, 0.9501953125]
    np.testing.assert_allclose(w, [-0.809960938, -0.709960938, 0.709960938, 0.809960938], atol=1e-6)
    assert q.codebook.tolist() == [-0.5703125, 0.5703125]
    assert q.symbols.tolist() == [0, 0, 1, 1]


def test_qat_matches_the_float64_reference_over_several_steps():
    from peftlab.bounds.quantize import assign

    rng = np.random.default_rng(4)
    w0 = rng.normal(0, 1, 40)
    target = rng.normal(0.3, 1.5, 40)
    q0, q, w = _run_qat(w0, target, 5, 0.05, 6)
    ref_w, ref_cb = _qat_reference(w0, q0.codebook.astype(np.float64), target, 0.05, 6)
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-5)  # the parameter holds the refined weights
    np.testing.assert_array_equal(q.codebook, ref_cb.astype(np.float16))
    np.testing.assert_array_equal(q.symbols, assign(ref_w, ref_cb.astype(np.float16)))
    assert not np.allclose(w, w0) and not np.array_equal(q.codebook, q0.codebook)


# ------------------------------------------------------------------ item 4: the sequence count at N ≡ 0 (mod C)


@pytest.mark.parametrize("N,C,want", [(256, 64, 3), (257, 64, 4), (258, 64, 4), (64, 64, 0), (65, 64, 1), (10, 64, 0), (1, 1, 0), (2, 1, 1)])
def test_sequence_count_at_multiples_of_the_context(N, C, want):
    from peftlab.bounds.scoring import num_sequences, sequence_rows

    # chunk j reads train[jC : jC+C] and predicts train[jC+1 : jC+C+1]: it needs jC + C + 1 <= N tokens
    assert num_sequences(N, C) == want
    m = num_sequences(N, C)
    if m:
        rows = sequence_rows(np.arange(m), C)
        assert int((rows.start + rows.length).max()) + 1 <= N  # the last target exists
        assert (m + 1) * C + 1 > N  # and one more chunk would not fit


# ------------------------------------------------------------------ item 4: projectors pinned, kron permutation, QR signs

#: SHA-256 of the float32 bytes of the materialised D×d matrix of a small projector of each kind (seed 137).
#: These pin torch's random functions (randn, randperm, randint on a seeded CPU generator), LAPACK's QR as
#: torch calls it, and the projector code: a failure means a projector now differs from the one runs were
#: trained with (compute once with ``make_projector(kind, D, d, 137, allow_wide=True).matrix()``).
PINNED = {
    ("dense", 12, 4): "ef058dae84fbaf3d38bc992c1bb9b288d85eaa64156c3e5b7ad51a577434a1ac",
    ("kron", 30, 6): "7113d6f33d820d9505adc01b9a7d5a6a0f7c280848cdf8edc52765300d757b42",  # 5×2 factors, 5×2 remainder
    ("hashed", 20, 6): "aa4d99622bcf94155d5c02c060ec29632b4af4576da26328d2c95e45cd6244c6",
    ("kron", 6, 30): "51e63bc7fa6a69cdf538a2e45e157ffafec4b28b00a1c2e553c2d94a1a14df85",  # wide: the transpose of a 30×6
}


@pytest.mark.parametrize("kind,D,d", list(PINNED))
def test_projector_reference_checksum(kind, D, d):
    import hashlib

    from peftlab.methods.sublora.projectors import make_projector

    P = make_projector(kind, D, d, 137, allow_wide=True).matrix().contiguous()
    assert P.shape == (D, d) and P.dtype == torch.float32
    assert hashlib.sha256(P.numpy().tobytes()).hexdigest() == PINNED[(kind, D, d)]


def _block_diag(a, b):
    out = torch.zeros(a.shape[0] + b.shape[0], a.shape[1] + b.shape[1], dtype=a.dtype)
    out[:a.shape[0], :a.shape[1]] = a
    out[a.shape[0]:, a.shape[1]:] = b
    return out


def test_kron_projector_is_the_permuted_kronecker_sum():
    from peftlab.methods.sublora.projectors import make_projector

    p = make_projector("kron", 30, 6, 137)
    assert (p.D1, p.d1, p.Dr, p.dr) == (5, 2, 5, 2)
    inner = _block_diag(torch.kron(p.Q1.double(), p.Q2.double()), p.R.double())  # (Q1 ⊗ Q2) ⊕ R
    P = p.matrix().double()
    torch.testing.assert_close(P, inner[p.perm], rtol=0, atol=1e-6)  # the rows are permuted by Π
    assert not torch.equal(p.perm, torch.arange(30))
    assert (P - inner).abs().max() > 0.1  # without Π it is another matrix


@pytest.mark.parametrize("rows,cols", [(12, 4), (5, 2), (7, 7)])
def test_qr_factors_have_positive_r_diagonal(rows, cols):
    """Q is the unique QR factor of the seeded Gaussian: R = QᵀM upper triangular with a positive diagonal."""
    from peftlab.methods.sublora.projectors import _gen, _orthonormal

    q = _orthonormal(rows, cols, _gen(11)).double()
    m = torch.randn(rows, cols, generator=_gen(11), dtype=torch.float64)  # the same draw
    r = q.T @ m
    assert (torch.diagonal(r) > 0).all(), torch.diagonal(r)
    torch.testing.assert_close(torch.tril(r, -1), torch.zeros_like(r), rtol=0, atol=1e-5)
    torch.testing.assert_close(q @ r, m, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ defect 2: P itself is checked on rebuild


def _sublora(tmp_path, structure=None, **over):
    from conftest import make_cfg

    from peftlab.methods import METHODS, MethodContext
    from peftlab.models import load_model

    over.setdefault("sublora__intrinsic_dim", 24)
    cfg = make_cfg(tmp_path, method="sublora", **over)
    model, _, info = load_model(cfg, "causal_lm")
    m = METHODS["sublora"](MethodContext(cfg=cfg, task="causal_lm", target_modules=info.target_modules))
    wrapped = m.apply(model, structure=structure)
    with torch.no_grad():
        wrapped.w.copy_(torch.linspace(-0.5, 0.5, wrapped.w.numel()))
    return m, wrapped.eval()


def _drop_kron_permutation(self, w):
    """KroneckerProjector.forward without the row permutation Π (the audit's silent mutation)."""
    dt, n = w.dtype, self.d1 * self.d1
    parts = []
    if n:
        parts.append((self.Q1.to(dt) @ w[:n].view(self.d1, self.d1) @ self.Q2.to(dt).T).reshape(-1))
    if self.Dr:
        parts.append(self.R.to(dt) @ w[n:])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def test_fingerprint_tells_projectors_apart():
    from peftlab.methods.sublora.projectors import (
        FINGERPRINT_RTOL,
        KroneckerProjector,
        fingerprint,
        fingerprint_difference,
        make_projector,
    )

    for kind in ("kron", "hashed", "dense"):
        a = fingerprint(make_projector(kind, 300, 40, 137))
        assert len(a) == 16 and fingerprint_difference(a, fingerprint(make_projector(kind, 300, 40, 137))) == 0.0
        assert fingerprint_difference(a, fingerprint(make_projector(kind, 300, 40, 138))) > 0.3
        # float64 from the dense matrix (another summation order) agrees to rounding
        P = make_projector(kind, 300, 40, 137).matrix().double()
        from peftlab.methods.sublora.projectors import _sketch, probe_vector

        assert fingerprint_difference(a, (_sketch(P @ probe_vector(40), 16) / math.sqrt(300)).tolist()) < 1e-6
    p = make_projector("kron", 300, 40, 137)
    a = fingerprint(p)
    p.forward = _drop_kron_permutation.__get__(p, KroneckerProjector)
    assert fingerprint_difference(a, fingerprint(p)) > 100 * FINGERPRINT_RTOL


@pytest.mark.parametrize("mode,projector", [("uniform", "kron"), ("fixed", "hashed"), ("learned", "kron")])
def test_rebuild_verifies_the_projectors(tmp_path, mode, projector):
    import warnings as _w

    m, model = _sublora(tmp_path, sublora__allocation_mode=mode, sublora__projector=projector)
    record = json.loads(json.dumps(m.structure(model)))  # through JSON, as method.json
    assert len(record["projector_fingerprints"]) == len(record["blocks"])
    with _w.catch_warnings():
        _w.simplefilter("error")  # a verified rebuild warns about nothing
        _, model2 = _sublora(tmp_path, structure=record)
    ids = torch.arange(12)[None] % 200
    assert torch.equal(model2(input_ids=ids).logits, model(input_ids=ids).logits)


def test_rebuild_refuses_a_projector_that_changed(tmp_path, monkeypatch):
    from peftlab.errors import PeftlabError
    from peftlab.methods.sublora import projectors

    m, model = _sublora(tmp_path)
    record = json.loads(json.dumps(m.structure(model)))
    with monkeypatch.context() as mp:  # the projector code changed: no permutation at rebuild
        mp.setattr(projectors.KroneckerProjector, "forward", _drop_kron_permutation)
        with pytest.raises(PeftlabError, match=r"projector 0 \(kron, side all, D=.*seed 137\) rebuilt from the recorded seed is not"):
            _sublora(tmp_path, structure=record)
    with monkeypatch.context() as mp:  # torch's random functions changed: another stream for the same seed
        mp.setattr(projectors, "_gen", lambda seed: torch.Generator().manual_seed(int(seed) + 1))
        with pytest.raises(PeftlabError, match="torch's random functions"):
            _sublora(tmp_path, structure=record)
    bad = json.loads(json.dumps(record))
    bad["projector_fingerprints"][0][3] += 0.01
    with pytest.raises(PeftlabError, match="fingerprint differs by"):
        _sublora(tmp_path, structure=bad)


def test_old_record_without_fingerprints_loads_with_a_warning(tmp_path):
    from peftlab.methods.sublora.method import UnverifiedProjectorWarning

    m, model = _sublora(tmp_path, sublora__allocation_mode="fixed")
    record = json.loads(json.dumps(m.structure(model)))
    del record["projector_fingerprints"]
    with pytest.warns(UnverifiedProjectorWarning, match="cannot be verified"):
        m2, model2 = _sublora(tmp_path, structure=record)
    assert len(m2.structure(model2)["projector_fingerprints"]) == 2  # the rebuilt record holds them again
    ids = torch.arange(12)[None] % 200
    assert torch.equal(model2(input_ids=ids).logits, model(input_ids=ids).logits)


def test_load_run_refuses_a_changed_projector(tmp_path, run_train, monkeypatch):
    from conftest import make_cfg

    from peftlab.errors import PeftlabError
    from peftlab.methods.sublora import projectors
    from peftlab.runs import load_run

    run_train(make_cfg(tmp_path, method="sublora", sublora__intrinsic_dim=24, training__max_steps=2, logging__progress_bar=False))
    run = tmp_path / "run"
    assert "projector_fingerprints" in json.loads((run / "method.json").read_text())
    load_run(run, "final")  # verified
    monkeypatch.setattr(projectors.KroneckerProjector, "forward", _drop_kron_permutation)
    with pytest.raises(PeftlabError, match="is not the one the run was trained with"):
        load_run(run, "final")


# ------------------------------------------------------------------ defect 3: the gates φ get their own codebook


def _learned_with_large_gates(tmp_path):
    m, model = _sublora(tmp_path, sublora__allocation_mode="learned", sublora__intrinsic_dim=64)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        model.w.copy_(torch.randn(64, generator=g) * 0.05)  # max|w| ≈ 0.12
        model.phi.copy_(torch.tensor([3.0, -2.5]))  # |φ| ≫ max|w|: γ = 0.95 and 0.08
    return m, model


def test_learned_gates_do_not_take_the_levels_of_w(tmp_path):
    from peftlab.bounds.evaluate import compress, compression_groups

    m, model = _learned_with_large_gates(tmp_path)
    state = m.compressible_state(model)
    assert list(state) == ["w", "phi"] and compression_groups(m, state) == [["w"], ["phi"]]
    c = bounds_config({"bounds.levels": 11})
    shared = compress(state, c, groups=[["w", "phi"]])  # one codebook on ±3 (what the bound did before)
    split = compress(state, c, groups=compression_groups(m, state))
    w = state["w"].double()
    # one codebook: 11 bins of width 6/11 ≈ 0.55 on ±3, so all of w falls into the one or two bins around 0
    assert len(torch.unique(shared.state["w"])) <= 2
    assert len(torch.unique(split.state["w"])) == 11  # its own codebook on ±max|w|: w keeps every level
    mse_shared = float(((shared.state["w"].double() - w) ** 2).mean())
    mse_split = float(((split.state["w"].double() - w) ** 2).mean())
    assert mse_split < mse_shared / 20
    # the gates: 2 numbers, 2 levels (group_levels), two equal-width bins on ±3: each its own centroid
    assert split.groups[1].quantized.levels == 2
    assert split.state["phi"].tolist() == [3.0, -2.5]
    # the message counts both codes, each prefix-free: K = Σ (ℓ_g + 2·log₂ ℓ_g)
    gw, gp = split.groups
    assert gw.message_bits == F.message_length_bits(gw.coded_bits, 11, 64)
    assert gp.message_bits == F.message_length_bits(gp.coded_bits, 2, 2)
    assert split.message_bits == gw.message_bits + gp.message_bits
    assert split.prefix_bits == pytest.approx(F.prefix_free_length(gw.message_bits) + F.prefix_free_length(gp.message_bits), rel=1e-15)
    assert split.kl_nats == pytest.approx((split.prefix_bits + split.extra_bits) * LN2, rel=1e-15)
    assert split.coded_bits == gw.coded_bits + gp.coded_bits and split.d == 66


def test_one_group_is_the_old_code(tiny):
    """A single group gives exactly the single-codebook numbers: ℓ = coded + 16·L + L·⌈log₂ d⌉, K = ℓ + 2·log₂ ℓ."""
    from peftlab.bounds.evaluate import compress

    model, _, _ = tiny
    state = {n: p.detach() for n, p in model.named_parameters()}
    comp = compress(state, bounds_config({"bounds.levels": 11}))
    assert len(comp.groups) == 1 and comp.groups[0].tensors == list(state)
    assert comp.message_bits == F.message_length_bits(comp.coded_bits, 11, comp.d)
    assert comp.prefix_bits == F.prefix_free_length(comp.message_bits)


@pytest.mark.parametrize("quant_iters", [0, 2])
def test_bounds_of_a_learned_run_code_the_gates_apart(tmp_path, tiny, quant_iters):
    _, run_cfg, d = tiny
    m, model = _learned_with_large_gates(tmp_path)
    c = bounds_config({"bounds.progress_bar": False, "bounds.full_precision_units": 0, "bounds.bound_type": "token_level",
                       "bounds.num_docs": 100, "bounds.quant_iters": quant_iters, "bounds.quant_lr": 1e-4})
    out = compute_bounds(model, m, run_cfg, c, d, torch.device("cpu"), log=lambda s: None)
    groups = out["compression_groups"]
    assert [g["tensors"] for g in groups] == [["w"], ["phi"]]
    assert [g["levels"] for g in groups] == [11, 2] and [g["numbers"] for g in groups] == [64, 2]
    assert out["compressed_size_bits"] == groups[0]["message_bits"] + groups[1]["message_bits"]
    assert out["prefix_message_len"] == pytest.approx(groups[0]["prefix_bits"] + groups[1]["prefix_bits"], rel=1e-15)
    assert out["kl_divergence"] == pytest.approx((out["prefix_message_len"] + out["extra_bits"]) * LN2, rel=1e-12)
    assert len(torch.unique(model.w.detach())) == 11  # the scored (quantized) model: w kept its 11 levels
    assert len(torch.unique(model.phi.detach())) == 2


def test_quantization_error_after_qat_is_against_the_refined_weights():
    """Item 5: the error reported after QAT compares the quantized vector with the refined weights, not the pre-QAT ones."""
    from peftlab.bounds.evaluate import compress

    state = {"w": torch.linspace(-1, 1, 50), "phi": torch.tensor([2.0, -1.0])}
    refined = {"w": state["w"] * 0.5, "phi": state["phi"]}
    comp = compress(state, bounds_config({"bounds.levels": 5}), refine=lambda qs: (qs, refined), groups=[["w"], ["phi"]])
    q = torch.cat([comp.state["w"], comp.state["phi"]]).double()
    ref = torch.cat([refined["w"], refined["phi"]]).double()
    assert comp.mse == pytest.approx(float(((q - ref) ** 2).mean()), rel=1e-12)
    assert comp.max_abs == 2.0
