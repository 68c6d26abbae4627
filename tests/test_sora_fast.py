"""SoRA / SDoRA's GPU path (``sora.fast_path``), checked on the CPU against the per-gate path.

* the flat gate step (one Adam + threshold over all gates, no host read) gives the gates, the
  exact-zero pattern, the moments and the step counts of the per-gate step, in float64, over
  several steps of real gradients, including a non-finite and a missing gate gradient;
* it reads nothing back to the host and its op count does not grow with the number of gates;
* SDoRA's cached ||W0||² gives bit-identical outputs and gradients;
* the L1 term, the fp16 unscale, checkpoints and the loop agree with the per-gate path;
* ``auto`` keeps the CPU on the per-gate path.
"""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import make_cfg
from test_sora import _build, _csv, _inputs, _randomize

SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero"}
VIEW_OPS = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::detach", "detach", "aten::alias",
            "aten::split", "aten::split_with_sizes", "aten::as_strided", "aten::slice", "aten::select",
            "aten::unsqueeze", "aten::expand", "aten::view_as", "aten::lift_fresh"}


def _pair(tmp_path, method="sora", kind="lm", double=True, **over):
    """(cfg, per-gate method, its model, fast method, its model), same weights and gate states."""
    cfg, slow, ms = _build(tmp_path / "slow", kind, method=method, sora__fast_path="off", **over)
    _, fast, mf = _build(tmp_path / "fast", kind, method=method, sora__fast_path="on", **over)
    assert not slow.fast and fast.fast
    _randomize(slow, zero_every=10**9)
    mf.load_state_dict(ms.state_dict())
    ms.eval(), mf.eval()  # no dropout: both models see the same function (gradients flow in eval mode too)
    if double:
        for model, m in ((ms, slow), (mf, fast)):
            model.double()
            for st in m.adam.values():
                st["exp_avg"], st["exp_avg_sq"] = st["exp_avg"].double(), st["exp_avg_sq"].double()
        for g in fast.gated:  # SDoRA's cached ||W0||² was taken from the float32 weights
            mag = g.layer.lora_magnitude_vector["default"] if fast.use_dora else None
            if mag is not None:
                mag.refresh_base_norm(g.layer.get_base_layer().weight)
    return cfg, slow, ms, fast, mf


def _gates(m):
    return [g.gate.detach().clone() for g in m.gated]


@pytest.mark.parametrize("variant", ["soft", "reference", "no_multiply_lr", "schedule", "sdora"])
def test_flat_gate_step_equals_per_gate_step_float64(tmp_path, variant, caplog):
    # Adam moves a gate by at most about gate_lr * lr / lr0 per step; the threshold is larger, so
    # gates shrink and zeros stay zero: the sparsity pattern grows over the steps
    over = dict(sora__lambda_=2.0, sora__gate_lr=0.1)
    if variant == "reference":
        over["sora__reference_threshold"] = True
    if variant == "no_multiply_lr":
        over.update(sora__multiply_lr=False, sora__lambda_=0.12)
    if variant == "schedule":
        over.update(sora__lambda_schedule="linear", sora__lambda_=1.0, sora__max_lambda=3.0, sora__lambda_num=4,
                    sora__lambda_interval=2)
    cfg, slow, ms, fast, mf = _pair(tmp_path, method="sdora" if variant == "sdora" else "sora", **over)
    assert len(slow.gated) >= 2
    x = _inputs("lm")
    lr0 = cfg.training.learning_rate
    lrs = [lr0, 0.8 * lr0, 0.5 * lr0, lr0, 0.3 * lr0, 0.6 * lr0, 0.9 * lr0]
    zeros_seen = []
    for k, lr in enumerate(lrs):
        for model, m in ((ms, slow), (mf, fast)):
            model(**x, labels=x["input_ids"]).loss.backward()
            if k == 2:  # an overflow in one gate: that gate's step is skipped, the others go on
                m.gated[0].gate.grad[1] = float("nan")
            if k == 4:  # a module that took no part in this step
                m.gated[1].gate.grad = None
            with caplog.at_level(logging.WARNING, logger="peftlab"):
                m.after_optimizer_step(model, lr)
            assert all(g.gate.grad is None for g in m.gated)
        for a, b in zip(_gates(slow), _gates(fast)):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
            assert torch.equal(a == 0, b == 0)  # the same exact zeros
        zeros_seen.append(sum(int((g == 0).sum()) for g in _gates(slow)))
    total = sum(g.r for g in slow.gated)
    assert 0 < zeros_seen[-1] < total and zeros_seen[0] < zeros_seen[-1], zeros_seen  # sparsity grows, not trivially
    s_slow, s_fast = slow.state_dict(), fast.state_dict()
    assert s_fast["steps"] == s_slow["steps"] == len(lrs)
    for n, st in s_slow["adam"].items():
        assert s_fast["adam"][n]["step"] == st["step"]
        torch.testing.assert_close(s_fast["adam"][n]["exp_avg"], st["exp_avg"], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(s_fast["adam"][n]["exp_avg_sq"], st["exp_avg_sq"], rtol=1e-12, atol=1e-15)
    steps = [s_slow["adam"][g.param_name]["step"] for g in slow.gated]
    assert steps[0] == len(lrs) - 1 and steps[1] == len(lrs) - 1  # one skipped (nan), one absent
    # the per-gate path warns at once; the fast path at the next metrics read (every log_steps)
    assert caplog.text.count("non-finite gate gradient") == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        fast.step_metrics(mf)
        fast.step_metrics(mf)  # read once, then reset
    assert caplog.text.count("non-finite gate gradient") == 1 and "on 1 step(s)" in caplog.text
    assert slow.step_metrics(ms) == fast.step_metrics(mf)


def _hook_ops(m, model, steps=2):
    x = _inputs("lm")
    ops = []
    for _ in range(steps):
        model(**x, labels=x["input_ids"]).loss.backward()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            m.after_optimizer_step(model, m.cfg.training.learning_rate)
        ops = [e for e in prof.events() if e.name.startswith("aten::")]
    return [e.name for e in ops], [e.name for e in ops if e.cpu_parent is None]  # all ops, ops the hook dispatches


def test_fast_gate_step_reads_nothing_back_and_costs_the_same_for_more_gates(tmp_path):
    counts = {}
    for label, targets in (("few", ["c_attn"]), ("many", ["c_attn", "c_proj", "c_fc"])):
        for setting in ("off", "on"):
            cfg, m, model = _build(tmp_path / f"{label}{setting}", "lm", sora__fast_path=setting,
                                   model__target_modules=targets)
            ops, top = _hook_ops(m, model)
            syncs = [o for o in ops if o in SYNC_OPS]
            if setting == "off":
                assert syncs, "the per-gate step reads isfinite() per gate: the detector must see it"
            else:
                assert not syncs, syncs
            counts[label, setting] = (len(m.gated), len([o for o in top if o not in VIEW_OPS]))
    (g_few, off_few), (g_many, off_many) = counts["few", "off"], counts["many", "off"]
    assert g_many > g_few and off_many > off_few  # the per-gate step grows with the gates ...
    assert counts["few", "on"][1] == counts["many", "on"][1]  # ... the flat one does not


def test_sdora_cached_base_norm_is_bit_identical(tmp_path):
    cfg, slow, ms, fast, mf = _pair(tmp_path, method="sdora", double=False)
    layers = [(gs.layer.lora_magnitude_vector["default"], gf.layer.lora_magnitude_vector["default"])
              for gs, gf in zip(slow.gated, fast.gated)]
    assert all(getattr(a, "base_sq", None) is None and b.base_sq is not None for a, b in layers)
    assert ms.state_dict().keys() == mf.state_dict().keys()  # the cache is not saved
    x = _inputs("lm")
    for model in (ms, mf):
        model.eval()
        model(**x, labels=x["input_ids"]).loss.backward()
    assert torch.equal(ms(**x).logits, mf(**x).logits)
    gs, gf = dict(ms.named_parameters()), dict(mf.named_parameters())
    for n, p in gs.items():
        if p.grad is not None:
            assert torch.equal(p.grad, gf[n].grad), n
    # the cache holds ||W0||² per row: changing W0 without refreshing it changes the output
    lay = fast.gated[0].layer
    with torch.no_grad():
        lay.get_base_layer().weight.mul_(2.0)
        out_stale = mf(**x).logits
        lay.lora_magnitude_vector["default"].refresh_base_norm(lay.get_base_layer().weight)
        out_fresh = mf(**x).logits
        slow.gated[0].layer.get_base_layer().weight.mul_(2.0)
        assert torch.equal(out_fresh, ms(**x).logits) and not torch.equal(out_stale, out_fresh)


def test_fast_l1_term_and_fp16_unscale_match(tmp_path):
    cfg, slow, ms, fast, mf = _pair(tmp_path, sora__l1_weight=0.3)
    torch.testing.assert_close(fast.loss_extra(mf), slow.loss_extra(ms), rtol=1e-14, atol=0)

    class Scaler:  # an enabled fp16 grad scaler at 2**14
        def is_enabled(self):
            return True

        def get_scale(self):
            return 2.0 ** 14

        def _get_scale_async(self):
            return torch.tensor(2.0 ** 14)

    class Acc:
        scaler = Scaler()
        optimizer_step_was_skipped = False

    for m in (slow, fast):
        m.ctx.accelerator = Acc()
        for i, g in enumerate(m.gated):
            g.gate.grad = torch.linspace(-1, 1, g.r, dtype=torch.float64) * (i + 3.7) * 2.0 ** 14
        m.before_clip(None)
    for a, b in zip(slow.gated, fast.gated):
        assert torch.equal(a.gate.grad, b.gate.grad)
        assert a.gate.grad.abs().max() < 10


def test_fast_path_checkpoint_roundtrip_continues_identically(tmp_path):
    cfg, _, _, fast, mf = _pair(tmp_path, sora__lambda_=0.5, sora__gate_lr=0.2)
    x = _inputs("lm")
    lr = cfg.training.learning_rate

    def step(m, model):
        model(**x, labels=x["input_ids"]).loss.backward()
        m.after_optimizer_step(model, lr)

    for _ in range(3):
        step(fast, mf)
    saved = fast.state_dict()
    assert saved["steps"] == 3 and all(v["step"] == 3 for v in saved["adam"].values())
    gates = {n: t.clone() for n, t in mf.state_dict().items() if n.endswith(".gate")}
    _, other, mo = _build(tmp_path / "other", "lm", sora__fast_path="on", sora__lambda_=0.5, sora__gate_lr=0.2)
    mo.double().eval()
    mo.load_state_dict(mf.state_dict())
    for st in other.adam.values():
        st["exp_avg"], st["exp_avg_sq"] = st["exp_avg"].double(), st["exp_avg_sq"].double()
    step(other, mo)  # builds its flat state first, then loads over it
    mo.load_state_dict({**mo.state_dict(), **gates})
    other.load_state_dict(saved)
    for _ in range(2):
        step(fast, mf), step(other, mo)
    assert all(torch.equal(a.gate, b.gate) for a, b in zip(fast.gated, other.gated))
    assert other.state_dict()["adam"].keys() == fast.state_dict()["adam"].keys()
    for n, st in fast.state_dict()["adam"].items():
        assert other.state_dict()["adam"][n]["step"] == st["step"] == 5
        assert torch.equal(other.state_dict()["adam"][n]["exp_avg_sq"], st["exp_avg_sq"])


def test_auto_is_the_per_gate_path_on_cpu(tmp_path):
    from peftlab.methods.sora.fast import use_fast_path

    assert use_fast_path("auto", "cuda") and use_fast_path("auto", torch.device("cuda", 0))
    assert not use_fast_path("auto", "cpu") and use_fast_path("on", "cpu") and not use_fast_path("off", "cuda")
    cfg, m, model = _build(tmp_path, "lm", method="sdora")
    assert cfg.sora.fast_path == "auto" and not m.fast
    assert all(getattr(g.layer.lora_magnitude_vector["default"], "base_sq", None) is None for g in m.gated)
    model(**_inputs("lm"), labels=_inputs("lm")["input_ids"]).loss.backward()
    m.after_optimizer_step(model, cfg.training.learning_rate)
    assert m._flat is None


@pytest.mark.parametrize("method", ["sora", "sdora"])
def test_fast_path_through_the_loop_matches_per_gate_path(tmp_path, run_train, method):
    common = dict(method=method, training__max_steps=8, sora__lambda_=3.0, sora__gate_lr=0.1, training__save_steps=4)
    res = {s: run_train(make_cfg(tmp_path / s, sora__fast_path=s, **common)) for s in ("off", "on")}
    logs = {s: _csv(tmp_path / s / "run/loss_log.csv") for s in res}
    assert len(logs["on"]) == len(logs["off"]) == 4
    for a, b in zip(logs["off"], logs["on"]):
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) < 1e-5 and a["sparsity"] == b["sparsity"]
    assert res["on"]["method_summary"]["gate_steps"] == 8
    assert "flat gate step on the device" in (tmp_path / "on/run/train.log").read_text()
    assert "flat gate step" not in (tmp_path / "off/run/train.log").read_text()
    assert 0 < res["on"]["method_summary"]["sparsity"] == res["off"]["method_summary"]["sparsity"] < 1


# ----------------------------------------------------------------- on a GPU (skipped without one)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("method", ["sora", "sdora"])
def test_cuda_flat_step_matches_per_gate_step_and_never_synchronises(tmp_path, method):
    cfg, slow, ms, fast, mf = _pair(tmp_path, method=method, sora__lambda_=2.0, sora__gate_lr=0.1)
    ms.cuda(), mf.cuda()
    x = {k: v.cuda() for k, v in _inputs("lm").items()}
    lr = cfg.training.learning_rate
    for k in range(4):
        for model, m in ((ms, slow), (mf, fast)):
            model(**x, labels=x["input_ids"]).loss.backward()
            if k == 2:
                m.gated[0].gate.grad[0] = float("inf")
            if m is fast and k > 0:  # the first step builds the flat state; after that no host read at all
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    m.after_optimizer_step(model, lr)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            elif m is slow and k == 1:  # the detector works: the per-gate step reads isfinite() back
                torch.cuda.set_sync_debug_mode("error")
                try:
                    with pytest.raises(RuntimeError):
                        m.after_optimizer_step(model, lr)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                m.after_optimizer_step(model, lr)
            else:
                m.after_optimizer_step(model, lr)
        for a, b in zip(_gates(slow), _gates(fast)):
            assert b.is_cuda
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
            assert torch.equal(a == 0, b == 0)
    assert fast.state_dict()["adam"].keys() == slow.state_dict()["adam"].keys()
    for n, st in slow.state_dict()["adam"].items():
        assert fast.state_dict()["adam"][n]["step"] == st["step"]


@cuda
def test_cuda_training_run_chooses_the_fast_path_under_auto(tmp_path, run_train):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # an earlier test's Accelerator fixed fp32; this run is bf16
    res = run_train(make_cfg(tmp_path, method="sdora", training__max_steps=6, system__device="cuda", system__dtype="bf16"))
    log = (tmp_path / "run/train.log").read_text(encoding="utf-8")
    assert "sdora: flat gate step on the device, cached" in log and "(sora.fast_path=auto)" in log
    assert res["method_summary"]["gate_steps"] == 6
    AcceleratorState._reset_state(True)  # and later tests train in fp32
