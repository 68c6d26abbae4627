"""Which checkpoints stay on disk (``output.keep_checkpoints``).

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

import shutil
from pathlib import Path
from typing import Optional

from .. import checkpoints as ckpt

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
