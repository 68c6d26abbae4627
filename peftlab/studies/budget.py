"""Budget matching (``budget.match``): the reference parameter count every run of a study is
matched to, and each method's own way of meeting it (``Method.budget_overrides``)."""

from __future__ import annotations

from typing import Any

from ..data import load_raw
from ..errors import PeftlabError
from ..methods import METHODS
from ..models import check_targets, load_model


def lora_params(cfg, r: int) -> int:
    """Adapter parameters of rank-``r`` LoRA on the run's target modules (sum of r*(d_in+d_out)).

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
    errors = []
    for c in (cfg.replace({"model.from_scratch": True}), cfg):
        for t in ([task] if task else ["classification", "causal_lm"]):
            try:
                model, _, info = load_model(c, t, num_labels or 2)
            except Exception as e:  # noqa: BLE001 - try the next way of building the shapes
                errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            total = 0
            for name in check_targets(model, info.target_modules):
                w = model.get_submodule(name).weight
                total += r * (w.shape[0] + w.shape[1])  # Linear (out, in) and GPT-2 Conv1D (in, out) sum alike
            return total
    raise PeftlabError(f"budget matching needs the shapes of {cfg.model.name!r} to count LoRA rank-{r} parameters, and the "
                       f"model could not be built here ({errors[-1] if errors else 'no attempt'}). Make the model available "
                       "(hub access or a local copy), or set budget.match: none.")


def budget_overrides(cfg, lora_budget: int, r: int) -> tuple[dict[str, Any], str]:
    """Overrides that put ``cfg``'s method at LoRA rank ``r``'s budget, and a note, as the method states."""
    ov, note = METHODS[cfg.method].budget_overrides(cfg, lora_budget, r)
    return dict(ov or {}), str(note or "")
