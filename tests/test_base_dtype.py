"""model.base_dtype: the frozen base stored in bf16 (trainable tensors float32), CPU default unchanged."""

from __future__ import annotations

import pytest
import torch

from peftlab.build import base_dtype, build
from peftlab.config import config_from_dict
from peftlab.errors import PeftlabError


def _cfg(method="lora", bd="auto", dt="fp32", model="tiny-gpt2", **model_kw):
    return config_from_dict({"method": method, "model": {"name": model, "base_dtype": bd, **model_kw},
                             "system": {"dtype": dt, "device": "cpu"}, "output": {"dir": "/tmp/peftlab_test_base_dtype"}})


def _build(cfg, task="causal_lm"):
    return build(cfg, data=False, task=task, num_labels=2 if task == "classification" else None, optimizer=False).model


def test_auto_is_bf16_on_cuda_with_bf16_only():
    assert base_dtype(_cfg(dt="bf16"), "cuda") is torch.bfloat16
    assert base_dtype(_cfg(dt="bf16"), "cpu") is None  # CPU: float32, today's numbers
    assert base_dtype(_cfg(dt="fp16"), "cuda") is None
    assert base_dtype(_cfg(dt="fp32"), "cuda") is None
    assert base_dtype(_cfg(bd="float32", dt="bf16"), "cuda") is None
    assert base_dtype(_cfg(bd="bfloat16", dt="bf16"), "cpu") is torch.bfloat16


def test_bfloat16_without_bf16_autocast_is_refused_before_the_build():
    with pytest.raises(PeftlabError, match="needs system.dtype=bf16"):
        _build(_cfg(bd="bfloat16", dt="fp32"))


def test_cpu_default_keeps_everything_float32_and_the_same_numbers():
    a = _build(_cfg())
    b = _build(_cfg(bd="float32"))
    assert {p.dtype for p in a.parameters()} == {torch.float32}
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_bfloat16_base_frozen_bf16_trainable_fp32(method):
    model = _build(_cfg(method=method, bd="bfloat16", dt="bf16"))
    ref = _build(_cfg(method=method))
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    if method == "full":
        assert not frozen
    else:
        assert frozen and all(p.dtype == torch.bfloat16 for p in frozen.values())
        # the tied embedding is one bf16 tensor, no float32 copy
        hf = model.get_base_model()
        assert hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
        assert hf.get_input_embeddings().weight.dtype == torch.bfloat16
    # the same init as the float32 build, rounded (built-in tiny models init on the CPU in float32)
    refp = dict(ref.named_parameters())
    for n, p in frozen.items():
        assert torch.equal(p, refp[n].to(torch.bfloat16)), n
    # it trains under bf16 autocast: gradients reach the float32 trainable tensors
    x = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained.values() if p.ndim == 2)


def test_classification_head_trained_in_float32():
    model = _build(_cfg(bd="bfloat16", dt="bf16", model="tiny-bert"), task="classification")
    heads = [(n, p) for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert heads and all(p.dtype == torch.float32 for _, p in heads)


def test_llama3_8b_config_is_the_published_shape():
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    from peftlab.models import CONFIG_DIR, shipped_configs

    assert "llama-3-8b" in shipped_configs()
    spec = json.loads((CONFIG_DIR / "llama-3-8b.json").read_text())
    spec.pop("architectures")
    c = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(c)
    # Meta-Llama-3-8B: 8.03B parameters (untied 128,256 x 4,096 embedding and head)
    assert sum(p.numel() for p in m.parameters()) == 8_030_261_248


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_from_scratch_base_is_built_on_the_gpu_in_bf16_cuda():
    import time

    cfg = config_from_dict({"method": "lora", "model": {"name": "gpt2", "from_scratch": True, "target_modules": ["c_attn"], "base_dtype": "bfloat16"},
                            "data": {"tokenizer": "byte"}, "system": {"dtype": "bf16", "device": "cuda"},
                            "output": {"dir": "/tmp/peftlab_test_base_dtype_cuda"}})
    t = time.perf_counter()
    model = build(cfg, data=False, task="causal_lm", optimizer=False, device="cuda").model
    assert time.perf_counter() - t < 30
    for n, p in model.named_parameters():
        assert p.device.type == "cuda", n
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), n
