"""The ``peftlab`` command line, the top floor: one file per command in this folder, one row per
command in :mod:`peftlab.cli.table`. User errors (:class:`~peftlab.errors.PeftlabError`) print one
paragraph and exit with status 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap

from .. import __version__
from ..errors import PeftlabError
from ..tracking import quiet_libraries
from .table import COMMANDS, EPILOG


def _adder(spec: str):
    module, _, func = spec.partition(":")
    # The command's module by name from the table: `peftlab --help` then imports no torch.
    return getattr(importlib.import_module(module), func or "add_command")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (every command's with ``command="*"``),
    the others appear in ``--help`` from the table alone."""
    p = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning research toolkit.", epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"peftlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (spec, help_) in COMMANDS.items():
        if command in (name, "*"):
            _adder(spec)(sub)
        else:
            sub.add_parser(name, help=help_, add_help=False)
    return p


def _command_of(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_of(argv)
    parser = build_parser(command if command in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    quiet_libraries()
    if extra and not getattr(args, "accepts_overrides", True):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args, extra)
    except PeftlabError as e:
        msg = str(e)
        lines = msg.splitlines() or [""]
        print("\n".join(textwrap.fill(line, 100, subsequent_indent="    " if line.startswith("  -") else "") for line in ["error: " + lines[0], *lines[1:]]), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # only a training run resumes; bounds, export, profile ... are simply run again
        run = getattr(args, "resume", None) or "RUN_DIR"
        print(f"interrupted; continue the run with `peftlab train --resume {run}`" if args.command == "train" else "interrupted",
              file=sys.stderr)
        return 130


__all__ = ["COMMANDS", "EPILOG", "build_parser", "main"]
