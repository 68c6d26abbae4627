"""`peftlab bounds RUN_DIR` end to end: real tiny runs through `peftlab train`, load_run, the CLI, the JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from peftlab.data.bins import prepare_token_bins
from peftlab.models.tokenizers import byte_tokenizer

from conftest import make_cfg

SEED_KEYS = ("kl_divergence", "empirical_bpd", "bound_value", "compressed_size_bits")
REQUIRED = SEED_KEYS + ("prefix_message_len", "best_alpha", "top1_error", "top10_error", "top100_error", "top1_error_bound",
                        "top10_error_bound", "top100_error_bound", "levels", "n", "m", "delta", "wall_time_s", "quantization_cost")


@pytest.fixture(scope="module")
def bins(tmp_path_factory):
    d = tmp_path_factory.mktemp("bins")
    phrases = ["the cat sat on the mat. ", "a dog ran in the park. ", "we like green tea. "]
    docs = [phrases[i % 3] * (1 + i % 4) for i in range(600)]
    prepare_token_bins(docs, byte_tokenizer(), d, 0.05, tokenizer_name="byte", progress=False)
    return d


def train_run(tmp_path, bins, **over):
    from peftlab.train import train

    cfg = make_cfg(tmp_path, "lm", data__dataset=str(bins), data__block_size=64, training__max_steps=8, **over)
    res = train(cfg)
    assert res["status"] == "completed"
    return tmp_path / "run"


def peftlab_subprocess(*args):
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "peftlab", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def peftlab(capsys):
    """The real CLI entry point, in process (a subprocess costs seconds of imports on the test machine)."""
    from peftlab.cli import main

    def call(*args):
        capsys.readouterr()
        rc = main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out.out, out.err)

    return call


def check_metrics(run):
    m = json.loads((run / "bounds_metrics.json").read_text())
    for k in REQUIRED:
        assert k in m, k
    for k, v in m.items():
        if isinstance(v, float):
            assert math.isfinite(v), k
    assert m["kl_divergence_units"] == "nats" and m["bound_units"] == "bits per token"
    assert m["bound_value"] > m["empirical_bpd"] > 0
    return m


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, bins):
    return train_run(tmp_path_factory.mktemp("lora"), bins)


def test_cli_document_level_on_a_lora_run(lora_run, bins):
    r = peftlab_subprocess("bounds", str(lora_run), "--bounds.num_docs=60", "--bounds.stride=32", "--bounds.full_precision_units=20",
                "--bounds.use_kmeans", "--bounds.progress_bar=false")
    assert r.returncode == 0, r.stderr
    assert "bits/token" in r.stdout
    m = check_metrics(lora_run)
    assert m["bound_type"] == "document_level" and m["method"] == "lora" and m["use_kmeans"] is True
    assert m["n"] == 60 and m["m"] == 570 and m["levels"] == 11
    # LoRA compresses its trainable adapter tensors: tiny-gpt2 c_attn, r=8, 2 layers: 2 * (64*8 + 8*192)
    assert m["compressed_numbers"] == 2 * (64 * 8 + 8 * 192)


def test_cli_token_and_sequence_levels_and_determinism(lora_run, tmp_path, peftlab):
    outs = []
    for level, out in (("token_level", "a.json"), ("token_level", "b.json"), ("sequence_level", "c.json")):
        r = peftlab("bounds", str(lora_run), f"--bounds.bound_type={level}", "--bounds.num_docs=200",
                    "--bounds.full_precision_units=0", "--bounds.progress_bar=false", f"--bounds.output={tmp_path / out}")
        assert r.returncode == 0, r.stderr
        outs.append(json.loads((tmp_path / out).read_text()))
    a, b, c = outs
    for k in SEED_KEYS:
        assert a[k] == b[k], k  # same run, same seed: identical numbers
    assert a["m"] > c["m"] and c["bound_type"] == "sequence_level"


def test_cli_errors(lora_run, tmp_path, bins, peftlab):
    r = peftlab("bounds", str(tmp_path / "nope"))
    assert r.returncode == 2 and "not a peftlab run directory" in r.stderr
    r = peftlab("bounds", str(lora_run), "--bounds.levls=3")
    assert r.returncode == 2 and "Did you mean `bounds.levels`" in r.stderr
    import shutil

    partial = tmp_path / "bins"
    shutil.copytree(bins, partial)
    (partial / "eot_indices.npy").unlink()
    r = peftlab("bounds", str(lora_run), f"--bounds.data={partial}")
    assert r.returncode == 2
    assert "eot_indices.npy" in r.stderr and "peftlab data prepare" in r.stderr


def test_classification_run_is_refused(tmp_path, peftlab):
    from peftlab.train import train

    cfg = make_cfg(tmp_path, "cls", training__max_steps=2)
    train(cfg)
    r = peftlab("bounds", str(tmp_path / "run"))
    assert r.returncode == 2 and "classification" in r.stderr


def test_sora_run_scores_the_pruned_quantized_adapter(tmp_path, bins, peftlab):
    run = train_run(tmp_path, bins, method="sora")
    r = peftlab("bounds", str(run), "--bounds.bound_type=token_level", "--bounds.num_docs=100", "--bounds.full_precision_units=100",
                "--bounds.levels=65536", "--bounds.progress_bar=false")
    assert r.returncode == 0, r.stderr
    m = check_metrics(run)
    # with 65,536 levels the quantized adapter is the trained one up to fp16 rounding: same loss
    qc = m["quantization_cost"]
    assert qc["quantized_unsmoothed_bpd"] == pytest.approx(qc["full_precision_unsmoothed_bpd"], abs=2e-3)


@pytest.mark.parametrize("mode", ["uniform", "learned"])
def test_sublora_run_compresses_w_and_gates(tmp_path, bins, peftlab, mode):
    from peftlab.methods import METHODS

    if "sublora" not in METHODS:
        pytest.skip("the sublora method is not on this branch yet")
    run = train_run(tmp_path, bins, method="sublora", sublora__intrinsic_dim=200, sublora__allocation_mode=mode,
                    training__learning_rate=0.05)
    r = peftlab("bounds", str(run), "--bounds.bound_type=token_level", "--bounds.num_docs=200", "--bounds.full_precision_units=50",
                "--bounds.progress_bar=false")
    assert r.returncode == 0, r.stderr
    m = check_metrics(run)
    assert m["method"] == "sublora"
    # SubLoRA's message is w (d = 200 numbers), plus the per-layer gates in learned mode
    assert m["compressed_tensors"] == (2 if mode == "learned" else 1)
    assert m["compressed_numbers"] >= 200 and (m["compressed_numbers"] == 200) == (mode == "uniform")
