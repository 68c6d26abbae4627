"""peftlab analyze on synthetic study directories with known numbers (tests/analysis_fixtures.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

import analysis_fixtures as F  # noqa: E402

from peftlab.analysis import analyze  # noqa: E402
from peftlab.analysis.collect import aggregate, collect  # noqa: E402
from peftlab.analysis.tables import fmt_pm, latex_escape  # noqa: E402
from peftlab.errors import PeftlabError  # noqa: E402

EXPECTED_PLOTS = {
    "subspace": ["pareto_frontier_d1000", "pareto_frontier_d2000", "compression_comparison_d1000", "compression_comparison_d2000",
                 "allocation_comparison_grid", "learned_gating_heatmap_d1000", "learned_gating_heatmap_d2000",
                 "learned_gating_trend"],
    "budget": ["rank_allocation_heatmap", "performance_plot", "training_curves"],
    "sparse": ["sparsity_over_steps", "layer_sparsity_heatmap", "metric_vs_effective_params", "training_curves"],
    "projection": ["optimizer_memory_vs_rank", "peak_memory", "loss_per_epoch_per_rank", "performance_plot"],
}
MAKERS = {"subspace": F.make_subspace_study, "budget": F.make_budget_study, "sparse": F.make_sparse_study,
          "projection": F.make_projection_study}


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    return {name: make(root / name) for name, make in MAKERS.items()}


@pytest.fixture(scope="module")
def analysed(studies, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    return {name: analyze(path, out / name) for name, path in studies.items()}


def _group(agg, **where):
    m = np.ones(len(agg), dtype=bool)
    for k, v in where.items():
        m &= (agg[k] == v).to_numpy()
    assert m.sum() == 1, (where, m.sum())
    return agg[m].iloc[0]


def test_mean_std_and_n_over_seeds(studies):
    agg = aggregate(collect(studies["subspace"]))
    assert len(agg) == 10  # 2 budgets x 5 allocation arms, 3 seeds each
    for d in (1000, 2000):
        for (mode, ratio), bpd in F.SUBSPACE_BPD.items():
            arm = "sublora " + mode + (f" ρ={ratio:g}" if ratio is not None else "")
            g = _group(agg, arm=arm, **{"sublora.intrinsic_dim": d})
            expect = np.array([bpd + F.SEED_OFFSETS[s] - (0.2 if d == 2000 else 0.0) for s in F.SEEDS])
            assert g["n"] == 3 and g["seeds"] == "42,123,999"
            assert g["bounds.empirical_bpd_mean"] == pytest.approx(expect.mean(), abs=1e-12)
            assert g["bounds.empirical_bpd_std"] == pytest.approx(0.1, abs=1e-12)  # offsets -0.1, 0, +0.1
            assert g["bounds.empirical_bpd_std"] == pytest.approx(np.std(expect, ddof=1), abs=1e-12)
            assert g["bounds.kl_divergence_std"] == pytest.approx(100.0)
    budget = aggregate(collect(studies["budget"]))
    g = _group(budget, arm="lora", **{"lora.r": 4})
    assert g["val_accuracy_mean"] == pytest.approx(0.82) and g["val_accuracy_std"] == pytest.approx(0.02)
    # a single seed has no spread: std is NaN, not 0
    sparse = aggregate(collect(studies["sparse"]))
    assert sparse["n"].eq(1).all() and sparse["val_loss_std"].isna().all()


def test_grouping_splits_on_any_non_seed_key(tmp_path):
    for seed in (1, 2):
        for lr in (1e-3, 2e-3):
            F.write_run(tmp_path / f"lr{lr}_s{seed}", "lora", {"training.seed": seed, "training.learning_rate": lr},
                        task="classification", final={"val_accuracy": 0.5 + seed / 10 + lr, "val_loss": 1.0}, trainable=10)
    F.write_run(tmp_path / "killed", "lora", {"training.seed": 3, "training.learning_rate": 1e-3}, task="classification",
                final={"val_accuracy": 0.99, "val_loss": 1.0}, trainable=10, finished=False)
    study = collect(tmp_path)
    assert study.group_keys == ["training.learning_rate"]
    agg = aggregate(study)
    assert sorted(agg["n"]) == [2, 2]  # the unfinished run is left out of the means...
    g = _group(agg, **{"training.learning_rate": 1e-3})
    assert g["val_accuracy_mean"] == pytest.approx(0.651)
    assert any("killed (incomplete)" in n for n in study.notes)  # ...and said so


def test_test_split_metrics_reach_the_tables(tmp_path):
    """results_final.json's end-of-run test metrics (best checkpoint) are aggregated and shown next to validation."""
    import pandas as pd

    for seed, acc in ((1, 0.80), (2, 0.84)):
        F.write_run(tmp_path / "runs" / f"lora_s{seed}", "lora", {"training.seed": seed}, task="classification",
                    final={"val_accuracy": 0.9, "val_loss": 0.3}, trainable=10, test={"test_accuracy": acc, "test_loss": 0.5})
    F.write_run(tmp_path / "runs" / "dora_s1", "dora", {"training.seed": 1}, task="classification",
                final={"val_accuracy": 0.9, "val_loss": 0.3}, trainable=12)  # no test split: an empty cell, not a failure
    res = analyze(tmp_path / "runs", tmp_path / "out")
    agg = aggregate(collect(tmp_path / "runs"))
    g = _group(agg, method="lora")
    assert g["test_accuracy_mean"] == pytest.approx(0.82) and g["test_accuracy_std"] == pytest.approx(np.std([0.80, 0.84], ddof=1))
    assert np.isnan(_group(agg, method="dora")["test_accuracy_mean"])
    md = (tmp_path / "out" / "summary_table.md").read_text()
    assert "test accuracy" in md and "0.820 ± 0.028" in md
    comp = pd.read_csv(tmp_path / "out" / "comparison_table.csv")
    assert "test_accuracy_mean" in comp.columns
    assert res is not None


def test_fmt_pm_rounds_to_the_spread():
    assert fmt_pm(4.2, 0.1) == "4.20 ± 0.10" == fmt_pm(4.2, 0.09999999999999964)
    assert fmt_pm(0.8234, 0.0123) == "0.823 ± 0.012"
    assert fmt_pm(3000.0, 100.0) == "3,000 ± 100"
    # seeds that agree up to float rounding (a compare study's LoRA F1 on the GPU): no 8-decimal mean
    assert fmt_pm(0.7878787878787878, 1.2e-16) == "0.7879 ± 0"
    assert fmt_pm(0.5, float("nan")) == "0.5"
    # a peak memory equal over seeds (10,810.5 MiB): digits a reader reads, not 1.081e+04
    assert fmt_pm(10810.5, 0.0) == "10,810 ± 0" and fmt_pm(1234.5, 0.0) == "1234 ± 0" and fmt_pm(9999.7, 0.0) == "10,000 ± 0"


def _strip_escaped(tex: str) -> str:
    return re.sub(r"\\[&%$#_{}]", "", tex)


def test_latex_is_balanced_and_escaped(tmp_path):
    names = ["my_data&co", "50%_{x}#1", "tilde~caret^back\\slash"]
    for i, ds in enumerate(names):
        for seed in (1, 2):
            F.write_run(tmp_path / f"run{i}_s{seed}", "lora", {"training.seed": seed, "data.dataset": "sst2-sample"},
                        task="classification", final={"val_accuracy": 0.6 + i / 10 + seed / 100, "val_loss": 1.0}, trainable=10)
            cfg_path = tmp_path / f"run{i}_s{seed}" / "config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["data"]["dataset"] = ds  # a local dataset path with LaTeX specials
            cfg_path.write_text(json.dumps(cfg))
    res = analyze(tmp_path, tmp_path / "out", baseline=False)
    tex = (res.output_dir / "summary_table.tex").read_text()
    body = _strip_escaped(tex)
    assert body.count("{") == body.count("}")
    assert tex.count("\\begin{") == tex.count("\\end{")
    for needle in ("\\toprule", "\\midrule", "\\bottomrule"):
        assert needle in tex
    assert "my\\_data\\&co" in tex and "50\\%\\_\\{x\\}\\#1" in tex and "\\textasciitilde{}" in tex
    rows = [ln for ln in tex.splitlines() if ln.endswith("\\\\")]
    ncols = rows[0].count(" & ") + 1
    for ln in rows:  # every unescaped & is a column separator
        assert len(re.findall(r"(?<!\\)&", ln)) == ncols - 1, ln
    assert latex_escape("a_b ± ρ") == "a\\_b $\\pm$ $\\rho$"
    engine = next((e for e in ("pdflatex", "lualatex", "xelatex") if shutil.which(e)), None)
    if engine is None:
        return  # no TeX engine on this machine: the structural checks above stand in for compiling
    doc = tmp_path / "doc.tex"
    doc.write_text("\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n" + tex + "\n\\end{document}\n")
    r = subprocess.run([engine, "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:]


@pytest.mark.parametrize("plan", list(EXPECTED_PLOTS))
def test_every_plot_for_complete_data(analysed, plan):
    from PIL import Image

    res = analysed[plan]
    for stem in EXPECTED_PLOTS[plan]:
        png, svg = res.output_dir / f"{stem}.png", res.output_dir / f"{stem}.svg"
        assert stem in res.plots, (stem, res.notes)
        assert png.stat().st_size > 10_000 and svg.stat().st_size > 5_000
        with Image.open(png) as im:
            w, h = im.size
            assert w > 400 and h > 300
            # not a blank canvas: a real plot has many distinct colours
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 20
        assert "<svg" in svg.read_text()[:2000]
    for name in ("summary_table.csv", "summary_table.tex", "summary_table.md", "comparison_table.csv", "report.html"):
        assert (res.output_dir / name).stat().st_size > 0


def test_one_colour_per_method_across_plots(analysed):
    from peftlab.analysis.plots import COLOURS, PlotContext

    study = analysed["budget"].study
    ctx = PlotContext(study, aggregate(study), Path("."))
    assert ctx.colour("lora") == COLOURS[0] and ctx.colour("ba_lora") == COLOURS[1]
    assert len(set(ctx.colours.values())) == len(study.arms)


def test_hypotheses_stated_with_numbers(analysed):
    sub = {(f.hypothesis[:2], f.numbers.get("d")): f for f in analysed["subspace"].findings}
    h1 = sub[("H1", 1000)]
    assert h1.numbers["dominating_ratios"] == [0.8] and "ρ = 0.8" in h1.text
    h2 = sub[("H2", 1000)]
    # per-seed mean γ = 0.55 + 0.05·mean(layer) ± 0.01 = 0.675 ± 0.01 over 3 seeds
    assert h2.verdict == "supported" and h2.numbers["mean_gamma"] == pytest.approx(0.675)
    t = 0.175 / (0.01 / np.sqrt(3))  # one-sample t of (0.665, 0.675, 0.685) against 0.5
    assert h2.numbers["t"] == pytest.approx(t)
    assert h2.numbers["p"] == pytest.approx(1 - t / np.sqrt(t**2 + 2))  # two-sided p of Student t with 2 dof, closed form
    assert "p = 0.001" in h2.text
    h3 = sub[("H3", 1000)]
    assert h3.verdict == "supported" and h3.numbers["kendall_tau"] == pytest.approx(1.0)
    assert h3.numbers["slope_per_layer"] == pytest.approx(0.05)
    assert h3.numbers["p"] == pytest.approx(2 / 720)  # exact Kendall p for a perfect order of 6 layers
    h4 = {f.numbers["lora"]: f for f in analysed["budget"].findings if f.hypothesis.startswith("H4")}
    r4 = h4["lora r=4"]  # gains +0.03, +0.02, +0.01 -> mean 0.02, std 0.01, paired t = 3.46, p = 0.074
    assert r4.numbers["mean_gain"] == pytest.approx(0.02) and r4.numbers["std_gain"] == pytest.approx(0.01)
    assert r4.numbers["p"] == pytest.approx(0.0742, abs=2e-3) and r4.verdict == "not supported"


def test_sparsity_and_its_cost_rise_with_lambda(tmp_path):
    """Seed 003's λ table as checks S1/S2: sparsity and val_loss both rise with λ in the fixture (λ (1 + i/n) and
    2.2 + λ), a perfect order of 3 λ x 3 seeds (Kendall τ_b = 1 with ties); one seed or no pruning: inconclusive."""
    from peftlab.analysis.hypotheses import sparsity_with_strength
    from peftlab.analysis.plots import PlotContext

    def findings(name, **kw):
        F.make_sparse_study(tmp_path / name, **kw)
        study = collect(tmp_path / name)
        return {f.hypothesis[:2]: f for f in sparsity_with_strength(PlotContext(study, aggregate(study), tmp_path))}

    three = findings("three", seeds=(42, 123, 999))
    assert set(three) == {"S1", "S2"}  # SoRA only: LoRA and DoRA have no λ
    for f in three.values():
        assert f.verdict == "supported" and f.numbers["kendall_tau"] == pytest.approx(1.0) and f.numbers["p"] < 0.01
        assert f.numbers["strengths"] == [0.1, 0.3, 0.5] and f.numbers["n_runs"] == 9
    assert three["S1"].numbers["sparsity"] == sorted(three["S1"].numbers["sparsity"]) and "λ = 0.5: 72.9% pruned" in three["S1"].text
    one = findings("one", seeds=(42,))
    assert all(f.verdict == "inconclusive" and "too few seeds" in f.text for f in one.values())
    none = findings("none", seeds=(42, 123, 999), prune_scale=0.001)  # at most 0.07% pruned
    assert all(f.verdict == "inconclusive" and "too little pruning" in f.text for f in none.values())


def test_ba_lora_paired_with_lora_of_the_same_dataset(tmp_path):
    from peftlab.analysis.hypotheses import equal_budget
    from peftlab.analysis.plots import PlotContext

    F.make_budget_study(tmp_path / "sst2", dataset="sst2-sample")
    F.make_budget_study(tmp_path / "imdb", dataset="imdb-sample", acc_shift=-0.3)  # same gains, other level
    study = collect(tmp_path)
    found = equal_budget(PlotContext(study, aggregate(study), tmp_path))
    assert len(found) == 4  # 2 budgets x 2 datasets, each paired within its dataset
    for f in found:
        assert f.numbers["mean_gain"] == pytest.approx(0.02)  # a cross-dataset pair would be off by 0.3
        assert ("imdb" in f.numbers["ba_lora"]) == ("imdb" in f.numbers["lora"])


def test_ba_lora_at_full_data_is_paired_beside_few_shot_arms(tmp_path):
    """The budget_aware study: few-shot arms set data.train_samples, the full-data arms leave it unset (NaN in the
    table). Each BA-LoRA group pairs with the LoRA group of the same train_samples, unset with unset (a NaN == NaN
    filter dropped every full-data pair: only the few-shot pairs were checked on the H100 run of 2026-12-07)."""
    from peftlab.analysis.hypotheses import equal_budget
    from peftlab.analysis.plots import PlotContext

    root = F.make_budget_few_shot_study(tmp_path / "b")
    study = collect(root)
    found = equal_budget(PlotContext(study, aggregate(study), tmp_path))
    gains = sorted(round(f.numbers["mean_gain"], 6) for f in found)
    assert gains == [-0.06, 0.02, 0.02], [f.text for f in found]  # r=4 and r=8 at full data, r=8 at 16 shots
    for f in found:
        assert ("shots=16" in f.numbers["ba_lora"]) == ("shots=16" in f.numbers["lora"]), f.text


def test_too_few_seeds_is_said(tmp_path):
    F.make_subspace_study(tmp_path / "one", seeds=(42,))
    res = analyze(tmp_path / "one", tmp_path / "out")
    h2 = [f for f in res.findings if f.hypothesis.startswith("H2")]
    assert h2 and all(f.verdict == "inconclusive" and "too few seeds" in f.text for f in h2)


def test_missing_data_skips_with_a_note(tmp_path):
    F.make_subspace_study(tmp_path / "nobounds", dims=(1000,), with_bounds=False)
    res = analyze(tmp_path / "nobounds", tmp_path / "out")
    assert "pareto_frontier_d1000" not in res.plots and "learned_gating_heatmap_d1000" in res.plots
    notes = [n for n in res.notes if n.startswith("pareto_frontier")]
    assert len(notes) == 1 and "peftlab bounds" in notes[0] and "\n" not in notes[0]
    assert (tmp_path / "out" / "report.html").is_file()
    # a run killed before its first epoch: no results, no history, still no crash
    (tmp_path / "bare" / "r1").mkdir(parents=True)
    F.write_run(tmp_path / "bare" / "r0", "lora", {}, task="causal_lm", final={"val_loss": 2.0}, trainable=5)
    shutil.copy(tmp_path / "bare" / "r0" / "config.json", tmp_path / "bare" / "r1" / "config.json")
    res = analyze(tmp_path / "bare", tmp_path / "out2")
    assert any("not started" in n for n in res.notes)
    # nothing completed at all: empty tables, every plot skipped, still a report
    F.write_run(tmp_path / "none" / "a", "sora", {}, task="causal_lm", final={"val_loss": 2.0}, trainable=5, finished=False,
                module_values={"layer.0.query": 0.1})
    res = analyze(tmp_path / "none", tmp_path / "out4")
    assert res.plots == [] and res.report.is_file() and any("0 completed" in n or "not completed" in n for n in res.notes)
    with pytest.raises(PeftlabError, match="No run directories"):
        analyze(tmp_path / "out2", tmp_path / "out3")


def test_cli_prints_report_path(studies, tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "peftlab", "analyze", str(studies["budget"]), "--output-dir", str(out),
                        "--no-baseline"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last == f"report: {out / 'report.html'}" and (out / "report.html").is_file()
    assert "[supported] H4" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "peftlab", "analyze", str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode == 2 and "is not a directory" in " ".join(bad.stderr.split())  # the message is wrapped at 100 columns


def test_majority_baseline_row_for_classification(analysed):
    import pandas as pd

    comp = pd.read_csv(analysed["budget"].output_dir / "comparison_table.csv")
    base = comp[comp["method"] == "baseline"]
    assert len(base) == 1 and 0.5 <= float(base["val_accuracy_mean"].iloc[0]) < 1
    assert (comp[comp["method"] != "baseline"]["n"] == 3).all()


def test_method_knowledge_comes_from_the_method_class(tmp_path, monkeypatch):
    """Order, short names and H4's pairing are the method classes' attributes, not names in analysis/."""
    from peftlab.analysis.hypotheses import equal_budget
    from peftlab.analysis.plots import PlotContext
    from peftlab.methods import METHODS, table_order

    assert table_order(["sublora", "full", "lora", "zzz_new", "ba_lora"]) == ["lora", "ba_lora", "full", "sublora", "zzz_new"]
    F.make_budget_study(tmp_path / "b")
    study = collect(tmp_path / "b")
    assert study.arms == ["lora", "ba_lora"]
    monkeypatch.setattr(METHODS["lora"], "short_names", {"lora.r": "rank"})
    monkeypatch.setattr(METHODS["ba_lora"], "table_rank", 5)  # before LoRA now
    study = collect(tmp_path / "b")
    agg = aggregate(study)
    assert study.arms == ["ba_lora", "lora"]
    assert "lora rank=4" in set(agg["label"])
    assert equal_budget(PlotContext(study, agg, tmp_path))
    monkeypatch.setattr(METHODS["ba_lora"], "equal_budget_rival", None)
    assert equal_budget(PlotContext(study, agg, tmp_path)) == []


def test_optimizer_memory_plot_puts_each_method_at_its_rank(tmp_path):
    """x of optimizer_memory_vs_rank is a rank: BA-LoRA sits at the rank it starts from, not at its parameter
    budget (73,728 read as a rank put it at 2^16 beside LoRA's 8 on the compare study's GPU run)."""
    import matplotlib

    matplotlib.use("Agg")
    from peftlab.analysis.plots import PlotContext, plot_optimizer_memory

    common = dict(task="classification", final={"train_loss": 0.3, "val_loss": 0.4, "val_accuracy": 0.8, "val_f1": 0.8}, epochs=1)
    F.write_run(tmp_path / "ba_lora_s1", "ba_lora", {"training.seed": 1, "ba_lora.param_budget": 73_728, "ba_lora.base_rank": 8},
                trainable=74_498, **common)
    F.write_run(tmp_path / "rsvd_s1", "rsvd", {"training.seed": 1, "rsvd.rank": 8}, trainable=22_713_986,
                summary={"optimizer_state_bytes": 3_000_000}, **common)
    study = collect(tmp_path)
    ctx = PlotContext(study, aggregate(study), tmp_path / "out")
    figs = []
    ctx.save = lambda fig, name: figs.append(fig) or name  # keep the figure to read its lines
    plot_optimizer_memory(ctx)
    xs = {ln.get_label().split(" (")[0]: list(ln.get_xdata()) for ln in figs[0].axes[0].get_lines()
          if not ln.get_label().startswith(("_", "Adam"))}
    import matplotlib.pyplot as plt

    plt.close(figs[0])
    assert xs.get("ba_lora") == [8] and xs.get("rsvd") == [8], xs


def test_heatmaps_say_how_many_groups_they_leave_out(tmp_path, monkeypatch):
    from peftlab.analysis import plots

    seen = {}

    class Titles(plots.PlotContext):
        def save(self, fig, stem):
            seen[stem] = fig._suptitle.get_text()
            plots.plt.close(fig)
            return stem

    F.make_sparse_study(tmp_path / "s")  # 3 SoRA groups (λ 0.1, 0.3, 0.5)
    study = collect(tmp_path / "s")
    ctx = Titles(study, aggregate(study), tmp_path / "out")
    plots.plot_rank_heatmap(ctx), plots.plot_layer_sparsity(ctx)
    assert not any("of 3 groups" in t for t in seen.values())
    monkeypatch.setattr(plots, "MAX_PANELS", 2)
    plots.plot_rank_heatmap(ctx), plots.plot_layer_sparsity(ctx)
    assert seen["rank_allocation_heatmap"].endswith(": the first 2 of 3 groups")
    assert seen["layer_sparsity_heatmap"].endswith(": the first 2 of 3 groups")


def test_the_study_is_named_as_the_sweep_recorded_it(tmp_path):
    """Run files copied out of their study directory (the GPU runs' runs/ folders) keep their study's name in the
    table caption and the report; runs without that record are named after their directory."""
    import json

    root = F.make_budget_study(tmp_path / "runs")
    assert collect(root).name == "runs"
    for cfg in root.glob("*/config.json"):
        c = json.loads(cfg.read_text())
        c["_meta"]["study"] = {"study": "budget_aware", "scale": "gpu", "trial": cfg.parent.name}
        cfg.write_text(json.dumps(c))
    study = collect(root)
    assert study.name == "budget_aware, scale gpu"
    res = analyze(root, tmp_path / "out")
    assert "Results of budget\\_aware, scale gpu:" in (tmp_path / "out" / "summary_table.tex").read_text()
    assert "<h1>Study budget_aware, scale gpu</h1>" in res.report.read_text()
