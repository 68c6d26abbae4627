"""Configuration: YAML files with sections, dotted command-line overrides, validation.

    cfg = load_config("configs/quickstart/lm_lora.yaml", ["--lora.r=16"])

Every problem (unknown key, wrong type, bad value, missing file) is collected and
raised once as :class:`~peftlab.errors.ConfigError` before any model is built.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import yaml

from ..errors import ConfigError
from ..options import build_section, section_help, spellings, suggest
from .sections import DataConfig, LoggingConfig, ModelConfig, OutputConfig, SystemConfig, TrainingConfig, quantization_problems

CORE_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "output": OutputConfig,
    "logging": LoggingConfig,
    "system": SystemConfig,
}
# The method registry. Each method registers itself here (``peftlab/methods/__init__.py`` calls
# :func:`register_method` for the built-in ones), declaring its own config sections, so this
# floor never imports the methods: a config is validated against whatever is registered.
METHODS: dict[str, type] = {}
# The method of a configuration that names none.
DEFAULT_METHOD = "lora"


def register_method(cls: type) -> None:
    """Add a method class (``name``, ``config_sections``, ``validate_config``) to :data:`METHODS`.

    Its sections must not shadow a core section nor another method's section of the same name
    declared with a different class."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    for name, sec in cls.config_sections.items():
        if name in CORE_SECTIONS:
            raise ValueError(f"method {cls.name!r} declares config section {name!r}, which is a core section")
        for other in METHODS.values():
            if other.config_sections.get(name, sec) is not sec:
                raise ValueError(f"config section {name!r} of method {cls.name!r} is already declared with another "
                                 f"class by {other.name!r}")
    cls.sections = tuple(cls.config_sections)
    METHODS[cls.name] = cls


def _methods() -> dict[str, type]:
    if not METHODS:
        raise RuntimeError("no method is registered: import peftlab.methods (which registers the built-in methods) "
                           "before reading a configuration")
    return METHODS


def method_sections() -> dict[str, type]:
    """Every section declared by a registered method (``Method.config_sections``)."""
    out: dict[str, type] = {}
    for m in _methods().values():
        for name, cls in m.config_sections.items():
            out.setdefault(name, cls)
    return out


def identity_sections(method: str) -> list[str]:
    """The sections that decide the numbers of a run of ``method`` (core first, then its own)."""
    own = list(METHODS[method].config_sections) if method in METHODS else []
    return list(CORE_SECTIONS) + [s for s in own if s not in CORE_SECTIONS]


def all_sections() -> dict[str, type]:
    return {**CORE_SECTIONS, **method_sections()}


class RunConfig:
    """The resolved configuration of one run: ``cfg.method`` plus one object per section."""

    def __init__(self, method: str, sections: dict[str, Any]):
        self.method = method
        self._sections = sections
        for k, v in sections.items():
            setattr(self, k, v)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        for k, v in self._sections.items():
            out[k] = dataclasses.asdict(v)
        return out

    def replace(self, overrides: dict[str, Any]) -> "RunConfig":
        """A new validated config with dotted-key overrides applied (``{"lora.r": 4}``)."""
        raw = self.to_dict()
        for key, value in overrides.items():
            _override(raw, key, value)
        return config_from_dict(raw)


def _override(raw: dict, key: str, value: Any) -> None:
    """Set a dotted key, replacing every other spelling of it (``sora.lambda`` / ``sora.lambda_``)."""
    sec, _, field = key.partition(".")
    if field and "." not in field and isinstance(raw.get(sec), dict):
        sections = all_sections()
        if sec in sections:
            for other in spellings(sections[sec], field):
                if other != field:
                    raw[sec].pop(other, None)
    _set_dotted(raw, key, value)


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(args: Iterable[str]) -> dict[str, Any]:
    """Parse ``--a.b=value`` / ``--a.b value`` into ``{"a.b": value}`` (values as YAML scalars)."""
    args = list(args)
    out: dict[str, Any] = {}
    problems = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            problems.append(f"cannot read argument {arg!r}; overrides look like --section.key=value (e.g. --lora.r=16).")
            i += 1
            continue
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)  # only the first '=' separates; values may contain '='
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = body, args[i + 1]
            i += 1
        else:
            problems.append(f"override `--{body}` has no value; write --{body}=VALUE.")
            i += 1
            continue
        key = key.replace("-", "_") if key != "config-file" else key
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        if isinstance(parsed, (dict,)):
            parsed = value
        out[key] = parsed
        i += 1
    if problems:
        raise ConfigError(problems)
    return out


class ConfigWarning(UserWarning):
    """Something in a configuration that is legal but probably not meant."""


class _DuplicateKey(yaml.YAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise _DuplicateKey(
                        f"`{key}` appears twice in one mapping (lines {seen[key].start_mark.line + 1} and "
                        f"{key_node.start_mark.line + 1}); YAML would silently keep only the last. Merge them into one."
                    )
                seen[key] = key_node
            except TypeError:  # unhashable key: let PyYAML report it
                pass
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        if p.exists():
            raise ConfigError([f"config path {str(p)!r} is a directory, not a YAML file."])
        raise ConfigError([f"config file {str(p)!r} does not exist; check the path (configs live under configs/, e.g. configs/quickstart/lm_lora.yaml)."])
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{p} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as UTF-8."]) from None
    except OSError as e:
        raise ConfigError([f"cannot read config file {p}: {e.strerror or e}."]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: safe_load semantics
    except _DuplicateKey as e:
        raise ConfigError([f"{p}: {e}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{p} is not valid YAML: {e}"]) from None
    if data is None or data == {}:
        warnings.warn(f"{p} is empty: every setting takes its default (method lora on model {ModelConfig().name}, "
                      f"data {DataConfig().dataset}). Add sections (model:, data:, training: ...) or check the file.",
                      ConfigWarning, stacklevel=2)
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{p} must hold a mapping of sections (model:, data:, training: ...), not {type(data).__name__}."])
    return data


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Validate a nested mapping into a :class:`RunConfig`, reporting all problems at once."""
    METHODS = _methods()
    raw = copy.deepcopy(raw)
    raw.pop("_meta", None)  # a run's config.json carries its provenance here; it is not configuration
    sections = all_sections()
    problems: list[str] = []
    method = raw.pop("method", DEFAULT_METHOD)
    if not isinstance(method, str) or method not in METHODS:
        problems.append(f"unknown method {method!r}.{suggest(str(method), METHODS)} Available: {', '.join(sorted(METHODS))}.")
        method = DEFAULT_METHOD
    built: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in sections:
            problems.append(f"unknown section `{key}`.{suggest(key, list(sections) + ['method'])} Sections: method, {', '.join(sections)}.")
            continue
        if not isinstance(value, dict):
            problems.append(f"`{key}` must be a mapping of keys (e.g. {key}:\\n  key: value), got {value!r}.")
            continue
    for name, cls in sections.items():
        value = raw.get(name) if isinstance(raw.get(name), dict) else {}
        built[name] = build_section(cls, name, value, problems)
    if not problems:
        # value checks for the core sections and the chosen method's own; a shared study file may
        # carry settings of other methods that this run ignores (types and names are checked above)
        checked = set(CORE_SECTIONS) | set(METHODS[method].sections)
        for name, sec in built.items():
            if name in checked and hasattr(sec, "validate"):
                problems.extend(sec.validate())
        for name, sec in built.items():
            # a section may refuse settings that only mean something to its own method
            if name not in checked and hasattr(sec, "validate_unused"):
                problems.extend(sec.validate_unused(method))
        supported = [n for n, c in METHODS.items() if getattr(c, "quantized_base", False)]
        problems.extend(quantization_problems(METHODS[method], supported, built["model"], built["system"]))
        problems.extend(METHODS[method].validate_config(RunConfig(method, built)))
        problems.extend(_sharding_problems(method, built))
    if problems:
        raise ConfigError(problems)
    return RunConfig(method, built)


def _sharding_problems(method: str, built: dict[str, Any]) -> list[str]:
    """``system.sharding=fsdp`` with a method or setting it does not work with (docs/training.md#sharding)."""
    sy = built["system"]
    if sy.sharding == "none":
        return []
    p = []
    cls = METHODS[method]
    if getattr(cls, "sharding", None) is None:
        why = getattr(cls, "sharding_refusal", "") or "its training step is not written for sharded tensors"
        ok = ", ".join(sorted(n for n, c in METHODS.items() if getattr(c, "sharding", None) is not None))
        p.append(f"`system.sharding={sy.sharding}` does not support method={method}: {why} Train it with system.sharding=none "
                 f"(a whole replica on each process, DDP), or pick a method that shards ({ok}).")
    if sy.dtype == "fp16":
        p.append(f"`system.sharding={sy.sharding}` with system.dtype=fp16 is not supported (the gradient scaler would need a sharded "
                 "variant); use system.dtype=bf16 (or fp32).")
    if sy.compile:
        p.append(f"`system.sharding={sy.sharding}` with system.compile=true is not supported yet; set system.compile=false.")
    if sy.fused_cross_entropy == "liger":
        p.append(f"`system.sharding={sy.sharding}` with system.fused_cross_entropy=liger is not supported (the fused loss calls the "
                 "backbone past the sharded root module); use system.fused_cross_entropy=off.")
    if built["data"].eval_generate:
        p.append(f"`system.sharding={sy.sharding}` with data.eval_generate=true is not supported (the main process generates alone, "
                 "while every sharded forward needs all processes); set data.eval_generate=false.")
    return p


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] | dict[str, Any] = ()) -> RunConfig:
    """Read a YAML config (or start from defaults if ``path`` is None) and apply overrides."""
    raw = read_yaml(path) if path is not None else {}
    ov = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    for key, value in ov.items():
        if "." not in key and key != "method":
            sections = all_sections()
            raise ConfigError([f"override `--{key}` names no section; write --section.key=value.{suggest(key, [f'{s}.{k}' for s, c in sections.items() for k, *_ in section_help(c)] + ['method'])}"])
        _override(raw, key, value)
    return config_from_dict(raw)


__all__ = ["DEFAULT_METHOD", "ConfigWarning", "RunConfig", "load_config", "config_from_dict", "parse_overrides", "register_method", "METHODS", "identity_sections", "all_sections", "section_help"]
