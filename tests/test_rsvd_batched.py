"""rSVD-Adam's batched (multi-tensor) step and refresh against the per-matrix loop: same seeded test
matrices, same subspaces and SVT ranks, same updates up to rounding, interchangeable state."""

from __future__ import annotations

import pytest
import torch

from peftlab.optim import projected_adam as pa
from peftlab.optim import ProjectedAdamW, randomized_svd

SHAPES = [(12, 8), (12, 8), (8, 12), (12, 8), (8, 12), (9, 9), (9, 9), (12, 8)]  # tall, wide, square; repeats batch


def _decaying(m, n, rank, gen, dtype=torch.float32):
    """A gradient-like matrix: ``rank`` strong directions of decaying size, then weak directions that
    still decay by half each. Every singular value is well separated from the next, so the top-k
    subspace is unique for every k and two correct SVD paths agree on it to rounding (with pure
    noise as the weak part, the directions after the strong ones are ill-defined and rounding
    differences between torch builds turn into O(1e-2) differences in the update)."""
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
    s = torch.tensor([3.0 * 0.7**i if i < rank else 1e-2 * 0.5 ** (i - rank) for i in range(k)], dtype=torch.float64)
    return ((u * s) @ v.T).to(dtype)


def _run(batched, steps=8, *, dtype=torch.float32, svd="randomized", svt="none", interval=3, skip=True, fused_cpu=False,
         wd=0.1, state=None, start=0, matmul="bmm"):
    """Projected and plain parameters trained on fixed gradients. ``skip``: one matrix has no
    gradient at step 1, so its step count lags the others of its shape (a separate bucket)."""
    gen = torch.Generator().manual_seed(0)
    mats = [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=dtype)) for s in SHAPES]
    plain = [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=dtype)) for s in ((5,), (3, 4), (7,))]
    opt = ProjectedAdamW([{"params": mats, "rank": 4, "svd": svd, "svt": svt, "svt_threshold": 0.3, "rank_fraction": 0.9},
                          {"params": plain[:2], "rank": None}, {"params": plain[2:], "rank": None, "weight_decay": 0.0}],
                         lr=1e-2, weight_decay=wd, update_interval=interval, oversampling=3, seed=5, batched=batched)
    if fused_cpu:
        opt._fused_devices = ("cpu",)
    opt._matmul = matmul
    if state is not None:
        opt.load_state_dict(state)
        with torch.no_grad():
            for p, w in zip(mats + plain, state["weights"]):
                p.copy_(w)
    ranks = []
    for step in range(start, steps):
        g = torch.Generator().manual_seed(100 + step)
        for i, p in enumerate(mats):
            # a different number of strong directions per matrix and step: SVT picks different ranks in one shape
            p.grad = _decaying(*p.shape, 1 + (i + step) % 4, g, dtype)
        for p in plain:
            p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
        if skip and step == 1:
            mats[1].grad = None
        opt.step()
        ranks.append(dict(opt.last_refresh))
    return mats + plain, opt, ranks


def _close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- the refresh
def test_batched_randomized_svd_equals_per_matrix_in_float64():
    """Matrix i of a batch gets the test matrix of its own generator: U, S, Vh equal the per-matrix
    randomized SVD (same algorithm, float64) to rounding, including the oversampled directions, which
    depend on the test matrix."""
    gen = torch.Generator().manual_seed(1)
    a = torch.stack([_decaying(20, 14, r, gen, torch.float64) for r in (2, 5, 9)])
    seeds = [pa._generator_seed(3, 7, i) for i in range(3)]
    u, s, vh = pa.randomized_svd_batched(a, 4, oversampling=3, power_iters=1, dtype=torch.float64,
                                         generators=[torch.Generator().manual_seed(x) for x in seeds])
    assert u.shape == (3, 20, 7) and s.shape == (3, 7) and vh.shape == (3, 7, 14) and u.dtype == torch.float64
    for i in range(3):
        ui, si, vhi = randomized_svd(a[i], 4, 3, 1, torch.Generator().manual_seed(seeds[i]), dtype=torch.float64)
        torch.testing.assert_close(s[i], si, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(u[i], ui, rtol=0, atol=1e-10)
        torch.testing.assert_close(vh[i], vhi, rtol=0, atol=1e-10)
    # the per-matrix generators matter: swapped seeds give other oversampled directions
    _, _, vh_swapped = pa.randomized_svd_batched(a, 4, 3, 1, [torch.Generator().manual_seed(x) for x in seeds[::-1]],
                                                 dtype=torch.float64)
    assert (vh_swapped[0, 4:].abs() - vh[0, 4:].abs()).abs().max() > 1e-3
    # and the subspace is the true one: the top 2 directions of a rank-2 matrix are exact
    ue, se, vhe = torch.linalg.svd(a[0], full_matrices=False)
    torch.testing.assert_close(vh[0, :2].T @ vh[0, :2], vhe[:2].T @ vhe[:2], rtol=0, atol=1e-10)


def test_default_float32_randomized_svd_is_unchanged():
    """``dtype`` defaults to float32 and leaves the per-matrix function as it was (float32 throughout)."""
    a = _decaying(16, 10, 3, torch.Generator().manual_seed(2), torch.float64)
    u, s, vh = randomized_svd(a, 3, 2, 2, torch.Generator().manual_seed(0))
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    a32 = a.float()
    omega = torch.randn(10, 5, generator=torch.Generator().manual_seed(0))
    q = torch.linalg.qr(a32 @ omega).Q
    for _ in range(2):
        q = torch.linalg.qr(a32 @ torch.linalg.qr(a32.T @ q).Q).Q
    ub, s_ref, vh_ref = torch.linalg.svd(q.T @ a32, full_matrices=False)
    u_ref, vh_ref = pa.canonical_signs(q @ ub, vh_ref)
    assert torch.equal(s, s_ref) and torch.equal(vh, vh_ref) and torch.equal(u, u_ref)


def test_canonical_signs_fix_each_pair_and_keep_the_product():
    """Flipping any pair (u_i, v_i) of an SVD gives the same canonical result; U S Vh is unchanged."""
    a = _decaying(7, 5, 3, torch.Generator().manual_seed(4), torch.float64)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    flip = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    cu, cvh = pa.canonical_signs(u, vh)
    fu, fvh = pa.canonical_signs(u * flip, vh * flip[:, None])
    assert torch.equal(cu, fu) and torch.equal(cvh, fvh)
    torch.testing.assert_close((cu * s) @ cvh, a, rtol=0, atol=1e-12)
    assert (cvh.gather(1, cvh.abs().argmax(1, keepdim=True)) > 0).all()
    # on a stack, each matrix on its own
    su, svh = pa.canonical_signs(torch.stack([u, u * flip]), torch.stack([vh, vh * flip[:, None]]))
    assert torch.equal(su[0], su[1]) and torch.equal(svh[0], cvh)


# ----------------------------------------------------------------------------- the step
@pytest.mark.parametrize("matmul", ["bmm", "mm"])
@pytest.mark.parametrize("svd,svt", [("randomized", "none"), ("randomized", "fixed_rank"), ("randomized", "rank_fraction"),
                                     ("full", "none"), ("full", "fixed_rank")])
def test_batched_step_matches_loop(svd, svt, matmul):
    """Refreshes at steps 0, 3, 6 (and a lagging matrix), SVT ranks that differ within one shape,
    weight decay, plain AdamW groups: the batched optimizer follows the loop to rounding and picks
    the same ranks at the same refreshes."""
    ref, opt_ref, ranks_ref = _run("off", svd=svd, svt=svt)
    got, opt, ranks = _run("on", svd=svd, svt=svt, matmul=matmul)
    assert opt.use_batched() and not opt_ref.use_batched()
    assert ranks == ranks_ref
    if svt != "none":
        assert len({r for step in ranks for r in step.values()}) > 1  # the SVT really chose different ranks
    _close(got, ref)
    for p, q in zip(opt.param_groups[0]["params"], opt_ref.param_groups[0]["params"]):
        s, s_ref = opt.state[p], opt_ref.state[q]
        assert s.keys() == s_ref.keys() and torch.equal(s["step"], s_ref["step"])
        proj, proj_ref = s["proj"], s_ref["proj"]
        assert proj.shape == proj_ref.shape and proj._base is None
        # same subspace (and, by canonical_signs, the same signs of the singular vectors)
        k = min(proj.shape)
        gram = (lambda P: P.T @ P) if proj.shape[0] == k else (lambda P: P @ P.T)
        torch.testing.assert_close(gram(proj), gram(proj_ref), rtol=0, atol=1e-5)
        # the moments are projections of gradients of size ~3: the projector's 1e-6 rounding shows as ~3e-6
        _close([s["exp_avg"], s["exp_avg_sq"]], [s_ref["exp_avg"], s_ref["exp_avg_sq"]], atol=1e-5)


@pytest.mark.parametrize("matmul", ["bmm", "mm"])  # "mm" falls back to bmm for non-fp32 weights
def test_batched_step_matches_loop_in_float64_parameters(matmul):
    ref, _, ranks_ref = _run("off", dtype=torch.float64, svt="fixed_rank")
    got, opt, ranks = _run("on", dtype=torch.float64, svt="fixed_rank", matmul=matmul)
    assert ranks == ranks_ref
    assert all(p.dtype == torch.float64 for p in got)
    _close(got, ref, rtol=1e-6, atol=1e-7)  # projectors are float32 on both paths


def test_batched_energy_rule_uses_the_whole_gradient_energy():
    """As tests/test_rsvd.py checks for the loop: ``rank_fraction`` is a fraction of ||G||_F^2 (here
    16 + 4 + 7 = 27), not of the computed singular values' energy (16 + 4 + 1 + 1 = 22)."""
    g = torch.Generator().manual_seed(5)
    u = torch.linalg.qr(torch.randn(14, 9, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(10, 9, generator=g, dtype=torch.float64)).Q
    grad = ((u * torch.tensor([4.0, 2.0] + [1.0] * 7, dtype=torch.float64)) @ v.T).float()
    for fraction, want in ((0.75, 3), (0.7, 2)):
        ps = [torch.nn.Parameter(torch.zeros(14, 10)) for _ in range(2)]
        opt = ProjectedAdamW([{"params": ps, "rank": 3, "oversampling": 1, "power_iters": 4, "svt": "rank_fraction",
                               "rank_fraction": fraction}], lr=0.1, batched="on")
        for p in ps:
            p.grad = grad.clone()
        opt.step()
        assert opt.ranks() == {0: want, 1: want}, fraction


def test_fused_adamw_for_plain_parameters_matches_loop(monkeypatch):
    """The unprojected tensors take torch's fused AdamW kernel (forced on CPU here); it gives the loop's update."""
    calls = []
    fused = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: (calls.append(len(a[0])), fused(*a, **k))[1])
    ref, _, _ = _run("off", wd=0.1)
    got, _, _ = _run("on", wd=0.1, fused_cpu=True)
    assert calls and set(calls) == {2, 1}  # the two plain groups (decay / no decay), every step
    _close(got, ref)


def test_auto_is_the_loop_on_cpu_bit_for_bit():
    ref, opt_ref, _ = _run("off")
    got, opt, _ = _run("auto")
    assert not opt.use_batched()
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    with pytest.raises(ValueError, match="batched must be one of"):
        ProjectedAdamW([torch.nn.Parameter(torch.zeros(2, 2))], batched="yes")


def test_chunked_batches_match_one_batch(monkeypatch):
    """Stacks are split so none exceeds MAX_CHUNK_BYTES; the chunks give the same numbers."""
    whole, _, ranks = _run("on", svt="fixed_rank")
    monkeypatch.setattr(pa, "MAX_CHUNK_BYTES", 4 * 12 * 8 * 2)  # at most 2 matrices per stack
    assert [len(c) for c in pa._chunks(list(range(5)), 4 * 12 * 8)] == [2, 2, 1]
    chunked, _, ranks_c = _run("on", svt="fixed_rank")
    assert ranks_c == ranks
    _close(chunked, whole)


# ----------------------------------------------------------------------------- state
def _checkpoint(params, opt, tmp_path, name):
    sd = opt.state_dict()
    sd["weights"] = [p.detach().clone() for p in params]
    torch.save(sd, tmp_path / name)
    return torch.load(tmp_path / name, weights_only=True)


@pytest.mark.parametrize("first,second", [("on", "on"), ("off", "on"), ("on", "off"), ("mm", "mm")])
def test_resume_across_paths(tmp_path, first, second):
    """A checkpoint from either path loads into either path (same state format). Batched -> batched
    resumes bit for bit; across paths the run continues to rounding."""
    kw = dict(svt="rank_fraction", interval=3)
    mode = {"mm": ("on", "mm")}
    (first, mm1), (second, mm2) = mode.get(first, (first, "bmm")), mode.get(second, (second, "bmm"))
    full, _, ranks_full = _run(second, steps=10, matmul=mm2, **kw)
    part, opt, _ = _run(first, steps=4, matmul=mm1, **kw)
    state = _checkpoint(part, opt, tmp_path, "opt.pt")
    resumed, opt2, ranks2 = _run(second, steps=10, state=state, start=4, matmul=mm2, **kw)  # refreshes at 6 and 9 after the resume
    assert ranks2 == ranks_full[4:]
    if first == second:
        assert all(torch.equal(a, b) for a, b in zip(resumed, full))
    else:
        _close(resumed, full)


def test_config_switch_reaches_the_optimizer(tmp_path):
    from conftest import make_cfg
    from peftlab.errors import ConfigError
    from peftlab.methods.base import MethodContext
    from peftlab.methods.rsvd import RSVD
    from peftlab.models import load_model

    cfg = make_cfg(tmp_path, "cls", method="rsvd", rsvd__rank=4)
    assert cfg.rsvd.batched == "auto"
    with pytest.raises(ConfigError, match="rsvd.batched"):
        make_cfg(tmp_path, "cls", method="rsvd", rsvd__batched="always")
    cfg = make_cfg(tmp_path, "cls", method="rsvd", rsvd__rank=4, rsvd__batched="on")
    model, _, _ = load_model(cfg, "classification", 2)
    method = RSVD(MethodContext(cfg=cfg, task="classification", target_modules=[]))
    opt = method.build_optimizer(method.apply(model))
    assert opt.batched == "on" and opt.use_batched()


def test_training_run_batched_on_cpu_follows_the_loop(tmp_path, run_train):
    """The whole `train` path with rsvd.batched=on (forced on CPU) against the default loop: same SVT
    ranks in svt_ranks.csv, final weights equal to rounding."""
    import csv

    from safetensors.torch import load_file

    from conftest import make_cfg

    over = dict(method="rsvd", rsvd__rank=4, rsvd__update_interval=3, rsvd__svt="fixed_rank", rsvd__svt_threshold=0.3,
                training__max_steps=8, training__learning_rate=1e-3, training__weight_decay=0.01)
    run_train(make_cfg(tmp_path / "loop", "cls", **over))
    run_train(make_cfg(tmp_path / "batched", "cls", rsvd__batched="on", **over))
    a, b = tmp_path / "loop" / "run", tmp_path / "batched" / "run"
    rows_a = list(csv.DictReader(open(a / "svt_ranks.csv")))
    rows_b = list(csv.DictReader(open(b / "svt_ranks.csv")))
    assert rows_a == rows_b and len(rows_a) == 3
    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
