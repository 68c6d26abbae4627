"""``peftlab profile``: optimizer-state memory, memory breakdown and FLOPs of one step against AdamW."""

from __future__ import annotations

from pathlib import Path

from ..config import load_config
from ..errors import PeftlabError
from ..io import output_path_problem
from ..profiling import run_profile
from .table import help_of


def _positive_ints(text: str) -> list[int]:
    """``4,8,16`` -> ``[4, 8, 16]``; ``[0]`` (refused by the caller) when a part is not an integer."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        return [0]


def cmd_profile(args, extra: list[str]) -> int:
    ranks = [] if args.ranks.strip().lower() in ("", "none") else _positive_ints(args.ranks)
    if any(r < 1 for r in ranks):
        raise PeftlabError(f"--ranks takes positive integers separated by commas (e.g. 4,8,16) or 'none', got {args.ranks!r}.")
    for flag, v in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if v is not None and v < 1:
            raise PeftlabError(f"{flag} must be a positive integer, got {v}.")
    if args.output_dir:
        problem = output_path_problem(args.output_dir)
        if problem:
            raise PeftlabError(f"--output-dir: {problem}")
    worlds = None if args.world_size is None else _positive_ints(args.world_size)
    if worlds is not None and (not worlds or any(w < 1 for w in worlds)):
        raise PeftlabError(f"--world-size takes positive integers separated by commas (e.g. 1,2,8), got {args.world_size!r}.")
    cfg = load_config(args.config, extra)
    run_profile(cfg, Path(args.output_dir) if args.output_dir else None, ranks, args.batch_size, args.seq_len,
                world_size=worlds)
    return 0


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "profile", help=help_of("profile"),
        description="One real training step of the configured method, an AdamW baseline and rSVD-Adam at --ranks, "
                    "on a synthetic batch; writes optimizer_memory_comparison.csv, memory_breakdown_r{rank}.csv and "
                    "flops_profiler_stats.csv.",
        epilog="Overrides: any --section.key=value after the config file, e.g. --model.name=distilbert-base-uncased --model.from_scratch=true.",
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("--output-dir", default=None, help="where the files go (default: profiles/<name of output.dir>-<method>, outside any run directory)")
    p.add_argument("--ranks", default="4,8,16,64,128", help="rSVD ranks profiled beside the configured method ('none' to skip)")
    p.add_argument("--batch-size", type=int, default=None, help="synthetic batch size (default: training.batch_size)")
    p.add_argument("--seq-len", type=int, default=None, help="synthetic sequence length (default: data.max_length or data.block_size)")
    p.add_argument("--world-size", default=None,
                   help="with --system.sharding=fsdp: the numbers of processes the memory per process is computed for, "
                        "separated by commas, e.g. 1,2,8 (default 1)")
    p.set_defaults(func=cmd_profile)
