"""One run directory, one writer: an exclusive lock held for the whole run.

``acquire(run_dir)`` takes an advisory ``fcntl.flock`` on ``RUN_DIR/.lock`` and writes the
holder (host, pid, start time) into it. A second ``peftlab train`` on the same directory (a
fresh start, ``--output.overwrite=true`` or ``--training.resume_from=latest``) fails at once
with a message naming the holder, instead of interleaving logs and checkpoints. The
operating system drops the lock when the holder exits, however it exits (SIGKILL
included), so a killed run never leaves a stale lock; the file itself stays and is harmless.

Within one process the lock is re-entrant (a test or a study runner that builds a second
trainer for a directory it already holds keeps the lock it has). ``flock`` is reliable on
local file systems; on network file systems that do not support it, the lock may not
exclude writers on other hosts.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from ..errors import PeftlabError

LOCK_FILE = ".lock"
_held: dict[str, int] = {}  # resolved run dir -> open file descriptor holding the lock


def _key(run_dir: Path) -> str:
    return str(Path(run_dir).expanduser().resolve())


def acquire(run_dir: Path) -> None:
    """Lock ``run_dir`` (created if needed) for this process, or raise naming the holder."""
    import fcntl

    run_dir = Path(run_dir).expanduser()
    key = _key(run_dir)
    if key in _held:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise PeftlabError(f"Cannot create the run directory lock {run_dir / LOCK_FILE}: {e.strerror or e}. "
                           "Choose an output.dir you can write to.") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.read(fd, 4096).decode() or "{}")
        except (OSError, ValueError):
            holder = {}
        os.close(fd)
        who = (f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {holder.get('started', '?')}"
               f"{', command: ' + ' '.join(holder['command']) if holder.get('command') else ''})")
        raise PeftlabError(
            f"{run_dir} is in use by another peftlab run: {who}. Two writers would interleave its logs and checkpoints. "
            "Wait for it to finish (or stop it), then resume with --training.resume_from=latest; or choose another --output.dir."
        ) from None
    import sys

    info = {"host": platform.node(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": sys.argv[:8]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[key] = fd


def release(run_dir: Path) -> None:
    """Drop this process's lock on ``run_dir`` (no-op when it holds none)."""
    fd = _held.pop(_key(run_dir), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def clear_dir(run_dir: Path) -> None:
    """Delete everything in ``run_dir`` except its lock (``--output.overwrite=true``)."""
    import shutil

    for p in Path(run_dir).iterdir():
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
