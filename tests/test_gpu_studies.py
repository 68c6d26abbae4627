"""The one-GPU scales of the shipped studies and the device of a sweep's follow-ups, checked on the CPU.

The GPU runs themselves are benchmarks/gpu_studies.sh; here: the device a follow-up picks for a run
(pure function, so a CPU-only machine tests the cuda branch), the shape of the shipped Qwen2.5-0.5B
config, and that every gpu scale reads only what scripts/gpu_bundle.sh writes under gpu_assets/.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from peftlab.errors import PeftlabError
from peftlab.runs.device import followup_device

ROOT = Path(__file__).resolve().parent.parent
STUDIES = sorted((ROOT / "configs/studies").glob("*.yaml"))


@pytest.mark.parametrize("requested,run_device,cuda,expected", [
    ("auto", "cuda", True, "cuda"),    # a run trained on its GPU: the follow-up on that GPU (the sweep's CUDA_VISIBLE_DEVICES)
    ("auto", "auto", True, "cuda"),    # the default run config on a GPU machine
    ("auto", None, True, "cuda"),
    ("auto", "cpu", True, "cpu"),      # a run configured for the CPU stays there, even with a GPU visible
    ("auto", "cuda", False, "cpu"),    # a GPU run's bound computed later on a laptop
    ("auto", "auto", False, "cpu"),
    ("cpu", "cuda", True, "cpu"),      # an explicit choice wins
    ("cuda", "cpu", True, "cuda"),
])
def test_followup_device_follows_the_run(requested, run_device, cuda, expected):
    assert followup_device(requested, run_device, cuda) == expected


def test_followup_device_errors_name_the_setting():
    with pytest.raises(PeftlabError, match=r"--bounds.device=cuda but no CUDA GPU is visible.*auto to follow the run"):
        followup_device("cuda", "cuda", False)
    with pytest.raises(PeftlabError, match=r"--system.device='gpu': expected auto, cpu or cuda"):
        followup_device("gpu", "cuda", True, "--system.device")


def test_bounds_device_comes_from_the_run_config(monkeypatch):
    import torch

    from peftlab.bounds import evaluate as ev

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ev.pick_device("auto", "cuda").type == "cuda" and ev.pick_device("auto", "cpu").type == "cpu"


def test_qwen05_config_is_the_published_shape():

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = json.loads((ROOT / "peftlab/models/configs/qwen2.5-0.5b.json").read_text())
    c = AutoConfig.for_model(spec.pop("model_type"), **{k: v for k, v in spec.items() if k != "architectures"})
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(c)
    n = sum(p.numel() for p in m.parameters())
    # Qwen2.5-0.5B model card: 0.49B parameters, 0.36B non-embedding (tied embedding of 151,936 x 896)
    assert n == 494_032_768 and n - m.get_input_embeddings().weight.numel() == 357_898_112


BUNDLED = {"./gpu_assets/python-docs-gpt2", "./gpu_assets/tokenizers/gpt2", "./gpu_assets/food-reviews",
           "./gpu_assets/tokenizers/bert-uncased", "./gpu_assets/models/minilm-l6"}


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_gpu_scale_reads_only_the_bundle(path):
    raw = yaml.safe_load(path.read_text())
    gpu = raw["scales"]["gpu"]
    text = yaml.safe_dump(gpu)
    used = set(re.findall(r"\./gpu_assets/[\w./-]+?(?=[\s,'\"}]|$)", text, flags=re.M))
    assert used and used <= BUNDLED, used - BUNDLED
    bundle = (ROOT / "scripts/gpu_bundle.sh").read_text()
    for p in used:  # the bundle script writes each path the scale reads, for this study
        assert p[2:] in bundle
    assert f"bash scripts/gpu_bundle.sh {path.stem}" in path.read_text()  # the YAML says how to prepare it
    assert "stand" in path.read_text() or path.stem == "compare"  # and what stands in for the seed's data


def _results_page():
    """scripts/results_page.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("results_page", ROOT / "scripts/results_page.py")
    rp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rp)
    return rp


def test_results_page_from_a_study_directory(tmp_path):
    rp = _results_page()
    src = tmp_path / "out" / "subspace_allocation"
    (src / "analysis").mkdir(parents=True)
    # two slices: the first cut by its wall limit (no sweep_end), the second resumes and ends
    evs = [{"event": "sweep_start", "runs": 30, "time": 0.0},
           {"event": "end", "outcome": "completed", "phases": {"train": 20.0, "bounds": 30.0}, "time": 50.0},
           {"event": "start", "time": 100.0},
           {"event": "sweep_start", "runs": 30, "time": 200.0},
           {"event": "end", "outcome": "completed", "phases": {"train": 22.0, "bounds": 28.0}, "time": 250.0},
           {"event": "study_step", "outcome": "completed", "step": "analyze x --output-dir y", "duration_s": 15.0, "time": 265.0},
           {"event": "sweep_end", "seconds": 70.0, "time": 270.0}]
    (src / "study.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evs))
    (src / "study.log").write_text("log\n")
    for r in ("r1", "r2", "r3"):  # r3 trained, its follow-up cut by the last call's wall limit (no "end" event)
        (src / "runs" / r).mkdir(parents=True)
        (src / "runs" / r / "results_final.json").write_text("{}")
    a = src / "analysis"
    (a / "summary_table.md").write_text("| method | n |\n| --- | ---: |\n| sublora | 3 |\n")
    (a / "hypotheses.json").write_text(json.dumps([{"hypothesis": "H1 (seed 001)", "verdict": "supported", "text": "ρ = 0.8 dominates"}]))
    (a / "pareto_frontier_d1000.png").write_bytes(b"\x89PNG fake")
    (a / "report.html").write_text("<ul><li class='note'>rank_allocation_heatmap: skipped, no ranks &amp; no BA-LoRA</li></ul>")
    docs = tmp_path / "docs"
    assert rp.main([str(src), "--study", "subspace_allocation", "--docs", str(docs)]) == 0
    page = (docs / "subspace_allocation" / "README.md").read_text()
    assert "| train | 42s | 37% |" in page and "| bounds | 58s | 50% |" in page and "| analyze | 15s | 13% |" in page
    assert "2 of 30 runs completed with their follow-ups (1 more trained, their follow-ups cut" in page
    assert "the sweeps' wall time adds up to 2m 50s over 2 calls" in page and "**H1 (seed 001)** — supported: ρ = 0.8 dominates" in page
    assert "![pareto_frontier_d1000](pareto_frontier_d1000.png)" in page and "no ranks & no BA-LoRA" in page
    assert "python-docs" in page and "OpenWebText" in page  # the scale's own comment: what stands in
    assert (docs / "subspace_allocation" / "pareto_frontier_d1000.png").is_file()
    # a reading written by a person survives regeneration
    (docs / "subspace_allocation" / "README.md").write_text(page.replace(page.split(rp.KEEP_START + "\n")[1].split("\n" + rp.KEEP_END)[0],
                                                                         "The learned gates rise with depth."))
    assert rp.main([str(src), "--study", "subspace_allocation", "--docs", str(docs)]) == 0
    assert "The learned gates rise with depth." in (docs / "subspace_allocation" / "README.md").read_text()
    assert rp.main([str(tmp_path), "--study", "subspace_allocation", "--docs", str(docs)]) == 2  # no study.jsonl


def test_results_page_compares_the_estimate_with_the_measured_runs(tmp_path):
    rp = _results_page()
    src = tmp_path / "subspace_allocation"
    (src / "analysis").mkdir(parents=True)
    evs = [{"event": "sweep_start", "runs": 3, "time": 0.0},
           {"event": "end", "run": "a", "outcome": "completed", "duration_s": 30.0, "phases": {"train": 30.0}, "time": 30.0},
           {"event": "end", "run": "b", "outcome": "interrupted", "duration_s": 5.0, "time": 35.0},
           {"event": "end", "run": "b", "outcome": "completed", "duration_s": 60.0, "phases": {"train": 60.0}, "time": 95.0},
           {"event": "end", "run": "c", "outcome": "completed", "duration_s": 10.0, "phases": {"train": 10.0}, "time": 105.0},
           {"event": "study_step", "outcome": "completed", "step": "analyze x", "duration_s": 12.0, "time": 117.0}]
    (src / "study.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evs))
    # the estimate covered a and b (an --only probe) and the study step; c was not estimated
    est = {"runs": [{"name": "a", "status": "new", "seconds": 20.0}, {"name": "b", "status": "new", "seconds": 40.0}],
           "study_steps": [{"name": "analyze", "seconds": 8.0, "once": True}], "total_s": 68.0}
    (tmp_path / "est.json").write_text(json.dumps(est))
    docs = tmp_path / "docs"
    assert rp.main([str(src), "--study", "subspace_allocation", "--docs", str(docs), "--estimate", str(tmp_path / "est.json")]) == 0
    page = (docs / "subspace_allocation" / "README.md").read_text()
    # (30 + (5 + 60) + 12) / (20 + 40 + 8) = 1.57; b adds up its attempts, c is not in the estimate
    assert "estimated 1m 08s, measured 1m 47s, **1.57×** the estimate" in page, page
    assert "| b | 40s | 1m 05s | 1.62× |" in page and "| (study step: analyze) | 8s | 12s | 1.50× |" in page and "| c |" not in page
    assert rp.main([str(src), "--study", "subspace_allocation", "--docs", str(docs), "--estimate", str(tmp_path / "no.json")]) == 2


def test_results_page_of_runs_side_by_side_compares_the_study_wall_time(tmp_path):
    rp = _results_page()
    src = tmp_path / "budget_aware"
    (src / "analysis").mkdir(parents=True)
    # two slots on GPU 0: a and b side by side (each 40 s), then c; the sweep took 80 s
    evs = [{"event": "sweep_start", "runs": 3, "slots": 2, "gpus": "0,0", "time": 0.0},
           {"event": "end", "run": "a", "outcome": "completed", "duration_s": 40.0, "phases": {"train": 40.0}, "time": 40.0},
           {"event": "end", "run": "b", "outcome": "completed", "duration_s": 40.0, "phases": {"train": 40.0}, "time": 40.0},
           {"event": "end", "run": "c", "outcome": "completed", "duration_s": 30.0, "phases": {"train": 30.0}, "time": 70.0},
           {"event": "study_step", "outcome": "completed", "step": "analyze x", "duration_s": 10.0, "time": 80.0}]
    (src / "study.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evs))
    est = {"runs": [{"name": n, "status": "new", "seconds": 25.0} for n in "abc"],
           "study_steps": [{"name": "analyze", "seconds": 10.0, "once": True}], "total_s": 85.0, "slots": 2,
           "wall_s": 75.0 / 2 + 10.0}
    (src / "estimate.json").write_text(json.dumps(est))
    docs = tmp_path / "docs"
    assert rp.main([str(src), "--study", "budget_aware", "--docs", str(docs)]) == 0
    page = (docs / "budget_aware" / "README.md").read_text()
    assert "GPUS=0,0 bash benchmarks/gpu_studies.sh budget_aware" in page and "--gpus 0,0, in slices" in page
    assert "2 runs side by side on the GPU at a time" in page
    # 80 s of sweep against 47.5 s estimated on 2 slots
    assert "it predicted 48s of wall time on 2 slots; the sweeps took 1m 20s, **1.68×** the estimate" in page, page
    # an --only estimate (not every run) makes no claim about the study's wall time
    est["runs"] = est["runs"][:2]
    (src / "estimate.json").write_text(json.dumps(est))
    assert rp.main([str(src), "--study", "budget_aware", "--docs", str(docs)]) == 0
    page = (docs / "budget_aware" / "README.md").read_text()
    assert "ran 2 runs at a time" in page and "of wall time on 2 slots" not in page
    # an estimate that measured the slowdown of sharing says so instead of calling the ratios that slowdown
    est["sharing"] = {"ways": 2, "factor": 1.6, "measured_on": "a", "step_s_alone": 0.1, "step_s_shared": 0.16}
    (src / "estimate.json").write_text(json.dumps(est))
    assert rp.main([str(src), "--study", "budget_aware", "--docs", str(docs)]) == 0
    page = " ".join((docs / "budget_aware" / "README.md").read_text().split())
    assert "took 1.60× their time alone) and applied it to every run" in page and "timed each probe alone" not in page
