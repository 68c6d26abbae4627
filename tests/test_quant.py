"""Quantized bases (model.quantization: nf4 | fp4 | int8) through bitsandbytes.

Three tiers: what needs no bitsandbytes (config refusals, the gradient hooks BA-LoRA uses on a
quantized base) runs everywhere; what needs bitsandbytes runs on the CPU where bitsandbytes 0.48+
is installed (its CPU backend; CI's environment has none, so these skip there); the parity with
hand-written HF PEFT + bitsandbytes, exact resume, load_run and export also run on a CUDA device
(``cuda`` below), where the lead's GPU machine has bitsandbytes.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil

import pytest
import torch

from conftest import make_cfg

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
bnb = pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (pip install bitsandbytes; 0.48+ runs on the CPU)")
DEVICES = [pytest.param("cpu", marks=bnb),
           pytest.param("cuda", marks=[bnb, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])]

SMALL = dict(training__max_steps=6, training__batch_size=4, data__max_train_examples=48, data__max_val_examples=16,
             training__log_steps=1, training__save_steps=3, training__save_total_limit=None, lora__dropout=0.0,
             model__dropout=0.0, model__gradient_checkpointing=True)


def qcfg(tmp_path, device="cpu", quantization="nf4", **kw):
    dev = {"system__device": device}
    if device == "cuda":
        dev["system__dtype"] = "bf16"
    return make_cfg(tmp_path, **{**SMALL, **dev, "model__quantization": quantization, **kw})


# ----------------------------------------------------------------------------- no bitsandbytes needed
@pytest.mark.parametrize("method", ["full", "rsvd"])
def test_methods_that_train_the_base_are_refused_a_quantized_base(tmp_path, method):
    from peftlab.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"model.quantization=nf4` keeps the base frozen.*method {method} trains the base.*"
                                          r"lora, .*--model.quantization=none"):
        make_cfg(tmp_path, method=method, model__quantization="nf4")


def test_missing_or_old_bitsandbytes_is_refused_before_any_work(tmp_path, monkeypatch):
    from peftlab.config import sections
    from peftlab.errors import ConfigError

    monkeypatch.setattr(sections, "bnb_version", lambda: None)
    with pytest.raises(ConfigError, match=r"through bitsandbytes, which is not installed.*pip install bitsandbytes.*"
                                          r"--model.quantization=none"):
        make_cfg(tmp_path, model__quantization="int8")
    monkeypatch.setattr(sections, "bnb_version", lambda: (0, 45, 0))
    with pytest.raises(ConfigError, match=r"system.device=cpu, and bitsandbytes 0.45.0 has no CPU backend for fp4.*pip install -U"):
        make_cfg(tmp_path, model__quantization="fp4", system__device="cpu")


def test_bad_quantization_values_name_the_choices(tmp_path):
    from peftlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.quantization.*'none', 'nf4', 'fp4', 'int8'"):
        make_cfg(tmp_path, model__quantization="q4")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_hooked_weight_gradients_equal_autograd(tmp_path, checkpointing):
    """BA-LoRA's importance phase on a quantized base: dL/dW from hooks == autograd's weight.grad."""
    from peftlab.build import build_base, enable_gradient_checkpointing
    from peftlab.methods.ba_lora.method import _hooked_weight_grads, _Target

    cfg = make_cfg(tmp_path, model__dropout=0.0)
    model, _, _ = build_base(cfg, "causal_lm", None)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    mods = {n: m for n, m in model.named_modules() if n.endswith("c_attn")}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in mods.values():
        m.weight.requires_grad_(True)
    model(input_ids=ids, labels=ids).loss.backward()
    want = {n: m.weight.grad.clone() for n, m in mods.items()}
    for m in mods.values():
        m.weight.requires_grad_(False)
        m.weight.grad = None
    targets = {n: _Target(m, m.weight.shape[0], m.weight.shape[1], conv1d=True) for n, m in mods.items()}
    with _hooked_weight_grads(targets) as got:
        model(input_ids=ids, labels=ids).loss.backward()
    for n in mods:  # Conv1D stores (d_in, d_out): the hooks give nn.Linear's (d_out, d_in)
        torch.testing.assert_close(got[n].T, want[n], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- bitsandbytes (CPU backend or GPU)
@pytest.mark.parametrize("device", DEVICES)
def test_quantized_lora_trains_resumes_loads_and_exports(tmp_path, device):
    from peft import PeftModel

    from peftlab.export import export_run, load_base, merge_note
    from peftlab.models.quant import is_quantized
    from peftlab.runs import load_run
    from peftlab.train import train

    cfg = qcfg(tmp_path, device)
    res = train(cfg, console=False)
    run = tmp_path / "run"
    assert res["status"] == "completed" and res["global_step"] == 6
    # resume from step 3 ends exactly where the uninterrupted run ended
    copy = tmp_path / "resumed"
    shutil.copytree(run, copy)
    for p in ("results_final.json", "training_history.json", "adapter", "base_model", "checkpoints/step-6", "checkpoints/epoch-1"):
        t = copy / p
        shutil.rmtree(t) if t.is_dir() else t.unlink(missing_ok=True)
    again = train(cfg.replace({"output.dir": str(copy), "training.resume_from": "latest"}), console=False)
    assert again["final"] == res["final"]
    def losses(d):  # every column but the GPU memory (a resumed process has not made the earlier allocations)
        return [{k: v for k, v in row.items() if k != "gpu_memory_mb"} for row in csv.DictReader(open(d / "loss_log.csv"))]

    assert losses(copy) == losses(run)
    # load_run rebuilds the quantized base (same Q(W)) and the trained adapter: the same val loss
    loaded = load_run(run, device=device)
    assert is_quantized(loaded.model.get_base_model())
    assert loaded.evaluate()["val_loss"] == res["final"]["val_loss"]
    trainable = [p for p in loaded.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    # the exported adapter loads onto the same quantized base with PeftModel.from_pretrained
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        want = loaded.model.eval()(input_ids=ids).logits
    out = export_run(run, tmp_path / "export")
    base, _ = load_base(run, device=device)
    assert is_quantized(base)
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, str(out)).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    # --merge: into the dequantized base, in the compute dtype, said so
    from transformers import AutoModelForCausalLM

    merged = export_run(run, tmp_path / "merged", merge=True)
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    assert "dequantized base" in merge_note(run)
    m = AutoModelForCausalLM.from_pretrained(str(merged)).to(device).eval()
    with torch.no_grad():
        tol = 2e-2 if device == "cpu" else 6e-2  # bf16 on the GPU: merged Q(W) + s B A rounds once more
        torch.testing.assert_close(m(input_ids=ids).logits.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method,quantization,kind", [("dora", "fp4", "lm"), ("sora", "int8", "lm"), ("sdora", "nf4", "cls"),
                                                      ("ba_lora", "nf4", "lm"), ("sublora", "nf4", "lm")])
def test_every_adapter_method_trains_on_a_quantized_base(tmp_path, device, method, quantization, kind):
    from peftlab.runs import load_run
    from peftlab.train import train

    extra = {"data__max_length": 32} if kind == "cls" else {}
    if method == "sublora":
        extra.update(sublora__intrinsic_dim=64, model__gradient_checkpointing=False)
    if method == "ba_lora":
        extra.update(ba_lora__gradient_samples=8)
    cfg = make_cfg(tmp_path, kind, **{**SMALL, "method": method, "model__quantization": quantization, "system__device": device,
                                      **({"system__dtype": "bf16"} if device == "cuda" else {}), **extra})
    res = train(cfg, console=False)
    assert res["status"] == "completed"
    assert load_run(tmp_path / "run", device=device).evaluate()["val_loss"] == res["final"]["val_loss"]


@pytest.mark.skipif(not (HAS_BNB and torch.cuda.is_available()), reason="LoftQ needs CUDA and bitsandbytes")
def test_loftq_init_trains_rebuilds_and_exports_its_base(tmp_path):
    """lora.init=loftq (peft's LoftQ: the base becomes Q(W), A and B the SVD of W - Q(W)): load_run
    recomputes Q(W) and reproduces the val loss; the export's adapter loads onto adapter/loftq_base."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from peftlab.export import export_run
    from peftlab.runs import load_run
    from peftlab.train import train

    cfg = make_cfg(tmp_path, "cls", **{**SMALL, "lora__init": "loftq", "lora__r": 4, "data__max_length": 32, "system__device": "cuda"})
    res = train(cfg, console=False)
    loaded = load_run(tmp_path / "run", device="cuda")
    assert loaded.evaluate()["val_loss"] == res["final"]["val_loss"]
    out = export_run(tmp_path / "run", tmp_path / "export", which="latest")
    assert (out / "loftq_base" / "config.json").is_file()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        want = loaded.model.eval()(input_ids=ids).logits
        base = AutoModelForSequenceClassification.from_pretrained(str(out / "loftq_base")).cuda()
        got = PeftModel.from_pretrained(base, str(out)).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@bnb
def test_bounds_state_the_quantized_prior(tmp_path):
    from peftlab.bounds.evaluate import base_statement

    s = base_statement(qcfg(tmp_path))
    assert s["quantization"] == "nf4" and s["double_quant"] is True
    assert s["prior"].startswith("the quantized base (bitsandbytes nf4, double quantization, compute dtype float32)")


# ----------------------------------------------------------------------------- parity with hand-written HF PEFT + bitsandbytes
@pytest.mark.parametrize("device", DEVICES)
def test_loss_matches_hand_written_peft_bitsandbytes_step_for_step(tmp_path, device):
    """The same tiny model (from its config and seed), data and seed, trained by hand the way a
    researcher writes QLoRA (save the model, reload with BitsAndBytesConfig, get_peft_model, AdamW):
    peftlab's logged loss equals it step for step within 1e-5 relative (measured on the CPU: equal
    to float32 rounding, 4e-8). The GPU levers that change rounding only (fused AdamW, the padded
    LM head) are off here; nf4 against fp4 differs by 2.5e-4 at the first step on this model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peftlab.build import build, build_base
    from peftlab.data.batches import EpochBatches
    from peftlab.models import set_dropout
    from peftlab.train import train

    steps = 8
    cfg = qcfg(tmp_path, device, training__max_steps=steps, training__save_steps=0, training__lr_scheduler="constant",
               training__max_grad_norm=None, training__warmup_ratio=0.0, model__gradient_checkpointing=False,
               system__fused_optimizer="off", system__pad_vocab="off")
    train(cfg, console=False)
    with open(tmp_path / "run" / "loss_log.csv") as f:
        ours = [float(r["train_loss"]) for r in csv.DictReader(f)][:steps]

    # --- by hand ---------------------------------------------------------------
    t = cfg.training
    data = build(cfg.replace({"method": "lora"}), optimizer=False)  # only for its datasets and collate (peftlab's loaders)
    base, _, _ = build_base(cfg.replace({"model.quantization": "none"}), "causal_lm", None)  # same seed -> same weights
    folder = tmp_path / "fp32"
    base.save_pretrained(folder, safe_serialization=True)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, device_map={"": 0 if device == "cuda" else "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=dtype))
    set_dropout(model, 0.0)  # model.dropout=0 (the saved config still says GPT-2's 0.1)
    torch.manual_seed(t.seed + 1)  # peftlab's adapter-init seed
    model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0, target_modules=["c_attn"],
                                             task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=0.0)
    model.train()
    theirs = []
    order = EpochBatches(len(data.train_ds), t.batch_size, t.seed, 0, 1).epoch(0)
    for idx, _ in zip(order, range(steps)):
        batch = {k: v.to(device) for k, v in data.collate([data.train_ds[i] for i in idx]).items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        theirs.append(loss.item())
    assert len(ours) == len(theirs) == steps
    for a, b in zip(ours, theirs):
        assert abs(a - b) <= 1e-5 * abs(b), (ours, theirs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantization", ["nf4", "fp4"])  # int8 DoRA fails in bitsandbytes 0.50.2 on the CPU with peft's layer too
def test_factored_dora_norm_on_a_quantized_base_is_peft_dora(tmp_path, device, quantization):
    """`lora.dora_norm=factored` on a bitsandbytes base (the default on CUDA): the dequantized weight's row norm
    from W0 A^T and A A^T, not from the dense W0 + s B A; same outputs and adapter gradients as peft's DoRA layer."""
    from peftlab.build import build
    from peftlab.methods.dora_norm import FactoredDoraLayer

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    out = {}
    for norm in ("peft", "factored"):
        cfg = qcfg(tmp_path / norm, device, quantization, method="dora", lora__dora_norm=norm)
        model = build(cfg, optimizer=False, data=False, task="causal_lm", device=device).model
        layers = [m for m in model.modules() if isinstance(m, FactoredDoraLayer)]
        assert (len(layers) > 0) == (norm == "factored")
        with torch.no_grad():  # move B off zero so that the norm depends on the adapter
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(p))
        model.train()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        out[norm] = (loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None})
    tol = dict(rtol=2e-2, atol=1e-3) if device == "cuda" else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["factored"][0], out["peft"][0], **tol)
    assert out["factored"][1].keys() == out["peft"][1].keys() and any("magnitude" in n for n in out["peft"][1])
    for n, g in out["peft"][1].items():
        torch.testing.assert_close(out["factored"][1][n], g, **tol, msg=lambda m, n=n: f"{n}: {m}")


def assert_first_block_is_one_graph(model, device) -> None:
    """The model's first transformer block, called with the arguments a training forward gives it, traces without a
    graph break (what `system.compile_scope=blocks` compiles)."""
    import torch._dynamo as dynamo

    from peftlab.train.sharding import transformer_blocks

    block = transformer_blocks(model, "system.compile_scope=blocks", "model")[0]
    calls = []
    block.register_forward_hook(lambda mod, args, kwargs, out: calls.append((args, kwargs)), with_kwargs=True)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    model.train()  # (in eval mode on an AVX-512 CPU bitsandbytes repacks the weights for its inference kernel)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)  # no KV cache among the block's arguments
    args, kwargs = calls[0]
    explained = dynamo.explain(lambda *a, **k: block(*a, **k))(*args, **kwargs)
    dynamo.reset()
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]


@pytest.mark.parametrize("device", DEVICES)
def test_dora_on_a_4bit_base_compiles_each_block_into_one_graph(tmp_path, device):
    """peftlab's dequantization of a 4-bit base weight (DoRA's row norm) is peft's, value for value, and traces without
    a graph break, so `system.compile_scope=blocks` on an NF4 base compiles a DoRA block into one graph (peft's own helper
    reads the weight's `__class__` and, on the CPU, re-assigns `module.weight`: 18 breaks per block)."""
    from peft.utils.integrations import dequantize_module_weight

    from peftlab.build import build
    from peftlab.models.quant import float_weight

    cfg = qcfg(tmp_path, device, "nf4", method="dora", lora__dora_norm="factored", model__gradient_checkpointing=False)
    model = build(cfg, optimizer=False, data=False, task="causal_lm", device=device).model
    quantized = [m.get_base_layer() for m in model.modules() if hasattr(m, "lora_magnitude_vector") and m.lora_magnitude_vector]
    assert quantized and all(not q.weight.is_floating_point() for q in quantized)
    for q in quantized:
        assert torch.equal(float_weight(q), dequantize_module_weight(q))
    assert_first_block_is_one_graph(model, device)


# ----------------------------------------------------------------------------- system.quant_linear
def _linear4bit(quant_type, double_quant, device, dtype, seed=0):
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    plain = torch.nn.Linear(256, 192)
    m = bnb.nn.Linear4bit(256, 192, bias=True, compute_dtype=dtype, quant_type=quant_type, compress_statistics=double_quant)
    m.weight = bnb.nn.Params4bit(plain.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                 compress_statistics=double_quant)
    m.bias = torch.nn.Parameter(plain.bias.data.clone().to(dtype), requires_grad=False)
    return m.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_quant_linear_gives_bitsandbytes_numbers_eager_and_compiled(device, quant_type, double_quant):
    """peftlab's 4-bit linear (system.quant_linear) against bnb.nn.Linear4bit: forward and input gradient bit for bit,
    eager and under torch.compile (NF4's dequantization then in torch ops), at a batch past bitsandbytes' small-batch
    kernel (2,048 rows); on CUDA in bf16 as training runs it."""
    from peftlab.kernels.linear4bit import dequantize_nf4
    from peftlab.train.quant_linear import install_quant_linear, uninstall_quant_linear

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    m = _linear4bit(quant_type, double_quant, device, dtype)
    x = torch.randn(2, 1024, 256, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(2, 1024, 192, device=device, dtype=dtype)

    def run(f):
        x.grad = None
        y = f(x)
        y.backward(dy)
        return y.detach(), x.grad.clone()

    want = run(m)
    assert install_quant_linear(m) == 1
    qs = m.weight.quant_state
    if quant_type == "nf4":  # the torch-op dequantization is bitsandbytes' kernel, value for value
        import bitsandbytes.functional as bnbf

        assert torch.equal(dequantize_nf4(m.weight, m._peftlab_absmax[1], qs.code, qs.blocksize, qs.shape, dtype),
                           bnbf.dequantize_4bit(m.weight, qs).to(dtype))
    for name, f in (("eager", m), ("compiled", torch.compile(m))):
        got = run(f)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), name
    import bitsandbytes.functional as bnbf

    from peftlab.models.quant import float_weight

    deq = bnbf.dequantize_4bit(m.weight, qs)  # DoRA's row norm reads the weight through float_weight: the same values
    for name, f in (("eager", float_weight), ("compiled", torch.compile(float_weight))):
        got = f(m)
        assert got.dtype == deq.dtype and torch.equal(got, deq), name
    torch._dynamo.reset()
    assert uninstall_quant_linear(m) == 1 and "forward" not in m.__dict__


@pytest.mark.parametrize("device", DEVICES)
def test_quant_linear_falls_back_where_bitsandbytes_differs(device):
    """A trainable bias and (on CUDA) a small batch keep bitsandbytes' own forward: peftlab's is never called."""
    from peftlab.train import quant_linear

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    m = _linear4bit("nf4", True, device, dtype)
    quant_linear.install_quant_linear(m)
    calls = []
    real = quant_linear.linear_4bit
    quant_linear.linear_4bit = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        m(torch.randn(4, 256, 256, device=device, dtype=dtype))
        took_big = len(calls)
        m.bias.requires_grad_(True)
        m(torch.randn(4, 256, 256, device=device, dtype=dtype))
        assert len(calls) == took_big == (0 if device == "cuda" else 1)  # 1,024 rows: bitsandbytes' own on CUDA
        m.bias.requires_grad_(False)
        m(torch.randn(4, 1024, 256, device=device, dtype=dtype))
        assert len(calls) == took_big + 1
    finally:
        quant_linear.linear_4bit = real


@bnb
@pytest.mark.parametrize("method", ["lora", "dora", "sdora"])
def test_quant_linear_on_trains_the_same_numbers_as_off(tmp_path, method):
    """A whole quantized run with system.quant_linear=on and =off: the same losses, step for step (CPU); DoRA and SDoRA
    with the factored row norm, which reads the base weight through float_weight."""
    from peftlab.train import train

    out = {}
    for setting in ("on", "off"):
        cfg = qcfg(tmp_path / setting, "cpu", system__quant_linear=setting, training__max_steps=3, training__save_steps=100,
                   method=method, **({} if method == "lora" else {"lora__dora_norm": "factored"}))
        res = train(cfg, console=False)
        out[setting] = [r["train_loss"] for r in csv.DictReader(open(tmp_path / setting / "run" / "loss_log.csv"))]
        assert res["status"] == "completed"
    log = (tmp_path / "on" / "run" / "train.log").read_text()
    assert "system.quant_linear:" in log and "4-bit linear layers computed by peftlab's forward" in log
    assert out["on"] == out["off"] and len(out["on"]) == 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_quant_linear_blocks_compile_into_one_graph(tmp_path, device, method):
    """With system.quant_linear's forward installed, a LoRA or DoRA block on an NF4 base still traces as one graph
    (system.compile_scope=blocks), every 4-bit linear inside it."""
    from peftlab.build import build
    from peftlab.train.quant_linear import install_quant_linear

    cfg = qcfg(tmp_path, device, "nf4", method=method, lora__dora_norm="factored", model__gradient_checkpointing=False)
    model = build(cfg, optimizer=False, data=False, task="causal_lm", device=device).model
    assert install_quant_linear(model) > 0
    assert_first_block_is_one_graph(model, device)
