"""``report.html``: one self-contained page (images inlined as base64, inline CSS, no scripts,
no network) with the study's settings, the tables, every plot and the hypothesis statements."""

from __future__ import annotations

import base64
import datetime as _dt
import html
from pathlib import Path

import pandas as pd

from .collect import Study
from .hypotheses import Finding, needs_text

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1b1b1b;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;font-size:.86em;margin:.6em 0}th,td{padding:.25em .6em;border-bottom:1px solid #e4e4e4;
text-align:left;vertical-align:top}th{border-bottom:2px solid #999}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.meta{color:#555}.note{color:#8a5a00}.fig{margin:1em 0 1.6em}.fig img{max-width:100%;height:auto;border:1px solid #eee}
.fig figcaption{font-size:.85em;color:#555}.verdict{font-weight:600;padding:.05em .4em;border-radius:3px}
.supported{background:#dff3e4}.not-supported{background:#fbe3e3}.inconclusive{background:#f3efd9}
.scroll{overflow-x:auto}code{background:#f5f5f5;padding:0 .25em}
"""


def _table_html(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p class='meta'>(empty)</p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for _, r in df.iterrows():
        cells = []
        for v in r.values:
            s = "" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v)
            num = isinstance(v, (int, float)) or (s[:1].isdigit() or s[:1] == "-" and s[1:2].isdigit())
            cells.append(f"<td class='num'>{html.escape(s)}</td>" if num else f"<td>{html.escape(s)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img src='data:image/png;base64,{data}' alt='{html.escape(alt, quote=True)}'>"


def _settings(study: Study) -> pd.DataFrame:
    """Configuration keys shared by every run (the study's fixed settings)."""
    if not study.runs:
        return pd.DataFrame()
    first = study.runs[0].config
    rows = []
    for k, v in first.items():
        if k in study.varying or k.startswith(("output.", "logging.")):
            continue
        if all(r.config.get(k, v) == v for r in study.runs):
            rows.append({"key": k, "value": "" if v is None else str(v)})
    return pd.DataFrame(rows)


def write_report(study: Study, out_dir: Path, summary_show: pd.DataFrame, comparison: pd.DataFrame,
                 plots: list[tuple[str, str]], notes: list[str], findings: list[Finding], tables: dict[str, Path]) -> Path:
    t = study.table
    n_done = int((t["status"] == "completed").sum())
    methods = ", ".join(sorted(t["method"].astype(str).unique()))
    parts: list[str] = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        "<link rel='icon' href='data:,'>",
        f"<title>peftlab analysis: {html.escape(study.name)}</title><style>{CSS}</style></head><body>",
        f"<h1>Study {html.escape(study.name)}</h1>",
        f"<p class='meta'>{html.escape(str(study.root))} · {len(t)} runs ({n_done} completed) · methods: {html.escape(methods)}"
        f" · task: {html.escape(str(study.task or 'mixed'))} · generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}"
        " by <code>peftlab analyze</code></p>",
    ]
    if study.varying:
        parts.append("<p>Varying settings: " + ", ".join(f"<code>{html.escape(k)}</code>" for k in study.varying) + ".</p>")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li class='note'>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Hypotheses</h2>")
    if findings:
        parts.append("<ul>")
        for f in findings:
            cls = f.verdict.replace(" ", "-")
            parts.append(f"<li><b>{html.escape(f.hypothesis)}</b>: <span class='verdict {cls}'>{html.escape(f.verdict)}</span>. "
                         f"{html.escape(f.text)}</li>")
        parts.append("</ul>")
    else:
        parts.append("<p class='meta'>None of the seeds' hypotheses applies to the runs of this study "
                     f"(they need {html.escape(needs_text())}).</p>")
    parts.append("<h2>Summary (mean ± std over seeds)</h2>" + _table_html(summary_show))
    parts.append("<h2>Comparison</h2>" + _table_html(_round(comparison)))
    parts.append("<h2>Plots</h2>")
    family = None
    for fam, stem in plots:
        if fam != family:
            parts.append(f"<h3>{html.escape(fam)}</h3>")
            family = fam
        png = out_dir / f"{stem}.png"
        parts.append(f"<figure class='fig'>{_img(png, stem)}<figcaption>{html.escape(stem)} "
                     f"(<a href='{html.escape(stem)}.svg'>SVG</a>)</figcaption></figure>")
    if not plots:
        parts.append("<p class='meta'>No plot had its data.</p>")
    settings = _settings(study)
    parts.append(f"<h2>Settings shared by every run</h2><details><summary>{len(settings)} keys</summary>"
                 + _table_html(settings) + "</details>")
    parts.append("<h2>Files</h2><ul>" + "".join(f"<li><a href='{html.escape(p.name)}'>{html.escape(p.name)}</a></li>"
                                               for p in tables.values()) + "</ul>")
    parts.append("</body></html>")
    path = out_dir / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _round(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for c in out.columns:
        if pd.api.types.is_float_dtype(out[c]):
            out[c] = out[c].map(lambda v: "" if pd.isna(v) else f"{v:.4g}")
    return out

