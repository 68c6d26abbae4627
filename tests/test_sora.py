"""SoRA / SDoRA: proximal gate step, parity with LoRA / DoRA, sparsity logs, export, resume."""

from __future__ import annotations

import copy
import csv
import json
import shutil

import pytest
import torch

from conftest import make_cfg

# ---------------------------------------------------------------------------- helpers


def _build(tmp_path, kind="lm", method="sora", **over):
    """(cfg, method, peft model) built outside the loop, as the Trainer would build them."""
    from peftlab.build import build

    cfg = make_cfg(tmp_path, kind, method=method, **over)
    task = "causal_lm" if kind == "lm" else "classification"
    b = build(cfg, task=task, num_labels=None if kind == "lm" else 2, data=False, optimizer=False)
    return cfg, b.method, b.model


def _base(cfg, kind="lm"):
    from peftlab.models import load_model

    return load_model(cfg, "causal_lm" if kind == "lm" else "classification", None if kind == "lm" else 2)[0]


def _inputs(kind="lm"):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 250, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _randomize(m, zero_every=3):
    """Give every module a non-zero B and gates with some exact zeros (what training produces)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, gm in enumerate(m.gated):
            B = gm.layer.lora_B["default"].weight
            B.copy_(torch.randn(B.shape, generator=g) * 0.3)
            gate = torch.randn(gm.r, generator=g)
            gate[(torch.arange(gm.r) + i) % zero_every == 0] = 0.0
            gm.gate.copy_(gate)
            if m.use_dora:
                mag = gm.layer.lora_magnitude_vector["default"].weight
                mag.mul_(1 + 0.2 * torch.rand(mag.shape, generator=g))


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------- proximal operator


def test_soft_threshold_and_reference_thresholding_by_hand():
    from peftlab.methods.sora.layers import reference_threshold_, soft_threshold_

    x = torch.tensor([-3.0, -1.5, -0.5, 0.0, 0.25, 1.0, 1.25, 2.0, 2.5])
    # sign(x) * max(|x| - 1, 0), worked by hand
    assert soft_threshold_(x.clone(), 1.0).tolist() == [-2.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.25, 1.0, 1.5]
    # the public code's sequential in-place version also zeroes (1, 2) and (-2, -1), and keeps |x| = 1 itself
    assert reference_threshold_(x.clone(), 1.0).tolist() == [-2.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.5]


@pytest.mark.parametrize("reference", [False, True])
def test_proximal_gate_step_equals_hand_computed_adam_then_threshold(tmp_path, reference):
    cfg, m, model = _build(tmp_path, sora__lambda_=2.0, sora__gate_lr=0.5, sora__reference_threshold=reference,
                           training__learning_rate=0.01)
    gm = m.gated[0]
    g0 = torch.tensor([1.0, -0.3, 0.02, -2.0, 0.6, 0.0, 3.0, -0.9], dtype=torch.float64)
    grads = [torch.tensor([0.5, -1.0, 0.1, 0.2, -0.3, 0.0, 2.0, 0.4], dtype=torch.float64),
             torch.tensor([-0.1, 0.3, 0.2, -0.5, 0.3, 1.0, 1.0, -0.2], dtype=torch.float64)]
    lrs = [0.01, 0.004]  # scheduler lr of training.learning_rate = 0.01; the gate's peak lr is 0.5
    b1, b2, eps = cfg.training.adam_beta1, cfg.training.adam_beta2, cfg.training.adam_epsilon
    with torch.no_grad():
        gm.gate.copy_(g0)
    g, mom, vel = g0.clone(), torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    for k, (grad, lr) in enumerate(zip(grads, lrs), start=1):
        gm.gate.grad = grad.float()
        m.after_optimizer_step(model, lr)
        eta = 0.5 * lr / 0.01
        tau = 2.0 * eta
        mom = b1 * mom + (1 - b1) * grad
        vel = b2 * vel + (1 - b2) * grad**2
        g = g - eta * (mom / (1 - b1**k)) / ((vel / (1 - b2**k)).sqrt() + eps)
        if reference:
            g = torch.where(g > tau, g - tau, g)
            g = torch.where(g < -tau, g + tau, g)
            g = torch.where(g.abs() < tau, torch.zeros_like(g), g)
        else:
            g = torch.sign(g) * (g.abs() - tau).clamp_min(0)
        assert gm.gate.grad is None  # the method clears the gate gradients itself
        torch.testing.assert_close(gm.gate.detach().double(), g, rtol=1e-6, atol=1e-6)
    assert (gm.gate == 0).sum().item() >= 3  # exact zeros, not small numbers
    # gates never enter AdamW
    gates = {id(x.gate) for x in m.gated}
    assert all(id(p) not in gates for grp in m.param_groups(model) for p in grp["params"])


def test_lambda_schedule_and_validation(tmp_path):
    from peftlab.errors import ConfigError
    from peftlab.methods.sora.method import SoraSection, lambda_values

    lin = lambda_values(SoraSection(lambda_=0.1, lambda_schedule="linear", max_lambda=0.5, lambda_num=5, lambda_interval=2))
    assert lin == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    geo = lambda_values(SoraSection(lambda_=0.01, lambda_schedule="exp_linear", max_lambda=1.0, lambda_num=3, lambda_interval=2))
    assert geo == pytest.approx([0.01, 0.1, 1.0])
    _, m, model = _build(tmp_path, sora__lambda_schedule="linear", sora__max_lambda=0.3, sora__lambda_num=3, sora__lambda_interval=2)
    seen = []
    for _ in range(7):
        seen.append(m.current_lambda())
        m.after_optimizer_step(model, 1e-3)  # no gradients: the schedule still advances
    assert seen == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.3])
    with pytest.raises(ConfigError, match="sora.max_lambda"):
        make_cfg(tmp_path, method="sora", sora__lambda_schedule="linear", sora__lambda_interval=5)
    # the spelling `--sora.lambda` (a Python keyword) is an alias of the field lambda_
    from peftlab.config import load_config

    assert load_config(None, ["--method=sora", "--sora.lambda=0.3"]).sora.lambda_ == 0.3
    assert make_cfg(tmp_path, method="sora", sora__lambda=0.5).sora.lambda_ == 0.5
    with pytest.raises(ConfigError, match="Did you mean `(sora.)?lambda_`"):
        make_cfg(tmp_path, method="sora", sora__lambdaa=0.3)


# ------------------------------------------------------------------- parity checks


@pytest.mark.parametrize("kind", ["lm", "cls"])
def test_gates_at_one_give_plain_peft_lora_output(tmp_path, kind):
    from peft import get_peft_model

    cfg, m, sora_model = _build(tmp_path, kind, sora__gate_init="ones")
    _randomize(m, zero_every=10**9)  # random B ...
    with torch.no_grad():
        for gm in m.gated:
            gm.gate.fill_(1.0)  # ... and gates exactly one
    lora_model = get_peft_model(_base(cfg, kind), m.peft_config())
    lora_model.load_state_dict({k: v for k, v in sora_model.state_dict().items() if not k.endswith(".gate")})
    sora_model.eval(), lora_model.eval()
    x = _inputs(kind)
    with torch.no_grad():
        torch.testing.assert_close(sora_model(**x).logits, lora_model(**x).logits, rtol=0, atol=0)
        # and the gate really acts: zeroing gates of a module removes exactly its LoRA update
        for gm in m.gated:
            gm.gate.zero_()
        plain = _base(cfg, kind).eval()
        torch.testing.assert_close(sora_model(**x).logits, plain(**x).logits, rtol=1e-6, atol=1e-6)


def test_lambda_zero_sora_run_equals_lora_run(tmp_path, run_train):
    """λ = 0, gates fixed at one (gate lr 0): SoRA is LoRA step for step."""
    common = dict(training__max_steps=6, training__max_grad_norm=None)
    run_train(make_cfg(tmp_path / "lora", method="lora", **common))
    res = run_train(make_cfg(tmp_path / "sora", method="sora", sora__lambda_=0.0, sora__gate_init="ones",
                             sora__gate_lr=0.0, **common))
    a = [r["train_loss"] for r in _csv(tmp_path / "lora/run/loss_log.csv")]
    b = [r["train_loss"] for r in _csv(tmp_path / "sora/run/loss_log.csv")]
    assert len(a) == 3 and a == b
    assert res["method_summary"]["sparsity"] == 0.0


def test_sdora_norm_matches_dense_float64():
    from peftlab.methods.sora.layers import dora_row_norm

    g = torch.Generator().manual_seed(3)
    W, A, B = torch.randn(40, 24, generator=g), torch.randn(6, 24, generator=g), torch.randn(40, 6, generator=g)
    gate = torch.randn(6, generator=g)
    gate[2] = 0.0
    s = 0.7
    dense = torch.linalg.norm(W.double() + s * B.double() @ torch.diag(gate.double()) @ A.double(), dim=1)
    torch.testing.assert_close(dora_row_norm(W, A, B, gate, s).double(), dense, rtol=1e-5, atol=1e-5)
    # GPT-2 Conv1D stores W transposed (fan_in_fan_out)
    torch.testing.assert_close(dora_row_norm(W.T.contiguous(), A, B, gate, s, fan_in_fan_out=True).double(), dense,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dora_row_norm(W.double(), A.double(), B.double(), gate.double(), s), dense,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["lm", "cls"])
def test_sdora_with_gates_at_one_equals_peft_dora(tmp_path, kind):
    from peft import get_peft_model

    cfg, m, sd_model = _build(tmp_path, kind, method="sdora", sora__gate_init="ones")
    _randomize(m, zero_every=10**9)
    with torch.no_grad():
        for gm in m.gated:
            gm.gate.fill_(1.0)
    dora_model = get_peft_model(_base(cfg, kind), m.peft_config())
    dora_model.load_state_dict({k: v for k, v in sd_model.state_dict().items() if not k.endswith(".gate")})
    x = _inputs(kind)
    for mode in ("train", "eval"):  # in train mode the base model's dropout draws the same numbers for both
        getattr(sd_model, mode)(), getattr(dora_model, mode)()
        torch.manual_seed(5)
        out_sd = sd_model(**x).logits
        torch.manual_seed(5)
        out_dora = dora_model(**x).logits
        torch.testing.assert_close(out_sd, out_dora, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out_dora, _base(cfg, kind).eval()(**x).logits, rtol=0, atol=1e-4)  # the adapter is not a no-op


# ------------------------------------------------------------------------- export


@pytest.mark.parametrize("method,kind", [("sora", "lm"), ("sdora", "lm"), ("sora", "cls")])
def test_pruned_folded_export_reloads_with_same_logits(tmp_path, method, kind):
    from peft import PeftModel
    from safetensors.torch import load_file

    cfg, m, model = _build(tmp_path, kind, method=method)
    _randomize(m)
    if len(m.gated) > 1:  # one module loses every rank
        with torch.no_grad():
            m.gated[0].gate.zero_()
    model.eval()
    x = _inputs(kind)
    with torch.no_grad():
        want = model(**x).logits
    out = m.export(model, tmp_path / "out")
    alloc = json.loads((tmp_path / "out/allocation.json").read_text())
    conf = json.loads((out / "adapter_config.json").read_text())
    ranks = {g.name: int((g.gate != 0).sum()) for g in m.gated}
    assert alloc["ranks"] == ranks
    dropped = m.gated[0].name
    assert ranks[dropped] == 0
    live = {n: r for n, r in ranks.items() if r > 0}
    assert all(isinstance(v, int) for v in conf["rank_pattern"].values())
    if method == "sora":
        assert sorted(conf["target_modules"]) == sorted(live) and dropped not in conf["rank_pattern"]
        assert conf["rank_pattern"] == live
        # effective parameters are exactly what the exported adapter holds
        assert sum(t.numel() for t in load_file(out / "adapter_model.safetensors").values()) == m.param_counts(model)[1]
    else:  # a DoRA module keeps its trained magnitude with one inert rank
        assert conf["rank_pattern"] == {**live, dropped: 1}
    for n, r in conf["rank_pattern"].items():  # each module keeps its scale alpha / r
        assert conf["alpha_pattern"][n] / r == pytest.approx(cfg.lora.alpha / cfg.lora.r)
    reloaded = PeftModel.from_pretrained(_base(cfg, kind), str(out)).eval()
    with torch.no_grad():
        got = reloaded(**x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------- runs through the loop


def test_higher_lambda_gives_higher_sparsity_and_logs(tmp_path, run_train):
    common = dict(method="sora", sora__gate_lr=0.05, training__max_steps=8)
    lo = run_train(make_cfg(tmp_path / "lo", sora__lambda_=0.5, **common))
    hi = run_train(make_cfg(tmp_path / "hi", sora__lambda_=4.0, **common))
    s_lo, s_hi = lo["method_summary"]["sparsity"], hi["method_summary"]["sparsity"]
    assert s_hi > s_lo and s_hi > 0.3
    assert hi["effective_params"] < lo["effective_params"] <= lo["trainable_params"]

    run = tmp_path / "hi/run"
    rows = _csv(run / "sparsity_log.csv")
    with open(run / "sparsity_log.csv") as f:
        header = f.readline().strip().split(",")
    assert header == ["epoch", "step", "overall_sparsity", "h.0.attn.c_attn", "h.1.attn.c_attn"]
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]
    loss_rows = _csv(run / "loss_log.csv")
    assert [r["sparsity"] for r in loss_rows] == [r["overall_sparsity"] for r in rows]
    last = rows[-1]
    # overall sparsity is the entry-weighted mean of the module columns (equal ranks here)
    assert float(last["overall_sparsity"]) == pytest.approx((float(last["h.0.attn.c_attn"]) + float(last["h.1.attn.c_attn"])) / 2)
    assert float(last["overall_sparsity"]) == pytest.approx(s_hi)
    hist = json.loads((run / "training_history.json").read_text())
    assert hist["effective_params"][-1] == hi["effective_params"] and hist["sparsity"][-1] == pytest.approx(s_hi)
    alloc = json.loads((run / "allocation.json").read_text())
    assert sum(alloc["ranks"].values()) == alloc["total_rank"] == round((1 - s_hi) * alloc["max_total_rank"])


def test_checkpoint_roundtrip_restores_gates_and_gate_optimizer(tmp_path, run_train):
    from peftlab import checkpoints as ckpt

    cfg = make_cfg(tmp_path, method="sdora", sora__gate_lr=0.05, sora__lambda_=1.0, training__max_steps=8,
                   training__save_steps=4, training__save_total_limit=None)
    run_train(cfg)
    run = tmp_path / "run"
    first = ckpt.load(run / "checkpoints/epoch-1")
    mid = ckpt.load(run / "checkpoints/step-4")
    gate_keys = [k for k in first["model_state"] if k.endswith(".gate")]
    assert len(gate_keys) == 2
    st = mid["method_state"]  # loaded with weights_only=True
    assert st["steps"] == 4 and all(v["step"] == 4 for v in st["adam"].values())
    assert all(v["exp_avg_sq"].abs().sum() > 0 for v in st["adam"].values())
    loss_before = _csv(run / "loss_log.csv")
    sparsity_before = (run / "sparsity_log.csv").read_text()

    shutil.copytree(run, tmp_path / "resumed")
    cfg2 = make_cfg(tmp_path, method="sdora", sora__gate_lr=0.05, sora__lambda_=1.0, training__max_steps=8,
                    training__save_steps=4, training__save_total_limit=None,
                    training__resume_from="step-4", output__dir=str(tmp_path / "resumed"))
    run_train(cfg2)
    again = ckpt.load(tmp_path / "resumed/checkpoints/epoch-1")
    for k in gate_keys:
        torch.testing.assert_close(again["model_state"][k], first["model_state"][k], rtol=0, atol=0)
    for n, v in first["method_state"]["adam"].items():
        torch.testing.assert_close(again["method_state"]["adam"][n]["exp_avg"], v["exp_avg"], rtol=0, atol=0)
    keep = ("epoch", "step", "train_loss", "learning_rate", "sparsity")  # not gpu_memory_mb: it differs on a GPU
    assert [{k: r[k] for k in keep} for r in _csv(tmp_path / "resumed/loss_log.csv")] == [{k: r[k] for k in keep} for r in loss_before]
    assert (tmp_path / "resumed/sparsity_log.csv").read_text() == sparsity_before


def test_loop_calls_after_zero_grad_every_step_and_it_clears_the_gates(tmp_path, run_train, monkeypatch):
    """The method hook replaces SoRA's former patch of ``optimizer.zero_grad``: the loop calls it
    once per optimizer step, also where ``after_optimizer_step`` did not run (as on a step the fp16
    scaler skips, made here by turning that hook off), and it leaves no gate gradient."""
    from peftlab.methods.sora.method import SoRA

    calls = []
    inner = SoRA.after_zero_grad

    def counted(self, model):
        had = sum(g.gate.grad is not None for g in self.gated)
        inner(self, model)
        calls.append((had, sum(g.gate.grad is not None for g in self.gated)))

    monkeypatch.setattr(SoRA, "after_zero_grad", counted)
    monkeypatch.setattr(SoRA, "after_optimizer_step", lambda self, model, lr: None)
    run_train(make_cfg(tmp_path, method="sora", sora__gate_lr=0.05, training__max_steps=4))
    assert len(calls) == 4 and all(had > 0 and left == 0 for had, left in calls)
