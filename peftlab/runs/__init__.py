"""The run directory as a format, with one reader.

    from peftlab.runs import RunDir, load_run

    run = RunDir("runs/x")
    run.results()["final"], run.history()["val_loss"], run.read_csv("loss_log.csv")
    loaded = load_run("runs/x", which="final")      # or "best", "latest", "step-40", "epoch-2"
    loaded.model(**batch)                            # eval mode, method applied, weights loaded

``load_run`` needs nothing but the directory: the config (``config.json``), the method's
structure record (``method.json`` in the checkpoint) and the checkpoint's trained tensors. The
frozen base is rebuilt from the config and seed (or loaded by name, as training did); no
training data is read. See docs/run-directory.md.
"""

from __future__ import annotations

from ..rundir import RunDir
from .identity import VOLATILE, check_identity, fingerprint, identity_diff, identity_sections, is_volatile, run_identity
from .load import LoadedRun, load_run

__all__ = ["RunDir", "LoadedRun", "load_run", "run_identity", "identity_diff", "identity_sections", "fingerprint", "VOLATILE",
           "is_volatile", "check_identity"]
