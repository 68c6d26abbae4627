"""Older registration point for subcommands. New commands are one row of
``peftlab.cli.COMMANDS`` (imported lazily); modules listed here are imported on every
``peftlab`` call and expose ``add_command(subparsers)``.
"""

from __future__ import annotations

from .cli import _EXTRA_COMMANDS

_MODULES: list[str] = []

for _name in _MODULES:
    import importlib

    _EXTRA_COMMANDS.append(importlib.import_module(_name).add_command)
