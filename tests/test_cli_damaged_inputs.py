"""Every `peftlab` subcommand on a directory of damaged inputs (issue 26): a non-UTF-8 file, a
truncated JSON config, values of the wrong type, a target that cannot be written (a file in the
way; a read-only directory when not root), damaged run and study directories. Each case must end
with exit status 2 (a clear error) or 0, never a traceback. In process, no training: every case
is refused before a model is built (or fails on a run directory that holds no weights)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from peftlab.cli import main
from peftlab.cli.table import COMMANDS
from peftlab.config import load_config

ROOT = Path(__file__).resolve().parent.parent
LM = str(ROOT / "configs/quickstart/lm_lora.yaml")


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("damaged")
    (d / "latin1.yaml").write_bytes(b"training:\n  learning_rate: 1e-4  # caf\xe9\n")
    (d / "utf16.jsonl").write_bytes('{"text": "hello"}\n'.encode("utf-16"))
    (d / "latin1.jsonl").write_bytes(b'{"instruction": "caf\xe9", "output": "ok"}\n')
    (d / "truncated.json").write_text('{"method": "lora", "training": {"learning_rate": 1e-')
    (d / "truncated.yaml").write_text("training:\n  learning_rate: [1e-4,\n")
    (d / "wrong_types.yaml").write_text("training:\n  learning_rate: fast\n  epochs: [1]\nlora: {r: eight}\n")
    (d / "list.yaml").write_text("- just\n- a list\n")
    (d / "study_latin1.yaml").write_bytes(b"study: {name: caf\xe9}\nseeds: [1]\n")
    (d / "study_wrong.yaml").write_text(f"study: {{name: w}}\nbase: {LM}\nseeds: one\narms: {{name: a}}\ngrid: [1, 2]\n")
    (d / "study_empty.yaml").write_text("")
    (d / "blocker").write_text("a file where a directory should be\n")
    run = d / "run"  # a damaged run directory: truncated config.json, a list results_final.json, an empty checkpoint file
    (run / "checkpoints" / "step-4").mkdir(parents=True)
    (run / "config.json").write_text('{"method": "lora", "model": {"na')
    (run / "results_final.json").write_text("[1, 2, 3]\n")
    (run / "trainer_state.json").write_text('{"epoch": 1}')
    (run / "checkpoints" / "step-4" / "adapter_model.safetensors").write_bytes(b"")
    ck = d / "run_ckpt"  # a valid config.json, a zero-length checkpoint
    (ck / "checkpoints" / "step-4").mkdir(parents=True)
    (ck / "config.json").write_text(json.dumps(load_config(LM, {"output.dir": str(ck)}).to_dict()))
    (ck / "checkpoints" / "step-4" / "adapter_model.safetensors").write_bytes(b"")
    (ck / "checkpoints" / "step-4" / "trainer_state.json").write_text('{"global_step": 4')
    types = d / "study_types"  # completed runs, one with a non-numeric val_loss and trainable_params (analyze warns)
    for i, loss in enumerate((0.5, "oops")):
        r = types / f"r{i}"
        r.mkdir(parents=True)
        (r / "config.json").write_text(json.dumps({"method": "lora", "training": {"seed": i}}))
        (r / "results_final.json").write_text(json.dumps({"status": "completed", "final": {"val_loss": loss},
                                                          "trainable_params": 10 if i == 0 else "many"}))
    study = d / "study"  # a study directory whose runs hold wrong types
    for i, res in enumerate(([1, 2], {"status": "completed", "final": {"val_loss": "oops"}, "trainable_params": "many"})):
        r = study / f"r{i}"
        r.mkdir(parents=True)
        (r / "config.json").write_text(json.dumps({"method": "lora", "training": {"seed": i}}))
        (r / "results_final.json").write_text(json.dumps(res))
    readonly = d / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    yield d
    readonly.chmod(0o755)


# (command, argv with {d} for the damaged directory, marks)
CASES = [
    ("train", ["train", "{d}/latin1.yaml", "--output.dir={d}/out_t1"], ()),
    ("train", ["train", "{d}/truncated.json", "--output.dir={d}/out_t2"], ()),
    ("train", ["train", "{d}/truncated.yaml", "--output.dir={d}/out_t3"], ()),
    ("train", ["train", "{d}/wrong_types.yaml", "--output.dir={d}/out_t4"], ()),
    ("train", ["train", "{d}/list.yaml", "--output.dir={d}/out_t5"], ()),
    ("train", ["train", LM, "--training.max_steps=two", "--output.dir={d}/out_t6"], ()),
    ("train", ["train", LM, "--output.dir={d}/blocker"], ()),
    ("train", ["train", LM, "--output.dir={d}/readonly/run"], ("root",)),
    ("train", ["train", LM, "--data.dataset={d}/utf16.jsonl", "--output.dir={d}/out_t7"], ()),
    ("train", ["train", LM, "--data.dataset={d}/latin1.jsonl", "--data.format=instruction", "--output.dir={d}/out_t8"], ()),
    ("config", ["config", "{d}/latin1.yaml"], ()),
    ("config", ["config", "{d}/truncated.json"], ()),
    ("config", ["config", "{d}/wrong_types.yaml"], ()),
    ("config", ["config", "{d}/list.yaml"], ()),
    ("data", ["data", "prepare", "{d}/utf16.jsonl", "--output-dir", "{d}/bins1"], ()),
    ("data", ["data", "prepare", "{d}/latin1.yaml", "--output-dir", "{d}/bins2"], ()),
    ("data", ["data", "prepare", "lm-sample", "--output-dir", "{d}/blocker"], ()),
    ("profile", ["profile", "{d}/latin1.yaml"], ()),
    ("profile", ["profile", "{d}/truncated.json"], ()),
    ("profile", ["profile", "{d}/wrong_types.yaml"], ()),
    ("export", ["export", "{d}/run"], ()),
    ("export", ["export", "{d}/run", "--which", "step-4"], ()),
    ("export", ["export", "{d}/run", "--output-dir", "{d}/blocker"], ()),
    ("export", ["export", "{d}/run_ckpt", "--which", "step-4"], ()),
    ("export", ["export", "{d}/run_ckpt", "--which", "step-4", "--merge", "--output-dir", "{d}/blocker"], ()),
    ("export", ["export", "{d}/nowhere"], ()),
    ("compare", ["compare", "--config", "{d}/latin1.yaml", "--output-dir", "{d}/cmp1"], ()),
    ("compare", ["compare", "--config", "{d}/wrong_types.yaml", "--output-dir", "{d}/cmp2"], ()),
    ("compare", ["compare", "--methods", ",", "--output-dir", "{d}/cmp3"], ()),
    ("compare", ["compare", "--methods", "lora,nope", "--output-dir", "{d}/cmp4"], ()),
    ("sweep", ["sweep", "{d}/study_latin1.yaml", "--dry-run"], ()),
    ("sweep", ["sweep", "{d}/study_wrong.yaml", "--dry-run"], ()),
    ("sweep", ["sweep", "{d}/study_empty.yaml"], ()),
    ("sweep", ["sweep", "{d}/truncated.yaml", "--dry-run"], ()),
    ("sweep", ["sweep", "{d}/list.yaml"], ()),
    ("estimate", ["estimate", "{d}/study_latin1.yaml"], ()),
    ("estimate", ["estimate", "{d}/latin1.yaml"], ()),
    ("estimate", ["estimate", "{d}/wrong_types.yaml"], ()),
    ("estimate", ["estimate", "{d}/study_wrong.yaml"], ()),
    ("estimate", [ "estimate", LM, "--steps", "-3"], ()),
    ("bounds", ["bounds", "{d}/run"], ()),
    ("bounds", ["bounds", "{d}/run", "--bounds.output={d}/blocker/b.json"], ()),
    ("bounds", ["bounds", "{d}/run_ckpt"], ()),
    ("bounds", ["bounds", "{d}/run_ckpt", "--bounds.output={d}/blocker"], ()),
    ("bounds", ["bounds", "{d}/nowhere"], ()),
    ("analyze", ["analyze", "{d}/study", "--output-dir", "{d}/an1", "--no-baseline"], ()),
    ("analyze", ["analyze", "{d}/study", "--output-dir", "{d}/blocker", "--no-baseline"], ()),
    ("analyze", ["analyze", "{d}/study_types", "--output-dir", "{d}/an2", "--no-baseline"], ()),
    ("analyze", ["analyze", "{d}/latin1.yaml"], ()),
]


def test_the_cases_cover_every_command():
    assert {c for c, _, _ in CASES} == set(COMMANDS)


@pytest.mark.parametrize("argv,marks", [pytest.param(a, m, id=f"{c}-{i}", marks=[x for x in m if x != "root"])
                                        for i, (c, a, m) in enumerate(CASES)])
def test_damaged_input_is_exit_2_or_0_never_a_traceback(damaged, capsys, argv, marks):
    if "root" in marks and os.geteuid() == 0:
        pytest.skip("root writes into a read-only directory; the file-in-the-way cases cover the check")
    args = [a.replace("{d}", str(damaged)) for a in argv]
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's own usage errors exit 2
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert rc in (0, 2), f"exit {rc}: {err}"
    if rc == 2:
        assert err.strip(), "an error exit must say why"
