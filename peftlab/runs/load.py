"""load_run: a trained run rebuilt from its directory alone (see :mod:`peftlab.runs`)."""


from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..build import build
from ..data import build_datasets, load_raw
from ..errors import PeftlabError
from ..evaluation import evaluate
from ..methods import METHODS
from ..rundir import RunDir


@dataclass
class LoadedRun:
    """A trained run rebuilt from its directory by :func:`load_run`."""

    config: Any
    model: Any
    tokenizer: Any
    method: Any
    task: str
    num_labels: Optional[int]
    run: RunDir
    checkpoint: Optional[Path]
    device: Any = "cpu"

    def evaluate(self) -> dict[str, float]:
        """Validation metrics exactly as training computed them (reads the validation data)."""
        import torch


        torch.manual_seed(self.config.training.seed)
        raw = load_raw(self.config)
        _, val_ds, collate = build_datasets(raw, self.tokenizer, self.config)
        return evaluate(self.model, val_ds, collate, self.config, self.task, self.num_labels, torch.device(self.device))


def load_run(path, which: str = "final", device: str = "cpu") -> LoadedRun:
    """Rebuild a trained run: config, model (eval mode, method applied, weights of ``which``
    loaded), tokenizer, method and task. Reads no training data and no network beyond what the
    base model itself needs (a hub model loads as in training; tiny and ``from_scratch``
    models are rebuilt from the config and seed).

    Args:
        path: the run directory.
        which: ``final``, ``best``, ``latest``, ``step-N`` or ``epoch-N``.
        device: where the model goes (``cpu``, ``cuda``, ``cuda:1`` ...).
    """
    import torch


    run = RunDir(path).require()
    cfg = run.config()
    meta = run.meta() or {}
    checkpoint = run.checkpoint(which)
    task = meta.get("task") or (cfg.model.task if cfg.model.task != "auto" else None)
    if task is None:
        raise PeftlabError(f"{run.config_path} does not record the task (_meta.task); the run predates load_run. "
                           "Set model.task in its config.json to causal_lm or classification.")
    num_labels = meta.get("num_labels") or cfg.model.num_labels
    structure = run.structure(checkpoint)
    if structure is None:  # a run written before method.json existed

        structure = METHODS[cfg.method].legacy_structure(run.path)
    built = build(cfg, task=task, num_labels=num_labels, data=False, structure=structure, optimizer=False,
                  device=device, run_dir=None)
    from safetensors.torch import load_file

    model, method = built.model, built.method
    method.load_model_state(model, load_file(str(checkpoint / "model_state.safetensors"), device=str(torch.device(device))))
    method.load_state_dict(torch.load(checkpoint / "method_state.pt", weights_only=True, map_location="cpu"))
    model.eval()
    return LoadedRun(config=cfg, model=model, tokenizer=built.tokenizer, method=method, task=task, num_labels=num_labels,
                     run=run, checkpoint=checkpoint, device=device)
