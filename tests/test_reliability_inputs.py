"""Bad input and damaged files (issue 26, classes 2, 4, 5, 7, 8): every case is a clear
PeftlabError (exit 2 at the CLI) or the documented behaviour, never a traceback or a silent
wrong answer. No training here: each case stops at validation or works on written files."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from peftlab.errors import ConfigError, PeftlabError

ROOT = Path(__file__).resolve().parent.parent
LM = str(ROOT / "configs/quickstart/lm_lora.yaml")
TINY = {"training.max_steps": 4, "training.epochs": 1, "training.log_steps": 1, "training.save_steps": 0,
        "data.max_train_examples": 64, "data.max_val_examples": 16, "logging.progress_bar": False}


def _raw(tmp_path, **raw) -> dict:
    base = {"study": {"name": "t", "output_dir": str(tmp_path / "study"), "run_name": "{arm}_s{seed}"}, "base": LM,
            "overrides": dict(TINY)}
    base.update(raw)
    return base


def _spec(tmp_path, **raw):
    from peftlab.studies.spec import spec_from_dict

    return spec_from_dict(_raw(tmp_path, **raw))


# ------------------------------------------------------------ 2. paths stay inside the study
@pytest.mark.parametrize("arm", ["..", ".", "a/b", "..\\x", "tab\there", ".study"])
def test_arm_names_that_would_leave_the_study_directory_are_refused_at_load(tmp_path, arm):
    with pytest.raises(ConfigError, match=r"arms\[0\]\.name` .*(outside the study directory|path separators and control)"):
        _spec(tmp_path, arms=[{"name": arm, "overrides": {"method": "lora"}}], seeds=[1])


@pytest.mark.parametrize("template", [".", "..", "{arm}"])
def test_run_names_dot_and_dotdot_are_refused_before_anything_is_written(tmp_path, template):
    from peftlab.studies.expand import expand

    spec = _spec(tmp_path, study={"name": "t", "output_dir": str(tmp_path / "study"), "run_name": template},
                 arms=[{"name": "a", "overrides": {"method": "lora"}}] if template == "{arm}" else [], seeds=[1])
    if template == "{arm}":  # an arm named .. is caught at load; here the template makes `..` from a grid value
        spec.study.run_name = "{logging.project}"
        spec.grid.product = {"logging.project": [".."]}
    with pytest.raises(ConfigError, match=r"run name of run 1 .* outside the study directory or a hidden one.*study\.run_name"):
        expand(spec)
    assert not (tmp_path / "study").exists() and not (tmp_path / "study.log").exists()


def test_run_directory_symlinked_out_of_the_study_is_refused(tmp_path):
    from peftlab.studies.expand import expand

    spec = _spec(tmp_path, arms=[{"name": "a", "overrides": {"method": "lora"}}], seeds=[1])
    (tmp_path / "study").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "study" / "a_s1").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"resolves to .*elsewhere, outside the study directory"):
        expand(spec)


def test_study_and_scale_names_are_checked_too(tmp_path):
    with pytest.raises(ConfigError, match=r"`study.name` '\.\.' would name a path outside"):
        _spec(tmp_path, study={"name": "..", "run_name": "{arm}_s{seed}"})
    with pytest.raises(ConfigError, match=r"scale name '\.\./up' would name a path outside"):
        _spec(tmp_path, scales={"../up": {"seeds": [1]}})


# ------------------------------------------------------------ 4. sweeps and failures
def _events(sd: Path, *records: dict) -> None:
    sd.mkdir(parents=True, exist_ok=True)
    with open(sd / "study.jsonl", "a") as f:
        for r in records:
            f.write(json.dumps({"event": "end", "time": 0, **r}) + "\n")


def test_a_run_reported_as_given_up_stays_given_up_at_the_next_sweep(tmp_path):
    from peftlab.studies.expand import expand
    from peftlab.studies.runner import fingerprint, plan

    spec = _spec(tmp_path, seeds=[1], execution={"max_attempts_same_error": 2})
    (t,) = expand(spec)
    ident = fingerprint(t.cfg)
    err = "error: no_such_layer"
    _events(t.run_dir.parent, {"run": t.name, "identity": ident, "outcome": "failed", "error": err},
            {"run": t.name, "identity": ident, "outcome": "failed", "error": err})
    assert plan(spec, [t])[0]["status"] == "gave-up"
    # the sweep that did not retry it records outcome gave-up; the sweep after it must not retry it either
    _events(t.run_dir.parent, {"run": t.name, "identity": ident, "outcome": "gave-up", "error": f"failed 2x with: {err}"})
    (row,) = plan(spec, [t])
    assert row["status"] == "gave-up" and err in row["detail"]
    assert plan(spec, [t], retry_failed=True)[0]["status"] == "new"


def test_a_diverged_run_is_not_resumed_by_the_next_sweep(tmp_path):
    from peftlab.studies.expand import expand
    from peftlab.studies.runner import SweepSummary, execute_trial, make_job, plan, sweep

    spec = _spec(tmp_path, seeds=[1])
    (t,) = expand(spec)
    t.run_dir.mkdir(parents=True)
    (t.run_dir / "config.json").write_text(json.dumps(t.cfg.to_dict()))
    (t.run_dir / "checkpoints" / "step-2").mkdir(parents=True)
    (t.run_dir / "results_final.json").write_text(json.dumps(
        {"status": "diverged", "diverged": {"step": 3, "what": "the training loss is nan"}}))
    for retry in (False, True):
        (row,) = plan(spec, [t], retry_failed=retry)
        assert row["status"] == "diverged"
        assert "diverged at step 3: the training loss is nan; not trained again" in row["detail"]
    res = execute_trial(make_job(spec, t, t.run_dir.parent))  # a racing worker does not train it either
    assert res.outcome == "diverged" and not res.trained

    class NoRun:  # the sweep must hand nothing to the executor
        slots = 1

        def describe(self):
            return "test"

        def run(self, spec, jobs, *a):
            assert jobs == []

    summary = sweep(spec, [t], NoRun(), out=open(tmp_path / "out.txt", "w"))
    assert isinstance(summary, SweepSummary) and not summary.ok and summary.failures == [t.name]
    assert "NOT retried, diverged at step 3" in (t.run_dir.parent / "study.log").read_text()


# ------------------------------------------------------------ 7. bad records
def test_chat_record_starting_with_the_assistant_is_counted_not_a_crash(tmp_path):
    from conftest import make_cfg
    from peftlab.data.instruction import encode_split, normalize
    from peftlab.models.tokenizers import byte_tokenizer

    cfg = make_cfg(tmp_path, "lm")
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    first = {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "yo"}]}
    norm, bad = normalize([good, first, good], "chat", cfg, "train")
    assert len(norm) == 2 and bad.count == 1
    assert "1 of 3 train records skipped (1 starts with an assistant message" in bad.summary()
    assert "#1 starts with an assistant message" in bad.summary()
    enc, bad2, _ = encode_split(norm, byte_tokenizer(), cfg, "train", False)  # what crashed with ValueError before
    assert len(enc) == 2 and bad2.count == 0
    with pytest.raises(PeftlabError, match=r"Every train record of 'x' is unusable: 1 of 1 .*starts with an assistant message"):
        normalize([first], "chat", cfg, "train")[1].check("x")
    sys_cfg = make_cfg(tmp_path, "lm", data__system_prompt="Be brief.")  # a system message first: rendered and kept
    assert len(normalize([first], "chat", sys_cfg, "train")[0]) == 1


# ------------------------------------------------------------ 8. silent wrong output
def test_one_non_numeric_val_loss_is_missing_for_that_run_only(tmp_path):
    import analysis_fixtures as F
    from peftlab.analysis.collect import aggregate, collect

    for seed, loss in ((1, 0.5), (2, 0.7), (3, 0.9)):
        F.write_run(tmp_path / f"lora_seed{seed}", "lora", {"training.seed": seed}, task="language_modeling",
                    final={"train_loss": 0.4, "val_loss": loss}, trainable=100)
    p = tmp_path / "lora_seed3" / "results_final.json"
    res = json.loads(p.read_text())
    res["final"]["val_loss"] = "oops"
    p.write_text(json.dumps(res))
    study = collect(tmp_path)
    t = study.table.set_index("run")
    assert t.loc["lora_seed1", "val_loss"] == 0.5 and t.loc["lora_seed2", "val_loss"] == 0.7
    assert t.loc["lora_seed3", "val_loss"] is None or math.isnan(t.loc["lora_seed3", "val_loss"])
    assert any(re.search(r"run lora_seed3: val_loss is 'oops', not a number; treated as missing for this run only", n)
               for n in study.notes), study.notes
    (row,) = aggregate(study).to_dict("records")
    assert row["n"] == 3 and row["val_loss_mean"] == pytest.approx(0.6) and row["val_loss_std"] == pytest.approx(0.02 ** 0.5)
    assert row["train_loss_mean"] == pytest.approx(0.4)  # the other columns of that run are kept


def test_an_infinite_perplexity_is_a_divergence_not_completed(tmp_path, run_train):
    from conftest import make_cfg
    from peftlab.train.guards import Diverged

    cfg = make_cfg(tmp_path, method="full", training__learning_rate=10.0)  # used to end "completed", perplexity inf
    with pytest.raises(Diverged, match=r"Training diverged at step 12 \(epoch 1\): the evaluation gave val_perplexity=inf "
                                       r"\(val_loss=.*\)\. Likely cause: the learning rate"):
        run_train(cfg)
    res = json.loads((tmp_path / "run" / "results_final.json").read_text())
    assert res["status"] == "diverged" and "val_perplexity=inf" in res["diverged"]["what"]


def test_empty_study_file_is_refused(tmp_path, capsys):
    from peftlab.cli import main

    for text in ("", "# nothing yet\n", "{}\n"):
        (tmp_path / "empty.yaml").write_text(text)
        assert main(["sweep", str(tmp_path / "empty.yaml"), "--dry-run"]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert re.search(r"study file .*empty\.yaml is empty; a study names at least its runs", err), err


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_estimate_needs_at_least_one_step(tmp_path, capsys, steps):
    from peftlab.cli import main

    assert main(["estimate", LM, "--steps", steps]) == 2
    assert f"estimate --steps {steps}: the number of optimizer steps to time must be at least 1" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("methods", [",", "", " , "])
def test_compare_methods_naming_no_method_is_refused(tmp_path, capsys, methods):
    from peftlab.cli import main

    assert main(["compare", "--methods", methods, "--output-dir", str(tmp_path / "cmp")]) == 2
    assert "names no method; give comma-separated names" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "cmp").exists()


# ------------------------------------------------------------ 5. encodings
LATIN1 = "caf\u00e9 na\u00efve\n".encode("latin-1")


def test_read_text_names_the_file_and_the_encoding(tmp_path):
    from peftlab.io import read_text

    p = tmp_path / "a.csv"
    p.write_bytes(b"text,label\n" + LATIN1)
    with pytest.raises(PeftlabError, match=r"data file .*a\.csv is not valid UTF-8: byte 0xe9 on line 2 .*iconv -f LATIN1 -t UTF-8"):
        read_text(p, "data file")
    assert read_text(p, errors="replace").count("\ufffd") == 2
    for enc, name in (("utf-16", "UTF-16"), ("utf-32", "UTF-32"), ("utf-16-le", "UTF-16 or UTF-32 \\(no byte-order mark\\)")):
        p.write_bytes("text,label\nhello,1\n".encode(enc))
        with pytest.raises(PeftlabError, match=rf"a\.csv is encoded as {name}, but peftlab reads text files as UTF-8"):
            read_text(p, "data file", errors="replace")
    p.write_text("text,label\nh\u00e9llo,1\n", encoding="utf-8")
    assert read_text(p) == "text,label\nh\u00e9llo,1\n"


def test_utf16_csv_names_its_encoding_not_a_field_count(tmp_path):
    from peftlab.data.classification import load_table

    p = tmp_path / "train.csv"
    p.write_bytes(("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(20))).encode("utf-16"))
    with pytest.raises(PeftlabError, match=r"data file .*train\.csv is encoded as UTF-16, but peftlab reads text files as UTF-8"):
        load_table(p)


@pytest.mark.parametrize("kind", ["study", "estimate", "instruction_jsonl", "instruction_json", "lm_jsonl", "prepare"])
def test_non_utf8_inputs_are_clear_errors(tmp_path, capsys, kind):
    from peftlab.cli import main

    if kind in ("study", "estimate"):
        p = tmp_path / "study.yaml"
        p.write_bytes(b"study: {name: caf\xe9}\nseeds: [1]\n")
        argv = ["sweep", str(p), "--dry-run"] if kind == "study" else ["estimate", str(p)]
        what = "study file" if kind == "study" else "YAML file"
    elif kind.startswith("instruction"):
        p = tmp_path / ("chat.jsonl" if kind == "instruction_jsonl" else "chat.json")
        rec = b'{"instruction": "Say caf\xe9", "output": "ok"}'
        p.write_bytes(rec + b"\n" if kind == "instruction_jsonl" else b"[" + rec + b"]")
        argv = ["train", LM, f"--data.dataset={p}", f"--output.dir={tmp_path / 'run'}", "--data.format=instruction"]
        what = "data file"  # sniffed as "data file" (.jsonl), read as "instruction data file" (.json)
    else:
        p = tmp_path / "docs.jsonl"
        p.write_bytes('{"text": "hello"}\n'.encode("utf-16"))
        argv = (["train", LM, f"--data.dataset={p}", f"--output.dir={tmp_path / 'run'}"] if kind == "lm_jsonl" else
                ["data", "prepare", str(p), "--output-dir", str(tmp_path / "bins")])
        what = "data file"
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err
    assert re.search(rf"{what} .*{re.escape(p.name)} (is not valid UTF-8: byte 0xe9 on line 1|is encoded as UTF-16)", err), err
