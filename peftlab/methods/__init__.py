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
    if sections:
        cls.config_sections = {**cls.config_sections, **sections}
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

_register(Full)
_register(LoRA)
_register(DoRA)
_register(BALoRA)
_register(RSVD)
_register(SoRA)
_register(SDoRA)

__all__ = ["METHODS", "Method", "MethodContext"]
