"""``peftlab export``: a run's adapter in HF PEFT format, or the merged model."""

from __future__ import annotations

from pathlib import Path

from ..export import export_run, merge_note
from .table import help_of


def cmd_export(args, extra) -> int:
    out = export_run(Path(args.run_dir), Path(args.output_dir) if args.output_dir else None, args.merge, args.which)
    print(f"exported to {out}")
    note = merge_note(Path(args.run_dir)) if args.merge else None
    if note:
        print(f"note: {note}")
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("export", help=help_of("export"))
    p.add_argument("run_dir")
    p.add_argument("--output-dir", default=None, help="where to write (default RUN_DIR/export or RUN_DIR/merged)")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the base weights (plain transformers model)")
    p.add_argument("--which", default="final", help="checkpoint to export: final (default), best, latest, step-N or epoch-N")
    p.set_defaults(func=cmd_export, accepts_overrides=False)
