"""``peftlab estimate``: how long a study (or one run) will take on this device.

For each distinct configuration (runs that differ only in seed share one), a probe builds
the real run (model, data, method — any work a method does before training, such as a
data-dependent initialisation, included in the time it takes) in a scratch directory and
trains a few real optimizer steps through the real loop, then evaluates and saves as a
run's epoch end does. Per step it records a timestamp (a wrapper around the method's
``after_optimizer_step`` hook). A run's estimate is::

    process start + setup + first step + (steps - 1) x median step
      + (refreshes - 1) x (first step - median step)      methods with `update_interval` (periodic refreshes)
      + epochs x (evaluation + epoch checkpoint) + evaluations at `eval_steps` inside epochs x evaluation
      + step checkpoints x save + final export

Process start is the import of the run's libraries in a fresh process, with the CUDA context when the run
trains on a GPU (the probes share one process, so they pay neither).

``steps`` comes from :func:`peftlab.build.count_optimizer_steps` (no training). A study's
follow-ups are timed for real: each ``per_run`` step (``bounds``, ``profile``, ...) runs, in its
own process as the sweep runs it, on the probe's finished run directory (its time does not
depend on how long the run trained: a bound scores ``bounds.num_docs`` documents of the model
whatever it learned), and the ``study`` steps (``analyze``) run once at the end on a scratch
study directory holding one probe run per distinct configuration. Runs
already done in the study directory count zero. A partial run (killed, or stopped) counts
only what is left after its newest complete checkpoint, where ``--resume`` would start:
its remaining steps, the epoch ends among them and the setup of the resumed process.

Runs that share a GPU (``--gpus 0,0,0,0``: k slots on one device) slow each other. With ``sharing=k`` the
first configuration is probed once more while k - 1 copies of its training run beside it, each in its own
``peftlab train`` process as the sweep would start it (stopped once the probe is done); the ratio of its median
step time to the probe's alone is the *sharing factor*, applied to every run's training and follow-ups (an
assumption: the follow-ups, bounds or profiles, are not probed shared).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..build import count_optimizer_steps
from ..checkpoints import list_checkpoints
from ..methods import METHODS
from ..runs.identity import run_identity
from ..tracking import close_logger, quiet_libraries
from ..train import lock as run_lock
from ..train.loop import Trainer
from .executors import with_threads
from .log import fmt_duration
from .runner import before_marker, write_config
from .trial import run_steps, step_words, trial_status


@dataclass
class Probe:
    setup_s: float
    first_step_s: float
    step_s: float
    eval_s: float
    save_s: float
    finish_s: float
    steps: int  # the full run's optimizer steps
    epochs: int
    steps_timed: int
    step_times: list[float] = field(default_factory=list)
    followup_s: dict[str, float] = field(default_factory=dict)  # per-run follow-up steps, timed on the probe's run

    @property
    def followups_total(self) -> float:
        return sum(self.followup_s.values())


_START_COST: dict[bool, float] = {}


def process_start_s(cuda: bool = False) -> float:
    """Seconds to start a run's process and import its libraries, and with ``cuda`` to create its CUDA context
    (measured once each)."""
    if cuda not in _START_COST:
        code = "import peftlab.train.loop, peftlab.methods, transformers, peft, accelerate"
        if cuda:
            code += "; import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=False, capture_output=True)
        _START_COST[cuda] = time.perf_counter() - t0
    return _START_COST[cuda]


def _on_cuda(cfg) -> bool:
    import torch

    return cfg.system.device != "cpu" and torch.cuda.is_available()


def probe(cfg, steps: int = 4, clock: Callable[[], float] = time.perf_counter, run_dir: Optional[Path] = None) -> Probe:
    """Build ``cfg``'s run in a scratch directory (or ``run_dir``, which is kept) and time ``steps`` real optimizer steps.

    ``clock`` gives the seconds every timing is read from (a test passes a simulated one)."""
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="peftlab-estimate-") as tmp:
        where = str(run_dir) if run_dir is not None else f"{tmp}/run"
        # no evaluation at eval_steps: the probe times the epoch end's one (run_seconds counts the others)
        pcfg = cfg.replace({"output.dir": where, "training.save_steps": 0, "training.eval_steps": 0, "training.resume_from": None,
                            "logging.progress_bar": False, "logging.report_to": [], "output.overwrite": True})
        t0 = clock()
        tr = Trainer(pcfg, console=False)
        setup = clock() - t0
        full_steps = count_optimizer_steps(cfg)
        epochs = math.ceil(full_steps / tr.steps_per_epoch)
        n = max(1, min(steps, tr.total_steps))
        tr.total_steps = n
        stamps: list[float] = []
        hook = tr.method.after_optimizer_step

        def timed_hook(model, lr):
            hook(model, lr)
            stamps.append(clock())

        tr.method.after_optimizer_step = timed_hook
        timings = {"eval": 0.0, "save": 0.0}
        evaluate, save = tr.evaluate, tr.save_checkpoint

        def timed_eval():
            a = clock()
            try:
                return evaluate()
            finally:
                timings["eval"] += clock() - a

        def timed_save(name):
            a = clock()
            try:
                return save(name)
            finally:
                timings["save"] += clock() - a

        tr.evaluate, tr.save_checkpoint = timed_eval, timed_save
        t1 = clock()
        try:
            tr.run()
        finally:
            run_lock.release(Path(pcfg.output.dir))
            close_logger()  # the scratch run's train.log goes with the temporary directory
        t_end = clock()
    dts = [b - a for a, b in zip([t1, *stamps[:-1]], stamps)]
    first = dts[0] if dts else 0.0
    steady = statistics.median(dts[1:]) if len(dts) > 1 else first
    last = stamps[-1] if stamps else t1
    finish = max(t_end - last - timings["eval"] - timings["save"], 0.0)
    return Probe(setup, first, steady, timings["eval"], timings["save"], finish, full_steps, epochs, len(dts), dts)


def _refresh_interval(cfg) -> Optional[int]:
    """`update_interval` of the run's own method section, if it has one (periodic work such as a projection's SVDs)."""
    for sec in getattr(METHODS.get(cfg.method), "sections", ()) or ():
        v = getattr(getattr(cfg, sec, None), "update_interval", None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def run_seconds(cfg, p: Probe, done_steps: int = 0) -> float:
    """Seconds to train the run from optimizer step ``done_steps`` (a resumed run) to its end."""
    steps = p.steps
    done = min(max(int(done_steps), 0), steps)
    left = steps - done
    start = process_start_s(_on_cuda(cfg))
    if left == 0:  # only the end of the run (evaluation, export) is missing
        return start + p.setup_s + p.eval_s + p.save_s + p.finish_s
    total = start + p.setup_s + p.first_step_s + max(left - 1, 0) * p.step_s
    interval = _refresh_interval(cfg)
    if interval:  # refreshes at steps 0, interval, 2 interval, ...; a resumed run starts with one
        refreshes = len(range(math.ceil(done / interval) * interval, steps, interval)) + (1 if done % interval else 0)
        total += max(refreshes - 1, 0) * max(p.first_step_s - p.step_s, 0.0)
    steps_per_epoch = math.ceil(steps / max(p.epochs, 1))
    ends = {min(e * steps_per_epoch, steps) for e in range(1, p.epochs + 1)}
    epoch_ends = len(ends - set(range(0, done + 1)))
    every = cfg.training.eval_steps
    if every:  # the loop's evaluations inside an epoch (an epoch end evaluates anyway)
        total += sum(1 for s in range(every, steps + 1, every) if s > done and s not in ends) * p.eval_s
    save_steps = cfg.training.save_steps
    n_step_saves = 0
    if save_steps:
        n_step_saves = sum(1 for s in range(save_steps, steps + 1, save_steps) if s > done and s % steps_per_epoch and s != steps)
    total += epoch_ends * (p.eval_s + p.save_s) + n_step_saves * p.save_s + p.finish_s
    return total


def resume_step(run_dir: Path) -> int:
    """The optimizer step a resumed run starts from: that of its newest complete checkpoint (0 if none)."""
    found = list_checkpoints(Path(run_dir) / "checkpoints")
    return found[-1][0] if found else 0


def _distinct_key(cfg) -> str:
    ident = run_identity(cfg)
    ident = json.loads(json.dumps(ident, default=str))
    if isinstance(ident.get("training"), dict):
        ident["training"].pop("seed", None)
    return json.dumps(ident, sort_keys=True)


def estimate_config(cfg, steps: int = 4, name: Optional[str] = None,
                    clock: Callable[[], float] = time.perf_counter) -> list[dict[str, Any]]:
    p = probe(cfg, steps, clock)
    return [{"name": name or str(cfg.output.dir), "status": "new", "seconds": run_seconds(cfg, p), "probe": p}]


def time_steps(steps: list[str], mapping: dict[str, str], log_path: Path, out=None) -> dict[str, float]:
    """Run follow-up steps as the sweep does (each ``peftlab`` command in its own process, in this directory) and
    return the seconds each took, by command name. A step that fails is reported and counted as it ran."""
    if not steps:
        return {}
    taken: dict[str, float] = {}

    def on_end(r) -> None:
        taken[r.words[0]] = taken.get(r.words[0], 0.0) + r.duration_s
        if r.outcome == "failed" and out is not None:
            print(f"  follow-up `{r.words[0]}` failed on the probe ({r.error}); its {fmt_duration(r.duration_s)} count as they ran",
                  file=out, flush=True)

    run_steps([step_words(s, mapping) for s in steps], env=dict(os.environ), cwd=os.getcwd(), out_path=log_path,
              stop_on_failure=False, on_end=on_end)
    return taken


def _copy_stepping(run_dir: Path) -> bool:
    """Whether a copy's loss_log.csv has a row after its header (it is past its setup and training)."""
    try:
        with open(run_dir / "loss_log.csv") as f:
            return bool(f.readline()) and bool(f.readline())
    except OSError:
        return False


def _stop(procs: list[subprocess.Popen]) -> None:
    for pr in procs:
        if pr.poll() is None:
            pr.terminate()
    for pr in procs:
        try:
            pr.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pr.kill()
            pr.wait()


def sharing_probe(cfg, copies: int, scratch: Path, steps: int = 4, clock: Callable[[], float] = time.perf_counter,
                  out=None, wait_s: float = 600.0) -> Optional[Probe]:
    """:func:`probe` of ``cfg`` while ``copies`` copies of its training run in their own ``peftlab train`` processes on
    the same device (started first; the probe begins once every copy has logged a step). None, with a message, when a
    copy stops before the probe is done or does not start stepping within ``wait_s``."""
    out = out if out is not None else sys.stdout
    procs, dirs = [], []
    try:
        for i in range(copies):
            d = scratch / f".sharing/copy{i}"
            d.parent.mkdir(parents=True, exist_ok=True)
            ccfg = cfg.replace({"output.dir": str(d), "training.epochs": 10_000, "training.max_steps": 10_000_000,
                                "training.save_steps": 0, "training.eval_steps": 0, "training.log_steps": 1,
                                "training.resume_from": None, "logging.progress_bar": False, "logging.report_to": [],
                                "output.overwrite": True})
            path = scratch / f".sharing/copy{i}.yaml"
            write_config(path, ccfg)
            log = open(scratch / f".sharing/copy{i}.out", "w")
            procs.append(subprocess.Popen([sys.executable, "-m", "peftlab", "train", str(path)], stdout=log,
                                          stderr=subprocess.STDOUT, cwd=os.getcwd(), env=dict(os.environ)))
            log.close()
            dirs.append(d)
        deadline = time.monotonic() + wait_s
        while not all(_copy_stepping(d) for d in dirs):
            if any(pr.poll() is not None for pr in procs) or time.monotonic() > deadline:
                ended = [i for i, pr in enumerate(procs) if pr.poll() is not None] or [0]
                tail = (scratch / f".sharing/copy{ended[0]}.out").read_text(errors="replace").strip().splitlines()[-5:]
                print("  the sharing probe's copies did not all start training, so the estimate assumes runs sharing a GPU "
                      "do not slow each other; the copy's last lines:\n    " + "\n    ".join(tail or ["(no output)"]),
                      file=out, flush=True)
                return None
            time.sleep(0.5)
        shared = probe(cfg, steps, clock)
        if any(pr.poll() is not None for pr in procs):
            print("  a copy of the sharing probe stopped before the probe was done; its time is not used", file=out, flush=True)
            return None
        return shared
    finally:
        _stop(procs)


def estimate_study(spec, trials, steps: int = 4, slots: int = 1, out=None,
                   clock: Callable[[], float] = time.perf_counter, threads: Optional[int] = None,
                   sharing: int = 1) -> list[dict[str, Any]]:
    """One row per trial (its training plus its per-run follow-ups), then one row per study step (``analyze``).
    ``threads``: the CPU threads each run gets when several share the CPU (`execution.cpu_runs`); the probes use as many.
    ``sharing``: runs side by side on one GPU (``--gpus 0,0``: 2); above 1 the sharing factor (module docstring)
    scales every run's seconds, and a first row (``status: sharing``) records it."""
    out = out if out is not None else sys.stdout
    probes: dict[str, Probe] = {}
    rows = []
    per_run = list(spec.follow_up.per_run)
    with tempfile.TemporaryDirectory(prefix="peftlab-estimate-study-") as scratch:
        if spec.follow_up.before and (per_run or spec.follow_up.study):
            # the follow-ups may read what the `before` steps write ({study_dir}/bins): run them in the scratch study;
            # they count when the real study has not run them yet (a finished one is not repeated by the sweep)
            real = trials[0].run_dir.parent if trials else spec.output_dir
            print("running the study's steps before the runs in a scratch study ...", file=out, flush=True)
            todo = [s for s in spec.follow_up.before if not before_marker(real, step_words(s, {"study_dir": str(real)})).is_file()]
            taken = time_steps(list(spec.follow_up.before), {"study_dir": scratch}, Path(scratch) / ".before.out", out)
            if todo:
                for name, sec in taken.items():
                    rows.append({"name": f"(before the runs: {name}, once)", "status": "study", "seconds": sec, "probe": None,
                                 "study_step": name, "runs_seen": 0})
        for t in trials:
            status, _ = trial_status(t.cfg, t.run_dir)
            if status in ("done", "diverged"):  # a diverged run is not trained again
                rows.append({"name": t.name, "status": status, "seconds": 0.0, "probe": None})
                continue
            key = _distinct_key(t.cfg)
            if key not in probes:
                print(f"timing {steps} steps of {t.name} ({len(probes) + 1} distinct configuration(s) so far) ...", file=out, flush=True)
                run_dir = Path(scratch) / t.name
                p = probes[key] = probe(with_threads(t.cfg, threads), steps, clock, run_dir=run_dir)
                if per_run:
                    cfg_path = Path(scratch) / ".configs" / f"{t.name}.yaml"
                    write_config(cfg_path, t.cfg.replace({"output.dir": str(run_dir)}))
                    print(f"timing the follow-ups of {t.name} on the probe's run ...", file=out, flush=True)
                    p.followup_s = time_steps(per_run, {"run_dir": str(run_dir), "name": t.name, "study_dir": scratch,
                                                        "config": str(cfg_path)}, Path(scratch) / ".followups.out", out)
            p = probes[key]
            done = resume_step(t.run_dir) if status == "partial" else 0
            rows.append({"name": t.name, "status": status, "seconds": run_seconds(t.cfg, p, done) + p.followups_total,
                         "probe": p, "done_steps": done})
        todo = [r for r in rows if r.get("probe") is not None]
        if sharing > 1 and todo:
            first = todo[0]
            print(f"timing {steps} steps of {first['name']} again, with {sharing - 1} copies of its training beside it "
                  f"(runs sharing one GPU {sharing} ways) ...", file=out, flush=True)
            cfg = next(t.cfg for t in trials if t.name == first["name"])
            shared = sharing_probe(with_threads(cfg, threads), sharing - 1, Path(scratch), steps, clock, out)
            if shared is not None and first["probe"].step_s > 0:
                factor = max(shared.step_s / first["probe"].step_s, 1.0)
                for r in todo:
                    r["seconds"] *= factor
                    r["factor"] = factor
                rows.insert(0, {"name": f"(sharing one GPU {sharing} ways)", "status": "sharing", "seconds": 0.0, "probe": None,
                                "sharing": {"ways": sharing, "factor": factor, "measured_on": first["name"],
                                            "step_s_alone": first["probe"].step_s, "step_s_shared": shared.step_s}})
        if spec.follow_up.study and probes:
            print(f"timing the study steps on the {len(probes)} probe run(s) ...", file=out, flush=True)
            for name, sec in time_steps(list(spec.follow_up.study), {"study_dir": scratch}, Path(scratch) / ".study.out", out).items():
                rows.append({"name": f"(study step: {name}, once)", "status": "study", "seconds": sec, "probe": None,
                             "study_step": name, "runs_seen": len(probes)})
    return rows


def estimate_record(rows: list[dict], slots: int = 1) -> dict[str, Any]:
    """The estimate as data (``peftlab estimate --json``): per run its seconds, training and follow-up shares;
    the study steps; the total and the wall time on ``slots`` slots, as :func:`print_estimate` prints them."""
    runs, steps, sharing = [], [], None
    for r in rows:
        if r.get("study_step"):
            steps.append({"name": r["study_step"], "seconds": r["seconds"], "once": True})
            continue
        if r["status"] == "sharing":
            sharing = r["sharing"]
            continue
        p = r["probe"]
        rec = {"name": r["name"], "status": r["status"], "seconds": r["seconds"]}
        if p is not None:
            f = r.get("factor", 1.0)
            rec.update(train_s=r["seconds"] - f * p.followups_total, followups_s={k: f * v for k, v in p.followup_s.items()},
                       steps=p.steps, step_s=p.step_s, setup_s=p.setup_s, done_steps=r.get("done_steps") or 0)
        runs.append(rec)
    total = sum(r["seconds"] for r in rows)
    study_s = sum(s["seconds"] for s in steps)
    return {"runs": runs, "study_steps": steps, "total_s": total, "slots": slots,  # the study steps run once, after every run
            "wall_s": (total - study_s) / max(slots, 1) + study_s, "sharing": sharing, "time": time.time()}


def print_estimate(rows: list[dict], slots: int = 1, out=None) -> float:
    """Seed 003's layout: one line per run, a TOTAL, and the expected completion time."""
    out = out if out is not None else sys.stdout
    w = max([5, *(len(r["name"]) for r in rows)])
    print(f"{'run':<{w}}   {'steps':>7} {'s/step':>8} {'setup+eval':>10}   estimate", file=out)
    for r in rows:
        p = r["probe"]
        if r.get("study_step"):
            seen = (f"   (timed on {r['runs_seen']} probe run(s); grows a little with the number of runs)" if r["runs_seen"] else "")
            print(f"{r['name']:<{w}} : {'':>7} {'':>8} {'':>10}   ~ {fmt_duration(r['seconds']):>10}{seen}", file=out)
            continue
        if r["status"] == "sharing":
            sh = r["sharing"]
            print(f"{r['name']:<{w}} : steps of {sh['measured_on']} took {sh['factor']:.2f}x their time alone "
                  f"({sh['step_s_alone']:.3f} -> {sh['step_s_shared']:.3f} s/step); every run below includes it", file=out)
            continue
        if p is None:
            print(f"{r['name']:<{w}} : {'':>7} {'':>8} {'':>10}   {r['status']} (0s)", file=out)
            continue
        done = r.get("done_steps") or 0
        f = r.get("factor", 1.0)
        left = f"{p.steps - done}/{p.steps}" if done else f"{p.steps}"
        fu = ", ".join(f"{k} {fmt_duration(f * v)}" for k, v in p.followup_s.items())
        print(f"{r['name']:<{w}} : {left:>7} {p.step_s:>8.3f} {p.setup_s + p.epochs * p.eval_s:>10.1f}   ~ {fmt_duration(r['seconds']):>10}"
              + (f"   (resumes at step {done})" if done else "")
              + (f"   (train {fmt_duration(r['seconds'] - f * p.followups_total)}, {fu})" if fu else ""), file=out)
    rec = estimate_record(rows, slots)
    total, wall = rec["total_s"], rec["wall_s"]
    print("-" * (w + 44), file=out)
    print(f"{'TOTAL':<{w}} : {'':>28}   ~ {fmt_duration(total):>10}" + (f" ({fmt_duration(wall)} on {slots} slots)" if slots > 1 else ""), file=out)
    print(f"Expected completion if started now: {time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(time.time() + wall))}", file=out)
    return total
