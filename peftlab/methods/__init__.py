"""Method registry: ``METHODS[name]`` is a :class:`~peftlab.methods.base.Method` subclass.

To add a method, write ``peftlab/methods/<name>.py`` (the class declares its config sections
in ``config_sections``) and add it to the tuple below. The registry itself lives in
:mod:`peftlab.config` (a lower floor), which validates configurations against it.

:func:`table_order` is the one method order of every table, plot and ``peftlab compare``,
from the methods' ``table_rank``.
"""

from __future__ import annotations

from ..config import METHODS, register_method
from .adalora import AdaLoRA
from .ba_lora.method import BALoRA
from .base import Method, MethodContext
from .full import Full
from .lora import DoRA, LoRA
from .rsvd import RSVD
from .sora.method import SDoRA, SoRA
from .sublora.method import SubLoRA

for _cls in (Full, LoRA, DoRA, BALoRA, RSVD, SoRA, SDoRA, SubLoRA, AdaLoRA):
    register_method(_cls)


def table_key(name: str) -> tuple:
    """Sort key of a method name: ranked methods by ``table_rank``, then the others (and names
    this checkout does not register) alphabetically."""
    rank = getattr(METHODS.get(name), "table_rank", None)
    return (0, rank, name) if rank is not None else (1, 0, name)


def table_order(names) -> list[str]:
    """``names`` (once each) in the order of tables, plot legends and ``peftlab compare``."""
    return sorted(dict.fromkeys(names), key=table_key)


__all__ = ["METHODS", "Method", "MethodContext", "table_key", "table_order"]
