"""``peftlab compare``: several PEFT methods on one real task at matched parameter budgets,
one table at the end.

    peftlab compare                                   # every registered method, MiniLM on food-reviews
    peftlab compare --methods lora,dora --output-dir runs/cmp --training.epochs=2

Each method becomes one ordinary run (``load_config`` + ``train``) in
``OUTPUT_DIR/<method>/``, trained in a fresh child process so that its peak memory (the
process's maximum resident set) is its own. Runs whose ``results_final.json`` says
``completed`` are not trained again, so an interrupted comparison resumes where it
stopped. The table goes to the console, ``compare.csv`` and ``compare.md``.

Budgets are matched to LoRA at rank ``r = lora.r`` of the base config, as each method states
in ``Method.budget_overrides`` (no method names are tested here): SoRA/SDoRA start
at the same rank, BA-LoRA gets LoRA's adapter parameter count as its budget, DoRA adds
its magnitude vectors, rSVD projects the gradients of *all* weights to rank ``r`` (it
trains the full model; its optimizer state is what is low-rank), and ``full`` trains
everything. This module is deliberately small: the study runner (``peftlab sweep`` /
``analyze``) supersedes it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import PeftlabError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo" / "food_reviews_minilm.yaml"
DEFAULT_OUTPUT = "runs/compare"
# Order of the table; methods registered later and not listed here follow alphabetically.
PREFERRED_ORDER = ["lora", "dora", "sora", "sdora", "ba_lora", "rsvd", "full", "sublora"]
QUICK = {  # --quick: a smoke test of the whole pipeline in seconds, not a result
    "data.max_train_examples": 48, "data.max_val_examples": 32, "data.max_length": 32,
    "training.batch_size": 8, "training.max_steps": 3, "training.epochs": 1, "training.log_steps": 1,
}
COLUMNS = ["method", "status", "trainable_params", "effective_params", "val_accuracy", "val_f1", "wall_time_s",
           "peak_memory_mb", "run_dir", "note"]


@dataclass
class PlannedRun:
    method: str
    overrides: dict[str, Any]
    note: str
    run_dir: Path
    result: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------ planning
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
    from .train.metrics import f1_score

    ref["majority"] = {"label": (raw.label_names or [str(major)])[major], "val_accuracy": counts[major] / len(labels),
                       "val_f1": f1_score([major] * len(labels), labels, raw.num_labels)}
    return ref


def plan_runs(methods: list[str], ref: dict[str, Any], output_dir: Path, cfg=None) -> list[PlannedRun]:
    """Overrides per method that match LoRA's budget, as each method states it
    (``Method.budget_overrides``)."""
    r, budget = ref["r"], ref["lora_params"]
    from .methods import METHODS

    runs = []
    for m in methods:
        extra, note = METHODS[m].budget_overrides(cfg, budget, r)
        ov: dict[str, Any] = {"method": m, **extra, "output.dir": str(output_dir / m)}
        runs.append(PlannedRun(m, ov, note, output_dir / m))
    return runs


# ------------------------------------------------------------------------- running
def finished_result(run_dir: Path, cfg) -> Optional[dict]:
    """results_final of a completed run with the same settings, else None.

    Raises:
        PeftlabError: the directory holds a run with other settings.
    """
    from .runs import RunDir, identity_diff

    run = RunDir(run_dir)
    done = run.results_path
    stored = run.config_dict()
    diff = identity_diff(stored, cfg) if stored is not None else []
    if diff:
        raise PeftlabError(
            f"{run_dir} holds a run with other settings than this comparison asks for ({'; '.join(diff[:3])}). Delete it, or give "
            "another --output-dir."
        )
    if done.is_file():
        res = json.loads(done.read_text())
        if res.get("status") == "completed":
            return res
    return None


def _train_child(config_path: Optional[str], overrides: dict, console: bool) -> dict:
    """Runs in a fresh process: build the config and train; errors come back as a dict."""
    import traceback

    from .cli import quiet_libraries
    from .config import load_config
    from .train import train

    quiet_libraries()
    try:
        return train(load_config(config_path, overrides), console=console)
    except PeftlabError as e:
        return {"status": "failed", "error": str(e)}
    except Exception as e:  # a method that cannot handle this task must not stop the others
        return {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def _run_isolated(config_path: Optional[str], overrides: dict, console: bool) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_train_child, config_path, overrides, console).result()


def compare(config_path: Optional[str | Path] = None, output_dir: str | Path = DEFAULT_OUTPUT, methods: Optional[list[str]] = None,
            overrides: Optional[dict[str, Any]] = None, quick: bool = False, isolate: bool = True,
            console: bool = False, out=None) -> list[dict[str, Any]]:
    """Train every method (skipping finished runs) and write the comparison table.

    Args:
        config_path: base configuration (default: configs/demo/food_reviews_minilm.yaml).
        output_dir: one sub-directory per method plus compare.csv / compare.md.
        methods: method names (default: every registered method); unknown names become
            ``unavailable`` rows instead of errors, so a list written for a later version works.
        overrides: dotted-key overrides applied to every run.
        quick: tiny subset and three steps per run (a smoke test, not a result).
        isolate: train each run in a fresh process so peak memory is per run.
        console: let each run log to the console as well as its train.log.
        out: where progress and the table are printed (default: the current sys.stdout).

    Returns:
        One row per method (the columns of compare.csv).
    """
    from .config import load_config
    from .errors import ConfigError
    from .methods import METHODS

    out = out if out is not None else sys.stdout  # looked up per call, not bound at import
    if config_path is None:
        if not DEFAULT_CONFIG.is_file():
            raise PeftlabError(f"The default base config {DEFAULT_CONFIG} is not there (peftlab installed without its configs/?); pass --config.")
        config_path = DEFAULT_CONFIG
    config_path = str(config_path)
    output_dir = Path(output_dir).expanduser()
    base_ov = dict(QUICK) if quick else {}
    base_ov.update(overrides or {})
    base_ov.setdefault("logging.progress_bar", False)
    base_cfg = load_config(config_path, {**base_ov, "method": "lora", "output.dir": str(output_dir / "lora")})

    registered = list(METHODS)
    # `full` is the slowest arm (every weight and its AdamW state); ask for it with --methods.
    wanted = [m for m in method_order(registered) if METHODS[m].compare_by_default] if not methods else list(dict.fromkeys(methods))
    available = [m for m in wanted if m in METHODS]
    print(f"peftlab compare: {base_cfg.model.name} on {base_cfg.data.dataset}; methods {', '.join(wanted)} -> {output_dir}", file=out)
    ref = budget_reference(base_cfg)
    maj = ref["majority"]
    print(f"LoRA reference: r={ref['r']} on {ref['targets']} = {ref['lora_params']:,} adapter parameters; "
          f"majority class ({maj['label']}) val accuracy {maj['val_accuracy']:.4f}", file=out)
    planned = {p.method: p for p in plan_runs(available, ref, output_dir, base_cfg)}

    rows: list[dict[str, Any]] = []
    t_all = time.time()
    for i, m in enumerate(wanted, 1):
        if m not in planned:
            rows.append(_row(m, "unavailable", None, "", f"not registered here (registered: {', '.join(sorted(registered))})"))
            print(f"[{i}/{len(wanted)}] {m}: not available in this installation, skipped", file=out)
            continue
        p = planned[m]
        ov = {**base_ov, **p.overrides}
        try:
            cfg = load_config(config_path, ov)
            res = finished_result(p.run_dir, cfg)
        except (ConfigError, PeftlabError) as e:
            rows.append(_row(m, "failed", None, p.run_dir, f"{p.note}; {str(e).splitlines()[0]}"))
            print(f"[{i}/{len(wanted)}] {m}: cannot run: {str(e).splitlines()[0]}", file=out)
            continue
        if res is not None:
            print(f"[{i}/{len(wanted)}] {m}: already completed in {p.run_dir}, reusing its results", file=out)
        else:
            if (p.run_dir / "config.json").is_file():
                ov["training.resume_from"] = "latest"
            print(f"[{i}/{len(wanted)}] {m}: training ({p.note}) ...", file=out, flush=True)
            t0 = time.time()
            if isolate:
                res = _run_isolated(config_path, ov, console)
            else:
                res = _train_child(config_path, ov, console)
            status = res.get("status")
            if status == "completed":
                print(f"    done in {time.time() - t0:.0f}s: val accuracy {res['final'].get('val_accuracy', float('nan')):.4f}", file=out)
            else:
                print(f"    {status}: {res.get('error', '')}", file=out)
        rows.append(_row(m, res.get("status", "failed"), res, p.run_dir, p.note if res.get("status") == "completed" else f"{p.note}; {res.get('error', '')}"))
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
    print(f"\nrun directories ({time.time() - t_all:.0f}s in all):", file=out)
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
    from .checkpoints import atomic_write_text
    from .tracking import write_csv

    write_csv(output_dir / f"{stem}.csv", COLUMNS, rows)
    atomic_write_text(output_dir / f"{stem}.md", markdown_table(rows) + "\n")


# ----------------------------------------------------------------------------- CLI
def cmd_compare(args, extra: list[str]) -> int:
    from .config import parse_overrides

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    try:
        rows = compare(args.config, args.output_dir, methods, parse_overrides(extra), quick=args.quick, console=args.verbose)
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
                    "Finished runs are reused, so an interrupted comparison resumes.",
        epilog="Overrides for every run: --section.key=value, e.g. --training.epochs=2 --lora.r=4.")
    p.add_argument("--config", default=None, help=f"base config (default {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[2])})")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT, help=f"where run directories and compare.csv/.md go (default {DEFAULT_OUTPUT})")
    p.add_argument("--methods", default=None, help="comma-separated method names (default: every registered method except full)")
    p.add_argument("--quick", action="store_true", help="tiny subset, three steps per run: checks the pipeline in seconds (numbers mean nothing)")
    p.add_argument("--verbose", action="store_true", help="show each run's log on the console")
    p.set_defaults(func=cmd_compare)
