"""load_run: a trained run rebuilt from its directory alone (see :mod:`peftlab.runs`)."""


from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..build import build
from ..checkpoints import CONFIG_FILE, CheckpointError, read_model_state, safe_torch_load, verify
from ..data import build_datasets, load_raw
from ..errors import PeftlabError
from ..evaluation import evaluate, mixed_precision_autocast
from ..methods import METHODS
from ..rundir import RunDir
from .identity import identity_diff


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
        """Validation metrics exactly as training computed them (reads the validation data), under the
        run's mixed precision (``system.dtype``) as the loop's evaluation was."""
        import torch

        torch.manual_seed(self.config.training.seed)
        raw = load_raw(self.config)
        _, val_ds, collate = build_datasets(raw, self.tokenizer, self.config)
        return evaluate(self.model, val_ds, collate, self.config, self.task, self.num_labels, torch.device(self.device),
                        autocast=mixed_precision_autocast(self.config.system.dtype, self.device))


def damaged_fix(run: RunDir, choose: Optional[str]) -> Callable[[Optional[Path]], str]:
    """What a reader of ``run`` tells the user to do about a damaged checkpoint (for
    :func:`peftlab.checkpoints.verify`): read the previous good one where the reader can choose
    (``choose``, e.g. ``"--which {name}"``), or let resume write the damaged one again."""

    def fix(good: Optional[Path]) -> str:
        if good is None:
            return ("No earlier checkpoint of this run verifies: restore the run directory from a backup, or train it again "
                    f"into a new directory with `peftlab train {run.config_path} --output.dir=NEW_DIR`.")
        ways = [f"read the previous good checkpoint, {good.name}, with {choose.format(name=good.name)}"] if choose else []
        ways.append(f"write the damaged one again with `peftlab train --resume {run.path}`, which continues from {good.name} "
                    "(the newest checkpoint that verifies) to the same numbers")
        return "To go on, " + ", or ".join(ways) + "."

    return fix


def require_final(run: RunDir, choose: Optional[str], what: str = "read") -> None:
    """Before a reader takes the ``final`` checkpoint: a clear error for a run that diverged or has
    not finished (killed, or still training), saying what can be done with the commands at hand:
    ``choose`` is how this reader picks another checkpoint (``"--which {name}"``, or None when it
    cannot), ``what`` the reader's verb."""
    res = run.results()
    status = res.get("status") if isinstance(res, dict) else None
    if status == "completed":
        return
    cks = run.checkpoints()
    if status == "diverged":
        d = res.get("diverged") if isinstance(res.get("diverged"), dict) else {}
        last = d.get("last_finite_checkpoint")
        msg = (f"{run.path} diverged at step {d.get('step', res.get('global_step', '?'))} (status `diverged` in "
               f"{run.RESULTS}), so it has no final weights to {what}, and resuming it would repeat the same steps to the same "
               "NaN. ")
        if last and choose:
            msg += f"Its last finite checkpoint is {Path(last).name}: {what} it with {choose.format(name=Path(last).name)}, or train "
        else:
            msg += "Train "
        msg += (f"again with other settings (e.g. a lower training.learning_rate) into a new directory: "
                f"`peftlab train {run.config_path} --output.dir=NEW_DIR --training.learning_rate=...`.")
        raise PeftlabError(msg)
    where = f" (its newest checkpoint is {cks[-1].name})" if cks else " (it has no checkpoint yet)"
    msg = (f"{run.path} has not finished training: there is no completed {run.RESULTS}{where}; it was stopped before the end, "
           f"or is still training. Continue it with `peftlab train --resume {run.path}`")
    if cks and choose:
        msg += f", or {what} its newest checkpoint as it is with {choose.format(name='latest')}"
    raise PeftlabError(msg + ".")


def check_checkpoint_config(run: RunDir, checkpoint: Path) -> None:
    """Refuse a run whose config.json no longer describes the run that wrote ``checkpoint`` (the
    checkpoint carries its own copy of the configuration): an edited ``lora.r`` would otherwise
    build a model the saved tensors do not fit, or one they fit by accident."""
    own = Path(checkpoint) / CONFIG_FILE
    if not own.is_file():  # written before checkpoints carried their configuration
        return
    try:
        saved = json.loads(own.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{own} is unreadable ({e}); the checkpoint {checkpoint} is damaged.") from None
    # problems of the stored configurations themselves (keys this version lacks) are not differences here
    diff = [d for d in identity_diff(saved, run.config_dict()) if not d.startswith("stored config:")]
    if diff:
        raise PeftlabError(
            f"{run.config_path} no longer matches the configuration that checkpoint {checkpoint} was trained with "
            f"({'; '.join(f'{d} in config.json' for d in diff[:6])}{'; ...' if len(diff) > 6 else ''}): config.json was edited "
            f"after training, and the model it describes is not the one trained. Restore it: the checkpoint's own copy is {own} "
            "(keep the `_meta` entry of config.json). To train the new setting, start a new run with "
            f"`peftlab train {run.config_path} --output.dir=NEW_DIR`."
        )


def _check_shapes(model: Any, state: dict, checkpoint: Path) -> None:
    """A saved tensor whose shape differs from the rebuilt model's is a clear error (the run's
    configuration and its checkpoint disagree), not a size-mismatch traceback from copy_."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    bad = [(k, tuple(v.shape), tuple(params[k].shape)) for k, v in state.items() if k in params and params[k].shape != v.shape]
    if bad:
        k, saved, built = bad[0]
        raise PeftlabError(
            f"Checkpoint {checkpoint} does not fit the model its run's config.json describes: {k} was saved with shape {saved}, "
            f"the model built from the config has {built} ({len(bad)} tensor(s) differ). The config (e.g. a rank) was edited "
            "after training; restore the configuration the run was trained with."
        )


def load_run(path, which: str = "final", device: str = "cpu", *,
             fix: Optional[Callable[[Optional[Path]], str]] = None) -> LoadedRun:
    """Rebuild a trained run: config, model (eval mode, method applied, weights of ``which``
    loaded), tokenizer, method and task. Reads no training data and no network beyond what the
    base model itself needs (a hub model loads as in training; tiny and ``from_scratch``
    models are rebuilt from the config and seed).

    Args:
        path: the run directory.
        which: ``final``, ``best``, ``latest``, ``step-N`` or ``epoch-N``.
        device: where the model goes (``cpu``, ``cuda``, ``cuda:1`` ...).
        fix: what the error about a damaged checkpoint tells the user to do (see :func:`damaged_fix`);
            default: load another checkpoint with ``which=...``.

    The checkpoint is verified against its manifest first (a damaged one is an error, one older
    than manifests a warning), and the run's config.json must still describe the run that wrote it.
    """
    import torch


    run = RunDir(path).require()
    cfg = run.config()
    meta = run.meta() or {}
    if which == "final":
        require_final(run, "which='{name}'", "load")
    checkpoint = run.checkpoint(which)
    verify(checkpoint, fix=fix or damaged_fix(run, "which='{name}'"))
    check_checkpoint_config(run, checkpoint)
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
    from safetensors import SafetensorError

    model, method = built.model, built.method
    try:
        # a sharded run's model_state.dcp/ is read whole into tensors shaped like the rebuilt trainable ones
        state = read_model_state(checkpoint, lambda: {n: torch.empty_like(p) for n, p in method.trainable_parameters(model)},
                                 device=str(torch.device(device)))
    except (OSError, SafetensorError) as e:  # reached only by a checkpoint too old to be verified
        raise CheckpointError(f"{checkpoint / 'model_state.safetensors'} cannot be read ({e}); the checkpoint is damaged.") from None
    _check_shapes(model, state, checkpoint)
    method.load_model_state(model, state)
    method.load_state_dict(safe_torch_load(checkpoint / "method_state.pt", map_location="cpu"))
    model.eval()
    return LoadedRun(config=cfg, model=model, tokenizer=built.tokenizer, method=method, task=task, num_labels=num_labels,
                     run=run, checkpoint=checkpoint, device=device)
