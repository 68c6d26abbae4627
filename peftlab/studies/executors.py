"""Where a study's runs go.

* :class:`LocalExecutor` — this machine: one run at a time, ``cpu_runs`` at a time on the CPU
  (each with its share of the cores as ``system.num_threads``), or with ``gpus=["0","1",...]``
  one run per GPU slot at a time (``CUDA_VISIBLE_DEVICES`` set per run; a slot holds
  ``execution.processes_per_run`` GPUs when a run spans several).
* :class:`SubmititExecutor` — Slurm through ``submitit`` (``cluster="slurm"``), or
  submitit's local executor (``cluster="local"``) to try the same path on one machine.
  Each run is one job; the job runs :func:`peftlab.studies.trial.execute_trial`, which
  takes the run's lock, checks the run directory and resumes or skips exactly as a local
  sweep does; the job id goes to study.log.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from ..errors import PeftlabError
from .trial import STATE_DIR, TrialResult, execute_trial


def cpu_threads(cpu_runs: int) -> Optional[int]:
    """``system.num_threads`` of each of ``cpu_runs`` runs sharing this machine's cores (None for one run: torch's choice)."""
    return max(1, (os.cpu_count() or 1) // cpu_runs) if cpu_runs > 1 else None


def with_threads(cfg, threads: Optional[int]):
    """``cfg`` with ``system.num_threads = threads`` where a share of the cores is given and the run sets none itself."""
    return cfg.replace({"system.num_threads": threads}) if threads and cfg.system.num_threads is None else cfg


class LocalExecutor:
    def __init__(self, gpus: Optional[list[str]] = None, processes_per_run: int = 1, cpu_runs: int = 1):
        self.gpus = gpus
        self.processes_per_run = processes_per_run
        # CPU threads per run when several runs share the CPU (None: torch's own choice, every core)
        self.threads = cpu_threads(cpu_runs) if gpus is None else None
        if gpus is not None:
            if len(gpus) < processes_per_run:
                raise PeftlabError(f"each run needs {processes_per_run} GPUs (execution.processes_per_run) but --gpus lists {len(gpus)}: {','.join(gpus)}.")
            n = len(gpus) // processes_per_run
            self.slot_gpus: list[Optional[list[str]]] = [gpus[i * processes_per_run:(i + 1) * processes_per_run] for i in range(n)]
        else:
            self.slot_gpus = [None] * max(cpu_runs, 1)

    @property
    def slots(self) -> int:
        return len(self.slot_gpus)

    def describe(self) -> str:
        if self.gpus is None:
            if self.slots > 1:
                return f"this machine, {self.slots} runs at a time on the CPU ({self.threads} thread(s) each)"
            return "this machine, one run at a time"
        return f"this machine, {self.slots} slot(s) of GPU(s) " + " | ".join(",".join(s or []) for s in self.slot_gpus)

    def run(self, spec, trials, study_dir: Path, make_job, on_start, on_end, on_submit) -> None:
        free: "queue.Queue[Optional[list[str]]]" = queue.Queue()
        for s in self.slot_gpus:
            free.put(s)
        lock = threading.Lock()  # make_job writes config files; start and end callbacks (counters, log) one at a time

        def work(trial):
            gpus = free.get()
            try:
                where = f"GPU {','.join(gpus)}" if gpus else "this machine"
                with lock:
                    job = make_job(spec, trial, study_dir, gpus, threads=self.threads)
                    on_start(trial, job, where)
                res = execute_trial(job)
                with lock:
                    on_end(trial, job, res, where)
            finally:
                free.put(gpus)

        if self.slots == 1:
            for t in trials:
                work(t)
            return
        pool = ThreadPoolExecutor(max_workers=self.slots)
        try:
            for f in [pool.submit(work, t) for t in trials]:
                f.result()
        finally:  # Ctrl-C or a failure in the sweep itself: start no further run (the running ones end with it)
            pool.shutdown(wait=True, cancel_futures=True)


class SubmititExecutor:
    """One submitit job per run: ``cluster="slurm"`` on a cluster, ``"local"`` on this machine."""

    def __init__(self, cluster: str = "slurm", parameters: Optional[dict] = None, poll_s: float = 2.0):
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise PeftlabError("--engine=slurm needs the submitit package: pip install submitit") from None
        self.cluster = cluster
        self.parameters = dict(parameters or {})
        self.poll_s = poll_s

    slots = 1  # ETA: the scheduler decides the parallelism; count runs as if one at a time

    def describe(self) -> str:
        return f"submitit ({self.cluster})"

    def run(self, spec, trials, study_dir: Path, make_job, on_start, on_end, on_submit) -> None:
        import submitit

        folder = study_dir / STATE_DIR / "submitit" / "%j"
        ex = submitit.AutoExecutor(folder=str(folder), cluster=self.cluster)
        params = {"timeout_min": 24 * 60, "name": f"peftlab-{spec.study.name}", **self.parameters}
        if spec.execution.processes_per_run > 1 and self.cluster == "slurm":
            params.setdefault("gpus_per_node", spec.execution.processes_per_run)
        ex.update_parameters(**params)
        running = []
        for t in trials:
            job = make_job(spec, t, study_dir, None)
            if self.cluster == "slurm":
                job.env.pop("CUDA_VISIBLE_DEVICES", None)  # Slurm sets it on the node
            sj = ex.submit(execute_trial, job)
            on_submit(t, str(sj.job_id))
            on_start(t, job, f"job {sj.job_id}")
            running.append((t, job, sj))
        while running:
            still = []
            for t, job, sj in running:
                if not sj.done():
                    still.append((t, job, sj))
                    continue
                try:
                    res = sj.result()
                except Exception as e:  # the job itself died (timeout, node failure, preemption)
                    msg = str(e).strip().splitlines()
                    res = TrialResult(t.name, "failed", error=(msg[-1] if msg else type(e).__name__)[:300])
                on_end(t, job, res, f"job {sj.job_id}")
            running = still
            if running:
                time.sleep(self.poll_s)
