"""Every plot the analysis draws, on small synthetic studies, is fit to print (peftlab.analysis.layout).

No text overlaps another (renderer extents), an axis spanning more than two decades is logarithmic,
legends show only marker styles that are drawn, and a one-epoch study's curves run over the evaluation
steps of eval_log.csv. The PNGs are kept under the test's tmp dir for a person to look at.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

import analysis_fixtures as F  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from peftlab.analysis.collect import aggregate, collect  # noqa: E402
from peftlab.analysis.layout import layout_problems  # noqa: E402
from peftlab.analysis.plots import PLOTS, PlotContext, make_plots  # noqa: E402

STUDIES = {"subspace": lambda p: F.make_subspace_study(p, seeds=(42, 123)), "budget": F.make_budget_study,
           "budget_few_shot": F.make_budget_few_shot_study,
           "sparse": F.make_sparse_study, "sparse_24_layers": lambda p: F.make_sparse_study(p, modules=F.QWEN_05B_MODULES),
           "projection": F.make_projection_study, "compare": F.make_compare_study}


class CheckingContext(PlotContext):
    """Records each figure and its layout problems; writes a PNG only (the SVG adds time and nothing to check)."""

    def save(self, fig, stem):
        self.checks[stem] = layout_problems(fig)
        self.figures[stem] = {"xlabels": [ax.get_xlabel() for ax in fig.axes],
                              "xlim": [ax.get_xlim() for ax in fig.axes], "xscale": [ax.get_xscale() for ax in fig.axes]}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.out_dir / f"{stem}.png", bbox_inches="tight", dpi=80)
        plt.close(fig)
        return stem


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    out = {}
    for name, make in STUDIES.items():
        study = collect(make(root / "studies" / name))
        ctx = CheckingContext(study, aggregate(study), root / "plots" / name, checks={})
        ctx.figures = {}
        done, notes = make_plots(ctx)
        out[name] = (ctx, [s for _, s in done], notes)
    return out


def test_every_registered_plot_is_drawn_somewhere(drawn):
    stems = {s for _, done, _ in drawn.values() for s in done}
    for _, name, _ in PLOTS:
        assert any(s == name or s.startswith(name.split("{")[0]) for s in stems), (name, sorted(stems))


@pytest.mark.parametrize("study", list(STUDIES))
def test_plots_fit_to_print(drawn, study):
    ctx, done, notes = drawn[study]
    assert done, notes
    bad = {stem: problems for stem, problems in ctx.checks.items() if problems}
    assert not bad, f"{ctx.out_dir}: {bad}"


def test_one_epoch_curves_use_the_evaluation_steps(drawn):
    ctx, done, _ = drawn["compare"]
    assert "training_curves" in done
    fig = ctx.figures["training_curves"]
    assert fig["xlabels"][:2] == ["optimizer step", "optimizer step"]
    lo, hi = fig["xlim"][1]
    assert lo < 20 and hi >= 60, fig  # evaluations at steps 20, 40, 60 of eval_log.csv, not an epoch axis around 1


def test_effective_params_axis_is_logarithmic(drawn):
    ctx, done, _ = drawn["compare"]
    assert "metric_vs_effective_params" in done
    assert ctx.figures["metric_vs_effective_params"]["xscale"][0] == "log"


def test_the_checker_sees_overlap_linear_axes_and_legend_lies():
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([1e3, 2.3e7], [0.8, 0.9], "o")
    ax.plot([1e3], [0.8], "s", mfc="white", label="hollow = trainable")
    ax.plot([], [], "^", label="never drawn")
    ax.legend()
    ax.set_xlabel("effective parameters")
    ax.text(0.5, 0.5, "A label", transform=ax.transAxes)
    ax.text(0.52, 0.5, "A label", transform=ax.transAxes)
    problems = layout_problems(fig)
    plt.close(fig)
    text = "\n".join(problems)
    assert "x spans 4.4 decades" in text
    assert "offset text '1e7'" in text  # the linear axis's "1e7" sits under the x label
    assert "text overlaps: axes 0 text 'A label' and axes 0 text 'A label'" in text
    assert "'never drawn' shows marker '^'" in text
    assert "hollow = trainable" not in text  # a hollow square is drawn
    assert "in wide" not in text
    wide = plt.figure(figsize=(14, 2))
    wide.add_subplot().plot([0, 1], [0, 1])
    assert any("in wide, more than 11 in" in p for p in layout_problems(wide))
    plt.close(wide)


if __name__ == "__main__":  # print every problem, for a person fixing plots: python tests/test_plot_layout.py DIR
    import sys

    root = Path(sys.argv[1])
    for name, make in STUDIES.items():
        study = collect(make(root / "studies" / name))
        ctx = CheckingContext(study, aggregate(study), root / "plots" / name, checks={})
        ctx.figures = {}
        make_plots(ctx)
        for stem, problems in ctx.checks.items():
            for p in problems:
                print(f"{name}/{stem}: {p}")
