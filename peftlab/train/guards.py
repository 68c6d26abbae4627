"""Divergence guards: a run whose loss, gradient norm or weights stop being finite is stopped.

The loop calls :func:`check_metrics` after every evaluation (an infinite perplexity or a NaN
accuracy is a divergence too) and :func:`check_losses` whenever it reads the step losses from the device (every
``log_steps``, at epoch ends and before each checkpoint). On the first non-finite value it
writes ``results_final.json`` with ``status: diverged`` (the step, what went non-finite, the
likely cause, the last finite checkpoint to resume from) and raises :class:`Diverged`, a
:class:`~peftlab.errors.PeftlabError`, so ``peftlab train`` exits non-zero with that message.
Nothing is exported after a divergence, and since losses and weights are checked before
every save no checkpoint with non-finite weights is ever written;
:func:`peftlab.train.early_stop.beats` keeps a NaN evaluation from ever becoming ``best``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import checkpoints as ckpt
from ..config import METHODS
from ..errors import PeftlabError
from ..io import write_json


class Diverged(PeftlabError):
    """Training produced a non-finite loss, gradient norm or weights."""

    def __init__(self, message: str, *, step: int, what: str, checkpoint: Optional[str]):
        super().__init__(message)
        self.step, self.what, self.checkpoint = step, what, checkpoint


def _finite_params(params) -> bool:
    norms = [torch.linalg.vector_norm(p.detach().float()) for p in params]
    return bool(torch.isfinite(torch.stack(norms)).all()) if norms else True


def likely_cause(cfg) -> str:
    t, s = cfg.training, cfg.system
    typical = METHODS[cfg.method].typical_learning_rate
    parts = [f"the learning rate (training.learning_rate={t.learning_rate:g}) is too high for method {cfg.method}: "
             f"lower it (typical: {typical})"]
    if t.max_grad_norm is None:
        parts.append("set --training.max_grad_norm=1.0 to clip gradients")
    if s.dtype == "fp16":
        parts.append("fp16 overflows where bf16 or fp32 does not: try --system.dtype=bf16")
    return "; ".join(parts)


def check_losses(trainer, losses: list[float]) -> None:
    """Stop the run at the first non-finite training loss among the steps whose losses the loop
    just read (it reads them from the device every ``log_steps``, at epoch ends and before every
    checkpoint, so no checkpoint is written after a divergence), or when the trainable weights
    are no longer finite. The step named is the first one whose loss was not finite."""
    step = trainer.state.global_step
    first = step - len(losses) + 1
    for i, v in enumerate(losses):
        if not math.isfinite(v):
            diverge(trainer, f"the training loss is {v}", step=first + i)
    if not _finite_params(p for p in trainer.unwrapped().parameters() if p.requires_grad):
        diverge(trainer, "the trainable weights hold NaN or inf after an optimizer step"
                + (f" (between steps {first} and {step})" if len(losses) > 1 else ""), step=step)


def check_metrics(trainer, metrics: dict[str, float]) -> None:
    """Stop the run when an evaluation gives a non-finite metric (NaN or +-inf). An infinite
    perplexity is a validation loss beyond exp's range: the model has diverged even where the
    training losses stayed finite, and the run must not end "completed"."""
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        loss = {k: v for k, v in metrics.items() if k.endswith("_loss") and k not in bad}
        diverge(trainer, "the evaluation gave " + ", ".join(f"{k}={v}" for k, v in bad.items())
                + "".join(f" ({k}={v:.4g})" for k, v in loss.items()))


def diverge(trainer, what: str, step: Optional[int] = None) -> None:
    """Record the divergence in results_final.json and raise :class:`Diverged`."""

    st, cfg = trainer.state, trainer.cfg
    step = st.global_step if step is None else step
    last = next((p for _, _, p in reversed(ckpt.list_checkpoints(trainer.run_dir / "checkpoints"))
                 if ckpt.is_finite_checkpoint(p)), None)
    resume = (f"The last finite checkpoint, {last}, is kept; start a new run with other settings."
              if last is not None else "No checkpoint was saved before it; start a new run with other settings.")
    msg = (f"Training diverged at step {step} (epoch {st.epoch + 1}): {what}. Likely cause: {likely_cause(cfg)}. "
           f"{resume} Nothing was exported.")
    import logging

    for h in trainer.log.handlers:  # train.log; the console gets the message once, from the CLI
        if isinstance(h, logging.FileHandler):
            h.handle(trainer.log.makeRecord(trainer.log.name, logging.ERROR, __file__, 0, msg, None, None))
    if trainer.accelerator.is_main_process:
        write_json(trainer.run_dir / "results_final.json", {
            "status": "diverged",
            "method": cfg.method,
            "model": cfg.model.name,
            "dataset": cfg.data.dataset,
            "seed": cfg.training.seed,
            "global_step": step,
            "diverged": {"step": step, "what": what, "likely_cause": likely_cause(cfg),
                         "last_finite_checkpoint": str(last) if last is not None else None},
            "best": {"value": st.best_value, "step": st.best_step},
            "message": msg,
        })
    raise Diverged(msg, step=step, what=what, checkpoint=str(last) if last is not None else None)
