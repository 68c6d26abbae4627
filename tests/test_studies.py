"""Studies: study files, grid expansion, the sweep runner (skip / resume / failures / kill),
estimates and the submitit engine."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from peftlab.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
LM = str(ROOT / "configs/quickstart/lm_lora.yaml")
TINY = {"training.max_steps": 4, "training.epochs": 1, "training.log_steps": 1, "training.save_steps": 0,
        "data.max_train_examples": 64, "data.max_val_examples": 16, "logging.progress_bar": False}


def _spec(tmp_path, **raw):
    from peftlab.studies.spec import spec_from_dict

    base = {"study": {"name": "t", "output_dir": str(tmp_path / "study"), "run_name": "{arm}_s{seed}"}, "base": LM,
            "overrides": dict(TINY)}
    base.update(raw)
    return spec_from_dict(base)


def _write(tmp_path, name="study.yaml", **raw) -> Path:
    base = {"study": {"name": "t", "output_dir": str(tmp_path / "study"), "run_name": "{arm}_s{seed}"}, "base": LM,
            "overrides": dict(TINY)}
    base.update(raw)
    p = tmp_path / name
    p.write_text(yaml.safe_dump(base, sort_keys=False))
    return p


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))


# ------------------------------------------------------------------------ expansion
def test_expansion_product_zip_arms_seeds_and_names(tmp_path):
    from peftlab.studies.expand import expand

    spec = _spec(tmp_path, grid={"product": {"lora.r": [2, 4]}, "zip": {"lora.alpha": [4, 8], "lora.dropout": [0.0, 0.1]}},
                 arms=[{"name": "lora", "overrides": {"method": "lora"}}, {"name": "dora", "overrides": {"method": "dora"}}],
                 seeds=[1, 2], study={"name": "t", "output_dir": str(tmp_path / "study"),
                                      "run_name": "r{lora.r}_a{lora.alpha:g}_{method}_seed{seed}"})
    trials = expand(spec)
    assert len(trials) == 2 * 2 * 2 * 2  # product axis x zipped axis x arms x seeds
    names = [t.name for t in trials]
    assert names[:4] == ["r2_a4_lora_seed1", "r2_a4_lora_seed2", "r2_a4_dora_seed1", "r2_a4_dora_seed2"]
    assert names[-1] == "r4_a8_dora_seed2"
    for t in trials:  # zipped keys move together, never crossed
        assert (t.cfg.lora.alpha, t.cfg.lora.dropout) in {(4.0, 0.0), (8.0, 0.1)}
        assert t.cfg.training.seed == t.seed and t.cfg.method == t.arm
        assert t.run_dir == tmp_path / "study" / t.name and t.cfg.output.dir == str(t.run_dir)
        assert t.cfg.training.max_steps == 4  # study-wide overrides reach every run
    assert [t.index for t in trials] == list(range(1, 17))


def test_training_seed_beside_a_seeds_list_is_an_error_not_ignored(tmp_path):
    from peftlab.studies.expand import expand

    spec = _spec(tmp_path, seeds=[1, 2])
    spec.cli_overrides = {"training.seed": 7}  # `peftlab sweep FILE --training.seed=7`: would be silently overridden
    with pytest.raises(ConfigError, match="training.seed is set in the command line but the study lists seeds"):
        expand(spec)


def test_duplicate_names_and_bad_templates_rejected(tmp_path):
    from peftlab.studies.expand import expand

    spec = _spec(tmp_path, grid={"product": {"lora.r": [2, 4]}}, seeds=[1])
    with pytest.raises(ConfigError, match="more than once"):
        expand(spec)  # {arm}_s{seed} does not tell r=2 from r=4
    spec.study.run_name = "r{lora.rank}_s{seed}"
    with pytest.raises(ConfigError, match="names 'lora.rank'"):
        expand(spec)
    spec.study.run_name = "r{lora.r}/s{seed}"
    with pytest.raises(ConfigError, match="directory name"):
        expand(spec)


def test_study_file_problems_are_reported_with_suggestions(tmp_path):
    from peftlab.studies.spec import spec_from_dict

    with pytest.raises(ConfigError) as e:
        spec_from_dict({"studdy": {}, "study": {"name": "x", "run_nam": "a"}, "base": LM,
                        "grid": {"prodcut": {}, "zip": {"lora.r": [1, 2], "lora.alpha": [1]}},
                        "arms": [{"name": "a", "overrides": {"lora.r": 3}}, {"name": "a"}], "seeds": "many"})
    msg = str(e.value)
    assert "Did you mean `study`" in msg and "Did you mean `study.run_name`" in msg and "Did you mean `grid.product`" in msg
    assert "one length" in msg and "arm names must be unique" in msg and "`seeds` must be a list" in msg
    assert "sets ['lora.r'], which the grid also varies" in msg
    with pytest.raises(ConfigError, match="unknown key `lora.rr`"):  # run configs are validated at expansion
        from peftlab.studies.expand import expand

        expand(_spec(tmp_path, overrides={"lora.rr": 4}))


def test_scales_replace_seeds_axes_arms(tmp_path):
    spec = _spec(tmp_path, grid={"product": {"lora.r": [2, 4, 8]}}, seeds=[1, 2, 3],
                 study={"name": "t", "output_dir": str(tmp_path / "study"), "run_name": "{arm}_r{lora.r}_s{seed}"},
                 arms=[{"name": "lora", "overrides": {"method": "lora"}}, {"name": "dora", "overrides": {"method": "dora"}}],
                 scales={"cpu": {"seeds": [7], "grid": {"lora.r": [2]}, "arms": ["dora"], "overrides": {"training.max_steps": 2},
                                 "arm_overrides": {"dora": {"training.learning_rate": 0.5}}}})
    from peftlab.studies.expand import expand

    small = spec.at_scale("cpu")
    trials = expand(small)
    assert [(t.arm, t.seed, t.cfg.lora.r, t.cfg.training.max_steps, t.cfg.training.learning_rate) for t in trials] == [("dora", 7, 2, 2, 0.5)]
    assert small.output_dir == Path(f"{spec.output_dir}-cpu")
    small.cli_overrides = {"training.learning_rate": 0.7}  # `peftlab sweep FILE --training.learning_rate=0.7` wins over the arm
    assert expand(small)[0].cfg.training.learning_rate == 0.7
    assert len(expand(spec)) == 18  # the full study is untouched
    with pytest.raises(ConfigError, match="no scale 'cpux'.*Did you mean `cpu`"):
        spec.at_scale("cpux")


def test_budget_matching_follows_each_method_and_study_keys_win(tmp_path):
    from peftlab.studies.expand import expand

    spec = _spec(tmp_path, budget={"match": "lora", "r": 4},
                 arms=[{"name": "lora", "overrides": {"method": "lora"}}, {"name": "ba", "overrides": {"method": "ba_lora"}},
                       {"name": "rsvd", "overrides": {"method": "rsvd", "training.learning_rate": 0.01}}], seeds=[1])
    calls = []

    def fake_lora_params(cfg, r):
        calls.append(r)
        return 1234 * r

    trials = {t.arm: t for t in expand(spec, lora_params_fn=fake_lora_params)}
    assert trials["lora"].cfg.lora.r == 4
    assert trials["ba"].cfg.ba_lora.param_budget == 1234 * 4 and "4,936" in trials["ba"].budget_note
    assert trials["rsvd"].cfg.rsvd.rank == 4
    assert trials["rsvd"].cfg.training.learning_rate == 0.01  # the arm's own lr beats the method's compare lr
    assert calls == [4]  # one count per (model, data, targets, r)


def test_real_lora_budget_count_on_tiny_gpt2(tmp_path):
    from peftlab.config import load_config
    from peftlab.studies.budget import reference_params

    cfg = load_config(LM, TINY)
    # tiny-gpt2: 2 layers x c_attn (64 -> 192): r * (64 + 192) per layer
    assert reference_params(cfg, 4, "lora") == 2 * 4 * (64 + 192)


def test_budget_count_names_the_setting_that_broke_the_build(tmp_path):
    """A classification run whose tokenizer path is missing (a gpu scale before `scripts/gpu_bundle.sh`): the error is
    peftlab's own about that path, not the causal-LM head tried last."""
    from peftlab.config import load_config
    from peftlab.errors import PeftlabError
    from peftlab.studies.budget import reference_params

    cfg = load_config(None, {"model.name": "tiny-bert", "model.task": "auto", "data.dataset": "sst2-sample",
                             "data.tokenizer": str(tmp_path / "no-such-tokenizer")})
    with pytest.raises(PeftlabError, match=r"could not be built here \(.*no-such-tokenizer.*does not exist.*budget.match: none"):
        reference_params(cfg, 4, "lora")


def test_budget_match_names_a_registered_method(tmp_path):
    with pytest.raises(ConfigError, match=r"`budget.match` 'lorra' is neither none nor a method\. Did you mean `lora`"):
        _spec(tmp_path, budget={"match": "lorra"})


def test_follow_up_steps_must_name_a_command_of_the_table(tmp_path):
    from peftlab.cli.table import COMMANDS
    from peftlab.studies.spec import load_study

    study = _write(tmp_path, follow_up={"per_run": ["bouns {run_dir}"], "study": ["peftlab analyze {study_dir}"]},
                   scales={"cpu": {"follow_up": {"study": ["analyse {study_dir}"]}}})
    with pytest.raises(ConfigError, match=r"`follow_up.per_run\[0\]`: 'bouns' is not a peftlab command in this installation\. "
                                          r"Did you mean `bounds`"):
        load_study(study, commands=set(COMMANDS))
    with pytest.raises(ConfigError, match="'analyse' is not a peftlab command"):  # a scale's own follow-ups too
        load_study(_write(tmp_path, "ok.yaml", scales={"cpu": {"follow_up": {"study": ["analyse {study_dir}"]}}}), "cpu",
                   commands=set(COMMANDS))
    assert load_study(study).follow_up.per_run == ["bouns {run_dir}"]  # no command table given: not checked
    assert load_study(study, follow_ups=False, commands=set(COMMANDS)).follow_up.per_run == []


def test_step_words_fill_in_the_placeholders_after_peftlab():
    """The one substitution the sweep and the estimate both run a follow-up step through."""
    from peftlab.studies.trial import step_words

    mapping = {"run_dir": "/s/r 1", "study_dir": "/s"}
    assert step_words("peftlab bounds {run_dir} --bounds.output='{study_dir}/b.json'", mapping) == \
        ["bounds", "/s/r 1", "--bounds.output=/s/b.json"]
    assert step_words("analyze {study_dir} {name}", mapping) == ["analyze", "/s", "{name}"]  # not in the mapping: kept
    assert step_words("", mapping) == []


@pytest.mark.parametrize("path", sorted((ROOT / "configs/studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_study_validates(path):
    from peftlab.methods import METHODS
    from peftlab.studies.expand import expand
    from peftlab.cli.table import COMMANDS
    from peftlab.studies.spec import load_study

    raw = yaml.safe_load(path.read_text())
    methods = {a["overrides"].get("method") for a in raw.get("arms", []) if "method" in a.get("overrides", {})}
    base_method = yaml.safe_load((path.parent / raw["base"]).read_text()).get("method")
    missing = sorted(m for m in methods | {base_method} if m and m not in METHODS)
    if missing:
        pytest.skip(f"needs method(s) {missing}, not in this installation yet")
    spec = load_study(path, follow_ups=False)
    steps = [*spec.follow_up.before, *spec.follow_up.per_run, *spec.follow_up.study]
    for sc in spec.scales.values():
        steps += [s for k in ("before", "per_run", "study") for s in (sc.follow_up or {}).get(k, [])]
    pending = {"bounds"}  # a command of another issue: checked exactly once it is installed
    have = set(COMMANDS)
    for step in steps:
        cmd = step.split()[0]
        assert cmd in have or cmd in pending, f"{path.name}: follow-up {step!r} names no command"
    # GPU scale: datasets/models may not be here offline, so the LoRA count is stubbed; the run configs are validated
    full = expand(spec, lora_params_fn=lambda cfg, r: 1000 * r)
    assert full and len({t.name for t in full}) == len(full)
    for scale in spec.scales:
        if scale == "gpu":  # the one-GPU variant reads gpu_assets/ (scripts/gpu_bundle.sh): the LoRA count is stubbed
            gpu = expand(load_study(path, scale, follow_ups=False), lora_params_fn=lambda cfg, r: 1000 * r)
            # every arm and seed of the plan (a grid axis such as the dataset may shrink: the YAML says what stands in)
            assert {(t.arm, t.seed) for t in gpu} == {(t.arm, t.seed) for t in full}, path.name
            continue
        small = expand(load_study(path, scale, follow_ups=False))  # small variants: the real budget count, offline
        assert 0 < len(small) <= 12
    if path.stem == "subspace_allocation":
        assert len(full) == 30 and full[0].name == "d1000_uniform_r0.5_seed42"


def test_study_code_names_no_method():
    """Generic code names no method: what a study needs of one comes from the registry and the
    method class (budget_params, budget_rank, budget_overrides, config_sections)."""
    import ast
    import re

    from peftlab.methods import METHODS

    names = set(METHODS) | {sec for m in METHODS.values() for sec in m.config_sections}
    english = {"full"}  # also a word: only a string that is the name (or a dotted key under it) counts
    word = re.compile(r"(?i)(?<![A-Za-z0-9_])(" + "|".join(sorted(names - english)) + r")(?![A-Za-z0-9_])")
    bad = []
    for path in [*sorted((ROOT / "peftlab/studies").glob("*.py")), ROOT / "peftlab/cli/studies.py"]:
        text = path.read_text()
        for i, line in enumerate(text.splitlines(), 1):
            for m in word.finditer(line):
                bad.append(f"{path.relative_to(ROOT)}:{i}: {m.group(0)!r} in {line.strip()}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.split(".")[0] in english:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not bad, "method names in generic study code:\n" + "\n".join(bad)


# ------------------------------------------------------------------------ running
def test_conflicting_directory_is_never_attributed(tmp_path):
    from peftlab.studies.expand import expand
    from peftlab.studies.runner import execute_trial, make_job, plan

    spec = _spec(tmp_path, seeds=[1])
    (t,) = expand(spec)
    t.run_dir.mkdir(parents=True)
    other = t.cfg.replace({"lora.r": 3}).to_dict()
    (t.run_dir / "config.json").write_text(json.dumps(other))
    (row,) = plan(spec, [t])
    assert row["status"] == "conflict" and "lora.r: 3 -> 8" in row["detail"]
    res = execute_trial(make_job(spec, t, t.run_dir.parent))
    assert res.outcome == "conflict" and not res.trained
    assert json.loads((t.run_dir / "config.json").read_text())["lora"]["r"] == 3  # untouched


def test_gpu_slots_and_launchers(tmp_path):
    from peftlab.studies.executors import LocalExecutor
    from peftlab.studies.expand import expand
    from peftlab.studies.runner import make_job

    ex = LocalExecutor(["0", "1", "2", "3"], processes_per_run=2)
    assert ex.slot_gpus == [["0", "1"], ["2", "3"]]
    spec = _spec(tmp_path, seeds=[1], execution={"processes_per_run": 2, "launcher": "torchrun"})
    (t,) = expand(spec)
    job = make_job(spec, t, t.run_dir.parent, ["2", "3"])
    assert job.env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert job.launcher[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc_per_node=2" in job.launcher
    assert json.loads(job.env["PEFTLAB_STUDY_TRIAL"])["trial"] == t.name
    with pytest.raises(Exception, match="needs 2 GPUs"):
        LocalExecutor(["0"], processes_per_run=2)


def test_cpu_runs_share_the_cores(tmp_path, monkeypatch):
    """execution.cpu_runs: that many runs at once without --gpus, each on its share of the cores, written into
    its config (so a rerun by hand gives the same numbers); a run's own system.num_threads wins."""
    import peftlab.studies.executors as ex_mod
    from peftlab.studies.executors import LocalExecutor
    from peftlab.studies.expand import expand
    from peftlab.studies.runner import make_job

    monkeypatch.setattr(ex_mod.os, "cpu_count", lambda: 8)
    ex = LocalExecutor(None, cpu_runs=2)
    assert ex.slots == 2 and ex.threads == 4 and "2 runs at a time on the CPU (4 thread(s) each)" in ex.describe()
    assert LocalExecutor(None).threads is None and LocalExecutor(None).slots == 1  # one run: torch's own choice
    assert LocalExecutor(["0", "1"], cpu_runs=4).slots == 2  # with GPUs the slots are the GPUs
    assert LocalExecutor(None, cpu_runs=16).threads == 1
    spec = _spec(tmp_path, seeds=[1, 2], execution={"cpu_runs": 2})
    assert spec.execution.cpu_runs == 2
    t1, t2 = expand(spec)
    job = make_job(spec, t1, t1.run_dir.parent, None, threads=4)
    assert yaml.safe_load(Path(job.config_path).read_text())["system"]["num_threads"] == 4
    own = t2.cfg.replace({"system.num_threads": 1})
    t2.cfg = own
    job = make_job(spec, t2, t2.run_dir.parent, None, threads=4)
    assert yaml.safe_load(Path(job.config_path).read_text())["system"]["num_threads"] == 1
    with pytest.raises(ConfigError, match="cpu_runs"):
        _spec(tmp_path, execution={"cpu_runs": 0})


def test_ctrl_c_with_runs_side_by_side_starts_no_further_run(tmp_path, monkeypatch):
    """KeyboardInterrupt while two runs go side by side: the runs still queued are never started."""
    import threading

    import peftlab.studies.executors as ex_mod
    from peftlab.studies.expand import expand

    started, lock = [], threading.Lock()

    def fake_execute(job):
        with lock:
            started.append(job)
            first = len(started) == 1
        if first:
            raise KeyboardInterrupt
        time.sleep(0.3)
        return "done"

    monkeypatch.setattr(ex_mod, "execute_trial", fake_execute)
    spec = _spec(tmp_path, seeds=[1, 2, 3, 4, 5, 6])
    with pytest.raises(KeyboardInterrupt):
        ex_mod.LocalExecutor(None, cpu_runs=2).run(spec, expand(spec), tmp_path, lambda *a, **k: object(),
                                                   lambda *a: None, lambda *a: None, lambda *a: None)
    assert len(started) <= 3  # the interrupted one, the one beside it, at most one more that got the freed slot


def test_sweep_runs_cpu_runs_side_by_side(tmp_path, capsys):
    from peftlab.cli import main
    from peftlab.studies.runner import read_events

    study = _write(tmp_path, seeds=[1, 2])
    assert main(["sweep", str(study), "--cpu-runs", "0"]) != 0
    assert "--cpu-runs 0" in capsys.readouterr().err and not (tmp_path / "study").exists()
    assert main(["sweep", str(study), "--cpu-runs", "2"]) == 0
    sd = tmp_path / "study"
    ev = read_events(sd)
    starts = sorted(e["time"] for e in ev if e["event"] == "start")
    ends = sorted(e["time"] for e in ev if e["event"] == "end")
    assert len(starts) == 2 and starts[1] < ends[0]  # the second run started before the first ended
    for seed in (1, 2):  # no arms: the runs are _s1 and _s2
        cfg = json.loads((sd / f"_s{seed}/config.json").read_text())
        assert cfg["system"]["num_threads"] == max(1, (os.cpu_count() or 1) // 2)
    assert "2 runs at a time on the CPU" in (sd / "study.log").read_text()


@pytest.mark.slow
def test_failing_run_does_not_stop_the_others_and_is_not_retried_forever(tmp_path, capsys):
    from peftlab.cli import main
    from peftlab.studies.runner import read_events

    study = _write(tmp_path, arms=[{"name": "good", "overrides": {"method": "lora"}},
                                   {"name": "bad", "overrides": {"method": "lora", "model.target_modules": ["no_such_layer"]}}],
                   seeds=[1], execution={"max_attempts_same_error": 2},
                   follow_up={"before": ["config --keys"], "per_run": ["config {config} --training.seed=5"], "study": ["config --keys"]})
    sd = tmp_path / "study"
    assert main(["sweep", str(study)]) == 1  # non-zero: a run failed
    assert json.loads((sd / "good_s1/results_final.json").read_text())["status"] == "completed"
    log = (sd / "study.log").read_text()
    assert log.count("==== EXPERIMENT") == 2 and "Duration:" in log and "ETA:" in log and "==== TOTAL: 2 runs: 1 completed" in log
    (bad,) = [e for e in read_events(sd) if e["event"] == "end" and e["run"] == "bad_s1"]
    assert bad["outcome"] == "failed" and "no_such_layer" in bad["error"]
    (good,) = [e for e in read_events(sd) if e["event"] == "end" and e["run"] == "good_s1"]
    assert [f["outcome"] for f in good["followups"]] == ["completed"]  # per-run step after the completed run only
    # the duration of each phase: training, then each follow-up by its command; the study's steps at the end
    assert list(good["phases"]) == ["train", "config"] and all(v > 0 for v in good["phases"].values())
    assert good["phases"]["train"] + good["phases"]["config"] <= good["duration_s"]
    assert re.search(r"good_s1 \| Duration: \S+( \S+)? \(train \S+( \S+)?, config \S+( \S+)?\) \| outcome: completed", log), log
    total = [ln for ln in log.splitlines() if "==== TOTAL" in ln][-1]
    assert "by phase: config" in total and "train" in total, total  # before-step `config`, train, follow-ups, study step
    (sweep_end,) = [e for e in read_events(sd) if e["event"] == "sweep_end"]
    assert set(sweep_end["phases"]) == {"config", "train"} and sweep_end["phases"]["train"] > 0
    assert "seed: 5" in (sd / ".study/output/good_s1.out").read_text()
    assert [e["outcome"] for e in read_events(sd) if e["event"] == "study_step"] == ["completed"]
    assert [e["outcome"] for e in read_events(sd) if e["event"] == "before_step"] == ["completed"]
    # provenance: which study and trial each run belongs to
    meta = json.loads((sd / "good_s1/config.json").read_text())["_meta"]["study"]
    assert meta["study"] == "t" and meta["trial"] == "good_s1" and meta["seed"] == 1
    assert main(["sweep", str(study)]) == 1  # second attempt of the failed ones; good runs (and their follow-ups) skipped
    assert [e["run"] for e in read_events(sd) if e["event"] == "start"] == ["good_s1", "bad_s1", "bad_s1"]
    assert len([e for e in read_events(sd) if e["event"] == "before_step"]) == 1  # a finished `before` step is not repeated
    assert len([e for e in read_events(sd) if e["event"] == "study_step"]) == 2  # study steps run at every sweep
    assert main(["sweep", str(study), "--dry-run"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert any("bad_s1" in ln and "gave-up" in ln for ln in table) and any("good_s1" in ln and "done" in ln for ln in table)
    n_before = len([e for e in read_events(sd) if e["event"] == "start"])
    assert main(["sweep", str(study)]) == 1  # still failing, but nothing is started again
    assert len([e for e in read_events(sd) if e["event"] == "start"]) == n_before
    assert "NOT retried" in (sd / "study.log").read_text()


def test_a_resumed_sweep_finishes_pending_follow_ups_before_new_runs(tmp_path):
    """A sweep cut between a run's training and its follow-ups (a GPU slice's wall limit) starts the next sweep with
    those follow-ups, then the new runs: each slice ends with whole runs."""
    from peftlab.cli import main
    from peftlab.studies.executors import LocalExecutor
    from peftlab.studies.expand import expand
    from peftlab.studies.runner import sweep
    from peftlab.studies.spec import load_study

    arms = [{"name": "a", "overrides": {"method": "lora"}}]
    study = _write(tmp_path, arms=arms, seeds=[1, 2, 3])
    assert main(["sweep", str(study), "--only", "a_s3"]) == 0  # trained, no follow-up yet
    _write(tmp_path, arms=arms, seeds=[1, 2, 3], follow_up={"per_run": ["config {config} --training.seed=5"]})
    order = []

    class Recorder(LocalExecutor):  # the order the sweep hands its jobs over; runs nothing
        def run(self, spec, trials, study_dir, make_job, on_start, on_end, on_submit):
            order.extend(t.name for t in trials)

    spec = load_study(study)
    sweep(spec, expand(spec), Recorder(), out=open(os.devnull, "w"))
    assert order == ["a_s3", "a_s1", "a_s2"]


def _fresh_starts(run: Path) -> int:
    text = (run / "train.log").read_text()
    return text.count("peftlab run ") - text.count("resumed from")


def _alive(pid: int) -> bool:
    """Running (Linux): a killed orphan may stay a zombie where PID 1 does not reap, and that counts as dead."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux only")
def test_run_process_dies_with_the_sweep_and_never_starts_after_it(tmp_path):
    """A run's process is started through orphan_guard.py (no preexec_fn: several runs start from threads):
    SIGKILL of the sweep takes the run with it, and a guard whose sweep has already gone does not start it."""
    from peftlab.studies.trial import guarded

    pid_file = tmp_path / "child.pid"
    child = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"]
    sweep = ("import subprocess, threading, time\n"
             "from peftlab.studies.trial import guarded\n"
             f"threading.Thread(target=lambda: subprocess.Popen(guarded({child!r})).wait()).start()\n"
             "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", sweep], env=_env())
    deadline = time.time() + 60
    while time.time() < deadline and not (pid_file.is_file() and pid_file.read_text()):
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    os.kill(pid, 0)  # running
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _alive(pid):
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the run's process outlived the sweep that started it")
    # a guard started for a sweep that is no longer its parent refuses, and the command never runs
    cmd = guarded([sys.executable, "-c", f"open({str(tmp_path / 'ran')!r}, 'w')"])
    cmd[3] = str(os.getpid() + 10**6)  # the parent pid the guard checks
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "has gone" in out.stderr and not (tmp_path / "ran").exists()
    out = subprocess.run(guarded([sys.executable, "-c", "print('ran')"]), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ran"


@pytest.mark.slow
def test_sigkill_mid_sweep_then_restart_completes_every_run_exactly_once(tmp_path):
    over = {**TINY, "training.max_steps": 12, "training.save_steps": 3}
    study = _write(tmp_path, overrides=over, arms=[{"name": "a", "overrides": {"method": "lora"}}], seeds=[1, 2, 3])
    sd = tmp_path / "study"
    cmd = [sys.executable, "-m", "peftlab", "sweep", str(study)]
    console = tmp_path / "sweep.out"
    with open(console, "wb") as f:
        proc = subprocess.Popen(cmd, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    target = sd / "a_s2" / "checkpoints"
    while (time.time() < deadline and proc.poll() is None
           and not (target.is_dir() and any(p.name.startswith("step-") for p in target.iterdir()))):
        time.sleep(0.2)
    assert proc.poll() is None, f"the sweep ended before it could be killed:\n{console.read_text()[-3000:]}"
    proc.send_signal(signal.SIGKILL)  # the sweep only: its training child dies with it (parent-death signal)
    proc.wait()
    assert (sd / "a_s1/results_final.json").is_file() and not (sd / "a_s2/results_final.json").is_file()
    time.sleep(0.5)
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for s in (1, 2, 3):
        run = sd / f"a_s{s}"
        res = json.loads((run / "results_final.json").read_text())
        assert res["status"] == "completed" and res["global_step"] == 12
        assert _fresh_starts(run) == 1  # never trained from scratch twice
    assert "resumed from" in (sd / "a_s2/train.log").read_text()
    assert "resumed from" not in (sd / "a_s1/train.log").read_text()
    from peftlab.studies.runner import read_events

    ev = read_events(sd)
    second = ev[max(i for i, e in enumerate(ev) if e["event"] == "sweep_start"):]
    trained = [e["run"] for e in second if e["event"] == "end" and e.get("trained")]
    assert trained == ["a_s2", "a_s3"]  # a_s1 was done: not trained again


def test_estimate_arithmetic_on_a_simulated_clock(tmp_path, monkeypatch):
    """The real probe (real model, data, loop) read from a simulated clock: every piece of the run
    "takes" a set time, so the probe's timings and the estimate are exact numbers, whatever the load."""
    import io

    from peftlab.studies import estimate as E
    from peftlab.studies.expand import expand
    from peftlab.train.loop import Trainer

    START, SETUP, STEPS, EVAL, SAVE, FINISH = 7.0, 10.0, [3.0, 1.0, 1.0, 4.0], 5.0, 0.5, 2.0
    now = [0.0]
    plans = []

    class Simulated(Trainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            plans.append((self.steps_per_epoch, self.total_steps))
            now[0] += SETUP
            hook, cost = self.method.after_optimizer_step, iter(STEPS)

            def step(model, lr):
                hook(model, lr)
                now[0] += next(cost)

            self.method.after_optimizer_step = step

        def evaluate(self):
            out = super().evaluate()
            now[0] += EVAL
            return out

        def save_checkpoint(self, name):
            out = super().save_checkpoint(name)
            now[0] += SAVE
            return out

        def run(self):
            out = super().run()
            now[0] += FINISH  # the end of the run after the last epoch's evaluation and checkpoint
            return out

    monkeypatch.setattr(E, "Trainer", Simulated)
    monkeypatch.setattr(E, "process_start_s", lambda cuda=False: START)
    over = {**TINY, "training.max_steps": 1000, "training.epochs": 3, "training.save_steps": 10, "training.eval_steps": 20}
    # follow-ups run for real (their own processes, real clock) on the probe's run: per run, and the study step once
    spec = _spec(tmp_path, overrides=over, seeds=[1, 2],
                 follow_up={"per_run": ["config {config} --training.seed=5"], "study": ["config --keys"]})
    rows = E.estimate_study(spec, expand(spec), steps=4, out=io.StringIO(), clock=lambda: now[0])
    assert plans == [(15, 45)]  # one probe for both seeds; 64 examples: 15 steps per epoch, 3 epochs
    p = rows[0]["probe"]
    assert rows[1]["probe"] is p
    assert list(p.followup_s) == ["config"] and p.followup_s["config"] > 0
    study_row = rows.pop()
    assert study_row["study_step"] == "config" and study_row["seconds"] > 0 and study_row["runs_seen"] == 1
    fu = p.followups_total
    assert (p.steps, p.epochs, p.steps_timed, p.step_times) == (45, 3, 4, STEPS)
    # first step on its own, the median of the others (not their mean, 2.0), and what follows the last step
    assert (p.setup_s, p.first_step_s, p.step_s, p.eval_s, p.save_s, p.finish_s) == (SETUP, 3.0, 1.0, EVAL, SAVE, FINISH)
    # 44 steps after the first; 3 epoch ends (15, 30, 45); step checkpoints at 10, 20, 40 (30 is an epoch end);
    # evaluations at eval_steps 20 and 40 (the probe itself evaluates only at its end: one EVAL above)
    one = START + SETUP + 3.0 + 44 * 1.0 + 3 * (EVAL + SAVE) + 3 * SAVE + 2 * EVAL + FINISH
    assert [r["seconds"] for r in rows] == [pytest.approx(one + fu)] * 2
    buf = io.StringIO()
    assert E.print_estimate([*rows, study_row], slots=2, out=buf) == pytest.approx(2 * (one + fu) + study_row["seconds"])
    # the runs share the slots; the study step runs once after them
    assert f"({E.fmt_duration(one + fu + study_row['seconds'])} on 2 slots)" in buf.getvalue()
    assert f"config {E.fmt_duration(fu)})" in buf.getvalue() and "(study step: config, once)" in buf.getvalue()
    # the same as data (`peftlab estimate --json`): what the results page compares with the measured times
    rec = E.estimate_record([*rows, study_row], slots=2)
    assert [r["name"] for r in rec["runs"]] == [r["name"] for r in rows] and len(rows) == 2
    assert rec["runs"][0]["seconds"] == pytest.approx(one + fu) and rec["runs"][0]["train_s"] == pytest.approx(one)
    assert rec["runs"][0]["followups_s"] == p.followup_s and rec["runs"][0]["steps"] == 45
    assert rec["study_steps"] == [{"name": "config", "seconds": study_row["seconds"], "once": True}]
    assert rec["total_s"] == pytest.approx(2 * (one + fu) + study_row["seconds"])
    assert rec["wall_s"] == pytest.approx(one + fu + study_row["seconds"])


def test_estimate_cli_writes_its_json(tmp_path, capsys):
    from peftlab.cli import main

    study = _write(tmp_path, arms=[{"name": "a", "overrides": {"method": "lora"}}], seeds=[1, 2])
    assert main(["estimate", str(study), "--steps", "2", "--json", str(tmp_path / "est.json")]) == 0
    rec = json.loads((tmp_path / "est.json").read_text())
    printed = capsys.readouterr().out
    assert [r["name"] for r in rec["runs"]] == ["a_s1", "a_s2"] and all(r["status"] == "new" and r["seconds"] > 0 for r in rec["runs"])
    assert rec["runs"][0]["steps"] == rec["runs"][1]["steps"] > 0 and rec["total_s"] == pytest.approx(sum(r["seconds"] for r in rec["runs"]))
    assert "a_s1" in printed and "TOTAL" in printed
    # two slots on one GPU (here the probes run on the CPU): the probe runs again beside a copy of its training (a real
    # `peftlab train` process, stopped afterwards), the slowdown scales the runs, and the wall time is divided by 2
    assert main(["estimate", str(study), "--steps", "2", "--gpus", "0,0", "--json", str(tmp_path / "est2.json")]) == 0
    rec2 = json.loads((tmp_path / "est2.json").read_text())
    printed = " ".join(capsys.readouterr().out.split())
    sh = rec2["sharing"]
    assert sh["ways"] == 2 and sh["measured_on"] == "a_s1" and sh["factor"] >= 1.0 and sh["step_s_shared"] > 0
    assert rec2["slots"] == 2 and rec2["wall_s"] == pytest.approx(rec2["total_s"] / 2)
    assert "on 2 slots)" in printed and "(sharing one GPU 2 ways) : steps of a_s1 took" in printed
    assert "slowdown was not measured" not in printed


def test_a_sharing_probe_whose_copy_fails_says_so_and_measures_nothing(tmp_path, monkeypatch):
    import io
    import sys

    from peftlab.studies import estimate as E
    from peftlab.studies.expand import expand

    spec = _spec(tmp_path, seeds=[1])
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the copy's process exits at once, before any step
    buf = io.StringIO()
    assert E.sharing_probe(expand(spec)[0].cfg, 1, tmp_path, steps=2, out=buf, wait_s=60) is None
    assert "did not all start training" in buf.getvalue() and "(no output)" in buf.getvalue()


def test_a_measured_sharing_factor_scales_every_run(tmp_path, monkeypatch):
    """estimate --gpus 0,0,0: the probe's step time beside two copies of itself over its time alone scales each run's
    training and follow-ups (not the study steps, which run once after the runs)."""
    import io

    from peftlab.studies import estimate as E
    from peftlab.studies.expand import expand

    alone = E.Probe(setup_s=2.0, first_step_s=1.0, step_s=0.5, eval_s=1.0, save_s=0.5, finish_s=0.5, steps=40, epochs=1,
                    steps_timed=4)
    monkeypatch.setattr(E, "probe", lambda cfg, steps=4, clock=None, run_dir=None: alone)
    monkeypatch.setattr(E, "process_start_s", lambda cuda=False: 3.0)
    asked = []

    def shared(cfg, copies, scratch, steps, clock, out):
        asked.append(copies)
        return E.Probe(2.0, 1.0, 1.5, 1.0, 0.5, 0.5, 40, 1, 4)  # steps 3x slower beside its copies

    monkeypatch.setattr(E, "sharing_probe", shared)
    spec = _spec(tmp_path, seeds=[1, 2, 3])
    cfg = expand(spec)[0].cfg
    rows = E.estimate_study(spec, expand(spec), steps=4, slots=3, out=io.StringIO(), sharing=3)
    assert asked == [2]
    assert rows[0]["status"] == "sharing" and rows[0]["sharing"]["factor"] == pytest.approx(3.0)
    assert [r["seconds"] for r in rows[1:]] == [pytest.approx(3.0 * E.run_seconds(cfg, alone))] * 3
    rec = E.estimate_record(rows, slots=3)
    assert len(rec["runs"]) == 3 and rec["sharing"]["ways"] == 3
    assert rec["wall_s"] == pytest.approx(3.0 * E.run_seconds(cfg, alone))
    buf = io.StringIO()
    E.print_estimate(rows, slots=3, out=buf)
    assert "took 3.00x their time alone (0.500 -> 1.500 s/step)" in buf.getvalue()
    # without a measurement (a copy that did not start), the runs keep their time alone
    monkeypatch.setattr(E, "sharing_probe", lambda *a, **k: None)
    rows = E.estimate_study(spec, expand(spec), steps=4, slots=3, out=io.StringIO(), sharing=3)
    assert [r["status"] for r in rows] == ["new"] * 3 and rows[0]["seconds"] == pytest.approx(E.run_seconds(cfg, alone))


@pytest.mark.slow
def test_submitit_local_executor_runs_a_two_run_study(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from peftlab.studies.executors import SubmititExecutor
    from peftlab.studies.expand import expand
    from peftlab.studies.runner import read_events, sweep
    from peftlab.studies.spec import load_study

    study = _write(tmp_path, arms=[{"name": "a", "overrides": {"method": "lora"}}], seeds=[1, 2])
    spec = load_study(study)
    trials = expand(spec)
    summary = sweep(spec, trials, SubmititExecutor("local", {"timeout_min": 10}, poll_s=0.5), out=open(os.devnull, "w"))
    assert summary.ok and summary.completed == 2
    sd = tmp_path / "study"
    ev = read_events(sd)
    jobs = {e["run"]: e["job_id"] for e in ev if e["event"] == "submitted"}
    assert set(jobs) == {"a_s1", "a_s2"} and all(jobs.values())
    log = (sd / "study.log").read_text()
    assert all(f"submitted as job {j}" in log for j in jobs.values())
    for name in jobs:
        assert json.loads((sd / name / "results_final.json").read_text())["status"] == "completed"
        assert json.loads((sd / name / "config.json").read_text())["_meta"]["study"]["trial"] == name
    again = sweep(spec, trials, SubmititExecutor("local", {"timeout_min": 10}, poll_s=0.5), out=open(os.devnull, "w"))
    assert again.skipped == 2 and again.completed == 0  # same skip semantics as a local sweep


@pytest.mark.slow
def test_two_processes_per_run_through_torchrun(tmp_path, monkeypatch):
    """execution.processes_per_run=2: each run starts under torchrun (gloo on CPU) and trains on 2 processes."""
    from peftlab.studies.expand import expand
    from peftlab.studies.runner import sweep
    from peftlab.studies.spec import load_study

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    study = _write(tmp_path, overrides={**TINY, "training.max_steps": 2, "system.device": "cpu"}, seeds=[1],
                   execution={"processes_per_run": 2, "launcher": "accelerate"})
    spec = load_study(study)
    summary = sweep(spec, expand(spec), out=open(os.devnull, "w"))
    assert summary.ok, (tmp_path / "study/.study/output/_s1.out").read_text()[-3000:]
    res = json.loads((tmp_path / "study/_s1/results_final.json").read_text())
    assert res["status"] == "completed" and res["world_size"] == 2


def test_estimate_counts_only_what_a_partial_run_has_left(tmp_path, monkeypatch):
    """A killed run resumes at its newest checkpoint: the estimate charges the remaining steps and epoch ends."""
    import json as _json

    from peftlab.config import config_from_dict
    from peftlab.studies import estimate as E

    monkeypatch.setattr(E, "process_start_s", lambda cuda=False: 2.0)
    cfg = config_from_dict({"method": "lora", "training": {"save_steps": 0}})
    p = E.Probe(setup_s=10.0, first_step_s=3.0, step_s=1.0, eval_s=5.0, save_s=1.0, finish_s=4.0, steps=100, epochs=4, steps_timed=4)
    full = E.run_seconds(cfg, p)
    assert full == pytest.approx(2 + 10 + 3 + 99 * 1 + 4 * (5 + 1) + 4)  # the formula of the module docstring
    assert E.run_seconds(cfg, p, 0) == full
    # resumed after step 60 (epoch ends at 25, 50, 75, 100): 40 steps and 2 epoch ends are left
    assert E.run_seconds(cfg, p, 60) == pytest.approx(2 + 10 + 3 + 39 * 1 + 2 * (5 + 1) + 4)
    # every step done, results missing: only the end of the run
    assert E.run_seconds(cfg, p, 100) == pytest.approx(2 + 10 + 5 + 1 + 4)
    # the newest complete checkpoint gives the resume step; incomplete ones do not count
    run = tmp_path / "run"
    for name, step, complete in (("step-20", 20, True), ("epoch-2", 50, True), ("step-70", 70, False)):
        d = run / "checkpoints" / name
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(_json.dumps({"global_step": step, "epoch_end": name.startswith("epoch")}))
        if complete:
            (d / "model_state.safetensors").write_bytes(b"")
    assert E.resume_step(run) == 50
    assert E.resume_step(tmp_path / "nothing") == 0
