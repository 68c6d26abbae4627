"""Random projections P ∈ R^{D×d} for intrinsic-dimension training, regenerated from seeds.

SubLoRA trains a vector w ∈ R^d and sets the adapter parameters to θ = θ₀ + P·w. A dense
P at GPT-2 scale (D ≈ 3·10⁵, d = 2·10³) would take D·d·4 bytes ≈ 2.4 GB, so besides the
dense projector for small problems there are two structured ones whose memory is O(D + d):

``dense``
    Q of the QR factorisation of a D×d Gaussian matrix: orthonormal columns, PᵀP = I.
    Memory D·d floats; refused above :data:`DENSE_MAX_ENTRIES` entries.
``kron``
    The Kronecker family of the SubLoRA reference code (Lotfi et al., 2023): with
    D₁ = ⌊√D⌋, d₁ = ⌊√d⌋, P = Π · (Q₁ ⊗ Q₂ ⊕ R), where Q₁, Q₂ are QR-orthonormalised
    Gaussian D₁×d₁ factors, R a small (D − D₁²)×(d − d₁²) remainder block with orthonormal
    (or, when it is wider than tall, unit-norm) columns, ⊕ the block-diagonal direct sum
    and Π a random row permutation. (Q₁ ⊗ Q₂) vec(W) = vec(Q₁ W Q₂ᵀ), so P·w costs
    O(D·d₁) and the factors take O(√D·√d) ≤ O(D + d) memory; the permutation is D
    integers. Differences from the reference, on purpose: every column has unit norm (the
    reference scales its remainder block by 1/√D, so those coordinates barely move θ),
    and when one remainder dimension would be empty while the other is not (d a perfect
    square and D not, or the reverse) d₁ (D₁) is lowered by one, so that no coordinate
    of w and no entry of θ is left outside the subspace.
``hashed``
    A seeded signed index projection (the idea of UniLoRA / the hashing trick): every
    entry i of θ reads one coordinate h(i) of w with a random sign, h a balanced random
    assignment (each coordinate feeds ⌊D/d⌋ or ⌈D/d⌉ entries), scaled by 1/√(fan-in) so
    columns have exactly unit norm and disjoint supports (PᵀP = I). Memory: one int64
    index and one float per entry of θ; P·w is a gather, the backward a reshape-sum, both
    deterministic. Cheapest of all, but each coordinate of w moves only D/d entries of θ
    (parameter sharing rather than the dense mixing of a Gaussian subspace).

The default is ``kron``: it is the projector the SubLoRA paper and code use (so bounds
and allocations compare with the reference), it mixes every coordinate into all of θ
like a dense Gaussian projection would, its columns are exactly orthonormal, and at
GPT-2 shape it is a few small matmuls per step (see BENCHMARKS.md).

All factors are generated on CPU in float64 from a ``torch.Generator`` seeded with the
projector's seed, then cast to float32: the same seed gives the same P on every device.
Buffers are non-persistent: P is never stored, only its seed.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from ...errors import PeftlabError

ProjectorKind = Literal["kron", "hashed", "dense"]
PROJECTORS = ("kron", "hashed", "dense")
#: largest D·d a dense projector may have (2²⁶ floats = 256 MiB)
DENSE_MAX_ENTRIES = 1 << 26


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed) % (2**63))


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """rows×cols matrix with orthonormal columns (rows ≥ cols) or unit-norm columns."""
    if rows == 0 or cols == 0:
        return torch.zeros(rows, cols)
    m = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    if rows >= cols:
        q, r = torch.linalg.qr(m, mode="reduced")
        q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))  # unique QR
    else:
        q = m / m.norm(dim=0, keepdim=True)
    return q.to(torch.float32)


class Projector(torch.nn.Module):
    """``forward(w) -> P·w`` (length D). Subclasses hold only non-persistent buffers."""

    kind: str = ""

    def __init__(self, D: int, d: int, seed: int):
        super().__init__()
        if d < 1 or D < 1:
            raise PeftlabError(f"a projector needs D >= 1 and d >= 1, got D={D}, d={d}.")
        if d > D:
            raise PeftlabError(f"intrinsic dimension d={d} exceeds the number of parameters it projects onto (D={D}); "
                               f"lower --sublora.intrinsic_dim to at most {D}.")
        self.D, self.d, self.seed = int(D), int(d), int(seed)

    def nbytes(self) -> int:
        """Bytes of every tensor the projector holds."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def matrix(self) -> torch.Tensor:
        """The dense D×d matrix (for tests and small problems only)."""
        eye = torch.eye(self.d, device=next(self.buffers()).device)
        return torch.stack([self(eye[j]) for j in range(self.d)], dim=1)

    def describe(self) -> dict:
        return {"kind": self.kind, "D": self.D, "d": self.d, "seed": self.seed}


class DenseProjector(Projector):
    kind = "dense"

    def __init__(self, D: int, d: int, seed: int):
        super().__init__(D, d, seed)
        if D * d > DENSE_MAX_ENTRIES:
            raise PeftlabError(
                f"a dense projector of {D:,}×{d:,} would hold {D * d * 4 / 2**20:,.0f} MiB; dense is for small problems "
                f"(D·d ≤ {DENSE_MAX_ENTRIES:,}). Use --sublora.projector=kron (the default) or hashed, whose memory is O(D + d).")
        self.register_buffer("P", _orthonormal(D, d, _gen(seed)), persistent=False)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.P.to(w.dtype) @ w


class KroneckerProjector(Projector):
    kind = "kron"

    def __init__(self, D: int, d: int, seed: int):
        super().__init__(D, d, seed)
        D1, d1 = math.isqrt(D), math.isqrt(d)
        if d1 > D1:  # keep the square block no wider than it is tall
            d1 = D1
        # no empty remainder on one side only (see the module docstring)
        if D - D1 * D1 > 0 and d - d1 * d1 == 0:
            d1 -= 1
        elif d - d1 * d1 > 0 and D - D1 * D1 == 0:
            D1 -= 1
        while d - d1 * d1 > D - D1 * D1 and D1 > 0:  # remainder block must be at least as tall as wide
            D1 -= 1
            d1 = min(d1, D1)
        if d1 == 0:  # d = 1 and similar: everything goes to the remainder block
            D1 = 0
        self.D1, self.d1 = D1, d1
        self.Dr, self.dr = D - D1 * D1, d - d1 * d1
        g = _gen(seed)
        self.register_buffer("Q1", _orthonormal(D1, d1, g), persistent=False)
        self.register_buffer("Q2", _orthonormal(D1, d1, g), persistent=False)
        self.register_buffer("R", _orthonormal(self.Dr, self.dr, g), persistent=False)
        self.register_buffer("perm", torch.randperm(D, generator=g), persistent=False)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        dt = w.dtype
        n = self.d1 * self.d1
        parts = []
        if n:
            W = w[:n].view(self.d1, self.d1)
            parts.append((self.Q1.to(dt) @ W @ self.Q2.to(dt).T).reshape(-1))
        if self.Dr:
            parts.append(self.R.to(dt) @ w[n:])
        y = torch.cat(parts) if len(parts) > 1 else parts[0]
        return y[self.perm]

    def describe(self) -> dict:
        return {**super().describe(), "D1": self.D1, "d1": self.d1, "remainder": [self.Dr, self.dr]}


class HashedProjector(Projector):
    kind = "hashed"

    def __init__(self, D: int, d: int, seed: int):
        super().__init__(D, d, seed)
        g = _gen(seed)
        # sorted position k feeds from coordinate k % d; entry i of θ sits at position inv[i]
        perm = torch.randperm(D, generator=g)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(D)
        fan_in = torch.bincount(torch.arange(D) % d, minlength=d).to(torch.float64)
        sign = torch.randint(0, 2, (D,), generator=g, dtype=torch.int64) * 2 - 1
        coef = sign.to(torch.float64) / fan_in[torch.arange(D) % d].sqrt()
        self.reps = math.ceil(D / d)
        self.register_buffer("inv", inv, persistent=False)
        self.register_buffer("coef", coef.to(torch.float32), persistent=False)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        tiled = w.repeat(self.reps)[: self.D] * self.coef.to(w.dtype)
        return tiled[self.inv]


_KINDS = {"dense": DenseProjector, "kron": KroneckerProjector, "hashed": HashedProjector}


class _TransposeApply(torch.autograd.Function):
    """y = Hᵀ·w for a linear projector H (d_out×D, orthonormal columns), backward H·g."""

    @staticmethod
    def forward(ctx, w, inner):
        ctx.inner = inner
        with torch.enable_grad():
            u = torch.zeros(inner.d, dtype=w.dtype, device=w.device, requires_grad=True)
            (gu,) = torch.autograd.grad(inner(u), u, grad_outputs=w.detach())
        return gu

    @staticmethod
    def backward(ctx, g):
        with torch.no_grad():
            return ctx.inner(g), None


class WideProjector(Projector):
    """P = Hᵀ for d > D, H a d×D projector of the same kind: orthonormal rows (every entry of θ
    reachable, P·Pᵀ = I) and columns of equal expected norm √(D/d). Used only where one block
    of learned allocation receives more coordinates (all d) than it has parameters."""

    def __init__(self, kind: str, D: int, d: int, seed: int):
        torch.nn.Module.__init__(self)
        self.kind, self.D, self.d, self.seed = kind, int(D), int(d), int(seed)
        self.inner = _KINDS[kind](d, D, seed)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _TransposeApply.apply(w, self.inner)

    def describe(self) -> dict:
        return {**self.inner.describe(), "transposed": True}


def make_projector(kind: str, D: int, d: int, seed: int, allow_wide: bool = False) -> Projector:
    """A D×d projector; with ``allow_wide`` and d > D, the transpose of a d×D one."""
    if kind not in _KINDS:
        raise PeftlabError(f"unknown projector {kind!r}; choose one of {', '.join(PROJECTORS)}.")
    if allow_wide and d > D:
        return WideProjector(kind, D, d, seed)
    return _KINDS[kind](D, d, seed)


#: rows of the sketch a projector fingerprint keeps
FINGERPRINT_SIZE = 16
#: largest relative difference ‖z − z₀‖/‖z₀‖ of two fingerprints of the same projector (float32 rounding,
#: BLAS summation order and LAPACK's last bits stay far below it; any other change is of order 1)
FINGERPRINT_RTOL = 1e-4


def probe_vector(d: int) -> torch.Tensor:
    """A fixed probe in R^d that uses no random generator: entry k is ((7919·k mod 1000) − 499.5)/1000."""
    k = torch.arange(d, dtype=torch.int64)
    return (((k * 7919) % 1000).to(torch.float64) - 499.5) / 1000


def _sketch(y: torch.Tensor, rows: int) -> torch.Tensor:
    """``S·y`` for the rows×D matrix S of ±1 given by the top bit of a multiplicative hash of
    (row k, index i), ``((i+1)·2654435761 mod 2³²)·(2k+1) mod 2³²``: no random generator, one row at a time."""
    base = (torch.arange(1, y.numel() + 1, dtype=torch.int64) * 2654435761) % 2**32
    out = torch.empty(rows, dtype=torch.float64)
    for k in range(rows):
        sign = 1.0 - 2.0 * (((base * (2 * k + 1)) % 2**32) >> 31).to(torch.float64)
        out[k] = sign @ y
    return out


@torch.no_grad()
def fingerprint(proj: Projector, size: int = FINGERPRINT_SIZE) -> list[float]:
    """What identifies P without storing it: ``z = S·(P·u)/√D`` for the fixed probe ``u``
    (:func:`probe_vector`) and a fixed ±1 sketch ``S`` of ``size`` rows (:func:`_sketch`).

    Any change of P (another random stream in torch, a dropped permutation, flipped QR signs, a
    different construction) moves ``P·u`` by a vector as large as itself and ``z`` by a relative
    amount of order 1; recomputing the same P on another machine moves it by float32 rounding only.
    So fingerprints are compared with a relative tolerance (:data:`FINGERPRINT_RTOL`), not as a
    bitwise hash, which BLAS summation order or LAPACK's last bits could break across machines.
    """
    buf = next(proj.buffers(), None)
    device = buf.device if buf is not None else torch.device("cpu")
    y = proj(probe_vector(proj.d).to(device, torch.float32)).detach().to("cpu", torch.float64)
    return (_sketch(y, size) / math.sqrt(proj.D)).tolist()


def fingerprint_difference(recorded: list[float], current: list[float]) -> float:
    """``‖current − recorded‖ / ‖recorded‖`` (inf when the lengths differ)."""
    if len(recorded) != len(current):
        return math.inf
    a, b = torch.tensor(recorded, dtype=torch.float64), torch.tensor(current, dtype=torch.float64)
    return float((b - a).norm() / a.norm().clamp_min(1e-300))


def derive_seed(base: int, *path: int) -> int:
    """A seed for one block, distinct for every (base, path) and reproducible."""
    import numpy as np

    return int(np.random.SeedSequence([int(base) % (2**32), *[int(p) for p in path]]).generate_state(1, np.uint64)[0] >> 1)
