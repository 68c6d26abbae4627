"""Reliability of the readers of a run (issue 26, classes 1, 3, 6, 9, 10): every reader verifies
the checkpoint it reads, a full disk during a save is one clear error, damaged run files and
read-only outputs are clear errors before the work, messages send the user the right way."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_cfg


# ------------------------------------------------------------ class 3: disk full during a save
def _save_args():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1000))])
    return dict(model_state={"w": torch.zeros(1000)}, optimizer=opt, scheduler=opt, method_state={},
                trainer_state={"global_step": 4})


def test_disk_full_in_safetensors_is_the_disk_full_error_and_removes_the_partial_save(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from peftlab import checkpoints as ckpt
    from peftlab.errors import PeftlabError

    def full(*a, **k):  # what safetensors 0.8 raises on a full tmpfs
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    final = tmp_path / "checkpoints" / "step-4"
    tmp = ckpt.begin(final)
    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(PeftlabError, match=r"No space left on the device while writing .*checkpoints/step-4 \(Error while "
                                           r"serializing: I/O error: No space left on device \(os error 28\); .* free on .*"
                                           r"this save needs about 11.7 KiB\).*resume_from=latest"):
        ckpt.write_main(tmp, **_save_args())
    assert not tmp.exists()


def test_disk_full_in_torch_save_is_the_disk_full_error_other_runtime_errors_are_not(tmp_path, monkeypatch):
    from peftlab import checkpoints as ckpt
    from peftlab import io
    from peftlab.errors import PeftlabError

    def full(*a, **k):  # what torch 2.13's zip writer raises on a full tmpfs: no word of the cause
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 640 vs 598")

    usage = collections.namedtuple("usage", "total used free")
    final = tmp_path / "checkpoints" / "step-4"
    tmp = ckpt.begin(final)
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(io.shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 0))
    with pytest.raises(PeftlabError, match=r"No space left on the device while writing .*checkpoints/step-4 \(\[enforce fail"):
        ckpt.write_main(tmp, **_save_args())
    assert not tmp.exists()
    tmp = ckpt.begin(final)
    with pytest.raises(PeftlabError, match=r"No space left on the device while writing .*checkpoints/step-4"):
        ckpt.write_rank_rng(tmp, 0)
    assert not tmp.exists()
    # the same error with space to spare is not a full disk: it stays what it is
    monkeypatch.setattr(io.shutil, "disk_usage", lambda p: usage(1 << 30, 0, 1 << 30))
    tmp = ckpt.begin(final)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        ckpt.write_main(tmp, **_save_args())


# ------------------------------------------------------------ a finished run to damage, once per module
@pytest.fixture(scope="module")
def bins(tmp_path_factory):
    from peftlab.data.bins import prepare_token_bins
    from peftlab.models.tokenizers import byte_tokenizer

    d = tmp_path_factory.mktemp("bins")
    phrases = ["the cat sat on the mat. ", "a dog ran in the park. ", "we like green tea. "]
    prepare_token_bins([phrases[i % 3] * (1 + i % 4) for i in range(300)], byte_tokenizer(), d, 0.05, tokenizer_name="byte",
                       progress=False)
    return d


@pytest.fixture(scope="module")
def finished(tmp_path_factory, bins):
    """A finished tiny LoRA run on token bins (so `bounds` can read it), checkpoints step-4 and epoch-1 (the final one, at step 8)."""
    from peftlab.train import train

    tmp = tmp_path_factory.mktemp("fin")
    cfg = make_cfg(tmp, data__dataset=str(bins), data__block_size=64, training__max_steps=8, training__save_steps=4,
                   training__save_total_limit=None)
    assert train(cfg, console=False)["status"] == "completed"
    return tmp / "run"


@pytest.fixture
def run(finished, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(finished, dst)
    return dst


@pytest.fixture
def cli(capsys):
    """``cli(*argv) -> (exit code, stderr as one line)``: the real entry point, in process."""
    from peftlab.cli import main

    def call(*argv):
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        return rc, " ".join(capsys.readouterr().err.split())

    return call


BOUNDS = ("--bounds.num_docs=20", "--bounds.full_precision_units=0", "--bounds.progress_bar=false", "--bounds.device=cpu")


def _final(run: Path) -> Path:
    from peftlab.rundir import RunDir

    return RunDir(run).checkpoint("final")


def _zero(ck: Path) -> None:
    from safetensors.torch import load_file, save_file

    w = load_file(str(ck / "model_state.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in w.items()}, str(ck / "model_state.safetensors"))


# ------------------------------------------------------------ class 1: every reader verifies what it reads
def test_zeroed_final_checkpoint_is_refused_by_load_run_bounds_and_export(run, cli):
    from peftlab.checkpoints import CheckpointError
    from peftlab.runs import load_run

    final = _final(run)
    assert final.name == "epoch-1"  # max_steps ends the epoch at step 8
    _zero(final)
    with pytest.raises(CheckpointError, match=r"Checkpoint .*epoch-1 is damaged: model_state.safetensors does not match the "
                                              r"SHA-256 .*read the previous good checkpoint, step-4, with which='step-4', or write "
                                              r"the damaged one again with `peftlab train --resume .*copy`"):
        load_run(run)
    rc, err = cli("bounds", run, *BOUNDS)
    assert rc == 2 and "epoch-1 is damaged: model_state.safetensors does not match" in err
    assert "To go on, write the damaged one again with `peftlab train --resume" in err and "which=" not in err and "--which" not in err
    assert not (run / "bounds_metrics.json").exists()
    for merge in ((), ("--merge",)):
        rc, err = cli("export", run, *merge)
        assert rc == 2 and "epoch-1 is damaged" in err and "with --which step-4, or write the damaged one again" in err
    assert not (run / "export").exists() and not (run / "merged").exists()
    assert load_run(run, which="step-4").checkpoint.name == "step-4"  # the good one still loads


def test_deleted_manifest_is_an_error_and_a_checkpoint_older_than_manifests_loads_with_a_warning(run):
    from peftlab.checkpoints import MANIFEST_FILE, STATE_FILE, CheckpointError, UnverifiedCheckpointWarning
    from peftlab.runs import load_run

    final = _final(run)
    (final / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"epoch-1 is damaged: its manifest.json is missing, though it was written by a "
                                              r"peftlab version that records one at every save"):
        load_run(run)
    # what a checkpoint of a version before manifests looks like: no config.json, no `finite` record
    (final / "config.json").unlink()
    state = json.loads((final / STATE_FILE).read_text())
    del state["finite"]
    (final / STATE_FILE).write_text(json.dumps(state))
    with pytest.warns(UnverifiedCheckpointWarning, match=r"epoch-1 has no manifest.json: it was written before peftlab recorded "
                                                         r"manifests, so its files are read unverified"):
        assert load_run(run).checkpoint == final


def test_resume_writes_a_damaged_final_checkpoint_again_bit_identically(run, cli):
    """What the readers' message promises: `train --resume` continues from the newest checkpoint that
    verifies and writes the damaged one again, with the same bytes."""
    final = _final(run)
    before = (final / "model_state.safetensors").read_bytes()
    _zero(final)
    with pytest.warns(UserWarning, match="epoch-1 is damaged"):
        rc, err = cli("train", "--resume", run)
    assert rc == 0, err
    assert (final / "model_state.safetensors").read_bytes() == before
    rc, err = cli("export", run, "--merge")
    assert rc == 0, err


# ------------------------------------------------------------ class 6: damaged run files
@pytest.mark.parametrize("text,msg", [
    ('{"method": "lora", "training": {"learn', r"config.json is not valid JSON \(Unterminated string .*truncated or edited\)"),
    ('["lora"]', r"config.json holds a JSON list, not the object \(mapping of sections\)"),
    ('{"method": "lora", "training": [1]}', r"config.json is damaged: its `training` section is not a mapping"),
])
def test_damaged_config_json_at_resume_is_a_clear_error_naming_the_checkpoint_copy(run, cli, text, msg):
    import re

    (run / "config.json").write_text(text)
    rc, err = cli("train", "--resume", run)
    assert rc == 2 and "Traceback" not in err
    assert re.search(msg, err), err
    assert re.search(r"Each checkpoint keeps a copy of the run's configuration: restore it with `cp .*checkpoints/.*/config.json", err)
    assert (run / "config.json").read_text() == text  # nothing rewritten


def test_edited_rank_in_config_json_is_refused_by_bounds_before_the_model_is_built(run, cli, monkeypatch):
    from peftlab import build as build_mod
    from peftlab.errors import PeftlabError
    from peftlab.runs import load_run

    cfg = json.loads((run / "config.json").read_text())
    cfg["lora"]["r"] = 4
    (run / "config.json").write_text(json.dumps(cfg))
    rc, err = cli("bounds", run, *BOUNDS)
    assert rc == 2 and "no longer matches the configuration that checkpoint" in err
    assert "(lora.r: 8 -> 4 in config.json): config.json was edited after training" in err
    # a checkpoint that carries no configuration (written before they did): the shapes still decide, clearly
    from peftlab.checkpoints import write_manifest

    final = _final(run)
    (final / "config.json").unlink()
    write_manifest(final)
    with pytest.raises(PeftlabError, match=r"epoch-1 does not fit the model its run's config.json describes: .*lora_A.* was saved "
                                           r"with shape \(8, 64\), the model built from the config has \(4, 64\)"):
        load_run(run)


def test_trainer_state_without_global_step_is_left_out_with_a_warning_and_resume_goes_on(run, cli):
    from peftlab.checkpoints import STATE_FILE, CheckpointWarning, list_checkpoints

    ck = _final(run)
    state = json.loads((ck / STATE_FILE).read_text())
    del state["global_step"]
    (ck / STATE_FILE).write_text(json.dumps(state))
    with pytest.warns(CheckpointWarning, match=r"epoch-1 is damaged: its trainer_state.json records no global_step .*left out"):
        assert [p.name for _, _, p in list_checkpoints(run / "checkpoints")] == ["step-4"]
    with pytest.warns(CheckpointWarning, match="records no global_step"):
        rc, err = cli("train", "--resume", run)  # from step-4, writing epoch-1 again
    assert rc == 0, err
    assert json.loads((ck / STATE_FILE).read_text())["global_step"] == 8


# ------------------------------------------------------------ class 9: read-only outputs, checked before the work
def test_unwritable_bounds_output_and_export_dir_are_refused_before_the_work(run, cli, monkeypatch, tmp_path):
    import os

    from peftlab.bounds import evaluate as bounds_evaluate
    from peftlab import export as export_mod

    def no_work(*a, **k):
        raise AssertionError("the run was loaded before the output was checked")

    monkeypatch.setattr(bounds_evaluate, "load_run", no_work)
    monkeypatch.setattr(export_mod, "load_run", no_work)
    (tmp_path / "afile").write_text("x")
    rc, err = cli("bounds", run, *BOUNDS, f"--bounds.output={tmp_path / 'afile' / 'm.json'}")
    assert rc == 2 and "--bounds.output:" in err and "afile exists and is a file" in err
    rc, err = cli("export", run, "--merge", "--output-dir", tmp_path / "afile" / "out")
    assert rc == 2 and "--output-dir:" in err and "afile is a file, not a directory" in err
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == ro else real(p, mode, **k))  # root ignores chmod
    rc, err = cli("bounds", run, *BOUNDS, f"--bounds.output={ro / 'm.json'}")
    assert rc == 2 and "cannot be written: no write permission in" in err
    rc, err = cli("export", run, "--merge", "--output-dir", ro / "out")
    assert rc == 2 and "cannot be written: no write permission in" in err


# ------------------------------------------------------------ class 10: messages that send the user the right way
def test_killed_run_readers_say_resume_with_the_cli_and_export_which_latest_works(run, cli):
    (run / "results_final.json").unlink()  # what a kill leaves: checkpoints, no results
    rc, err = cli("bounds", run, *BOUNDS)
    assert rc == 2 and "has not finished training: there is no completed results_final.json (its newest checkpoint is epoch-1)" in err
    assert "Continue it with `peftlab train --resume" in err and "which" not in err and "resume_from" not in err
    rc, err = cli("export", run)
    assert rc == 2 and "or export its newest checkpoint as it is with --which latest." in err and "resume_from" not in err
    rc, err = cli("export", run, "--which", "latest")
    assert rc == 0, err
    assert (run / "export" / "adapter_config.json").is_file()


def test_diverged_run_is_neither_resumed_nor_called_finished(run, cli):
    res = {"status": "diverged", "global_step": 6, "diverged": {"step": 6, "what": "the training loss is nan",
                                                                 "last_finite_checkpoint": str(run / "checkpoints" / "step-4")}}
    (run / "results_final.json").write_text(json.dumps(res))
    rc, err = cli("train", "--resume", run)
    assert rc == 2 and "finished" not in err
    assert "diverged at step 6 (status `diverged` in results_final.json: the training loss is nan); resuming it would repeat" in err
    assert "--output.dir=NEW_DIR --training.learning_rate=..." in err
    rc, err = cli("export", run)
    assert rc == 2 and "diverged at step 6" in err and "export it with --which step-4" in err and "resume" not in err
    rc, err = cli("bounds", run, *BOUNDS)
    assert rc == 2 and "no final weights to bound" in err and "which" not in err


def test_refused_unsafe_pickle_never_advises_weights_only_false(run, cli):
    from peftlab.checkpoints import CheckpointError, load, write_manifest
    from peftlab.runs import load_run

    class Evil:
        def __reduce__(self):
            return (print, ("this ran",))

    final = _final(run)
    torch.save({"x": Evil()}, final / "method_state.pt")
    write_manifest(final)  # re-signed: the manifest cannot tell a replaced file from the real one
    for read in (lambda: load_run(run), lambda: load(final)):
        with pytest.raises(CheckpointError, match=r"method_state.pt is not a plain tensor file \(it refers to print\).*"
                                                  r"never loads such a file in a way that could run code") as e:
            read()
        assert "weights_only" not in str(e.value)
    rc, err = cli("export", run, "--merge")
    assert rc == 2 and "weights_only" not in err and "not a plain tensor file" in err


def test_plain_export_of_a_run_whose_checkpoints_were_deleted_still_copies_the_adapter(run, cli):
    shutil.rmtree(run / "checkpoints")  # to save space: the adapter training wrote is what plain export copies
    rc, err = cli("export", run, "--output-dir", run / "out")
    assert rc == 0, err
    assert (run / "out" / "adapter_config.json").is_file()


def test_config_json_restored_as_the_message_says_resumes_and_loads(run, cli):
    """The fix the resume error names (copy a checkpoint's config.json back) works: the copy lacks
    `_meta`, which the resume fills in again, so load_run still knows the task."""
    import re
    import subprocess

    from peftlab.runs import load_run

    from peftlab.errors import PeftlabError
    from peftlab.runs.identity import resume_config

    (run / "config.json").write_text('{"method": "lo')
    with pytest.raises(PeftlabError, match="restore it with `cp ") as e:
        resume_config(str(run), [])
    subprocess.run(re.search(r"restore it with `(cp \S+ \S+)`", str(e.value)).group(1).split(), check=True)
    rc, err = cli("train", "--resume", run)
    assert rc == 0, err
    assert json.loads((run / "config.json").read_text())["_meta"]["task"] == "causal_lm"
    assert load_run(run).task == "causal_lm"


def test_interrupted_command_advises_resume_only_for_train(run, cli, monkeypatch):
    from peftlab import export as export_mod

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "load_run", interrupt)
    assert cli("export", run, "--merge") == (130, "interrupted")
    from peftlab.cli import train as train_cli

    monkeypatch.setattr(train_cli, "train", interrupt)
    rc, err = cli("train", "--resume", run)
    assert rc == 130 and err.startswith("interrupted; continue the run with `peftlab train --resume") and "resume_from" not in err


def test_non_object_config_json_with_resume_from_latest_is_a_clear_error(run, run_train, bins):
    from peftlab.checkpoints import CheckpointError

    (run / "config.json").write_text("[1, 2]")
    cfg = make_cfg(run.parent, output__dir=str(run), training__resume_from="latest", data__dataset=str(bins), data__block_size=64,
                   training__max_steps=8, training__save_steps=4, training__save_total_limit=None)
    with pytest.raises(CheckpointError, match=r"Cannot resume from .*epoch-1: .*config.json holds a JSON list, not the object"):
        run_train(cfg)


def test_end_of_run_test_evaluation_verifies_best(tmp_path, monkeypatch):
    """The test split is evaluated with best/'s weights only after best/ passes its manifest."""
    from peftlab import checkpoints as ckpt
    from peftlab.train import train

    from conftest import make_cfg

    seen = []
    inner = ckpt.verify
    monkeypatch.setattr(ckpt, "verify", lambda path, *a, **k: (seen.append(Path(path).name), inner(path, *a, **k))[1])
    cfg = make_cfg(tmp_path, "cls", data__dataset="imdb-sample", training__max_steps=4, data__max_train_examples=32,
                   data__max_val_examples=16, data__max_test_examples=16, training__batch_size=8)
    res = train(cfg, console=False)
    assert res.get("test") and "best" in seen
