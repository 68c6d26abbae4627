"""The ``peftlab`` command line. Each subcommand is a small function; user errors
(:class:`~peftlab.errors.PeftlabError`) print one paragraph and exit with status 2."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from .errors import PeftlabError

EPILOG = "Overrides: any --section.key=value after the config file, e.g. --lora.r=16 --training.learning_rate=3e-4."


# Keys a resumed run may change (where and how it logs and checkpoints); every other setting
# comes from the run's own config.json. docs/training.md lists them.
RESUMABLE_KEYS = ("training.resume_from", "training.log_steps", "training.save_steps", "training.save_total_limit",
                  "logging.", "output.keep_checkpoints", "system.num_threads", "model.gradient_checkpointing")


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


def resume_config(run_dir: str, extra: list[str]):
    """The configuration that continues ``run_dir``: its own config.json, resumed from its newest
    checkpoint, with only the keys of :data:`RESUMABLE_KEYS` open to overrides."""
    import json
    from pathlib import Path

    from .config import _set_dotted, config_from_dict, parse_overrides

    path = Path(run_dir).expanduser()
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise PeftlabError(f"--resume {run_dir}: no config.json there, so it is not a run directory. Give the directory that "
                           "`peftlab train` wrote (the one holding config.json and checkpoints/).")
    overrides = parse_overrides(extra)
    refused = sorted(k for k in overrides if not _resumable(k))
    if refused:
        raise PeftlabError(
            f"--resume {run_dir} continues the run with its own configuration; it does not take "
            f"{', '.join('--' + k for k in refused)}. Only these may change on resume: "
            f"{', '.join(k + ('*' if k.endswith('.') else '') for k in RESUMABLE_KEYS)}. To train a different setting, start a new "
            f"run from its config: peftlab train {cfg_path} --output.dir=NEW_DIR {' '.join('--' + k + '=...' for k in refused if not k.startswith('output.'))[:200]}".rstrip())
    raw = json.loads(cfg_path.read_text())
    raw.setdefault("training", {})["resume_from"] = "latest"
    raw.setdefault("output", {})["dir"] = str(path)
    raw["output"]["overwrite"] = False
    for k, v in overrides.items():
        _set_dotted(raw, k, v)
    return config_from_dict(raw)


def cmd_train(args, extra: list[str]) -> int:
    from pathlib import Path

    from .config import load_config
    from .train import train

    if args.resume is not None:
        if args.config is not None:
            raise PeftlabError(f"give either a config file or --resume RUN_DIR, not both (got {args.config} and --resume "
                               f"{args.resume}); --resume takes the run's own configuration from RUN_DIR/config.json.")
        cfg = resume_config(args.resume, extra)
    else:
        if args.config is None:
            raise PeftlabError("peftlab train needs a config file (e.g. configs/quickstart/cls_lora.yaml), or --resume RUN_DIR "
                               "to continue a run. `peftlab config --keys` lists every setting.")
        if Path(args.config).is_dir():
            run = Path(args.config)
            hint = (f"continue it with `peftlab train --resume {run}`, or train it again elsewhere with "
                    f"`peftlab train {run / 'config.json'} --output.dir=NEW_DIR`") if (run / "config.json").is_file() else \
                "give a YAML config file"
            raise PeftlabError(f"{run} is a directory, not a config file; {hint}.")
        cfg = load_config(args.config, extra)
    results = train(cfg)
    return 0 if results.get("status") == "completed" else 1


def cmd_config(args, extra: list[str]) -> int:
    """Print the resolved configuration (after overrides) as YAML, or the keys with help."""
    import yaml

    from .config import all_sections, load_config, section_help

    if args.keys:
        from .methods import METHODS

        print(f"method (one of {', '.join(sorted(METHODS))}, default 'lora'): the fine-tuning method; its knobs live in the section of the same name.")
        for name, cls in all_sections().items():
            print(f"{name}:")
            for key, typ, default, help_ in section_help(cls):
                print(f"  {key} ({typ}, default {default!r}): {help_}")
        return 0
    cfg = load_config(args.config, extra)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def quiet_libraries() -> None:
    """Silence library chatter that says nothing to a peftlab user (progress bars of file
    writes, deprecation notes about transformers internals)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


# Every subcommand: name -> ("module:function that adds its parser", one-line help).
# Modules are imported only when their command runs, so `peftlab --help` imports no torch.
# A new command is one row here; its module exposes ``add_command(subparsers)``.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("peftlab.cli:add_train", "train one run into its run directory"),
    "config": ("peftlab.cli:add_config", "show the resolved configuration, or every key with --keys"),
    "data": ("peftlab.data.prepare:add_command", "prepare datasets: token bins (LM) or CSV splits (classification)"),
    "profile": ("peftlab.profiling:add_command", "optimizer-state memory, memory breakdown and FLOPs of one training step vs AdamW"),
    "export": ("peftlab.export:add_command", "write a run's adapter (HF PEFT format) or a merged model"),
    "compare": ("peftlab.compare:add_command", "several methods on one task at matched budgets, one table"),
    "sweep": ("peftlab.studies.cli:add_sweep", "run a study: a grid of runs x seeds; finished runs skipped, interrupted ones resumed"),
    "estimate": ("peftlab.studies.cli:add_estimate", "time a few real optimizer steps; time per run and in total for a study or config"),
    "bounds": ("peftlab.bounds.cli:add_command", "PAC-Bayes compression bound of a trained run (document-, sequence- or token-level)"),
    "analyze": ("peftlab.analysis.cli:add_command", "tables, plots, hypothesis checks and an HTML report for a study directory"),
}


def _train_epilog() -> str:
    from .config import CORE_SECTIONS, method_sections
    from .methods import METHODS

    return (f"{EPILOG}\n\nSections: {', '.join(CORE_SECTIONS)}; method sections: {', '.join(method_sections())}.\n"
            f"method: one of {', '.join(sorted(METHODS))} (--method=dora).\n"
            "Every key with its type, default and help: peftlab config --keys\n"
            "Resume a run with its own configuration: peftlab train --resume RUN_DIR\n"
            "Train a run's configuration again: peftlab train RUN_DIR/config.json --output.dir=NEW_DIR")


def add_train(sub) -> None:
    t = sub.add_parser("train", help=COMMANDS["train"][1], epilog=_train_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       usage="peftlab train CONFIG [--section.key=value ...] | peftlab train --resume RUN_DIR [--resumable.key=value ...]")
    t.add_argument("config", nargs="?", help="YAML config file, or a run's config.json")
    t.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue RUN_DIR from its newest checkpoint with its own configuration (only logging and checkpoint keys may change)")
    t.set_defaults(func=cmd_train)


def add_config(sub) -> None:
    c = sub.add_parser("config", help=COMMANDS["config"][1], epilog=EPILOG)
    c.add_argument("config", nargs="?", help="YAML config file (omit for defaults)")
    c.add_argument("--keys", action="store_true", help="list every section and key with its type, default and help")
    c.set_defaults(func=cmd_config)


def _adder(spec: str):
    import importlib

    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func or "add_command")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (every command's with ``command="*"``),
    the others appear in ``--help`` from the table alone."""
    from . import __version__

    p = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning research toolkit.", epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"peftlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (spec, help_) in COMMANDS.items():
        if command in (name, "*"):
            _adder(spec)(sub)
        else:
            sub.add_parser(name, help=help_, add_help=False)
    for register in _EXTRA_COMMANDS:  # older registration (peftlab.commands._MODULES); prefer a COMMANDS row
        register(sub)
    return p


# Subcommands registered through peftlab.commands (functions taking the subparsers object).
_EXTRA_COMMANDS: list = []


def _load_extra_commands() -> None:
    from . import commands  # noqa: F401  (modules listed in commands._MODULES, if any)


def _command_of(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    _load_extra_commands()
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
        print("interrupted; resume with --training.resume_from=latest", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run through the imported module so that subcommands registered by peftlab.commands
    # (which import peftlab.cli, not __main__) are seen.
    from peftlab.cli import main as _main

    sys.exit(_main())
