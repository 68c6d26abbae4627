"""What a transformers model or an exported adapter records about itself: class names, a portable base name."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..io import atomic_write_text
from .registry import OFFLINE_MODELS


def set_label_names(model, label_names) -> None:
    """Give a classification model the dataset's class names (``id2label``/``label2id``), so a
    saved or merged model says ``negative``/``positive`` instead of ``LABEL_0``/``LABEL_1``."""
    config = getattr(model, "config", None)
    if not label_names or config is None or not hasattr(config, "id2label"):
        return
    if len(label_names) != getattr(config, "num_labels", len(label_names)):
        return  # a head wider than the dataset's classes (model.num_labels): keep the generic names
    config.id2label = {i: str(n) for i, n in enumerate(label_names)}
    config.label2id = {str(n): i for i, n in enumerate(label_names)}


def portable_base_name(cfg, run_dir: Path, saved_base: Path | None = None) -> str:
    """What an exported adapter records as ``base_model_name_or_path``: the hub name for hub
    models, a path relative to the run directory for local folders and for the base saved
    inside the run (built-in tiny models), peftlab's name for offline packaged models (rebuilt
    by :func:`peftlab.export.load_base`). Never an absolute path into this machine's environment."""
    name = cfg.model.name
    if saved_base is not None:
        return os.path.relpath(saved_base, run_dir)
    if name in OFFLINE_MODELS:
        return name
    if os.path.isdir(os.path.expanduser(name)):
        return os.path.relpath(os.path.abspath(os.path.expanduser(name)), os.path.abspath(run_dir))
    return name


def make_adapter_portable(adapter_dir: Path, cfg, run_dir: Path, saved_base: Path | None = None) -> None:
    """Rewrite ``adapter_config.json``'s ``base_model_name_or_path`` with :func:`portable_base_name`."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = portable_base_name(cfg, Path(run_dir), saved_base)
    if cfg.model.revision:
        data["revision"] = cfg.model.revision
    atomic_write_text(path, json.dumps(data, indent=2))
