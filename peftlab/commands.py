"""Registration point for subcommands that live next to their features
(``data prepare``, ``profile``, ``export``, ``compare`` ...).

Each feature module exposes ``add_command(subparsers)``; list it here.
"""

from __future__ import annotations

from .cli import _EXTRA_COMMANDS

_MODULES: list[str] = ["peftlab.export", "peftlab.data.prepare", "peftlab.profiling", "peftlab.compare", "peftlab.bounds.cli"]

for _name in _MODULES:
    import importlib

    _EXTRA_COMMANDS.append(importlib.import_module(_name).add_command)
