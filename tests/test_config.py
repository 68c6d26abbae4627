"""Config parsing and validation: overrides, types, unknown keys, bad values, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftlab.cli import main
from peftlab.config import load_config, parse_overrides
from peftlab.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_overrides_are_typed_and_applied():
    cfg = load_config(ROOT / "configs/quickstart/lm_lora.yaml", ["--lora.r=16", "--training.learning_rate=3e-4", "--training.batch_size", "4"])
    assert cfg.lora.r == 16 and isinstance(cfg.lora.r, int)
    assert cfg.training.learning_rate == pytest.approx(3e-4) and isinstance(cfg.training.learning_rate, float)
    assert cfg.training.batch_size == 4
    assert cfg.model.name == "tiny-gpt2"  # from the file


def test_on_and_off_are_the_words_not_yaml_booleans(tmp_path):
    """YAML 1.1 reads a bare `on`/`off` as true/false; for a setting whose choices are the words (lora.fused,
    system.pad_vocab, bounds.compile_body ...) they mean the words, on the command line and in a file."""
    cfg = load_config(ROOT / "configs/quickstart/lm_lora.yaml", ["--lora.fused=on", "--system.pad_vocab=off"])
    assert cfg.lora.fused == "on" and cfg.system.pad_vocab == "off"
    f = tmp_path / "c.yaml"
    f.write_text("method: lora\nlora:\n  fused: off\n")
    assert load_config(f, []).lora.fused == "off"
    with pytest.raises(ConfigError, match=r"lora.r"):  # a boolean elsewhere is still an error
        load_config(ROOT / "configs/quickstart/lm_lora.yaml", ["--lora.r=on"])


def test_values_may_contain_equals_signs_and_lists():
    ov = parse_overrides(["--output.dir=runs/a=b", "--model.target_modules=c_attn,c_proj"])
    assert ov["output.dir"] == "runs/a=b"
    cfg = load_config(None, ov)
    assert cfg.model.target_modules == ["c_attn", "c_proj"]


def test_unknown_key_names_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown key `lora.rr`. Did you mean `lora.r`\?"):
        load_config(None, ["--lora.rr=4"])


def test_unknown_section_and_method_are_suggested():
    with pytest.raises(ConfigError, match=r"unknown section `lroa`. Did you mean `lora`"):
        load_config(None, ["--lroa.r=4"])
    with pytest.raises(ConfigError, match=r"unknown method 'lorra'. Did you mean `lora`"):
        load_config(None, ["--method=lorra"])


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--lora.r=0", "--training.learning_rate=-1", "--training.batch_size=abc"])
    # the type error is reported first (values cannot be range-checked before they parse)
    assert "batch_size" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--lora.r=0", "--training.learning_rate=-1"])
    assert len(e.value.problems) == 2
    assert "`lora.r` must be at least 1, got 0" in str(e.value)
    assert "`training.learning_rate` must be positive, got -1.0" in str(e.value)


def test_literal_values_are_checked():
    with pytest.raises(ConfigError, match=r"training.lr_scheduler.*one of 'linear', 'cosine', 'constant'.*Did you mean `cosine`"):
        load_config(None, ["--training.lr_scheduler=cosin"])


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("model: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


RUN_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent != ROOT / "configs/studies")  # study files: test_studies


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_parses(path):
    load_config(path)


def test_cli_reports_errors_without_traceback(capsys):
    code = main(["train", str(ROOT / "configs/quickstart/lm_lora.yaml"), "--lora.r=0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: Invalid configuration: `lora.r` must be at least 1, got 0.")
    assert "Traceback" not in err


def test_cli_missing_dataset_is_a_clear_error(capsys, tmp_path):
    code = main(["train", str(ROOT / "configs/quickstart/lm_lora.yaml"), f"--output.dir={tmp_path}/r", "--data.dataset=/no/such/file.csv"])
    err = capsys.readouterr().err
    assert code == 2 and "neither a known dataset nor an existing path" in err


def test_config_command_prints_resolved_yaml(capsys):
    assert main(["config", str(ROOT / "configs/quickstart/cls_lora.yaml"), "--lora.r=4"]) == 0
    out = capsys.readouterr().out
    assert "r: 4" in out and "name: tiny-bert" in out


def test_other_methods_sections_are_not_range_checked():
    # a shared study file may carry settings of methods this run does not use
    cfg = load_config(None, ["--method=lora", "--sora.lambda=-1"])
    assert cfg.method == "lora"
    with pytest.raises(ConfigError, match="sora"):
        load_config(None, ["--method=sora", "--sora.lambda=-1"])


def test_tracker_package_must_be_installed():
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    with pytest.raises(ConfigError, match="pip install wandb"):
        load_config(None, {"logging.report_to": ["wandb"]})
