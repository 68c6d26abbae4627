"""``peftlab sweep`` and ``peftlab estimate``."""

from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path

from ..config import load_config, parse_overrides
from ..errors import PeftlabError
from ..io import write_json
from ..studies.estimate import estimate_config, estimate_record, estimate_study, print_estimate
from ..studies.executors import LocalExecutor, SubmititExecutor, cpu_threads
from ..studies.expand import expand
from ..studies.runner import format_table, plan, sweep
from ..studies.spec import is_study_file, load_study
from .table import COMMANDS

SWEEP_EPILOG = ("Examples:\n"
                "  peftlab sweep configs/studies/compare.yaml --preset-scale=cpu --dry-run\n"
                "  peftlab sweep configs/studies/subspace_allocation.yaml --gpus 0,1,2,3\n"
                "  peftlab sweep configs/studies/sparse_adapters.yaml --engine=slurm --slurm.slurm_partition=gpu\n"
                "Overrides after the study file (--section.key=value) apply to every run.")


def _load(args, extra: list[str]):
    spec = load_study(getattr(args, "study", None) or args.target, args.preset_scale,
                      follow_ups=not getattr(args, "skip_follow_ups", False), commands=set(COMMANDS))
    slurm = {}
    ov = {}
    for k, v in parse_overrides(extra).items():
        if k.startswith("slurm."):
            slurm[k[len("slurm."):]] = v
        else:
            ov[k] = v
    if ov:
        spec.cli_overrides = {**spec.cli_overrides, **ov}
    if slurm:
        spec.execution.slurm = {**spec.execution.slurm, **slurm}
    cpu_runs = getattr(args, "cpu_runs", None)
    if cpu_runs is not None:
        if cpu_runs < 1:
            raise PeftlabError(f"--cpu-runs {cpu_runs}: the number of runs at once on the CPU must be at least 1 (1: one run at a "
                               "time on every core; 2 on a laptop runs two small runs side by side, each on half the cores).")
        spec.execution.cpu_runs = cpu_runs
    output = Path(args.output_dir) if getattr(args, "output_dir", None) else None
    trials = expand(spec, output)
    only = getattr(args, "only", None)
    if only:
        pats = [p.strip() for p in only.split(",") if p.strip()]
        trials = [t for t in trials if any(fnmatch.fnmatchcase(t.name, p) for p in pats)]
        if not trials:
            raise PeftlabError(f"--only {only!r} matches no run of the study; `peftlab sweep {getattr(args, 'study', '')} --dry-run` lists the names.")
    return spec, trials


def _gpus(arg: str | None) -> list[str] | None:
    if arg is None:
        return None
    gpus = [g.strip() for g in arg.split(",") if g.strip()]
    if not gpus:
        raise PeftlabError("--gpus needs GPU indices, e.g. --gpus 0,1,2,3.")
    return gpus


def make_executor(args, spec):
    if args.engine == "local":
        return LocalExecutor(_gpus(args.gpus), spec.execution.processes_per_run, spec.execution.cpu_runs)
    if args.gpus:
        raise PeftlabError("--gpus is for --engine=local; on Slurm ask for GPUs with --slurm.gpus_per_node=N.")
    return SubmititExecutor("local" if args.engine == "submitit-local" else "slurm", spec.execution.slurm)


def cmd_sweep(args, extra: list[str]) -> int:
    spec, trials = _load(args, extra)
    if args.dry_run:
        rows = plan(spec, trials, args.retry_failed)
        where = trials[0].run_dir.parent if trials else spec.output_dir
        print(f"study {spec.study.name}{f' (scale {spec.scale})' if spec.scale else ''} -> {where}")
        print(format_table(rows))
        return 0
    executor = make_executor(args, spec)
    try:
        summary = sweep(spec, trials, executor, retry_failed=args.retry_failed)
    except KeyboardInterrupt:
        print("interrupted; run the same `peftlab sweep` command again: finished runs are skipped, the interrupted one resumes",
              file=sys.stderr)
        return 130
    if not summary.ok:
        print(f"{len(summary.failures)} failed: {', '.join(summary.failures)}; see study.log", file=sys.stderr)
        return 1
    return 0


def cmd_estimate(args, extra: list[str]) -> int:
    if args.steps < 1:
        raise PeftlabError(f"estimate --steps {args.steps}: the number of optimizer steps to time must be at least 1 "
                           "(default 4; more steps give a steadier per-step time).")
    gpus = _gpus(args.gpus)
    # every GPU divides the total: a run of k processes is probed in one, with k times its steps per process
    slots = max(len(gpus or [None]), 1)
    if is_study_file(args.target):
        spec, trials = _load(args, extra)
        if gpus:
            slots = max(len(gpus) // spec.execution.processes_per_run, 1)
            # runs side by side on one GPU (--gpus 0,0,0,0): their slowdown is measured (a probe beside copies of itself)
            ways = max(gpus.count(g) for g in gpus) if spec.execution.processes_per_run == 1 else 1
            rows = estimate_study(spec, trials, steps=args.steps, slots=slots, sharing=ways)
        else:  # execution.cpu_runs runs side by side, each probed on its share of the cores
            slots = spec.execution.cpu_runs
            rows = estimate_study(spec, trials, steps=args.steps, slots=slots, threads=cpu_threads(slots))
    else:
        if args.preset_scale:
            raise PeftlabError("--preset-scale applies to study files; this is a run config.")

        cfg = load_config(args.target, extra)
        rows = estimate_config(cfg, steps=args.steps)
    print_estimate(rows, slots=slots)
    if gpus and len(set(gpus)) < len(gpus) and not any(r["status"] == "sharing" for r in rows):
        print(f"note: --gpus {','.join(gpus)} puts several runs on one GPU, and their slowdown was not measured (nothing to "
              f"probe, or the probe beside copies of itself did not run), so the wall time on {slots} slots assumes runs "
              "sharing a GPU do not slow each other. They do: four DistilBERT-base runs on one H100 each took 1.2-2.4x "
              "their time alone (BENCHMARKS.md, 2026-12-07).")
    if args.json:
        write_json(Path(args.json), estimate_record(rows, slots))
    return 0


def add_sweep(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="run a study: a grid of runs x seeds, skipping finished runs and resuming interrupted ones",
        description="Expand a study file (configs/studies/*.yaml) into runs and train each in its own process. Finished runs are "
                    "skipped, interrupted ones resume from their last checkpoint, failures are recorded and the study goes on; "
                    "study.log and study.jsonl in the study directory record every run. Killing the sweep and starting it "
                    "again completes every run exactly once.",
        epilog=SWEEP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="study YAML file")
    p.add_argument("--dry-run", action="store_true", help="print the run table (name, overrides, status: done / partial / new) and stop")
    p.add_argument("--preset-scale", default=None, help="a scale the study defines, e.g. cpu: a small variant that runs on a laptop CPU")
    p.add_argument("--output-dir", default=None, help="study directory (default: study.output_dir of the file)")
    p.add_argument("--gpus", default=None, help="comma-separated GPU indices: one run per GPU at a time (or per group of "
                                                "execution.processes_per_run GPUs); an index given twice is two slots on that "
                                                "GPU (--gpus 0,0: two small runs side by side on GPU 0)")
    p.add_argument("--cpu-runs", type=int, default=None, help="without --gpus: runs at once on this machine, each on its share "
                                                              "of the CPU cores (default: the study's execution.cpu_runs, else 1)")
    p.add_argument("--engine", choices=["local", "slurm", "submitit-local"], default="local",
                   help="local (default): this machine; slurm: one Slurm job per run through submitit (--slurm.KEY=VALUE sets "
                        "submitit parameters); submitit-local: submitit's local executor, to try the Slurm path here")
    p.add_argument("--only", default=None, help="comma-separated run names or patterns (d1000_*): run only these")
    p.add_argument("--skip-follow-ups", action="store_true", help="train only; leave out the study's follow-up steps (bounds, analyze)")
    p.add_argument("--retry-failed", action="store_true", help="retry runs that failed the same way too often")
    p.set_defaults(func=cmd_sweep)


def add_estimate(subparsers) -> None:
    e = subparsers.add_parser(
        "estimate", help="time a few real optimizer steps and print the time per run and in total",
        description="Time a few real optimizer steps of each distinct configuration of a study (or of one run config) on this "
                    "device, extrapolate to each run's full number of steps, add setup, evaluation, checkpoint and method "
                    "overheads, time the study's follow-ups (bounds, profile, analyze) for real on the probe runs, and print "
                    "per-run and total estimates with the expected completion time.")
    e.add_argument("target", help="study YAML or run config YAML")
    e.add_argument("--preset-scale", default=None, help="scale of the study to estimate")
    e.add_argument("--output-dir", default=None, help="study directory (runs already done there count as zero)")
    e.add_argument("--only", default=None, help="comma-separated run names or patterns: estimate only these")
    e.add_argument("--steps", type=int, default=4, help="optimizer steps timed per distinct configuration (default 4)")
    e.add_argument("--gpus", default=None, help="GPUs the sweep will use (the total is divided among them); an index given "
                                                "twice (--gpus 0,0) also measures how much runs sharing that GPU slow each other")
    e.add_argument("--cpu-runs", type=int, default=None, help="without --gpus: runs the sweep will run at once on the CPU "
                                                              "(default: the study's execution.cpu_runs, else 1)")
    e.add_argument("--json", default=None, metavar="PATH",
                   help="also write the estimate as JSON (per run: seconds, training and follow-up shares; the total): "
                        "scripts/results_page.py --estimate compares it with the measured run times")
    e.add_argument("--skip-follow-ups", action="store_true",
                   help="time training only; by default each per-run follow-up (bounds, profile) is run and timed on the probe's run "
                        "and the study steps (analyze) once on the probe runs")
    e.set_defaults(func=cmd_estimate)
