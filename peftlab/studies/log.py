"""The study's own log: ``study.log`` for people, ``study.jsonl`` for programs, and the
duration and clock formats both use."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Optional


def fmt_duration(s: float) -> str:
    """``1d 2h 3m`` / ``2h 3m`` / ``3m 4s`` / ``4s``."""
    s = int(round(max(s, 0)))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h}h {m}m"
    if h:
        return f"{h}h {m}m"
    return f"{m}m {s}s" if m else f"{s}s"


def fmt_clock(t: float) -> str:
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
    """Every record of ``study.jsonl``, oldest first (a line torn by a kill is skipped)."""
    p = Path(study_dir) / "study.jsonl"
    out = []
    if p.is_file():
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def gave_up(events: list[dict], name: str, identity: str, max_same: int) -> Optional[str]:
    """The error when the run's last ``max_same`` attempts (same settings) failed identically.

    A sweep that did not retry a run records an ``end`` with outcome ``gave-up``; that is no
    attempt, so it neither counts nor breaks the run of failures before it (the next sweep does
    not retry the run either; ``--retry-failed`` does)."""
    ends = [e for e in events if e.get("event") == "end" and e.get("run") == name and e.get("identity") == identity
            and e.get("outcome") != "gave-up"]
    tail = []
    for e in reversed(ends):
        if e.get("outcome") != "failed":
            break
        tail.append(e.get("error") or "")
    if len(tail) >= max_same and len(set(tail[:max_same])) == 1:
        return tail[0]
    return None
