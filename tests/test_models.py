"""Model loading: local folders, default target modules per architecture, clear errors."""

from __future__ import annotations

import pytest
import torch

from conftest import make_cfg
from peftlab.errors import PeftlabError
from peftlab.models import DEFAULT_TARGETS, check_targets, load_model
from peftlab.models.tokenizers import byte_tokenizer


def _save_tiny_llama(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, eos_token_id=256, bos_token_id=256, pad_token_id=257)
    LlamaForCausalLM(cfg).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)


def test_local_folder_model_trains_with_architecture_default_targets(tmp_path, run_train):
    path = tmp_path / "llama"
    _save_tiny_llama(path)
    cfg = make_cfg(tmp_path, "lm", model__name=str(path), training__max_steps=3)
    model, tok, info = load_model(cfg, "causal_lm")
    assert info.model_type == "llama" and info.target_modules == ["q_proj", "v_proj"] and info.source == "local folder"
    assert len(tok) == 260
    res = run_train(cfg)
    assert res["status"] == "completed"
    import json

    acfg = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    assert sorted(acfg["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("name,task,expected", [("tiny-gpt2", "causal_lm", ["c_attn"]), ("tiny-bert", "classification", ["query", "value"])])
def test_builtin_defaults(tmp_path, name, task, expected):
    cfg = make_cfg(tmp_path, "lm" if task == "causal_lm" else "cls", model__name=name)
    model, _, info = load_model(cfg, task, 2 if task == "classification" else None)
    assert info.target_modules == expected
    assert len(check_targets(model, expected)) == 2 * len(expected)  # two layers


def test_distilbert_default_targets_listed():
    assert DEFAULT_TARGETS["distilbert"] == ["q_lin", "v_lin"] and DEFAULT_TARGETS["qwen2"] == ["q_proj", "v_proj"]


def test_from_scratch_shipped_config_builds_offline(tmp_path):
    cfg = make_cfg(tmp_path, "cls", model__name="distilbert-base-uncased", model__from_scratch=True, data__tokenizer="byte")
    model, _, info = load_model(cfg, "classification", 2)
    assert info.num_params == 66_955_010  # DistilBERT-base + 2-label head (seed 004's figure)
    assert info.target_modules == ["q_lin", "v_lin"]


def test_unmatched_targets_list_the_linear_layers(tmp_path):
    cfg = make_cfg(tmp_path, "lm", model__target_modules=["q_proj"])
    model, _, _ = load_model(cfg, "causal_lm")
    with pytest.raises(PeftlabError, match=r"No module of the model matches target_modules=\['q_proj'\].*c_attn.*c_fc"):
        check_targets(model, ["q_proj"])


def test_missing_model_is_a_clear_error(tmp_path):
    cfg = make_cfg(tmp_path, "lm", model__name=str(tmp_path / "no-such-model"))
    with pytest.raises(PeftlabError, match=r"model.name=.*no-such-model.*: the path .*no-such-model does not exist"):
        load_model(cfg, "causal_lm")


def test_seeded_builds_are_identical(tmp_path):
    cfg = make_cfg(tmp_path, "lm")
    a, _, _ = load_model(cfg, "causal_lm")
    b, _, _ = load_model(cfg, "causal_lm")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_model_dropout_override(tmp_path):
    cfg = make_cfg(tmp_path, "lm", model__dropout=0.0)
    model, _, _ = load_model(cfg, "causal_lm")
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
