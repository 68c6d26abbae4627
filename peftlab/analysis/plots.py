"""The seeds' plots, drawn from a collected study (matplotlib, Agg backend, PNG + SVG).

Every plot function takes a :class:`PlotContext` and returns the stems it wrote, or raises
:class:`Skip` with a one-line reason when the study lacks its data. Colours come from one
palette keyed by arm (method plus its variant), so a method has the same colour in every
figure. Figures are sized for a paper column or page (3.4 or 7 inches wide) with 8-9 pt text.
"""

from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .collect import Study, allocation_method, layer_of, module_kind, rank_axis, size_axes  # noqa: E402
from .layout import layout_problems  # noqa: E402

STYLE = {
    "font.size": 8.5, "axes.titlesize": 9, "axes.labelsize": 8.5, "legend.fontsize": 7.5, "xtick.labelsize": 8,
    "ytick.labelsize": 8, "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.5, "axes.spines.top": False,
    "axes.spines.right": False, "savefig.dpi": 200, "figure.dpi": 100, "lines.linewidth": 1.4, "lines.markersize": 5,
    "svg.hashsalt": "peftlab", "legend.frameon": False,
}
# Okabe-Ito (colour-blind safe) first, then tab10 for studies with many arms.
COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442",
           *[matplotlib.colors.to_hex(c) for c in plt.get_cmap("tab10").colors]]
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
METRIC_LABELS = {
    "val_accuracy": "validation accuracy", "val_f1": "validation F1", "val_loss": "validation loss (nats/token)",
    "val_perplexity": "validation perplexity", "train_loss": "training loss (nats)",
}


class Skip(Exception):
    """The plot's data is absent; the message is the one-line note shown to the user."""


@dataclass
class PlotContext:
    study: Study
    agg: pd.DataFrame  # aggregate(study)
    out_dir: Path
    baseline: Optional[dict] = None  # majority-class baseline ({"val_accuracy": ..., "label": ...})
    colours: dict[str, str] = field(default_factory=dict)
    # when a dict, save() records layout.layout_problems of each figure under its stem (the layout tests use it)
    checks: Optional[dict] = None

    def __post_init__(self):
        self.colours = {a: COLOURS[i % len(COLOURS)] for i, a in enumerate(self.study.arms)}

    def colour(self, arm: str) -> str:
        return self.colours.get(arm, "#777777")

    @property
    def done(self) -> pd.DataFrame:
        return self.study.completed

    def save(self, fig, stem: str) -> str:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.checks is not None:
            self.checks[stem] = layout_problems(fig)
        fig.savefig(self.out_dir / f"{stem}.png", bbox_inches="tight")
        fig.savefig(self.out_dir / f"{stem}.svg", bbox_inches="tight", metadata={"Date": None})
        plt.close(fig)
        return stem


def _metric_label(m: str) -> str:
    if m in METRIC_LABELS:
        return METRIC_LABELS[m]
    if m.startswith("val_loss") and False:  # pragma: no cover
        return m
    return m.replace("_", " ")


def _legend(ax, **kw):
    h, labels = ax.get_legend_handles_labels()
    if h:
        ax.legend(**kw)


def _fmt_dim(d) -> str:
    return f"{int(d)}" if float(d).is_integer() else f"{d:g}"


def _legend_below(ax, **kw) -> None:
    """The axes' legend just under its x tick labels and x label, whatever their size (a fixed offset in axes
    units lands on the label of a short axes)."""
    h, _ = ax.get_legend_handles_labels()
    if not h:
        return
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    below_px = ax.get_window_extent(renderer).y0 - ax.get_tightbbox(renderer).y0
    offset = matplotlib.transforms.offset_copy(ax.transAxes, fig=fig, y=-(below_px * 72 / fig.dpi + 3), units="points")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=offset, **kw)


def _wide(values) -> bool:
    """Positive values spanning more than two decades: their axis must be logarithmic."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return bool(len(v)) and bool((v > 0).all()) and v.max() / v.min() > 100


def _count_ticks(axis) -> None:
    """A linear axis of counts labelled "2.16M" / "150k", not "2.16" beside a "1e6" offset text."""
    axis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=""))


def _log_x(ax, values) -> None:
    """Log-scaled x axis with a few plain-number ticks, also when the data spans less than a decade."""
    ax.set_xscale("log")
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if len(v) and v.max() / v.min() < 10:
        ticks = np.geomspace(v.min(), v.max(), 3) if v.max() > v.min() else v[:1]
        ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
        pad = (v.max() / v.min()) ** 0.08 if v.max() > v.min() else 1.1
        ax.set_xlim(v.min() / pad, v.max() * pad)
    else:
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda t, _: f"{t:g}"))


# ============================================================================ subspace allocation
def _allocation(ctx: PlotContext, need_bounds: bool = True) -> tuple[pd.DataFrame, type]:
    """The completed runs of the method with an allocation experiment (``Method.allocation_arms``), and the method."""
    cls = allocation_method()
    if cls is None:
        raise Skip("no registered method has an allocation experiment (Method.allocation_arms)")
    alloc = cls.allocation_arms
    df = ctx.done[ctx.done["method"] == cls.name]
    if df.empty:
        raise Skip(f"no completed {cls.display_name} runs")
    if alloc["dim"] not in df:
        raise Skip(f"{cls.display_name} runs record no {alloc['dim']}")
    if need_bounds:
        need = ["bounds.kl_divergence", "bounds.empirical_bpd", "bounds.bound_value"]
        if any(c not in df for c in need) or df[need].isna().all().any():
            raise Skip(f"no bounds_metrics.json in the {cls.display_name} runs (run `peftlab bounds RUN_DIR` on each)")
        df = df.dropna(subset=need)
    return df, cls


def _short_arm(cls: type, arm: str) -> str:
    """An allocation arm's name without its method ("uniform", "fixed ρ=0.5") for legends."""
    return arm.replace(f"{cls.name} ", "")


def _arm_stats(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    g = df.groupby("arm", sort=False)[cols]
    mean, std, n = g.mean(), g.std(ddof=1), g.size()
    out = mean.add_suffix("_mean").join(std.add_suffix("_std"))
    out["n"] = n
    return out


def _ordered(ctx: PlotContext, arms) -> list[str]:
    order = {a: i for i, a in enumerate(ctx.study.arms)}
    return sorted(arms, key=lambda a: order.get(a, 1e9))


def pareto_points(stats: pd.DataFrame, x: str, y: str) -> list[str]:
    """Arms on the Pareto frontier of (x, y), both minimised: no other arm is at least as good in both and better in one."""
    pts = {a: (r[f"{x}_mean"], r[f"{y}_mean"]) for a, r in stats.iterrows()}
    front = []
    for a, (px, py) in pts.items():
        dominated = any((qx <= px and qy <= py) and (qx < px or qy < py) for b, (qx, qy) in pts.items() if b != a)
        if not dominated:
            front.append(a)
    return sorted(front, key=lambda a: pts[a][0])


def plot_pareto_frontier(ctx: PlotContext) -> list[str]:
    df, cls = _allocation(ctx)
    alloc = cls.allocation_arms
    out = []
    for d, dd in df.groupby(alloc["dim"]):
        st = _arm_stats(dd, ["bounds.kl_divergence", "bounds.empirical_bpd"])
        fig, ax = plt.subplots(figsize=(3.6, 2.9))
        for arm in _ordered(ctx, st.index):
            r = st.loc[arm]
            ax.errorbar(r["bounds.kl_divergence_mean"], r["bounds.empirical_bpd_mean"],
                        xerr=np.nan_to_num(r["bounds.kl_divergence_std"]), yerr=np.nan_to_num(r["bounds.empirical_bpd_std"]),
                        fmt="o", capsize=2.5, color=ctx.colour(arm), label=f"{_short_arm(cls, arm)} (n={int(r['n'])})")
        front = pareto_points(st, "bounds.kl_divergence", "bounds.empirical_bpd")
        fx = [st.loc[a, "bounds.kl_divergence_mean"] for a in front]
        fy = [st.loc[a, "bounds.empirical_bpd_mean"] for a in front]
        ax.plot(fx, fy, ls="--", marker="o", ms=11, mfc="none", mec="0.2", color="0.4", lw=0.9, zorder=0,
                label="Pareto frontier (ringed)")
        ax.set_xlabel("complexity: KL divergence (nats)")
        ax.set_ylabel("empirical risk (bits per token)")
        ax.set_title(f"Complexity vs risk, d = {_fmt_dim(d)} (mean ± std over seeds)")
        _legend(ax, loc="best")
        out.append(ctx.save(fig, f"pareto_frontier_d{_fmt_dim(d)}"))
    return out


def plot_compression_comparison(ctx: PlotContext) -> list[str]:
    df, cls = _allocation(ctx)
    alloc = cls.allocation_arms
    out = []
    for d, dd in df.groupby(alloc["dim"]):
        fig, axes = plt.subplots(1, 3, figsize=(7.2, 2.5))
        arms = _ordered(ctx, dd["arm"].unique())
        for arm in arms:
            a = dd[dd["arm"] == arm]
            lab = _short_arm(cls, arm)
            axes[0].scatter(a["bounds.kl_divergence"], a["bounds.empirical_bpd"], color=ctx.colour(arm), s=14, label=lab)
            axes[1].scatter(a["bounds.kl_divergence"], a["bounds.bound_value"], color=ctx.colour(arm), s=14)
        axes[0].set(xlabel="KL divergence (nats)", ylabel="empirical risk (bits/token)", title="complexity vs risk")
        axes[1].set(xlabel="KL divergence (nats)", ylabel="PAC-Bayes bound (bits/token)", title="complexity vs bound")
        ax = axes[2]
        if "compressed_size_kb" in dd and dd["compressed_size_kb"].notna().any():
            st = _arm_stats(dd, ["compressed_size_kb", "bounds.bound_value", "bounds.empirical_bpd"])
            st = st.sort_values("compressed_size_kb_mean")
            ax.plot(st["compressed_size_kb_mean"], st["bounds.bound_value_mean"], "-", color="0.35", lw=1, label="bound")
            ax.plot(st["compressed_size_kb_mean"], st["bounds.empirical_bpd_mean"], "--", color="0.35", lw=1, label="empirical risk")
            for arm, r in st.iterrows():
                c = ctx.colour(arm)
                ax.plot(r["compressed_size_kb_mean"], r["bounds.bound_value_mean"], "o", color=c)
                ax.plot(r["compressed_size_kb_mean"], r["bounds.empirical_bpd_mean"], "s", mfc="white", color=c)
            wide = _wide(st["compressed_size_kb_mean"])
            if wide:
                _log_x(ax, st["compressed_size_kb_mean"])
            ax.set(xlabel="compressed size (KB" + (", log scale)" if wide else ")"), ylabel="bits per token",
                   title="size vs bound / risk")
            _legend(ax, loc="best")
        else:
            ax.text(0.5, 0.5, "no compressed_size_bits", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(len(arms), 5),
                   bbox_to_anchor=(0.5, -0.08))
        fig.suptitle(f"Compression and generalisation, d = {_fmt_dim(d)}", y=1.02)
        fig.tight_layout()
        out.append(ctx.save(fig, f"compression_comparison_d{_fmt_dim(d)}"))
    return out


def plot_allocation_grid(ctx: PlotContext) -> list[str]:
    df, cls = _allocation(ctx)
    alloc = cls.allocation_arms
    dim = alloc["dim"]
    dims = sorted(df[dim].unique())
    arms = _ordered(ctx, df["arm"].unique())
    uniform = next((a for a in arms if a.endswith(alloc["uniform"])), None)
    panels = [("bounds.empirical_bpd", "empirical risk (bits/token)"), ("bounds.bound_value", "PAC-Bayes bound (bits/token)"),
              ("compressed_size_kb", "compressed size (KB)"), ("improvement", "bound improvement over uniform (%)")]
    fig, axes = plt.subplots(2, 2, figsize=(7.2, 5.0))
    width = 0.8 / max(len(arms), 1)
    x = np.arange(len(dims))
    for ax, (col, label) in zip(axes.flat, panels):
        for i, arm in enumerate(arms):
            means, stds = [], []
            for d in dims:
                a = df[(df[dim] == d) & (df["arm"] == arm)]
                if col == "improvement":
                    u = df[(df[dim] == d) & (df["arm"] == uniform)] if uniform else pd.DataFrame()
                    if u.empty or a.empty:
                        means.append(np.nan), stds.append(np.nan)
                        continue
                    ub = u["bounds.bound_value"].mean()
                    vals = 100 * (ub - a["bounds.bound_value"]) / ub
                else:
                    vals = a[col] if col in a else pd.Series(dtype=float)
                means.append(vals.mean())
                stds.append(vals.std(ddof=1) if len(vals) > 1 else 0.0)
            ax.bar(x + (i - (len(arms) - 1) / 2) * width, means, width, yerr=np.nan_to_num(stds), capsize=2,
                   color=ctx.colour(arm), label=_short_arm(cls, arm), error_kw={"lw": 0.8})
        ax.set_xticks(x, [f"d = {_fmt_dim(d)}" for d in dims])
        ax.set_ylabel(label)
        if col == "improvement":
            ax.axhline(0, color="0.3", lw=0.8)
        elif col in df and df[col].notna().any():
            lo = np.nanmin(df[col]) * 0.95
            ax.set_ylim(bottom=lo if col != "compressed_size_kb" else 0)
    axes[0, 0].set_title("empirical risk")
    axes[0, 1].set_title("bound")
    axes[1, 0].set_title("compressed size")
    axes[1, 1].set_title("relative improvement (positive = better)")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=min(len(arms), 5), bbox_to_anchor=(0.5, -0.04))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return [ctx.save(fig, "allocation_comparison_grid")]


def learned_gammas(ctx: PlotContext) -> pd.DataFrame:
    """Final γ_ℓ of every learned-allocation run (``allocation_arms``): columns d, seed, layer, gamma (from
    allocation.json, else the last row of gating_trace.csv)."""
    df, cls = _allocation(ctx, need_bounds=False)
    alloc = cls.allocation_arms
    mode = alloc["mode"]
    learned = df[df.get(mode) == alloc["learned"]] if mode in df else df.iloc[0:0]
    rows = []
    for r in learned.to_dict("records"):
        run = ctx.study.run(r["run"])
        for layer, g in gammas_of_run(run).items():
            rows.append({"d": r[alloc["dim"]], "seed": r["seed"], "layer": layer, "gamma": g, "run": r["run"]})
    if not rows:
        raise Skip(f"no learned-allocation {cls.display_name} runs with gates (allocation.json 'gammas' or gating_trace.csv)")
    return pd.DataFrame(rows)


GAMMA_KEYS = ("gammas", "gamma", "gates", "final_gammas", "gamma_per_layer")


def _layer_from_name(name: str) -> Optional[int]:
    li = layer_of(name)
    if li is not None:
        return li
    nums = re.findall(r"\d+", name)
    return int(nums[-1]) if nums else None


def gammas_of_run(run) -> dict[int, float]:
    """γ_ℓ by layer index; gates outside the numbered layers (e.g. the LM head) are left out."""
    alloc = run.allocation or {}
    for key in GAMMA_KEYS:
        g = alloc.get(key)
        if isinstance(g, list):
            return {i: float(v) for i, v in enumerate(g)}
        if isinstance(g, dict):
            out = {}
            for name, v in g.items():
                li = _layer_from_name(str(name))
                if li is not None and isinstance(v, (int, float)):
                    out[li] = float(v)
            if out:
                return out
    trace = run.csv("gating_trace.csv")
    if trace is not None and len(trace):
        last = trace.iloc[-1]
        out = {}
        for c in trace.columns:
            if c in ("step", "epoch"):
                continue
            li = _layer_from_name(c)
            if li is not None and pd.notna(last[c]):
                out[li] = float(last[c])
        return out
    return {}


def plot_gating_heatmaps(ctx: PlotContext) -> list[str]:
    g = learned_gammas(ctx)
    out = []
    for d, gd in g.groupby("d"):
        mat = gd.pivot_table(index="seed", columns="layer", values="gamma")
        fig, ax = plt.subplots(figsize=(max(3.4, 0.42 * mat.shape[1] + 1.4), 0.42 * mat.shape[0] + 1.2))
        im = ax.imshow(mat.values, cmap="RdBu_r", vmin=0, vmax=1, aspect="auto")
        ax.grid(False)
        for (i, j), v in np.ndenumerate(mat.values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if abs(v - 0.5) > 0.3 else "black")
        ax.set_xticks(range(mat.shape[1]), [str(c) for c in mat.columns])
        ax.set_yticks(range(mat.shape[0]), [f"seed {s}" for s in mat.index])
        ax.set_xlabel("transformer layer ℓ")
        ax.set_title(f"Learned gates γ_ℓ, d = {_fmt_dim(d)} (1 = all to B, 0 = all to A)")
        fig.colorbar(im, ax=ax, label="γ_ℓ (share of d for B)", fraction=0.05, pad=0.02)
        out.append(ctx.save(fig, f"learned_gating_heatmap_d{_fmt_dim(d)}"))
    return out


def plot_gating_trend(ctx: PlotContext) -> list[str]:
    g = learned_gammas(ctx)
    learned = allocation_method().allocation_arms["learned"]  # learned_gammas found the method
    arm = next((a for a in ctx.study.arms if a.endswith(learned)), None)
    colour = ctx.colour(arm) if arm else "C0"
    fig, ax = plt.subplots(figsize=(3.6, 2.7))
    for i, (d, gd) in enumerate(g.groupby("d")):
        s = gd.groupby("layer")["gamma"].agg(["mean", "std", "count"]).reset_index()
        std = s["std"].fillna(0)
        ls, mk = LINESTYLES[i % len(LINESTYLES)], MARKERS[i % len(MARKERS)]
        ax.plot(s["layer"], s["mean"], ls=ls, marker=mk, color=colour, label=f"d = {_fmt_dim(d)} (n = {int(s['count'].max())} seeds)")
        ax.fill_between(s["layer"], s["mean"] - std, s["mean"] + std, color=colour, alpha=0.15 if i == 0 else 0.08,
                        hatch=None if i == 0 else "///", lw=0)
    ax.axhline(0.5, ls="--", color="0.3", lw=0.9, label="equal split (γ = 0.5)")
    ax.set_xlabel("transformer layer ℓ (depth)")
    ax.set_ylabel("γ_ℓ (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_title("Learned allocation vs depth")
    _legend(ax, loc="best")
    return [ctx.save(fig, "learned_gating_trend")]


# ============================================================================ budget-aware ranks
def ranks_of_run(run) -> dict[str, int]:
    """Per-module ranks from allocation.json: BA-LoRA's ``modules.<name>.rank`` or SoRA's ``ranks``."""
    alloc = run.allocation or {}
    if isinstance(alloc.get("modules"), dict):
        return {m: int(v["rank"]) for m, v in alloc["modules"].items() if isinstance(v, dict) and "rank" in v}
    if isinstance(alloc.get("ranks"), dict):
        return {m: int(v) for m, v in alloc["ranks"].items()}
    return {}


MAX_PANELS = 6  # heatmap panels per figure (one per group); a study with more names how many it left out


def _kind_by_layer(values: pd.Series) -> pd.DataFrame:
    """Per-module values as a (projection kind x layer) table; modules without a layer number go to column -1."""
    tab = pd.DataFrame({"layer": [layer_of(m) for m in values.index], "kind": [module_kind(m) for m in values.index],
                        "v": values.values})
    tab["layer"] = tab["layer"].fillna(-1).astype(int)
    return tab.pivot_table(index="kind", columns="layer", values="v")


def _layer_panels(panels: list[tuple[str, str, pd.DataFrame]], ctx: PlotContext, *, cmap: str, vmin: float,
                  vmax: Optional[float], fmt, colorbar: str, title: str, dark_above: Optional[float] = None):
    """One heatmap per arm (rows: projection kind, columns: layer), a shared colour bar, cells annotated.

    At most :data:`MAX_PANELS` panels; the title says how many groups were left out. ``vmax=None``: the largest
    value shown. Sized by the number of layers: a cell is at least 0.3 in wide (room for "100" at 6.5 pt), panels
    side by side only while two fit a page, and every other layer labelled past 16 layers (tick labels never overlap)."""
    if len(panels) > MAX_PANELS:
        title += f": the first {MAX_PANELS} of {len(panels)} groups"
        panels = panels[:MAX_PANELS]
    if vmax is None:
        vmax = max(float(np.nanmax(m.values)) for _, _, m in panels)
    n_layers = max(m.shape[1] for _, _, m in panels)
    n_kinds = max(m.shape[0] for _, _, m in panels)
    panel_w = max(3.6, 0.3 * n_layers + 1.2)
    ncol = 2 if len(panels) > 1 and panel_w <= 5.0 else 1
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(panel_w * ncol + 0.8, (0.3 * n_kinds + 1.1) * nrow + 0.5), squeeze=False,
                             layout="constrained")
    im = None
    step = 2 if n_layers > 16 else 1
    for ax, (label, arm, mat) in zip(axes.flat, panels):
        im = ax.imshow(mat.values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.grid(False)
        for (i, j), v in np.ndenumerate(mat.values):
            if np.isfinite(v):
                dark = v > dark_above if dark_above is not None else v < 0.6 * vmax
                ax.text(j, i, fmt(v), ha="center", va="center", fontsize=6.5 if n_layers <= 16 else 6,
                        color="white" if dark else "black")
        cols = list(mat.columns)
        ax.set_xticks(range(0, len(cols), step), [str(c) if c >= 0 else "other" for c in cols[::step]])
        ax.set_yticks(range(mat.shape[0]), [k.rsplit(".", 1)[-1] for k in mat.index])
        ax.set_xlabel("layer")
        # a long group label (budget_aware's "ba_lora no uniform_ranks use_warmstart shots=16 ...") wraps to its panel
        ax.set_title(textwrap.fill(label, width=int(panel_w * 11)), color=ctx.colour(arm), fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    fig.colorbar(im, ax=axes, label=colorbar, fraction=0.04, pad=0.02)
    fig.suptitle(title)
    return fig


def plot_rank_heatmap(ctx: PlotContext) -> list[str]:
    panels = []
    for grp in ctx.agg.itertuples():
        mats = [pd.Series(r) for r in (ranks_of_run(ctx.study.run(name)) for name in grp.runs) if r]
        if mats:
            mean = pd.concat(mats, axis=1).mean(axis=1)
            label = grp.label + (f" (mean of {len(mats)} seeds)" if len(mats) > 1 else "")
            panels.append((label, grp.arm, _kind_by_layer(mean)))
    if not panels:
        raise Skip("no per-module ranks (allocation.json of BA-LoRA or SoRA runs)")
    fig = _layer_panels(panels, ctx, cmap="viridis", vmin=0, vmax=None, fmt=lambda v: f"{v:.3g}",
                        colorbar="rank per module", title="Rank allocation (modules × layers)")
    return [ctx.save(fig, "rank_allocation_heatmap")]


def _errorbar_by_arm(ctx: PlotContext, ax, x: str, y: str, agg: Optional[pd.DataFrame] = None, label_fmt=None):
    agg = ctx.agg if agg is None else agg
    for i, arm in enumerate(_ordered(ctx, agg["arm"].unique())):
        a = agg[agg["arm"] == arm].dropna(subset=[f"{x}_mean", f"{y}_mean"]).sort_values(f"{x}_mean")
        if a.empty:
            continue
        # a line joins only the groups of one setting (budget_aware's few-shot arms beside its full-data ones are
        # points of their own, not a zigzag through the full-data curve)
        setting = [k for k in ctx.study.group_keys if k.startswith(("data.", "training.")) and k in a]
        parts = [g for _, g in a.groupby(setting, dropna=False, sort=False)] if setting else [a]
        for j, part in enumerate(parts):
            ax.errorbar(part[f"{x}_mean"], part[f"{y}_mean"], yerr=np.nan_to_num(part[f"{y}_std"].to_numpy(dtype=float)),
                        fmt=("-" if len(part) > 1 else "") + MARKERS[i % len(MARKERS)], capsize=2.5, color=ctx.colour(arm),
                        label=arm if j == 0 else None)


def plot_performance(ctx: PlotContext) -> list[str]:
    m = ctx.study.main_metric
    need = [f"{m}_mean", "trainable_params_mean"]
    if any(c not in ctx.agg for c in need) or ctx.agg[need].dropna().empty:
        raise Skip(f"no {m} with trainable_params in the completed runs")
    fig, ax = plt.subplots(figsize=(3.6, 2.7))
    _errorbar_by_arm(ctx, ax, "trainable_params", m)
    x = ctx.agg["trainable_params_mean"].dropna()
    if len(x) and x.max() / max(x.min(), 1) > 20:
        ax.set_xscale("log")
        ax.margins(x=0.08)
    else:
        _count_ticks(ax.xaxis)
    if ctx.baseline and m in ctx.baseline:
        ax.axhline(ctx.baseline[m], ls=":", color="0.3", lw=1, label=f"majority class ({ctx.baseline[m]:.3f})")
    ax.set_xlabel("trainable parameters (count)")
    ax.set_ylabel(_metric_label(m) + " (mean ± std)")
    ax.set_title("Performance vs trainable parameters")
    if len(ax.get_legend_handles_labels()[0]) > 4:  # inside, "best" lands on the curves of a study with many arms
        _legend(ax, loc="center left", bbox_to_anchor=(1.02, 0.5))
    else:
        _legend(ax, loc="best")
    return [ctx.save(fig, "performance_plot")]


def _mean_curve(frames: list[pd.DataFrame], x: str, y: str) -> Optional[pd.DataFrame]:
    frames = [f[[x, y]].dropna() for f in frames if f is not None and x in f and y in f]
    frames = [f for f in frames if len(f)]
    if not frames:
        return None
    return pd.concat(frames).groupby(x)[y].agg(["mean", "std"]).reset_index()


def _history(run) -> Optional[pd.DataFrame]:
    h = run.history
    if not h or not all(isinstance(v, list) for v in h.values()) or len({len(v) for v in h.values()}) != 1:
        return None
    h = pd.DataFrame(h)
    return h.assign(epoch=range(1, len(h) + 1)) if "epoch" not in h else h


def eval_curves(runs, metrics: list[str]) -> tuple[str, dict[str, Optional[pd.DataFrame]]]:
    """Validation curves of a group of runs: ("step", mean curve per metric over eval_log.csv's evaluations)
    when the evaluations are more than the epochs or there is at most one epoch (a one-epoch curve over an
    epoch axis is one dot), else ("epoch", curves over training_history.json). Training loss on a step axis
    comes from loss_log.csv."""
    hist = [_history(r) for r in runs]
    evals = [r.csv("eval_log.csv") for r in runs]
    n_epochs = max((len(h) for h in hist if h is not None), default=0)
    n_evals = max((e["step"].nunique() for e in evals if e is not None and "step" in e), default=0)
    if n_evals and (n_evals > n_epochs or n_epochs < 2):
        frames = {m: _mean_curve(evals, "step", m) for m in metrics}
        if "train_loss" in metrics:
            frames["train_loss"] = _mean_curve([r.csv("loss_log.csv") for r in runs], "step", "train_loss")
        return "step", frames
    return "epoch", {m: _mean_curve(hist, "epoch", m) for m in metrics}


def _style_for(ctx: PlotContext, agg: pd.DataFrame):
    """(colour, linestyle, marker) per group: colour by arm, style cycling within an arm."""
    seen: dict[str, int] = {}
    out = {}
    for g in agg.itertuples():
        k = seen.get(g.arm, 0)
        seen[g.arm] = k + 1
        out[g.label] = (ctx.colour(g.arm), LINESTYLES[k % len(LINESTYLES)], MARKERS[k % len(MARKERS)])
    return out


def plot_training_curves(ctx: PlotContext) -> list[str]:
    m = ctx.study.main_metric
    styles = _style_for(ctx, ctx.agg)
    curves_step, curves_eval, axes_of_eval = [], [], set()
    for g in ctx.agg.itertuples():
        runs = [ctx.study.run(n) for n in g.runs]
        c1 = _mean_curve([r.csv("loss_log.csv") for r in runs], "step", "train_loss")
        x, frames = eval_curves(runs, [m])
        if c1 is not None:
            curves_step.append((g.label, c1))
        if frames[m] is not None:
            curves_eval.append((g.label, x, frames[m]))
            axes_of_eval.add(x)
    if not curves_step and not curves_eval:
        raise Skip("no loss_log.csv, eval_log.csv or training_history.json in the completed runs")
    # one x for the right panel: steps when any group has only step evaluations, so groups stay comparable
    x_eval = "step" if "step" in axes_of_eval else "epoch"
    if x_eval == "step":
        curves_eval = []
        for g in ctx.agg.itertuples():
            runs = [ctx.study.run(n) for n in g.runs]
            c = _mean_curve([r.csv("eval_log.csv") for r in runs], "step", m)
            if c is not None:
                curves_eval.append((g.label, "step", c))
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 2.8), sharex=x_eval == "step")
    for label, c in curves_step:
        col, ls, _ = styles[label]
        axes[0].plot(c["step"], c["mean"], ls=ls, color=col, label=label, lw=1.1)
    axes[0].set(xlabel="optimizer step", ylabel="training loss (nats, mean over seeds)", title="training loss")
    for label, x, c in curves_eval:
        col, ls, mk = styles[label]
        axes[1].errorbar(c[x], c["mean"], yerr=np.nan_to_num(c["std"].to_numpy(dtype=float)), ls=ls, marker=mk,
                         color=col, capsize=2, label=label, ms=4)
    if x_eval == "step":
        axes[1].set(xlabel="optimizer step", title=f"{_metric_label(m)} at each evaluation")
        axes[1].tick_params(labelbottom=True)
    else:
        axes[1].set(xlabel="epoch", title=f"{_metric_label(m)} per epoch")
        axes[1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[1].set_ylabel(_metric_label(m))
    # one entry per group with its colour, line style and marker (the marker only where the right panel draws one)
    shown = {label for label, *_ in curves_step} | {label for label, *_ in curves_eval}
    marked = {label for label, *_ in curves_eval}
    labels = [g.label for g in ctx.agg.itertuples() if g.label in shown]
    handles = [matplotlib.lines.Line2D([], [], color=styles[lb][0], ls=styles[lb][1], marker=styles[lb][2] if lb in marked else None,
                                       ms=4, lw=1.1) for lb in labels]
    fig.tight_layout()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), handlelength=3)
    return [ctx.save(fig, "training_curves")]


# ============================================================================ sparse adapters
def _sparsity_curve(run) -> Optional[pd.DataFrame]:
    """Overall sparsity per step: sparsity_log.csv, else the long module log's mean, else loss_log's column."""
    sp = run.csv("sparsity_log.csv")
    if sp is not None and "overall_sparsity" in sp and sp["overall_sparsity"].notna().any():
        return sp[["step", "overall_sparsity"]].rename(columns={"overall_sparsity": "sparsity"})
    long = run.csv("module_metrics.csv")
    if long is not None and {"step", "metric", "value"} <= set(long.columns):
        s = long[long["metric"] == "sparsity"]
        if len(s):
            return s.groupby("step")["value"].mean().rename("sparsity").reset_index()
    ll = run.csv("loss_log.csv")
    if ll is not None and "sparsity" in ll and ll["sparsity"].notna().any():
        return ll[["step", "sparsity"]]
    return None


def module_sparsity(run) -> dict[str, float]:
    """Last logged sparsity of each module (long-format module_metrics.csv first, then sparsity_log.csv)."""
    long = run.csv("module_metrics.csv")
    if long is not None and {"step", "module", "metric", "value"} <= set(long.columns):
        s = long[long["metric"] == "sparsity"]
        if len(s):
            last = s[s["step"] == s["step"].max()]
            return dict(zip(last["module"], last["value"].astype(float)))
    sp = run.csv("sparsity_log.csv")
    if sp is not None and len(sp):
        last = sp.iloc[-1]
        return {c: float(last[c]) for c in sp.columns if c not in ("epoch", "step", "overall_sparsity")}
    return {}


def plot_sparsity_over_steps(ctx: PlotContext) -> list[str]:
    styles = _style_for(ctx, ctx.agg)
    curves = []
    for g in ctx.agg.itertuples():
        c = _mean_curve([_sparsity_curve(ctx.study.run(n)) for n in g.runs], "step", "sparsity")
        if c is not None and c["mean"].notna().any():
            curves.append((g.label, c))
    if not curves:
        raise Skip("no sparsity logs (sparse methods such as SoRA/SDoRA write them)")
    fig, ax = plt.subplots(figsize=(3.6, 2.7))
    for label, c in curves:
        col, ls, _ = styles[label]
        ax.plot(c["step"], 100 * c["mean"], ls=ls, color=col, label=label)
        if c["std"].notna().any():
            ax.fill_between(c["step"], 100 * (c["mean"] - c["std"]), 100 * (c["mean"] + c["std"]), color=col, alpha=0.12, lw=0)
    ax.set(xlabel="optimizer step", ylabel="pruned gate entries (%)", title="Sparsity over training (per λ)")
    _legend(ax, loc="center left", bbox_to_anchor=(1.02, 0.5))  # outside: inside, "best" still lands on a curve
    return [ctx.save(fig, "sparsity_over_steps")]


def plot_layer_sparsity(ctx: PlotContext) -> list[str]:
    panels = []
    for g in ctx.agg.itertuples():
        vals = [v for v in (module_sparsity(ctx.study.run(n)) for n in g.runs) if v]
        if vals:
            panels.append((g.label, g.arm, 100 * _kind_by_layer(pd.DataFrame(vals).mean())))
    if not panels:
        raise Skip("no per-module sparsity (sparsity_log.csv or module_metrics.csv)")
    fig = _layer_panels(panels, ctx, cmap="magma_r", vmin=0, vmax=100, fmt=lambda v: f"{v:.0f}", colorbar="pruned (%)",
                        title="Final sparsity per module (% of gate entries pruned)", dark_above=50)
    return [ctx.save(fig, "layer_sparsity_heatmap")]


def plot_metric_vs_effective(ctx: PlotContext) -> list[str]:
    m = ctx.study.main_metric
    agg = ctx.agg
    need = [f"{m}_mean", "effective_params_mean", "trainable_params_mean"]
    if any(c not in agg for c in need) or agg[need].dropna().empty:
        raise Skip("no effective_params with the main metric")
    if not (agg["effective_params_mean"] < agg["trainable_params_mean"]).any():
        raise Skip("every run's effective parameters equal its trainable parameters (no sparse method)")
    fig, ax = plt.subplots(figsize=(3.6, 2.7))
    styles = _style_for(ctx, agg)
    shown = agg.dropna(subset=need)
    hollow = None  # the marker of one hollow (trainable) point, for the legend entry that explains them
    for g in shown.itertuples():
        col, _, mk = styles[g.label]
        y, e, t = getattr(g, f"{m}_mean"), g.effective_params_mean, g.trainable_params_mean
        yerr = getattr(g, f"{m}_std")
        ax.errorbar([e], [y], yerr=[0 if pd.isna(yerr) else yerr], fmt=mk, color=col, capsize=2, label=g.label)
        if e < t:
            ax.plot([e, t], [y, y], ":", color=col, lw=0.8)
            ax.plot([t], [y], mk, mfc="white", color=col, ms=4)
            hollow = hollow or mk
    if hollow:
        ax.plot([], [], ls=":", marker=hollow, mfc="white", color="0.35", ms=4, lw=0.8, label="hollow: trainable params")
    x = pd.concat([shown["effective_params_mean"], shown["trainable_params_mean"]])
    if _wide(x):
        ax.set_xscale("log")
        ax.margins(x=0.08)
    else:
        _count_ticks(ax.xaxis)
    ax.set(xlabel="effective parameters (count" + (", log scale)" if _wide(x) else ")"), ylabel=_metric_label(m),
           title=f"{_metric_label(m)} vs effective parameters")
    h, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(h)), key=lambda i: labels[i].startswith("hollow:"))  # the arms, then the explanation
    ax.legend([h[i] for i in order], [labels[i] for i in order], loc="center left", bbox_to_anchor=(1.02, 0.5))
    return [ctx.save(fig, "metric_vs_effective_params")]


# ============================================================================ gradient projection
def _size_axis(method) -> Optional[str]:
    """The method's (first) size axis, the x of its memory and loss-per-rank curves."""
    axes = size_axes(method)
    return axes[0] if axes else None


def plot_optimizer_memory(ctx: PlotContext) -> list[str]:
    df = ctx.done
    if "optimizer_state_mb" not in df or df["optimizer_state_mb"].isna().all():
        raise Skip("no optimizer_state_bytes in any method summary (rSVD runs record it)")
    fig, ax = plt.subplots(figsize=(3.6, 2.7))
    adam = []
    for i, arm in enumerate(_ordered(ctx, df["arm"].unique())):
        a = df[df["arm"] == arm]
        key = rank_axis(a["method"].iloc[0])  # x is a rank: a parameter budget or an intrinsic dimension is not one
        if key is None or key not in a:
            continue
        a = a[a[key].notna()]
        if a.empty:
            continue
        if a["optimizer_state_mb"].notna().any():
            y = a.groupby(key)["optimizer_state_mb"].mean()
            ax.plot(y.index, y.values, "-" + MARKERS[i % len(MARKERS)], color=ctx.colour(arm), label=f"{arm} (measured)")
            adam.extend(a["trainable_params"].dropna().tolist())
        elif "trainable_params" in a:
            # AdamW over the adapter: two fp32 moments per trainable parameter
            y = (a.groupby(key)["trainable_params"].mean() * 8 / 2**20).dropna()
            if y.empty:
                continue
            ax.plot(y.index, y.values, "--" + MARKERS[i % len(MARKERS)], color=ctx.colour(arm), label=f"{arm} (AdamW, 8 B/param)")
    if adam:
        mb = max(adam) * 8 / 2**20
        ax.axhline(mb, ls=":", color="0.2", lw=1.1, label=f"Adam, full model ({mb:,.0f} MiB)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set(xlabel="rank r", ylabel="optimizer state (MiB, log scale)", title="Optimizer memory vs rank")
    _legend_below(ax, ncol=1)
    return [ctx.save(fig, "optimizer_memory_vs_rank")]


def plot_peak_memory(ctx: PlotContext) -> list[str]:
    agg = ctx.agg
    if "peak_memory_mb_mean" not in agg or agg["peak_memory_mb_mean"].isna().all():
        raise Skip("no peak_memory_mb in results_final.json")
    agg = agg.dropna(subset=["peak_memory_mb_mean"])
    kinds = ctx.done.get("peak_memory_kind", pd.Series(dtype=object)).dropna().unique()
    what = {"cuda_max_allocated": "CUDA max allocated", "cpu_max_rss": "process max RSS"}
    kind = ", ".join(what.get(k, k) for k in kinds) or "peak"
    fig, ax = plt.subplots(figsize=(max(3.6, 0.32 * len(agg) + 1.2), 2.8))
    x = np.arange(len(agg))
    ax.bar(x, agg["peak_memory_mb_mean"], yerr=np.nan_to_num(agg["peak_memory_mb_std"].to_numpy(dtype=float)), capsize=2,
           color=[ctx.colour(a) for a in agg["arm"]], error_kw={"lw": 0.8})
    ax.set_xticks(x, list(agg["label"]), rotation=45, ha="right")
    ax.set(ylabel=f"peak memory (MiB; {kind})", title="Peak memory per run configuration")
    return [ctx.save(fig, "peak_memory")]


def plot_loss_per_epoch(ctx: PlotContext) -> list[str]:
    df = ctx.done
    arms = []
    for arm in _ordered(ctx, df["arm"].unique()):
        a = df[df["arm"] == arm]
        key = _size_axis(a["method"].iloc[0])
        if key and key in a and a[key].nunique() > 1:
            arms.append((arm, key))
    if not arms:
        raise Skip("no method run at more than one rank")
    ncol = min(len(arms), 3)
    nrow = math.ceil(len(arms) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.45 * ncol + 0.4, 2.9 * nrow), squeeze=False, sharey=True)
    xs = set()
    for ax, (arm, key) in zip(axes.flat, arms):
        a = df[df["arm"] == arm]
        sizes = sorted(a[key].dropna().unique())
        cmap = matplotlib.colors.LinearSegmentedColormap.from_list("arm", ["#dddddd", ctx.colour(arm)])
        for k, size in enumerate(sizes):
            runs = [ctx.study.run(n) for n in a[a[key] == size]["run"]]
            x, frames = eval_curves(runs, ["train_loss", "val_loss"])
            xs.add(x)
            col = cmap(0.35 + 0.65 * k / max(len(sizes) - 1, 1))
            for y, ls in (("train_loss", "-"), ("val_loss", "--")):
                c = frames.get(y)
                if c is not None:
                    many = len(c) > 12  # a step-by-step training loss: a line, markers would blot it
                    ax.plot(c[x], c["mean"], ls=ls, marker=None if many else "o", ms=3, color=col,
                            label=f"{key.split('.')[-1]}={size:g}" if ls == "-" else None)
        ax.set(xlabel="epoch" if x == "epoch" else "optimizer step", title=arm)
        if x == "epoch":
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax in axes.flat[len(arms):]:
        ax.set_axis_off()
    for row in axes:
        row[0].set_ylabel("loss (nats)")
    what = "epoch" if xs == {"epoch"} else "evaluation"
    fig.suptitle(f"Training (solid) and validation (dashed) loss per {what}, by size")
    for ax, _ in zip(axes.flat, arms):
        _legend(ax, loc="best", fontsize=6.5)
    fig.tight_layout()
    return [ctx.save(fig, "loss_per_epoch_per_rank")]


# ============================================================================ registry
PLOTS: list[tuple[str, str, Callable[[PlotContext], list[str]]]] = [
    ("subspace allocation", "pareto_frontier_d{d}", plot_pareto_frontier),
    ("subspace allocation", "compression_comparison_d{d}", plot_compression_comparison),
    ("subspace allocation", "allocation_comparison_grid", plot_allocation_grid),
    ("subspace allocation", "learned_gating_heatmap_d{d}", plot_gating_heatmaps),
    ("subspace allocation", "learned_gating_trend", plot_gating_trend),
    ("budget-aware ranks", "rank_allocation_heatmap", plot_rank_heatmap),
    ("budget-aware ranks", "performance_plot", plot_performance),
    ("budget-aware ranks", "training_curves", plot_training_curves),
    ("sparse adapters", "sparsity_over_steps", plot_sparsity_over_steps),
    ("sparse adapters", "layer_sparsity_heatmap", plot_layer_sparsity),
    ("sparse adapters", "metric_vs_effective_params", plot_metric_vs_effective),
    ("gradient projection", "optimizer_memory_vs_rank", plot_optimizer_memory),
    ("gradient projection", "peak_memory", plot_peak_memory),
    ("gradient projection", "loss_per_epoch_per_rank", plot_loss_per_epoch),
]


def make_plots(ctx: PlotContext) -> tuple[list[tuple[str, str]], list[str]]:
    """Draw every plot whose data exists. Returns ([(family, stem)], notes for the skipped ones)."""
    done, notes = [], []
    with plt.rc_context(STYLE):
        for family, name, fn in PLOTS:
            try:
                for stem in fn(ctx):
                    done.append((family, stem))
            except Skip as e:
                notes.append(f"{name}: skipped, {e}")
            finally:
                plt.close("all")
    return done, notes
