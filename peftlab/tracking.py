"""The files of a run directory that record what happened (see DESIGN.md, "A run directory").

CSV logs are appended and flushed row by row, so a killed run keeps every row it
wrote; on resume, rows past the checkpoint's step are dropped so the file reads as
if the run had never stopped.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .checkpoints import atomic_write_text, strict_json_dumps

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


def write_json(path: Path, data: Any) -> None:
    """Write strict JSON atomically: NaN and +-inf become null (no bare NaN/Infinity that
    other JSON readers reject), tensors and numpy numbers become plain numbers."""
    atomic_write_text(Path(path), strict_json_dumps(data, indent=2) + "\n")


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Write a whole table atomically (empty cell for None); for result tables, not append logs."""
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    atomic_write_text(Path(path), buf.getvalue())


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


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


class CsvLog:
    """An append-only CSV whose header is fixed by the first row (or given)."""

    def __init__(self, path: Path, columns: Optional[list[str]] = None):
        self.path = Path(path)
        self.columns = columns

    def truncate_after(self, step: int) -> None:
        """Keep rows with ``step <= step`` (and drop a torn last line); used on resume."""
        if not self.path.is_file():
            return
        with open(self.path, newline="") as f:
            lines = f.read().splitlines(keepends=True)
        if not lines:
            return
        header = next(csv.reader([lines[0]]))
        self.columns = header
        keep = [lines[0] if lines[0].endswith("\n") else lines[0] + "\n"]
        si = header.index("step")
        for line in lines[1:]:
            if not line.endswith("\n"):
                break  # torn write
            row = next(csv.reader([line]))
            if len(row) != len(header):
                break
            if int(row[si]) <= step:
                keep.append(line)
        atomic_write_text(self.path, "".join(keep))

    def write(self, row: dict[str, Any]) -> None:
        new = not self.path.is_file() or self.path.stat().st_size == 0
        if self.columns is None:
            self.columns = list(row)
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            if new:
                w.writerow(self.columns)
            w.writerow([_fmt(row.get(c)) for c in self.columns])
            f.flush()


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.8g}"
    return str(v)


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
