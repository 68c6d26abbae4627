"""Method conformance: every registered method trains, resumes to identical numbers, rebuilds
from its run directory alone (``load_run``) with exactly its final val_loss, records a structure
that round-trips without data, and exports an adapter/model that reloads with identical logits.

A new method joins with one line in CASES (``test_every_method_has_a_case`` insists).
One short run per case is shared by all checks (module-scoped fixture). The 2-process (gloo)
parity of the methods is tests/test_distributed.py.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from conftest import make_cfg


@dataclass(frozen=True)
class Case:
    method: str
    kind: str = "lm"  # quickstart config: lm (tiny-gpt2 on lm-sample) or cls (tiny-bert on sst2-sample)
    overrides: dict = field(default_factory=dict)
    exact_export: bool = True  # the exported weights are the trained ones (False: folded/densified, equal up to rounding)


CASES = {
    "full": Case("full", overrides={"training.learning_rate": 1e-3}),
    "lora": Case("lora"),
    "lora-cls": Case("lora", "cls"),
    "dora": Case("dora"),
    # lora.init through peft (methods/lora_init.py): base-changing inits export a converted rank-2r adapter
    "lora-pissa": Case("lora", overrides={"lora.init": "pissa", "lora.r": 4}, exact_export=False),
    "lora-olora": Case("lora", "cls", overrides={"lora.init": "olora", "lora.r": 4}, exact_export=False),  # nn.Linear only
    "lora-eva": Case("lora", overrides={"lora.init": "eva", "lora.init_samples": 16}),
    "lora-corda": Case("lora", overrides={"lora.init": "corda", "lora.init_samples": 16, "lora.r": 4}, exact_export=False),
    "adalora": Case("adalora", overrides={"adalora.init_r": 6, "adalora.target_r": 3, "training.learning_rate": 3e-3},
                    exact_export=False),  # the export is resized to the kept ranks
    "ba_lora": Case("ba_lora", overrides={"ba_lora.gradient_samples": 16, "ba_lora.use_warmstart": True}),
    "rsvd": Case("rsvd", overrides={"rsvd.rank": 4, "rsvd.update_interval": 3, "rsvd.weight_reduction_rank": 4,
                                    "training.learning_rate": 1e-3}, exact_export=False),
    "sora": Case("sora", overrides={"sora.lambda": 1.0, "sora.gate_lr": 0.05}, exact_export=False),
    "sdora": Case("sdora", "cls", overrides={"sora.lambda": 1.0, "sora.gate_lr": 0.05}, exact_export=False),
    "sublora": Case("sublora", overrides={"sublora.intrinsic_dim": 64, "training.learning_rate": 0.05}),
    "sublora-fixed": Case("sublora", overrides={"sublora.intrinsic_dim": 64, "sublora.allocation_mode": "fixed",
                                                "sublora.allocation_ratio": 0.8, "sublora.projector": "hashed",
                                                "training.learning_rate": 0.05}),
    "sublora-learned": Case("sublora", overrides={"sublora.intrinsic_dim": 64, "sublora.allocation_mode": "learned",
                                                  "sublora.gating_lr": 0.5, "training.learning_rate": 0.05}),
    "sublora-learned-cls": Case("sublora", "cls", overrides={"sublora.intrinsic_dim": 32, "sublora.allocation_mode": "learned",
                                                             "training.learning_rate": 0.05}),
}

COMMON = {"training.max_steps": 6, "training.save_steps": 2, "training.log_steps": 1, "training.batch_size": 4,
          "training.save_total_limit": None, "data.max_train_examples": 48, "data.max_val_examples": 16,
          "lora.dropout": 0.1}


def case_cfg(tmp_path: Path, case: Case, **extra):
    ov = {**COMMON, **case.overrides, "method": case.method, **extra}
    if case.kind == "cls":
        ov["data.max_length"] = 32
    return make_cfg(tmp_path, case.kind, **{k.replace(".", "__"): v for k, v in ov.items()})


@pytest.fixture(scope="module", params=list(CASES))
def trained(request, tmp_path_factory):
    from peftlab.train import train

    case = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    cfg = case_cfg(root, case)
    results = train(cfg, console=False)
    assert results["status"] == "completed"
    return case, cfg, root / "run", results


def _batch(loaded, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_every_method_has_a_case():
    from peftlab.methods import METHODS

    missing = sorted(set(METHODS) - {c.method for c in CASES.values()})
    assert not missing, f"add a Case for {missing} to tests/test_conformance.py CASES"


def test_run_directory_records_structure(trained):
    from peftlab.rundir import RunDir

    case, cfg, run_dir, results = trained
    run = RunDir(run_dir)
    assert run.is_finished() and results["global_step"] == 6
    assert run.structure()["method"] == case.method
    for ck in run.checkpoints():
        assert json.loads((ck / "method.json").read_text())["method"] == case.method
    stored, want = run.config().to_dict(), cfg.to_dict()
    assert stored == {k: want[k] for k in stored}  # the run's own sections round-trip; other methods' are dropped
    assert "_meta" not in run.config_dict() and run.meta()["task"] in ("causal_lm", "classification")


def test_resume_from_a_mid_run_checkpoint_gives_identical_history(trained, tmp_path):
    """The state a kill right after step-2's save leaves behind, resumed, ends exactly as the uninterrupted run."""
    from peftlab.train import train

    case, cfg, run_dir, results = trained
    copy = tmp_path / "resumed"
    shutil.copytree(run_dir, copy)
    for p in ("results_final.json", "training_history.json", "best", "adapter", "model", "base_model", "checkpoints/step-4",
              "checkpoints/epoch-1"):
        target = copy / p
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    res = train(cfg.replace({"output.dir": str(copy), "training.resume_from": "latest"}), console=False)
    assert res["final"] == results["final"] and res["best"] == results["best"]
    for f in ("training_history.json", "loss_log.csv", "module_metrics.csv", "sparsity_log.csv"):
        a, b = run_dir / f, copy / f
        assert a.is_file() == b.is_file(), f
        if f == "training_history.json":
            ha, hb = json.loads(a.read_text()), json.loads(b.read_text())
            for k in ha:
                if k not in ("epoch_time", "gpu_memory_mb"):
                    assert ha[k] == hb[k], k
        elif a.is_file():
            assert a.read_text() == b.read_text(), f


def test_load_run_reproduces_final_val_loss_exactly(trained):
    from peftlab.runs import load_run

    case, cfg, run_dir, results = trained
    loaded = load_run(run_dir)
    assert not loaded.model.training and loaded.checkpoint.name == "epoch-1"
    metrics = loaded.evaluate()
    assert metrics["val_loss"] == results["final"]["val_loss"]
    for k in ("val_accuracy", "val_f1", "val_perplexity"):
        if k in results["final"]:
            assert metrics[k] == results["final"][k]


def test_structure_round_trips_without_data(trained, monkeypatch):
    import peftlab.data as data
    from peftlab.rundir import RunDir
    from peftlab.runs import load_run

    case, cfg, run_dir, results = trained

    def no_data(*a, **k):
        raise AssertionError("load_run must not read the training data")

    monkeypatch.setattr(data, "load_raw", no_data)
    monkeypatch.setattr(data, "build_datasets", no_data)
    loaded = load_run(run_dir, which="step-4")
    recorded = RunDir(run_dir).structure(loaded.checkpoint)
    assert json.loads(json.dumps(loaded.method.structure(loaded.model))) == recorded
    assert RunDir(run_dir).structure() == json.loads(json.dumps(load_run(run_dir).method.structure(load_run(run_dir).model)))


def test_export_reloads_with_identical_logits(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from peftlab.export import export_run, load_base
    from peftlab.runs import load_run

    case, cfg, run_dir, results = trained
    loaded = load_run(run_dir)
    batch = _batch(loaded)
    want = _logits(loaded.model, batch)
    out = export_run(run_dir, tmp_path / "export")
    auto = AutoModelForSequenceClassification if loaded.task == "classification" else AutoModelForCausalLM
    if loaded.method.exports_adapter:
        from peft import PeftModel

        base, _ = load_base(run_dir)
        got = _logits(PeftModel.from_pretrained(base, str(out)), batch)
    else:
        got = _logits(auto.from_pretrained(str(out)), batch)
    if case.exact_export:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    merged = export_run(run_dir, tmp_path / "merged", merge=True)
    torch.testing.assert_close(_logits(auto.from_pretrained(str(merged)), batch), want, rtol=1e-5, atol=1e-5)
    # another checkpoint than the final one exports too (rebuilt by load_run)
    mid = export_run(run_dir, tmp_path / "mid", which="step-2")
    assert any(mid.iterdir())


def test_sharded_world_of_one_gives_the_same_losses(trained, tmp_path):
    """``system.sharding=fsdp`` on one process (FSDP2 over a process group of one) trains to the losses of
    the unsharded run, bit for bit; a method that cannot shard is refused before any model is built.
    Several processes: tests/test_sharding.py."""
    import csv

    from peftlab.config import ConfigError
    from peftlab.methods import METHODS
    from peftlab.train import train

    case, _, run, _ = trained
    if METHODS[case.method].sharding is None:
        with pytest.raises(ConfigError, match="does not support method="):
            case_cfg(tmp_path, case, **{"system.sharding": "fsdp"})
        return
    cfg = case_cfg(tmp_path, case, **{"system.sharding": "fsdp"})
    assert train(cfg, console=False)["status"] == "completed"
    losses = [[float(r["train_loss"]) for r in csv.DictReader(open(d / "loss_log.csv"))] for d in (run, tmp_path / "run")]
    assert losses[0] == losses[1]
