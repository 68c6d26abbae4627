"""The run-directory reader that analysis goes through.

``peftlab.runs.RunDir`` (the shared run-format reader) is used when it exists; until it
lands, :class:`LocalRunDir` below reads the same files under the same method names, so
switching is a one-line import change and nothing else in ``peftlab.analysis`` names a file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pandas as pd


class LocalRunDir:
    """Read-only view of one run directory (the subset of ``peftlab.runs.RunDir`` that analysis uses)."""

    def __init__(self, path):
        self.path = Path(path)

    # paths ------------------------------------------------------------------------
    config_path = property(lambda self: self.path / "config.json")
    results_path = property(lambda self: self.path / "results_final.json")
    history_path = property(lambda self: self.path / "training_history.json")
    loss_log_path = property(lambda self: self.path / "loss_log.csv")
    module_log_path = property(lambda self: self.path / "module_metrics.csv")
    sparsity_log_path = property(lambda self: self.path / "sparsity_log.csv")
    allocation_path = property(lambda self: self.path / "allocation.json")
    gating_trace_path = property(lambda self: self.path / "gating_trace.csv")
    bounds_path = property(lambda self: self.path / "bounds_metrics.json")
    method_path = property(lambda self: self.path / "method.json")

    # readers ----------------------------------------------------------------------
    @staticmethod
    def _json(path: Path) -> Optional[Any]:
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def config_dict(self) -> Optional[dict]:
        d = self._json(self.config_path)
        if d is None:
            return None
        return {k: v for k, v in d.items() if k != "_meta"}

    def meta(self) -> Optional[dict]:
        d = self._json(self.config_path)
        return None if d is None else d.get("_meta", {})

    def results(self) -> Optional[dict]:
        return self._json(self.results_path)

    def history(self) -> Optional[dict]:
        return self._json(self.history_path)

    def bounds(self) -> Optional[dict]:
        return self._json(self.bounds_path)

    def allocation(self) -> Optional[dict]:
        return self._json(self.allocation_path)

    def structure(self) -> Optional[dict]:
        return self._json(self.method_path)

    def read_csv(self, name: str) -> Optional[pd.DataFrame]:
        path = self.path / name
        if not path.is_file() or path.stat().st_size == 0:
            return None
        return pd.read_csv(path)

    def is_finished(self) -> bool:
        r = self.results()
        return bool(r) and r.get("status") == "completed"


try:  # the shared reader, once the run-format issue has landed
    from ..runs import RunDir  # type: ignore[attr-defined]  # noqa: F401
except ImportError:  # pragma: no cover - depends on what is merged
    RunDir = LocalRunDir  # type: ignore[misc,assignment]


def open_run(path) -> Any:
    return RunDir(Path(path))
