"""Start a command that dies with the sweep that started it (Linux): ``python -S orphan_guard.py PARENT_PID CMD...``.

The sweep runs this file by path, so it imports nothing of peftlab (and, with ``-S``, nothing from
site-packages): it asks the kernel for SIGKILL when its parent goes (``PR_SET_PDEATHSIG``, which
survives ``exec``), checks that the parent is still the sweep that started it (``PARENT_PID``; a
sweep killed in between has already gone), then replaces itself with ``CMD``. The training process,
torchrun or accelerate and their workers' parent then all go with a killed sweep.

This replaces ``subprocess.Popen(preexec_fn=...)``: Python code between ``fork`` and ``exec`` is unsafe
in a process with threads, and a sweep with several runs at once (``--cpu-runs``, ``--gpus``) starts
each run from its own thread (the child could crash or hang before it ran anything).
"""

import ctypes
import os
import signal
import sys


def main(argv: list[str]) -> None:
    parent, cmd = int(argv[0]), argv[1:]
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux's libc: run without the guard
    if os.getppid() != parent:  # the sweep went before the guard was set
        sys.exit(f"peftlab: the sweep that started this run (pid {parent}) has gone; not starting {cmd[0]}")
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
