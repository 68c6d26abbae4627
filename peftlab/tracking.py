"""The files of a run directory that record what happened (see DESIGN.md, "A run directory").

CSV logs are appended and flushed row by row, so a killed run keeps every row it
wrote; on resume, rows past the checkpoint's step are dropped so the file reads as
if the run had never stopped.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

LOSS_COLUMNS = ["epoch", "step", "train_loss", "learning_rate", "gpu_memory_mb", "sparsity"]


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("peftlab", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def git_commit() -> Optional[str]:
    """Commit of the peftlab source tree (and whether it had local changes), if it is a git checkout."""
    src = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src, capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover
            self.handleError(record)


def setup_logger(run_dir: Path, main_process: bool, console: bool = True) -> logging.Logger:
    log = logging.getLogger("peftlab")
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    log.propagate = False
    if main_process:
        fh = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(fh)
        if console:
            ch = _TqdmHandler()
            ch.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(ch)
    else:
        log.addHandler(logging.NullHandler())
    return log


def close_logger() -> None:
    """Detach and close the run logger's handlers (a finished run's train.log may be deleted
    afterwards, e.g. the scratch run of ``peftlab estimate``; later logging must not write to it)."""
    log = logging.getLogger("peftlab")
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()


def run_metadata(cfg, world_size: int) -> dict[str, Any]:
    meta = {
        **cfg.to_dict(),
        "_meta": {
            "versions": package_versions(),
            "git_commit": git_commit(),
            "command": sys.argv,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
            "world_size": world_size,
            "pid": os.getpid(),
        },
    }
    study = os.environ.get("PEFTLAB_STUDY_TRIAL")  # set by `peftlab sweep`: which study and trial this run is
    if study:
        try:
            meta["_meta"]["study"] = json.loads(study)
        except ValueError:
            meta["_meta"]["study"] = {"raw": study}
    return meta


def peak_memory_mb(device_type: str) -> tuple[float, str]:
    """Peak memory of this process: CUDA max allocated on GPU, max resident set size on CPU."""
    import torch

    if device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0, "cpu_max_rss"


def gpu_memory_mb() -> float:
    import torch

    return torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def quiet_libraries() -> None:
    """Silence library chatter that says nothing to a peftlab user (progress bars of file
    writes, deprecation notes about transformers internals)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
