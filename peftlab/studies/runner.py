"""Run a study: every trial in its own process, finished ones skipped, interrupted ones
resumed, failures recorded, one log for the whole study.

The sweep (this module) plans the trials, takes the study's lock, hands the trials to an
executor (:mod:`.executors`), which runs each with :func:`.trial.execute_trial`, and writes
the study's log (:mod:`.log`). ``trial_status`` and ``read_events`` are importable from here.

Files in the study directory::

    STUDY_DIR/
      <run name>/            one ordinary run directory per trial (peftlab train)
      study.log              human log: EXPERIMENT i/N markers, start, end, Duration, outcome, ETA, TOTAL
      study.jsonl            the same as one JSON record per line (machine-readable)
      .study/lock            held by the sweeping process (a second sweep of the study is refused)
      .study/locks/<run>     held while a run trains (by the training process too, so it outlives a killed sweep)
      .study/configs/<run>.yaml   the resolved config each run was started with (peftlab train <it> reruns it by hand)
      .study/output/<run>.out     the run's console output, appended per attempt
      .study/followups/      markers of follow-up steps that finished

Why killing the sweep at any moment is safe: a run's status is read from its run
directory (``config.json`` + ``results_final.json``) under the run's lock right before it
starts, never from the log; a run whose directory holds a ``config.json`` with the same
identity (:func:`peftlab.runs.run_identity`) resumes with
``--training.resume_from=latest`` (the loop's own SIGKILL-safe checkpoints), and one with
other settings is refused rather than mis-attributed. The training process dies with the
sweep (Linux parent-death signal) and holds the run's lock while it lives.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..errors import PeftlabError
from ..io import atomic_write_text
from ..runs.identity import fingerprint
from .executors import LocalExecutor, with_threads
from .expand import Trial
from .log import StudyLog, fmt_clock, fmt_duration, gave_up, read_events
from .spec import StudySpec
from .trial import (STATE_DIR, TRIAL_ENV, StepResult, TrialJob, TrialResult, _lock_file, execute_trial, followup_marker,
                    run_steps, step_words, trial_status)


# ------------------------------------------------------------------------ the sweep
class StudyLock:
    """``.study/lock``: one sweep of a study at a time (released by the OS when the process dies)."""

    def __init__(self, study_dir: Path):
        self.path = study_dir / STATE_DIR / "lock"
        self.f = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a+")
        if not _lock_file(self.f, blocking=False):
            self.f.seek(0)
            holder = self.f.read().strip()
            self.f.close()
            raise PeftlabError(f"Another sweep of this study is running ({holder or 'unknown process'}; lock {self.path}). "
                               "Wait for it, or stop it before starting this one; two sweeps would train the same runs.") from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(f"pid {os.getpid()} on {socket.gethostname()} since {fmt_clock(time.time())}\n")
        self.f.flush()
        return self

    def __exit__(self, *exc):
        if self.f is not None:
            self.f.close()


def varying(trial: Trial, spec: StudySpec) -> dict[str, Any]:
    """The overrides that tell this trial apart (without the study-wide ones)."""
    common = {**spec.overrides, **spec.cli_overrides}
    return {k: v for k, v in trial.overrides.items() if k not in common or common[k] != v}


def plan(spec: StudySpec, trials: list[Trial], retry_failed: bool = False) -> list[dict[str, Any]]:
    """The run table: one row per trial with its status (done, partial, new, conflict, gave-up, diverged).

    A diverged run is never trained again (not even with ``retry_failed``: resuming it resumes the
    divergence); a run that failed the same way too often is ``gave-up`` unless ``retry_failed``."""
    events = read_events(spec_dir(spec, trials))
    rows = []
    for t in trials:
        status, detail = trial_status(t.cfg, t.run_dir)
        ident = fingerprint(t.cfg)
        if status not in ("done", "diverged") and not retry_failed:
            err = gave_up(events, t.name, ident, spec.execution.max_attempts_same_error)
            if err is not None:
                status, detail = "gave-up", f"failed {spec.execution.max_attempts_same_error}x with: {err}"
        rows.append({"index": t.index, "name": t.name, "status": status, "detail": detail, "overrides": varying(t, spec),
                     "budget": t.budget_note, "identity": ident, "run_dir": str(t.run_dir)})
    return rows


def spec_dir(spec: StudySpec, trials: list[Trial]) -> Path:
    return trials[0].run_dir.parent if trials else spec.output_dir


def format_table(rows: list[dict]) -> str:
    def ov(d: dict) -> str:
        return " ".join(f"{k}={v}" for k, v in d.items() if k != "training.seed") or "-"

    w = max([4, *(len(r["name"]) for r in rows)])
    lines = [f"{'#':>3}  {'name':<{w}}  {'status':<8}  overrides"]
    for r in rows:
        extra = f"  [{r['detail']}]" if r["detail"] else ""
        budget = f"  (budget: {r['budget']})" if r.get("budget") else ""
        lines.append(f"{r['index']:>3}  {r['name']:<{w}}  {r['status']:<8}  {ov(r['overrides'])}{budget}{extra}")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines.append(f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def write_config(path: Path, cfg) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# written by peftlab sweep; `peftlab train` on this file reruns the trial by hand\n"
    atomic_write_text(path, text + yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def launcher_prefix(spec: StudySpec, gpus: Optional[list[str]]) -> list[str]:
    """How a trial's process is started: plain python, or torchrun/accelerate for several processes."""
    n = spec.execution.processes_per_run
    if n == 1:
        return [sys.executable]
    if spec.execution.launcher == "torchrun" or not gpus:
        # accelerate's multi-CPU launch goes through MPI; torchrun's gloo processes need nothing extra
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    port = _free_port()
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={n}", f"--main_process_port={port}",
            "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_job(spec: StudySpec, trial: Trial, study_dir: Path, gpus: Optional[list[str]] = None,
             threads: Optional[int] = None) -> TrialJob:
    """The job of one trial; ``threads``: its CPU threads when several runs share the CPU (written into the
    run's config, where the run does not set `system.num_threads` itself, so that a rerun by hand gives the same numbers)."""
    cfg_path = study_dir / STATE_DIR / "configs" / f"{trial.name}.yaml"
    write_config(cfg_path, with_threads(trial.cfg, threads))
    mapping = {"run_dir": str(trial.run_dir), "name": trial.name, "study_dir": str(study_dir), "config": str(cfg_path)}
    env = {TRIAL_ENV: json.dumps(trial.provenance(spec) | {"study_dir": str(study_dir)}), "TOKENIZERS_PARALLELISM": "false"}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return TrialJob(name=trial.name, index=trial.index, config_path=str(cfg_path), run_dir=str(trial.run_dir), study_dir=str(study_dir),
                    identity=fingerprint(trial.cfg), launcher=launcher_prefix(spec, gpus), env=env,
                    followups=[step_words(s, mapping) for s in spec.follow_up.per_run], cwd=os.getcwd())


@dataclass
class SweepSummary:
    total: int = 0
    completed: int = 0
    skipped: int = 0
    failed: int = 0
    gave_up: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase over the sweep: train, bounds, analyze, ...

    def add_phases(self, phases: dict[str, float]) -> None:
        for k, v in phases.items():
            self.phases[k] = self.phases.get(k, 0.0) + v

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.gave_up == 0


class Progress:
    """Counts, durations and the ETA of a running sweep (thread-safe)."""

    def __init__(self, log: StudyLog, total_to_run: int, slots: int):
        self.log, self.left, self.slots = log, total_to_run, max(slots, 1)
        self.durations: list[float] = []
        self.lock = threading.Lock()

    def finished(self, seconds: float) -> str:
        with self.lock:
            self.durations.append(seconds)
            self.left -= 1
            if self.left <= 0:
                return "ETA: nothing left"
            avg = sum(self.durations) / len(self.durations)
            eta = avg * self.left / self.slots
            return f"ETA: {self.left} run(s) left, ~{fmt_duration(eta)} (expected completion {fmt_clock(time.time() + eta)})"


def sweep(spec: StudySpec, trials: list[Trial], executor=None, out=None, retry_failed: bool = False) -> SweepSummary:
    """Run every trial that is not done; returns counts (``ok`` False when any failed)."""
    out = out if out is not None else sys.stdout
    study_dir = spec_dir(spec, trials)
    study_dir.mkdir(parents=True, exist_ok=True)
    executor = executor or LocalExecutor()
    summary = SweepSummary(total=len(trials))
    t_start = time.time()
    with StudyLock(study_dir):
        log = StudyLog(study_dir, out)
        rows = {r["name"]: r for r in plan(spec, trials, retry_failed)}
        pos = {t.name: i for i, t in enumerate(trials, 1)}  # k of N among the runs of this sweep (--only may pick some)
        todo = [t for t in trials if rows[t.name]["status"] in ("new", "partial", "conflict")]
        # a done run still runs follow-ups it has not finished (e.g. bounds added to the study later)
        pending_followups = [t for t in trials if rows[t.name]["status"] == "done" and _followups_pending(spec, t, study_dir)]
        log.event("sweep_start", study=spec.study.name, scale=spec.scale, study_file=str(spec.path), runs=len(trials),
                  to_run=len(todo), engine=executor.describe(), slots=executor.slots,
                  gpus=",".join(executor.gpus) if getattr(executor, "gpus", None) else None, pid=os.getpid())
        log.say(f"==== STUDY {spec.study.name}{f' (scale {spec.scale})' if spec.scale else ''}: {len(trials)} runs, "
                f"{len(todo)} to run, {sum(r['status'] == 'done' for r in rows.values())} done, on {executor.describe()} -> {study_dir} ====")
        for t in trials:
            st = rows[t.name]["status"]
            if st == "done" and t not in pending_followups:
                summary.skipped += 1
                log.say(f"[{pos[t.name]}/{len(trials)}] {t.name}: already done, skipped")
            elif st == "diverged":
                summary.gave_up += 1
                summary.failures.append(t.name)
                log.say(f"[{pos[t.name]}/{len(trials)}] {t.name}: NOT retried, {rows[t.name]['detail']}")
                log.event("end", run=t.name, index=t.index, identity=rows[t.name]["identity"], outcome="diverged", error=rows[t.name]["detail"])
            elif st == "gave-up":
                summary.gave_up += 1
                summary.failures.append(t.name)
                log.say(f"[{pos[t.name]}/{len(trials)}] {t.name}: NOT retried, {rows[t.name]['detail']} (sweep with --retry-failed to try again)")
                log.event("end", run=t.name, index=t.index, identity=rows[t.name]["identity"], outcome="gave-up", error=rows[t.name]["detail"])
        if not _study_steps("before", spec, study_dir, log, summary):
            summary.seconds = time.time() - t_start
            log.say(f"==== TOTAL: a step before the runs failed; no run started | total time {fmt_duration(summary.seconds)} ====")
            log.event("sweep_end", **asdict(summary), ok=False)
            return summary
        progress = Progress(log, len(todo) + len(pending_followups), executor.slots)
        # what an interrupted sweep began comes first (follow-ups of trained runs, then runs to resume), then new runs:
        # a sweep run in slices under a wall limit ends each slice with whole runs, not a tail of half-finished ones
        jobs = pending_followups + [t for t in todo if rows[t.name]["status"] == "partial"] \
            + [t for t in todo if rows[t.name]["status"] != "partial"]

        def on_start(trial: Trial, job: TrialJob, where: str) -> None:
            st = rows[trial.name]["status"]
            what = ("follow-up steps only (training was done)" if st == "done" else
                    f"command: peftlab train {job.config_path}" + (" --training.resume_from=latest" if st == "partial" else ""))
            log.say(f"==== EXPERIMENT {pos[trial.name]}/{len(trials)}: {trial.name} ({st}{', resuming' if st == 'partial' else ''}) on {where} ====\n"
                    f"start: {fmt_clock(time.time())}\n{what}")
            log.event("start", run=trial.name, index=trial.index, identity=job.identity, status=st, where=where,
                      config=job.config_path, run_dir=str(trial.run_dir))

        def on_end(trial: Trial, job: TrialJob, res: TrialResult, where: str) -> None:
            if res.outcome == "completed":
                summary.completed += 1
            else:
                summary.failed += 1
                summary.failures.append(trial.name)
            eta = progress.finished(res.duration_s)
            with progress.lock:
                summary.add_phases(res.phases)
            fu = "".join(f"\n  follow-up {s['step']}: {s['outcome']}"
                         + (f" in {fmt_duration(s['duration_s'])}" if s.get("outcome") != "done-before" and "duration_s" in s else "")
                         for s in res.followups)
            err = f"\n  error: {res.error}" if res.error else ""
            log.say(f"end: {fmt_clock(time.time())} | {trial.name} | Duration: {fmt_duration(res.duration_s)}{phase_text(res.phases)}"
                    f" | outcome: {res.outcome}"
                    f"{'' if res.trained or res.outcome != 'completed' else ' (training was already done)'}{fu}{err}\n{eta}")
            log.event("end", run=trial.name, index=trial.index, identity=job.identity, outcome=res.outcome, error=res.error,
                      returncode=res.returncode, duration_s=res.duration_s, phases=res.phases, trained=res.trained, host=res.host, where=where,
                      followups=res.followups, eta=eta)

        def on_submit(trial: Trial, job_id: str) -> None:
            log.say(f"[{pos[trial.name]}/{len(trials)}] {trial.name}: submitted as job {job_id}")
            log.event("submitted", run=trial.name, index=trial.index, job_id=job_id)

        executor.run(spec, jobs, study_dir, make_job, on_start, on_end, on_submit)
        log.say(results_table(trials))
        _study_steps("study", spec, study_dir, log, summary)
        summary.seconds = time.time() - t_start
        log.say(f"==== TOTAL: {summary.total} runs: {summary.completed} completed now, {summary.skipped} already done, "
                f"{summary.failed} failed, {summary.gave_up} not retried | total time {fmt_duration(summary.seconds)}"
                f"{phase_text(summary.phases, ' | by phase: ')} ====")
        log.event("sweep_end", **{k: v for k, v in asdict(summary).items()}, ok=summary.ok)
    return summary


def phase_text(phases: dict[str, float], lead: str = " (") -> str:
    """``" (train 41s, bounds 23s)"``: the time of each phase, in the order they ran; empty when none ran."""
    if not phases:
        return ""
    body = ", ".join(f"{k} {fmt_duration(v)}" for k, v in phases.items())
    return f"{lead}{body})" if lead == " (" else f"{lead}{body}"


def results_table(trials: list[Trial]) -> str:
    """One line per run from its results_final.json: status, final metrics, parameters, wall time."""
    rows = []
    for t in trials:
        p = t.run_dir / "results_final.json"
        try:
            res = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
        except (OSError, ValueError):  # bad JSON or not UTF-8
            res = {}
        if not isinstance(res, dict):
            res = {}
        final = res.get("final") if isinstance(res.get("final"), dict) else {}
        final = {k: v for k, v in final.items() if isinstance(v, (int, float)) and k != "train_loss"}
        metrics = " ".join(f"{k}={v:.4f}" for k, v in final.items()) or "-"
        params = f"{res['trainable_params']:,}" if isinstance(res.get("trainable_params"), int) else "-"
        wall = f"{res['wall_time_s']:.0f}s" if isinstance(res.get("wall_time_s"), (int, float)) else "-"
        rows.append((t.name, res.get("status", "not run"), metrics, params, wall))
    w = max([4, *(len(r[0]) for r in rows)])
    lines = ["results:", f"  {'run':<{w}}  {'status':<9}  {'trainable':>11}  {'wall':>6}  final metrics"]
    lines += [f"  {n:<{w}}  {st:<9}  {pa:>11}  {wa:>6}  {m}" for n, st, m, pa, wa in rows]
    return "\n".join(lines)


def _followups_pending(spec: StudySpec, trial: Trial, study_dir: Path) -> bool:
    ident = fingerprint(trial.cfg)
    return any(not followup_marker(study_dir / STATE_DIR, trial.name, i, ident).is_file() for i in range(len(spec.follow_up.per_run)))


def before_marker(study_dir: Path, words: list[str]) -> Path:
    """The file that says the study's ``before`` step ``words`` (substituted) finished: it is not run again."""
    return study_dir / STATE_DIR / "followups" / f"_before.{hashlib.sha256(shlex.join(words).encode()).hexdigest()[:16]}.done"


def _study_steps(kind: str, spec: StudySpec, study_dir: Path, log: StudyLog, summary: SweepSummary) -> bool:
    """The study's ``before`` steps (each once: a finished one is not repeated; the first failure
    stops them) or its ``study`` steps (after the runs, at every sweep, all of them); False when
    one failed. A run's ``per_run`` steps go through the same :func:`~.trial.run_steps`."""
    before = kind == "before"
    steps = [step_words(s, {"study_dir": str(study_dir)}) for s in (spec.follow_up.before if before else spec.follow_up.study)]
    markers = [before_marker(study_dir, w) for w in steps] if before else None

    def on_start(words: list[str]) -> None:
        log.say(f"==== {'BEFORE THE RUNS' if before else 'STUDY STEP'}: peftlab {shlex.join(words)} ====")

    def on_end(r: StepResult) -> None:
        ok = r.outcome == "completed"
        log.say(f"{'step' if before else 'study step'} `{r.words[0]}`: {'completed' if ok else 'failed: ' + r.error} in {fmt_duration(r.duration_s)}")
        if not before and ok and r.tail.strip() and log.out is not None:
            print(r.tail.split("\n", 2)[-1].rstrip(), file=log.out)
        log.event("before_step" if before else "study_step", step=r.step, outcome=r.outcome, error=r.error, duration_s=r.duration_s)
        summary.add_phases({r.words[0]: r.duration_s})
        if not ok:
            summary.failed += 1
            summary.failures.append(f"step before the runs: {r.words[0]}" if before else f"study step {r.words[0]}")

    results = run_steps(steps, env=dict(os.environ), cwd=os.getcwd(), out_path=study_dir / STATE_DIR / "output" / "_study.out",
                        markers=markers, stop_on_failure=before, on_start=on_start, on_end=on_end)
    return all(r.outcome != "failed" for r in results)


__all__ = ["STATE_DIR", "TrialJob", "TrialResult", "execute_trial", "format_table", "make_job", "plan", "read_events",
           "results_table", "sweep", "trial_status"]
