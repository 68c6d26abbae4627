"""The LM head's linear + cross-entropy in chunks of rows: the full logits are never materialised.

A causal LM's plain loss computes ``logits = h W^T`` (``N x V``), casts them to float32 and takes the
cross-entropy; autograd keeps the float32 log-softmax (``N x V``) for the backward, which for a
150k vocabulary and 4 x 1024 tokens is 2.5 GB, more than the rest of a LoRA step's activations.
:class:`ChunkedLinearCrossEntropy` instead walks ``chunk`` rows at a time: the chunk's logits (in the
compute dtype, as the head's matmul gives them), their float32 log-sum-exp, the loss terms, and
right away the gradient ``dlogits = (softmax - onehot) / n_valid`` of the chunk, pushed through the
head (``dh = dlogits W``; ``dW += dlogits^T h`` only when the head is trained). The forward thus
also does the backward's work and keeps only ``dh`` (``N x d``, the size of the hidden states) and
``dW`` (none for a frozen head); the backward scales them by the incoming gradient.

The loss is the mean over rows whose label is not ``ignore_index``, in float32, as
``torch.nn.functional.cross_entropy(h W^T .float(), labels)``; the number of valid rows stays a
device tensor (no host synchronisation). Plain torch ops: one ``N_chunk x d x V`` GEMM forward and
one or two backward per chunk, and a few elementwise passes over the chunk's logits.

With ``compiled=True`` (``system.chunked_cross_entropy=compiled``, or ``auto`` on CUDA) the elementwise work of a
chunk, from the head's logits to their gradient (the float32 cast, log-sum-exp, target gather, softmax, one-hot and
scale, the cast back), is :func:`chunk_loss_grad` under ``torch.compile``: fused kernels that read the compute-dtype
logits and write their gradient (one kernel on the CPU), where the eager form makes about a dozen passes over the
chunk's float32 logits. Same formula; the numbers differ from the eager form by float32 rounding only (tested).
"""

from __future__ import annotations

from typing import Optional

import torch

DEFAULT_CHUNK_BYTES = 512 * 2**20  # float32 logits of one chunk


def pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """``t`` with zero rows appended along its first dimension up to a multiple of ``multiple``.

    An LM head's weight (``V x d``) or bias (``V``) padded this way gives an aligned GEMM (GPU
    matmul libraries pick their fast kernels only for aligned sizes; GPT-2's 50,257 is not one);
    the logits of the extra rows are cut off or masked by the caller. ``t`` itself when nothing is
    to add (or ``multiple`` is 0).
    """
    pad = (-t.shape[0]) % multiple if multiple else 0
    return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)) if pad else t


def chunk_rows(vocab: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that a chunk's float32 logits take about ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * vocab))


def _loss_terms(x: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor):
    """Of float logits ``x``: their log-sum-exp per row, the labels with ignored rows sent to column 0, and the summed
    loss terms ``lse - x[label]`` of the valid rows."""
    lse = torch.logsumexp(x, dim=-1)
    safe = torch.where(valid, labels, 0)
    total = torch.where(valid, lse - x.gather(1, safe[:, None]).squeeze(1), 0.0).sum()
    return lse, safe, total


def chunk_loss_grad(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor, vocab: int,
                    grad: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One chunk's summed loss terms and, with ``grad``, the gradient of its logits (``logits.dtype``).

    ``logits``: ``n x V'`` (``V' >= vocab``; columns ``vocab..`` are padding, given softmax weight 0); ``labels`` with
    ``valid`` (rows whose label counts); ``scale``: the mean's ``1 / n_valid``. Out of place, so that ``torch.compile``
    fuses it (the eager path of :class:`ChunkedLinearCrossEntropy` computes the same in place)."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    x = logits.to(acc)
    col = torch.arange(x.shape[1], device=x.device)
    if x.shape[1] != vocab:
        x = torch.where(col < vocab, x, float("-inf"))
    lse, safe, total = _loss_terms(x, labels, valid)
    if not grad:
        return total, None
    g = torch.exp(x - lse[:, None]) - (col[None, :] == safe[:, None]).to(acc)
    return total, (g * (valid.to(acc) * scale)[:, None]).to(logits.dtype)


def _chunk_loss_grad_inplace(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor, vocab: int,
                             grad: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`chunk_loss_grad` computed eagerly, in place in one float32 copy of the logits (the eager path's memory)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if x.shape[1] != vocab:
        x[:, vocab:] = float("-inf")  # softmax weight 0: the loss and gradients of the real columns
    lse, safe, total = _loss_terms(x, labels, valid)
    if not grad:
        return total, None
    g = x.sub_(lse[:, None]).exp_()  # softmax, in the logits' buffer
    g.scatter_add_(1, safe[:, None], torch.full((x.shape[0], 1), -1.0, dtype=x.dtype, device=x.device))
    g.mul_((valid.to(x.dtype) * scale)[:, None])
    return total, g.to(logits.dtype)


_COMPILED: dict = {}


def _compiled_chunk():
    """:func:`chunk_loss_grad` under ``torch.compile``, built once per process. The first chunk shape compiles a static
    graph; a second row count (the last chunk, or batches of another length) one with the rows dynamic, which serves
    every later count but a chunk of one row (torch specialises size 1: one more graph)."""
    if "f" not in _COMPILED:
        _COMPILED["f"] = torch.compile(chunk_loss_grad, fullgraph=True)
    return _COMPILED["f"]


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``(h, W, labels, ignore_index, chunk) -> mean cross-entropy of h W^T`` (float32 scalar); module docstring."""

    @staticmethod
    def forward(ctx, h, W, labels, ignore_index: int, chunk: int, pad_multiple: int = 0, compiled: bool = False):
        n_rows, V = h.shape[0], W.shape[0]
        Wp = pad_rows(W, pad_multiple)  # zero rows: an aligned GEMM, columns V.. masked
        valid = labels != ignore_index
        n_valid = valid.sum()
        inv = 1.0 / n_valid.to(torch.promote_types(h.dtype, torch.float32))  # inf with no valid row: the mean is then nan, as torch's
        need_h, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(h) if need_h else None
        acc = torch.promote_types(h.dtype, torch.float32)  # float32 (float64 stays float64)
        dW = torch.zeros(W.shape, dtype=acc, device=W.device) if need_W else None
        total = torch.zeros((), dtype=acc, device=h.device)
        body = _compiled_chunk() if compiled else _chunk_loss_grad_inplace
        for s in range(0, n_rows, chunk):
            hc, yc, vc = h[s:s + chunk], labels[s:s + chunk], valid[s:s + chunk]
            part, g = body(hc @ Wp.t(), yc, vc, inv, V, need_h or need_W)
            total += part
            if need_h:
                torch.mm(g, Wp, out=dh[s:s + chunk])
            if need_W:
                dW.addmm_(g[:, :V].t().to(acc), hc.to(acc))
        ctx.save_for_backward(dh, dW)
        ctx.w_dtype = W.dtype
        return total * inv

    @staticmethod
    def backward(ctx, grad):
        dh, dW = ctx.saved_tensors
        gh = dh * grad.to(dh.dtype) if dh is not None else None
        gW = (dW * grad).to(ctx.w_dtype) if dW is not None else None
        return gh, gW, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                         chunk: Optional[int] = None, pad_multiple: int = 0, compiled: bool = False) -> torch.Tensor:
    """Mean cross-entropy of ``h W^T`` against ``labels`` (rows of ``h``: ``N x d``; ``W``: ``V x d``), chunked.

    ``h`` and ``W`` are used in their dtypes (cast them to the compute dtype first); ``chunk`` rows at a time
    (default :func:`chunk_rows`). ``pad_multiple`` (e.g. 64 on a GPU) computes the logits against the head padded
    with zero rows to that multiple, the extra columns masked: GPU GEMMs are fast only for aligned sizes (GPT-2's
    50,257 is not); the result is the same. ``compiled`` runs each chunk's elementwise work as :func:`chunk_loss_grad`
    under ``torch.compile`` (module docstring).
    """
    h2 = h.reshape(-1, h.shape[-1])
    y = labels.reshape(-1)
    if h2.shape[0] != y.shape[0]:
        raise ValueError(f"{h2.shape[0]} hidden rows but {y.shape[0]} labels")
    return ChunkedLinearCrossEntropy.apply(h2, W, y, int(ignore_index), int(chunk or chunk_rows(W.shape[0])), int(pad_multiple),
                                            bool(compiled))


def linear_cross_entropy_reference(h, W, labels, ignore_index: int = -100) -> torch.Tensor:
    """The plain path: full logits, float32, ``F.cross_entropy`` (for tests)."""
    logits = h.reshape(-1, h.shape[-1]) @ W.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.nn.functional.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index)
