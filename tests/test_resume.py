"""Resume after SIGKILL ends with exactly the numbers of an uninterrupted run; an
interrupted checkpoint save never looks complete. The runs that are killed are real
subprocesses, killed for real; the others (the reference run, the resumes) go through the same
``peftlab train`` command line in the test's process (``peftlab.cli.main``), which saves the
seconds of imports a process costs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
CFG = str(ROOT / "configs/quickstart/lm_lora.yaml")
COMMON = ["--training.epochs=2", "--training.save_steps=4", "--training.log_steps=2", "--logging.progress_bar=false",
          "--data.max_train_examples=120", "--training.batch_size=4", "--lora.dropout=0.1", "--training.save_total_limit=2"]


def _argv(run_dir: Path, *extra: str) -> list[str]:
    return ["train", CFG, f"--output.dir={run_dir}", *COMMON, *extra]


def _cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "peftlab", *_argv(run_dir, *extra)]


def _train_here(run_dir: Path, *extra: str) -> int:
    """``peftlab train`` in this process (the test machine has one thread per process, as the subprocesses)."""
    from peftlab.cli import main

    return main(_argv(run_dir, *extra))


def _env(**kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(kw)
    return env


def _final(run_dir: Path) -> dict:
    return json.loads((run_dir / "results_final.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    assert _train_here(run) == 0
    return run


def _assert_same_run(a: Path, b: Path):
    fa, fb = _final(a), _final(b)
    assert fa["final"] == fb["final"]
    assert fa["best"] == fb["best"] and fa["global_step"] == fb["global_step"]
    assert (a / "loss_log.csv").read_text() == (b / "loss_log.csv").read_text()
    ha, hb = (json.loads((r / "training_history.json").read_text()) for r in (a, b))
    for k in ("train_loss", "val_loss", "val_perplexity"):
        assert ha[k] == hb[k], k
    wa = load_file(str(a / "adapter/adapter_model.safetensors"))
    wb = load_file(str(b / "adapter/adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, reference):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = run / "checkpoints" / "step-8"  # epoch 1 has 30 steps: step 8 is mid-epoch
    deadline = time.time() + 120
    while not target.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.is_dir(), "the run should have reached step 8 before being killed"
    assert not (run / "results_final.json").exists()
    assert _train_here(run, "--training.resume_from=latest") == 0
    assert "resumed from" in (run / "train.log").read_text()
    _assert_same_run(reference, run)


def test_kill_during_checkpoint_save_leaves_last_good_one(tmp_path, reference):
    run = tmp_path / "run"
    out = subprocess.run(_cmd(run), env=_env(PEFTLAB_TEST_KILL_DURING_SAVE="step-12"), capture_output=True)
    assert out.returncode == -signal.SIGKILL
    ck = run / "checkpoints"
    assert not (ck / "step-12").exists()
    assert (ck / ".tmp-step-12").is_dir()  # the torn save is there, but hidden and incomplete
    assert not (ck / ".tmp-step-12" / "trainer_state.json").exists()
    from peftlab.checkpoints import resolve

    assert resolve("latest", run).name == "step-8"
    assert _train_here(run, "--training.resume_from=latest") == 0
    assert not (ck / ".tmp-step-12").exists()
    _assert_same_run(reference, run)


def test_resume_of_a_finished_run_does_nothing(tmp_path, reference):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = (run / "results_final.json").read_text()
    assert _train_here(run, "--training.resume_from=latest") == 0
    assert (run / "results_final.json").read_text() == before
