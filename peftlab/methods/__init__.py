"""Method registry: ``METHODS[name]`` is a :class:`~peftlab.methods.base.Method` subclass.

To add a method, write ``peftlab/methods/<name>.py`` (the class declares its config sections
in ``config_sections``) and add it to the tuple below. The registry itself lives in
:mod:`peftlab.config` (a lower floor), which validates configurations against it.
"""

from __future__ import annotations

from ..config import METHODS, register_method
from .ba_lora.method import BALoRA
from .base import Method, MethodContext
from .full import Full
from .lora import DoRA, LoRA
from .rsvd import RSVD
from .sora.method import SDoRA, SoRA
from .sublora.method import SubLoRA

for _cls in (Full, LoRA, DoRA, BALoRA, RSVD, SoRA, SDoRA, SubLoRA):
    register_method(_cls)

__all__ = ["METHODS", "Method", "MethodContext"]
