"""Checkpoint policy, beside the loop: the run directory before training (:func:`prepare_run_dir`),
the progress a checkpoint restores (:class:`TrainerState`), ``best/`` (:func:`copy_best`,
:func:`repair_best`) and which checkpoints stay on disk (``output.keep_checkpoints``):


- ``all`` (default): the newest ``training.save_total_limit`` step checkpoints, every epoch
  checkpoint.
- ``limit``: the newest ``save_total_limit`` checkpoints of either kind.
- ``final_only``: ``limit`` while training; when the run has finished (test split evaluated,
  adapter exported), only the final checkpoint is kept and ``best/`` keeps its
  ``metrics.json`` (which step was best, with its metrics), so a study of many runs leaves
  one checkpoint and one adapter per run.

``best/`` never depends on a checkpoint: it holds its own copy of the model tensors and
method state (no optimizer state), so pruning never loses the best weights.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .. import checkpoints as ckpt
from ..errors import PeftlabError
from ..io import strict_json_dumps
from ..runs.identity import check_identity
from . import lock as run_lock

# the files of a checkpoint that best/ keeps: enough for load_run(which="best") and export --which best
BEST_FILES = ("model_state.safetensors", "method_state.pt", "method.json", ckpt.STATE_FILE)


def prune(root: Path, keep: Optional[int], mode: str) -> list[Path]:
    """Delete checkpoints under ``root`` beyond what ``mode`` keeps; return the deleted ones."""
    if keep is None:
        return []
    cks = ckpt.list_checkpoints(root)
    if mode == "all":
        cks = [c for c in cks if c[2].name.startswith("step-")]
    doomed = [p for _, _, p in cks[:-keep]] if len(cks) > keep else []
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def finish(run_dir: Path, mode: str, final_step: int) -> list[Path]:
    """After a finished run: with ``final_only``, keep only the final checkpoint and best/metrics.json."""
    if mode != "final_only":
        return []
    removed = []
    cks = ckpt.list_checkpoints(run_dir / "checkpoints")
    final = [p for s, _, p in cks if s == final_step][-1:] or [p for _, _, p in cks[-1:]]
    for _, _, p in cks:
        if p not in final:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    best = run_dir / "best"
    if best.is_dir():
        for f in best.iterdir():
            if f.name != "metrics.json":
                f.unlink() if f.is_file() else shutil.rmtree(f, ignore_errors=True)
                removed.append(f)
    return removed


@dataclass
class TrainerState:
    """Everything about progress that a checkpoint must restore (JSON-serialisable)."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    window_loss_sum: float = 0.0
    window_count: int = 0
    elapsed: float = 0.0
    epoch_elapsed: float = 0.0
    peak_memory_mb: float = 0.0
    world_size: int = 1
    best_value: Optional[float] = None
    best_step: Optional[int] = None
    history: dict = field(default_factory=dict)
    epoch_end: bool = False
    # evaluations (epoch ends and every eval_steps) and early stopping, see early_stop.py
    evaluations: int = 0
    evals_without_improvement: int = 0
    stopped_early: bool = False
    stopped_at_step: Optional[int] = None
    last_eval: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def prepare_run_dir(cfg) -> tuple[Path, Optional[Path]]:
    """Check the run directory before any expensive work; return (run_dir, checkpoint to resume)."""
    run_dir = Path(cfg.output.dir).expanduser()
    resume = cfg.training.resume_from
    has_run = (run_dir / "config.json").is_file()
    if run_dir.exists() and not run_dir.is_dir():
        raise PeftlabError(f"output.dir={str(run_dir)!r} exists and is a file; choose a directory path.")
    run_lock.acquire(run_dir)  # one writer per run directory, held until train() returns; fails at once naming the holder
    if has_run and resume is None:
        if cfg.output.overwrite:
            run_lock.clear_dir(run_dir)
        else:
            raise PeftlabError(
                f"{run_dir} already holds a run. Continue it with --training.resume_from=latest, choose another "
                "--output.dir, or pass --output.overwrite=true to delete it."
            )
    ck = None
    if resume is not None and not cfg.output.overwrite:
        _refuse_diverged(run_dir)
    if resume is not None:
        ck = ckpt.resolve(resume, run_dir)
        if ck is None and (run_dir / "results_final.json").is_file() and not cfg.output.overwrite:
            raise PeftlabError(
                f"{run_dir} holds a finished run but no checkpoint to resume from; resuming would train again from step 0 "
                "and overwrite its results. Choose another --output.dir, or pass --output.overwrite=true to delete it."
            )
        if ck is not None:
            check_identity(ck, run_dir, cfg)  # the checkpoint's own config and the run's config.json
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, ck


def _refuse_diverged(run_dir: Path) -> None:
    """A run that diverged is not resumed (and is not "finished"): resume is exact, so it would
    repeat the same steps to the same NaN."""
    try:
        res = json.loads((run_dir / "results_final.json").read_text())
    except (OSError, ValueError):
        return
    if not isinstance(res, dict) or res.get("status") != "diverged":
        return
    d = res.get("diverged") if isinstance(res.get("diverged"), dict) else {}
    last = d.get("last_finite_checkpoint")
    kept = f" Its last finite checkpoint, {last}, is kept for inspection." if last else ""
    raise PeftlabError(
        f"{run_dir} diverged at step {d.get('step', res.get('global_step', '?'))} (status `diverged` in results_final.json"
        f"{': ' + str(d['what']) if d.get('what') else ''}); resuming it would repeat the same steps to the same NaN, since "
        f"resume changes nothing that decides the numbers.{kept} Train again with other settings (e.g. a lower "
        f"training.learning_rate) into a new directory: `peftlab train {run_dir / 'config.json'} --output.dir=NEW_DIR "
        "--training.learning_rate=...`."
    )


def repair_best(run_dir: Path, state: TrainerState, best_name: str) -> Optional[Path]:
    """A kill between committing epoch-N and copying it to best/ leaves best/ stale: redo the copy.
    Returns the checkpoint copied from (None: nothing to repair)."""
    for leftover in (".tmp-best", ".old-best"):
        if (run_dir / leftover).exists():
            shutil.rmtree(run_dir / leftover, ignore_errors=True)
    st = state
    if st.best_step is None:
        return None
    best_metrics = run_dir / "best" / "metrics.json"
    current = json.loads(best_metrics.read_text()).get("step") if best_metrics.is_file() else None
    if current == st.best_step:
        return None
    for step, is_epoch, path in ckpt.list_checkpoints(run_dir / "checkpoints"):
        if step == st.best_step:
            hist = st.history
            i = hist.get("step", []).index(step) if step in hist.get("step", []) else -1
            row = {k: v[i] for k, v in hist.items()} if i >= 0 else {"step": step}
            copy_best(run_dir, path, row, best_name)
            return path
    return None


def copy_best(run_dir: Path, path: Path, row: dict, best_name: str) -> None:
    """Copy checkpoint ``path``'s weights and method state (not the optimizer: best/ is for loading,
    not resuming) to ``run_dir/best`` with ``row`` (step, metrics) as ``metrics.json``, atomically."""
    best = run_dir / "best"
    tmp = run_dir / ".tmp-best"
    if tmp.exists():
        shutil.rmtree(tmp)

    tmp.mkdir()
    for f in BEST_FILES:
        if (path / f).is_file():
            shutil.copy2(path / f, tmp / f)
    if ckpt.is_sharded(path):  # a sharded run's weights (torch.distributed.checkpoint), without the optimizer's
        shutil.copytree(path / ckpt.SHARDED_MODEL, tmp / ckpt.SHARDED_MODEL)
    (tmp / "metrics.json").write_text(strict_json_dumps({**row, "best_metric": best_name}, indent=2))
    ckpt.commit(tmp, best)
