"""benchmarks/bench_quant.py (issue 27's 4-bit benchmark) at toy size on the CPU: both sides of a shape
run through the code the GPU run uses (bitsandbytes' CPU backend; skipped without bitsandbytes)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (0.48+ runs on the CPU)")
def test_tiny_quantized_benchmark_runs_both_sides(tmp_path):
    import bench_quant

    assert bench_quant.main(["--out", str(tmp_path), "--tiny", "--device", "cpu", "--shapes", "llama8b", "--kinds", "lora",
                             "--sides", "hf,peftlab,peftlab_re", "--warmup", "1", "--steps", "1", "--workdir", str(tmp_path / "work")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "bench_quant.jsonl").read_text().splitlines()]
    sides = {r["side"]: r for r in rows if "side" in r}
    assert set(sides) == {"hf", "peftlab", "peftlab_re"} and not any("error" in r for r in rows), rows
    assert sides["peftlab_re"]["last_loss"] == pytest.approx(sides["peftlab"]["last_loss"], rel=1e-6)  # the same numbers
    assert sides["hf"]["trainable"] == sides["peftlab"]["trainable"]  # the same adapters on both sides
    assert sides["hf"]["frozen_fp32_params"] > 0  # prepare_model_for_kbit_training upcasts the frozen rest
    assert "llama8b | lora | peftlab" in (tmp_path / "summary.md").read_text()


def test_llama3_8b_shape_is_the_published_one():
    import torch
    from transformers import AutoModelForCausalLM

    import bench_quant

    c = bench_quant.hf_config(bench_quant.shape("llama8b", tiny=False))
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(c)
    assert abs(sum(p.numel() for p in m.parameters()) / 1e9 - 8.03) < 0.01  # Llama-3-8B: 8.03B parameters


def test_sides_are_checked_before_any_work(tmp_path, capsys):
    import bench_quant

    assert bench_quant.side_levers("peftlab_cb_re") == ["cb", "re"] and bench_quant.side_levers("peftlab") == []
    with pytest.raises(SystemExit):
        bench_quant.main(["--out", str(tmp_path), "--tiny", "--device", "cpu", "--sides", "hf,peftlab_xx"])
    assert "unknown side(s) peftlab_xx" in capsys.readouterr().err and not (tmp_path / "bench_quant.jsonl").exists()


def test_sync_watch_records_each_synchronising_call_with_its_call_site(tmp_path):
    import warnings

    from bench_lead import SyncWatch

    def reads_a_loss():  # stands in for loss.item() under torch.cuda.set_sync_debug_mode("warn")
        warnings.warn("called a synchronizing CUDA operation", UserWarning)

    with SyncWatch() as w:
        for _ in range(3):
            reads_a_loss()
        warnings.warn("another warning, not a sync")
    w.__exit__(None, None, None)  # closed twice (a failed case): the warnings machinery stays restored
    assert warnings.showwarning is not w._show
    info = w.report(steps=3, path=tmp_path / "syncs.txt")
    assert info["syncs_per_step"] == 1.0
    text = (tmp_path / "syncs.txt").read_text()
    assert "1.0 synchronising calls per step" in text and "reads_a_loss" in text, text
