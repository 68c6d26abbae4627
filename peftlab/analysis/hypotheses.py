"""The seeds' hypotheses, checked with scipy.stats and stated in plain words with their numbers.

Each check returns a :class:`Finding` (or None when the study has nothing to test): a verdict
("supported", "not supported", "inconclusive"), one paragraph of text, and the numbers behind it.
Seeds are the unit of replication: a test over fewer than :data:`MIN_SEEDS` seeds is reported
but called inconclusive. Which runs a check reads comes from the method classes: H1-H3 from the
method with ``allocation_arms``, H4 from each method with an ``equal_budget_rival``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ..methods import METHODS, table_order
from .collect import Study, allocation_method
from .plots import PlotContext, Skip, learned_gammas

MIN_SEEDS = 3  # fewer than this: too few seeds to conclude
ALPHA = 0.05


@dataclass
class Finding:
    hypothesis: str
    verdict: str  # supported | not supported | inconclusive
    text: str
    numbers: dict[str, Any] = field(default_factory=dict)


def _p(p: float) -> str:
    return "p < 0.001" if p < 1e-3 else f"p = {p:.3f}"


def fixed_vs_uniform(ctx: PlotContext) -> list[Finding]:
    """H1: does a fixed A/B split dominate the equal (uniform) split on the (KL, empirical BPD) plane?"""
    df = ctx.done
    cls = allocation_method()
    if cls is None:
        return []
    alloc = cls.allocation_arms
    need = {"bounds.kl_divergence", "bounds.empirical_bpd", alloc["mode"]}
    if "method" not in df or not need <= set(df.columns):
        return []
    df = df[(df["method"] == cls.name)].dropna(subset=["bounds.kl_divergence", "bounds.empirical_bpd"])
    out = []
    for d, dd in df.groupby(alloc["dim"]):
        uni = dd[dd[alloc["mode"]] == alloc["uniform"]]
        fixed = dd[dd[alloc["mode"]] == alloc["fixed"]]
        if uni.empty or fixed.empty:
            continue
        ukl, ubpd = uni["bounds.kl_divergence"].mean(), uni["bounds.empirical_bpd"].mean()
        parts, dominating, significant, nmin = [], [], [], len(uni)
        for ratio, f in fixed.groupby(alloc["ratio"]):
            fkl, fbpd = f["bounds.kl_divergence"].mean(), f["bounds.empirical_bpd"].mean()
            dom = fkl <= ukl and fbpd <= ubpd and (fkl < ukl or fbpd < ubpd)
            nmin = min(nmin, len(f))
            desc = f"ρ={ratio:g}: KL {fkl:.1f} vs {ukl:.1f} nats, BPD {fbpd:.3f} vs {ubpd:.3f}"
            if len(f) >= 2 and len(uni) >= 2:
                t = stats.ttest_ind(f["bounds.empirical_bpd"], uni["bounds.empirical_bpd"], equal_var=False)
                desc += f" (Welch t on BPD {_p(t.pvalue)}, n={len(f)} vs {len(uni)})"
                if dom and t.pvalue < ALPHA:
                    significant.append(ratio)
            parts.append(desc + (" — dominates" if dom else ""))
            if dom:
                dominating.append(ratio)
        if dominating:
            verdict = "supported" if significant and nmin >= MIN_SEEDS else "inconclusive"
            head = (f"At d={d:g}, fixed split{'s' if len(dominating) > 1 else ''} ρ = {', '.join(f'{r:g}' for r in dominating)} "
                    f"dominate{'s' if len(dominating) == 1 else ''} the equal split on the Pareto frontier (lower KL and lower BPD on average)")
            if verdict == "supported":
                head += f"; the BPD difference is significant for ρ = {', '.join(f'{r:g}' for r in significant)}."
            elif nmin < MIN_SEEDS:
                head += f", but with {nmin} seed(s) per arm there are too few seeds to conclude."
            else:
                head += ", but no BPD difference is significant at 0.05 over seeds."
        else:
            verdict = "not supported"
            head = f"At d={d:g}, no fixed split dominates the equal split (none is at least as good in both KL and BPD)."
        out.append(Finding("H1 asymmetric allocation improves the trade-off", verdict, head + " " + "; ".join(parts) + ".",
                           {"d": d, "dominating_ratios": dominating, "uniform_kl": ukl, "uniform_bpd": ubpd}))
    return out


def gammas_differ(ctx: PlotContext) -> list[Finding]:
    """H2: do learned γ_ℓ differ from 0.5? One-sample t-test over seeds of each seed's layer-mean |γ − 0.5| direction."""
    try:
        g = learned_gammas(ctx)
    except Skip:
        return []
    out = []
    for d, gd in g.groupby("d"):
        per_seed = gd.groupby("seed")["gamma"].mean()
        n = len(per_seed)
        mean = float(gd["gamma"].mean())
        layers = gd.groupby("layer")["gamma"]
        per_layer = []
        for layer, vals in layers:
            if len(vals) >= 2 and np.std(vals) > 0:
                per_layer.append((layer, stats.ttest_1samp(vals, 0.5).pvalue))
            elif len(vals) >= 2:
                per_layer.append((layer, 0.0 if abs(vals.mean() - 0.5) > 0 else 1.0))
        k = sum(1 for _, p in per_layer if p < ALPHA / max(len(per_layer), 1))  # Bonferroni over layers
        numbers = {"d": d, "n_seeds": n, "mean_gamma": mean, "layers_differing_bonferroni": k, "n_layers": int(gd["layer"].nunique())}
        if n >= 2 and np.std(per_seed) > 0:
            t = stats.ttest_1samp(per_seed, 0.5)
            numbers.update(t=float(t.statistic), p=float(t.pvalue))
            test = f"one-sample t-test of the per-seed mean γ against 0.5: t = {t.statistic:.2f}, {_p(t.pvalue)} (n = {n} seeds)"
            sig = t.pvalue < ALPHA
        elif n >= 2:
            sig = abs(per_seed.mean() - 0.5) > 0
            test = f"every seed has the same mean γ = {per_seed.mean():.3f} (zero spread, n = {n})"
            numbers.update(p=0.0 if sig else 1.0)
        else:
            sig, test = False, "one seed only: no test over seeds"
        layer_txt = (f"; per layer, {k} of {numbers['n_layers']} layers differ from 0.5 at 0.05 (Bonferroni)" if per_layer else "")
        if n < MIN_SEEDS:
            verdict = "inconclusive"
            text = (f"At d={d:g}, learned γ_ℓ average {mean:.3f} over layers and seeds ({test}{layer_txt}); "
                    f"with {n} seed(s) there are too few seeds to conclude.")
        else:
            verdict = "supported" if sig else "not supported"
            text = (f"At d={d:g}, learned γ_ℓ average {mean:.3f} over layers and seeds, "
                    f"{'significantly different from' if sig else 'not distinguishable from'} the equal split 0.5 ({test}{layer_txt}).")
        out.append(Finding("H2 learned gates differ from 0.5", verdict, text, numbers))
    return out


def gamma_depth_trend(ctx: PlotContext) -> list[Finding]:
    """H3: does γ_ℓ trend with depth? Kendall's τ between ℓ and the seed-mean γ_ℓ (exact p-value for few layers,
    where Spearman's t-approximation is far too optimistic), with Spearman's ρ and the per-seed slopes' signs."""
    try:
        g = learned_gammas(ctx)
    except Skip:
        return []
    out = []
    for d, gd in g.groupby("d"):
        mean = gd.groupby("layer")["gamma"].mean()
        n_seeds = gd["seed"].nunique()
        if len(mean) < 3:
            out.append(Finding("H3 γ_ℓ trends with depth", "inconclusive",
                               f"At d={d:g}, only {len(mean)} layers: a depth trend needs at least 3.", {"d": d}))
            continue
        rho = stats.spearmanr(mean.index, mean.values)
        tau = stats.kendalltau(mean.index, mean.values)
        slope = stats.linregress(mean.index, mean.values)
        signs = []
        for _, s in gd.groupby("seed"):
            if s["layer"].nunique() >= 3:
                signs.append(np.sign(stats.linregress(s["layer"], s["gamma"]).slope))
        agree = f"{sum(1 for x in signs if x == np.sign(slope.slope))} of {len(signs)} seeds have a slope of the same sign"
        numbers = {"d": d, "kendall_tau": float(tau.statistic), "p": float(tau.pvalue), "spearman_rho": float(rho.statistic),
                   "slope_per_layer": float(slope.slope),
                   "n_layers": len(mean), "n_seeds": n_seeds}
        direction = "increases" if slope.slope > 0 else "decreases"
        body = (f"Kendall τ = {tau.statistic:.2f} between layer and mean γ_ℓ, {_p(tau.pvalue)} (n = {len(mean)} layers; "
                f"Spearman ρ = {rho.statistic:.2f}); "
                f"γ_ℓ {direction} by {abs(slope.slope):.3f} per layer on average; {agree}.")
        if n_seeds < MIN_SEEDS:
            verdict, text = "inconclusive", f"At d={d:g}: {body} With {n_seeds} seed(s) there are too few seeds to conclude."
        elif tau.pvalue < ALPHA:
            verdict, text = "supported", f"At d={d:g}, γ_ℓ {direction} with depth: {body}"
        else:
            verdict, text = "not supported", f"At d={d:g}, no significant depth trend: {body}"
        out.append(Finding("H3 γ_ℓ trends with depth", verdict, text, numbers))
    return out


def _context_keys(study: Study) -> list[str]:
    """Varying keys that define the task setting (data and model), within which methods are compared."""
    return [k for k in study.group_keys if k.startswith(("data.", "model."))]


def equal_budget_pairs() -> list[tuple[type, type]]:
    """(method, its ``equal_budget_rival``) for every registered method that names one, in table order."""
    return [(METHODS[m], METHODS[METHODS[m].equal_budget_rival]) for m in table_order(METHODS)
            if METHODS[m].equal_budget_rival in METHODS]


def needs_text() -> str:
    """What the checks need, in words (said when none of them applies)."""
    alloc = allocation_method()
    needs = ([f"{alloc.display_name} bounds", "learned gates"] if alloc else []) + [
        f"{m.display_name} beside {rival.display_name}" for m, rival in equal_budget_pairs()]
    return ", ".join(needs[:-1]) + (", or " if len(needs) > 1 else "") + (needs[-1] if needs else "a method that states them")


def equal_budget(ctx: PlotContext) -> list[Finding]:
    """H4: each method with an ``equal_budget_rival`` beats it at an equal parameter budget (BA-LoRA vs LoRA)."""
    out = []
    for cls, rival in equal_budget_pairs():
        out.extend(beats_rival(ctx, cls, rival))
    return out


def beats_rival(ctx: PlotContext, cls: type, rival: type) -> list[Finding]:
    """H4 for one pair: paired over seeds (paired t-test on the main metric), each group of ``cls``
    against the group of ``rival`` within 5 % of its trainable parameters, in the same data and model setting."""
    df = ctx.done
    if "method" not in df or not {rival.name, cls.name} <= set(df["method"]):
        return []
    hypothesis = f"H4 {cls.display_name} beats {rival.display_name} at equal budget"
    metric = ctx.study.main_metric
    higher = metric in ("val_accuracy", "val_f1")
    ctx_keys = _context_keys(ctx.study)
    agg = ctx.agg
    out = []
    for rec in agg[agg["method"] == cls.name].to_dict("records"):
        me = SimpleNamespace(**{k: v for k, v in rec.items() if k.isidentifier()})
        cands = agg[agg["method"] == rival.name]
        for k in ctx_keys:  # same data and model settings (dotted keys: read from the record, not attributes)
            if k in cands:  # a key one arm leaves unset (NaN, e.g. data.train_samples beside few-shot arms) matches unset
                v = rec.get(k)
                cands = cands[cands[k].isna()] if pd.isna(v) else cands[cands[k] == v]
        if cands.empty or pd.isna(me.trainable_params_mean):
            continue
        rel = (cands["trainable_params_mean"] - me.trainable_params_mean).abs() / me.trainable_params_mean
        best = rel.idxmin()
        if rel[best] > 0.05:  # no group of the rival within 5 % of the budget
            continue
        rv = cands.loc[best]
        me_runs = df[df["run"].isin(me.runs)].set_index("seed")[metric]
        rv_runs = df[df["run"].isin(rv["runs"])].set_index("seed")[metric]
        seeds = sorted(set(me_runs.index) & set(rv_runs.index))
        diff = np.array([me_runs[s] - rv_runs[s] for s in seeds], dtype=float)
        if not higher:
            diff = -diff  # positive = the method better than its rival
        n = len(diff)
        numbers = {cls.name: me.label, rival.name: rv["label"], "metric": metric, "n_pairs": n,
                   f"{cls.name}_params": me.trainable_params_mean, f"{rival.name}_params": rv["trainable_params_mean"]}
        if n == 0:
            out.append(Finding(hypothesis, "inconclusive",
                               f"{me.label} and {rv['label']} share no seed, so they cannot be paired.", numbers))
            continue
        mean, sd = float(diff.mean()), float(diff.std(ddof=1)) if n > 1 else float("nan")
        numbers.update(mean_gain=mean, std_gain=sd)
        gain = f"mean gain {mean:+.4f} {metric} (std {sd:.4f} over {n} paired seeds)" if n > 1 else f"gain {mean:+.4f} {metric} (1 seed)"
        setting = (f"{me.label} vs {rv['label']} ({int(round(me.trainable_params_mean)):,} vs "
                   f"{int(round(rv['trainable_params_mean'])):,} trainable parameters)")
        if n >= 2 and sd > 0:
            t = stats.ttest_rel(me_runs[seeds], rv_runs[seeds])
            p = float(t.pvalue)
            numbers.update(t=float(t.statistic) * (1 if higher else -1), p=p)
            gain += f", paired t-test {_p(p)}"
        elif n >= 2:
            p = 0.0 if mean != 0 else 1.0
            numbers.update(p=p)
            gain += ", identical gain on every seed"
        else:
            p = float("nan")
        if n < MIN_SEEDS:
            verdict, text = "inconclusive", f"{setting}: {gain}; with {n} paired seed(s) there are too few seeds to conclude."
        elif p < ALPHA and mean > 0:
            verdict, text = "supported", f"{setting}: {cls.display_name} is better, {gain}."
        elif p < ALPHA:
            verdict, text = "not supported", f"{setting}: {cls.display_name} is worse, {gain}."
        else:
            verdict, text = "not supported", f"{setting}: no significant difference, {gain}."
        out.append(Finding(hypothesis, verdict, text, numbers))
    return out


MIN_PRUNED = 0.01  # below this share of pruned gate entries at every strength, the strengths cannot be compared


def sparsity_with_strength(ctx: PlotContext) -> list[Finding]:
    """S1/S2 (seed 003's λ table): for each method with a ``sparsity_strength`` key (SoRA's λ), a larger strength
    prunes more (Kendall τ between strength and the final sparsity over all runs) and costs quality (τ between
    strength and the main metric, sign-adjusted so that a positive τ means worse), within one data/model setting."""
    df = ctx.done
    metric = ctx.study.main_metric
    higher = metric in ("val_accuracy", "val_f1")
    out = []
    for cls in METHODS.values():
        key = getattr(cls, "sparsity_strength", None)
        if key is None or "method" not in df or cls.name not in set(df["method"]):
            continue
        rows = df[df["method"] == cls.name]
        if key not in rows or "summary.sparsity" not in rows:
            continue
        rows = rows.dropna(subset=[key, "summary.sparsity"])
        ctx_keys = [k for k in _context_keys(ctx.study) if k in rows]
        for _, grp in (rows.groupby(ctx_keys, dropna=False) if ctx_keys else [(None, rows)]):
            strengths = sorted(grp[key].astype(float).unique())
            if len(strengths) < 2:
                continue
            sym = cls.short_names.get(key, key)
            seeds = int(grp.groupby(key)["seed"].nunique().min()) if "seed" in grp else 1
            per = grp.groupby(key).agg(sparsity=("summary.sparsity", "mean"),
                                       **({"metric": (metric, "mean")} if metric in grp else {}))
            listing = "; ".join(f"{sym} = {lam:g}: {100 * r.sparsity:.3g}% pruned"
                                + (f", {metric} {r.metric:.4g}" if "metric" in per else "") for lam, r in per.iterrows())
            numbers = {"method": cls.name, "strength_key": key, "strengths": strengths, "n_seeds": seeds,
                       "sparsity": [float(v) for v in per["sparsity"]]}
            most = float(grp["summary.sparsity"].max())
            name = cls.display_name
            if most < MIN_PRUNED:
                why = (f"{name} pruned at most {100 * most:.3g}% of its gate entries at any {sym} ({listing}): too little "
                       f"pruning to compare the {sym} values. The gates need more steps or a larger gate learning rate "
                       "(docs/sora.md).")
                out.append(Finding(f"S1 a larger {sym} prunes more ({name})", "inconclusive", why, dict(numbers)))
                if "metric" in per:
                    out.append(Finding(f"S2 a larger {sym} costs {metric} ({name})", "inconclusive", why, dict(numbers)))
                continue
            targets = [("S1", f"a larger {sym} prunes more", grp["summary.sparsity"].astype(float), "sparsity")]
            if metric in grp and grp[metric].notna().all():
                worse = grp[metric].astype(float) * (-1 if higher else 1)  # up = worse
                targets.append(("S2", f"a larger {sym} costs {metric}", worse, f"{metric} worsening"))
            for tag, claim, values, what in targets:
                tau = stats.kendalltau(grp[key].astype(float), values)
                t, pv = float(tau.statistic), float(tau.pvalue)
                nums = dict(numbers, kendall_tau=t, p=pv, n_runs=len(grp))
                body = f"Kendall τ = {t:.2f} between {sym} and {what}, {_p(pv)} over {len(grp)} runs ({listing})."
                if not np.isfinite(t):
                    verdict, text = "inconclusive", f"{name}: {what} is the same at every {sym} ({listing})."
                elif seeds < MIN_SEEDS:
                    verdict, text = "inconclusive", f"{name}: {body} With {seeds} seed(s) per {sym} there are too few seeds to conclude."
                elif pv < ALPHA and t > 0:
                    verdict, text = "supported", f"{name}: {claim}. {body}"
                else:
                    verdict, text = "not supported", f"{name}: not shown that {claim}. {body}"
                out.append(Finding(f"{tag} {claim} ({name})", verdict, text, nums))
    return out


CHECKS = [fixed_vs_uniform, gammas_differ, gamma_depth_trend, equal_budget, sparsity_with_strength]


def check_all(ctx: PlotContext) -> list[Finding]:
    out: list[Finding] = []
    for check in CHECKS:
        out.extend(check(ctx))
    return out


def finding_dict(f: Finding) -> dict[str, Any]:
    def clean(v):
        if isinstance(v, (np.floating, np.integer)):
            return v.item()
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return {"hypothesis": f.hypothesis, "verdict": f.verdict, "text": f.text, "numbers": {k: clean(v) for k, v in f.numbers.items()}}

