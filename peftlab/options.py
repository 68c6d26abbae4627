"""Typed configuration sections: coercion, unknown-key detection and suggestions.

A section is a dataclass whose fields carry a one-line ``help`` in their metadata.
Values arrive from YAML (already typed) or from ``--section.key=value`` overrides
(strings); :func:`coerce` turns both into the declared type or reports a problem.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


def opt(default: Any, help: str, **kw: Any) -> Any:
    """Declare a config field with a default and a one-line help text."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def suggest(name: str, candidates: typing.Iterable[str]) -> str:
    """Return ' Did you mean `x`?' for the closest candidate, or ''."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" Did you mean `{close[0]}`?" if close else ""


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class CoerceError(ValueError):
    pass


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise :class:`CoerceError`."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~"))):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a)
            except CoerceError as e:
                errors.append(str(e))
        raise CoerceError(f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if isinstance(value, bool) and ("on" if value else "off") in allowed:
            return "on" if value else "off"  # YAML 1.1 reads a bare on/off (`--lora.fused=on`) as a boolean
        if value in allowed and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            for a in allowed:
                if isinstance(a, str) and a.lower() == value.lower():
                    return a
        hint = suggest(str(value), [str(a) for a in allowed])
        raise CoerceError(f"expected {_type_name(tp)}, got {value!r}.{hint}")
    if origin is list:
        (inner,) = get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise CoerceError(f"expected {_type_name(tp)}, got {value!r}")
        return [coerce(v, inner) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise CoerceError(f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise CoerceError(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise CoerceError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                pass
            else:
                if f.is_integer():
                    return int(f)
        raise CoerceError(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise CoerceError(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise CoerceError(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise CoerceError(f"expected a string, got {value!r}")
    if tp is Any:
        return value
    raise CoerceError(f"unsupported field type {tp!r}")


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def spellings(cls: type, key: str) -> list[str]:
    """Every accepted spelling of the field that ``key`` names in section ``cls`` (itself included)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    aliases = {a: f.name for f in fields.values() for a in f.metadata.get("aliases", ())}
    name = aliases.get(key, key)
    if name not in fields:
        return [key]
    return [name, *fields[name].metadata.get("aliases", ())]


def _normalise_keys(cls: type, types_: dict[str, Any], raw: dict[str, Any], section: str = "",
                    problems: list[str] | None = None) -> dict[str, Any]:
    """Map spellings onto field names: declared aliases (``aliases=("lambda",)`` in a
    field's metadata, for names Python cannot use) and nested mappings
    (``weight_reduction: {rank: 8}`` or ``--rsvd.weight_reduction.rank=8`` for the
    field ``weight_reduction_rank``)."""
    aliases = {a: f.name for f in dataclasses.fields(cls) for a in f.metadata.get("aliases", ())}
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}

    def put(field: str, given: str, value: Any) -> None:
        if field in out and problems is not None:
            problems.append(f"`{section}.{spelled[field]}` and `{section}.{given}` set the same key `{section}.{field}` "
                            f"({out[field]!r} and {value!r}); keep one of them.")
        out[field], spelled[field] = value, given

    for key, value in raw.items():
        given = key
        if key in aliases:
            key = aliases[key]
        if key not in types_ and isinstance(value, dict) and any(f"{key}_{sub}" in types_ for sub in value):
            for sub, v in value.items():
                put(f"{key}_{sub}", f"{given}.{sub}", v)
            continue
        put(key, given, value)
    return out


def build_section(cls: type, section: str, raw: dict[str, Any], problems: list[str]) -> Any:
    """Build a section dataclass from a raw mapping, appending problems instead of raising."""
    types_ = field_types(cls)
    kwargs: dict[str, Any] = {}
    raw = _normalise_keys(cls, types_, raw, section, problems)
    for key, value in raw.items():
        if key not in types_:
            problems.append(
                f"unknown key `{section}.{key}`.{suggest(key, types_).replace('`', '`' + section + '.', 1) if suggest(key, types_) else ''} "
                f"Valid keys in `{section}`: {', '.join(sorted(types_))}."
            )
            continue
        try:
            kwargs[key] = coerce(value, types_[key])
        except CoerceError as e:
            problems.append(f"`{section}.{key}`: {e}")
            continue
        if isinstance(kwargs[key], float) and not math.isfinite(kwargs[key]):
            problems.append(f"`{section}.{key}` must be a finite number, got {kwargs[key]}.")
            del kwargs[key]
    return cls(**kwargs)


def section_help(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for every field of a section, for docs and --help."""
    out = []
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append((f.name, _type_name(types_[f.name]), default, f.metadata.get("help", "")))
    return out
