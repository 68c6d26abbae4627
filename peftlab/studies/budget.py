"""Budget matching (``budget: {match: <method>, r: R}``): every run of a study gets the parameter
budget of the reference method at rank R on the same target modules, and meets it its own way.

What a budget is and how a method meets one is the method's to say (``Method.budget_params``,
``Method.budget_rank``, ``Method.budget_overrides``); this module only builds the shapes.
"""

from __future__ import annotations

from typing import Any

from ..build import weight_shapes
from ..data import load_raw
from ..errors import PeftlabError
from ..methods import METHODS
from ..models import load_model


def target_shapes(cfg) -> list[tuple[int, int]]:
    """The weight shapes of the run's target modules.

    Only shapes matter, so the architecture is built without its weights where possible
    (``model.from_scratch``); the task comes from the dataset when it can be read, else
    each head is tried (the adapted layers do not depend on it).
    """
    task = None if cfg.model.task == "auto" else cfg.model.task
    num_labels = cfg.model.num_labels
    if task is None:
        try:
            raw = load_raw(cfg)
            task, num_labels = raw.task, num_labels or raw.num_labels
        except PeftlabError:
            pass
    errors: list[tuple[bool, Exception]] = []  # (built with the run's own configuration, the error)
    for c in (cfg.replace({"model.from_scratch": True}), cfg):
        for t in ([task] if task else ["classification", "causal_lm"]):
            try:
                model, _, info = load_model(c, t, num_labels or 2)
            except Exception as e:  # noqa: BLE001 - try the next way of building the shapes
                errors.append((c is cfg, e))
                continue
            return weight_shapes(model, info.target_modules)
    # peftlab's own error of the run's configuration names the setting and its fix (a missing tokenizer path, say):
    # it beats another head's error from the same attempt (a classifier model tried as a causal LM)
    ours = [e for own, e in errors if own and isinstance(e, PeftlabError)]
    last = errors[-1][1] if errors else None
    why = str(ours[0]) if ours else (f"{type(last).__name__}: {str(last).splitlines()[0] if str(last) else ''}"
                                     if last is not None else "no attempt")
    raise PeftlabError(f"budget matching needs the shapes of {cfg.model.name!r}'s target modules, and the model could not be "
                       f"built here ({why}). Make the model available (hub access or a local copy), or set budget.match: none.")


def reference_params(cfg, r: int, reference: str) -> int:
    """The budget of method ``reference`` at rank ``r`` on the run's target modules."""
    return METHODS[reference].budget_params(target_shapes(cfg), r)


def reference_rank(cfg, reference: str) -> Any:
    """The rank of the reference method in ``cfg`` (``budget.r`` unset), or None when it has none."""
    return METHODS[reference].budget_rank(cfg)


def budget_overrides(cfg, budget: int, r: int) -> tuple[dict[str, Any], str]:
    """Overrides that put ``cfg``'s method at the reference's rank-``r`` budget, and a note, as the method states."""
    ov, note = METHODS[cfg.method].budget_overrides(cfg, budget, r)
    return dict(ov or {}), str(note or "")
