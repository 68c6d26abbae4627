"""``peftlab analyze STUDY_DIR [--output-dir DIR]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..analysis import analyze
from ..errors import PeftlabError
from ..io import output_path_problem


def cmd_analyze(args, extra: list[str]) -> int:
    out_dir = args.output_dir or str(Path(args.study_dir).expanduser() / "analysis")
    problem = output_path_problem(out_dir) if Path(args.study_dir).expanduser().is_dir() else None
    if problem:  # before reading every run and drawing every plot
        raise PeftlabError(f"analyze --output-dir: {problem}")
    res = analyze(args.study_dir, args.output_dir, baseline=not args.no_baseline)
    t = res.study.table
    out = sys.stdout
    print(f"{len(t)} runs ({int((t['status'] == 'completed').sum())} completed) in {res.study.root}", file=out)
    print((res.output_dir / "summary_table.md").read_text(), file=out)
    for f in res.findings:
        print(f"[{f.verdict}] {f.hypothesis}: {f.text}", file=out)
    for n in res.notes:
        print(f"note: {n}", file=out)
    print(f"tables: {', '.join(sorted(p.name for p in res.tables.values()))}", file=out)
    print(f"plots ({len(res.plots)}): {', '.join(res.plots) or 'none'}", file=out)
    print(f"report: {res.report}", file=out)
    return 0


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze", help="tables, plots, hypothesis checks and an HTML report for a study directory",
        description="Read every run directory under STUDY_DIR, group runs that differ only by seed (mean ± std, n), "
                    "and write summary/comparison tables (CSV, LaTeX, Markdown), the seeds' plots (PNG + SVG), "
                    "hypothesis checks and a self-contained report.html.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("study_dir", help="a study directory (one run directory per run) or a single run directory")
    p.add_argument("--output-dir", default=None, help="where to write (default: STUDY_DIR/analysis)")
    p.add_argument("--no-baseline", action="store_true",
                   help="do not load the validation data to compute the majority-class baseline")
    p.set_defaults(func=cmd_analyze, accepts_overrides=False)
