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
from pathlib import Path
from typing import Any, Mapping

from ..checkpoints import CONFIG_FILE, CheckpointError
from ..config import DEFAULT_METHOD, _set_dotted, all_sections, config_from_dict, identity_sections, parse_overrides
from ..errors import PeftlabError
from ..options import build_section

# The one list of settings that do not define a run: dotted keys, or section prefixes ending in
# '.'. They may change when a run is resumed (``peftlab train --resume RUN --KEY=...``), two runs
# that differ only in them are the same run to the study runner, and analysis never treats
# them as a study's varying settings. docs/training.md lists them.
VOLATILE = ("training.resume_from", "output.", "logging.", "training.save_steps", "training.save_total_limit",
            "training.log_steps", "model.gradient_checkpointing", "model.gradient_checkpointing_fraction",
            "model.gradient_checkpointing_reentrant",
            "system.num_threads")


def is_volatile(key: str) -> bool:
    """Whether ``key`` (``section.key``) is one of :data:`VOLATILE`."""
    return any(key == v or (v.endswith(".") and key.startswith(v)) for v in VOLATILE)


def _from_dict(raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(identity, problems) of a stored config mapping: own sections only, defaults filled in."""
    raw = {k: v for k, v in raw.items() if k != "_meta"}
    method = raw.get("method", DEFAULT_METHOD)
    sections = all_sections()
    out: dict[str, Any] = {"method": method}
    problems: list[str] = []
    for name in identity_sections(method) if isinstance(method, str) else []:
        value = raw.get(name)
        sec = build_section(sections[name], name, dict(value) if isinstance(value, dict) else {}, problems)
        out[name] = {k: v for k, v in dataclasses.asdict(sec).items() if not is_volatile(f"{name}.{k}")}
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
        out[name] = {k: v for k, v in dataclasses.asdict(sec).items() if not is_volatile(f"{name}.{k}")}
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


__all__ = ["VOLATILE", "is_volatile", "check_identity", "resume_config", "identity_sections", "run_identity", "identity_diff", "fingerprint"]


def check_identity(path: Path, run_dir: Path, cfg) -> None:
    """Refuse to resume from ``path`` unless the run that wrote it is the run ``cfg`` describes.

    Both records are checked when present: the configuration saved inside the checkpoint (which
    travels with it, so a checkpoint of another run or a run directory without config.json is
    still checked) and the run directory's config.json. A checkpoint with neither cannot be
    verified and is refused. What may differ is :data:`peftlab.runs.identity.VOLATILE`."""
    path, run_dir = Path(path), Path(run_dir)
    records = []
    if (path / CONFIG_FILE).is_file():
        records.append((f"checkpoint {path}", path / CONFIG_FILE))
    if (run_dir / "config.json").is_file():
        records.append((f"run {run_dir}", run_dir / "config.json"))
    if not records:
        raise CheckpointError(
            f"Cannot resume from {path}: neither the checkpoint nor {run_dir} records the configuration it was trained with, "
            "so nothing shows that it belongs to this run (a different seed, model or rank would be rebuilt under it silently). "
            "Resume a checkpoint written by this peftlab version, or start a new run."
        )
    may_change = ", ".join(v.rstrip(".") + (".*" if v.endswith(".") else "") for v in VOLATILE)
    for who, f in records:
        try:
            old = json.loads(f.read_text())
        except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
            raise CheckpointError(f"Cannot resume from {path}: {f} is unreadable ({e}).") from None
        if not isinstance(old, dict):
            raise CheckpointError(f"Cannot resume from {path}: {f} holds a JSON {type(old).__name__}, not the object (mapping of "
                                  f"sections) that `peftlab train` writes; it was damaged. {_restore_hint(run_dir)}")
        diff = identity_diff(old, cfg)
        if diff:
            raise PeftlabError(
                f"Cannot resume from {path}: this configuration differs from the one the {who} was trained with "
                f"({'; '.join(diff[:6])}{'; ...' if len(diff) > 6 else ''}). Resume changes only {may_change}; "
                "resume with the original settings, or start a new run directory for the new ones."
            )


def _restore_hint(path: Path) -> str:
    """How to repair a run's config.json: every checkpoint carries a copy of the configuration."""
    copies = sorted((p for p in (path / "checkpoints").glob(f"*/{CONFIG_FILE}") if not p.parent.name.startswith(".")),
                    key=lambda p: p.stat().st_mtime)
    if copies:
        return (f"Each checkpoint keeps a copy of the run's configuration: restore it with `cp {copies[-1]} {path / 'config.json'}` "
                "and resume again.")
    return "No checkpoint of the run carries a copy of its configuration; restore config.json from a backup."


def _read_run_config(path: Path, run_dir: str) -> dict:
    """The run's config.json as a mapping, or a clear error (truncated, not UTF-8, not an object)."""
    cfg_path = path / "config.json"
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        problem = f"is not UTF-8 text ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        problem = f"is not valid JSON ({e.msg}: line {e.lineno}, column {e.colno}; truncated or edited)"
    except OSError as e:
        problem = f"cannot be read ({e.strerror or e})"
    else:
        if isinstance(raw, dict):
            return raw
        problem = f"holds a JSON {type(raw).__name__}, not the object (mapping of sections) that `peftlab train` writes"
    raise PeftlabError(f"--resume {run_dir}: {cfg_path} {problem}, so the run's configuration is unknown. {_restore_hint(path)}")


def resume_config(run_dir: str, extra: list[str]):
    """The configuration that continues ``run_dir``: its own config.json, resumed from its newest
    checkpoint, with only the keys of :data:`VOLATILE` open to overrides (``extra``: the command
    line's ``--section.key=value`` words)."""
    path = Path(run_dir).expanduser()
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise PeftlabError(f"--resume {run_dir}: no config.json there, so it is not a run directory. Give the directory that "
                           "`peftlab train` wrote (the one holding config.json and checkpoints/).")
    overrides = parse_overrides(extra)
    refused = sorted(k for k in overrides if not is_volatile(k))
    if refused:
        raise PeftlabError(
            f"--resume {run_dir} continues the run with its own configuration; it does not take "
            f"{', '.join('--' + k for k in refused)}. Only these may change on resume: "
            f"{', '.join(k + ('*' if k.endswith('.') else '') for k in VOLATILE)}. To train a different setting, start a new "
            f"run from its config: peftlab train {cfg_path} --output.dir=NEW_DIR {' '.join('--' + k + '=...' for k in refused if not k.startswith('output.'))[:200]}".rstrip())
    raw = _read_run_config(path, run_dir)
    if not isinstance(raw.get("training", {}), dict) or not isinstance(raw.get("output", {}), dict):
        bad = "training" if not isinstance(raw.get("training", {}), dict) else "output"
        raise PeftlabError(f"--resume {run_dir}: {cfg_path} is damaged: its `{bad}` section is not a mapping. "
                           f"{_restore_hint(path)}")
    raw.setdefault("training", {})["resume_from"] = "latest"
    raw.setdefault("output", {})["dir"] = str(path)
    raw["output"]["overwrite"] = False
    for k, v in overrides.items():
        _set_dotted(raw, k, v)
    return config_from_dict(raw)
