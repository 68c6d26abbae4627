"""Chunked linear + cross-entropy (peftlab/kernels/cross_entropy.py) and its wiring (system.fused_cross_entropy).

float64 on CPU against full logits + F.cross_entropy: the loss and the gradients of the hidden states and of
a trained head, with ignored labels and chunk sizes that do and do not divide the rows; tolerance 1e-12.
The loop's loss with ``chunked`` equals ``model(**batch).loss`` (the same autocast, float32 here).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from peftlab.errors import PeftlabError
from peftlab.kernels.cross_entropy import (chunk_loss_grad, chunk_rows, linear_cross_entropy, linear_cross_entropy_reference,
                                           pad_rows)
from peftlab.train.fast import fused_lm_loss

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("chunk,pad", [(1, 0), (7, 0), (16, 0), (1000, 0), (7, 8), (1000, 64)])
@pytest.mark.parametrize("head_trained", [False, True])
def test_chunked_equals_full_logits_float64(chunk, pad, head_trained):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(30, 6, generator=g, dtype=torch.float64, requires_grad=head_trained)
    y = torch.randint(0, 30, (2, 8), generator=g)
    y[0, :3] = -100
    y[1, -1] = -100
    leaves = [h, W] if head_trained else [h]
    out = []
    for fn in (lambda: linear_cross_entropy(h, W, y, chunk=chunk, pad_multiple=pad), lambda: linear_cross_entropy_reference(h, W, y)):
        loss = fn()
        out.append((loss, torch.autograd.grad(loss * 1.5, leaves)))
    (l1, g1), (l2, g2) = out
    assert l1.dtype == torch.float64 and abs(l1.item() - l2.item()) < 1e-12
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("chunk,pad", [(7, 0), (1000, 8)])
@pytest.mark.parametrize("head_trained", [False, True])
def test_chunk_body_equals_full_logits_float64(chunk, pad, head_trained):
    """The out-of-place chunk body (what system.chunked_cross_entropy=compiled compiles), run eagerly, in float64: the
    full-logits loss and gradients to 1e-12, padding columns and ignored labels included."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(29, 6, generator=g, dtype=torch.float64, requires_grad=head_trained)
    y = torch.randint(0, 29, (3, 9), generator=g)
    y[1, :4] = -100
    leaves = [h, W] if head_trained else [h]
    ref = linear_cross_entropy_reference(h, W, y)
    g_ref = torch.autograd.grad(ref * 0.7, leaves)
    import peftlab.kernels.cross_entropy as ce

    real, ce._COMPILED["f"] = ce._COMPILED.get("f"), chunk_loss_grad  # the body itself, uncompiled
    try:
        loss = linear_cross_entropy(h, W, y, chunk=chunk, pad_multiple=pad, compiled=True)
    finally:
        ce._COMPILED.pop("f") if real is None else ce._COMPILED.__setitem__("f", real)
    assert abs(loss.item() - ref.item()) < 1e-12
    for a, b in zip(torch.autograd.grad(loss * 0.7, leaves), g_ref):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


def _compiled_vs_eager(device, dtype, n, d, V, chunk, pad, atol_loss, atol_grad):
    import peftlab.kernels.cross_entropy as ce

    ce._compiled_chunk()  # built
    compiled, calls = ce._COMPILED["f"], []

    def counted(*args):
        calls.append(1)
        return compiled(*args)

    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, d, device=device, generator=g, dtype=dtype, requires_grad=True)
    W = (torch.randn(V, d, device=device, generator=g, dtype=dtype) * 0.1).requires_grad_()
    y = torch.randint(0, V, (n,), device=device, generator=g)
    y[: n // 5] = -100
    out = []
    ce._COMPILED["f"] = counted
    try:
        for on in (False, True):
            loss = linear_cross_entropy(h, W, y, chunk=chunk, pad_multiple=pad, compiled=on)
            out.append((loss, torch.autograd.grad(loss, [h, W])))
    finally:
        ce._COMPILED["f"] = compiled
    assert len(calls) == -(-n // chunk)  # the compiled body ran once per chunk, and only with compiled=True
    (l0, (dh0, dW0)), (l1, (dh1, dW1)) = out
    assert abs(l0.item() - l1.item()) <= atol_loss * abs(l0.item())
    for a, b in ((dh0, dh1), (dW0, dW1)):
        assert a.dtype == b.dtype and ((a.float() - b.float()).abs().max() / a.float().abs().max()) <= atol_grad


def test_compiled_chunks_equal_eager_cpu():
    """system.chunked_cross_entropy=compiled against eager on the CPU (inductor's C++ kernels): float32 rounding only.
    bf16 gradients are compared relative to their largest entry, to 2^-6: a few bf16 steps (2^-7 each near the top of
    a binade) where float32 rounding flips a cast of the logit gradient."""
    _compiled_vs_eager("cpu", torch.float32, 70, 16, 203, 32, 8, 1e-6, 1e-5)
    _compiled_vs_eager("cpu", torch.bfloat16, 70, 16, 203, 32, 8, 1e-6, 2 ** -6)


@cuda
def test_compiled_chunks_equal_eager_cuda():
    """The same on CUDA at an LM-head-like size (bf16, aligned and padded vocabularies)."""
    _compiled_vs_eager("cuda", torch.float32, 2048, 256, 32000, 700, 64, 1e-6, 1e-5)
    _compiled_vs_eager("cuda", torch.bfloat16, 2048, 256, 32003, 700, 64, 1e-6, 2 ** -6)


def test_pad_rows_appends_zero_rows_to_a_multiple():
    w, b = torch.randn(5, 3), torch.randn(5)
    pw, pb = pad_rows(w, 4), pad_rows(b, 4)
    assert pw.shape == (8, 3) and pb.shape == (8,)
    assert torch.equal(pw[:5], w) and torch.equal(pb[:5], b) and not pw[5:].any() and not pb[5:].any()
    assert pad_rows(w, 5) is w and pad_rows(w, 0) is w  # nothing to add: the tensor itself


def test_chunk_rows_and_no_valid_label():
    assert chunk_rows(151936) == 883 and chunk_rows(10**12) == 1
    h = torch.randn(4, 3, requires_grad=True)
    loss = linear_cross_entropy(h, torch.randn(5, 3), torch.full((4,), -100))
    assert torch.isnan(loss)  # as F.cross_entropy's mean over no rows
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, torch.randn(5, 3), torch.zeros(3, dtype=torch.long))


def _tiny_lora():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt2", vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.0,
                                                                                 task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    return model


def _loss_and_grads(model, fn) -> tuple[float, dict]:
    """``fn()``'s loss and the trainable gradients it gives, the random stream seeded first (the same dropout masks on
    every path); the gradients are cleared after."""
    torch.manual_seed(1)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def test_loop_loss_chunked_equals_the_model_loss():
    model = _tiny_lora()
    f = fused_lm_loss(model, "chunked", "causal_lm", torch.device("cpu"), 1, False)
    assert f is not None and f.kind == "chunked"
    x = torch.randint(0, 50, (3, 12))
    labels = x.clone()
    labels[0, :4] = -100  # a masked prompt
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels}
    model.train()
    res = [_loss_and_grads(model, fn) for fn in (lambda: f(batch), lambda: model(**batch).loss)]
    assert abs(res[0][0] - res[1][0]) < 1e-5
    for n, gr in res[0][1].items():
        assert torch.allclose(gr, res[1][1][n], atol=1e-6, rtol=1e-4), n


def test_loop_loss_compiled_chunks_switch():
    """system.chunked_cross_entropy: compiled gives the eager chunked loss and gradients (float32 rounding); auto is eager
    on the CPU; a wrong value is refused."""
    model = _tiny_lora()
    cpu = torch.device("cpu")
    assert fused_lm_loss(model, "chunked", "causal_lm", cpu, 1, False, chunk_kernel="auto").kind == "chunked"
    with pytest.raises(PeftlabError, match="chunked_cross_entropy must be auto, compiled or eager"):
        fused_lm_loss(model, "chunked", "causal_lm", cpu, 1, False, chunk_kernel="fast")
    from peftlab.config import config_from_dict

    with pytest.raises(PeftlabError, match="chunked_cross_entropy=compiled. has no effect"):
        config_from_dict({"system": {"chunked_cross_entropy": "compiled"}})  # the chunked loss is off by default
    assert config_from_dict({"system": {"chunked_cross_entropy": "compiled", "fused_cross_entropy": "chunked"}})
    x = torch.randint(0, 50, (3, 12))
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    model.train()
    res = []
    for kernel in ("eager", "compiled"):
        f = fused_lm_loss(model, "chunked", "causal_lm", cpu, 1, False, chunk_kernel=kernel)
        assert f.kind == ("chunked/compiled" if kernel == "compiled" else "chunked")
        res.append(_loss_and_grads(model, lambda: f(batch)))
    assert abs(res[0][0] - res[1][0]) < 1e-6
    for n, gr in res[0][1].items():
        assert torch.allclose(gr, res[1][1][n], atol=1e-6, rtol=1e-5), n


def test_switch_cpu_default_off_wrappers_refused():
    model = _tiny_lora()
    cpu = torch.device("cpu")
    assert fused_lm_loss(model, "auto", "causal_lm", cpu, 1, False) is None  # auto: CUDA only
    assert fused_lm_loss(model, "off", "causal_lm", cpu, 1, False) is None
    with pytest.raises(PeftlabError, match="must be auto, liger, chunked or off"):
        fused_lm_loss(model, "fast", "causal_lm", cpu, 1, False)
    with pytest.raises(PeftlabError, match="one process"):
        fused_lm_loss(model, "chunked", "causal_lm", cpu, 2, False)

    class Wrapper(torch.nn.Module):  # a method's own forward around the peft model (SubLoRA's)
        def __init__(self, m):
            super().__init__()
            self.model = m

        def get_base_model(self):
            return self.model.get_base_model()

    with pytest.raises(PeftlabError, match="its own forward"):
        fused_lm_loss(Wrapper(model), "chunked", "causal_lm", cpu, 1, False)
    assert fused_lm_loss(Wrapper(model), "auto", "causal_lm", torch.device("cuda"), 1, False) is None


def test_training_with_chunked_cross_entropy_matches_off(tmp_path):
    from peftlab.config import config_from_dict
    from peftlab.train.loop import train

    def run(name, fce):
        raw = {"method": "lora", "model": {"name": "tiny-gpt2"}, "data": {"dataset": "lm-sample", "block_size": 32, "max_val_examples": 8},
               "training": {"max_steps": 3, "batch_size": 4, "log_steps": 1, "save_steps": 0, "eval_max_batches": 1},
               "lora": {"r": 4, "dropout": 0.0}, "output": {"dir": str(tmp_path / name)}, "logging": {"progress_bar": False},
               "system": {"device": "cpu", "fused_cross_entropy": fce}}
        res = train(config_from_dict(raw), console=False)
        return res, (tmp_path / name / "train.log").read_text()

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # an earlier test's Accelerator may have fixed another precision
    ref, text = run("off", "auto")
    assert "fused_cross_entropy" not in text
    ch, text = run("chunked", "chunked")
    assert "LM-head linear + cross-entropy fused (chunked)" in text
    assert abs(ch["final"]["train_loss"] - ref["final"]["train_loss"]) < 1e-5
    assert abs(ch["final"]["val_loss"] - ref["final"]["val_loss"]) < 1e-5


@cuda
def test_chunked_bf16_close_to_plain_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(4096, 256, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(32000, 256, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
    y = torch.randint(0, 32000, (4096,), device="cuda", generator=g)
    a = linear_cross_entropy(h, W, y, chunk=1000)
    (ga,) = torch.autograd.grad(a, [h])
    b = linear_cross_entropy_reference(h, W, y)
    (gb,) = torch.autograd.grad(b, [h])
    assert abs(a.item() - b.item()) < 1e-3 * abs(b.item())
    assert ((ga.float() - gb.float()).abs().max() / gb.float().abs().max()) < 2e-2
