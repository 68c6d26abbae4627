"""One trial of a study, in the process that runs it: the run's status from its directory,
training it (or resuming it) in a child process under the run's lock, and the ``peftlab``
steps that follow it.

Everything here runs in the sweeping process's worker thread or, through submitit, on a
cluster node: :class:`TrialJob` holds all a trial needs and pickles.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..config import load_config
from ..errors import PeftlabError
from ..runs.identity import identity_diff

STATE_DIR = ".study"
TRIAL_ENV = "PEFTLAB_STUDY_TRIAL"  # JSON provenance read by peftlab.tracking.run_metadata


# ------------------------------------------------------------------------- status
def trial_status(cfg, run_dir: Path) -> tuple[str, str]:
    """(``done`` | ``partial`` | ``new`` | ``conflict`` | ``diverged``, detail) of a run directory for ``cfg``.

    ``diverged``: its results_final.json says the run diverged; resuming it would resume into the
    same divergence, so a sweep never trains it again (the detail says where and what to change)."""
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        return "new", ""
    try:
        stored = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
        return "conflict", f"unreadable config.json ({e})"
    if not isinstance(stored, dict):
        return "conflict", f"config.json holds a JSON {type(stored).__name__}, not a run's configuration"
    diff = identity_diff(stored, cfg)
    if diff:
        return "conflict", "holds a run with other settings: " + "; ".join(diff[:4])
    res = run_dir / "results_final.json"
    if res.is_file():
        try:
            final = json.loads(res.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            final = None
        status = final.get("status") if isinstance(final, dict) else None
        if status == "completed":
            return "done", ""
        if status == "diverged":
            d = final.get("diverged") if isinstance(final.get("diverged"), dict) else {}
            return "diverged", (f"diverged at step {d.get('step', '?')}: {d.get('what', 'non-finite values')}; not trained again with "
                                f"these settings: change them (e.g. training.learning_rate) or delete {run_dir} to start over")
    ck = run_dir / "checkpoints"
    n = len([p for p in ck.iterdir() if p.is_dir() and not p.name.startswith(".")]) if ck.is_dir() else 0
    return "partial", f"{n} checkpoint(s)"


# ---------------------------------------------------------------------- the job
@dataclass
class TrialJob:
    """Everything a process needs to run one trial (picklable: submitit sends it to a node)."""

    name: str
    index: int
    config_path: str
    run_dir: str
    study_dir: str
    identity: str
    launcher: list[str]  # prefix before `-m peftlab train ...` (python, or a torchrun/accelerate launcher)
    env: dict[str, str] = field(default_factory=dict)
    followups: list[list[str]] = field(default_factory=list)
    cwd: str = "."


@dataclass
class TrialResult:
    name: str
    outcome: str  # completed | failed | conflict | diverged
    status_before: str = ""
    returncode: Optional[int] = None
    error: str = ""
    duration_s: float = 0.0
    trained: bool = False
    followups: list[dict] = field(default_factory=list)
    host: str = ""
    # seconds per phase of this attempt: "train" (the training process), then each follow-up by its command
    # ("bounds", "profile", ...); a phase that did not run this time is absent
    phases: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------- child processes
# Linux: each run's process goes through orphan_guard.py, which makes it die with the sweep (see there)
_GUARD = Path(__file__).with_name("orphan_guard.py") if sys.platform.startswith("linux") else None


def guarded(cmd: list[str]) -> list[str]:
    """``cmd`` started so that it dies with this process (Linux; elsewhere ``cmd`` itself)."""
    if _GUARD is None:
        return cmd
    return [sys.executable, "-S", str(_GUARD), str(os.getpid()), *cmd]


def _lock_file(f, blocking: bool = True) -> bool:
    """An exclusive lock on an open file, released by the OS when every holder exits. False: held elsewhere."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        while True:
            try:
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
                return True
            except OSError:
                if not blocking:
                    return False
                time.sleep(1.0)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


def _error_signature(output: str, rc: Optional[int]) -> str:
    """One line that says how a run failed (two attempts with the same line are 'the same way')."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:"):
            return ln[:300]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            return ln[:300]
    if rc is not None and rc < 0:
        return f"killed by signal {-rc} ({signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else '?'})"
    return (lines[-1][:300] if lines else f"exit status {rc}")


def _run_logged(cmd: list[str], env: dict, cwd: str, out_path: Path, lock_fd: Optional[int]) -> tuple[int, str]:
    """Run ``cmd`` with its output appended to ``out_path``; (exit status, the end of this attempt's output)."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "ab") as f:
        start = f.tell()
        f.write(f"\n$ {shlex.join(cmd)}\n".encode())
        f.flush()
        # no preexec_fn: Python code between fork and exec is unsafe with threads (several runs at once)
        proc = subprocess.Popen(guarded(cmd), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                pass_fds=(lock_fd,) if lock_fd is not None and os.name == "posix" else ())
        try:
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    with open(out_path, "rb") as f:
        f.seek(start)
        tail = f.read()[-20000:].decode("utf-8", errors="replace")
    return rc, tail


# ------------------------------------------------------------------- steps
@dataclass
class StepResult:
    words: list[str]  # the step's command line after `peftlab`
    outcome: str  # completed | failed | done-before
    error: str = ""
    duration_s: float = 0.0
    tail: str = ""  # the end of its console output (steps that ran)

    @property
    def step(self) -> str:
        return shlex.join(self.words)


def step_words(step: str, mapping: dict[str, str]) -> list[str]:
    """A follow-up step's command line after ``peftlab``, with ``{run_dir}``, ``{name}``, ... filled in from ``mapping``."""
    words = shlex.split(step)
    if words and words[0] == "peftlab":
        words = words[1:]
    out = []
    for w in words:
        for k, v in mapping.items():
            w = w.replace("{" + k + "}", v)
        out.append(w)
    return out


def followup_marker(state_dir: Path, name: str, i: int, identity: str) -> Path:
    """The file that says follow-up step ``i`` of run ``name`` (with these settings) finished."""
    return state_dir / "followups" / f"{name}.{i}.{identity}.done"


def run_steps(steps: list[list[str]], *, env: dict, cwd: str, out_path: Path, markers: Optional[list[Path]] = None,
              stop_on_failure: bool = True, on_start: Optional[Callable[[list[str]], None]] = None,
              on_end: Optional[Callable[[StepResult], None]] = None) -> list[StepResult]:
    """Run ``peftlab`` steps one after the other, each in its own process, output appended to ``out_path``.

    Every follow-up of a study goes through here: a run's ``per_run`` steps, and the study's
    ``before`` and ``study`` steps. With ``markers`` (one file per step), a step whose marker
    exists is not run again (outcome ``done-before``) and a completed step writes its marker.
    ``on_start``/``on_end`` are called around each step that runs.
    """
    results: list[StepResult] = []
    for i, words in enumerate(steps):
        marker = markers[i] if markers is not None else None
        if marker is not None and marker.is_file():
            results.append(StepResult(list(words), "done-before"))
            continue
        if on_start is not None:
            on_start(words)
        t0 = time.time()
        rc, tail = _run_logged([sys.executable, "-m", "peftlab", *words], env, cwd, out_path, None)
        res = StepResult(list(words), "completed" if rc == 0 else "failed", "" if rc == 0 else _error_signature(tail, rc),
                         time.time() - t0, tail)
        if rc == 0 and marker is not None:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"time": time.time(), "step": res.step}))
        results.append(res)
        if on_end is not None:
            on_end(res)
        if rc != 0 and stop_on_failure:
            break
    return results


# ------------------------------------------------------------------- one trial
def execute_trial(job: TrialJob) -> TrialResult:
    """Train one trial (unless done) and run its follow-ups, under the run's lock."""
    t0 = time.time()
    study_dir, run_dir = Path(job.study_dir), Path(job.run_dir)
    state = study_dir / STATE_DIR
    (state / "locks").mkdir(parents=True, exist_ok=True)
    res = TrialResult(job.name, "failed", host=socket.gethostname())
    lock = open(state / "locks" / f"{job.name}.lock", "a+")
    try:
        _lock_file(lock)  # a training process left by a killed sweep finishes first
        cfg = load_config(job.config_path)
        status, detail = trial_status(cfg, run_dir)
        res.status_before = status
        if status == "conflict":
            res.outcome, res.error = "conflict", (f"{run_dir} {detail}; delete it or change study.output_dir / study.run_name "
                                                  "(the study never reuses a directory with other settings)")
            return res
        if status == "diverged":
            res.outcome, res.error = "diverged", f"{run_dir} {detail}"
            return res
        env = {**os.environ, **job.env}
        out_path = state / "output" / f"{job.name}.out"
        if status != "done":
            cmd = [*job.launcher, "-m", "peftlab", "train", job.config_path, "--logging.progress_bar=false"]
            if status == "partial":
                cmd.append("--training.resume_from=latest")
            t_train = time.time()
            rc, tail = _run_logged(cmd, env, job.cwd, out_path, lock.fileno())
            res.phases["train"] = time.time() - t_train
            res.returncode, res.trained = rc, True
            after = trial_status(cfg, run_dir)[0]
            if rc != 0 or after != "done":
                res.error = _error_signature(tail, rc)
                if after == "diverged":
                    res.outcome = "diverged"
                return res
        (state / "followups").mkdir(parents=True, exist_ok=True)
        markers = [followup_marker(state, job.name, i, job.identity) for i in range(len(job.followups))]
        for step in run_steps(job.followups, env=env, cwd=job.cwd, out_path=out_path, markers=markers):
            res.followups.append({"step": step.step, "outcome": step.outcome, "duration_s": step.duration_s,
                                  **({"error": step.error} if step.outcome == "failed" else {})})
            if step.outcome != "done-before":
                res.phases[step.words[0]] = res.phases.get(step.words[0], 0.0) + step.duration_s
            if step.outcome == "failed":
                res.error = f"follow-up `{step.words[0]}` failed: {step.error}"
                return res
        res.outcome = "completed"
        return res
    except PeftlabError as e:
        res.error = str(e).splitlines()[0][:300]
        return res
    finally:
        res.duration_s = time.time() - t0
        lock.close()
