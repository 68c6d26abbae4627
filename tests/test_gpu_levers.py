"""The GPU speed levers (issue 17), checked on the CPU: same math, same numbers.

* the factored DoRA row norm equals ||W0 + s B A||_row (float64, both weight layouts), and a
  model with FactoredDoraLayer computes the same outputs and gradients as peft's DoRA;
* the device-side loss buffer reads back exactly the floats a per-step .item() gave;
* the prefetching batch iterator yields the batches of the plain path, in order;
* fused AdamW is chosen on CUDA only under `auto`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.methods.dora_norm import FactoredDoraLayer, install_factored_dora, use_factored
from peftlab.methods.sora.layers import dora_row_norm, w0_row_sq_norm
from peftlab.train.fast import DeviceLosses, device_batches, fused_lm_loss, prefetch_enabled
from peftlab.optim.adamw import adamw_options


def _dense_norm(W, A, B, s, fan_in_fan_out):
    Wr = W.T if fan_in_fan_out else W
    return torch.linalg.norm(Wr + s * (B @ A), dim=1)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("r", [1, 4, 16])
def test_factored_norm_equals_dense_norm_float64(fan_in_fan_out, r):
    g = torch.Generator().manual_seed(r + 10 * fan_in_fan_out)
    d_out, d_in, s = 37, 23, 1.7
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    W = W.T.contiguous() if fan_in_fan_out else W
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    ref = _dense_norm(W, A, B, s, fan_in_fan_out)
    got = dora_row_norm(W, A, B, None, s, fan_in_fan_out)
    cached = dora_row_norm(W, A, B, None, s, fan_in_fan_out, base_sq=w0_row_sq_norm(W, fan_in_fan_out))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cached, ref, rtol=1e-12, atol=1e-12)
    # a wrong cross-term sign or scale would be far off
    wrong = dora_row_norm(W, A, -B, None, s, fan_in_fan_out, base_sq=w0_row_sq_norm(W, fan_in_fan_out))
    assert not torch.allclose(wrong, ref, rtol=1e-6)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_few_kernel_norm_equals_dense_norm_float64(fan_in_fan_out, gated):
    """The GPU form (one addmm for both update terms, in place) against the dense norm and the CPU form."""
    g = torch.Generator().manual_seed(3 + 2 * gated + fan_in_fan_out)
    d_out, d_in, r, s = 41, 19, 8, 0.9
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    W = W.T.contiguous() if fan_in_fan_out else W
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    gate = torch.randn(r, generator=g, dtype=torch.float64) if gated else None
    ref = _dense_norm(W, A, B * gate if gated else B, s, fan_in_fan_out)
    base_sq = w0_row_sq_norm(W, fan_in_fan_out)
    few = dora_row_norm(W, A, B, gate, s, fan_in_fan_out, base_sq=base_sq, few_kernels=True)
    torch.testing.assert_close(few, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(few, dora_row_norm(W, A, B, gate, s, fan_in_fan_out, base_sq=base_sq, few_kernels=False),
                               rtol=1e-12, atol=1e-12)
    assert base_sq.equal(w0_row_sq_norm(W, fan_in_fan_out))  # the in-place finish leaves the cached norm alone
    f32 = dora_row_norm(W.float(), A.float(), B.float(), None if gate is None else gate.float(), s, fan_in_fan_out,
                        few_kernels=True)
    torch.testing.assert_close(f32.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_few_kernel_dora_output_equals_four_pass_form(dtype):
    """dora_output's addcmul form: the same values and gradients (magnitude, A, B, input) as the four-pass form."""
    from peftlab.methods.sora.layers import dora_output

    def run(few):
        g = torch.Generator().manual_seed(0)
        d_in, d_out, r, s = 12, 10, 4, 1.5
        base = nn.Linear(d_in, d_out, bias=True).to(dtype)
        lora_A, lora_B = nn.Linear(d_in, r, bias=False).to(dtype), nn.Linear(r, d_out, bias=False).to(dtype)
        mag = nn.Module()
        mag.weight = nn.Parameter(torch.rand(d_out, generator=g, dtype=dtype) + 0.5)
        mag.fan_in_fan_out = False
        with torch.no_grad():
            for m in (base, lora_A, lora_B):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=dtype))
            base.bias.copy_(torch.randn(d_out, generator=g, dtype=dtype))
        x = torch.randn(3, 5, d_in, generator=g, dtype=dtype, requires_grad=True)
        norm = dora_row_norm(base.weight, lora_A.weight.detach(), lora_B.weight.detach(), None, s)
        out = dora_output(mag, x, norm, lora_A, lora_B, s, base, base_result=base(x), few_kernels=few)
        out.pow(2).sum().backward()
        return out.detach(), [t.grad for t in (mag.weight, lora_A.weight, lora_B.weight, x)]

    (o1, g1), (o0, g0) = run(True), run(False)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o1, o0, **tol)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, **tol)


def _tiny_dora(fan_in_fan_out: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if fan_in_fan_out:  # GPT-2 Conv1D, weight stored d_in x d_out
        base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0,
                                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        targets = ["c_attn", "c_proj"]
    else:
        base = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 8))
        targets = ["0", "2"]
    base = base.double()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, lora_dropout=0.0))
    # make B non-zero so that the norm depends on the adapter
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n or "lora_magnitude" in n:
                p.add_(0.3 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_factored_dora_model_matches_peft_outputs_and_grads(fan_in_fan_out):
    ref = _tiny_dora(fan_in_fan_out)
    fast = copy.deepcopy(ref)
    keys_before = list(fast.state_dict().keys())
    mags = [id(p) for n, p in fast.named_parameters() if "lora_magnitude" in n]
    n = install_factored_dora(fast)
    n_peft = sum(type(mod).__name__ == "DoraLinearLayer" for mod in ref.modules())
    assert n == n_peft >= 2 and sum(isinstance(mod, FactoredDoraLayer) for mod in fast.modules()) == n
    assert list(fast.state_dict().keys()) == keys_before  # checkpoints and exports unchanged
    assert [id(p) for n, p in fast.named_parameters() if "lora_magnitude" in n] == mags
    torch.manual_seed(1)
    if fan_in_fan_out:
        x = torch.randint(0, 50, (3, 16))
        out_r, out_f = ref(input_ids=x, labels=x), fast(input_ids=x, labels=x)
        lr, lf = out_r.loss, out_f.loss
        torch.testing.assert_close(out_f.logits, out_r.logits, rtol=1e-10, atol=1e-10)
    else:
        x = torch.randn(5, 24, dtype=torch.float64)
        lr, lf = ref(x).square().sum(), fast(x).square().sum()
        torch.testing.assert_close(lf, lr, rtol=1e-12, atol=1e-12)
    lr.backward()
    lf.backward()
    gr = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    gf = {n: p.grad for n, p in fast.named_parameters() if p.requires_grad}
    assert gr.keys() == gf.keys() and any("lora_magnitude" in k for k in gr)
    for k in gr:
        torch.testing.assert_close(gf[k], gr[k], rtol=1e-9, atol=1e-11, msg=k)


def test_dora_norm_setting_auto_is_cpu_safe():
    assert use_factored("auto", "cpu") is False
    assert use_factored("auto", "cuda") is True
    assert use_factored("factored", "cpu") is True
    assert use_factored("peft", "cuda") is False


@pytest.mark.parametrize("method", ["lora", "dora", "sdora", "sublora"])
def test_device_dependent_choices_read_the_device_the_model_is_built_for(monkeypatch, method):
    """lora.fused, lora.dora_norm and sora.fast_path (``auto``: on for CUDA) must see the device the model is built for,
    with or without an accelerator. They read the accelerator's device only, so `load_run(run, device="cuda")` (no
    accelerator) rebuilt a GPU run with the CPU implementation: peft's dense DoRA layer where the run trained with the
    factored one, and its validation loss differed from the run's own by 3e-6 on the lent H100."""
    import peftlab.methods.lora as lora_mod
    import peftlab.methods.sora.method as sora_mod
    import peftlab.methods.sublora.method as sublora_mod
    from peftlab.build import build

    seen = []

    def spy(setting, device):
        seen.append(torch.device(device).type)
        return False

    for mod, name in [(lora_mod, "use_fused"), (lora_mod, "use_factored"), (sora_mod, "use_fast_path"), (sublora_mod, "use_fused")]:
        monkeypatch.setattr(mod, name, spy)
    from peftlab.config import load_config

    cfg = load_config(None, {"method": method, "model.name": "tiny-gpt2", "data.block_size": 32})
    real = build.__globals__["make_method"]
    monkeypatch.setitem(build.__globals__, "make_method",
                        lambda *a, **kw: real(*a, **{**kw, "device": "cuda" if kw.get("device") is not None else None}))
    # the build's device (here "cpu", handed on as "cuda" by the wrapper above: this machine has no GPU) reaches
    # every choice; before, make_method had no device and every choice saw "cpu"
    build(cfg, task="causal_lm", data=False, optimizer=False, device="cpu")
    assert seen and set(seen) == {"cuda"}, seen


def test_device_losses_read_back_the_per_step_floats():
    torch.manual_seed(0)
    vals = [torch.rand((), dtype=torch.float32) * 10 for _ in range(7)]
    buf = DeviceLosses()
    for v in vals:
        buf.append(v)
    assert len(buf) == 7
    got = buf.flush()
    assert got == [v.item() for v in vals]  # exact, not approximately
    assert len(buf) == 0 and buf.flush() == []
    buf.append(vals[0])
    assert buf.flush() == [vals[0].item()]


def test_device_batches_plain_and_prefetch_paths_agree_on_cpu():
    data = torch.arange(40).view(10, 4)
    load = lambda idx: {"input_ids": data[idx], "labels": data[idx].clone()}  # noqa: E731
    order = [[0, 1], [5, 6], [2, 9], [3, 3]]
    plain = list(device_batches(iter(order), load, torch.device("cpu"), prefetch=False))
    pre = list(device_batches(iter(order), load, torch.device("cpu"), prefetch=True))  # CPU: falls back to plain
    assert len(plain) == len(pre) == 4
    for a, b, idx in zip(plain, pre, order):
        assert torch.equal(a["input_ids"], data[idx]) and torch.equal(b["input_ids"], data[idx])
    assert prefetch_enabled("auto", torch.device("cpu")) is False
    assert prefetch_enabled("auto", torch.device("cuda")) is True
    assert prefetch_enabled("off", torch.device("cuda")) is False


def test_fused_adamw_only_on_cuda_under_auto():
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert adamw_options("auto", p) == {}
    assert adamw_options("auto", [{"params": p}]) == {}
    assert adamw_options("off", p) == {}
    assert adamw_options("on", p) == {"fused": True}
    with pytest.raises(PeftlabError, match="fused_optimizer"):
        adamw_options("sometimes", p)


def test_fused_cross_entropy_falls_back_on_cpu_and_refuses_when_forced():
    m = torch.nn.Linear(2, 2)
    assert fused_lm_loss(m, "off", "causal_lm", torch.device("cpu"), 1, False) is None
    assert fused_lm_loss(m, "auto", "causal_lm", torch.device("cpu"), 1, False) is None
    with pytest.raises(PeftlabError, match="not CUDA"):
        fused_lm_loss(m, "liger", "causal_lm", torch.device("cpu"), 1, False)


def test_output_upcast_kept_on_cpu_and_stripped_on_cuda():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from peftlab.train.fast import drop_output_upcast

    AcceleratorState._reset_state(True)  # an earlier test's Accelerator may have fixed the precision
    try:
        acc = Accelerator(cpu=True, mixed_precision="bf16")
        m = acc.prepare(torch.nn.Linear(3, 3))
        wrapped = m.forward
        assert drop_output_upcast(acc, m, torch.device("cpu")) is m and m.forward is wrapped
        assert m(torch.randn(2, 3)).dtype == torch.float32  # accelerate's float32 outputs stay on CPU
        # on one CUDA process the wrapper goes; the loop's own autocast still applies
        assert drop_output_upcast(acc, m, torch.device("cuda")) is m and "_original_forward" not in m.__dict__
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert m(torch.randn(2, 3)).dtype == torch.bfloat16
    finally:  # Accelerator state is process-wide: leave none behind for the other tests
        AcceleratorState._reset_state(True)


def test_optimizer_step_fast_path_equals_accelerate_step():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from peftlab.train.fast import optimizer_step

    AcceleratorState._reset_state(True)
    try:
        results = []
        for fast_path in (False, True):
            torch.manual_seed(0)
            acc = Accelerator(cpu=True)
            lin = torch.nn.Linear(4, 2)
            start = lin.weight.detach().clone()
            m, opt = acc.prepare(lin, torch.optim.AdamW(lin.parameters(), lr=0.1))
            for _ in range(3):
                acc.backward(m(torch.randn(5, 4)).square().sum())
                optimizer_step(opt) if fast_path else opt.step()
                opt.zero_grad()
            results.append([p.detach().clone() for p in m.parameters()])
            AcceleratorState._reset_state(True)
        for a, b in zip(*results):
            assert torch.equal(a, b)
        assert not torch.equal(results[1][0], start)  # the steps did move the weights
    finally:
        AcceleratorState._reset_state(True)


def _tiny_gpt2_lora(vocab: int = 50):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=16, bos_token_id=0,
                                      eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=0.0))
    for n, p in model.named_parameters():  # non-zero B so the adapters matter
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return model


def test_frozen_weights_setting_is_cpu_safe_and_validated():
    from peftlab.train.fast import frozen_cast_dtype

    assert frozen_cast_dtype("auto", "cpu", "bf16") is None
    assert frozen_cast_dtype("auto", "cuda", "bf16") is torch.bfloat16
    assert frozen_cast_dtype("auto", "cuda", "fp32") is None  # no autocast: nothing to match
    assert frozen_cast_dtype("compute", "cpu", "fp16") is torch.float16
    assert frozen_cast_dtype("fp32", "cuda", "bf16") is None
    with pytest.raises(PeftlabError, match="frozen_weights must be"):
        frozen_cast_dtype("half", "cuda", "bf16")


def test_cast_frozen_weights_gives_the_autocast_numbers_and_spares_trainable_and_tied():
    model = _tiny_gpt2_lora()
    x = torch.randint(0, 50, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(input_ids=x, labels=x)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    from peftlab.train.fast import cast_frozen_weights

    moved = cast_frozen_weights(model, torch.bfloat16)
    base = model.get_base_model()
    # c_attn / c_proj / c_fc / mlp c_proj weights and biases of both blocks; not wte (tied to lm_head), wpe, layer norms
    expected = sum(m.weight.numel() + m.bias.numel() for blk in base.transformer.h
                   for m in (blk.attn.c_attn.base_layer, blk.attn.c_proj, blk.mlp.c_fc.base_layer, blk.mlp.c_proj))
    assert moved == expected
    assert base.transformer.wte.weight.dtype == torch.float32 and base.lm_head.weight is base.transformer.wte.weight
    assert base.transformer.h[0].ln_1.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert sum(p.dtype == torch.bfloat16 for p in frozen) > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=x, labels=x)
    out.loss.backward()
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, ref_grads[n]), n


def test_pad_lm_head_gives_the_same_logits_and_gradients():
    from peftlab.train.fast import pad_lm_head, pad_vocab_enabled

    assert not pad_vocab_enabled("auto", "cpu") and pad_vocab_enabled("auto", "cuda") and pad_vocab_enabled("on", "cpu")
    ref_model = _tiny_gpt2_lora(vocab=50)
    model = copy.deepcopy(ref_model)
    assert pad_lm_head(model, multiple=64) == 64
    assert pad_lm_head(model, multiple=64) is None  # already patched: not twice
    head = model.get_base_model().lm_head
    assert head.weight.shape == (50, 32)  # the parameter is untouched
    x = torch.randint(0, 50, (2, 12))
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            a, b = ref_model(input_ids=x, labels=x), model(input_ids=x, labels=x)
        assert b.logits.shape == a.logits.shape == (2, 12, 50)
        torch.testing.assert_close(b.logits.float(), a.logits.float(), rtol=1e-6 if not autocast else 1e-2, atol=1e-6 if not autocast else 1e-2)
    a = ref_model(input_ids=x, labels=x)
    b = model(input_ids=x, labels=x)
    a.loss.backward()
    b.loss.backward()
    for (n, p), q in zip(ref_model.named_parameters(), model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)
    # a head whose size is aligned already is left alone
    assert pad_lm_head(_tiny_gpt2_lora(vocab=64), multiple=64) is None


def test_training_with_the_levers_forced_on_cpu_matches_the_default(tmp_path):
    """frozen_weights=compute changes no number under bf16 autocast; pad_vocab=on trains the same run."""
    from peftlab.config import config_from_dict
    from peftlab.train.loop import train

    def run(name, **system):
        raw = {"method": "lora", "model": {"name": "tiny-gpt2"}, "data": {"dataset": "lm-sample", "block_size": 32, "max_val_examples": 8},
               "training": {"max_steps": 4, "batch_size": 4, "log_steps": 1, "save_steps": 0, "eval_max_batches": 1},
               "lora": {"r": 4, "dropout": 0.0}, "output": {"dir": str(tmp_path / name)}, "logging": {"progress_bar": False},
               "system": {"device": "cpu", "dtype": "bf16", **system}}
        res = train(config_from_dict(raw), console=False)
        log = (tmp_path / name / "train.log").read_text()
        return (tmp_path / name / "loss_log.csv").read_text().splitlines(), res, log

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # bf16 runs: an earlier test's Accelerator may have fixed the precision
    try:
        _levers_runs(run)
    finally:
        AcceleratorState._reset_state(True)  # and later tests train in fp32


def _levers_runs(run):
    ref_log, ref, text = run("ref")
    assert "system.frozen_weights" not in text and "system.pad_vocab" not in text  # auto: off on CPU
    cast_log, cast, text = run("cast", frozen_weights="compute")
    assert "frozen matmul weights stored in bf16" in text
    assert cast_log == ref_log and cast["final"] == ref["final"]
    pad_log, pad, text = run("pad", pad_vocab="on")
    assert "LM head computed at 320 columns" in text  # tiny-gpt2: V = 260
    assert len(pad_log) == len(ref_log) and abs(pad["final"]["val_loss"] - ref["final"]["val_loss"]) < 1e-3


def test_attention_kernel_setting_is_a_no_op_on_cpu_and_validated():
    import contextlib

    from peftlab.train.fast import attention_context

    for s in ("auto", "default", "flash", "cudnn", "efficient"):
        assert attention_context(s, "cpu") is contextlib.nullcontext
    assert attention_context("default", "cuda") is contextlib.nullcontext
    assert attention_context("auto", "cuda") is contextlib.nullcontext
    with pytest.raises(PeftlabError, match="attention_kernel must be"):
        attention_context("xformers", "cpu")


def test_gc_control_freezes_after_the_first_step_and_restores_python_settings():
    import gc

    from peftlab.train.fast import GcControl

    assert not GcControl("auto", "cpu", 10).on and GcControl("auto", "cuda", 10).on
    with pytest.raises(PeftlabError, match="gc_control must be"):
        GcControl("sometimes", "cpu", 10)
    off = GcControl("off", "cpu", 10)
    off.step(1)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    ctl = GcControl("on", "cpu", 2)
    was = gc.isenabled()
    try:
        ctl.step(1)
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        import weakref

        class Node:
            pass

        node = Node()
        node.me = node  # a reference cycle made during training
        alive = weakref.ref(node)
        del node
        ctl.step(3)  # not a collection step (every=2) and automatic collection is off: still there
        assert alive() is not None
        ctl.step(4)  # a young-generation collection frees it
        assert alive() is None
    finally:
        ctl.close()
    assert gc.isenabled() == was and gc.get_freeze_count() == 0


def test_compile_scope_blocks_compiles_each_block_in_place_and_trains_the_same_run(tmp_path):
    """system.compile_scope=blocks: every transformer block compiled in place (under gradient checkpointing of half of
    them), the same per-step losses as the eager run to float32 rounding, and a checkpoint with the eager run's keys."""
    import csv

    import torch._dynamo

    from peftlab.config import config_from_dict
    from peftlab.train.loop import train

    def run(name, reentrant=False, **system):
        raw = {"method": "lora", "model": {"name": "tiny-gpt2", "gradient_checkpointing": True, "gradient_checkpointing_fraction": 0.5,
                         "gradient_checkpointing_reentrant": reentrant,
                         "dropout": 0.0},  # compiled dropout draws its masks from another random stream
               "data": {"dataset": "lm-sample", "block_size": 32, "max_val_examples": 8},
               "training": {"max_steps": 3, "batch_size": 4, "log_steps": 1, "save_steps": 0, "eval_max_batches": 1},
               "lora": {"r": 4, "dropout": 0.0}, "output": {"dir": str(tmp_path / name)}, "logging": {"progress_bar": False},
               "system": {"device": "cpu", **system}}
        res = train(config_from_dict(raw), console=False)
        rows = list(csv.DictReader((tmp_path / name / "loss_log.csv").open()))
        return [float(r["train_loss"]) for r in rows], res, (tmp_path / name / "train.log").read_text()

    ref, ref_res, _ = run("eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    got, res, text = run("blocks", compile=True, compile_scope="blocks")
    assert "system.compile_scope=blocks: 2 transformer blocks (GPT2Block) compiled in place" in text
    assert len(got) == len(ref) == 3
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-5, (got, ref)
    assert abs(res["final"]["val_loss"] - ref_res["final"]["val_loss"]) < 1e-5
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the blocks did run compiled
    # the compiled blocks inside torch's reentrant checkpoint (bench_quant's peftlab_cb_re side): the same run
    got_re, res_re, _ = run("blocks_re", reentrant=True, compile=True, compile_scope="blocks")
    assert max(abs(a - b) for a, b in zip(got_re, ref)) < 1e-5 and abs(res_re["final"]["val_loss"] - ref_res["final"]["val_loss"]) < 1e-5
    from safetensors.torch import load_file

    saved = {n: load_file(str(tmp_path / n / "adapter" / "adapter_model.safetensors")) for n in ("eager", "blocks")}
    assert sorted(saved["blocks"]) == sorted(saved["eager"]) and len(saved["eager"]) == 4  # no _orig_mod. in any name


def test_compile_scope_blocks_refuses_cuda_graphs():
    from peftlab.config import config_from_dict

    with pytest.raises(PeftlabError, match="compile_scope=blocks"):
        config_from_dict({"method": "lora", "model": {"name": "tiny-gpt2"}, "data": {"dataset": "lm-sample"},
                          "system": {"compile": True, "compile_scope": "blocks", "compile_mode": "reduce-overhead"}})
