"""End-to-end training through the real config, loop and run directory."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import make_cfg


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method", ["full", "lora", "dora"])
@pytest.mark.parametrize("kind", ["lm", "cls"])
def test_each_method_trains_end_to_end(tmp_path, run_train, method, kind):
    cfg = make_cfg(tmp_path, kind, method=method, training__max_steps=6, training__save_steps=3)
    res = run_train(cfg)
    run = tmp_path / "run"
    assert res["status"] == "completed" and res["global_step"] == 6
    for f in ("config.json", "train.log", "loss_log.csv", "training_history.json", "results_final.json", "epoch_peak_memory.csv"):
        assert (run / f).is_file(), f
    rows = _read_csv(run / "loss_log.csv")
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert list(rows[0]) == ["epoch", "step", "train_loss", "learning_rate", "gpu_memory_mb", "sparsity"]
    hist = json.loads((run / "training_history.json").read_text())
    for key in ("train_loss", "val_loss", "epoch_time", "gpu_memory_mb", "trainable_params", "effective_params"):
        assert len(hist[key]) == 1, key
    if kind == "cls":
        assert 0 <= hist["val_accuracy"][0] <= 1 and 0 <= hist["val_f1"][0] <= 1
    else:
        assert hist["val_perplexity"][0] == pytest.approx(torch.tensor(hist["val_loss"][0]).exp().item(), rel=1e-6)
    assert (run / "checkpoints/step-3").is_dir() and (run / "checkpoints/epoch-1").is_dir() and (run / "best").is_dir()
    meta = json.loads((run / "config.json").read_text())
    assert meta["method"] == method and "torch" in meta["_meta"]["versions"]
    assert (run / ("model" if method == "full" else "adapter")).is_dir()
    if method == "full":
        assert res["trainable_params"] == res["total_params"]
    else:
        assert res["trainable_params"] < res["total_params"] / 5


def test_training_reduces_loss(tmp_path, run_train):
    cfg = make_cfg(tmp_path, "lm", method="full", training__max_steps=40, training__learning_rate=3e-3, training__log_steps=10,
                   data__max_train_examples=None)
    run_train(cfg)
    rows = _read_csv(tmp_path / "run/loss_log.csv")
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]) - 0.5


def test_same_seed_same_numbers(tmp_path, run_train):
    a = run_train(make_cfg(tmp_path / "a", "cls"))
    b = run_train(make_cfg(tmp_path / "b", "cls"))
    c = run_train(make_cfg(tmp_path / "c", "cls", training__seed=7))
    assert a["final"] == b["final"]
    assert a["final"] != c["final"]
    assert (tmp_path / "a/run/loss_log.csv").read_text() == (tmp_path / "b/run/loss_log.csv").read_text()


def test_existing_run_is_not_overwritten(tmp_path, run_train):
    from peftlab.errors import PeftlabError

    run_train(make_cfg(tmp_path, "lm", training__max_steps=2))
    with pytest.raises(PeftlabError, match="already holds a run.*resume_from=latest.*overwrite"):
        run_train(make_cfg(tmp_path, "lm", training__max_steps=2))
    res = run_train(make_cfg(tmp_path, "lm", training__max_steps=2, output__overwrite=True))
    assert res["status"] == "completed"


def test_resume_with_changed_config_is_refused(tmp_path, run_train):
    from peftlab.errors import PeftlabError

    run_train(make_cfg(tmp_path, "lm", training__max_steps=4, training__save_steps=2))
    with pytest.raises(PeftlabError, match="configuration differs.*lora.r: 8 -> 4"):
        run_train(make_cfg(tmp_path, "lm", training__max_steps=4, training__resume_from="latest", lora__r=4))


def test_loraplus_gives_b_a_larger_learning_rate(tmp_path):
    from peftlab.methods import METHODS, MethodContext
    from peftlab.models import load_model

    cfg = make_cfg(tmp_path, "lm", lora__loraplus_lr_ratio=16.0)
    model, _, info = load_model(cfg, "causal_lm")
    method = METHODS["lora"](MethodContext(cfg=cfg, task="causal_lm", target_modules=info.target_modules))
    model = method.apply(model)
    opt = method.build_optimizer(model)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["B"] == pytest.approx(16 * lrs["A"]) and lrs["A"] == pytest.approx(cfg.training.learning_rate)
    b_ids = {id(p) for n, p in model.named_parameters() if "lora_B" in n}
    group_b = next(g for g in opt.param_groups if g["name"] == "B")
    assert {id(p) for p in group_b["params"]} == b_ids


def test_adapter_reloads_in_peft_with_identical_logits(tmp_path, run_train):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from peftlab.runs import load_run

    cfg = make_cfg(tmp_path, "cls", training__max_steps=5, model__dropout=0.0)
    run_train(cfg)
    run = tmp_path / "run"
    # The model as trained, rebuilt from the run directory alone.
    loaded = load_run(run)
    trained, tok = loaded.model, loaded.tokenizer
    # The exported adapter, loaded by plain peft onto the saved base model.
    base = AutoModelForSequenceClassification.from_pretrained(run / "base_model")
    reloaded = PeftModel.from_pretrained(base, run / "adapter").eval()
    batch = tok(["a wonderful film", "dull and flat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = trained(**batch).logits
        b = reloaded(**batch).logits
    assert torch.equal(a, b)
    cfgj = json.loads((run / "adapter/adapter_config.json").read_text())
    assert cfgj["r"] == 8 and sorted(cfgj["target_modules"]) == ["query", "value"]


def test_lora_plumbing_matches_plain_peft(tmp_path):
    """Our LoRA model equals peft.get_peft_model on the same base and seed."""
    from peft import LoraConfig, get_peft_model

    from peftlab.methods import METHODS, MethodContext
    from peftlab.models import load_model

    cfg = make_cfg(tmp_path, "lm", lora__init="gaussian", model__dropout=0.0)
    model, tok, info = load_model(cfg, "causal_lm")
    ref_base, _, _ = load_model(cfg, "causal_lm")
    torch.manual_seed(123)
    ours = METHODS["lora"](MethodContext(cfg=cfg, task="causal_lm", target_modules=info.target_modules)).apply(model)
    torch.manual_seed(123)
    ref = get_peft_model(ref_base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["c_attn"], task_type="CAUSAL_LM",
                                              init_lora_weights="gaussian"))
    # B starts at zero; give both the same non-zero B so the comparison sees the adapter path.
    torch.manual_seed(5)
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), ref.named_parameters()):
        assert n1 == n2
        if "lora_B" in n1:
            v = torch.randn_like(p1)
            p1.data.copy_(v)
            p2.data.copy_(v)
        else:
            assert torch.equal(p1, p2), n1
    ids = tok(["The cat sees the red ball."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(ours.eval()(ids).logits, ref.eval()(ids).logits)
    # and the adapter path matters: W + (alpha/r) B A differs from W
    with torch.no_grad(), ours.disable_adapter():
        assert not torch.allclose(ours(ids).logits, ref(ids).logits)


def test_tensorboard_tracker_writes_events(tmp_path, run_train):
    pytest.importorskip("tensorboard")
    run_train(make_cfg(tmp_path, "lm", training__max_steps=4, logging__report_to=["tensorboard"]))
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))


def test_unknown_tracker_is_rejected():
    from peftlab.config import load_config
    from peftlab.errors import ConfigError

    with pytest.raises(ConfigError, match="report_to"):
        load_config(None, {"logging.report_to": ["mlflow"]})


def test_export_merged_model_gives_same_logits(tmp_path, run_train):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftlab.cli import main
    from peftlab.models.tokenizers import byte_tokenizer

    run_train(make_cfg(tmp_path, "lm", training__max_steps=4, model__dropout=0.0, lora__init="gaussian"))
    run = tmp_path / "run"
    assert main(["export", str(run), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base_model"), run / "adapter").eval()
    ids = byte_tokenizer()(["The cat sees the red ball."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, ref(ids).logits, atol=1e-5)
    assert not any("lora" in k for k in merged.state_dict())
    assert main(["export", str(run), "--merge"]) == 2  # refuses to overwrite


def test_best_metric_that_the_task_cannot_compute_fails_before_training(tmp_path, run_train):
    from peftlab.errors import PeftlabError

    with pytest.raises(PeftlabError, match="val_perplexity is for language modelling"):
        run_train(make_cfg(tmp_path, "cls", training__best_metric="val_perplexity"))
    assert not (tmp_path / "run/loss_log.csv").exists()


def test_resume_latest_never_retrains_over_a_finished_run(tmp_path, run_train):
    import shutil

    from peftlab.errors import PeftlabError

    run_train(make_cfg(tmp_path, "lm", training__max_steps=3))
    shutil.rmtree(tmp_path / "run/checkpoints")
    before = (tmp_path / "run/results_final.json").read_text()
    with pytest.raises(PeftlabError, match="finished run but no checkpoint"):
        run_train(make_cfg(tmp_path, "lm", training__max_steps=3, training__resume_from="latest"))
    assert (tmp_path / "run/results_final.json").read_text() == before


def test_resume_refuses_another_process_count(tmp_path, run_train):
    from peftlab.errors import PeftlabError

    run_train(make_cfg(tmp_path, "lm", training__max_steps=6, training__save_steps=3))
    (tmp_path / "run/results_final.json").unlink()
    state = tmp_path / "run/checkpoints/epoch-1/trainer_state.json"
    data = json.loads(state.read_text())
    data["world_size"] = 2
    state.write_text(json.dumps(data))
    with pytest.raises(PeftlabError, match="written by 2 process"):
        run_train(make_cfg(tmp_path, "lm", training__max_steps=6, training__save_steps=3, training__resume_from="latest"))


def test_resume_repairs_best_and_keeps_original_provenance(tmp_path, run_train):
    import shutil

    ref = run_train(make_cfg(tmp_path / "ref", "cls", training__epochs=2, training__max_steps=None, data__max_train_examples=96))
    run = tmp_path / "ref/run"
    # a kill after committing epoch-1 but before copying it to best/: no best/, no later state
    shutil.rmtree(run / "best")
    shutil.rmtree(run / "checkpoints/epoch-2")
    (run / "results_final.json").unlink()
    meta = json.loads((run / "config.json").read_text())["_meta"]
    res = run_train(make_cfg(tmp_path / "ref", "cls", training__epochs=2, training__max_steps=None, data__max_train_examples=96,
                             training__resume_from="latest"))
    assert res["final"] == ref["final"] and res["best"] == ref["best"]
    assert "restored best/ from epoch-1" in (run / "train.log").read_text()
    best = json.loads((run / "best/metrics.json").read_text())
    assert best["step"] == ref["best"]["step"]
    meta2 = json.loads((run / "config.json").read_text())["_meta"]
    assert meta2["created"] == meta["created"] and meta2["resumes"][0]["from_checkpoint"] == "epoch-1"
