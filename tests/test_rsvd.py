"""rSVD-Adam: projected Adam vs AdamW, randomized vs exact SVD, SVT ranks, state sizes,
weight reduction, exact resume, GaLore parity and an end-to-end run."""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import math
import shutil
import sys
import types

import pytest
import torch

from conftest import make_cfg
from peftlab.optim import ProjectedAdamW, choose_rank, randomized_svd, state_size_formula
from peftlab.methods.rsvd import LowRankLinear, reduce_weights


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 4))


def _groups(model, **proj):
    w = [p for p in model.parameters() if p.ndim == 2]
    b = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": w, **proj}, {"params": b, "rank": None}]


def _spectrum_matrix(m, n, s, seed=0):
    """An m x n float64 matrix with singular values ``s`` (and zeros beyond)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64)).Q
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T


def _signed_perm_grad(shape, seed):
    """A gradient with orthogonal columns of distinct norms (rows >= cols) or orthogonal rows
    (rows < cols): its exact singular vectors are signed unit vectors, so a full-rank projector is
    a signed permutation."""
    m, n = shape
    g = torch.zeros(m, n)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(max(m, n), generator=gen)
    for j in range(min(m, n)):
        val = (j + 1.5) * (-1) ** j
        if m >= n:
            g[rows[j], j] = val
        else:
            g[j, rows[j]] = val
    return g


# ----------------------------------------------------------------------------- AdamW equivalence
def test_full_rank_exact_projection_equals_adamw():
    """rank = min(m, n), exact SVD, and a first gradient whose singular basis is the coordinate basis.

    Elementwise Adam is not invariant under rotations, so for a *generic* gradient the full-rank
    projected optimizer is a rotated Adam, not AdamW (see docs/rsvd.md). When the projector is a
    signed permutation the two must agree step for step, which checks the projection, the
    back-projection, the moments, bias correction, eps and decoupled weight decay together.
    Later gradients are generic; the projector (refreshed only at step 0) stays a signed permutation.
    """
    a, b = _mlp(), _mlp()
    opt_p = ProjectedAdamW(_groups(a, rank=10, svd="full", update_interval=1000), lr=1e-2, weight_decay=0.1, eps=1e-8)
    opt_a = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-8)
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(3))
    y = torch.randn(16, 4, generator=torch.Generator().manual_seed(4))
    for step in range(12):
        for model in (a, b):
            model.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            if step == 0:
                for i, p in enumerate(model.parameters()):
                    if p.ndim == 2:
                        p.grad = _signed_perm_grad(p.shape, i)
        opt_p.step()
        opt_a.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    # the projectors really were used (and are signed permutations)
    for p in a.parameters():
        if p.ndim == 2:
            proj = opt_p.state[p]["proj"]
            torch.testing.assert_close(proj.abs().sum(0), torch.ones(proj.shape[1]))


def test_full_rank_generic_gradients_first_moment_is_rotated_adamw():
    """With generic gradients and a full-rank exact projector P, the projected first moment is
    AdamW's first moment in the rotated basis (EMA is linear); the update is not (v is elementwise)."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(8, 5, generator=gen) for _ in range(6)]
    p1 = torch.nn.Parameter(torch.zeros(8, 5))
    p2 = torch.nn.Parameter(torch.zeros(8, 5))
    opt_p = ProjectedAdamW([{"params": [p1], "rank": 5, "svd": "full", "update_interval": 100}], lr=1e-3)
    opt_a = torch.optim.AdamW([p2], lr=1e-3, weight_decay=0.0)
    for g in grads:
        p1.grad, p2.grad = g.clone(), g.clone()
        opt_p.step()
        opt_a.step()
    proj = opt_p.state[p1]["proj"]  # 5 x 5, right singular vectors of the first gradient
    torch.testing.assert_close(opt_p.state[p1]["exp_avg"] @ proj, opt_a.state[p2]["exp_avg"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(p1, p2, atol=1e-6)


# ----------------------------------------------------------------------------- SVD
def test_randomized_and_exact_projection_agree_with_spectral_gap():
    s = [10.0, 8.0, 6.0, 5.0, 4.0] + [1e-3 * (1 + i / 50) for i in range(30)]
    a = _spectrum_matrix(60, 40, s, seed=1).float()
    k = 5
    u, sv, vh = randomized_svd(a, k, oversampling=5, power_iters=2, generator=torch.Generator().manual_seed(0))
    ue, se, vhe = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(sv[:k], se[:k], rtol=1e-5, atol=1e-5)
    # same subspaces: compare orthogonal projectors
    torch.testing.assert_close(vh[:k].T @ vh[:k], vhe[:k].T @ vhe[:k], atol=1e-5, rtol=0)
    torch.testing.assert_close(u[:, :k] @ u[:, :k].T, ue[:, :k] @ ue[:, :k].T, atol=1e-5, rtol=0)
    # and the optimizer steps agree (singular vectors are unique up to sign; Adam commutes with signs)
    params = [torch.nn.Parameter(torch.zeros(60, 40)), torch.nn.Parameter(torch.zeros(60, 40))]
    opts = [ProjectedAdamW([{"params": [params[0]], "rank": k, "svd": "randomized", "oversampling": 5}], lr=0.1),
            ProjectedAdamW([{"params": [params[1]], "rank": k, "svd": "full"}], lr=0.1)]
    for p, o in zip(params, opts):
        p.grad = a.clone()
        o.step()
    torch.testing.assert_close(params[0], params[1], atol=1e-4, rtol=1e-4)


def test_svt_rank_selection_matches_hand_computed_spectrum():
    s = torch.tensor([4.0, 2.0, 1.0, 0.5])  # energies 16, 4, 1, 0.25; total 21.25
    assert choose_rank(s, 4, "none", 0.1, 0.9) == 4
    assert choose_rank(s, 3, "none", 0.1, 0.9) == 3
    assert choose_rank(s, 4, "fixed_rank", 0.3, 0.9) == 2  # keep sigma >= 1.2
    assert choose_rank(s, 4, "fixed_rank", 0.25, 0.9) == 3  # sigma >= 1.0, inclusive
    assert choose_rank(s, 2, "fixed_rank", 0.1, 0.9) == 2  # cap
    assert choose_rank(s, 4, "fixed_rank", 1.0, 0.9) == 1
    assert choose_rank(s, 4, "rank_fraction", 0.1, 0.75) == 1  # 16 >= 15.94
    assert choose_rank(s, 4, "rank_fraction", 0.1, 0.9) == 2  # 20 >= 19.125 > 16
    assert choose_rank(s, 4, "rank_fraction", 0.1, 0.99) == 4  # 21 < 21.04 <= 21.25
    assert choose_rank(s, 4, "rank_fraction", 0.1, 0.9, total_energy=25.0) == 4  # 22.5 beyond the top 3 (21.0)
    assert choose_rank(s, 4, "rank_fraction", 0.1, 0.8, total_energy=25.0) == 2  # 20 >= 20 (inclusive)
    assert choose_rank(s, 4, "rank_fraction", 0.1, 0.82, total_energy=25.0) == 3  # 21 >= 20.5 > 20
    # the same through the optimizer, on a gradient with that spectrum
    g = _spectrum_matrix(12, 9, [4.0, 2.0, 1.0, 0.5], seed=2).float()
    for svt, kw, want in (("fixed_rank", {"svt_threshold": 0.3}, 2), ("rank_fraction", {"rank_fraction": 0.9}, 2),
                          ("rank_fraction", {"rank_fraction": 0.99}, 4), ("none", {}, 6)):
        p = torch.nn.Parameter(torch.zeros(12, 9))
        opt = ProjectedAdamW([{"params": [p], "rank": 6, "svd": "full", "svt": svt, **kw}], lr=0.1)
        p.grad = g.clone()
        opt.step()
        assert opt.ranks() == {0: want}, svt
        assert opt.state[p]["proj"].shape == (want, 9) and opt.state[p]["exp_avg"].shape == (12, want)


def test_svt_energy_rule_in_the_optimizer_uses_the_whole_gradient_energy():
    """rank_fraction where the optimizer calls it, on the randomized path, which computes only the top
    rank + oversampling singular values: the fraction is of ||G||_F^2 (here 16 + 4 + 7 x 1 = 27), not of
    the computed values' energy (16 + 4 + 1 + 1 = 22), so 0.75 keeps 3 directions (21 >= 20.25), not 2
    (20 >= 16.5), and 0.7 keeps 2 (20 >= 18.9), not 1 (16 >= 15.4)."""
    g = _spectrum_matrix(14, 10, [4.0, 2.0] + [1.0] * 7, seed=5).float()
    assert float(g.double().square().sum()) == pytest.approx(27.0, rel=1e-5)
    for fraction, want in ((0.75, 3), (0.7, 2)):
        p = torch.nn.Parameter(torch.zeros(14, 10))
        opt = ProjectedAdamW([{"params": [p], "rank": 3, "svd": "randomized", "oversampling": 1, "power_iters": 4,
                               "svt": "rank_fraction", "rank_fraction": fraction}], lr=0.1)
        p.grad = g.clone()
        opt.step()
        assert opt.ranks() == {0: want}, fraction


def test_svt_rank_change_keeps_shared_moment_coordinates():
    p = torch.nn.Parameter(torch.zeros(10, 6))
    opt = ProjectedAdamW([{"params": [p], "rank": 5, "svd": "full", "svt": "fixed_rank", "svt_threshold": 0.3,
                           "update_interval": 2}], lr=0.1)
    p.grad = _spectrum_matrix(10, 6, [4.0, 3.0, 2.0, 0.1], seed=3).float()  # rank 3 kept
    opt.step()
    p.grad = _spectrum_matrix(10, 6, [4.0, 3.0, 2.0, 0.1], seed=3).float()
    opt.step()
    before = opt.state[p]["exp_avg"].clone()
    p.grad = _spectrum_matrix(10, 6, [4.0, 0.1], seed=4).float()  # refresh: rank 1
    opt.step()
    assert opt.ranks() == {0: 1}
    assert opt.state[p]["exp_avg"].shape == (10, 1)
    proj = opt.state[p]["proj"]
    want = 0.9 * before[:, :1] + 0.1 * (p.grad @ proj.T)
    torch.testing.assert_close(opt.state[p]["exp_avg"], want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- state size
def test_optimizer_state_size_equals_formula():
    shapes = [(30, 20), (20, 30), (8, 8), (64, 3)]
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    bias = torch.nn.Parameter(torch.randn(11))
    opt = ProjectedAdamW([{"params": params, "rank": 5}, {"params": [bias], "rank": None}], lr=1e-3)
    for p in [*params, bias]:
        p.grad = torch.randn_like(p)
    opt.step()
    for p, s in zip(params, shapes):
        f = state_size_formula(s, 5)
        got = sum(v.numel() * v.element_size() for v in opt.state[p].values())
        assert got == f["moments"] + f["projector"] + f["step"], s
    # (30, 20) at rank 5: moments 2 * 30 * 5 floats, projector 20 * 5 floats
    assert state_size_formula((30, 20), 5) == {"moments": 1200, "projector": 400, "step": 4}
    assert sum(v.numel() * v.element_size() for v in opt.state[bias].values()) == 2 * 11 * 4 + 4
    total = sum(sum(state_size_formula(s, 5).values()) for s in shapes) + 2 * 11 * 4 + 4
    assert opt.state_bytes() == total


# ----------------------------------------------------------------------------- weight reduction
def test_weight_reduction_error_is_spectral_tail():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 30, generator=g)
    k = 7
    s = torch.linalg.svdvals(w.double())
    tail = float((s[k:] ** 2).sum())
    exact = LowRankLinear(w, None, k, svd="full")
    err = float(((w.double() - exact.weight_u.double() @ exact.weight_v.double()) ** 2).sum())
    assert err == pytest.approx(tail, rel=1e-4)
    # randomized: never better than the optimum, close to it with power iterations
    rnd = LowRankLinear(w, None, k, svd="randomized", oversampling=10, power_iters=4, generator=torch.Generator().manual_seed(0))
    err_r = float(((w.double() - rnd.weight_u.double() @ rnd.weight_v.double()) ** 2).sum())
    assert tail * (1 - 1e-5) <= err_r <= tail * 1.05
    # forward equals x W_k^T + b
    b = torch.randn(40)
    mod = LowRankLinear(w, b, k, svd="full")
    x = torch.randn(3, 30)
    torch.testing.assert_close(mod(x), x @ (mod.weight_u @ mod.weight_v).T + b)
    torch.testing.assert_close(mod.dense()(x), mod(x), rtol=1e-5, atol=1e-5)
    # GPT-2's Conv1D stores (in, out); reduction and densified export keep that orientation
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(40, 30)
    with torch.no_grad():
        conv.weight.copy_(w.T)
        conv.bias.copy_(b)
    low = LowRankLinear(conv.weight.T, conv.bias, 30, svd="full", conv1d=True)  # full rank: same function
    torch.testing.assert_close(low(x), conv(x), rtol=1e-4, atol=1e-4)
    dense = low.dense()
    assert isinstance(dense, Conv1D)
    torch.testing.assert_close(dense(x), conv(x), rtol=1e-4, atol=1e-4)


def test_weight_reduction_targets_bert_feed_forward_only():
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(
        "bert", vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=2))
    from peftlab.methods.rsvd import FFN_PATTERNS

    recs = reduce_weights(model, FFN_PATTERNS["bert"], 4, svd="full")
    names = sorted(r["module"] for r in recs)
    assert names == ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense",
                     "bert.encoder.layer.1.intermediate.dense", "bert.encoder.layer.1.output.dense"]
    assert all(r["params_after"] == 4 * 48 for r in recs)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()


# ----------------------------------------------------------------------------- resume
def test_state_dict_roundtrip_resumes_exactly(tmp_path):
    kw = dict(rank=3, svd="randomized", update_interval=3, svt="rank_fraction", rank_fraction=0.8, oversampling=2, power_iters=1)
    gen = torch.Generator().manual_seed(0)
    grads = [[torch.randn(7, 5, generator=gen), torch.randn(7, generator=gen), torch.randn(4, 7, generator=gen),
              torch.randn(4, generator=gen)] for _ in range(10)]
    a = _mlp()
    opt_a = ProjectedAdamW(_groups(a, **kw), lr=1e-2, weight_decay=0.01, seed=11)

    def step(model, opt, gs):
        for p, g in zip(model.parameters(), gs):
            p.grad = g.clone()
        opt.step()

    for gs in grads[:4]:
        step(a, opt_a, gs)
    torch.save(opt_a.state_dict(), tmp_path / "opt.pt")
    b = _mlp(seed=99)
    with torch.no_grad():
        for pb, pa in zip(b.parameters(), a.parameters()):
            pb.copy_(pa)
    opt_b = ProjectedAdamW(_groups(b, **kw), lr=1e-2, weight_decay=0.01, seed=11)
    opt_b.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for gs in grads[4:]:  # crosses refreshes at steps 6 and 9
        step(a, opt_a, gs)
        step(b, opt_b, gs)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert all(torch.equal(opt_a.state[pa]["exp_avg"], opt_b.state[pb]["exp_avg"]) for pa, pb in zip(a.parameters(), b.parameters()))


# ----------------------------------------------------------------------------- GaLore parity
def _galore_adamw():
    """GaLoreAdamW from galore-torch without importing its package __init__ (which needs bitsandbytes)."""
    spec = importlib.util.find_spec("galore_torch")
    if spec is None or not spec.submodule_search_locations:  # a test dependency: scripts/install.sh installs it
        pytest.fail("galore-torch is not installed; run `pip install --no-deps galore-torch==1.0` (scripts/install.sh does)")
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "galore_torch" or k.startswith("galore_torch.")}
    pkg = types.ModuleType("galore_torch")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["galore_torch"] = pkg
    try:
        return importlib.import_module("galore_torch.adamw").AdamW
    except ImportError as e:  # pragma: no cover
        pytest.fail(f"galore-torch does not import: {e}")
    finally:
        for k in [k for k in sys.modules if k == "galore_torch" or k.startswith("galore_torch.")]:
            del sys.modules[k]
        sys.modules.update(saved)


@pytest.mark.parametrize("shape,wd,eps", [((24, 16), 0.0, 1e-12), ((16, 24), 0.0, 1e-12), ((16, 16), 0.0, 1e-12),
                                          ((24, 16), 0.1, 1e-3), ((16, 24), 0.1, 1e-3), ((16, 16), 0.1, 1e-3)])
def test_full_svd_matches_galore_adamw(shape, wd, eps):
    """Parity with GaLore's AdamW (proj_type std) on tall, wide and square matrices, with weight
    decay and a large epsilon. Two conventions differ, by design, and are mapped here exactly:
    peftlab follows torch.optim.AdamW, where eps is added to sqrt(v / bc2) (GaLore adds it to sqrt(v):
    GaLore's eps at step k is eps * sqrt(bc2_k)), and decoupled decay scales the weights before the
    update (GaLore decays after it: ours is GaLore without decay, preceded by p *= 1 - lr * wd)."""
    GaLoreAdamW = _galore_adamw()
    lr, b2 = 1e-2, 0.999
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(*shape, generator=gen)
    grads = [torch.randn(*shape, generator=gen) for _ in range(7)]
    p_ours, p_ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ours = ProjectedAdamW([{"params": [p_ours], "rank": 4, "svd": "full", "update_interval": 3, "scale": 0.25}],
                          lr=lr, eps=eps, weight_decay=wd)
    ref = GaLoreAdamW([{"params": [p_ref], "rank": 4, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std"}],
                      lr=lr, eps=eps, weight_decay=0.0, no_deprecation_warning=True)
    for k, g in enumerate(grads, start=1):  # refreshes at steps 0, 3, 6
        p_ours.grad, p_ref.grad = g.clone(), g.clone()
        ours.step()
        ref.param_groups[0]["eps"] = eps * math.sqrt(1 - b2 ** k)
        with torch.no_grad():
            p_ref.mul_(1 - lr * wd)
        ref.step()
        torch.testing.assert_close(p_ours, p_ref, rtol=1e-5, atol=1e-6)
    if wd or eps > 1e-6:  # the mapping matters: without it the runs part
        p_plain = torch.nn.Parameter(w0.clone())
        plain = GaLoreAdamW([{"params": [p_plain], "rank": 4, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std"}],
                            lr=lr, eps=eps, weight_decay=wd, no_deprecation_warning=True)
        for g in grads:
            p_plain.grad = g.clone()
            plain.step()
        assert (p_plain - p_ours).abs().max() > 1e-5


# ----------------------------------------------------------------------------- end to end
def test_rsvd_end_to_end_with_svt_and_weight_reduction(tmp_path, run_train):
    cfg = make_cfg(tmp_path, "cls", method="rsvd", rsvd__rank=4, rsvd__update_interval=5, rsvd__svt="rank_fraction",
                   rsvd__rank_fraction=0.8, rsvd__weight_reduction_rank=8, training__learning_rate=1e-3)
    res = run_train(cfg)
    run = tmp_path / "run"
    assert res["status"] == "completed" and res["global_step"] == 12
    summ = res["method_summary"]
    assert summ["projected_matrices"] == 8  # tiny-bert: q, k, v, attention.output.dense in 2 layers
    assert summ["weight_reduction"]["modules"] == 4 and summ["weight_reduction"]["params_after"] == 4 * 8 * (64 + 128)
    rows = list(csv.DictReader(open(run / "svt_ranks.csv")))
    assert [int(r["step"]) for r in rows] == [1, 6, 11]
    ranks = [int(v) for r in rows for k, v in r.items() if k.endswith(".weight")]
    assert ranks and all(1 <= r <= 4 for r in ranks)
    assert len(rows[0]) == 3 + 8
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(run / "model")
    assert isinstance(model.bert.encoder.layer[0].intermediate.dense, torch.nn.Linear)
    assert json.loads((run / "model" / "weight_reduction.json").read_text())[0]["rank"] == 8


def test_rsvd_training_resume_is_exact(tmp_path, run_train):
    from safetensors.torch import load_file

    over = dict(method="rsvd", rsvd__rank=4, rsvd__update_interval=4, rsvd__svt="fixed_rank", rsvd__svt_threshold=0.3,
                training__save_steps=6, training__max_steps=10, training__learning_rate=1e-3)
    run_train(make_cfg(tmp_path / "a", "cls", **over))
    a = tmp_path / "a" / "run"
    b = tmp_path / "b" / "run"
    shutil.copytree(a, b)
    for f in ("results_final.json",):
        (b / f).unlink()
    shutil.rmtree(b / "model")
    # the kill happened right after step 6: later checkpoints and rows of the rank log are gone
    for c in (b / "checkpoints").iterdir():
        if c.name != "step-6":
            shutil.rmtree(c)
    run_train(make_cfg(tmp_path / "b", "cls", training__resume_from="step-6", **over))
    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "svt_ranks.csv").read_text() == (b / "svt_ranks.csv").read_text()


def test_config_errors_are_reported(tmp_path):
    from peftlab.errors import ConfigError, PeftlabError
    from peftlab.methods.rsvd import RSVD
    from peftlab.methods.base import MethodContext

    with pytest.raises(ConfigError, match="rsvd.rank_fraction.*got 1.5"):
        make_cfg(tmp_path, "cls", method="rsvd", rsvd__rank_fraction=1.5)
    with pytest.raises(ConfigError, match="weight_reduction_rank` is null"):
        make_cfg(tmp_path, "cls", method="rsvd", rsvd__weight_reduction_targets="*.ffn.*")
    with pytest.raises(ConfigError, match="rsvd.svt.*rank_fraction"):
        make_cfg(tmp_path, "cls", method="rsvd", rsvd__svt="rank_fractoin")
    cfg = make_cfg(tmp_path, "cls", method="rsvd", rsvd__weight_reduction_rank=4, rsvd__weight_reduction_targets="*.nothing")
    from peftlab.models import load_model

    model, _, _ = load_model(cfg, "classification", 2)
    with pytest.raises(PeftlabError, match="matches no linear layer.*intermediate.dense"):
        RSVD(MethodContext(cfg=cfg, task="classification", target_modules=[])).apply(model)
