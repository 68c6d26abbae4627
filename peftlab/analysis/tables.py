"""Tables: the per-group summary (CSV, booktabs LaTeX, Markdown), the method comparison CSV, the
majority-class baseline, and the one-table-per-task comparison of ``peftlab compare``.

Numbers are written as ``mean ± std`` rounded to the precision the spread supports (two
significant digits of the standard deviation); the CSV files keep full-precision mean and
std columns for further analysis.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from ..build import build_base, resolve_task, weight_shapes
from ..config import config_from_dict
from ..data import load_raw
from ..errors import PeftlabError
from ..evaluation import f1_score
from ..io import atomic_write_text, write_csv
from ..methods import METHODS, table_order
from .collect import Study, foreign_size_axis, group_columns, short_name, variant_keys

# (column, header) in display order; a column appears when any group has a value for it.
SUMMARY_METRICS = [
    ("val_accuracy", "accuracy"), ("val_f1", "F1"), ("val_loss", "val. loss"), ("val_perplexity", "perplexity"),
    ("test_accuracy", "test accuracy"), ("test_f1", "test F1"), ("test_perplexity", "test perplexity"),
    ("bounds.empirical_bpd", "BPD"), ("bounds.kl_divergence", "KL (nats)"), ("bounds.bound_value", "bound (bits)"),
    ("compressed_size_kb", "size (KB)"), ("trainable_params", "trainable params"), ("effective_params", "effective params"),
    ("summary.sparsity", "sparsity"), ("optimizer_state_mb", "optimizer state (MiB)"), ("wall_time_s", "wall time (s)"),
    ("peak_memory_mb", "peak memory (MiB)"),
]
COMPARISON_METRICS = ["val_accuracy", "val_f1", "val_loss", "val_perplexity", "test_accuracy", "test_f1", "test_perplexity",
                      "bounds.bound_value", "trainable_params",
                      "effective_params", "wall_time_s", "peak_memory_mb"]
LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                 "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}", "<": r"\textless{}",
                 ">": r"\textgreater{}", "|": r"\textbar{}"}
LATEX_UNICODE = {"±": r"$\pm$", "ρ": r"$\rho$", "λ": r"$\lambda$", "γ": r"$\gamma$", "ℓ": r"$\ell$", "×": r"$\times$",
                 "≤": r"$\leq$", "≥": r"$\geq$", "−": "-", "–": "--", "—": "---", "α": r"$\alpha$", "δ": r"$\delta$"}


def fmt_number(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float) and v.is_integer() and abs(v) >= 100:
        return f"{int(v):,}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        # four significant digits below 10,000; from there up, whole numbers with separators (10,810, not 1.081e+04)
        return f"{v:,.0f}" if 9999.5 <= abs(v) < 1e15 else f"{v:.4g}"
    return str(v)


def fmt_pm(mean: float, std: float) -> str:
    """``mean ± std`` with the mean rounded to the decimals of two significant digits of the std."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    if std is None or math.isnan(std):
        return fmt_number(float(mean))
    if std == 0 or abs(std) <= 1e-9 * abs(mean):  # equal over seeds up to float rounding (1e-17 is no spread)
        return fmt_number(float(mean)) + " ± 0"
    std2 = float(f"{abs(std):.2g}")  # two significant digits first, so 0.0999999 reads as 0.10
    dec = max(0, min(8, 1 - int(math.floor(math.log10(std2)))))
    if dec == 0:
        return f"{mean:,.0f} ± {std:,.0f}"
    return f"{mean:.{dec}f} ± {std:.{dec}f}"


def latex_escape(s: str) -> str:
    out = []
    for ch in str(s):
        if ch in LATEX_SPECIAL:
            out.append(LATEX_SPECIAL[ch])
        elif ch in LATEX_UNICODE:
            out.append(LATEX_UNICODE[ch])
        elif ord(ch) > 127:
            out.append("?")
        else:
            out.append(ch)
    return "".join(out)


def summary_frame(study: Study, agg: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(display table with ``mean ± std`` strings, numeric table with mean/std columns)."""
    keys = [k for k in group_columns(study) if k in agg]
    metrics = [(c, h) for c, h in SUMMARY_METRICS if f"{c}_mean" in agg and agg[f"{c}_mean"].notna().any()]
    show, num = pd.DataFrame(), pd.DataFrame()
    variant = set(variant_keys())
    for k in keys:
        name = "method" if k == "arm" else short_name(k)
        if k not in variant:  # variant keys are already spelled out in the arm's name
            vals = [fmt_number(v) if not isinstance(v, str) else v for v in agg[k]]
            # another method's size (LoRA's rank in a BA-LoRA or SubLoRA run): blank there
            vals = [v if not foreign_size_axis(k, m) else "" for v, m in zip(vals, agg["method"])]
            show[name] = vals
        num[name] = agg[k].values
    show["n"] = agg["n"].values
    num["n"] = agg["n"].values
    num["seeds"] = agg["seeds"].values
    for c, h in metrics:
        show[h] = [fmt_pm(m, s) for m, s in zip(agg[f"{c}_mean"], agg[f"{c}_std"])]
        num[f"{c}_mean"] = agg[f"{c}_mean"].values
        num[f"{c}_std"] = agg[f"{c}_std"].values
    return show, num


def to_latex(show: pd.DataFrame, caption_tex: str, label: str = "tab:peftlab-summary") -> str:
    """A booktabs table; every cell and header is escaped, ``caption_tex`` is already LaTeX."""
    cols = list(show.columns)
    align = "".join("l" if i < len(cols) and not _numeric_col(show[c]) else "r" for i, c in enumerate(cols))
    lines = [
        "% Generated by `peftlab analyze`; needs \\usepackage{booktabs}.",
        "\\begin{table}[t]",
        "\\centering",
        "\\small",
        f"\\caption{{{caption_tex}}}",
        f"\\label{{{label}}}",
        f"\\begin{{tabular}}{{{align}}}",
        "\\toprule",
        " & ".join(latex_escape(c) for c in cols) + " \\\\",
        "\\midrule",
    ]
    for _, row in show.iterrows():
        lines.append(" & ".join(latex_escape(fmt_number(v) if not isinstance(v, str) else v) for v in row.values) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(lines)


def _numeric_col(s: pd.Series) -> bool:
    return s.map(lambda v: isinstance(v, (int, float)) or (isinstance(v, str) and v[:1].isdigit())).all()


def to_markdown(show: pd.DataFrame, align_numbers: bool = True, pipe: str = "\\|") -> str:
    """A Markdown table; numeric columns right-aligned (``align_numbers``), ``|`` in a cell written as ``pipe``."""
    def cell(v) -> str:
        return (fmt_number(v) if not isinstance(v, str) else v).replace("|", pipe).replace("\n", " ")

    cols = list(show.columns)
    lines = ["| " + " | ".join(cell(c) for c in cols) + " |",
             "| " + " | ".join("---:" if align_numbers and _numeric_col(show[c]) else "---" for c in cols) + " |"]
    for _, row in show.iterrows():
        lines.append("| " + " | ".join(cell(v) for v in row.values) + " |")
    return "\n".join(lines) + "\n"


def majority_class(raw) -> dict[str, Any]:
    """The majority-class baseline of a classification dataset (``peftlab.data.load_raw``'s result):
    its label, and the validation accuracy and macro F1 of always predicting it."""
    labels = list(raw.val["label"])
    counts = [labels.count(c) for c in range(raw.num_labels)]
    major = max(range(len(counts)), key=counts.__getitem__)
    return {"label": (raw.label_names or [str(major)])[major], "val_accuracy": counts[major] / len(labels),
            "val_f1": f1_score([major] * len(labels), labels, raw.num_labels), "n_val": len(labels)}


def compare_reference(cfg) -> dict[str, Any]:
    """The reference of ``peftlab compare``'s table for its base config: LoRA's rank ``r``, its adapter
    parameter count on the run's targets, the targets, and the majority-class baseline."""
    raw = load_raw(cfg)
    if raw.task != "classification":
        raise PeftlabError(f"peftlab compare reports accuracy and F1, so it needs a classification dataset; {cfg.data.dataset!r} is {raw.task}.")
    model, _, info = build_base(cfg, *resolve_task(cfg, raw))
    r = cfg.lora.r
    budget = METHODS[cfg.method].budget_params(weight_shapes(model, info.target_modules), r)
    return {"r": r, "lora_params": budget, "targets": info.target_modules,
            "majority": majority_class(raw)}


def majority_baselines(study: Study) -> list[dict[str, Any]]:
    """Majority-class validation accuracy/F1 for each dataset setting of a classification study.

    Read from the data the runs were trained on (``peftlab.data.load_raw``, no tokenization);
    a dataset that cannot be loaded here (not on this machine, hub offline) is skipped with a note.
    """
    if study.task != "classification":
        return []
    seen: dict[str, dict] = {}
    out = []
    for r in study.runs:
        if not r.finished:
            continue
        data = {k: v for k, v in r.config.items() if k.startswith("data.")}
        key = json.dumps(data, sort_keys=True, default=str)
        if key in seen:
            continue
        seen[key] = data
        try:
            # any method will do: only the data section (and the label count) is read
            raw_cfg: dict[str, Any] = {"method": table_order(METHODS)[0], "data": {k.split(".", 1)[1]: v for k, v in data.items()}}
            if r.config.get("model.num_labels") is not None:
                raw_cfg["model"] = {"num_labels": r.config["model.num_labels"]}
            raw = load_raw(config_from_dict(raw_cfg))
            out.append({"dataset": data.get("data.dataset"), **majority_class(raw)})
        except Exception as e:  # a baseline is a courtesy: never fail the analysis for it
            study.notes.append(f"majority-class baseline for {data.get('data.dataset')!r} not computed: {str(e).splitlines()[0][:160]}")
    return out


def comparison_frame(study: Study, agg: pd.DataFrame, baselines: list[dict]) -> pd.DataFrame:
    rows = []
    for g in agg.to_dict("records"):
        row: dict[str, Any] = {"configuration": g["label"], "method": g["method"], "n": g["n"], "seeds": g["seeds"]}
        for m in COMPARISON_METRICS:
            if f"{m}_mean" in g:
                row[f"{m}_mean"] = g[f"{m}_mean"]
                row[f"{m}_std"] = g[f"{m}_std"]
        rows.append(row)
    for b in baselines:
        rows.append({"configuration": f"majority class ({b['label']})" + (f" on {b['dataset']}" if len(baselines) > 1 else ""),
                     "method": "baseline", "n": 1, "seeds": "", "val_accuracy_mean": b["val_accuracy"], "val_f1_mean": b["val_f1"],
                     "trainable_params_mean": 0, "effective_params_mean": 0})
    df = pd.DataFrame(rows)
    return df.dropna(axis=1, how="all")


def write_tables(study: Study, agg: pd.DataFrame, out_dir: Path, baselines: Optional[list[dict]] = None) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    show, num = summary_frame(study, agg)
    paths = {}

    def csv(name: str, df: pd.DataFrame) -> None:
        clean = df.astype(object).where(df.notna(), None)
        clean = clean.map(lambda v: float(f"{v:.10g}") if isinstance(v, float) else v)  # no 0.019999999999999962
        write_csv(out_dir / name, list(df.columns), clean.to_dict("records"))
        paths[name] = out_dir / name

    csv("summary_table.csv", num)
    caption = latex_escape(f"Results of {study.name}: mean ± sample standard deviation over n seeds; "
                           f"headline metric {study.main_metric}.")
    tex = to_latex(show, caption)
    (out_dir / "summary_table.tex").write_text(tex)
    paths["summary_table.tex"] = out_dir / "summary_table.tex"
    (out_dir / "summary_table.md").write_text(to_markdown(show))
    paths["summary_table.md"] = out_dir / "summary_table.md"
    csv("comparison_table.csv", comparison_frame(study, agg, baselines or []))
    runs = study.table.drop(columns=[c for c in study.table.columns if c.startswith("_")])
    csv("runs.csv", runs)
    return paths


# ------------------------------------------------------------------ peftlab compare's table
COMPARE_COLUMNS = ["method", "status", "trainable_params", "effective_params", "val_accuracy", "val_f1", "wall_time_s",
                   "peak_memory_mb", "run_dir", "note"]
COMPARE_HEADS = {"method": "method", "status": "status", "trainable_params": "trainable params",
                 "effective_params": "effective params", "val_accuracy": "val accuracy", "val_f1": "val F1",
                 "wall_time_s": "wall time (s)", "peak_memory_mb": "peak memory (MB)", "run_dir": "run directory", "note": "note"}


def compare_row(method: str, status: str, res: Optional[dict], run_dir, note: str) -> dict[str, Any]:
    """One row of the comparison (the columns of compare.csv) from a run's results_final.json."""
    res = res or {}
    final = res.get("final", {})
    return {"method": method, "status": status, "trainable_params": res.get("trainable_params"),
            "effective_params": res.get("effective_params"), "val_accuracy": final.get("val_accuracy"),
            "val_f1": final.get("val_f1"), "wall_time_s": res.get("wall_time_s"), "peak_memory_mb": res.get("peak_memory_mb"),
            "run_dir": str(run_dir) if run_dir else "", "note": note}


def compare_cell(key: str, v) -> str:
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


def compare_markdown(rows: list[dict], with_dirs: bool = True) -> str:
    """The comparison as a Markdown table (no trailing newline); ``|`` in a note is written ``/``."""
    cols = [c for c in COMPARE_COLUMNS if with_dirs or c != "run_dir"]
    show = pd.DataFrame([[compare_cell(c, r[c]) for c in cols] for r in rows], columns=[COMPARE_HEADS[c] for c in cols])
    return to_markdown(show, align_numbers=False, pipe="/").rstrip("\n")


def write_compare_tables(rows: list[dict], output_dir: Path, stem: str = "compare") -> None:
    """``<stem>.csv`` and ``<stem>.md`` (``peftlab compare`` writes a comparison in which some run failed
    or was refused as ``compare.incomplete.*`` when a ``compare.csv`` exists: it never replaces a good table)."""
    write_csv(output_dir / f"{stem}.csv", COMPARE_COLUMNS, rows)
    atomic_write_text(output_dir / f"{stem}.md", compare_markdown(rows) + "\n")
