"""The command table: every ``peftlab`` subcommand is one row here.

name -> ("module:function that adds its parser", one-line help). A command's module is imported
only when that command runs, so ``peftlab --help`` imports no torch. A new command is one row here
and one file in this folder exposing ``add_command(subparsers)``.
"""

from __future__ import annotations

EPILOG = "Overrides: any --section.key=value after the config file, e.g. --lora.r=16 --training.learning_rate=3e-4."

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("peftlab.cli.train:add_train", "train one run into its run directory"),
    "config": ("peftlab.cli.train:add_config", "show the resolved configuration, or every key with --keys"),
    "data": ("peftlab.cli.data:add_command", "prepare datasets: token bins (LM) or CSV splits (classification)"),
    "profile": ("peftlab.cli.profile:add_command", "optimizer-state memory, memory breakdown and FLOPs of one training step vs AdamW"),
    "export": ("peftlab.cli.export:add_command", "write a run's adapter (HF PEFT format) or a merged model"),
    "compare": ("peftlab.cli.compare:add_command", "several methods on one task at matched budgets, one table"),
    "sweep": ("peftlab.cli.studies:add_sweep", "run a study: a grid of runs x seeds; finished runs skipped, interrupted ones resumed"),
    "estimate": ("peftlab.cli.studies:add_estimate", "time a few real optimizer steps; time per run and in total for a study or config"),
    "bounds": ("peftlab.cli.bounds:add_command", "PAC-Bayes compression bound of a trained run (document-, sequence- or token-level)"),
    "analyze": ("peftlab.cli.analyze:add_command", "tables, plots, hypothesis checks and an HTML report for a study directory"),
}


def help_of(name: str) -> str:
    return COMMANDS[name][1]
