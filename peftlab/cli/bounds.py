"""``peftlab bounds RUN_DIR [--bounds.key=value ...]``."""

from __future__ import annotations

import dataclasses

from ..bounds.config import BoundsConfig, bounds_config
from ..bounds.evaluate import run_bounds
from ..bounds.parallel import launched_world
from ..config import section_help

EXAMPLE = ("Example: peftlab bounds runs/sublora --bounds.bound_type=document_level --bounds.levels=11 "
           "--bounds.data=data/openwebtext --bounds.use_kmeans")


def _bare_flags(extra: list[str]) -> list[str]:
    """``--bounds.use_kmeans`` alone means ``--bounds.use_kmeans=true`` for boolean keys."""
    bools = {f"--bounds.{f.name}" for f in dataclasses.fields(BoundsConfig) if f.type in (bool, "bool")}
    out = []
    for i, arg in enumerate(extra):
        nxt = extra[i + 1] if i + 1 < len(extra) else None
        if arg.replace("-", "_").replace("__", "--", 1) in bools and (nxt is None or nxt.startswith("--")):
            out.append(arg + "=true")
        else:
            out.append(arg)
    return out


def cmd_bounds(args, extra: list[str]) -> int:
    bcfg = bounds_config(_bare_flags(extra))
    m = run_bounds(args.run_dir, bcfg)
    if not launched_world().main:  # under torchrun, rank 0 reports
        return 0
    verdict = "non-vacuous" if m["non_vacuous"] else "vacuous"
    print(
        f"{m['bound_type']}: bound {m['bound_value']:.4f} bits/token ({verdict}; log2 V = {m['vacuous_threshold_bits']:.2f}), "
        f"empirical {m['empirical_bpd']:.4f} at alpha={m['best_alpha']}, KL {m['kl_divergence']:.1f} nats, "
        f"{m['compressed_size_bits']:.0f} bits for {m['compressed_numbers']:,} numbers; n={m['n']:,} of m={m['m']:,}.\n"
        f"top-1 error {m['top1_error']:.4f} (bound {m['top1_error_bound']:.4f}). Wrote {bcfg.output or args.run_dir + '/bounds_metrics.json'}"
    )
    return 0


def add_command(subparsers) -> None:
    keys = "\n".join(f"  --bounds.{k} ({t}, default {d!r}): {h}" for k, t, d, h in section_help(BoundsConfig))
    p = subparsers.add_parser(
        "bounds", help="PAC-Bayes compression bound of a trained run (document-, sequence- or token-level)",
        description="Quantize and arithmetic-code what the run trained, score the quantized model on its training tokens and "
                    "write RUN_DIR/bounds_metrics.json. See docs/bounds.md.\n\nOptions:\n" + keys,
        epilog=EXAMPLE, formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", help="a run directory written by `peftlab train`")
    p.set_defaults(func=cmd_bounds)
