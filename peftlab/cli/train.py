"""``peftlab train`` and ``peftlab config``: one run from a config file (or a run to resume), and the
resolved configuration or every key."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from ..config import CORE_SECTIONS, all_sections, load_config, method_sections, section_help
from ..errors import PeftlabError
from ..methods import METHODS
from ..runs.identity import resume_config
from ..train import train
from .table import COMMANDS, EPILOG


def cmd_train(args, extra: list[str]) -> int:
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
    if args.keys:
        print(f"method (one of {', '.join(sorted(METHODS))}, default 'lora'): the fine-tuning method; its knobs live in the section of the same name.")
        for name, cls in all_sections().items():
            print(f"{name}:")
            for key, typ, default, help_ in section_help(cls):
                print(f"  {key} ({typ}, default {default!r}): {help_}")
        return 0
    cfg = load_config(args.config, extra)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def _train_epilog() -> str:
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
