"""Method registry: ``METHODS[name]`` is a :class:`~peftlab.methods.base.Method` subclass.

To add a method, write ``peftlab/methods/<name>.py`` (the class declares its config sections
in ``config_sections``) and add one ``_register`` line below.
"""

from __future__ import annotations

from .base import Method, MethodContext

METHODS: dict[str, type[Method]] = {}


def _register(cls: type[Method], **sections: type) -> None:
    """Add ``cls`` to :data:`METHODS`. Keyword sections (the older way of declaring them) are
    merged into ``cls.config_sections``."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    explicit = cls.__dict__.get("sections", ())  # the older API: section names in `sections`
    if sections or any(n not in cls.config_sections for n in explicit):
        known = {n: c for m in METHODS.values() for n, c in m.config_sections.items()}
        merged = dict(cls.config_sections)
        for n in explicit:
            if n not in merged and n not in sections:
                if n not in known:
                    raise ValueError(f"method {cls.name!r} reads section {n!r}, which no method declares; put it in config_sections")
                merged[n] = known[n]
        cls.config_sections = {**merged, **sections}
        cls.sections = tuple(cls.config_sections)
    for other in METHODS.values():
        for name, sec in cls.config_sections.items():
            if other.config_sections.get(name, sec) is not sec:
                raise ValueError(f"config section {name!r} of method {cls.name!r} is already declared with another class by {other.name!r}")
    METHODS[cls.name] = cls


from .ba_lora import BALoRA  # noqa: E402
from .full import Full  # noqa: E402
from .lora import DoRA, LoRA  # noqa: E402
from .rsvd import RSVD  # noqa: E402
from .sora import SDoRA, SoRA  # noqa: E402
from .sublora import SubLoRA  # noqa: E402

_register(Full)
_register(LoRA)
_register(DoRA)
_register(BALoRA)
_register(RSVD)
_register(SoRA)
_register(SDoRA)
_register(SubLoRA)

__all__ = ["METHODS", "Method", "MethodContext"]
