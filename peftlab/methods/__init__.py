"""Method registry: ``METHODS[name]`` is a :class:`~peftlab.methods.base.Method` subclass.

To add a method, write ``peftlab/methods/<name>.py`` and add one ``_register`` line below.
"""

from __future__ import annotations

from ..config import register_section
from .base import Method, MethodContext

METHODS: dict[str, type[Method]] = {}


def _register(cls: type[Method], **sections: type) -> None:
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    for name, sec in sections.items():
        register_section(name, sec)


from .ba_lora import BALoRA, BaLoraSection  # noqa: E402
from .full import Full  # noqa: E402
from .lora import DoRA, LoRA, LoraSection  # noqa: E402
from .rsvd import RSVD, RsvdSection  # noqa: E402
from .sora import SDoRA, SoRA, SoraSection  # noqa: E402
from .sublora import SubLoRA, SubloraSection  # noqa: E402

_register(Full)
_register(LoRA, lora=LoraSection)
_register(DoRA)
_register(BALoRA, ba_lora=BaLoraSection)
_register(RSVD, rsvd=RsvdSection)
_register(SoRA, sora=SoraSection)
_register(SDoRA)
_register(SubLoRA, sublora=SubloraSection)

__all__ = ["METHODS", "Method", "MethodContext"]
