"""Write a study's results page, docs/results/<study>/README.md, from what a sweep left.

    python scripts/results_page.py SOURCE --study subspace_allocation [--scale gpu] [--docs docs/results] [--estimate FILE]

SOURCE is a study directory (runs/studies/<study>-gpu) or the folder benchmarks/gpu_studies.sh copies to
$OUT/<study>/ (study.log, study.jsonl, analysis/, runs/). The page gets, from the files alone: the scale's own
description and what stands in for the seed's data and model (the comment block of the scale in the study YAML),
the command, the measured time of each phase (train, bounds, profile, analyze) and in total, `peftlab estimate`'s
per-run estimate against the measured run times (``--estimate``, the JSON of ``peftlab estimate --json``), the hypothesis
checks, the summary table, every plot, and a note of what the analysis skipped. Copied next to it: the PNGs, the
summary tables (CSV, LaTeX, Markdown), hypotheses.json and study.log; no weights.

What the numbers do and do not show needs a person: the page has a section for it that the generator fills with
the facts it knows (model from scratch or not, data standing in, seeds, steps) and marks for the reader to finish
when it is empty. Rerunning the generator keeps a finished section (between its two markers).
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEEP_START, KEEP_END = "<!-- reading: kept when regenerated -->", "<!-- /reading -->"
TABLES = ("summary_table.csv", "summary_table.tex", "summary_table.md", "comparison_table.csv", "hypotheses.json")


def fmt_s(s: float) -> str:
    s = int(round(s))
    m, s = divmod(s, 60)
    return f"{m}m {s:02d}s" if m else f"{s}s"


def scale_comment(study_yaml: Path, scale: str) -> tuple[str, str]:
    """(the comment block under `  <scale>:` in the study file, the scale's description)."""
    lines = study_yaml.read_text(encoding="utf-8").splitlines()
    out, desc, inside = [], "", False
    for ln in lines:
        if re.match(rf"^  {re.escape(scale)}:\s*$", ln):
            inside = True
            continue
        if inside:
            m = re.match(r"^    #\s?(.*)$", ln)
            if m:
                out.append(m.group(1))
                continue
            d = re.match(r"^    description:\s*(.*)$", ln)
            if d:
                desc = d.group(1).strip()
            if re.match(r"^  \S", ln):
                break
    return " ".join(out), desc


def events(source: Path) -> list[dict]:
    p = source / "study.jsonl"
    out = []
    for line in p.read_text(encoding="utf-8").splitlines() if p.is_file() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def step_name(e: dict) -> str:
    """The command of a study step's event (``analyze`` of ``analyze x --output-dir y``)."""
    return str(e.get("step", "?")).split()[0]


def phases(evs: list[dict]) -> tuple[dict[str, float], int, float]:
    """Seconds per phase over the completed runs and study steps, the runs completed, and the sweeps' wall time."""
    ph: dict[str, float] = {}
    runs = 0
    for e in evs:
        if e.get("event") == "end" and e.get("outcome") == "completed":
            runs += 1
            for k, v in (e.get("phases") or {}).items():
                ph[k] = ph.get(k, 0.0) + v
        elif e.get("event") in ("study_step", "before_step") and e.get("outcome") == "completed":
            k = step_name(e)
            ph[k] = ph.get(k, 0.0) + float(e.get("duration_s") or 0.0)
    return ph, runs, sweep_wall(evs)[0]


def sweep_wall(evs: list[dict]) -> tuple[float, int]:
    """The sweeps' wall time and how many sweeps there were: each from its ``sweep_start`` to its ``sweep_end``, or to
    its last event when it was interrupted (a slice that reached its wall limit writes no ``sweep_end``)."""
    wall, n, t0, last = 0.0, 0, None, None
    for e in evs + [{"event": "sweep_start"}]:
        if e.get("event") == "sweep_start":
            if t0 is not None and last is not None:
                wall, n = wall + (last - t0), n + 1
            t0, last = e.get("time"), e.get("time")
        elif e.get("time") is not None and t0 is not None:
            last = float(e["time"])
    return wall, n


def estimate_lines(est: dict, evs: list[dict]) -> list[str]:
    """`peftlab estimate --json` against the measured duration of each run it estimated (all its recorded attempts in
    study.jsonl) and of the study steps; the ratio over the runs in both."""
    # a run's measured time: every attempt the sweeps recorded (a slice cut after training leaves a later
    # follow-ups-only attempt; an attempt killed by a wall limit before its `end` event is not recorded)
    completed = {e["run"] for e in evs if e.get("event") == "end" and e.get("outcome") == "completed"}
    measured: dict[str, float] = {}
    for e in evs:
        if e.get("event") == "end" and e.get("run") in completed and "duration_s" in e:
            measured[e["run"]] = measured.get(e["run"], 0.0) + float(e["duration_s"])
    steps: dict[str, float] = {}
    for e in evs:
        if e.get("event") == "study_step" and e.get("outcome") == "completed":
            steps[step_name(e)] = float(e.get("duration_s") or 0.0)  # the last sweep's, as the estimate times it once
    rows = [(r["name"], r["seconds"], measured[r["name"]]) for r in est.get("runs", [])
            if r.get("status") != "done" and r["name"] in measured and r["seconds"] > 0]
    rows += [(f"(study step: {s['name']})", s["seconds"], steps[s["name"]]) for s in est.get("study_steps", [])
             if s["name"] in steps and s["seconds"] > 0]
    if not rows:
        return ["## `peftlab estimate` against the measured time", "",
                "The estimate shares no finished run with this sweep (it was run after the runs, or for others).", ""]
    e_tot, m_tot = sum(r[1] for r in rows), sum(r[2] for r in rows)
    ratios = sorted(m / e for _, e, m in rows)
    out = ["## `peftlab estimate` against the measured time", "",
           f"`peftlab estimate --json` covered {len(rows)} of the measured runs and steps: estimated {fmt_s(e_tot)}, "
           f"measured {fmt_s(m_tot)}, **{m_tot / e_tot:.2f}×** the estimate (per row {ratios[0]:.2f}–{ratios[-1]:.2f}×, "
           f"median {statistics.median(ratios):.2f}×). A run's measured time adds up its recorded attempts.", "",
           "| run | estimated | measured | measured / estimated |", "| --- | ---: | ---: | ---: |"]
    out += [f"| {n} | {fmt_s(e)} | {fmt_s(m)} | {m / e:.2f}× |" for n, e, m in rows]
    slots = int(est.get("slots") or 1)
    if slots > 1:
        # each probe ran alone: on several slots a run's measured time includes the other runs' share of the device,
        # and the study-level check is the estimated wall time against the sweeps'
        sh = est.get("sharing")
        if sh:  # the estimate measured the slowdown of sharing (a probe beside copies of itself) and applied it
            out += ["", f"The sweep ran {slots} runs at a time. The estimate measured what sharing one GPU {sh['ways']} ways "
                    f"costs (steps of {sh['measured_on']} beside {sh['ways'] - 1} copies of its training took {sh['factor']:.2f}× "
                    "their time alone) and applied it to every run, so the ratios above are its error on shared runs."]
        else:
            out += ["", f"The estimate timed each probe alone; the sweep ran {slots} runs at a time, so a measured run time above "
                    "includes the others' share of the device, and the ratios above are the slowdown of sharing it."]
        start = next((e for e in evs if e.get("event") == "sweep_start"), {})
        if len(est.get("runs", [])) == start.get("runs"):  # an estimate of the whole study: its wall time on the slots
            wall = sweep_wall(evs)[0]
            out[-1] += (f" For the whole study it predicted {fmt_s(est['wall_s'])} of wall time on {slots} slots; the sweeps "
                        f"took {fmt_s(wall)}, **{wall / est['wall_s']:.2f}×** the estimate.")
    return out + [""]


def page(study: str, scale: str, source: Path, dest: Path, estimate: Path | None = None) -> str:
    study_yaml = ROOT / "configs" / "studies" / f"{study}.yaml"
    comment, desc = scale_comment(study_yaml, scale)
    analysis = source / "analysis"
    evs = events(source)
    ph, runs, wall = phases(evs)
    start = next((e for e in evs if e.get("event") == "sweep_start"), {})
    total_runs = start.get("runs", "?")
    plots = sorted(p.name for p in analysis.glob("*.png")) if analysis.is_dir() else []
    lines = [f"# Results: `{study}` at its `{scale}` scale", ""]
    if desc:
        lines += [f"*{desc}*", ""]
    gpus = start.get("gpus") or "0"
    env = f"GPUS={gpus} " if gpus != "0" else ""
    lines += ["```", f"{env}bash benchmarks/gpu_studies.sh {study}      # = peftlab sweep configs/studies/{study}.yaml "
              f"--preset-scale={scale} --gpus {gpus}, in slices", "```", ""]
    if start.get("slots", 1) > 1:
        lines += [f"`--gpus {gpus}`: {start['slots']} runs side by side on the GPU at a time, so each run's own wall time "
                  "(in the tables below) includes the others' share of the GPU; the sweeps' wall time is the study's.", ""]
    if comment:
        lines += ["## What ran, and what stands in for the seed's data and model", "", comment, ""]
    lines += ["## Time per phase (measured, from study.jsonl)", "", "| phase | seconds | share |", "| --- | ---: | ---: |"]
    tot = sum(ph.values()) or 1.0
    for k, v in ph.items():
        lines.append(f"| {k} | {fmt_s(v)} | {100 * v / tot:.0f}% |")
    trained = sum(1 for _ in (source / "runs").glob("*/results_final.json")) if (source / "runs").is_dir() else runs
    cut = (f" ({trained - runs} more trained, their follow-ups cut by the last call's wall limit: not in the phase times)"
           if trained > runs else "")
    lines += ["", f"{runs} of {total_runs} runs completed with their follow-ups{cut}; the sweeps' wall time adds up to {fmt_s(wall)}"
              + (f" over {sweep_wall(evs)[1]} calls (the sweep resumes; a run cut by a call's wall limit is run again)"
                 if sweep_wall(evs)[1] > 1 else "")
              + ".", ""]
    if estimate is not None and estimate.is_file():
        lines += estimate_lines(json.loads(estimate.read_text(encoding="utf-8")), evs)
    hyp = analysis / "hypotheses.json"
    if hyp.is_file():
        found = json.loads(hyp.read_text())
        if found:
            lines += ["## Hypothesis checks (peftlab analyze)", ""]
            lines += [f"- **{f['hypothesis']}** — {f['verdict']}: {f['text']}" for f in found]
            lines.append("")
    md = analysis / "summary_table.md"
    if md.is_file():
        lines += ["## Summary (mean ± std over seeds)", "", md.read_text(encoding="utf-8").strip(), "",
                  "Also as [CSV](summary_table.csv) and [LaTeX](summary_table.tex).", ""]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p[:-4]}]({p})" for p in plots]
        lines.append("")
    notes = [n for n in _report_notes(analysis) if "skipped" in n]
    if notes:
        lines += ["<details><summary>plots the analysis skipped (their data is not in this study)</summary>", ""]
        lines += [f"- {n}" for n in notes] + ["", "</details>", ""]
    kept = _kept_reading(dest / "README.md")
    lines += ["## What the numbers do and do not show", "", KEEP_START,
              kept or "*To be written by whoever read the numbers above: which differences exceed the spread over "
                      "seeds, and what the stand-ins above rule out (a random-init model, another dataset, a "
                      "fraction of an epoch).*", KEEP_END, ""]
    return "\n".join(lines)


def _report_notes(analysis: Path) -> list[str]:
    rep = analysis / "report.html"
    if not rep.is_file():
        return []
    found = re.findall(r"<li class='note'>(.*?)</li>", rep.read_text(encoding="utf-8"), flags=re.S)
    return [html.unescape(re.sub(r"<[^>]+>", "", m)).strip() for m in found]


def _kept_reading(readme: Path) -> str:
    if not readme.is_file():
        return ""
    text = readme.read_text(encoding="utf-8")
    m = re.search(re.escape(KEEP_START) + r"\n(.*?)\n" + re.escape(KEEP_END), text, flags=re.S)
    body = m.group(1).strip() if m else ""
    return "" if body.startswith("*To be written") else body


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="study directory, or $OUT/<study> of benchmarks/gpu_studies.sh")
    ap.add_argument("--study", required=True, help="study name (configs/studies/<study>.yaml)")
    ap.add_argument("--scale", default="gpu")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--estimate", type=Path, default=None,
                    help="`peftlab estimate --json` output to compare with the measured times (default: SOURCE/estimate.json if there)")
    a = ap.parse_args(argv)
    if not (ROOT / "configs" / "studies" / f"{a.study}.yaml").is_file():
        print(f"error: no configs/studies/{a.study}.yaml", file=sys.stderr)
        return 2
    if not (a.source / "study.jsonl").is_file():
        print(f"error: {a.source} has no study.jsonl: give a study directory or the folder gpu_studies.sh wrote", file=sys.stderr)
        return 2
    dest = a.docs / a.study
    dest.mkdir(parents=True, exist_ok=True)
    if a.estimate is not None and not a.estimate.is_file():
        print(f"error: --estimate {a.estimate}: no such file (write it with `peftlab estimate ... --json PATH`)", file=sys.stderr)
        return 2
    text = page(a.study, a.scale, a.source, dest, a.estimate or a.source / "estimate.json")
    analysis = a.source / "analysis"
    for p in list(analysis.glob("*.png")) + [analysis / t for t in TABLES] + [a.source / "study.log"]:
        if p.is_file():
            shutil.copyfile(p, dest / p.name)
    (dest / "README.md").write_text(text, encoding="utf-8")
    print(f"wrote {dest / 'README.md'} ({len(list(dest.glob('*.png')))} plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
