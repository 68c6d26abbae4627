"""``peftlab compare``: several PEFT methods on one real task at matched parameter budgets,
one table at the end — a thin alias of the compare study.

    peftlab compare                                   # = peftlab sweep configs/studies/compare.yaml --preset-scale=cpu
    peftlab compare --methods lora,dora --output-dir runs/cmp --training.epochs=2

Each method is one arm of ``configs/studies/compare.yaml`` (methods the file does not list
get an arm that only sets ``method``), run by the study runner (:mod:`peftlab.studies`):
one ordinary run per method in ``OUTPUT_DIR/<method>/``, each in its own process (so its
peak memory is its own), finished runs reused, interrupted ones resumed, ``study.log``
beside them. Budgets are matched to LoRA at rank ``lora.r`` as each method states in
``Method.budget_overrides``. The table goes to the console, ``compare.csv`` and
``compare.md``, with the majority-class baseline as its last row.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .errors import PeftlabError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo" / "food_reviews_minilm.yaml"
COMPARE_STUDY = Path(__file__).resolve().parent.parent / "configs" / "studies" / "compare.yaml"
DEFAULT_OUTPUT = "runs/compare"
# Order of the table; methods registered later and not listed here follow alphabetically.
PREFERRED_ORDER = ["lora", "dora", "sora", "sdora", "ba_lora", "rsvd", "full", "sublora"]
COLUMNS = ["method", "status", "trainable_params", "effective_params", "val_accuracy", "val_f1", "wall_time_s",
           "peak_memory_mb", "run_dir", "note"]


def method_order(registered: list[str]) -> list[str]:
    known = [m for m in PREFERRED_ORDER if m in registered]
    return known + sorted(m for m in registered if m not in known)


def lora_adapter_params(model, targets: list[str], r: int) -> int:
    """Parameters of rank-``r`` LoRA on ``targets``: sum of r * (d_in + d_out) over adapted layers."""
    from .models import check_targets

    total = 0
    for name in check_targets(model, targets):
        w = model.get_submodule(name).weight
        # nn.Linear stores (d_out, d_in), GPT-2's Conv1D (d_in, d_out); the sum is the same.
        total += r * (w.shape[0] + w.shape[1])
    return total


def budget_reference(cfg) -> dict[str, Any]:
    """LoRA's rank, adapter parameter count and the majority-class baseline of the base config."""
    from .build import build_base, resolve_task
    from .data import load_raw

    raw = load_raw(cfg)
    if raw.task != "classification":
        raise PeftlabError(f"peftlab compare reports accuracy and F1, so it needs a classification dataset; {cfg.data.dataset!r} is {raw.task}.")
    model, _, info = build_base(cfg, *resolve_task(cfg, raw))
    r = cfg.lora.r
    ref = {"r": r, "lora_params": lora_adapter_params(model, info.target_modules, r), "targets": info.target_modules}
    labels = raw.val["label"]
    counts = [labels.count(c) for c in range(raw.num_labels)]
    major = max(range(len(counts)), key=counts.__getitem__)
    from .evaluation import f1_score

    ref["majority"] = {"label": (raw.label_names or [str(major)])[major], "val_accuracy": counts[major] / len(labels),
                       "val_f1": f1_score([major] * len(labels), labels, raw.num_labels)}
    return ref


def compare_study(config_path: Optional[str | Path] = None, methods: Optional[list[str]] = None,
                  overrides: Optional[dict[str, Any]] = None, quick: bool = False):
    """The compare study for these arguments: (spec, wanted methods in table order)."""
    from .methods import METHODS
    from .studies.spec import ArmSection, load_study

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
        wanted = [m for m in method_order(list(METHODS)) if getattr(METHODS[m], "compare_by_default", m != "full")]
    arms = {a.name: a for a in full.arms}
    spec.arms = [arms.get(m) or ArmSection(name=m, overrides={"method": m}) for m in wanted if m in METHODS]
    return spec, wanted


def compare(config_path: Optional[str | Path] = None, output_dir: str | Path = DEFAULT_OUTPUT, methods: Optional[list[str]] = None,
            overrides: Optional[dict[str, Any]] = None, quick: bool = False, out=None, **_ignored) -> list[dict[str, Any]]:
    """Run the compare study (skipping finished runs) and write the comparison table.

    Args:
        config_path: base configuration (default: the study's, configs/demo/food_reviews_minilm.yaml).
        output_dir: one sub-directory per method plus compare.csv / compare.md and study.log.
        methods: method names (default: every registered method except ``full``); an unknown
            name is an error, raised before anything is built or trained.
        overrides: dotted-key overrides applied to every run.
        quick: the study's smoke scale: tiny subset and three steps per run (numbers mean nothing).
        out: where progress and the table are printed (default: the current sys.stdout).

    Returns:
        One row per method (the columns of compare.csv).
    """
    from .methods import METHODS
    from .studies.expand import expand
    from .studies.runner import read_events, sweep, trial_status

    unknown = [m for m in (methods or []) if m not in METHODS]
    if unknown:
        from .options import suggest

        raise PeftlabError(
            f"compare --methods: unknown method(s) {', '.join(repr(m) for m in unknown)}."
            f"{''.join(suggest(m, METHODS) for m in unknown)} Registered: {', '.join(method_order(list(METHODS)))}."
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
    ref = budget_reference(base_cfg)
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
    ends = {}
    for e in read_events(output_dir):
        if e.get("event") == "end":
            ends[e.get("run")] = e
    rows: list[dict[str, Any]] = []
    for m in wanted:
        if m not in by_method:
            rows.append(_row(m, "unavailable", None, "", f"not registered here (registered: {', '.join(sorted(METHODS))})"))
            continue
        t = by_method[m]
        res_path = t.run_dir / "results_final.json"
        res = json.loads(res_path.read_text()) if res_path.is_file() else {}
        if trial_status(t.cfg, t.run_dir)[0] == "done":
            rows.append(_row(m, "completed", res, t.run_dir, t.budget_note))
            print(f"    {m}: val accuracy {res.get('final', {}).get('val_accuracy', float('nan')):.4f}", file=out)
        else:
            err = ends.get(t.name, {}).get("error", "") or "did not finish"
            rows.append(_row(m, "failed", res, t.run_dir, f"{t.budget_note}; {err}"))
            print(f"    {m}: failed: {err}", file=out)
    rows.append(_row("majority class", "baseline", {"final": maj, "trainable_params": 0, "effective_params": 0}, "",
                     f"always predicts {maj['label']}"))
    output_dir.mkdir(parents=True, exist_ok=True)
    ran = [r for r in rows if r["status"] not in ("baseline", "unavailable")]
    complete = bool(ran) and all(r["status"] == "completed" for r in ran)
    stem = "compare" if complete or not (output_dir / "compare.csv").is_file() else "compare.incomplete"
    write_tables(rows, output_dir, stem)
    if stem != "compare":
        print(f"\nnot every run completed: the previous {output_dir / 'compare.csv'} is kept; this attempt's table is "
              f"{output_dir / (stem + '.md')}", file=out)
    print("", file=out)
    print(markdown_table(rows, with_dirs=False), file=out)
    print(f"\nrun directories ({time.time() - t_all:.0f}s in all; study log {output_dir / 'study.log'}):", file=out)
    for r in rows:
        if r["run_dir"]:
            print(f"  {r['method']:<10} {r['run_dir']}", file=out)
    print(f"table: {output_dir / (stem + '.md')} and {output_dir / (stem + '.csv')}", file=out)
    return rows


def _row(method: str, status: str, res: Optional[dict], run_dir, note: str) -> dict[str, Any]:
    res = res or {}
    final = res.get("final", {})
    return {"method": method, "status": status, "trainable_params": res.get("trainable_params"),
            "effective_params": res.get("effective_params"), "val_accuracy": final.get("val_accuracy"),
            "val_f1": final.get("val_f1"), "wall_time_s": res.get("wall_time_s"), "peak_memory_mb": res.get("peak_memory_mb"),
            "run_dir": str(run_dir) if run_dir else "", "note": note}


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if key in ("trainable_params", "effective_params"):
        return f"{int(v):,}"
    if key in ("val_accuracy", "val_f1"):
        return f"{v:.4f}"
    if key == "wall_time_s":
        return f"{v:.1f}" if v < 100 else f"{v:.0f}"
    if key == "peak_memory_mb":
        return f"{v:.0f}"
    return str(v)


def markdown_table(rows: list[dict], with_dirs: bool = True) -> str:
    heads = {"method": "method", "status": "status", "trainable_params": "trainable params", "effective_params": "effective params",
             "val_accuracy": "val accuracy", "val_f1": "val F1", "wall_time_s": "wall time (s)", "peak_memory_mb": "peak memory (MB)",
             "run_dir": "run directory", "note": "note"}
    cols = [c for c in COLUMNS if with_dirs or c != "run_dir"]
    lines = ["| " + " | ".join(heads[c] for c in cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(c, r[c]).replace("|", "/") for c in cols) + " |")
    return "\n".join(lines)


def write_tables(rows: list[dict], output_dir: Path, stem: str = "compare") -> None:
    """``<stem>.csv`` and ``<stem>.md``. A comparison in which some run failed or was refused
    writes ``compare.incomplete.*`` when a ``compare.csv`` exists, so it never replaces a good table."""
    from .io import atomic_write_text
    from .io import write_csv

    write_csv(output_dir / f"{stem}.csv", COLUMNS, rows)
    atomic_write_text(output_dir / f"{stem}.md", markdown_table(rows) + "\n")


# ----------------------------------------------------------------------------- CLI
def cmd_compare(args, extra: list[str]) -> int:
    from .config import parse_overrides

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
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
    p.add_argument("--config", default=None, help=f"base config (default {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[2])})")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT, help=f"where run directories and compare.csv/.md go (default {DEFAULT_OUTPUT})")
    p.add_argument("--methods", default=None, help="comma-separated method names (default: every registered method except full)")
    p.add_argument("--quick", action="store_true", help="tiny subset, three steps per run: checks the pipeline in seconds (numbers mean nothing)")
    p.add_argument("--verbose", action="store_true", help="(kept for old scripts) each run's console output is in OUTPUT_DIR/.study/output/")
    p.set_defaults(func=cmd_compare)
