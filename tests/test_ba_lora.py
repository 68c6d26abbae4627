"""BA-LoRA: exact budgeted allocation (brute force), importance, warm start, ablation parity, export, e2e."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_cfg
from peftlab.errors import ConfigError, PeftlabError
from peftlab.methods.ba_lora.alloc import allocate_ranks, feasible_budget_range, importance_score, proportional_targets, uniform_rank, warm_start_factors

# tiny-bert adapts query and value of 2 layers: 4 modules of 64 x 64, d_in + d_out = 128 each.
BERT_COSTS = 4 * 128


# ------------------------------------------------------------------ allocation (pure math)
def _brute_force(importance, costs, budget, lo, his):
    """Largest total <= budget over every rank vector, and the least deviation among those."""
    targets = proportional_targets(importance, costs, budget, lo, his)
    best_total, best_dev = -1, math.inf
    for ranks in itertools.product(*[range(lo, h + 1) for h in his]):
        total = sum(r * c for r, c in zip(ranks, costs))
        if total > budget:
            continue
        dev = sum(c * abs(r - t) for r, t, c in zip(ranks, targets, costs))
        if total > best_total or (total == best_total and dev < best_dev - 1e-9):
            best_total, best_dev = total, dev
    return best_total, best_dev


def test_allocation_is_optimal_against_brute_force():
    rng = random.Random(0)
    cases = 0
    for _ in range(60):
        M = rng.randint(2, 4)
        costs = [rng.choice([3, 4, 5, 6, 7, 9, 10, 12]) for _ in range(M)]
        importance = [rng.choice([0.0, 0.1, 1.0, 2.5, 7.0]) for _ in range(M)]
        lo = rng.randint(1, 2)
        his = [rng.randint(lo, lo + 4) for _ in range(M)]
        mn, mx = feasible_budget_range(costs, lo, his)
        for budget in sorted({mn, mx, rng.randint(mn, mx), rng.randint(mn, mx)}):
            a = allocate_ranks(importance, costs, budget, lo, his)
            total, dev = _brute_force(importance, costs, budget, lo, his)
            assert a.exact and a.total <= budget
            assert all(lo <= r <= h for r, h in zip(a.ranks, his))
            assert a.total == sum(r * c for r, c in zip(a.ranks, costs)) == total, (costs, importance, budget)
            assert a.deviation == pytest.approx(dev, abs=1e-9), (costs, importance, budget)
            g = allocate_ranks(importance, costs, budget, lo, his, force_greedy=True)
            assert g.total <= budget and g.total <= a.total
            cases += 1
    assert cases > 150


def test_allocation_hand_worked_case_where_greedy_leaves_budget_unused():
    # costs 5 and 7, importance 3:1, budget 24, ranks 1..4.
    # Proportional: module 1 wants 6/7 < 1 so it is clamped to 1 (7 params); module 0 gets 24-7 = 17 -> t0 = 3.4.
    # Floor + greedy: (3, 1) = 22 and nothing fits in the remaining 2. Exact: (2, 2) = 10 + 14 = 24, the whole budget.
    assert proportional_targets([3, 1], [5, 7], 24, 1, [4, 4]) == pytest.approx([3.4, 1.0])
    greedy = allocate_ranks([3, 1], [5, 7], 24, 1, [4, 4], force_greedy=True)
    exact = allocate_ranks([3, 1], [5, 7], 24, 1, [4, 4])
    assert (greedy.ranks, greedy.total, greedy.leftover) == ([3, 1], 22, 2)
    assert (exact.ranks, exact.total, exact.leftover) == ([2, 2], 24, 0)


def test_proportional_targets_water_filling_by_hand():
    # shares 1:3 of 40 over costs 10, 10 -> t = (1, 3)
    assert proportional_targets([1, 3], [10, 10], 40, 1, [10, 10]) == pytest.approx([1.0, 3.0])
    # module 1 capped at 2: its excess goes to module 0 -> (2, 2)
    assert proportional_targets([1, 3], [10, 10], 40, 1, [10, 2]) == pytest.approx([2.0, 2.0])
    # share is in parameters: equal importance over costs 10 and 30 -> equal params, ranks 3 and 1
    assert proportional_targets([1, 1], [10, 30], 60, 1, [9, 9]) == pytest.approx([3.0, 1.0])
    # all-zero importance counts as equal
    assert proportional_targets([0, 0], [10, 10], 40, 1, [9, 9]) == pytest.approx([2.0, 2.0])


def test_uniform_rank_and_infeasible_budgets():
    assert uniform_rank([128] * 4, 1100, 1, [32] * 4) == 2  # floor(1100 / 512)
    with pytest.raises(PeftlabError, match=r"too small.*Feasible budgets .* are 512 to 4,096"):
        allocate_ranks([1, 1, 1, 1], [128] * 4, 300, 1, [8] * 4)
    with pytest.raises(PeftlabError, match=r"too large.*Feasible budgets .* are 512 to 4,096"):
        allocate_ranks([1, 1, 1, 1], [128] * 4, 5000, 1, [8] * 4)


def test_config_validation():
    from peftlab.config import load_config

    with pytest.raises(ConfigError, match=r"ba_lora.max_rank.*below `ba_lora.min_rank`"):
        load_config(None, {"method": "ba_lora", "ba_lora.min_rank": 4, "ba_lora.max_rank": 2})
    with pytest.raises(ConfigError, match="param_budget"):
        load_config(None, {"method": "ba_lora", "ba_lora.param_budget": 0})


# ------------------------------------------------------------------ importance (phase 1)
class _TwoBranch(torch.nn.Module):
    """out = 50 * big(x) + small(x): big's weight gradient is 50 times small's."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.big = torch.nn.Linear(8, 8)
        self.small = torch.nn.Linear(8, 8)
        with torch.no_grad():
            self.small.weight.copy_(self.big.weight)

    def forward(self, x, y):
        out = 50 * self.big(x) + self.small(x)
        return torch.nn.functional.mse_loss(out, y)


def test_importance_ranks_the_layer_with_the_larger_gradient(tmp_path):
    from peftlab.methods import METHODS, MethodContext

    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randn(4, 8, generator=g), "y": torch.randn(4, 8, generator=g)} for _ in range(3)]
    cfg = make_cfg(tmp_path, "cls", method="ba_lora", ba_lora__gradient_samples=6)
    ctx = MethodContext(cfg=cfg, task="classification", target_modules=["big", "small"],
                        train_batches=lambda: iter(batches), compute_loss=lambda m, b: m(b["input_ids"], b["y"]))
    method = METHODS["ba_lora"](ctx)
    model = _TwoBranch()
    targets = method._targets(model)
    grads, stats = method._accumulate_gradients(model, targets)
    assert stats["batches"] == 2 and stats["examples"] == 8  # 6 requested, rounded up to whole batches
    # float64 reference: d/dW mean((50 W_b x + W_s x + b - y)^2) per batch, averaged over the two batches
    m64 = _TwoBranch().double()
    ref = {"big": torch.zeros(8, 8, dtype=torch.float64), "small": torch.zeros(8, 8, dtype=torch.float64)}
    for b in batches[:2]:
        x, y = b["input_ids"].double(), b["y"].double()
        r = 50 * m64.big(x) + m64.small(x) - y
        dout = 2 * r / r.numel()
        ref["big"] += 50 * dout.T @ x / 2
        ref["small"] += dout.T @ x / 2
    for n in ("big", "small"):
        torch.testing.assert_close(grads[n].double(), ref[n], rtol=1e-5, atol=1e-6)
        assert model.get_parameter(f"{n}.weight").grad is None  # phase 1 leaves no gradient behind
    for kind in ("weight_grad", "grad_norm"):
        s = {n: importance_score(targets[n].module.weight, grads[n], kind) for n in targets}
        assert s["big"] == pytest.approx(50 * s["small"], rel=1e-4)
    a = allocate_ranks([importance_score(targets[n].module.weight, grads[n], "weight_grad") for n in ("big", "small")],
                       [16, 16], 16 * 6, 1, [8, 8])
    assert a.ranks == [5, 1] and a.total == 96


def test_importance_score_by_hand_tells_weight_times_grad_from_grad():
    W = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    G = torch.tensor([[0.5, 0.5], [-1.0, 2.0]])
    # |W*G| = [[0.5, 1], [3, 0]] -> mean 1.125; mean|G| would be 1.0, |mean(W*G)| 0.875, mean|W| mean|G| 1.5
    assert importance_score(W, G, "weight_grad") == pytest.approx(1.125, abs=1e-12)
    assert importance_score(W, G, "grad_norm") == pytest.approx(5.5 ** 0.5, abs=1e-12)


class _Compensated(torch.nn.Module):
    """out = big(x) + small(x / 3) with small.W = 3 big.W: equal outputs, G_small = G_big / 3, so
    mean|W*G| is equal for both while mean|G| and ||G|| are three times larger for big."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.big = torch.nn.Linear(8, 8, bias=False)
        self.small = torch.nn.Linear(8, 8, bias=False)
        with torch.no_grad():
            self.small.weight.copy_(3 * self.big.weight)

    def forward(self, x, y):
        return torch.nn.functional.mse_loss(self.big(x) + self.small(x / 3), y)


def test_importance_uses_weight_times_gradient_where_ba_lora_computes_it(tmp_path):
    """Through BA-LoRA's phase-1 path: weight_grad scores the two modules equally (and gives equal
    ranks), where a score of the gradient alone (mean|G| or ||G||) would favour `big` threefold."""
    from peftlab.methods import METHODS, MethodContext

    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randn(4, 8, generator=g), "y": torch.randn(4, 8, generator=g)} for _ in range(2)]
    cfg = make_cfg(tmp_path, "cls", method="ba_lora", ba_lora__gradient_samples=8)
    ctx = MethodContext(cfg=cfg, task="classification", target_modules=["big", "small"],
                        train_batches=lambda: iter(batches), compute_loss=lambda m, b: m(b["input_ids"], b["y"]))
    method = METHODS["ba_lora"](ctx)
    model = _Compensated()
    targets = method._targets(model)
    grads, _ = method._accumulate_gradients(model, targets)
    wg = {n: importance_score(targets[n].module.weight, grads[n], "weight_grad") for n in targets}
    gn = {n: importance_score(targets[n].module.weight, grads[n], "grad_norm") for n in targets}
    mean_abs_g = {n: float(grads[n].abs().mean()) for n in targets}
    assert wg["big"] == pytest.approx(wg["small"], rel=1e-5)
    assert gn["big"] == pytest.approx(3 * gn["small"], rel=1e-5)
    assert mean_abs_g["big"] == pytest.approx(3 * mean_abs_g["small"], rel=1e-5)
    a = allocate_ranks([wg["big"], wg["small"]], [16, 16], 16 * 6, 1, [8, 8])
    assert a.ranks == [3, 3]


# ------------------------------------------------------------------ warm start (phase 3)
@pytest.mark.parametrize("init", ["svd", "pinv"])
def test_warm_start_factors_point_along_minus_gradient(init):
    g = torch.Generator().manual_seed(0)
    d_out, d_in, r, s, eta = 12, 9, 3, 2.0, 0.1
    full = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    deficient = torch.randn(d_out, 1, generator=g, dtype=torch.float64) @ torch.randn(1, d_in, generator=g, dtype=torch.float64)
    A0 = torch.empty(r, d_in, dtype=torch.float64)
    torch.nn.init.kaiming_uniform_(A0, a=math.sqrt(5), generator=g)
    for G in (full, deficient):
        ws = warm_start_factors(G, r, s, eta, init=init, match="norm", eps=1e-9, lora_A=A0)
        dW = s * ws.B @ ws.A
        assert torch.isfinite(dW).all() and not ws.zero
        assert torch.sum(dW * G).item() < 0  # a descent direction
        assert torch.linalg.matrix_norm(dW).item() == pytest.approx(eta * torch.linalg.matrix_norm(G).item(), rel=1e-9)
        if init == "svd":  # -k times the best rank-r approximation of G
            U, S, Vh = torch.linalg.svd(G, full_matrices=False)
            P = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
            assert torch.linalg.vector_norm(ws.A, dim=1).tolist() == pytest.approx([1 / math.sqrt(3)] * r)
        else:  # GoRA: B = -(k/s) G A^T (A A^T)^-1 with peft's A kept
            assert torch.equal(ws.A, A0)
            P = G @ torch.linalg.pinv(A0) @ A0
        torch.testing.assert_close(dW, -ws.k * P, rtol=1e-6, atol=1e-9)
    proj = warm_start_factors(full, r, s, eta, init=init, match="projection", lora_A=A0)
    assert proj.k == eta
    assert warm_start_factors(torch.zeros(d_out, d_in), r, s, eta, init=init, lora_A=A0.float()).zero


def test_warm_start_beats_standard_init_on_first_step_of_a_toy_regression():
    """Least squares y = W* x: one SGD step on (A, B) from warm start vs from standard LoRA init."""
    g = torch.Generator().manual_seed(3)
    d_in, d_out, r, s, lr = 16, 10, 2, 2.0, 0.05
    X = torch.randn(64, d_in, generator=g, dtype=torch.float64)
    W0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * 0.1
    Wstar = W0 + torch.randn(d_out, 3, generator=g, dtype=torch.float64) @ torch.randn(3, d_in, generator=g, dtype=torch.float64)
    Y = X @ Wstar.T

    def loss(A, B):
        return 0.5 * ((X @ (W0 + s * B @ A).T - Y) ** 2).sum(1).mean()

    def after_one_step(A, B):
        A, B = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
        loss(A, B).backward()
        with torch.no_grad():
            return loss(A - lr * A.grad, B - lr * B.grad).item()

    W = W0.clone().requires_grad_(True)
    (0.5 * ((X @ W.T - Y) ** 2).sum(1).mean()).backward()
    G = W.grad
    A_std = torch.empty(r, d_in, dtype=torch.float64)
    torch.nn.init.kaiming_uniform_(A_std, a=math.sqrt(5), generator=g)
    B_std = torch.zeros(d_out, r, dtype=torch.float64)
    base = loss(A_std, B_std).item()
    std = after_one_step(A_std, B_std)
    for init in ("svd", "pinv"):
        ws = warm_start_factors(G, r, s, lr, init=init, lora_A=A_std)
        assert loss(ws.A, ws.B).item() < base  # the initial update alone already descends
        assert after_one_step(ws.A, ws.B) <= std
    assert std < base


def _tiny_bert(tmp_path, **over):
    from peftlab.methods import METHODS, MethodContext
    from peftlab.models import load_model

    cfg = make_cfg(tmp_path, "cls", method="ba_lora", model__dropout=0.0, **over)
    model, tok, info = load_model(cfg, "classification", 2)
    batch = dict(tok(["a wonderful film", "dull and flat", "not bad at all", "tedious"], padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([1, 0, 1, 0])
    ctx = MethodContext(cfg=cfg, task="classification", target_modules=info.target_modules,
                        train_batches=lambda: iter([batch]), compute_loss=lambda m, b: m(**b).loss)
    torch.manual_seed(cfg.training.seed + 1)
    return METHODS["ba_lora"](ctx), model, batch


def test_warm_start_first_step_on_tiny_bert_at_least_as_good_as_standard_init(tmp_path):
    losses = {}
    for ws in (False, True):
        method, model, batch = _tiny_bert(tmp_path / str(ws), ba_lora__param_budget=1024, ba_lora__use_warmstart=ws,
                                          ba_lora__warmstart_step=0.05)
        with torch.no_grad():
            base = model(**batch).loss.item()
        peft_model = method.apply(model)
        peft_model.train()
        init = peft_model(**batch).loss
        init.backward()
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.grad is not None:
                    p -= 0.05 * p.grad
            losses[ws] = (base, init.item(), peft_model(**batch).loss.item())
    (base, std0, std1), (base_w, ws0, ws1) = losses[False], losses[True]
    assert base == base_w and std0 == pytest.approx(base, abs=1e-7)  # standard init leaves the model unchanged
    assert ws0 < base  # warm start moves the model a step down the loss
    assert ws1 <= std1 and std1 < base


def test_warm_start_handles_conv1d_orientation(tmp_path):
    """GPT-2's c_attn is a Conv1D (weight d_in x d_out): the adapter's delta must be -k * P(G) in that orientation."""
    from peftlab.methods import METHODS, MethodContext
    from peftlab.methods.lora import lora_layers
    from peftlab.models import load_model

    cfg = make_cfg(tmp_path, "lm", method="ba_lora", model__dropout=0.0, ba_lora__param_budget=2048, ba_lora__use_warmstart=True,
                   ba_lora__warmstart_step=0.02)
    model, tok, info = load_model(cfg, "causal_lm")
    ids = tok(["The cat sees the red ball.", "A dog runs in the park!"], padding=True, return_tensors="pt")["input_ids"]
    batch = {"input_ids": ids, "labels": ids}
    ctx = MethodContext(cfg=cfg, task="causal_lm", target_modules=info.target_modules,
                        train_batches=lambda: iter([batch]), compute_loss=lambda m, b: m(**b).loss)
    method = METHODS["ba_lora"](ctx)
    targets = method._targets(model)
    assert all(t.conv1d and (t.d_in, t.d_out) == (64, 192) for t in targets.values())
    # the reference gradient in the weight's own orientation (d_in x d_out)
    W = {n: t.module.weight for n, t in targets.items()}
    loss = model(**batch).loss
    ref = dict(zip(W, torch.autograd.grad(loss, list(W.values()))))
    base = loss.item()
    peft_model = method.apply(model)
    with torch.no_grad():
        assert peft_model(**batch).loss.item() < base
        for name, layer in lora_layers(peft_model):
            n = next(k for k in ref if name.endswith(k))
            G, r = ref[n].double(), layer.r["default"]
            delta = layer.get_delta_weight("default").double()  # peft's own (d_in x d_out) delta
            assert delta.shape == G.shape == (64, 192)
            U, S, Vh = torch.linalg.svd(G, full_matrices=False)
            P = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
            k = 0.02 * torch.linalg.matrix_norm(G) / torch.linalg.matrix_norm(P)
            torch.testing.assert_close(delta, -k * P, rtol=1e-3, atol=1e-7)


# ------------------------------------------------------------------ through the loop
def test_uniform_ablation_equals_plain_lora_at_equivalent_rank(tmp_path, run_train):
    # budget 1100 over 4 modules of cost 128 -> uniform rank floor(1100/512) = 2; constant_scale keeps
    # alpha/r = 16/8 = 2, so the plain-LoRA twin is r=2, alpha=4.
    ba = run_train(make_cfg(tmp_path / "ba", "cls", method="ba_lora", ba_lora__param_budget=1100, ba_lora__uniform_ranks=True,
                            training__max_steps=4))
    lo = run_train(make_cfg(tmp_path / "lo", "cls", method="lora", lora__r=2, lora__alpha=4.0, training__max_steps=4))
    assert ba["method_summary"]["total"] == 1024 and ba["method_summary"]["leftover"] == 76
    assert {m["rank"] for m in ba["method_summary"]["modules"].values()} == {2}
    assert ba["trainable_params"] == lo["trainable_params"]
    assert ba["final"] == lo["final"]
    a = load_file(str(tmp_path / "ba/run/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "lo/run/adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_end_to_end_allocation_json_export_reload_and_resume(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from peftlab.train.loop import Trainer

    cfg = make_cfg(tmp_path, "cls", method="ba_lora", model__dropout=0.0, ba_lora__param_budget=1500,
                   ba_lora__use_warmstart=True, ba_lora__gradient_samples=48, training__max_steps=4, training__save_steps=2)
    trainer = Trainer(cfg, console=False)
    res = trainer.run()
    run = tmp_path / "run"
    alloc = json.loads((run / "allocation.json").read_text())
    mods = alloc["modules"]
    assert len(mods) == 4 and alloc["gradient_examples"] == 48 and alloc["use_warmstart"]
    assert alloc["total"] == sum(m["params"] for m in mods.values()) == sum(m["rank"] * (m["d_in"] + m["d_out"]) for m in mods.values())
    assert alloc["total"] <= 1500 and alloc["leftover"] == 1500 - alloc["total"] and alloc["total"] == 1408  # 11 x 128
    assert (alloc["min_feasible_budget"], alloc["max_feasible_budget"]) == (512, 16384)
    assert set(alloc["phase_seconds"]) == {"importance", "allocation", "warmstart", "apply"} and alloc["overhead_s"] > 0
    summ = res["method_summary"]
    assert summ["total"] == alloc["total"] and 0 < summ["overhead_fraction_of_training"]
    assert res["trainable_params"] == alloc["total"] + 64 * 2 + 2  # LoRA + the classifier head (64 -> 2)
    log = (run / "train.log").read_text()
    for needle in ("[Phase 1/4]", "[Phase 2/4]", "[Phase 3/4]", "[Phase 4/4]", "Total parameters: 1,408 (within budget"):
        assert needle in log
    acfg = json.loads((run / "adapter/adapter_config.json").read_text())
    assert acfg["rank_pattern"] == {n: m["rank"] for n, m in mods.items()}
    # the exported adapter, loaded by plain peft onto the saved base model, gives the trained model's logits
    base = AutoModelForSequenceClassification.from_pretrained(run / "base_model")
    reloaded = PeftModel.from_pretrained(base, run / "adapter").eval()
    batch = trainer.tokenizer(["a wonderful film", "dull and flat"], padding=True, return_tensors="pt")
    trained = trainer.unwrapped().eval()
    with torch.no_grad():
        assert torch.equal(trained(**batch).logits, reloaded(**batch).logits)
    # resuming from step 2 reuses allocation.json's ranks and ends with the same numbers
    res2 = Trainer(cfg.replace({"training.resume_from": "step-2"}), console=False).run()
    assert res2["final"] == res["final"]
    assert "reusing the ranks" in (run / "train.log").read_text()


def test_infeasible_budget_fails_before_the_importance_phase(tmp_path, run_train):
    cfg = make_cfg(tmp_path, "cls", method="ba_lora", ba_lora__param_budget=100)
    with pytest.raises(PeftlabError, match=r"too small.*Feasible budgets for this model and these settings are 512 to 16,384"):
        run_train(cfg)
    assert "[Phase 1/4]" not in (tmp_path / "run/train.log").read_text()
