"""``peftlab analyze``: tables, the seeds' plots, hypothesis checks and one HTML report per study.

    from peftlab.analysis import analyze
    result = analyze("runs/my_study")            # writes runs/my_study/analysis/
    print(result.report)

Pipeline: :func:`collect.collect` (every run through the run-directory reader into one tidy
table) -> :func:`collect.aggregate` (mean ± std and n over seeds) -> :mod:`tables`,
:mod:`plots`, :mod:`hypotheses` -> :mod:`report`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..io import strict_json_dumps
from .collect import Study, aggregate, collect
from .hypotheses import check_all, finding_dict
from .plots import PlotContext, make_plots
from .report import write_report
from .tables import comparison_frame, majority_baselines, summary_frame, write_tables


@dataclass
class AnalysisResult:
    study: Study
    output_dir: Path
    tables: dict[str, Path]
    plots: list[str]
    notes: list[str]
    findings: list = field(default_factory=list)
    report: Optional[Path] = None


def analyze(study_dir, output_dir=None, baseline: bool = True) -> AnalysisResult:
    """Analyse every run under ``study_dir`` into ``output_dir`` (default ``study_dir/analysis``)."""
    study = collect(study_dir)
    out = Path(output_dir).expanduser() if output_dir else study.root / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(study)
    baselines = majority_baselines(study) if baseline else []
    tables = write_tables(study, agg, out, baselines)
    ctx = PlotContext(study, agg, out, baseline=baselines[0] if len(baselines) == 1 else None)
    plots, plot_notes = make_plots(ctx)
    findings = check_all(ctx)
    (out / "hypotheses.json").write_text(strict_json_dumps([finding_dict(f) for f in findings], indent=2) + "\n")
    tables["hypotheses.json"] = out / "hypotheses.json"
    notes = list(study.notes) + plot_notes
    show, _ = summary_frame(study, agg)
    report = write_report(study, out, show, comparison_frame(study, agg, baselines), plots, notes, findings, tables)
    return AnalysisResult(study=study, output_dir=out, tables=tables, plots=[s for _, s in plots], notes=notes,
                          findings=findings, report=report)


__all__ = ["analyze", "AnalysisResult", "collect", "aggregate"]
