"""Adam with low-rank gradient projection (GaLore-style), randomized or exact SVD, and SVT rank choice.

For a weight ``W`` of shape ``(m, n)`` with gradient ``G``:

* every ``update_interval`` steps (and at the first step) the projector is recomputed from the
  current gradient in fp32: if ``m >= n`` it is ``P = V_r^T`` (``r x n``, the top-r right singular
  vectors) and the projected gradient is ``R = G P^T`` (``m x r``); otherwise ``P = U_r``
  (``m x r``, left singular vectors) and ``R = P^T G`` (``r x n``). This is GaLore's ``std``
  convention (``galore_projector.py``): the smaller side of ``W`` is compressed, the moments are
  ``max(m, n) x r``.
* Adam's moments live in the projected space and follow ``torch.optim.AdamW`` exactly
  (``m <- lerp(m, R, 1-b1)``, ``v <- b2 v + (1-b2) R^2``, ``N = m / (sqrt(v / bc2) + eps)``,
  step size ``lr / bc1``).
* The normalised update is projected back (``N P`` or ``P N``), multiplied by ``scale`` and
  applied after decoupled weight decay ``W <- W (1 - lr wd)``.
* When the projector is refreshed the moments are neither reset nor rotated into the new basis
  (GaLore's behaviour): coordinate i keeps meaning "the i-th singular direction".

Parameters of groups without ``rank`` are updated by plain AdamW (same formulas, no projection).

``batched="on"`` (``auto``: on CUDA) does the same math group-wise instead of in a Python loop per
parameter: matrices of one shape share one batched randomized SVD per refresh (each still with its
own seeded test matrix) and batched matmuls per step; the moments use ``torch._foreach_*`` ops and
the unprojected parameters torch's fused AdamW kernel. See :class:`ProjectedAdamW`.

Everything the optimizer needs to continue is a plain tensor in ``self.state`` (``step``,
``exp_avg``, ``exp_avg_sq``, ``proj``), so ``state_dict()`` loads with ``torch.load(...,
weights_only=True)`` and a resumed run takes the same steps. The random test matrix of the
randomized SVD is drawn from a generator seeded by ``(seed, step, parameter index)``: every DDP
process (which sees the same averaged gradient) computes the same projector, and a resumed run
computes the one an uninterrupted run would have.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch

SVD_KINDS = ("randomized", "full")
SVT_KINDS = ("none", "fixed_rank", "rank_fraction")
BATCHED_KINDS = ("auto", "on", "off")
# A batched chunk stacks at most this many bytes of fp32 gradients (bounds the transient memory).
MAX_CHUNK_BYTES = 256 * 2**20


def _generator_seed(seed: int, step: int, index: int) -> int:
    return ((int(seed) * 1_000_003 + int(step)) * 100_003 + int(index)) % (2**63 - 1)


def canonical_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular vectors with a sign fixed by the data: each row of ``vh`` (and the matching column
    of ``u``) is flipped so that its entry of largest magnitude is positive. Works on stacks.

    An SVD is unique only up to the sign of each pair (u_i, v_i), and LAPACK builds choose it
    differently for a matrix and for the same matrix inside a batch; Adam's moments carried over a
    projector refresh are not sign-invariant, so without this the batched and per-matrix paths
    (and two torch builds) drift apart after the first refresh."""
    idx = vh.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(torch.gather(vh, -1, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign.transpose(-1, -2), vh * sign


def randomized_svd(a: torch.Tensor, k: int, oversampling: int = 8, power_iters: int = 2,
                   generator: Optional[torch.Generator] = None,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top singular triplets of ``a`` (``m x n``) by randomized range finding (Halko et al. 2011, Alg. 4.4).

    A Gaussian test matrix ``Omega`` (``n x l``, ``l = min(k + oversampling, m, n)``) is drawn on the
    CPU from ``generator`` (so the result does not depend on the device's RNG), the range of
    ``a Omega`` is refined by ``power_iters`` QR-stabilised power iterations, and the small matrix
    ``Q^T a`` is decomposed exactly.

    Returns:
        ``(U, S, Vh)`` with shapes ``(m, l)``, ``(l,)``, ``(l, n)``, in ``dtype`` (float32; float64
        for reference checks: ``Omega`` is still drawn in float32), singular values in decreasing
        order, signs by :func:`canonical_signs`. Callers keep the first ``k``.
    """
    a = a.to(dtype)
    m, n = a.shape
    l = max(1, min(k + oversampling, m, n))
    omega = torch.randn(n, l, generator=generator, dtype=torch.float32).to(a.device)
    if dtype != torch.float32:
        omega = omega.to(dtype)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(power_iters):
        z = torch.linalg.qr(a.T @ q).Q
        q = torch.linalg.qr(a @ z).Q
    ub, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    u, vh = canonical_signs(q @ ub, vh)
    return u, s, vh


def top_svd(a: torch.Tensor, k: int, kind: str = "randomized", oversampling: int = 8, power_iters: int = 2,
            generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, Vh)`` of ``a`` in fp32, at least ``min(k, m, n)`` triplets (exact or randomized)."""
    if kind == "full":
        return torch.linalg.svd(a.float(), full_matrices=False)
    if kind != "randomized":
        raise ValueError(f"svd must be one of {SVD_KINDS}, got {kind!r}")
    return randomized_svd(a, k, oversampling, power_iters, generator)


# ------------------------------------------------------------------ batched (stacked matrices of one shape)
def draw_test_matrices(n: int, l: int, generators: list[torch.Generator], device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Gaussian test matrices of :func:`randomized_svd_batched`, ``(B, n, l)`` on ``device``.

    Each is drawn in float32 on the CPU from its own generator, exactly as :func:`randomized_svd`
    draws it, so matrix ``i`` of a batch gets the test matrix it would get alone. On CUDA the stack
    is copied from pinned memory without blocking the host (the host can draw the next batch while
    the GPU works on this one).
    """
    omega = torch.stack([torch.randn(n, l, generator=g, dtype=torch.float32) for g in generators])
    device = torch.device(device)
    if device.type == "cuda":
        omega = omega.pin_memory().to(device, non_blocking=True)
    else:
        omega = omega.to(device)
    return omega if dtype == torch.float32 else omega.to(dtype)


def range_finder_batched(a: torch.Tensor, omega: torch.Tensor, power_iters: int = 2) -> torch.Tensor:
    """Orthonormal bases ``Q`` (``B x m x l``) of the ranges of ``a[i] Omega[i]`` refined by
    ``power_iters`` QR-stabilised power iterations: :func:`randomized_svd`'s steps 1 to 3 with
    batched matmuls and one batched ``torch.linalg.qr`` per step (no host synchronisation)."""
    q = torch.linalg.qr(torch.bmm(a, omega)).Q
    at = a.transpose(1, 2)
    for _ in range(power_iters):
        z = torch.linalg.qr(torch.bmm(at, q)).Q
        q = torch.linalg.qr(torch.bmm(a, z)).Q
    return q


def small_svd_batched(a: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, Vh)`` of every ``a[i]`` from its range basis ``q[i]``: one batched SVD of ``Q^T a``,
    signs by :func:`canonical_signs` (as :func:`randomized_svd`)."""
    ub, s, vh = torch.linalg.svd(torch.bmm(q.transpose(1, 2), a), full_matrices=False)
    u, vh = canonical_signs(torch.bmm(q, ub), vh)
    return u, s, vh


def randomized_svd_batched(a: torch.Tensor, k: int, oversampling: int = 8, power_iters: int = 2,
                           generators: Optional[list[torch.Generator]] = None,
                           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`randomized_svd` of each matrix of the stack ``a`` (``B x m x n``) at once.

    ``generators[i]`` draws matrix ``i``'s test matrix, so the result equals ``B`` calls of
    :func:`randomized_svd` with the same generators up to floating-point rounding (batched and
    single matmuls may round differently). Returns ``(U, S, Vh)`` of shapes ``(B, m, l)``,
    ``(B, l)``, ``(B, l, n)`` in ``dtype``.
    """
    a = a.to(dtype)
    b, m, n = a.shape
    l = max(1, min(k + oversampling, m, n))
    if generators is None:
        generators = [None] * b
    if len(generators) != b:
        raise ValueError(f"randomized_svd_batched: {b} matrices but {len(generators)} generators")
    omega = draw_test_matrices(n, l, generators, a.device, dtype)
    return small_svd_batched(a, range_finder_batched(a, omega, power_iters))


def choose_rank(s: torch.Tensor, cap: int, svt: str, threshold: float, fraction: float,
                total_energy: Optional[float] = None) -> int:
    """Number of singular directions to keep.

    Args:
        s: singular values in decreasing order (at least ``cap`` of them when available).
        cap: the rank cap (``rank`` clipped to the matrix size).
        svt: ``none`` (keep ``cap``), ``fixed_rank`` (keep ``sigma_i >= threshold * sigma_1``, at most
            ``cap``) or ``rank_fraction`` (smallest k with ``sum_{i<=k} sigma_i^2 >= fraction * E``,
            at most ``cap``).
        total_energy: ``E``; the exact ``||G||_F^2`` when given (so the fraction is of the whole
            gradient, not of the computed top singular values), else ``sum(s^2)``.

    Returns:
        An integer in ``[1, cap]``.
    """
    cap = max(1, min(cap, s.numel()))
    if svt == "none":
        return cap
    s = s.double()
    if svt == "fixed_rank":
        if s[0] <= 0:
            return 1
        keep = int((s[:cap] >= threshold * s[0]).sum().item())
        return max(1, min(keep, cap))
    if svt == "rank_fraction":
        energy = float((s * s).sum()) if total_energy is None else float(total_energy)
        if energy <= 0:
            return 1
        cum = torch.cumsum(s[:cap] ** 2, 0)
        hits = (cum >= fraction * energy * (1 - 1e-12)).nonzero()
        return int(hits[0].item()) + 1 if hits.numel() else cap
    raise ValueError(f"svt must be one of {SVT_KINDS}, got {svt!r}")


class ProjectedAdamW(torch.optim.Optimizer):
    """AdamW whose 2-D parameters of projected groups keep their moments in a low-rank gradient subspace.

    A param group is *projected* when its ``rank`` is not None; such groups may only hold 2-D
    tensors. Group options (defaults from the constructor): ``lr``, ``betas``, ``eps``,
    ``weight_decay``, ``rank``, ``update_interval``, ``scale``, ``svd`` (``randomized`` |
    ``full``), ``oversampling``, ``power_iters``, ``svt`` (``none`` | ``fixed_rank`` |
    ``rank_fraction``), ``svt_threshold``, ``rank_fraction``.

    Args:
        params: parameters or param-group dicts.
        seed: seeds the randomized SVD test matrices together with the step and parameter index.
        batched: ``off`` (a Python loop per parameter, the reference), ``on`` (multi-tensor step,
            see below) or ``auto`` (``on`` when every parameter is on CUDA).

    The batched step groups projected matrices by shape, dtype, device, rank and step and does
    each group at once: one refresh per group (stacked gradients, batched matmuls, one batched
    ``torch.linalg.qr`` per range-finder step, one batched SVD; every matrix keeps its own seeded
    test matrix), projections and back-projections with ``torch.bmm`` and the moments with
    ``torch._foreach_*`` ops. Unprojected parameters go through torch's fused AdamW kernel on
    CUDA (the same update as the loop; foreach ops elsewhere). The state is the loop's, tensor
    for tensor, so checkpoints move freely between the two; the numbers agree up to rounding.

    After each ``step()``, ``last_refresh`` maps the index of every parameter whose projector was
    recomputed to its new rank (for rank logs); it is transient, not part of the state.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, rank: Optional[int] = None, update_interval: int = 200, scale: float = 1.0,
                 svd: str = "randomized", oversampling: int = 8, power_iters: int = 2, svt: str = "none",
                 svt_threshold: float = 0.1, rank_fraction: float = 0.9, seed: int = 0, batched: str = "off"):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank, update_interval=update_interval,
                        scale=scale, svd=svd, oversampling=oversampling, power_iters=power_iters, svt=svt,
                        svt_threshold=svt_threshold, rank_fraction=rank_fraction)
        if batched not in BATCHED_KINDS:
            raise ValueError(f"batched must be one of {BATCHED_KINDS}, got {batched!r}")
        super().__init__(params, defaults)
        self.seed = int(seed)
        self.batched = batched
        self.last_refresh: dict[int, int] = {}
        for g in self.param_groups:
            if g["rank"] is not None:
                if g["rank"] < 1 or g["update_interval"] < 1:
                    raise ValueError("rank and update_interval must be at least 1")
                if g["svd"] not in SVD_KINDS or g["svt"] not in SVT_KINDS:
                    raise ValueError(f"svd must be in {SVD_KINDS} and svt in {SVT_KINDS}")
                bad = [tuple(p.shape) for p in g["params"] if p.ndim != 2]
                if bad:
                    raise ValueError(f"projected groups hold 2-D tensors only, got shapes {bad[:3]}")

    # -------------------------------------------------------------- projection
    def _refresh(self, group: dict, state: dict, grad: torch.Tensor, step: int, index: int) -> int:
        m, n = grad.shape
        cap = min(group["rank"], m, n)
        gen = None
        if group["svd"] == "randomized":
            gen = torch.Generator().manual_seed(_generator_seed(self.seed, step, index))
        g32 = grad.float()
        u, s, vh = top_svd(g32, cap, group["svd"], group["oversampling"], group["power_iters"], gen)
        total = float(g32.square().sum()) if group["svt"] == "rank_fraction" else None
        k = choose_rank(s, cap, group["svt"], group["svt_threshold"], group["rank_fraction"], total)
        self._install(state, u, vh, k, m, n)
        return k

    @staticmethod
    def _install(state: dict, u: torch.Tensor, vh: torch.Tensor, k: int, m: int, n: int) -> None:
        """Store the rank-``k`` projector taken from ``(u, vh)``; resize the moments if the rank changed."""
        right = m >= n
        proj = vh[:k].contiguous() if right else u[:, :k].contiguous()
        if proj._base is not None:  # a view of a larger (e.g. batched) result: keep only this matrix
            proj = proj.clone()
        old = state.get("proj")
        state["proj"] = proj
        if "exp_avg" in state and old is not None and (old.shape != proj.shape):
            # Rank changed (SVT): keep the coordinates both subspaces share, new ones start at zero.
            for key in ("exp_avg", "exp_avg_sq"):
                t = state[key]
                new = torch.zeros((m, k) if right else (k, n), dtype=t.dtype, device=t.device)
                j = min(k, t.shape[1] if right else t.shape[0])
                if right:
                    new[:, :j] = t[:, :j]
                else:
                    new[:j] = t[:j]
                state[key] = new

    @staticmethod
    def project(grad: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        """``G P^T`` (rows >= cols) or ``P^T G``; fp32 result."""
        m, n = grad.shape
        g = grad.float()
        return g @ proj.T if m >= n else proj.T @ g

    @staticmethod
    def project_back(low: torch.Tensor, proj: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        m, n = shape
        return low.float() @ proj if m >= n else proj @ low.float()

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_refresh = {}
        if self.use_batched():
            self._step_batched()
            return loss
        for _, group, index, p, grad, state, step in self._live_params():
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            projected = group["rank"] is not None
            if projected:
                if step % group["update_interval"] == 0 or "proj" not in state:
                    self.last_refresh[index] = self._refresh(group, state, grad, step, index)
                g = self.project(grad, state["proj"]).to(p.dtype)
            else:
                g = grad
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(g, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(g, memory_format=torch.preserve_format)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            state["step"] += 1
            t = step + 1
            exp_avg.lerp_(g, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            bc1 = 1 - beta1**t
            bc2_sqrt = math.sqrt(1 - beta2**t)
            denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
            if wd != 0:
                p.mul_(1 - lr * wd)
            if projected:
                update = self.project_back(exp_avg / denom, state["proj"], p.shape).to(p.dtype)
                p.add_(update, alpha=-(lr / bc1) * group["scale"])
            else:
                p.addcdiv_(exp_avg, denom, value=-(lr / bc1))
        return loss

    def _live_params(self):
        """``(group index, group, parameter index, p, grad, state, step)`` for every parameter with a gradient,
        its step counter created on first use; the index counts every parameter (the refresh seeds use it)."""
        index = -1
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ProjectedAdamW does not support sparse gradients")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                yield gi, group, index, p, p.grad, state, int(state["step"].item())

    # ------------------------------------------------------------------ batched
    _fused_devices = ("cuda",)  # where unprojected parameters take torch's fused AdamW kernel (tests add "cpu")
    _matmul = "bmm"  # projected groups: "bmm" (stacked) or "mm" (a GEMM per matrix, fused update); see _projected_update

    def use_batched(self) -> bool:
        """Whether :meth:`step` takes the batched path: ``batched`` resolved for the parameters' devices."""
        if self.batched != "auto":
            return self.batched == "on"
        return {p.device.type for g in self.param_groups for p in g["params"]} == {"cuda"}

    def _step_batched(self) -> None:
        refresh: dict[tuple, list] = {}
        projected_items: list[tuple] = []
        plain: dict[tuple, list] = {}
        steps: list[torch.Tensor] = []
        for gi, group, index, p, grad, state, step in self._live_params():
            projected = group["rank"] is not None
            steps.append(state["step"])
            if projected:
                if step % group["update_interval"] == 0 or "proj" not in state:
                    refresh.setdefault((gi, tuple(grad.shape), grad.dtype, grad.device), []).append((index, state, grad, step))
                projected_items.append((gi, p, state, grad, step))
            else:
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                plain.setdefault((gi, p.device, p.dtype, grad.dtype, step), []).append((p, state, grad))
        if refresh:
            self._refresh_batched(refresh)
            self.last_refresh = dict(sorted(self.last_refresh.items()))
        buckets: dict[tuple, list] = {}
        for gi, p, state, grad, step in projected_items:
            proj = state["proj"]
            m, n = grad.shape
            if "exp_avg" not in state:
                shape = (m, proj.shape[0]) if m >= n else (proj.shape[1], n)
                state["exp_avg"] = torch.zeros(shape, dtype=p.dtype, device=grad.device)
                state["exp_avg_sq"] = torch.zeros(shape, dtype=p.dtype, device=grad.device)
            key = (gi, (m, n), p.dtype, grad.dtype, grad.device, tuple(proj.shape), step)
            buckets.setdefault(key, []).append((p, state, grad))
        for key, items in buckets.items():
            m, n = key[1]
            for chunk in _chunks(items, 4 * m * n):
                self._projected_update(self.param_groups[key[0]], chunk, key[-1] + 1)
        for key, items in plain.items():
            self._plain_update(self.param_groups[key[0]], items, key[-1] + 1)
        torch._foreach_add_(steps, 1.0)

    def _refresh_batched(self, refresh: dict[tuple, list]) -> None:
        """New projectors for every matrix in ``refresh`` (keyed by group, shape, dtype, device), one
        batched randomized (or exact) SVD per chunk. The host draws the next chunk's test matrices
        while the device runs the current chunk's range finder."""
        chunks = []
        for (gi, (m, n), _, device), items in refresh.items():
            chunks += [(self.param_groups[gi], m, n, device, c) for c in _chunks(items, 4 * m * n)]

        def test_matrices(c: int) -> Optional[torch.Tensor]:
            if c >= len(chunks) or chunks[c][0]["svd"] != "randomized":
                return None
            group, m, n, device, items = chunks[c]
            l = max(1, min(min(group["rank"], m, n) + group["oversampling"], m, n))
            gens = [torch.Generator().manual_seed(_generator_seed(self.seed, step, index)) for index, _, _, step in items]
            return draw_test_matrices(n, l, gens, device)

        upcoming = test_matrices(0)
        for c, (group, m, n, device, items) in enumerate(chunks):
            omega = upcoming
            a = torch.stack([grad for _, _, grad, _ in items]).float()
            if group["svd"] == "randomized":
                q = range_finder_batched(a, omega, group["power_iters"])
                upcoming = test_matrices(c + 1)
                u, s, vh = small_svd_batched(a, q)
            else:
                upcoming = test_matrices(c + 1)
                u, s, vh = torch.linalg.svd(a, full_matrices=False)
            svt = group["svt"]
            totals = torch.stack([a[i].square().sum() for i in range(len(items))]).tolist() if svt == "rank_fraction" else None
            s_host = s if svt == "none" else s.cpu()  # "none" reads no value: no host synchronisation
            cap = min(group["rank"], m, n)
            for i, (index, state, _, _) in enumerate(items):
                k = choose_rank(s_host[i], cap, svt, group["svt_threshold"], group["rank_fraction"],
                                None if totals is None else totals[i])
                self._install(state, u[i], vh[i], k, m, n)
                self.last_refresh[index] = k

    def _projected_update(self, group: dict, items: list[tuple], t: int) -> None:
        """One Adam step for matrices of one shape, dtype, device, rank and step count.

        ``_matmul = "bmm"``: projections as one ``torch.bmm`` over the stacked group. ``"mm"`` (for
        float32 weights): one GEMM per matrix without stacking, and the back-projection, weight
        decay and update fused into one ``addmm_`` per weight (less memory traffic, more launches).
        The moments use ``torch._foreach_*`` ops either way."""
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        params = [p for p, _, _ in items]
        states = [st for _, st, _ in items]
        grads = [g for _, _, g in items]
        m, n = grads[0].shape
        right = m >= n
        dtype = params[0].dtype
        per_matrix = self._matmul == "mm" and dtype == torch.float32
        projs = [st["proj"] for st in states]  # (r, n) or (m, r), fp32
        if per_matrix:
            lows = [g.float() @ pr.T if right else pr.T @ g.float() for g, pr in zip(grads, projs)]
        else:
            proj = torch.stack(projs)
            stacked = torch.stack(grads).float()
            low = (torch.bmm(stacked, proj.transpose(1, 2)) if right else torch.bmm(proj.transpose(1, 2), stacked)).to(dtype)
            del stacked
            lows = list(low.unbind(0))
        exp_avg = [st["exp_avg"] for st in states]
        exp_avg_sq = [st["exp_avg_sq"] for st in states]
        torch._foreach_lerp_(exp_avg, lows, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, lows, lows, value=1 - beta2)
        del lows
        bc1 = 1 - beta1**t
        bc2_sqrt = math.sqrt(1 - beta2**t)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        normed = torch._foreach_div(exp_avg, denom)
        del denom
        alpha = -(lr / bc1) * group["scale"]
        if per_matrix:
            for p, nm, pr in zip(params, normed, projs):
                if right:
                    p.addmm_(nm, pr, beta=1 - lr * wd, alpha=alpha)
                else:
                    p.addmm_(pr, nm, beta=1 - lr * wd, alpha=alpha)
            return
        normed = torch.stack(normed).float()
        update = (torch.bmm(normed, proj) if right else torch.bmm(proj, normed)).to(dtype)
        del normed
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_add_(params, list(update.unbind(0)), alpha=alpha)

    def _plain_update(self, group: dict, items: list[tuple], t: int) -> None:
        """AdamW for unprojected tensors of one device, dtype and step count: torch's fused kernel
        where it applies, else ``torch._foreach_*`` ops with the loop's formulas."""
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        params = [p for p, _, _ in items]
        grads = [g for _, _, g in items]
        exp_avg = [st["exp_avg"] for _, st, _ in items]
        exp_avg_sq = [st["exp_avg_sq"] for _, st, _ in items]
        if self._fusable(params, grads, exp_avg, exp_avg_sq):
            # The fused kernel reads the step count (after the increment) from a device tensor; one is enough for all.
            step = torch.full((), float(t), dtype=torch.float32, device=params[0].device)
            torch._fused_adamw_(params, grads, exp_avg, exp_avg_sq, [], [step] * len(params), lr=lr, beta1=beta1,
                                beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False)
            return
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
        bc1 = 1 - beta1**t
        bc2_sqrt = math.sqrt(1 - beta2**t)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_addcdiv_(params, exp_avg, denom, value=-(lr / bc1))

    def _fusable(self, params, grads, exp_avg, exp_avg_sq) -> bool:
        if not hasattr(torch, "_fused_adamw_") or params[0].device.type not in self._fused_devices:
            return False
        dtype = params[0].dtype
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            return False
        return all(t.dtype == dtype and t.is_contiguous() for ts in (params, grads, exp_avg, exp_avg_sq) for t in ts)

    # ----------------------------------------------------------------- inspect
    def ranks(self) -> dict[int, int]:
        """Current rank of every projected parameter that has a projector, by parameter index."""
        out, index = {}, -1
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                proj = self.state.get(p, {}).get("proj")
                if proj is not None:
                    m, n = p.shape
                    out[index] = proj.shape[0] if m >= n else proj.shape[1]
        return out

    def state_bytes(self) -> int:
        """Bytes of every tensor the optimizer holds (moments, projectors, step counters)."""
        return sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values() if torch.is_tensor(v))


def _chunks(items: list, nbytes: int) -> list[list]:
    """``items`` in runs whose stacked fp32 matrices (``nbytes`` each) stay within MAX_CHUNK_BYTES."""
    per = max(1, MAX_CHUNK_BYTES // max(1, nbytes))
    return [items[i:i + per] for i in range(0, len(items), per)]


def state_size_formula(shape: tuple[int, int], rank: int, moment_bytes: int = 4, proj_bytes: int = 4) -> dict[str, int]:
    """Bytes of the projected state of one ``m x n`` matrix at rank ``rank`` (no SVT):
    two moments of ``max(m, n) x r`` and a projector of ``min(m, n) x r``, plus the 4-byte step."""
    m, n = shape
    r = min(rank, m, n)
    return {"moments": 2 * max(m, n) * r * moment_bytes, "projector": min(m, n) * r * proj_bytes, "step": 4}
