"""Best-checkpoint tracking and early stopping over the run's evaluations.

Every evaluation (each epoch end, and every ``training.eval_steps`` optimizer steps) is
judged here. ``best/`` follows any strict improvement of ``training.best_metric``; early
stopping counts the evaluations in a row whose value did not beat the best one by more
than ``training.early_stopping_min_delta`` and stops the run when that count reaches
``training.early_stopping_patience`` (the rule of HF Trainer's EarlyStoppingCallback). The
counters live in :class:`~peftlab.train.checkpointing.TrainerState`, so they survive a resume.
"""

from __future__ import annotations

import math
from typing import Optional


def beats(value: float, best: Optional[float], higher: bool, min_delta: float = 0.0) -> bool:
    """Whether ``value`` improves on ``best`` by more than ``min_delta`` (any finite value beats
    None; a non-finite value never improves, so a NaN evaluation is never best)."""
    if value is None or not math.isfinite(float(value)):
        return False
    if best is None or not math.isfinite(float(best)):
        return True
    return value - best > min_delta if higher else best - value > min_delta


def judge(state, value: float, higher: bool, training_cfg) -> bool:
    """Record one evaluation in ``state``; return whether it is a new best (for ``best/``).

    Updates ``best_value``/``best_step``, ``evaluations``, ``evals_without_improvement`` and,
    when the patience runs out, ``stopped_early``/``stopped_at_step``.
    """
    state.evaluations += 1
    if beats(value, state.best_value, higher, training_cfg.early_stopping_min_delta):
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
    new_best = beats(value, state.best_value, higher)
    if new_best:
        state.best_value, state.best_step = value, state.global_step
    patience = training_cfg.early_stopping_patience
    if patience is not None and state.evals_without_improvement >= patience:
        state.stopped_early, state.stopped_at_step = True, state.global_step
    return new_best


def summary(state, training_cfg) -> dict:
    """The ``early_stopping`` record of results_final.json."""
    return {"patience": training_cfg.early_stopping_patience, "min_delta": training_cfg.early_stopping_min_delta,
            "eval_steps": training_cfg.eval_steps, "evaluations": state.evaluations,
            "evaluations_without_improvement": state.evals_without_improvement,
            "stopped": bool(state.stopped_early), "stopped_at_step": state.stopped_at_step}
