"""BA-LoRA's pure math: importance scores, budgeted integer rank allocation, warm start.

Nothing here touches a model, so every function can be checked by hand or by brute force
(tests/test_ba_lora.py). Notation, per adapted module ``m``:

    c_m = d_in_m + d_out_m        LoRA parameters per unit of rank (A: r x d_in, B: d_out x r)
    P(r) = sum_m r_m * c_m        LoRA parameter count of a rank vector r
    lo <= r_m <= hi_m             hi_m = min(max_rank, d_in_m, d_out_m)

Allocation (phase 2) solves, for a budget ``b``::

    1. maximise P(r) subject to P(r) <= b           (as close to the budget as integers allow)
    2. among those, minimise sum_m c_m * |r_m - t_m|  (closest to the proportional allocation)

where ``t`` is the continuous allocation proportional to importance: module m's share of the
budget is proportional to its importance w_m (t_m = lambda * w_m / c_m), clamped to
[lo, hi_m], with lambda chosen so that sum_m c_m t_m = b (water filling: what a clamped
module cannot take goes to the others). Both objectives are solved exactly by a dynamic
programme over the budget in units of g = gcd(c); a greedy fallback (floor of t, then the
largest remaining shortfall first) is used only when the table would be too large.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from ...errors import PeftlabError

#: Row norm of peft's default LoRA A (Kaiming-uniform with a=sqrt(5): U(-1/sqrt(d_in), 1/sqrt(d_in)),
#: so E||row||^2 = d_in * 1/(3 d_in) = 1/3). The SVD warm start gives A rows of this norm.
DEFAULT_A_ROW_NORM = 1.0 / math.sqrt(3.0)

# Largest dynamic programme solved exactly: modules x budget units (table of choices), and
# modules x ranks x units (work). Beyond either, the greedy fallback is used (flagged exact=False).
_MAX_TABLE = 60_000_000
_MAX_WORK = 3_000_000_000


# ----------------------------------------------------------------------------- importance
def importance_score(weight: torch.Tensor, grad: torch.Tensor, kind: str) -> float:
    """Importance of one module from its weight and its averaged gradient (same shape).

    Args:
        weight: the frozen weight W (any orientation).
        grad: the gradient of the loss w.r.t. W averaged over the importance examples.
        kind: ``weight_grad``: mean |W * G| (GoRA's default sensitivity, a first-order estimate
            of the loss change from removing each weight, averaged over entries);
            ``grad_norm``: ||G||_F (the size of the full-fine-tuning step at this module).
    """
    if weight.shape != grad.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and gradient {tuple(grad.shape)} differ in shape")
    g = grad.detach().double()
    if kind == "weight_grad":
        return float((weight.detach().double() * g).abs().mean())
    if kind == "grad_norm":
        return float(torch.linalg.vector_norm(g))
    raise ValueError(f"unknown importance kind {kind!r}")


# ----------------------------------------------------------------------------- allocation
def feasible_budget_range(costs: Sequence[int], min_rank: int, max_ranks: Sequence[int]) -> tuple[int, int]:
    """(smallest, largest) LoRA parameter count reachable with ranks in [min_rank, max_ranks[m]]."""
    lo = sum(min_rank * c for c in costs)
    hi = sum(h * c for h, c in zip(max_ranks, costs))
    return lo, hi


def check_budget(budget: int, costs: Sequence[int], min_rank: int, max_ranks: Sequence[int]) -> None:
    """Raise :class:`PeftlabError` naming the feasible range when ``budget`` is outside it."""
    lo, hi = feasible_budget_range(costs, min_rank, max_ranks)
    if budget < lo:
        raise PeftlabError(
            f"ba_lora budget {budget:,} is too small: rank {min_rank} on each of the {len(costs)} adapted modules already "
            f"needs {lo:,} LoRA parameters. Feasible budgets for this model and these settings are {lo:,} to {hi:,}; "
            "raise --ba_lora.param_budget (or --ba_lora.base_rank), lower --ba_lora.min_rank, or adapt fewer modules "
            "(--model.target_modules)."
        )
    if budget > hi:
        raise PeftlabError(
            f"ba_lora budget {budget:,} is too large: every one of the {len(costs)} adapted modules at its largest allowed "
            f"rank (max_rank, never above min(d_in, d_out)) holds only {hi:,} LoRA parameters. Feasible budgets for this "
            f"model and these settings are {lo:,} to {hi:,}; lower --ba_lora.param_budget (or --ba_lora.base_rank), "
            "raise --ba_lora.max_rank, or adapt more modules (--model.target_modules)."
        )


def proportional_targets(weights: Sequence[float], costs: Sequence[int], budget: float, lo: int,
                         hi: Sequence[int]) -> list[float]:
    """Continuous ranks t_m = clamp(lambda * w_m / c_m, lo, hi_m) with sum_m c_m t_m = budget.

    Module m's share of the budget is proportional to its weight w_m until it hits a bound;
    lambda is found exactly from the breakpoints of the piecewise-linear, nondecreasing
    f(lambda) = sum_m c_m clamp(lambda w_m / c_m, lo, hi_m). Zero-weight modules stay at ``lo``.
    If every weight is zero, all weights count as equal. If the budget is beyond what the
    positive-weight modules can take, they all sit at their upper bounds.
    """
    w = np.asarray(weights, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    lo_v = np.full(len(c), float(lo))
    hi_v = np.asarray(hi, dtype=np.float64)
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError(f"importance weights must be finite and non-negative, got {list(weights)}")
    if not np.any(w > 0):
        w = np.ones_like(w)
    pos = w > 0

    def f(lam: float) -> float:
        t = np.where(pos, np.clip(lam * w / c, lo_v, hi_v), lo_v)
        return float((c * t).sum())

    bps = np.unique(np.concatenate([lo_v[pos] * c[pos] / w[pos], hi_v[pos] * c[pos] / w[pos]]))
    vals = np.array([f(b) for b in bps])
    if budget <= vals[0]:
        lam = bps[0]
    elif budget >= vals[-1]:
        lam = bps[-1]
    else:
        k = int(np.searchsorted(vals, budget, side="right"))  # vals[k-1] <= budget < vals[k]
        b0, b1, f0, f1 = bps[k - 1], bps[k], vals[k - 1], vals[k]
        lam = b0 if f1 == f0 else b0 + (budget - f0) * (b1 - b0) / (f1 - f0)
    t = np.where(pos, np.clip(lam * w / c, lo_v, hi_v), lo_v)
    return [float(x) for x in t]


@dataclass
class Allocation:
    """Result of :func:`allocate_ranks` (all counts are LoRA A/B parameters)."""

    ranks: list[int]
    targets: list[float]
    budget: int
    total: int
    deviation: float
    exact: bool
    costs: list[int] = field(default_factory=list)

    @property
    def leftover(self) -> int:
        return self.budget - self.total


def _deviation(ranks: Sequence[int], targets: Sequence[float], costs: Sequence[int]) -> float:
    return float(sum(c * abs(r - t) for r, t, c in zip(ranks, targets, costs)))


def allocate_ranks(importance: Sequence[float], costs: Sequence[int], budget: int, min_rank: int,
                   max_ranks: Sequence[int], *, force_greedy: bool = False) -> Allocation:
    """Integer ranks proportional to importance whose parameter count is maximal within ``budget``.

    Args:
        importance: one non-negative score per module.
        costs: ``d_in + d_out`` per module (parameters per unit of rank).
        budget: LoRA parameter budget (sum of r_m * c_m may not exceed it).
        min_rank: smallest rank of every module (>= 1).
        max_ranks: largest rank per module.
        force_greedy: use the greedy fallback even when the exact programme is small enough.

    Returns:
        An :class:`Allocation`; with ``exact`` True the total is the largest reachable
        parameter count <= budget and, among rank vectors reaching it, the deviation
        sum_m c_m |r_m - t_m| from the proportional targets is minimal.

    Raises:
        PeftlabError: the budget is outside the feasible range (the message gives the range).
    """
    M = len(costs)
    if not (M == len(importance) == len(max_ranks)) or M == 0:
        raise ValueError("importance, costs and max_ranks need one entry per module (at least one)")
    if min_rank < 1 or any(h < min_rank for h in max_ranks) or any(int(c) != c or c < 1 for c in costs):
        raise ValueError(f"need 1 <= min_rank <= max_ranks and positive integer costs, got {min_rank}, {list(max_ranks)}, {list(costs)}")
    costs = [int(c) for c in costs]
    check_budget(budget, costs, min_rank, max_ranks)
    targets = proportional_targets(importance, costs, budget, min_rank, max_ranks)
    g = math.gcd(*costs)
    units = [c // g for c in costs]
    S = budget // g
    work = sum(h - min_rank + 1 for h in max_ranks) * (S + 1)
    if force_greedy or M * (S + 1) > _MAX_TABLE or work > _MAX_WORK:
        ranks = _greedy(importance, costs, budget, min_rank, max_ranks, targets)
        exact = False
    else:
        ranks = _exact(units, costs, S, min_rank, max_ranks, targets)
        exact = True
    total = sum(r * c for r, c in zip(ranks, costs))
    assert total <= budget, "allocation exceeded the budget"  # invariant of both solvers
    return Allocation(ranks=ranks, targets=targets, budget=budget, total=total,
                      deviation=_deviation(ranks, targets, costs), exact=exact, costs=costs)


def _exact(units: list[int], costs: list[int], S: int, lo: int, hi: Sequence[int], targets: list[float]) -> list[int]:
    """Dynamic programme over used budget units: best[s] = least deviation reaching exactly s."""
    M = len(units)
    inf = np.inf
    best = np.full(S + 1, inf)
    best[0] = 0.0
    choice = np.zeros((M, S + 1), dtype=np.int32)
    for m in range(M):
        new = np.full(S + 1, inf)
        pick = np.zeros(S + 1, dtype=np.int32)
        for r in range(lo, hi[m] + 1):
            off = r * units[m]
            if off > S:
                break
            cand = best[: S + 1 - off] + costs[m] * abs(r - targets[m])
            window = new[off:]
            better = cand < window  # strict: among equal deviations the smaller rank is kept
            window[better] = cand[better]
            pick[off:][better] = r
        best = new
        choice[m] = pick
    reachable = np.flatnonzero(np.isfinite(best))
    s = int(reachable[-1])  # the largest reachable total (lo * sum(units) <= S is guaranteed by check_budget)
    ranks = [0] * M
    for m in range(M - 1, -1, -1):
        r = int(choice[m, s])
        ranks[m] = r
        s -= r * units[m]
    assert s == 0
    return ranks


def _greedy(importance: Sequence[float], costs: list[int], budget: int, lo: int, hi: Sequence[int],
            targets: list[float]) -> list[int]:
    """Floor of the targets, then +1 rank where the shortfall t_m - r_m is largest (ties: importance) while it fits."""
    ranks = [max(lo, min(h, int(math.floor(t + 1e-9)))) for t, h in zip(targets, hi)]
    used = sum(r * c for r, c in zip(ranks, costs))
    while used > budget:  # only possible through the 1e-9 guard: step back the smallest shortfall
        m = min((m for m in range(len(ranks)) if ranks[m] > lo), key=lambda m: (targets[m] - ranks[m], importance[m]))
        ranks[m] -= 1
        used -= costs[m]
    while True:
        fits = [m for m in range(len(ranks)) if ranks[m] < hi[m] and costs[m] <= budget - used]
        if not fits:
            return ranks
        m = max(fits, key=lambda m: (targets[m] - ranks[m], importance[m], -m))
        ranks[m] += 1
        used += costs[m]


def uniform_rank(costs: Sequence[int], budget: int, min_rank: int, max_ranks: Sequence[int]) -> int:
    """The one rank r, the same for every module, with r * sum(c) <= budget as large as allowed."""
    check_budget(budget, costs, min_rank, max_ranks)
    r = budget // sum(costs)
    return max(min_rank, min(r, min(max_ranks)))


# ----------------------------------------------------------------------------- warm start
@dataclass
class WarmStart:
    """A (r x d_in) and B (d_out x r) with ``scaling * B @ A = -k * P``, P the rank-r part of G."""

    A: torch.Tensor
    B: torch.Tensor
    k: float  # the multiplier of -P in the initial update
    captured: float  # ||P||_F / ||G||_F: how much of the gradient the rank-r subspace holds
    zero: bool  # the gradient (or its projection) vanished: B = 0, standard LoRA behaviour


def warm_start_factors(grad: torch.Tensor, rank: int, scaling: float, step: float, *, init: str = "svd",
                       match: str = "norm", eps: float = 1e-6, lora_A: Optional[torch.Tensor] = None,
                       a_row_norm: float = DEFAULT_A_ROW_NORM) -> WarmStart:
    """LoRA factors whose initial update ``scaling * B @ A`` is a descent step along -G.

    With A fixed, B = -(k / scaling) * G A^+ where A^+ = A^T (A A^T + eps' I)^-1 is the regularised
    pseudo-inverse (eps' = eps * tr(A A^T) / r, scale-free). Then scaling * B A = -k * G A^+ A = -k P:
    P is G projected onto the row space of A, and <scaling B A, G> = -k tr(G A^+ A G^T) <= 0 because
    A^+ A is symmetric positive semi-definite, so to first order the loss goes down.

    Args:
        grad: G, the averaged loss gradient w.r.t. the weight in LoRA orientation (d_out x d_in).
        rank: r.
        scaling: the adapter's scale s (alpha / r, or alpha / sqrt(r) with rsLoRA).
        step: the gradient step size eta.
        init: ``svd``: A = a_row_norm * (top-r right singular vectors of G)^T, so P is the best rank-r
            approximation of G (Eckart-Young) and no ill-conditioned inverse is ever formed;
            ``pinv``: keep the given ``lora_A`` (peft's random init) and solve for B (GoRA).
        match: ``norm``: k = eta * ||G||_F / ||P||_F, the initial update has exactly the size of a full
            gradient step eta*G (GoRA's sqrt(d_in / r) factor is this ratio in expectation for random A);
            ``projection``: k = eta, the initial update is the rank-r part of the step eta*G.
        eps: relative ridge of the pseudo-inverse.
        lora_A: A for ``init=pinv``.
        a_row_norm: row norm of A for ``init=svd`` (default: that of peft's default init).
    """
    G = grad.detach()
    if G.dtype not in (torch.float32, torch.float64):
        G = G.float()
    d_out, d_in = G.shape
    if not 1 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank {rank} outside [1, {min(d_out, d_in)}] for a {d_out}x{d_in} gradient")
    if init == "svd":
        _, _, Vh = torch.linalg.svd(G, full_matrices=False)
        A = a_row_norm * Vh[:rank]
    elif init == "pinv":
        if lora_A is None or tuple(lora_A.shape) != (rank, d_in):
            raise ValueError(f"init=pinv needs lora_A of shape ({rank}, {d_in})")
        A = lora_A.detach().to(G.dtype)
    else:
        raise ValueError(f"unknown warm-start init {init!r}")
    gram = A @ A.T
    ridge = eps * float(torch.trace(gram)) / rank
    eye = torch.eye(rank, dtype=G.dtype, device=G.device)
    # A^+ = A^T (A A^T + ridge I)^-1; (A A^T + ridge I) is symmetric positive definite.
    A_pinv = torch.linalg.solve(gram + ridge * eye, A).T  # (d_in, r)
    B_raw = G @ A_pinv  # (d_out, r)
    P = B_raw @ A
    g_norm, p_norm = float(torch.linalg.matrix_norm(G)), float(torch.linalg.matrix_norm(P))
    tiny = torch.finfo(G.dtype).tiny ** 0.5
    if g_norm <= tiny or p_norm <= 1e-12 * g_norm:
        return WarmStart(A=A, B=torch.zeros(d_out, rank, dtype=G.dtype, device=G.device), k=0.0, captured=0.0, zero=True)
    if match == "norm":
        k = step * g_norm / p_norm
    elif match == "projection":
        k = step
    else:
        raise ValueError(f"unknown warm-start match {match!r}")
    B = -(k / scaling) * B_raw
    return WarmStart(A=A, B=B, k=k, captured=p_norm / g_norm, zero=False)
