"""Run identity: which settings make two configurations "the same run".

A run is defined by its method, the core sections and the sections its own method reads
(``Method.config_sections``), with keys that an older run directory lacks filled from
today's defaults. Where a run writes and how it logs (``output``, ``logging``,
``training.resume_from``, ``save_steps``, ``save_total_limit``, ``log_steps``) is not part
of it. Resume, ``peftlab compare`` and the study runner all decide "same run?" here, so a
section added for a new method, or a new key with a default, never makes older runs
unresumable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping

# Dotted keys (or section prefixes ending in '.') that may differ between a run and its resumption.
VOLATILE = ("training.resume_from", "output.", "logging.", "training.save_steps", "training.save_total_limit",
            "training.log_steps", "model.gradient_checkpointing")


def identity_sections(method: str) -> list[str]:
    """The sections that decide the numbers of a run of ``method`` (core first)."""
    from ..config import CORE_SECTIONS
    from ..methods import METHODS

    own = list(METHODS[method].config_sections) if method in METHODS else []
    return list(CORE_SECTIONS) + [s for s in own if s not in CORE_SECTIONS]


def _volatile(key: str) -> bool:
    return any(key == v or (v.endswith(".") and key.startswith(v)) for v in VOLATILE)


def _from_dict(raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(identity, problems) of a stored config mapping: own sections only, defaults filled in."""
    from ..config import all_sections
    from ..options import build_section

    raw = {k: v for k, v in raw.items() if k != "_meta"}
    method = raw.get("method", "lora")
    sections = all_sections()
    out: dict[str, Any] = {"method": method}
    problems: list[str] = []
    for name in identity_sections(method) if isinstance(method, str) else []:
        value = raw.get(name)
        sec = build_section(sections[name], name, dict(value) if isinstance(value, dict) else {}, problems)
        out[name] = {k: v for k, v in dataclasses.asdict(sec).items() if not _volatile(f"{name}.{k}")}
    return out, problems


def run_identity(cfg) -> dict[str, Any]:
    """``{"method": ..., section: {key: value}}`` over the core sections and the method's own,
    without the volatile keys. ``cfg`` is a RunConfig or a stored config mapping (``config.json``,
    ``_meta`` ignored, missing keys filled from defaults)."""
    if isinstance(cfg, Mapping):
        return _from_dict(cfg)[0]
    out: dict[str, Any] = {"method": cfg.method}
    for name in identity_sections(cfg.method):
        sec = getattr(cfg, name)
        out[name] = {k: v for k, v in dataclasses.asdict(sec).items() if not _volatile(f"{name}.{k}")}
    return out


def fingerprint(cfg) -> str:
    """A short stable hash of :func:`run_identity` (e.g. to name or index runs)."""
    text = json.dumps(run_identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def identity_diff(old_cfg_dict: Mapping[str, Any], new_cfg) -> list[str]:
    """``["section.key: old -> new", ...]`` between a stored run config and a new config (a
    RunConfig or mapping); empty when they describe the same run. Keys the stored run lacks
    count as their defaults; settings of other methods' sections are ignored. A key the stored
    run has and this version does not know is reported as a difference."""
    old, problems = _from_dict(old_cfg_dict)
    new = run_identity(new_cfg)
    diff = [f"stored config: {p}" for p in problems]
    a, b = _flat(old), _flat(new)
    for k in sorted(set(a) | set(b), key=lambda k: (k != "method", k)):
        if a.get(k) != b.get(k):
            diff.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return diff


__all__ = ["VOLATILE", "identity_sections", "run_identity", "identity_diff", "fingerprint"]
