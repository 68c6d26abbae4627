"""What researchers expect from a trainer (issue 16): resume a run from its own directory,
test-split metrics, evaluation every N steps with early stopping, gradient checkpointing,
portable exports. Tiny models, in-process, seconds each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import free_port

from peftlab.cli import main

ROOT = Path(__file__).resolve().parent.parent
CLS = str(ROOT / "configs/quickstart/cls_lora.yaml")
LM = str(ROOT / "configs/quickstart/lm_lora.yaml")
SMALL = ["--logging.progress_bar=false", "--data.max_train_examples=64", "--data.max_val_examples=32"]


def _results(run: Path) -> dict:
    return json.loads((run / "results_final.json").read_text())


def test_resume_run_dir_uses_the_runs_own_config(tmp_path, capsys):
    run = tmp_path / "a"
    assert main(["train", CLS, f"--output.dir={run}", "--training.max_steps=6", "--training.save_steps=2", "--method=dora",
                 "--lora.r=2", *SMALL]) == 0
    full = _results(run)
    # simulate a kill after step 2: drop every checkpoint after it and the results
    import shutil

    from peftlab import checkpoints as ckpt

    kept = ckpt.list_checkpoints(run / "checkpoints")
    for step, _, path in kept:
        if step > 2:
            shutil.rmtree(path)
    (run / "results_final.json").unlink()
    # extra settings that would change the run are refused, naming the keys that may change
    assert main(["train", "--resume", str(run), "--lora.r=16"]) == 2
    err = capsys.readouterr().err
    assert "--lora.r" in err and "training.save_steps" in err
    # a config file and --resume together are refused
    assert main(["train", CLS, "--resume", str(run)]) == 2
    # logging keys may change; the run continues from step 2 with DoRA r=2 and ends with the same numbers
    assert main(["train", "--resume", str(run), "--training.log_steps=1"]) == 0
    resumed = _results(run)
    assert resumed["method"] == "dora" and resumed["global_step"] == 6
    assert resumed["final"] == full["final"]
    meta = json.loads((run / "config.json").read_text())["_meta"]
    assert [r["from_checkpoint"] for r in meta["resumes"]] == ["step-2"]


def test_run_config_json_is_a_config(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", CLS, f"--output.dir={a}", "--training.max_steps=3", "--lora.r=2", *SMALL]) == 0
    assert main(["train", str(a / "config.json"), f"--output.dir={b}"]) == 0
    assert _results(a)["final"] == _results(b)["final"]
    # a run directory given as the config says what to do instead
    assert main(["train", str(a)]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_default_device_joins_the_launchers_process_group(tmp_path, launcher):
    """system.device=auto (the default, no --system.device) on two gloo processes: one run of world size 2."""
    import os
    import subprocess
    import sys

    port = str(free_port())
    head = {"torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"],
            "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
                           "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={port}"]}[launcher]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    run = tmp_path / "run"
    proc = subprocess.run([*head, "-m", "peftlab", "train", LM, f"--output.dir={run}", "--training.max_steps=3",
                           "--training.batch_size=4", "--data.max_train_examples=60", "--data.max_val_examples=16",
                           "--logging.progress_bar=false"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _results(run)
    assert res["world_size"] == 2 and res["global_step"] == 3


def test_test_split_is_evaluated_once_with_the_best_checkpoint(tmp_path):
    import torch

    from peftlab.data import load_raw
    from peftlab.runs import load_run
    from peftlab.evaluation import make_test_dataset
    from peftlab.evaluation import evaluate

    run = tmp_path / "run"
    assert main(["train", CLS, "--data.dataset=imdb-sample", f"--output.dir={run}", "--training.epochs=2",
                 "--training.learning_rate=5e-3", *SMALL]) == 0
    res = _results(run)
    test = res["test"]
    assert set(test) >= {"test_loss", "test_accuracy", "test_f1"} and test["examples"] == 100
    assert test["step"] == res["best"]["step"]
    assert "Test accuracy" in (run / "train.log").read_text()
    # the numbers are those of best/'s weights on the test split
    loaded = load_run(run, which="best")
    raw = load_raw(loaded.config)
    ds = make_test_dataset(raw, loaded.tokenizer, loaded.config)
    from peftlab.data import classification_collate

    again = evaluate(loaded.model, ds, classification_collate(loaded.tokenizer.pad_token_id), loaded.config, "classification",
                     loaded.num_labels, torch.device("cpu"), prefix="test", cap=False)
    for k in ("test_loss", "test_accuracy", "test_f1"):
        assert again[k] == pytest.approx(test[k], abs=1e-6), k


def test_lm_val_loss_is_token_weighted_over_supervised_tokens(tmp_path):
    """Response-only labels: val_loss = sum of token losses / number of supervised tokens,
    computed here one example at a time by hand."""
    import torch

    from peftlab.build import build
    from peftlab.config import load_config
    from peftlab.evaluation import evaluate

    cfg = load_config(LM, {"data.dataset": "instruct-sample", "data.max_length": 512, "data.max_val_examples": 10, "data.max_train_examples": 16,
                           "output.dir": str(tmp_path / "r"), "training.eval_batch_size": 4})
    b = build(cfg, optimizer=False)
    model = b.model.eval()
    got = evaluate(model, b.val_ds, b.collate, cfg, "causal_lm", None, torch.device("cpu"))["val_loss"]
    total, tokens, counts = 0.0, 0, set()
    with torch.no_grad():
        for i in range(len(b.val_ds)):
            batch = b.collate([b.val_ds[i]])
            logits = model(**batch).logits[0, :-1].double()
            labels = batch["labels"][0, 1:]
            keep = labels != -100
            total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            tokens += int(keep.sum())
            counts.add(int(keep.sum()))
    assert len(counts) > 1  # examples supervise different numbers of tokens, so the weighting matters
    assert got == pytest.approx(total / tokens, rel=2e-6)  # example-weighted batch means give 5.57524 vs 5.57546 here


def test_eval_steps_and_early_stopping_stop_a_run_that_does_not_improve(tmp_path):
    """lr=1e-9: validation accuracy never changes, so with eval_steps=2 and patience 2 the
    12-step run evaluates at steps 2, 4 (epoch end), 6 and stops there; best/ is step 2's."""
    import csv

    run = tmp_path / "run"
    args = ["train", CLS, f"--output.dir={run}", "--training.epochs=3", "--training.eval_steps=2",
            "--training.early_stopping_patience=2", "--training.learning_rate=1e-9", *SMALL]
    assert main(args) == 0
    res = _results(run)
    assert res["global_step"] == 6  # of 12 planned
    es = res["early_stopping"]
    assert es["stopped"] and es["stopped_at_step"] == 6 and es["evaluations"] == 3 and es["evaluations_without_improvement"] == 2
    assert res["best"]["step"] == 2
    assert json.loads((run / "best" / "metrics.json").read_text())["step"] == 2
    rows = list(csv.DictReader(open(run / "eval_log.csv")))
    assert [(r["step"], r["kind"]) for r in rows] == [("2", "step"), ("4", "epoch"), ("6", "step")]
    assert "early stopping at step 6" in (run / "train.log").read_text()
    # resuming the stopped run trains nothing more
    assert main(["train", "--resume", str(run)]) == 0
    assert _results(run)["global_step"] == 6
    # without patience the same run trains all 12 steps
    assert main([*args[:2], f"--output.dir={tmp_path / 'full'}", *args[3:5], "--training.learning_rate=1e-9", *SMALL]) == 0
    assert _results(tmp_path / "full")["global_step"] == 12 and not _results(tmp_path / "full")["early_stopping"]["stopped"]


@pytest.mark.parametrize("method", ["lora", "sora", "full"])
def test_gradient_checkpointing_gives_the_same_losses(tmp_path, method):
    """Same config with and without activation checkpointing (dropout on): same losses and
    adapter to float tolerance; and checkpointing really is on in the built model."""
    import csv

    from peftlab.build import build
    from peftlab.config import load_config

    common = [LM, "--training.max_steps=4", "--training.log_steps=1", "--lora.dropout=0.1", "--model.dropout=0.1",
              f"--method={method}", "--data.max_train_examples=40", "--data.max_val_examples=8", "--logging.progress_bar=false"]
    assert main(["train", *common, f"--output.dir={tmp_path / 'plain'}"]) == 0
    assert main(["train", *common, f"--output.dir={tmp_path / 'gc'}", "--model.gradient_checkpointing=true"]) == 0
    assert main(["train", *common, f"--output.dir={tmp_path / 'half'}", "--model.gradient_checkpointing=true",
                 "--model.gradient_checkpointing_fraction=0.5"]) == 0
    # the reentrant form: the adapter only trains if the embeddings' output is made to require a gradient
    assert main(["train", *common, f"--output.dir={tmp_path / 're'}", "--model.gradient_checkpointing=true",
                 "--model.gradient_checkpointing_reentrant=true"]) == 0
    losses = [[float(r["train_loss"]) for r in csv.DictReader(open(tmp_path / d / "loss_log.csv"))] for d in ("plain", "gc", "half", "re")]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], abs=1e-6) and losses[0] == pytest.approx(losses[2], abs=1e-6)
    assert losses[0] == pytest.approx(losses[3], abs=1e-6)
    assert _results(tmp_path / "plain")["final"]["val_loss"] == pytest.approx(_results(tmp_path / "re")["final"]["val_loss"], abs=1e-6)
    assert _results(tmp_path / "plain")["final"]["val_loss"] == pytest.approx(_results(tmp_path / "gc")["final"]["val_loss"], abs=1e-6)
    cfg = load_config(LM, {"model.gradient_checkpointing": True, "method": method, "output.dir": str(tmp_path / "x")})
    model = build(cfg, optimizer=False).model
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def test_gradient_checkpointing_fraction_recomputes_only_its_blocks(tmp_path):
    """With a fraction, only round(f·L) blocks (evenly spread) run their forward again in the backward pass."""
    from peftlab.build import build, checkpointed_blocks
    from peftlab.config import load_config
    from peftlab.errors import ConfigError

    assert checkpointed_blocks(12, 0.5) == {0, 2, 4, 6, 8, 10} and checkpointed_blocks(36, 0.75) == {(i * 36) // 27 for i in range(27)}
    assert checkpointed_blocks(2, 0.1) == {0} and checkpointed_blocks(4, 1.0) == {0, 1, 2, 3}
    calls = {}
    for frac in (1.0, 0.5):
        cfg = load_config(LM, {"model.gradient_checkpointing": True, "model.gradient_checkpointing_fraction": frac,
                               "output.dir": str(tmp_path / "x")})
        model = build(cfg, optimizer=False, data=False, task="causal_lm").model
        blocks = model.base_model.model.transformer.h
        counts = [0] * len(blocks)
        for i, b in enumerate(blocks):
            # a submodule: the recompute calls the block's forward, not its hooks
            b.mlp.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts[i] + 1))
        model.train()
        x = torch.randint(0, 100, (2, 16))
        model(input_ids=x, labels=x).loss.backward()
        calls[frac] = counts
    assert len(calls[1.0]) == 2 and calls[1.0] == [2, 2] and calls[0.5] == [2, 1]
    with pytest.raises(ConfigError, match=r"gradient_checkpointing_fraction=0.5` has no effect without `model.gradient_checkpointing=true`"):
        load_config(LM, {"model.gradient_checkpointing_fraction": 0.5})
    with pytest.raises(ConfigError, match=r"cannot run with method=sublora: SubLoRA substitutes the LoRA tensors"):
        load_config(LM, {"model.gradient_checkpointing": True, "method": "sublora"})
    with pytest.raises(ConfigError, match=r"gradient_checkpointing_reentrant=true` has no effect without"):
        load_config(LM, {"model.gradient_checkpointing_reentrant": True})
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\], got 0.0"):
        load_config(LM, {"model.gradient_checkpointing": True, "model.gradient_checkpointing_fraction": 0.0})


def test_checkpoint_retention_and_best_without_optimizer_state(tmp_path):
    from peftlab.runs import load_run

    lim, fin = tmp_path / "limit", tmp_path / "final"
    common = [CLS, "--training.epochs=3", "--training.save_steps=1", "--training.save_total_limit=2", *SMALL]
    assert main(["train", *common, f"--output.dir={lim}", "--output.keep_checkpoints=limit"]) == 0
    names = sorted(p.name for p in (lim / "checkpoints").iterdir())
    assert len(names) == 2 and "epoch-3" in names  # epoch checkpoints count toward the limit
    best = lim / "best"
    assert (best / "model_state.safetensors").is_file() and not (best / "optimizer.pt").exists()
    step = json.loads((best / "metrics.json").read_text())["step"]
    assert step == _results(lim)["best"]["step"]
    assert load_run(lim, which="best").evaluate()["val_accuracy"] == pytest.approx(_results(lim)["best"]["value"])
    assert main(["train", *common, f"--output.dir={fin}", "--output.keep_checkpoints=final_only"]) == 0
    assert [p.name for p in (fin / "checkpoints").iterdir()] == ["epoch-3"]
    assert [p.name for p in (fin / "best").iterdir()] == ["metrics.json"] and (fin / "adapter").is_dir()
    again = load_run(fin, which="final").evaluate()
    assert again["val_loss"] == pytest.approx(_results(fin)["final"]["val_loss"], abs=1e-6)


def test_exported_classifier_keeps_label_names_and_adapter_is_portable(tmp_path):
    import shutil

    from transformers import AutoModelForSequenceClassification

    run = tmp_path / "run"
    assert main(["train", CLS, "--data.dataset=imdb-sample", f"--output.dir={run}", "--training.max_steps=3", *SMALL]) == 0
    names = json.loads((run / "config.json").read_text())["_meta"]["label_names"]
    assert names and not names[0].startswith("LABEL_")
    adapter_cfg = json.loads((run / "adapter/adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "base_model"  # relative to the run, not this machine's absolute path
    assert main(["export", str(run), "--merge", "--output-dir", str(tmp_path / "merged")]) == 0
    # the merged model keeps the dataset's class names wherever it is moved
    shutil.move(str(tmp_path / "merged"), str(tmp_path / "moved"))
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "moved"))
    assert merged.config.id2label == dict(enumerate(names))
    assert merged.config.label2id == {n: i for i, n in enumerate(names)}
    assert main(["export", str(run), "--which", "best", "--output-dir", str(tmp_path / "best_adapter")]) == 0
    assert json.loads((tmp_path / "best_adapter/adapter_config.json").read_text())["base_model_name_or_path"] == "base_model"


def test_refused_compare_keeps_the_previous_table(tmp_path):
    import io

    from peftlab.cli.compare import compare

    ov = {"data.max_train_examples": 64, "data.max_val_examples": 32, "training.max_steps": 2, "logging.progress_bar": False}
    out = tmp_path / "cmp"
    rows = compare(CLS, out, ["lora"], ov, console=False, out=io.StringIO())
    assert rows[0]["status"] == "completed"
    good = (out / "compare.csv").read_text()
    # the same directory with another seed: the finished lora run is a different run, so it is refused
    rows = compare(CLS, out, ["lora"], {**ov, "training.seed": 7}, console=False, out=io.StringIO())
    assert rows[0]["status"] == "failed"
    assert (out / "compare.csv").read_text() == good
    assert "failed" in (out / "compare.incomplete.csv").read_text()


def test_max_test_examples_caps_or_skips_the_test_evaluation(tmp_path):
    capped, skipped = tmp_path / "capped", tmp_path / "skipped"
    assert main(["train", CLS, "--data.dataset=imdb-sample", f"--output.dir={capped}", "--data.max_test_examples=40", *SMALL]) == 0
    assert _results(capped)["test"]["examples"] == 40
    assert main(["train", CLS, "--data.dataset=imdb-sample", f"--output.dir={skipped}", "--data.max_test_examples=0", *SMALL]) == 0
    assert not _results(skipped).get("test")


def test_lm_test_split_from_a_local_folder_gives_test_perplexity(tmp_path):
    """A folder with train/validation/test files: the test split is evaluated with best/'s
    weights. With test = validation, test_loss equals the best validation loss exactly."""
    import math
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    src = ROOT / "peftlab/data/samples/lm-sample"
    shutil.copy(src / "train.jsonl", data / "train.jsonl")
    shutil.copy(src / "validation.jsonl", data / "validation.jsonl")
    shutil.copy(src / "validation.jsonl", data / "test.jsonl")
    run = tmp_path / "run"
    assert main(["train", LM, f"--data.dataset={data}", f"--output.dir={run}", "--training.epochs=2",
                 "--data.max_train_examples=40", "--logging.progress_bar=false", "--training.learning_rate=1e-2"]) == 0
    res = _results(run)
    hist = json.loads((run / "training_history.json").read_text())
    best_val = hist["val_loss"][hist["step"].index(res["best"]["step"])]
    assert res["test"]["test_loss"] == pytest.approx(best_val, rel=1e-9)
    assert res["test"]["test_perplexity"] == pytest.approx(math.exp(best_val))
    assert "Test perplexity" in (run / "train.log").read_text()


def test_early_stopping_counters_survive_a_resume(tmp_path):
    """Stopped at step 4 (patience 3, evaluations every step, nothing improves after step 1).
    Cut back to the step-2 checkpoint and resumed, the run stops at step 4 again: the count of
    evaluations without improvement came back from the checkpoint (reset, it would stop at 5)."""
    import shutil

    from peftlab import checkpoints as ckpt

    a = tmp_path / "a"
    args = [CLS, "--training.epochs=3", "--training.eval_steps=1", "--training.early_stopping_patience=3",
            "--training.learning_rate=1e-9", "--training.save_steps=1", "--training.save_total_limit=10", *SMALL]
    assert main(["train", *args, f"--output.dir={a}"]) == 0
    ra = _results(a)
    assert ra["early_stopping"]["stopped_at_step"] == 4
    b = tmp_path / "b"
    shutil.copytree(a, b)
    for step, _, path in ckpt.list_checkpoints(b / "checkpoints"):
        if step > 2:
            shutil.rmtree(path)
    (b / "results_final.json").unlink()
    assert main(["train", "--resume", str(b)]) == 0
    rb = _results(b)
    assert rb["early_stopping"] == ra["early_stopping"] and rb["best"] == ra["best"] and rb["final"] == ra["final"]
    assert (a / "eval_log.csv").read_text() == (b / "eval_log.csv").read_text()
