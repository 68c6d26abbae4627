"""benchmarks/bench_lead.py (issue 23's GPU suite) in its --quick form: the plumbing on the CPU with toy shapes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_lead  # noqa: E402


def test_quick_cases_write_rows_and_errors(tmp_path):
    a = argparse.Namespace(out=str(tmp_path), part="all", budget_s=600.0, quick=True, warmup=1, steps=1, max_batch_s=1.0,
                           lead_profile="gpt2:hf:lora,qwen3b:peftlab:lora",
                           only="gpt2:hf:lora,qwen3b:peftlab:lora,gpt2:hf_c:lora,qwen3b:unsloth:lora,qwen3b:liger:lora,llama8b:liger:lora")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # peftlab's bf16 runs: an earlier test's Accelerator may have fixed the precision
    try:
        bench_lead.main_lead(a)
    finally:
        AcceleratorState._reset_state(True)  # and later tests train in fp32
    lines = [json.loads(x) for x in (tmp_path / "bench_lead.jsonl").read_text().splitlines()]
    info, rows = lines[0], {r["case"]: r for r in lines[1:]}
    assert info["suite"] == "lead" and info["quick"] is True
    assert set(rows) == {"gpt2:hf:lora", "qwen3b:peftlab:lora", "gpt2:hf_c:lora", "qwen3b:unsloth:lora", "qwen3b:liger:lora", "llama8b:liger:lora"}
    assert all("step_ms" in rows[c] or rows[c]["error"] for c in ("qwen3b:liger:lora", "llama8b:liger:lora"))  # one child, two rows
    hf, pl = rows["gpt2:hf:lora"], rows["qwen3b:peftlab:lora"]
    assert hf["step_ms"] > 0 and hf["tok_s"] > 0 and hf["base_dtype"] == "torch.bfloat16"
    # the levers ran: bf16 base, the fused LoRA forward on q/k/v/o of both layers, the chunked loss
    assert pl["step_ms"] > 0 and pl["base_dtype"] == "torch.bfloat16" and pl["fused_lora_layers"] == 8 and pl["fused_ce"] == "chunked"
    assert hf["n_trained_matmul"] > 0 and pl["n_trained_matmul"] > 0 and pl["flops_per_token"] > 0
    assert "skipped" in rows["gpt2:hf_c:lora"]
    assert hf["profiled"] and pl["profiled"] and (tmp_path / "profile_qwen3b_peftlab_lora.txt").is_file()
    assert "max_batch" not in hf and pl["max_batch"] >= 2  # gpt2:hf has none in the plan; the search ran (1 s cap here)
    assert "unsloth" in rows["qwen3b:unsloth:lora"]["error"] or "step_ms" in rows["qwen3b:unsloth:lora"]
    assert "| qwen3b | lora | peftlab |" in (tmp_path / "bench_lead_summary.md").read_text()


def test_plan_names_known_shapes_sides_and_methods():
    from peftlab.methods import METHODS

    levers = {"peftlab", "peftlab_off", "peftlab_chunked", "peftlab_nofce", "peftlab_nofused"}
    levers |= {f"peftlab_{x}_gc{n}{re}" for x in ("chunked", "chunkedcomp") for n in (25, 50, 60, 66, 75, 80) for re in ("", "_re")}
    sides = {"hf", "hf_c", "hf_cg", "hf_cb", "liger", "unsloth"} | levers | {f"{x}_{c}" for x in levers for c in ("c", "cg", "cb")}
    for part, shape, side, method, est, *opts in bench_lead.PLAN:
        assert part in range(1, 10) and shape in bench_lead.SHAPES and side in sides and method in METHODS and est > 0 and opts in ([], ["nomb"])
    for part in range(1, 10):  # each part fits a device command of about 7 minutes (about 15 s of start-up besides)
        assert sum(p[4] for p in bench_lead.PLAN if p[0] == part and p[2] != "unsloth") <= 400


def test_cb_sides_compile_each_block_in_place_on_top_of_their_lever_set(tmp_path):
    import torch

    from peftlab.config import config_from_dict

    data = {"model": "qwen2.5-3b", "dataset": str(tmp_path), "tokenizer": str(tmp_path)}
    s = {**bench_lead.SHAPES["qwen3b"], "name": "qwen3b"}
    raw = bench_lead.peftlab_raw(s, "peftlab_chunked_gc60_cb", "lora", data, tmp_path / "run", torch.device("cuda"), 4, False)
    assert raw["system"]["compile"] is True and raw["system"]["compile_scope"] == "blocks"
    assert raw["system"]["fused_cross_entropy"] == "chunked" and raw["model"]["gradient_checkpointing_fraction"] == 0.6
    assert config_from_dict(raw).system.compile_scope == "blocks"
    plain = bench_lead.peftlab_raw(s, "peftlab_chunked_c", "lora", data, tmp_path / "run2", torch.device("cuda"), 4, False)
    assert plain["system"]["compile_scope"] == "model" and bench_lead.compile_scope("hf_cb") == "blocks"


def test_gc_sides_checkpoint_a_share_of_the_blocks_on_top_of_their_lever_set(tmp_path):
    import torch

    from peftlab.config import config_from_dict

    data = {"model": "qwen2.5-3b", "dataset": str(tmp_path), "tokenizer": str(tmp_path)}
    s = {**bench_lead.SHAPES["qwen3b"], "name": "qwen3b"}
    raw = bench_lead.peftlab_raw(s, "peftlab_chunked_gc50", "lora", data, tmp_path / "run", torch.device("cuda"), 4, False)
    assert raw["model"]["gradient_checkpointing"] is True and raw["model"]["gradient_checkpointing_fraction"] == 0.5
    assert raw["system"]["fused_cross_entropy"] == "chunked"
    cfg = config_from_dict(raw)  # a valid configuration
    assert cfg.model.gradient_checkpointing_fraction == 0.5
    plain = bench_lead.peftlab_raw(s, "peftlab_chunked", "lora", data, tmp_path / "run", torch.device("cuda"), 4, False)
    assert "gradient_checkpointing_fraction" not in plain["model"]


def test_re_and_chunkedcomp_sides(tmp_path):
    import torch

    from peftlab.config import config_from_dict

    data = {"model": "llama-3-8b", "dataset": str(tmp_path), "tokenizer": str(tmp_path)}
    s = {**bench_lead.SHAPES["llama8b"], "name": "llama8b"}
    raw = bench_lead.peftlab_raw(s, "peftlab_chunked_gc66_re_cb", "lora", data, tmp_path / "run", torch.device("cuda"), 4, False)
    assert raw["model"]["gradient_checkpointing_reentrant"] is True and raw["model"]["gradient_checkpointing_fraction"] == 0.66
    assert raw["system"]["compile_scope"] == "blocks" and "chunked_cross_entropy" not in raw["system"]  # the default: eager
    comp = bench_lead.peftlab_raw(s, "peftlab_chunkedcomp_gc75_cb", "lora", data, tmp_path / "run2", torch.device("cuda"), 4, False)
    assert comp["system"]["fused_cross_entropy"] == "chunked" and comp["system"]["chunked_cross_entropy"] == "auto"
    assert "gradient_checkpointing_reentrant" not in comp["model"]
    assert config_from_dict(raw).model.gradient_checkpointing_reentrant and config_from_dict(raw).system.chunked_cross_entropy == "eager"
    assert config_from_dict(comp).system.chunked_cross_entropy == "auto"


def test_max_batch_search_stops_at_out_of_memory_and_at_the_time_cap():
    import torch

    seen = []

    def step(b):
        seen.append(b)
        if b >= 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    r = bench_lead.max_batch_search(step, 4, 16, torch.device("cpu"), cap_s=60)
    assert seen == [4, 8, 16, 32, 64] and r["max_batch"] == 32 and r["max_batch_capped"] is False

    def bad(b):
        raise ValueError("shape mismatch")

    assert bench_lead.max_batch_search(bad, 4, 16, torch.device("cpu"), cap_s=60) == {"max_batch": None, "max_batch_error": "ValueError: shape mismatch"}
    import time

    def slow(b):
        time.sleep(0.05 * b)

    r = bench_lead.max_batch_search(slow, 1, 16, torch.device("cpu"), cap_s=0.5)
    assert r["max_batch_capped"] is True and r["max_batch"] in (1, 2, 4)  # (gc.collect between probes takes time too)


def test_word_tokenizer_can_pad_with_a_token_of_its_own(tmp_path):
    """Unsloth refuses a Llama tokenizer whose pad is its end-of-text token (bench_lead's 8B row failed so)."""
    from transformers import AutoTokenizer

    from _common import write_word_tokenizer

    tok = AutoTokenizer.from_pretrained(str(write_word_tokenizer(tmp_path / "a", 20, 15, pad="<|finetune_right_pad_id|>")))
    assert (tok.pad_token, tok.pad_token_id, tok.eos_token_id) == ("<|finetune_right_pad_id|>", 19, 15)
    assert tok("t3 <|endoftext|>").input_ids == [3, 15]
    plain = AutoTokenizer.from_pretrained(str(write_word_tokenizer(tmp_path / "b", 20, 15)))
    assert plain.pad_token_id == plain.eos_token_id == 15  # unchanged default: every other benchmark's tokenizer
    with pytest.raises(ValueError, match="above the end-of-text id"):
        write_word_tokenizer(tmp_path / "c", 16, 15, pad="<pad>")
