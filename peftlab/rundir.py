"""The run directory's file names and its reader (see docs/run-directory.md).

    run = RunDir("runs/x")
    run.results()["final"], run.history()["val_loss"], run.read_csv("loss_log.csv"), run.config()

Every command and package that reads or writes a run's files names them here. Rebuilding the
trained model (``load_run``) is a floor higher, in :mod:`peftlab.runs`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from .checkpoints import is_complete, list_checkpoints
from .config import DEFAULT_METHOD, config_from_dict, identity_sections
from .errors import ConfigError, PeftlabError


class RunDir:
    """Names every file of a run directory and reads them (None when a file is absent)."""

    CONFIG = "config.json"
    RESULTS = "results_final.json"
    HISTORY = "training_history.json"
    LOSS_LOG = "loss_log.csv"
    EVAL_LOG = "eval_log.csv"
    MODULE_LOG = "module_metrics.csv"
    SPARSITY_LOG = "sparsity_log.csv"
    MEMORY_LOG = "epoch_peak_memory.csv"
    ALLOCATION = "allocation.json"
    GATING_TRACE = "gating_trace.csv"
    BOUNDS = "bounds_metrics.json"
    METHOD = "method.json"
    TRAIN_LOG = "train.log"

    def __init__(self, path):
        self.path = Path(path).expanduser()

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------ paths
    config_path = property(lambda self: self.path / self.CONFIG)
    results_path = property(lambda self: self.path / self.RESULTS)
    history_path = property(lambda self: self.path / self.HISTORY)
    loss_log_path = property(lambda self: self.path / self.LOSS_LOG)
    eval_log_path = property(lambda self: self.path / self.EVAL_LOG)
    module_log_path = property(lambda self: self.path / self.MODULE_LOG)
    sparsity_log_path = property(lambda self: self.path / self.SPARSITY_LOG)
    memory_log_path = property(lambda self: self.path / self.MEMORY_LOG)
    allocation_path = property(lambda self: self.path / self.ALLOCATION)
    gating_trace_path = property(lambda self: self.path / self.GATING_TRACE)
    bounds_path = property(lambda self: self.path / self.BOUNDS)
    method_path = property(lambda self: self.path / self.METHOD)
    train_log_path = property(lambda self: self.path / self.TRAIN_LOG)
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    best_dir = property(lambda self: self.path / "best")
    adapter_dir = property(lambda self: self.path / "adapter")
    model_dir = property(lambda self: self.path / "model")
    base_model_dir = property(lambda self: self.path / "base_model")

    # ---------------------------------------------------------------- readers
    @staticmethod
    def _json(path: Path) -> Any:
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PeftlabError(f"{path} is not valid JSON ({e}); the file was damaged or is being written.") from None

    def exists(self) -> bool:
        return self.config_path.is_file()

    def require(self) -> "RunDir":
        if not self.exists():
            raise PeftlabError(f"{self.path} is not a peftlab run directory (no {self.CONFIG}); give the output.dir of a `peftlab train` run.")
        return self

    def config_dict(self) -> Optional[dict]:
        """The resolved configuration as stored, without the ``_meta`` provenance."""
        data = self._json(self.config_path)
        if data is None:
            return None
        if not isinstance(data, dict):
            raise PeftlabError(f"{self.config_path} holds a JSON {type(data).__name__}, not the object `peftlab train` writes; "
                               "the file was replaced or damaged. Copy a checkpoint's config.json back "
                               f"(cp {self.path}/checkpoints/<name>/config.json {self.config_path}).")
        return {k: v for k, v in data.items() if k != "_meta"}

    def meta(self) -> Optional[dict]:
        """The ``_meta`` provenance of config.json (versions, git commit, task, num_labels, resumes ...)."""
        data = self._json(self.config_path)
        return None if data is None else data.get("_meta", {})

    def config(self):
        """A validated RunConfig of the run, with keys this run predates filled from defaults.
        Sections of other methods that no longer validate (renamed or removed keys) are
        replaced by their defaults: only the core and the run's own sections must be valid."""
        raw = self.config_dict()
        if raw is None:
            return None
        try:
            return config_from_dict(raw)
        except ConfigError:
            method = raw.get("method", DEFAULT_METHOD)
            keep = set(identity_sections(method)) if isinstance(method, str) else set()
            return config_from_dict({k: v for k, v in raw.items() if k == "method" or k in keep})

    def results(self) -> Optional[dict]:
        return self._json(self.results_path)

    def history(self) -> Optional[dict]:
        return self._json(self.history_path)

    def bounds(self) -> Optional[dict]:
        return self._json(self.bounds_path)

    def allocation(self) -> Optional[dict]:
        return self._json(self.allocation_path)

    def structure(self, checkpoint: Optional[Path] = None) -> Optional[dict]:
        """The method's structure record: the checkpoint's ``method.json`` when given, else the run's."""
        if checkpoint is not None and (Path(checkpoint) / self.METHOD).is_file():
            return self._json(Path(checkpoint) / self.METHOD)
        return self._json(self.method_path)

    def read_csv(self, name: str):
        """A CSV log of the run (``loss_log.csv``, ``module_metrics.csv`` ...) as a pandas DataFrame."""
        import pandas as pd

        path = self.path / name
        if not path.is_file():
            return None
        return pd.read_csv(path)

    def is_finished(self) -> bool:
        res = self.results()
        return bool(res) and res.get("status") == "completed"

    # ------------------------------------------------------------ checkpoints
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return [p for _, _, p in list_checkpoints(self.checkpoints_dir)]

    def checkpoint(self, which: str = "final") -> Path:
        """The checkpoint directory for ``which``: ``final`` (end of a finished run), ``latest``
        (newest complete), ``best`` (best/), ``step-N`` or ``epoch-N``."""
        self.require()
        cks = list_checkpoints(self.checkpoints_dir)
        names = [p.name for _, _, p in cks]
        if which == "final":
            if not self.is_finished():
                raise PeftlabError(f"{self.path} has not finished training (no completed {self.RESULTS}); load which='latest' "
                                   "for its newest checkpoint, or resume it with --training.resume_from=latest.")
            step = int(self.results().get("global_step", -1))
            at = [p for s, _, p in cks if s == step]
            if not at:
                raise PeftlabError(f"{self.path} has no checkpoint of its final step {step} (checkpoints: {', '.join(names) or 'none'}); "
                                   "it was deleted. Load one of the others with which='step-N' / 'epoch-N'.")
            return at[-1]  # the epoch checkpoint sorts after a step checkpoint of the same step
        if which == "latest":
            if not cks:
                raise PeftlabError(f"{self.path} has no complete checkpoint under {self.checkpoints_dir}.")
            return cks[-1][2]
        if which == "best":
            if not is_complete(self.best_dir):
                raise PeftlabError(f"{self.path} has no best/ checkpoint (it is written at the first epoch end).")
            return self.best_dir
        p = self.checkpoints_dir / which
        if not is_complete(p):
            raise PeftlabError(f"which={which!r} is not a complete checkpoint of {self.path}. Use final, best, latest or one of: "
                               f"{', '.join(names) or '(none)'}.")
        return p
