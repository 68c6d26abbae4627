"""The shared pieces studies rely on (CONTRACT.md): run identity, budget matching, step
counts — thin wrappers over :mod:`peftlab.runs`, ``Method.budget_overrides`` and
:mod:`peftlab.build`, so that the study runner decides "same run?" exactly as resume does.
"""

from __future__ import annotations

from typing import Any


def run_identity(cfg) -> dict:
    """The settings that decide a run's numbers (``peftlab.runs.run_identity``)."""
    from ..runs import run_identity as shared

    return shared(cfg)


def identity_diff(old_cfg_dict: dict, new_cfg) -> list[str]:
    """``key: old -> new`` for every identity setting that differs (empty: the same run)."""
    from ..runs import identity_diff as shared

    return shared(old_cfg_dict, new_cfg)


def identity_hash(cfg) -> str:
    from ..runs.identity import fingerprint

    return fingerprint(cfg)


# ------------------------------------------------------------------------ budgets
def lora_params(cfg, r: int) -> int:
    """Adapter parameters of rank-``r`` LoRA on the run's target modules (sum of r*(d_in+d_out)).

    Only shapes matter, so the architecture is built without its weights where possible
    (``model.from_scratch``); the task comes from the dataset when it can be read, else
    each head is tried (the adapted layers do not depend on it).
    """
    from ..errors import PeftlabError
    from ..models import check_targets, load_model

    task = None if cfg.model.task == "auto" else cfg.model.task
    num_labels = cfg.model.num_labels
    if task is None:
        try:
            from ..data import load_raw

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
    from ..methods import METHODS

    ov, note = METHODS[cfg.method].budget_overrides(cfg, lora_budget, r)
    return dict(ov or {}), str(note or "")


def count_optimizer_steps(cfg) -> int:
    """Optimizer steps of a run without training (``peftlab.build.count_optimizer_steps``)."""
    from ..build import count_optimizer_steps as shared

    return shared(cfg)
