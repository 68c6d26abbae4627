"""Run a study: every trial in its own process, finished ones skipped, interrupted ones
resumed, failures recorded, one log for the whole study.

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

import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import PeftlabError
from ..runs.identity import fingerprint, identity_diff
from .expand import Trial
from .spec import StudySpec

STATE_DIR = ".study"
TRIAL_ENV = "PEFTLAB_STUDY_TRIAL"  # JSON provenance read by peftlab.tracking.run_metadata


# ------------------------------------------------------------------------- status
def trial_status(cfg, run_dir: Path) -> tuple[str, str]:
    """(``done`` | ``partial`` | ``new`` | ``conflict``, detail) of a run directory for ``cfg``."""
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        return "new", ""
    try:
        stored = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return "conflict", f"unreadable config.json ({e})"
    diff = identity_diff(stored, cfg)
    if diff:
        return "conflict", "holds a run with other settings: " + "; ".join(diff[:4])
    res = run_dir / "results_final.json"
    if res.is_file():
        try:
            if json.loads(res.read_text()).get("status") == "completed":
                return "done", ""
        except (OSError, json.JSONDecodeError):
            pass
    ck = run_dir / "checkpoints"
    n = len([p for p in ck.iterdir() if p.is_dir() and not p.name.startswith(".")]) if ck.is_dir() else 0
    return "partial", f"{n} checkpoint(s)"


# ------------------------------------------------------------------------ logging
def _fmt_duration(s: float) -> str:
    s = int(round(max(s, 0)))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h}h {m}m"
    if h:
        return f"{h}h {m}m"
    return f"{m}m {s}s" if m else f"{s}s"


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


class StudyLog:
    """``study.log`` (human) and ``study.jsonl`` (one record per line), safe across threads."""

    def __init__(self, study_dir: Path, out=None):
        self.dir = study_dir
        self.out = out
        self._lock = threading.Lock()

    def event(self, kind: str, **fields: Any) -> None:
        rec = {"event": kind, "time": time.time(), **fields}
        line = (json.dumps(rec, default=str) + "\n").encode()
        with self._lock:
            fd = os.open(self.dir / "study.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)  # one append: a kill leaves at most a torn last line, which readers skip
            finally:
                os.close(fd)

    def say(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with self._lock:
            with open(self.dir / "study.log", "a", encoding="utf-8") as f:
                for line in text.splitlines() or [""]:
                    f.write(f"[{stamp}] {line}\n")
            if self.out is not None:
                print(text, file=self.out, flush=True)


def read_events(study_dir: Path) -> list[dict]:
    p = Path(study_dir) / "study.jsonl"
    out = []
    if p.is_file():
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a kill
    return out


def gave_up(events: list[dict], name: str, identity: str, max_same: int) -> Optional[str]:
    """The error when the run's last ``max_same`` attempts (same settings) failed identically."""
    ends = [e for e in events if e.get("event") == "end" and e.get("run") == name and e.get("identity") == identity]
    tail = []
    for e in reversed(ends):
        if e.get("outcome") != "failed":
            break
        tail.append(e.get("error") or "")
    if len(tail) >= max_same and len(set(tail[:max_same])) == 1:
        return tail[0]
    return None


# ----------------------------------------------------------------------- one trial
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
    outcome: str  # completed | failed | conflict
    status_before: str = ""
    returncode: Optional[int] = None
    error: str = ""
    duration_s: float = 0.0
    trained: bool = False
    followups: list[dict] = field(default_factory=list)
    host: str = ""


def _load_prctl():
    """libc's prctl, looked up once in the sweeping process (the child may not import anything)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def _set_pdeathsig() -> None:
    """In the child between fork and exec: die with the process that started it (Linux)."""
    _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


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
    import subprocess

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "ab") as f:
        start = f.tell()
        f.write(f"\n$ {shlex.join(cmd)}\n".encode())
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                pass_fds=(lock_fd,) if lock_fd is not None and os.name == "posix" else (),
                                preexec_fn=_set_pdeathsig if _PRCTL is not None else None)
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


def execute_trial(job: TrialJob) -> TrialResult:
    """Train one trial (unless done) and run its follow-ups, under the run's lock.

    Runs in the sweeping process's worker thread or on a cluster node (submitit).
    """
    from ..config import load_config

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
        env = {**os.environ, **job.env}
        out_path = state / "output" / f"{job.name}.out"
        if status != "done":
            cmd = [*job.launcher, "-m", "peftlab", "train", job.config_path, "--logging.progress_bar=false"]
            if status == "partial":
                cmd.append("--training.resume_from=latest")
            rc, tail = _run_logged(cmd, env, job.cwd, out_path, lock.fileno())
            res.returncode, res.trained = rc, True
            if rc != 0 or trial_status(cfg, run_dir)[0] != "done":
                res.error = _error_signature(tail, rc)
                return res
        fdir = state / "followups"
        fdir.mkdir(parents=True, exist_ok=True)
        for i, words in enumerate(job.followups):
            marker = fdir / f"{job.name}.{i}.{job.identity}.done"
            step = {"step": shlex.join(words), "outcome": "done-before"}
            if not marker.is_file():
                rc, tail = _run_logged([sys.executable, "-m", "peftlab", *words], env, job.cwd, out_path, None)
                step["outcome"] = "completed" if rc == 0 else "failed"
                if rc != 0:
                    step["error"] = _error_signature(tail, rc)
                    res.followups.append(step)
                    res.error = f"follow-up `{words[0]}` failed: {step['error']}"
                    return res
                marker.write_text(json.dumps({"time": time.time()}))
            res.followups.append(step)
        res.outcome = "completed"
        return res
    except PeftlabError as e:
        res.error = str(e).splitlines()[0][:300]
        return res
    finally:
        res.duration_s = time.time() - t0
        lock.close()


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
        self.f.write(f"pid {os.getpid()} on {socket.gethostname()} since {_clock(time.time())}\n")
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
    """The run table: one row per trial with its status (done, partial, new, conflict, gave-up)."""
    events = read_events(spec_dir(spec, trials))
    rows = []
    for t in trials:
        status, detail = trial_status(t.cfg, t.run_dir)
        ident = fingerprint(t.cfg)
        if status != "done" and not retry_failed:
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


def _write_config(path: Path, cfg) -> None:
    import yaml

    from ..io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# written by peftlab sweep; `peftlab train` on this file reruns the trial by hand\n"
    atomic_write_text(path, text + yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _substitute(step: str, mapping: dict[str, str]) -> list[str]:
    words = shlex.split(step)
    if words and words[0] == "peftlab":
        words = words[1:]
    out = []
    for w in words:
        for k, v in mapping.items():
            w = w.replace("{" + k + "}", v)
        out.append(w)
    return out


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


def make_job(spec: StudySpec, trial: Trial, study_dir: Path, gpus: Optional[list[str]] = None) -> TrialJob:
    cfg_path = study_dir / STATE_DIR / "configs" / f"{trial.name}.yaml"
    _write_config(cfg_path, trial.cfg)
    mapping = {"run_dir": str(trial.run_dir), "name": trial.name, "study_dir": str(study_dir), "config": str(cfg_path)}
    env = {TRIAL_ENV: json.dumps(trial.provenance(spec) | {"study_dir": str(study_dir)}), "TOKENIZERS_PARALLELISM": "false"}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return TrialJob(name=trial.name, index=trial.index, config_path=str(cfg_path), run_dir=str(trial.run_dir), study_dir=str(study_dir),
                    identity=fingerprint(trial.cfg), launcher=launcher_prefix(spec, gpus), env=env,
                    followups=[_substitute(s, mapping) for s in spec.follow_up.per_run], cwd=os.getcwd())


@dataclass
class SweepSummary:
    total: int = 0
    completed: int = 0
    skipped: int = 0
    failed: int = 0
    gave_up: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

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
            return f"ETA: {self.left} run(s) left, ~{_fmt_duration(eta)} (expected completion {_clock(time.time() + eta)})"


def sweep(spec: StudySpec, trials: list[Trial], executor=None, out=None, retry_failed: bool = False) -> SweepSummary:
    """Run every trial that is not done; returns counts (``ok`` False when any failed)."""
    from .executors import LocalExecutor

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
                  to_run=len(todo), engine=executor.describe(), pid=os.getpid())
        log.say(f"==== STUDY {spec.study.name}{f' (scale {spec.scale})' if spec.scale else ''}: {len(trials)} runs, "
                f"{len(todo)} to run, {sum(r['status'] == 'done' for r in rows.values())} done, on {executor.describe()} -> {study_dir} ====")
        for t in trials:
            st = rows[t.name]["status"]
            if st == "done" and t not in pending_followups:
                summary.skipped += 1
                log.say(f"[{pos[t.name]}/{len(trials)}] {t.name}: already done, skipped")
            elif st == "gave-up":
                summary.gave_up += 1
                summary.failures.append(t.name)
                log.say(f"[{pos[t.name]}/{len(trials)}] {t.name}: NOT retried, {rows[t.name]['detail']} (sweep with --retry-failed to try again)")
                log.event("end", run=t.name, index=t.index, identity=rows[t.name]["identity"], outcome="gave-up", error=rows[t.name]["detail"])
        if not _before_steps(spec, study_dir, log, summary):
            summary.seconds = time.time() - t_start
            log.say(f"==== TOTAL: a step before the runs failed; no run started | total time {_fmt_duration(summary.seconds)} ====")
            log.event("sweep_end", **asdict(summary), ok=False)
            return summary
        progress = Progress(log, len(todo) + len(pending_followups), executor.slots)
        jobs = todo + pending_followups

        def on_start(trial: Trial, job: TrialJob, where: str) -> None:
            st = rows[trial.name]["status"]
            what = ("follow-up steps only (training was done)" if st == "done" else
                    f"command: peftlab train {job.config_path}" + (" --training.resume_from=latest" if st == "partial" else ""))
            log.say(f"==== EXPERIMENT {pos[trial.name]}/{len(trials)}: {trial.name} ({st}{', resuming' if st == 'partial' else ''}) on {where} ====\n"
                    f"start: {_clock(time.time())}\n{what}")
            log.event("start", run=trial.name, index=trial.index, identity=job.identity, status=st, where=where,
                      config=job.config_path, run_dir=str(trial.run_dir))

        def on_end(trial: Trial, job: TrialJob, res: TrialResult, where: str) -> None:
            if res.outcome == "completed":
                summary.completed += 1
            else:
                summary.failed += 1
                summary.failures.append(trial.name)
            eta = progress.finished(res.duration_s)
            fu = "".join(f"\n  follow-up {s['step']}: {s['outcome']}" for s in res.followups)
            err = f"\n  error: {res.error}" if res.error else ""
            log.say(f"end: {_clock(time.time())} | {trial.name} | Duration: {_fmt_duration(res.duration_s)} | outcome: {res.outcome}"
                    f"{'' if res.trained or res.outcome != 'completed' else ' (training was already done)'}{fu}{err}\n{eta}")
            log.event("end", run=trial.name, index=trial.index, identity=job.identity, outcome=res.outcome, error=res.error,
                      returncode=res.returncode, duration_s=res.duration_s, trained=res.trained, host=res.host, where=where,
                      followups=res.followups, eta=eta)

        def on_submit(trial: Trial, job_id: str) -> None:
            log.say(f"[{pos[trial.name]}/{len(trials)}] {trial.name}: submitted as job {job_id}")
            log.event("submitted", run=trial.name, index=trial.index, job_id=job_id)

        executor.run(spec, jobs, study_dir, make_job, on_start, on_end, on_submit)
        log.say(results_table(trials))
        summary.failed += _study_followups(spec, study_dir, log, summary)
        summary.seconds = time.time() - t_start
        log.say(f"==== TOTAL: {summary.total} runs: {summary.completed} completed now, {summary.skipped} already done, "
                f"{summary.failed} failed, {summary.gave_up} not retried | total time {_fmt_duration(summary.seconds)} ====")
        log.event("sweep_end", **{k: v for k, v in asdict(summary).items()}, ok=summary.ok)
    return summary


def results_table(trials: list[Trial]) -> str:
    """One line per run from its results_final.json: status, final metrics, parameters, wall time."""
    rows = []
    for t in trials:
        p = t.run_dir / "results_final.json"
        try:
            res = json.loads(p.read_text()) if p.is_file() else {}
        except (OSError, json.JSONDecodeError):
            res = {}
        final = {k: v for k, v in (res.get("final") or {}).items() if isinstance(v, (int, float)) and k != "train_loss"}
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
    return any(not (study_dir / STATE_DIR / "followups" / f"{trial.name}.{i}.{ident}.done").is_file()
               for i in range(len(spec.follow_up.per_run)))


def _before_steps(spec: StudySpec, study_dir: Path, log: StudyLog, summary: SweepSummary) -> bool:
    """Run the study's `before` steps that have not finished yet; False when one fails."""
    import hashlib

    for step in spec.follow_up.before:
        words = _substitute(step, {"study_dir": str(study_dir)})
        marker = study_dir / STATE_DIR / "followups" / f"_before.{hashlib.sha256(shlex.join(words).encode()).hexdigest()[:16]}.done"
        if marker.is_file():
            continue
        log.say(f"==== BEFORE THE RUNS: peftlab {shlex.join(words)} ====")
        t0 = time.time()
        rc, tail = _run_logged([sys.executable, "-m", "peftlab", *words], dict(os.environ), os.getcwd(),
                               study_dir / STATE_DIR / "output" / "_study.out", None)
        err = "" if rc == 0 else _error_signature(tail, rc)
        log.say(f"step `{words[0]}`: {'completed' if rc == 0 else 'failed: ' + err} in {_fmt_duration(time.time() - t0)}")
        log.event("before_step", step=shlex.join(words), outcome="completed" if rc == 0 else "failed", error=err, duration_s=time.time() - t0)
        if rc != 0:
            summary.failed += 1
            summary.failures.append(f"step before the runs: {words[0]}")
            return False
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"time": time.time(), "step": shlex.join(words)}))
    return True


def _study_followups(spec: StudySpec, study_dir: Path, log: StudyLog, summary: SweepSummary) -> int:
    failed = 0
    for step in spec.follow_up.study:
        words = _substitute(step, {"study_dir": str(study_dir)})
        log.say(f"==== STUDY STEP: peftlab {shlex.join(words)} ====")
        t0 = time.time()
        rc, tail = _run_logged([sys.executable, "-m", "peftlab", *words], dict(os.environ), os.getcwd(),
                               study_dir / STATE_DIR / "output" / "_study.out", None)
        err = "" if rc == 0 else _error_signature(tail, rc)
        log.say(f"study step `{words[0]}`: {'completed' if rc == 0 else 'failed: ' + err} in {_fmt_duration(time.time() - t0)}")
        if rc == 0 and tail.strip():
            if log.out is not None:
                print(tail.split("\n", 2)[-1].rstrip(), file=log.out)
        log.event("study_step", step=shlex.join(words), outcome="completed" if rc == 0 else "failed", error=err,
                  duration_s=time.time() - t0)
        if rc != 0:
            failed += 1
            summary.failures.append(f"study step {words[0]}")
    return failed


Callback = Callable[..., None]
