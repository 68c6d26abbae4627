"""The shared pieces studies rely on (CONTRACT.md): run identity, budget matching, step
counts. Each uses the shared implementation when this installation has it
(``peftlab.runs``, ``Method.budget_overrides``, ``peftlab.build``) and a small local
equivalent otherwise, so that the study runner agrees with resume and compare.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

# Keys that say where or how a run logs, not what it computes (the loop's RESUMABLE_CHANGES).
_NOT_IDENTITY_SECTIONS = ("output", "logging")
_NOT_IDENTITY_TRAINING = ("resume_from", "save_steps", "save_total_limit", "log_steps")


def _plain(cfg_or_dict: Any) -> dict:
    d = cfg_or_dict.to_dict() if hasattr(cfg_or_dict, "to_dict") else dict(cfg_or_dict)
    d = json.loads(json.dumps(d, default=str))
    d.pop("_meta", None)
    return d


def run_identity(cfg) -> dict:
    """The settings that decide a run's numbers."""
    try:
        from ..runs import run_identity as shared
    except ImportError:
        shared = None
    if shared is not None:
        return shared(cfg)
    d = _plain(cfg)
    for s in _NOT_IDENTITY_SECTIONS:
        d.pop(s, None)
    if isinstance(d.get("training"), dict):
        for k in _NOT_IDENTITY_TRAINING:
            d["training"].pop(k, None)
    from ..methods import METHODS

    # only the run's own method sections count (a study may carry other methods' settings)
    from ..config import CORE_SECTIONS

    own = set(CORE_SECTIONS) | set(getattr(METHODS.get(d.get("method")), "sections", ()) or ())
    return {k: v for k, v in d.items() if k == "method" or k in own}


def identity_diff(old_cfg_dict: dict, new_cfg) -> list[str]:
    """``key: old -> new`` for every identity setting that differs (empty: the same run)."""
    try:
        from ..runs import identity_diff as shared
    except ImportError:
        shared = None
    if shared is not None:
        return shared(old_cfg_dict, new_cfg)
    from ..config import config_from_dict

    old = dict(old_cfg_dict)
    old.pop("_meta", None)
    try:
        old_id = run_identity(config_from_dict(old))  # missing keys filled from today's defaults
    except Exception:  # a config this version cannot read: compare what is there
        old_id = run_identity(old)
    return _diff(old_id, run_identity(new_cfg))


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} -> {y!r}")
    return out


def identity_hash(cfg) -> str:
    return hashlib.sha256(json.dumps(run_identity(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def _first_key(section: str, candidates: tuple[str, ...]) -> Optional[str]:
    import dataclasses

    from ..config import all_sections

    cls = all_sections().get(section)
    keys = {f.name for f in dataclasses.fields(cls)} if cls is not None and dataclasses.is_dataclass(cls) else set()
    return next((f"{section}.{k}" for k in candidates if k in keys), None)


def _fallback_budget_overrides(method: str, cfg, lora_budget: int, r: int) -> tuple[dict, str]:
    """What peftlab compare did before methods stated their own matching."""
    ov: dict[str, Any] = {}
    if method in ("lora",):
        return {"lora.r": r}, f"r={r}: {lora_budget:,} adapter parameters"
    if method == "dora":
        return {"lora.r": r}, f"r={r} + one magnitude per output feature"
    if method in ("sora", "sdora"):
        return {"lora.r": r}, f"starts at r={r}; gates prune ranks, so effective <= trainable"
    if method == "ba_lora":
        key = _first_key("ba_lora", ("param_budget",))
        if key:
            ov[key] = lora_budget
        return ov, f"budget = LoRA's {lora_budget:,} adapter parameters"
    if method == "rsvd":
        key = _first_key("rsvd", ("rank",))
        if key:
            ov[key] = r
        return ov, f"full-parameter: all weights train, gradients projected to rank {r}"
    if method == "full":
        return ov, "every weight trains (reference)"
    return ov, "no budget knob (section defaults)"


def budget_overrides(cfg, lora_budget: int, r: int) -> tuple[dict, str]:
    """Overrides that put ``cfg``'s method at LoRA rank ``r``'s budget, and a note saying how."""
    from ..methods import METHODS

    cls = METHODS[cfg.method]
    fn = getattr(cls, "budget_overrides", None)
    if fn is not None:
        ov, note = fn(cfg, lora_budget, r)
        return dict(ov or {}), str(note or "")
    return _fallback_budget_overrides(cfg.method, cfg, lora_budget, r)


def count_optimizer_steps(cfg) -> Optional[int]:
    """The shared step count when this installation has it (None: the caller builds a trainer)."""
    try:
        from ..build import count_optimizer_steps as shared
    except ImportError:
        return None
    return shared(cfg)
