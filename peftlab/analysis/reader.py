"""The run-directory reader that analysis goes through: the shared ``peftlab.runs.RunDir``.

Nothing else in ``peftlab.analysis`` names a run-directory file; every read goes through
:func:`open_run`.
"""

from __future__ import annotations

from pathlib import Path

from ..rundir import RunDir


def open_run(path) -> RunDir:
    return RunDir(Path(path))
