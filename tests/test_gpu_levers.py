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

from peftlab.errors import PeftlabError
from peftlab.methods.dora_norm import FactoredDoraLayer, install_factored_dora, use_factored
from peftlab.methods.sora_layers import dora_row_norm, w0_row_sq_norm
from peftlab.train.fast import DeviceLosses, adamw_options, device_batches, fused_lm_loss, prefetch_enabled


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
