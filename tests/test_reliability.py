"""Reliability hardening (issue 15): damaged checkpoints, strict JSON, divergence-safe pruning,
bad inputs that must give one clear error instead of a traceback or a silent acceptance."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_cfg


# ---------------------------------------------------------------- point 4: verified checkpoints
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A tiny LoRA run with step checkpoints at 4, 8, 12 (trained once for the module)."""
    from peftlab.train import train

    tmp = tmp_path_factory.mktemp("ck")
    cfg = make_cfg(tmp, training__save_steps=4, training__save_total_limit=None)
    train(cfg, console=False)
    return tmp / "run"


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


def test_checkpoints_carry_a_manifest_of_sizes_and_hashes(saved_run):
    from peftlab.checkpoints import MANIFEST_FILE, manifest_problems

    ck = saved_run / "checkpoints" / "step-8"
    man = json.loads((ck / MANIFEST_FILE).read_text())["files"]
    assert {"model_state.safetensors", "optimizer.pt", "trainer_state.json", "rng-0.pt"} <= set(man)
    assert man["optimizer.pt"]["size"] == (ck / "optimizer.pt").stat().st_size
    assert manifest_problems(ck) == []
    best = saved_run / "best"
    assert "metrics.json" in json.loads((best / MANIFEST_FILE).read_text())["files"]


def test_truncated_checkpoint_names_previous_good_one_and_latest_falls_back(saved_run, tmp_path):
    from peftlab import checkpoints as ckpt

    run = _copy(saved_run, tmp_path)
    newest = ckpt.list_checkpoints(run / "checkpoints")[-1][2]
    f = newest / "optimizer.pt"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match=rf"Checkpoint .*{newest.name} is damaged: optimizer.pt has 100 bytes.*previous good checkpoint is .*step-8; resume from it with --training.resume_from=step-8"):
        ckpt.resolve(str(newest), run)
    with pytest.warns(UserWarning, match=rf"{newest.name} is damaged .*falling back"):
        assert ckpt.resolve("latest", run).name == "step-8"
    with pytest.raises(ckpt.CheckpointError, match="is damaged"):
        ckpt.load(newest)


def test_edited_or_missing_checkpoint_file_is_detected(saved_run, tmp_path):
    from peftlab import checkpoints as ckpt

    run = _copy(saved_run, tmp_path)
    ck = run / "checkpoints" / "step-8"
    data = bytearray((ck / "model_state.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, one byte flipped
    (ck / "model_state.safetensors").write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"step-8 is damaged: model_state.safetensors does not match the SHA-256.*previous good checkpoint is .*step-4"):
        ckpt.load(ck)
    (run / "checkpoints" / "step-4" / "scheduler.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"step-4 is damaged: scheduler.pt is missing.*No earlier checkpoint of this run verifies"):
        ckpt.load(run / "checkpoints" / "step-4")


def test_resume_latest_skips_truncated_checkpoint_end_to_end(saved_run, tmp_path, run_train):
    from peftlab import checkpoints as ckpt

    run = _copy(saved_run, tmp_path)
    (run / "results_final.json").unlink()
    newest = ckpt.list_checkpoints(run / "checkpoints")[-1][2]
    st = newest / "model_state.safetensors"
    st.write_bytes(st.read_bytes()[:-8])
    cfg = make_cfg(tmp_path, training__save_steps=4, training__save_total_limit=None, training__resume_from="latest",
                   output__dir=str(run))
    with pytest.warns(UserWarning, match="damaged"):
        pass_ = run_train(cfg)
    assert "resumed from" in (run / "train.log").read_text() and "resumed from " + str(run / "checkpoints" / "step-8") in (run / "train.log").read_text()
    assert pass_["global_step"] == 12


def test_trainer_state_sanity_checks(tmp_path):
    from peftlab.checkpoints import CheckpointError, check_trainer_state

    ok = {"global_step": 7, "epoch": 1, "step_in_epoch": 2}
    check_trainer_state(ok, tmp_path, total_steps=10, steps_per_epoch=5)
    with pytest.raises(CheckpointError, match=r"global_step=70 is beyond this run's 10 optimizer steps"):
        check_trainer_state(dict(ok, global_step=70), tmp_path, total_steps=10, steps_per_epoch=5)
    with pytest.raises(CheckpointError, match=r"step_in_epoch=9 is beyond the 5 optimizer steps of an epoch"):
        check_trainer_state(dict(ok, step_in_epoch=9), tmp_path, total_steps=100, steps_per_epoch=5)
    with pytest.raises(CheckpointError, match=r"epoch=-1 is not a non-negative integer"):
        check_trainer_state(dict(ok, epoch=-1), tmp_path)


# ------------------------------------------------------ point 1 (outside the loop): JSON, pruning
def test_write_json_is_strict(tmp_path):
    from peftlab.io import write_json

    write_json(tmp_path / "x.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": torch.tensor(-math.inf), "d": 2.5})
    text = (tmp_path / "x.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": None, "d": 2.5}


def _fake_ckpt(root: Path, step: int, finite: bool) -> None:
    from peftlab import checkpoints as ckpt

    final = root / f"step-{step}"
    tmp = ckpt.begin(final)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp / "model_state.safetensors"))
    (tmp / ckpt.STATE_FILE).write_text(json.dumps({"global_step": step, "finite": finite}))
    ckpt.commit(tmp, final)


def test_prune_never_deletes_the_last_finite_checkpoint(tmp_path):
    from peftlab import checkpoints as ckpt

    root = tmp_path / "checkpoints"
    for s, fin in [(2, True), (4, True), (6, False), (8, False), (10, False)]:
        _fake_ckpt(root, s, fin)
        ckpt.prune(root, 2)
    assert sorted(p.name for _, _, p in ckpt.list_checkpoints(root)) == ["step-10", "step-4", "step-8"]


def test_finite_flag_recorded_in_trainer_state(tmp_path):
    from peftlab.checkpoints import all_finite

    assert all_finite({"a": torch.ones(3), "i": torch.arange(3)})
    assert not all_finite({"a": torch.tensor([1.0, float("nan")])})


# ---------------------------------------------------- points 1, 6, 9: configuration is checked
@pytest.mark.parametrize("value", ["inf", "-inf", ".inf", "nan"])
def test_non_finite_learning_rate_rejected(value):
    from peftlab.config import load_config
    from peftlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"`training.learning_rate` must be a finite number, got (-?inf|nan)"):
        load_config(None, [f"--training.learning_rate={value}"])


@pytest.mark.parametrize("key,value,msg", [
    ("adam_beta1", "1.0", r"`training.adam_beta1` must be in \[0, 1\).*got 1.0"),
    ("adam_beta2", "-0.1", r"`training.adam_beta2` must be in \[0, 1\).*got -0.1"),
    ("adam_epsilon", "0", r"`training.adam_epsilon` must be positive .*got 0.0"),
    ("eval_max_batches", "0", r"`training.eval_max_batches` must be at least 1, or null.*got 0"),
])
def test_optimizer_and_eval_keys_range_checked(key, value, msg):
    from peftlab.config import load_config
    from peftlab.errors import ConfigError

    with pytest.raises(ConfigError, match=msg):
        load_config(None, [f"--training.{key}={value}"])


def test_non_utf8_yaml_is_a_clear_error(tmp_path):
    from peftlab.config import load_config
    from peftlab.errors import ConfigError

    p = tmp_path / "c.yaml"
    p.write_bytes("model:\n  name: tiny-gpt2  # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"c.yaml is not UTF-8 text \(byte 0xe9 at offset \d+\); save it as UTF-8"):
        load_config(p)


def test_two_spellings_of_one_key_and_duplicated_section_are_errors(tmp_path):
    from peftlab.config import load_config
    from peftlab.errors import ConfigError

    p = tmp_path / "a.yaml"
    p.write_text("method: sora\nsora:\n  lambda: 0.3\n  lambda_: 0.1\n")
    with pytest.raises(ConfigError, match=r"`sora.lambda` and `sora.lambda_` set the same key `sora.lambda_` \(0.3 and 0.1\)"):
        load_config(p)
    p.write_text("training:\n  epochs: 2\nmodel:\n  name: tiny-gpt2\ntraining:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"`training` appears twice in one mapping \(lines 1 and 5\)"):
        load_config(p)
    # an override replaces every spelling of its key instead of colliding with the file's
    p.write_text("method: sora\nsora:\n  lambda_: 0.1\n")
    assert load_config(p, ["--sora.lambda=0.3"]).sora.lambda_ == 0.3


def test_empty_config_warns_that_defaults_are_used(tmp_path):
    from peftlab.config import ConfigWarning, load_config

    p = tmp_path / "empty.yaml"
    p.write_text("# nothing yet\n")
    with pytest.warns(ConfigWarning, match=r"empty.yaml is empty: every setting takes its default"):
        cfg = load_config(p)
    assert cfg.method == "lora"


# ------------------------------------------------------------------ point 7: labels
def _cls_cfg(tmp_path, path, **kw):
    from peftlab.config import load_config

    return load_config(None, {"data.dataset": str(path), "output.dir": str(tmp_path / "run"), **kw})


def test_labels_0_1_7_are_not_silently_eight_classes(tmp_path):
    from peftlab.data import load_raw
    from peftlab.errors import PeftlabError

    p = tmp_path / "d.csv"
    p.write_text("text,label\n" + "".join(f"t{i},{[0, 1, 7][i % 3]}\n" for i in range(30)))
    with pytest.raises(PeftlabError, match=r"holds \[0, 1, 7\] \(no example of class\(es\) \[2, 3, 4, 5, 6\]\).*Relabel them 0..2.*--model.num_labels=8"):
        load_raw(_cls_cfg(tmp_path, p))
    raw = load_raw(_cls_cfg(tmp_path, p, **{"model.num_labels": 8}))  # explicit: 8 classes it is
    assert raw.num_labels == 8


def test_mixed_labels_list_the_offending_rows(tmp_path):
    from peftlab.data import load_raw
    from peftlab.errors import PeftlabError

    p = tmp_path / "d.csv"
    rows = [f"t{i},{i % 2}" for i in range(20)]
    rows[4], rows[11] = "t4,positive", "t11,0.5"
    p.write_text("text,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(PeftlabError, match=r"mixes integer and non-integer labels; most are integer but these are not: train row 5: 'positive'; train row 12: '0.5'"):
        load_raw(_cls_cfg(tmp_path, p))


def test_string_labels_mapping_is_explicit(tmp_path):
    from peftlab.data import load_raw

    p = tmp_path / "d.csv"
    p.write_text("text,label\n" + "".join(f"t{i},{['neg', 'pos'][i % 2]}\n" for i in range(20)))
    raw = load_raw(_cls_cfg(tmp_path, p))
    assert raw.info["label2id"] == {"neg": 0, "pos": 1} and raw.label_names == ["neg", "pos"]


def test_empty_texts_and_undecodable_bytes_are_counted(tmp_path):
    from peftlab.data import load_raw
    from peftlab.data.classification import DataWarning

    p = tmp_path / "d.csv"
    body = b"text,label\n" + b"".join(f"t{i},{i % 2}\n".encode() for i in range(20))
    body = body.replace(b"t3,", b"caf\xe9,").replace(b"t6,", b'"",').replace(b"t8,", b"  ,")
    p.write_bytes(body)
    with pytest.warns(DataWarning) as rec:
        raw = load_raw(_cls_cfg(tmp_path, p))
    msgs = " | ".join(str(w.message) for w in rec)
    assert "1 row(s) hold undecodable bytes" in msgs and "data rows 4" in msgs
    assert "empty texts train: 2 (data rows 7, 9)" in msgs
    assert raw.info["empty_texts_train"].startswith("2 ")


# ------------------------------------------------------- points 6, 8: model names and weights
def test_typo_model_name_fails_fast_with_did_you_mean(tmp_path, capsys):
    import time

    from conftest import QUICK
    from peftlab.cli import main
    from peftlab.errors import PeftlabError
    from peftlab.models import load_model

    cfg = make_cfg(tmp_path, model__name="tiny-gtp2")
    t0 = time.time()
    with pytest.raises(PeftlabError, match=r"model.name='tiny-gtp2' is not a model peftlab knows. Did you mean `tiny-gpt2`\?"):
        load_model(cfg, "causal_lm")
    assert time.time() - t0 < 10, "a typo must fail in seconds, not after the hub's retries"
    capsys.readouterr()
    # the command line in process: an error escaping main() as a traceback would fail the test here
    assert main(["train", str(QUICK["lm"]), "--model.name=tiny-gtp2", f"--output.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "is not a model peftlab knows. Did you mean `tiny-gpt2`?" in " ".join(err.split())


def test_unknown_names_and_missing_paths(tmp_path, monkeypatch):
    from peftlab import data, hub
    from peftlab.errors import PeftlabError
    from peftlab.models import check_name

    monkeypatch.setattr(hub, "reachable", lambda timeout=3.0: False)
    with pytest.raises(PeftlabError, match=r"model.name='someone/nothing-like-it' is not a model peftlab knows, not an existing path, not in the Hugging Face cache, and the hub cannot be reached"):
        check_name("someone/nothing-like-it", "model", "model.name")
    with pytest.raises(PeftlabError, match=r"data.tokenizer='./no/such/tok': the path .*no/such/tok does not exist"):
        check_name("./no/such/tok", "tokenizer", "data.tokenizer")
    with pytest.raises(PeftlabError, match=r"Did you mean `smollm2-135m`"):
        check_name("smolm2-135m", "model", "model.name")


def test_truncated_local_weights_are_a_clear_error(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftlab.errors import PeftlabError
    from peftlab.models import load_model

    folder = tmp_path / "m"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", vocab_size=260, n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    cfg = make_cfg(tmp_path, model__name=str(folder), data__tokenizer="byte")
    with pytest.raises(PeftlabError, match=r"Could not load the weights of model .*m\b.*truncated, corrupted or belong to another architecture"):
        load_model(cfg, "causal_lm")


# ------------------------------------------------------------------ point 10: SoRA / SDoRA
def test_fp16_skipped_step_leaves_no_gate_gradient_behind(tmp_path):
    """On a step the grad scaler skips the loop calls only zero_grad and ``after_zero_grad`` (no
    other hook); an inf gate gradient left from it must not reach the next gate step's Adam moments."""
    from test_sora import _build, _inputs

    cfg, m, model = _build(tmp_path, "lm")
    opt = m.build_optimizer(model)
    x = _inputs("lm")
    for g in m.gated:  # the overflowed step: every gradient inf, scaler skips, loop only zero_grads
        g.gate.grad = torch.full_like(g.gate, float("inf"))
    opt.zero_grad(set_to_none=True)
    m.after_zero_grad(model)
    assert all(g.gate.grad is None for g in m.gated)
    model(**x, labels=x["input_ids"]).loss.backward()  # the next, healthy step
    opt.step()
    m.after_optimizer_step(model, cfg.training.learning_rate)
    for g in m.gated:
        st = m.adam[g.param_name]
        assert torch.isfinite(st["exp_avg"]).all() and torch.isfinite(st["exp_avg_sq"]).all(), g.name
        assert torch.isfinite(g.gate).all()


def test_non_finite_gate_gradient_is_never_stepped(tmp_path, caplog):
    from test_sora import _build

    cfg, m, model = _build(tmp_path, "lm")
    m.build_optimizer(model)
    before = {g.param_name: g.gate.detach().clone() for g in m.gated}
    for g in m.gated:
        g.gate.grad = torch.full_like(g.gate, float("nan"))
    with caplog.at_level("WARNING", logger="peftlab"):
        m.after_optimizer_step(model, cfg.training.learning_rate)
    assert "non-finite gate gradient" in caplog.text
    for g in m.gated:
        assert torch.equal(g.gate.detach(), before[g.param_name]) and m.adam[g.param_name]["step"] == 0


@pytest.mark.parametrize("method,bias", [("sora", "lora_only"), ("sora", "all"), ("sdora", "none"), ("sdora", "lora_only")])
def test_rank0_module_export_keeps_bias_and_counts_match(tmp_path, method, bias):
    """lora.bias=all used to crash at export (shared tensors); lora_only lost the trained bias of a
    module pruned to rank 0; SDoRA undercounted effective parameters by d_in + d_out per such module."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from test_sora import _base, _build, _inputs, _randomize

    cfg, m, model = _build(tmp_path, "cls", method=method, lora__bias=bias)
    _randomize(m)
    with torch.no_grad():
        m.gated[0].gate.zero_()
        for n, p in model.named_parameters():
            if n.endswith(".bias") and p.requires_grad:
                p.add_(0.5)  # a trained bias that the export must carry
    model.eval()
    x = _inputs("cls")
    with torch.no_grad():
        want = model(**x).logits
    out = m.export(model, tmp_path / "out")
    tensors = load_file(out / "adapter_model.safetensors")
    # with bias=all peft also writes the head's bias under its plain and original_module names
    dup = sum(t.numel() for k, t in tensors.items()
              if ".original_module." in k or (".modules_to_save." in k and k.replace("modules_to_save.", "") in tensors))
    assert sum(t.numel() for t in tensors.values()) - dup == m.param_counts(model)[1]
    assert m.gated[0].name in json.loads((out / "adapter_config.json").read_text())["rank_pattern"] or bias == "none"
    with torch.no_grad():
        got = PeftModel.from_pretrained(_base(cfg, "cls"), str(out)).eval()(**x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_loraplus_learning_rates_match_peft(tmp_path):
    """Every trainable parameter gets the learning rate peft's create_loraplus_optimizer gives it
    (1-D parameters such as biases and DoRA magnitudes at B's rate, not A's)."""
    from peft.optimizers import create_loraplus_optimizer

    from peftlab.methods import METHODS, MethodContext
    from peftlab.models import load_model

    cfg = make_cfg(tmp_path, "cls", method="dora", lora__loraplus_lr_ratio=16.0, lora__bias="lora_only", training__weight_decay=0.01)
    model, _, info = load_model(cfg, "classification", 2)
    m = METHODS["dora"](MethodContext(cfg=cfg, task="classification", target_modules=info.target_modules))
    model = m.apply(model)
    ours = {id(p): g["lr"] for g in m.param_groups(model) for p in g["params"]}
    ref = create_loraplus_optimizer(model, torch.optim.AdamW, lr=cfg.training.learning_rate, loraplus_lr_ratio=16.0)
    theirs = {id(p): g["lr"] for g in ref.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert ours.keys() == theirs.keys()
    wrong = {names[i]: (ours[i], theirs[i]) for i in ours if ours[i] != pytest.approx(theirs[i])}
    assert not wrong, wrong
    assert any(p.ndim == 1 and ours[id(p)] == pytest.approx(16 * cfg.training.learning_rate) for _, p in model.named_parameters() if id(p) in ours)


def test_sora_classification_with_every_gate_pruned_still_exports_its_head(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from test_sora import _base, _build, _inputs

    cfg, m, model = _build(tmp_path, "cls", method="sora")
    with torch.no_grad():
        for g in m.gated:
            g.gate.zero_()
        head = [p for n, p in model.named_parameters() if "modules_to_save" in n]
        assert head
        for p in head:
            p.add_(0.7)  # the trained classifier
    model.eval()
    x = _inputs("cls")
    with torch.no_grad():
        want = model(**x).logits
    out = m.export(model, tmp_path / "out")
    assert out.name == "adapter", "the trained head must be exported even when no rank survives"
    tensors = load_file(out / "adapter_model.safetensors")
    assert sum(t.numel() for t in tensors.values()) == m.param_counts(model)[1]
    with torch.no_grad():
        got = PeftModel.from_pretrained(_base(cfg, "cls"), str(out)).eval()(**x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compare_unknown_method_fails_before_training(tmp_path, capsys):
    from peftlab.cli import main

    assert main(["compare", "--quick", "--methods", "lora,sdroa", "--output-dir", str(tmp_path / "cmp")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "compare --methods: unknown method(s) 'sdroa'. Did you mean `sdora`?" in err
    assert not (tmp_path / "cmp").exists()


# ---------------------------------------------------- point 6: files, paths, disks, positions
def test_disk_full_during_checkpoint_save_names_path_and_space(tmp_path, monkeypatch):
    import errno

    from peftlab import checkpoints as ckpt
    from peftlab.errors import PeftlabError

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    final = tmp_path / "checkpoints" / "step-4"
    tmp = ckpt.begin(final)
    monkeypatch.setattr(torch, "save", full)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1000))])
    with pytest.raises(PeftlabError, match=r"No space left on the device while writing .*checkpoints/step-4 \(No space left on device; [\d,.]+ \w+ free on .*; this save needs about 11.7 KiB\).*resume_from=latest"):
        ckpt.write_main(tmp, model_state={"w": torch.zeros(1000)}, optimizer=opt, scheduler=opt, method_state={},
                        trainer_state={"global_step": 4})
    assert not tmp.exists()  # the partial save gave its space back


def test_impossible_output_dir_rejected_before_anything_is_built(tmp_path):
    from peftlab.config import load_config
    from peftlab.errors import ConfigError

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"`output.dir`: .*afile/run cannot be created: .*afile is a file, not a directory"):
        load_config(None, {"output.dir": str(tmp_path / "afile" / "run")})
    with pytest.raises(ConfigError, match=r"`output.dir`: .*afile exists and is a file"):
        load_config(None, {"output.dir": str(tmp_path / "afile")})


def test_block_size_above_model_positions(tmp_path):
    from peftlab.errors import PeftlabError
    from peftlab.models import load_model

    cfg = make_cfg(tmp_path, data__block_size=1000)
    with pytest.raises(PeftlabError, match=r"data.block_size=1000 is above the 512 positions model 'tiny-gpt2' can attend to.*at most 512"):
        load_model(cfg, "causal_lm")


def test_non_utf8_text_data_is_counted_not_a_traceback(tmp_path):
    from peftlab.data.classification import DataWarning
    from peftlab.data.lm import read_documents

    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "caf\xe9 au lait"}\n{"text": "plain"}\n')
    with pytest.warns(DataWarning, match=r"d.jsonl is not valid UTF-8: 1 undecodable byte sequence\(s\) in 1 of 2 document\(s\)"):
        docs = read_documents(p)
    assert docs[1] == "plain" and "\ufffd" in docs[0]


# --------------------------------------------------------------- point 1: divergence in the loop
def test_nan_run_stops_with_status_diverged_and_keeps_a_finite_checkpoint(tmp_path, capsys):
    """`--method=full --training.learning_rate=1e6` used to train to the end on NaN, prune every finite
    checkpoint and exit 0."""
    from conftest import QUICK
    from peftlab import checkpoints as ckpt
    from peftlab.cli import main

    run = tmp_path / "run"
    base = ["train", str(QUICK["lm"]), f"--output.dir={run}", "--method=full",
            "--training.max_steps=12", "--training.save_steps=1", "--training.save_total_limit=1",
            "--data.max_train_examples=80", "--logging.progress_bar=false"]
    rc = main(base + ["--training.learning_rate=1e6"])  # in process: a traceback would fail the test here
    stderr = capsys.readouterr().err
    err = " ".join(stderr.split())
    assert rc != 0 and "Traceback" not in stderr
    assert "Training diverged at step" in err and "Likely cause: the learning rate (training.learning_rate=1e+06) is too high" in err
    res = json.loads((run / "results_final.json").read_text())
    assert res["status"] == "diverged" and res["diverged"]["step"] >= 1
    assert "NaN" not in (run / "results_final.json").read_text()
    assert not (run / "adapter").exists() and not (run / "final").exists()  # nothing exported
    cks = ckpt.list_checkpoints(run / "checkpoints")
    if res["diverged"]["step"] > 1:  # a finite checkpoint was saved before the NaN: it is kept
        assert cks and all(ckpt.is_finite_checkpoint(p) for _, _, p in cks)
        assert res["diverged"]["last_finite_checkpoint"] == str(cks[-1][2])


def test_resume_from_non_finite_weights_is_refused(saved_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from peftlab import checkpoints as ckpt

    run = _copy(saved_run, tmp_path)
    ck = run / "checkpoints" / "step-8"
    w = load_file(str(ck / "model_state.safetensors"))
    k = next(iter(w))
    w[k][0] = float("nan")
    save_file(w, str(ck / "model_state.safetensors"))
    ckpt.write_manifest(ck)  # re-signed: the manifest is fine, the weights are not
    with pytest.raises(ckpt.CheckpointError, match=r"step-8 holds non-finite \(NaN/inf\) weights.*Resume from the last finite checkpoint, .*step-4"):
        ckpt.load(ck)


def test_nan_evaluation_is_never_best():
    from peftlab.train.early_stop import beats

    assert not beats(float("nan"), None, higher=False)
    assert not beats(float("nan"), 1.0, higher=True)
    assert beats(2.0, float("nan"), higher=False)
    assert beats(0.5, 1.0, higher=False) and not beats(1.5, 1.0, higher=False)
    assert not beats(0.95, 1.0, higher=False, min_delta=0.1) and beats(0.85, 1.0, higher=False, min_delta=0.1)


# ------------------------------------------------------------------- point 2: one writer
@pytest.mark.slow
def test_second_writer_on_a_running_directory_fails_at_once_naming_the_holder(tmp_path, capsys):
    import platform
    import subprocess
    import sys
    import time

    from conftest import QUICK
    from peftlab.cli import main

    run = tmp_path / "run"
    argv = ["train", str(QUICK["lm"]), f"--output.dir={run}", "--training.max_steps=100000",
            "--training.epochs=1000", "--logging.progress_bar=false", "--data.max_train_examples=40"]
    # the first writer is another process; the second, in this process, is refused by its lock
    first = subprocess.Popen([sys.executable, "-m", "peftlab", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        # started: train.log and config.json written (the in-process second writer is quick enough to
        # come between the two)
        while not ((run / "train.log").is_file() and (run / "config.json").is_file()) and first.poll() is None \
                and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, "the first run should still be training"
        capsys.readouterr()
        rc = main(argv + ["--training.resume_from=latest"])  # in process: a traceback would fail the test here
        stderr = capsys.readouterr().err
        err = " ".join(stderr.split())
        assert rc == 2 and "Traceback" not in stderr, stderr
        assert f"is in use by another peftlab run: process {first.pid} on host {platform.node()}" in err
        assert first.poll() is None and (run / "config.json").is_file()  # the first run was not disturbed
    finally:
        first.kill()
        first.wait()


def test_lock_is_released_when_the_holder_dies_and_is_reentrant_in_process(tmp_path):
    import signal
    import subprocess
    import sys

    from peftlab.errors import PeftlabError
    from peftlab.train import lock

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"from peftlab.train import lock; lock.acquire({str(run)!r}); print('held', flush=True); "
                               "import time; time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PeftlabError, match=rf"in use by another peftlab run: process {holder.pid} on host"):
            lock.acquire(run)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock.acquire(run)  # SIGKILL dropped the lock: no stale lock
    lock.acquire(run)  # re-entrant within this process
    lock.release(run)


# ------------------------------------------------------------- point 3: resume trusts nothing
def test_resume_from_foreign_checkpoint_with_changed_learning_rate_is_refused(saved_run, tmp_path, run_train):
    """A checkpoint of another run, resumed into a new directory (no config.json there): its own
    config decides. A changed learning rate used to be ignored while config.json recorded it."""
    from peftlab.errors import PeftlabError

    foreign = saved_run / "checkpoints" / "step-8"
    assert (foreign / "config.json").is_file()
    cfg = make_cfg(tmp_path, training__save_steps=4, training__save_total_limit=None, training__resume_from=str(foreign),
                   training__learning_rate=1e-3)
    with pytest.raises(PeftlabError, match=r"Cannot resume from .*step-8: this configuration differs from the one the checkpoint .* was trained with \(training.learning_rate: 0.003 -> 0.001\)\. Resume changes only training.resume_from, output.\*"):
        run_train(cfg)
    cfg = make_cfg(tmp_path / "b", training__save_steps=4, training__save_total_limit=None, training__resume_from=str(foreign),
                   training__seed=7)
    with pytest.raises(PeftlabError, match=r"training.seed: 42 -> 7"):
        run_train(cfg)


def test_resume_without_config_json_still_checks_the_checkpoint(saved_run, tmp_path, run_train):
    from peftlab.errors import PeftlabError

    run = _copy(saved_run, tmp_path)
    (run / "config.json").unlink()
    (run / "results_final.json").unlink()
    cfg = make_cfg(tmp_path, training__save_steps=4, training__save_total_limit=None, training__resume_from="latest",
                   output__dir=str(run), lora__r=4)
    with pytest.raises(PeftlabError, match=r"differs from the one the checkpoint .* was trained with \(lora.r: 8 -> 4\)"):
        run_train(cfg)


def test_checkpoint_without_any_config_record_is_refused(saved_run, tmp_path):
    from peftlab import checkpoints as ckpt
    from peftlab.runs.identity import check_identity

    run = _copy(saved_run, tmp_path)
    ck = run / "checkpoints" / "step-8"
    (ck / "config.json").unlink()
    ckpt.write_manifest(ck)
    with pytest.raises(ckpt.CheckpointError, match=r"Cannot resume from .*step-8: neither the checkpoint nor .* records the configuration"):
        check_identity(ck, tmp_path / "elsewhere", make_cfg(tmp_path))


# ------------------------------------------------------ points 4, 5: export of a copied run
def test_copied_run_merges_onto_its_own_base_and_killed_export_does_not_block(tmp_path, run_train):
    """A copied run's adapter_config.json still names the original run's base_model/ by absolute
    path; when that directory now holds another run (other seed, other random base), `export --merge`
    of the copy must still merge onto the copy's own base."""
    from transformers import AutoModelForCausalLM

    from peftlab.cli import main
    from peftlab.runs import load_run

    orig = tmp_path / "run"
    run_train(make_cfg(tmp_path, training__max_steps=4))
    copy = tmp_path / "copy"
    shutil.copytree(orig, copy)
    acfg = copy / "adapter" / "adapter_config.json"  # exports now record a run-relative base; an older run
    data = json.loads(acfg.read_text())          # named the original run's base_model/ by absolute path
    data["base_model_name_or_path"] = str(orig / "base_model")
    acfg.write_text(json.dumps(data))
    run_train(make_cfg(tmp_path, training__max_steps=4, training__seed=5, output__overwrite=True))  # orig: another base
    (copy / ".merged.partial").mkdir()  # what a killed export leaves behind
    (copy / ".merged.partial" / "config.json").write_text("{")
    assert main(["export", str(copy), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(copy / "merged")).eval()
    loaded = load_run(copy)
    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, loaded.model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert not (copy / ".merged.partial").exists()


@pytest.mark.parametrize("argv,msg", [
    (["profile", "{cfg}", "--batch-size", "0"], r"--batch-size must be a positive integer, got 0"),
    (["profile", "{cfg}", "--seq-len", "100000"], r"--seq-len=100000 is above the 512 positions model 'tiny-gpt2' can attend to"),
    (["profile", "{cfg}", "--output-dir", "{file}/p"], r"--output-dir: .*afile/p cannot be created: .*afile is a file"),
    (["data", "prepare", "lm-sample", "--output-dir", "{file}/x"], r"--output-dir: .*afile/x cannot be created"),
])
def test_bad_profile_and_prepare_arguments_are_clear_errors(tmp_path, capsys, argv, msg):
    import re

    from conftest import QUICK
    from peftlab.cli import main

    (tmp_path / "afile").write_text("x")
    argv = [a.format(cfg=QUICK["lm"], file=tmp_path / "afile") for a in argv]
    assert main(argv + [f"--output.dir={tmp_path / 'run'}"] if argv[0] == "profile" else argv) == 2
    assert re.search(msg, " ".join(capsys.readouterr().err.split()))


def test_divergence_names_the_first_non_finite_step_between_log_points(tmp_path, run_train):
    from peftlab.train.guards import Diverged

    cfg = make_cfg(tmp_path, method="full", training__learning_rate=1e6, training__log_steps=5, training__max_steps=6)
    with pytest.raises(Diverged, match=r"Training diverged at step 2 \(epoch 1\): the training loss is nan\. Likely cause: the learning rate"):
        run_train(cfg)
    res = json.loads((tmp_path / "run" / "results_final.json").read_text())
    assert res["status"] == "diverged" and res["diverged"]["step"] == 2 and res["diverged"]["last_finite_checkpoint"] is None
    assert not list((tmp_path / "run").glob("checkpoints/*"))  # nothing saved after the NaN
