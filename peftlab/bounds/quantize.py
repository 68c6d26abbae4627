"""Quantize the tensors a bound must encode to ``L`` levels.

Symbols are bin indices of ``L`` bins with edges evenly spaced on ``[-max|w|, max|w|]``;
the codebook holds one centroid per bin: the mean of the values in the bin, or the
result of 1-D k-means started from those means. Centroids are stored as float16 (the
message pays 16 bits each), so the dequantized vector is ``codebook_fp16[symbols]``
exactly, on the sender's side and the decoder's.

Optionally, quantization-aware training refines the result: the forward pass sees the
quantized weights, the gradient goes straight through to the full-precision weights and,
through the gather, to the centroids (both updated by SGD).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch


@dataclass
class Quantized:
    """A vector quantized to ``len(codebook)`` levels."""

    symbols: np.ndarray  #: int64 (d,), values in [0, L)
    codebook: np.ndarray  #: float16 (L,)

    @property
    def levels(self) -> int:
        return len(self.codebook)

    def values(self) -> np.ndarray:
        """The dequantized vector (float32), exactly what the decoder rebuilds."""
        return self.codebook.astype(np.float32)[self.symbols]

    def counts(self) -> np.ndarray:
        return np.bincount(self.symbols, minlength=self.levels)


def flatten_state(state: dict[str, torch.Tensor]) -> np.ndarray:
    """Concatenate tensors (in key order) into one float64 vector."""
    if not state:
        return np.zeros(0)
    return np.concatenate([t.detach().to("cpu", torch.float64).reshape(-1).numpy() for t in state.values()])


def unflatten_state(vec: np.ndarray, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split a flat vector back into tensors shaped (and typed) like ``like``."""
    out, pos = {}, 0
    for k, t in like.items():
        n = t.numel()
        out[k] = torch.from_numpy(np.ascontiguousarray(vec[pos:pos + n])).view(t.shape).to(t.dtype)
        pos += n
    if pos != len(vec):
        raise ValueError(f"vector has {len(vec)} entries, the tensors {pos}")
    return out


def _edges(vec: np.ndarray, levels: int) -> np.ndarray:
    top = float(np.max(np.abs(vec))) if vec.size else 0.0
    top = top * (1 + 1e-7) + 1e-12  # the extreme values fall inside the outer bins
    return np.linspace(-top, top, levels + 1)


def assign(vec: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (ties to the lower one) for every entry."""
    cb = np.asarray(codebook, dtype=np.float64)
    order = np.argsort(cb, kind="stable")
    s = cb[order]
    mids = (s[1:] + s[:-1]) / 2
    return order[np.searchsorted(mids, vec, side="left")].astype(np.int64)


def _kmeans_1d(vec: np.ndarray, init: np.ndarray, iters: int = 100) -> np.ndarray:
    """Lloyd's algorithm in one dimension from ``init`` (deterministic); empty clusters keep their centre."""
    c = init.astype(np.float64).copy()
    for _ in range(iters):
        lab = assign(vec, c)
        sums = np.bincount(lab, weights=vec, minlength=len(c))
        cnt = np.bincount(lab, minlength=len(c))
        new = np.where(cnt > 0, sums / np.maximum(cnt, 1), c)
        if np.allclose(new, c, rtol=0, atol=1e-12):
            break
        c = new
    return c


def quantize(vec: np.ndarray, levels: int, use_kmeans: bool = False) -> Quantized:
    """Quantize ``vec`` to ``levels`` levels.

    Bins: ``levels`` equal-width bins on ``[-max|w|, max|w|]``; a bin's centroid is the
    mean of its members (the bin centre when it is empty). With ``use_kmeans`` the
    centroids are then refined by 1-D k-means, rounded to float16, and every entry goes to
    its nearest rounded centroid. Without k-means the symbols stay the bin indices (the
    centroids are only rounded to float16). Either way the decoded vector is exactly
    ``codebook[symbols]``.
    """
    if levels < 2:
        raise ValueError(f"levels must be at least 2, got {levels}")
    vec = np.asarray(vec, dtype=np.float64).reshape(-1)
    edges = _edges(vec, levels)
    sym = np.clip(np.searchsorted(edges, vec, side="right") - 1, 0, levels - 1)
    sums = np.bincount(sym, weights=vec, minlength=levels)
    cnt = np.bincount(sym, minlength=levels)
    centres = (edges[1:] + edges[:-1]) / 2
    cb = np.where(cnt > 0, sums / np.maximum(cnt, 1), centres)
    if use_kmeans:
        cb = _kmeans_1d(vec, cb)
    cb16 = cb.astype(np.float16)
    if not np.all(np.isfinite(cb16)):
        raise ValueError("a centroid overflows float16 (|w| > 65504); the vector cannot be coded with an fp16 codebook")
    if use_kmeans:
        sym = assign(vec, cb16)
    return Quantized(symbols=sym.astype(np.int64), codebook=cb16)


def quantization_aware_training(
    params: dict[str, torch.nn.Parameter],
    q: Quantized | Sequence[Quantized],
    loss_fn: Callable[[], torch.Tensor],
    iters: int,
    lr: float,
    on_step: Callable[[int, float], None] | None = None,
) -> Quantized | list[Quantized]:
    """Refine weights and centroids with a straight-through estimator.

    Each step sets every parameter to ``codebook[nearest(w)] + (w − w.detach())``-style
    values: the forward pass sees quantized weights, ``∂loss/∂w`` is the gradient at the
    quantized point (straight through), and the centroids get the summed gradient of
    their members. Both are updated by SGD with learning rate ``lr``.

    Args:
        params: the live parameters to quantize (their ``.data`` is replaced during the
            loop and restored to the refined full-precision values at the end).
        q: the starting quantization (defines the number of levels), or one per group of
            consecutive entries of the flattened ``params`` (in key order), each with its own
            codebook; a list gives a list back.
        loss_fn: computes the training loss with the model in its current state.
        iters: SGD steps.
        lr: learning rate for weights and centroids.
    """
    single = isinstance(q, Quantized)
    qs = [q] if single else list(q)
    if iters <= 0:
        return q if single else qs
    names = list(params)
    device = params[names[0]].device
    w = torch.from_numpy(flatten_state({n: params[n] for n in names})).to(device, torch.float32).requires_grad_(True)
    sizes = [len(g.symbols) for g in qs]
    if sum(sizes) != w.numel():
        raise ValueError(f"the quantizations cover {sum(sizes)} entries, the parameters {w.numel()}")
    bounds = [0]
    for k in sizes:
        bounds.append(bounds[-1] + k)
    cbs = [torch.from_numpy(g.codebook.astype(np.float32)).to(device).requires_grad_(True) for g in qs]
    opt = torch.optim.SGD([w, *cbs], lr=lr)
    shapes = [(n, params[n].shape, params[n].numel()) for n in names]
    originals = {n: params[n].data for n in names}
    try:
        for step in range(iters):
            pieces = []
            for cb, lo, hi in zip(cbs, bounds[:-1], bounds[1:]):
                wg = w[lo:hi]
                with torch.no_grad():
                    srt = torch.sort(cb).values
                    mids = (srt[1:] + srt[:-1]) / 2
                    sym = torch.argsort(cb)[torch.searchsorted(mids, wg.detach())]
                pieces.append(cb[sym] + (wg - wg.detach()))  # value: centroid; gradient: to w and to the centroid
            wq = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
            pos = 0
            views = {}
            for n, shape, k in shapes:
                views[n] = wq[pos:pos + k].view(shape).to(originals[n].dtype)
                pos += k
            # swap the quantized, differentiable values in for the forward pass
            for n in names:
                params[n].data = views[n].detach()
            opt.zero_grad(set_to_none=True)
            for n in names:
                params[n].grad = None
            loss = loss_fn()
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            flat = torch.cat([(g if g is not None else torch.zeros_like(params[n])).reshape(-1).float() for n, g in zip(names, grads)])
            wq.backward(flat)
            opt.step()
            if on_step is not None:
                on_step(step, float(loss))
    finally:
        with torch.no_grad():
            vec = w.detach()
            pos = 0
            for n, shape, k in shapes:
                params[n].data = originals[n]
                params[n].data.copy_(vec[pos:pos + k].view(shape).to(originals[n].dtype))
                pos += k
    vec = w.detach().cpu().double().numpy()
    out = []
    for cb, lo, hi in zip(cbs, bounds[:-1], bounds[1:]):
        refined = cb.detach().cpu().numpy().astype(np.float16)
        out.append(Quantized(symbols=assign(vec[lo:hi], refined), codebook=refined))
    return out[0] if single else out


__all__ = ["Quantized", "quantize", "assign", "flatten_state", "unflatten_state", "quantization_aware_training"]
