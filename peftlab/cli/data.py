"""``peftlab data prepare``: token bins (language modelling) or CSV splits (classification) on disk."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import methods  # noqa: F401  (registers the built-in methods that configs are validated against)
from ..config import load_config, parse_overrides
from ..data.prepare import DEFAULT_TOKENIZER, DEFAULT_VAL_FRACTION, prepare
from ..data.prepare import __doc__ as PREPARE_DOC
from ..errors import PeftlabError
from .table import help_of


def add_command(subparsers) -> None:
    data = subparsers.add_parser("data", help=help_of("data"))
    actions = data.add_subparsers(dest="data_command", metavar="ACTION")
    p = actions.add_parser(
        "prepare",
        help="tokenize a corpus into token bins, or write a classification task as CSV files",
        description=PREPARE_DOC.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: peftlab data prepare openwebtext --output-dir data/openwebtext --tokenizer gpt2",
    )
    p.add_argument("dataset", help="registered dataset (lm-sample, sst2, imdb-sample, openwebtext, ...), local path, or hub name")
    p.add_argument("--output-dir", required=True, help="directory to write (token bins), or parent of <task>_dataset/ (classification)")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                   help=f"tokenizer for token bins (default {DEFAULT_TOKENIZER}: GPT-2 BPE as the seeds and nanoGPT use; `byte` for the built-in tiny models)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help=f"share of documents held out for val.bin when the corpus has no validation split (default {DEFAULT_VAL_FRACTION}; openwebtext 0.0005)")
    p.add_argument("--chunk-docs", type=int, default=1024, help="documents tokenized and held in memory at once (default 1024)")
    p.add_argument("--overwrite", action="store_true", help="replace files already in the output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    def usage(args, extra) -> int:
        data.print_help()
        return 2

    data.set_defaults(func=usage)


def cmd_prepare(args, extra: list[str]) -> int:
    ov = parse_overrides(extra)
    bad = [k for k in ov if not k.startswith("data.")]
    if bad:
        raise PeftlabError(f"`peftlab data prepare` takes only --data.* overrides; got {', '.join('--' + k for k in bad)}.")
    ov["data.dataset"] = args.dataset
    cfg = load_config(None, ov)
    summary = prepare(cfg, Path(args.output_dir), tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                      chunk_docs=args.chunk_docs, overwrite=args.overwrite, progress=not args.no_progress)
    print(summary)
    return 0
