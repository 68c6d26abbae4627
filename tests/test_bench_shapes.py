"""benchmarks/gpu_shapes.py (bench_gpu.py's DistilBERT and Qwen2.5-3B cases), checked on the CPU.

* the shipped qwen2.5-3b config has the published shape (3.09B parameters, 2.77B without the embedding);
* the FLOPs formula counts exactly the matmul weights of the models both sides build;
* the offline data goes through peftlab's real data layer: 128-token classification examples,
  uint32 token bins for a 151,665-token tokenizer;
* both sides of every shape run a few steps at toy size through the code the GPU run uses.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_shapes as gs  # noqa: E402


def test_qwen_config_is_the_published_shape():
    from transformers import AutoModelForCausalLM

    from peftlab.models import shipped_configs

    assert "qwen2.5-3b" in shipped_configs()
    s = gs.shape_spec("qwen3b")
    c = gs.hf_config(s)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.vocab_size) == \
        (2048, 36, 16, 2, 11008, 151936)
    assert c.tie_word_embeddings and c.max_position_embeddings == 32768
    theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", None))
    assert theta == 1e6
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(c)
    n = sum(p.numel() for p in m.parameters())
    emb = m.get_input_embeddings().weight.numel()
    assert m.lm_head.weight is m.get_input_embeddings().weight
    # Qwen2.5-3B model card: 3.09B parameters, 2.77B non-embedding
    assert n == 3_085_938_688 and n - emb == 2_774_773_760
    # matmul weights: everything but RMSNorm weights (2 per layer + final) and the q/k/v biases, the tied head once
    fl = gs.shape_flops(s)
    assert fl["n_frozen"] == n - (36 * 2 + 1) * 2048 - 36 * (2048 + 256 + 256) == 3_085_697_024
    # r=16 on q, k, v, o: 16 * ((2048+2048) + 2 * (2048+256) + (2048+2048)) per layer
    assert fl["n_adapter"] == 36 * 16 * (4096 + 2 * 2304 + 4096)
    # attention over the 16 query heads of 128 (not the 2 KV heads), full T x T
    assert fl["attention"] == 12 * 36 * 2048 * 1024
    assert fl["model"] == 4 * fl["n_frozen"] + 6 * fl["n_adapter"] + fl["attention"]
    assert fl["hardware"] - fl["model"] == 2 * fl["n_layers"] + 2 * fl["n_adapter"] + 4 * 36 * 2048 * 1024


def _linear_weights(modules) -> int:
    seen = {}
    for m in modules:
        if isinstance(m, torch.nn.Linear):
            seen[id(m.weight)] = m.weight.numel()
    return sum(seen.values())


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_flops_count_the_built_models_weights(kind):
    # the baseline builder at toy size; its matmul weights must be what the formula counts
    s = gs.shape_spec("qwen3b", tiny=True)
    m = gs.build_baseline(s, kind, torch.device("cpu"))
    fl = gs.shape_flops(s)
    frozen = [mod for name, mod in m.named_modules() if "lora_" not in name]
    adapters = [mod for name, mod in m.named_modules() if "lora_A" in name or "lora_B" in name]
    assert _linear_weights(frozen) == fl["n_frozen"]
    assert _linear_weights(adapters) == fl["n_adapter"] > 0
    layers = [mod for name, mod in m.named_modules() if ".layers." in name and "lora_" not in name]
    assert _linear_weights(layers) == fl["n_layers"]

    s = gs.shape_spec("distilbert", tiny=True)
    m = gs.build_baseline(s, "lora", torch.device("cpu"))
    fl = gs.shape_flops(s)
    enc = [mod for name, mod in m.named_modules() if ".transformer.layer." in name and "lora_" not in name]
    assert _linear_weights(enc) == fl["n_layers"] == fl["n_frozen"]
    head = [mod for name, mod in m.named_modules() if name.endswith(("pre_classifier.modules_to_save.default", "classifier.modules_to_save.default"))]
    assert len(head) == 2 and _linear_weights(head) == fl["n_head_cls"]
    assert all(p.requires_grad for h in head for p in h.parameters())
    adapters = [mod for name, mod in m.named_modules() if "lora_A" in name or "lora_B" in name]
    assert _linear_weights(adapters) == fl["n_adapter"]
    T = s["seq"]
    assert math.isclose(fl["model"], 4 * fl["n_frozen"] + 6 * fl["n_adapter"] + 6 * fl["n_head_cls"] / T + fl["attention"])
    assert fl["hardware"] == fl["model"]  # no gradient checkpointing for DistilBERT


def test_offline_data_goes_through_peftlab_data_layer(tmp_path):
    from transformers import AutoTokenizer

    from peftlab.config import config_from_dict
    from peftlab.data import build_datasets, load_raw

    s = gs.shape_spec("distilbert")  # full size: 128 tokens, vocabulary 30,522
    s["batch"] = 4
    data = gs.write_data(tmp_path / "cls", s, n_steps=2)
    cfg = config_from_dict({"model": {"name": "distilbert-base-uncased", "from_scratch": True},
                            "data": {"dataset": data["dataset"], "tokenizer": data["tokenizer"], "max_length": 128},
                            "output": {"dir": str(tmp_path / "run")}})
    raw = load_raw(cfg)
    assert raw.task == "classification" and raw.num_labels == 2
    tok = AutoTokenizer.from_pretrained(data["tokenizer"])
    assert len(tok) == 30522 and tok.pad_token_id == 0
    tr, va, collate = build_datasets(raw, tok, cfg)
    assert len(tr) + len(va) == 4 * 4 + 4
    for ds in (tr, va):
        for i in range(len(ds)):
            ids = ds[i]["input_ids"]
            assert len(ids) == 128 and ids[0] == 101 and ids[-1] == 102 and min(ids[1:-1]) >= gs.BERT_FIRST_WORD
    batch = collate([tr[i] for i in range(4)])
    assert batch["input_ids"].shape == (4, 128) and bool(batch["attention_mask"].all())

    from peftlab.data.bins import TokenBin

    s = gs.shape_spec("qwen3b", tiny=True)
    data = gs.write_data(tmp_path / "lm", s, n_steps=2)
    tok = AutoTokenizer.from_pretrained(data["tokenizer"])
    assert len(tok) == gs.QWEN_TOKENS and tok.eos_token_id == gs.QWEN_EOT
    for split in ("train", "val"):
        b = TokenBin(data["dataset"], split)
        assert b.dtype == "uint32"
        b.check_tokenizer(tok)  # raises on a vocabulary / dtype / end-of-text mismatch


@pytest.mark.parametrize("case", ["distilbert_lora", "qwen3b_lora", "qwen3b_dora"])
def test_tiny_case_runs_both_sides_on_cpu(case, tmp_path):
    from accelerate.state import AcceleratorState

    base, pl = gs.SHAPE_CASES[case]
    AcceleratorState._reset_state(True)  # peftlab's side trains in bf16: an earlier test's Accelerator may have fixed fp32
    try:
        rows = {side: gs.run_shape(side, {"name": case, **spec}, warmup=1, steps=2, peak_tflops=1.0, device="cpu", tiny=True,
                                   workdir=tmp_path)
                for side, spec in (("hf", base), ("peftlab", pl))}
    finally:
        AcceleratorState._reset_state(True)  # and later tests train in fp32
    s = gs.shape_spec(base["shape"], tiny=True)
    for side, r in rows.items():
        assert r["step_ms"] > 0 and math.isfinite(r["last_loss"]), (side, r)
        assert r["tok_s"] == pytest.approx(s["batch"] * s["seq"] / (r["step_ms"] / 1e3))
        assert r["mfu"] == pytest.approx(r["tok_s"] * r["flops_per_token"] / 1e12)
        assert ("ex_s" in r) == (s["task"] == "classification")
    # the same trainable parameters on both sides (adapters + DistilBERT's classifier head / DoRA magnitudes)
    assert rows["hf"]["trainable"] == rows["peftlab"]["trainable"]
    assert rows["peftlab"]["adapted"] == sorted(s["targets"])
    if s["gradient_checkpointing"]:
        assert rows["hf"]["base_dtype"] == "torch.bfloat16"


def test_bench_gpu_has_the_cases_outside_its_default_run():
    import bench_gpu

    for name in gs.SHAPE_CASES:
        assert bench_gpu.CASES[name] == gs.SHAPE_CASES[name]


def test_kernel_gaps_merges_streams_and_ranks_idle_gaps():
    from bench_gpu import kernel_gaps

    # kernels on two streams overlap in [2, 5]; idle: [0, 1), (5, 9), (10, 10.5); window [0, 10.5]
    g = kernel_gaps([(1, 4), (2, 5), (9, 10)], 0, 10.5, top=2)
    assert g["busy"] == 5 and g["idle"] == 5.5 and g["n_gaps"] == 3
    assert g["gaps"] == [(5, 4), (0, 1)]  # (offset from the start, length), longest first
    assert kernel_gaps([], 0, 3)["idle"] == 3
