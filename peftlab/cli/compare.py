"""``peftlab compare``: several PEFT methods on one real task at matched parameter budgets,
one table at the end — the compare study run by the study runner, tabled by the analysis tables.

    peftlab compare                                   # = peftlab sweep configs/studies/compare.yaml --preset-scale=cpu
    peftlab compare --methods lora,dora --output-dir runs/cmp --training.epochs=2

Each method is one arm of ``configs/studies/compare.yaml`` (methods the file does not list
get an arm that only sets ``method``), run by the study runner (:mod:`peftlab.studies`):
one ordinary run per method in ``OUTPUT_DIR/<method>/``, each in its own process (so its
peak memory is its own), finished runs reused, interrupted ones resumed, ``study.log``
beside them. Budgets are matched to LoRA at rank ``lora.r`` as each method states in
``Method.budget_overrides``. The table (:func:`peftlab.analysis.tables.compare_markdown`) goes
to the console, ``compare.csv`` and ``compare.md``, with the majority-class baseline as its last row.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from ..config import parse_overrides
from ..errors import PeftlabError
from ..options import suggest
from ..studies.expand import expand
from ..studies.runner import read_events, sweep, trial_status
from ..studies.spec import ArmSection, load_study

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "configs" / "demo" / "food_reviews_minilm.yaml"
COMPARE_STUDY = ROOT / "configs" / "studies" / "compare.yaml"
DEFAULT_OUTPUT = "runs/compare"


def compare_study(config_path: Optional[str | Path] = None, methods: Optional[list[str]] = None,
                  overrides: Optional[dict[str, Any]] = None, quick: bool = False):
    """The compare study for these arguments: (spec, wanted methods in table order)."""
    from ..methods import METHODS, table_order  # lazy: torch; `peftlab compare --help` imports this module

    if not COMPARE_STUDY.is_file():
        raise PeftlabError(f"The compare study {COMPARE_STUDY} is not there (peftlab installed without its configs/?).")
    full = load_study(COMPARE_STUDY, None, follow_ups=False)  # every arm the file defines (full included)
    spec = load_study(COMPARE_STUDY, "smoke" if quick else "cpu", follow_ups=False)
    if config_path is not None:
        spec.base = Path(config_path).expanduser()
        if not spec.base.is_file():
            raise PeftlabError(f"--config {str(config_path)!r} does not exist.")
    overrides = dict(overrides or {})
    if "training.seed" in overrides:  # the study's seeds list decides each run's seed
        spec.seeds = [int(overrides.pop("training.seed"))]
    spec.overrides = {**spec.overrides, "logging.progress_bar": False, **overrides}
    spec.study.run_name = "{arm}"  # OUTPUT_DIR/<method>/, as before studies
    if methods:
        wanted = list(dict.fromkeys(methods))
    else:  # every registered method the methods themselves put in a default comparison (not `full`: slow on a laptop)
        wanted = [m for m in table_order(METHODS) if METHODS[m].compare_by_default]
    arms = {a.name: a for a in full.arms}
    spec.arms = [arms.get(m) or ArmSection(name=m, overrides={"method": m}) for m in wanted if m in METHODS]
    return spec, wanted


def compare(config_path: Optional[str | Path] = None, output_dir: str | Path = DEFAULT_OUTPUT, methods: Optional[list[str]] = None,
            overrides: Optional[dict[str, Any]] = None, quick: bool = False, out=None, **_ignored) -> list[dict[str, Any]]:
    """Run the compare study (skipping finished runs) and write the comparison table.

    Args:
        config_path: base configuration (default: the study's, configs/demo/food_reviews_minilm.yaml).
        output_dir: one sub-directory per method plus compare.csv / compare.md and study.log.
        methods: method names (default: every registered method whose ``compare_by_default`` is set,
            i.e. all but ``full``); an unknown name is an error, raised before anything is built or trained.
        overrides: dotted-key overrides applied to every run.
        quick: the study's smoke scale: tiny subset and three steps per run (numbers mean nothing).
        out: where progress and the table are printed (default: the current sys.stdout).

    Returns:
        One row per method (the columns of compare.csv).
    """
    from ..analysis import tables  # lazy: pandas and torch; `peftlab compare --help` imports this module
    from ..methods import METHODS, table_order  # lazy: torch, as above

    unknown = [m for m in (methods or []) if m not in METHODS]
    if unknown:
        raise PeftlabError(
            f"compare --methods: unknown method(s) {', '.join(repr(m) for m in unknown)}."
            f"{''.join(suggest(m, METHODS) for m in unknown)} Registered: {', '.join(table_order(METHODS))}."
        )
    out = out if out is not None else sys.stdout  # looked up per call, not bound at import
    output_dir = Path(output_dir).expanduser()
    spec, wanted = compare_study(config_path, methods, overrides, quick)
    trials = expand(spec, output_dir)
    base_cfg = trials[0].cfg if trials else None
    print(f"peftlab compare: {base_cfg.model.name if base_cfg else '-'} on {base_cfg.data.dataset if base_cfg else '-'}; "
          f"methods {', '.join(wanted)} -> {output_dir}", file=out)
    if base_cfg is None:
        raise PeftlabError(f"none of the methods {wanted} is registered here (registered: {', '.join(sorted(METHODS))}).")
    ref = tables.compare_reference(base_cfg)
    maj = ref["majority"]
    print(f"LoRA reference: r={ref['r']} on {ref['targets']} = {ref['lora_params']:,} adapter parameters; "
          f"majority class ({maj['label']}) val accuracy {maj['val_accuracy']:.4f}", file=out)
    by_method = {t.arm: t for t in trials}
    for i, m in enumerate(wanted, 1):
        if m not in by_method:
            print(f"[{i}/{len(wanted)}] {m}: not available in this installation, skipped", file=out)
        elif trial_status(by_method[m].cfg, by_method[m].run_dir)[0] == "done":
            print(f"[{i}/{len(wanted)}] {m}: already completed in {by_method[m].run_dir}, reusing its results", file=out)
    t_all = time.time()
    output_dir.mkdir(parents=True, exist_ok=True)
    quiet = open(output_dir / ".compare-console.log", "a")  # the study log is in study.log; the console gets one line per run
    try:
        sweep(spec, trials, out=quiet)
    finally:
        quiet.close()
    ends = {e.get("run"): e for e in read_events(output_dir) if e.get("event") == "end"}
    rows: list[dict[str, Any]] = []
    for m in wanted:
        if m not in by_method:
            rows.append(tables.compare_row(m, "unavailable", None, "", f"not registered here (registered: {', '.join(sorted(METHODS))})"))
            continue
        t = by_method[m]
        res_path = t.run_dir / "results_final.json"
        res = json.loads(res_path.read_text()) if res_path.is_file() else {}
        if trial_status(t.cfg, t.run_dir)[0] == "done":
            rows.append(tables.compare_row(m, "completed", res, t.run_dir, t.budget_note))
            print(f"    {m}: val accuracy {res.get('final', {}).get('val_accuracy', float('nan')):.4f}", file=out)
        else:
            err = ends.get(t.name, {}).get("error", "") or "did not finish"
            rows.append(tables.compare_row(m, "failed", res, t.run_dir, f"{t.budget_note}; {err}"))
            print(f"    {m}: failed: {err}", file=out)
    rows.append(tables.compare_row("majority class", "baseline", {"final": maj, "trainable_params": 0, "effective_params": 0},
                                   "", f"always predicts {maj['label']}"))
    ran = [r for r in rows if r["status"] not in ("baseline", "unavailable")]
    complete = bool(ran) and all(r["status"] == "completed" for r in ran)
    stem = "compare" if complete or not (output_dir / "compare.csv").is_file() else "compare.incomplete"
    tables.write_compare_tables(rows, output_dir, stem)
    if stem != "compare":
        print(f"\nnot every run completed: the previous {output_dir / 'compare.csv'} is kept; this attempt's table is "
              f"{output_dir / (stem + '.md')}", file=out)
    print("", file=out)
    print(tables.compare_markdown(rows, with_dirs=False), file=out)
    print(f"\nrun directories ({time.time() - t_all:.0f}s in all; study log {output_dir / 'study.log'}):", file=out)
    for r in rows:
        if r["run_dir"]:
            print(f"  {r['method']:<10} {r['run_dir']}", file=out)
    print(f"table: {output_dir / (stem + '.md')} and {output_dir / (stem + '.csv')}", file=out)
    return rows


def cmd_compare(args, extra: list[str]) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods is not None else None
    if methods == []:  # `--methods ,` or `--methods ""`: not "every method"
        raise PeftlabError(f"compare --methods {args.methods!r} names no method; give comma-separated names, e.g. "
                           "--methods lora,dora, or leave --methods out to compare every default method.")
    try:
        rows = compare(args.config, args.output_dir, methods, parse_overrides(extra), quick=args.quick)
    except KeyboardInterrupt:
        print("interrupted; run the same `peftlab compare` command again to resume (finished runs are reused)", file=sys.stderr)
        return 130
    ran = [r for r in rows if r["status"] not in ("baseline", "unavailable")]
    return 0 if ran and all(r["status"] == "completed" for r in ran) else 1


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="train several PEFT methods on one task at matched budgets and print one table",
        description="Train LoRA, DoRA and every other registered method on a base config (default: MiniLM on food-reviews, "
                    "CPU, a few minutes) at parameter budgets matched to LoRA's, then print and save one table. "
                    "Finished runs are reused, so an interrupted comparison resumes. This runs the compare study: "
                    "`peftlab sweep configs/studies/compare.yaml --preset-scale=cpu` does the same with the study's own layout.",
        epilog="Overrides for every run: --section.key=value, e.g. --training.epochs=2 --lora.r=4.")
    p.add_argument("--config", default=None, help=f"base config (default {DEFAULT_CONFIG.relative_to(ROOT)})")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT, help=f"where run directories and compare.csv/.md go (default {DEFAULT_OUTPUT})")
    p.add_argument("--methods", default=None, help="comma-separated method names (default: every registered method except full)")
    p.add_argument("--quick", action="store_true", help="tiny subset, three steps per run: checks the pipeline in seconds (numbers mean nothing)")
    p.add_argument("--verbose", action="store_true", help="(kept for old scripts) each run's console output is in OUTPUT_DIR/.study/output/")
    p.set_defaults(func=cmd_compare)
