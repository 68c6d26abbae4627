"""Which SDPA kernel is fastest for a model's attention shape, forward + backward, with and without dropout.

torch picks a scaled-dot-product-attention kernel (flash, cuDNN, memory-efficient, math) by a fixed
priority; on an H100 with torch 2.11 it picks cuDNN for GPT-2's training shape. This times each
eligible kernel on random bf16 q/k/v (causal, as in a decoder) so that ``system.attention_kernel``
can be chosen by measurement.

    python benchmarks/bench_attention.py [--shape 8,12,1024,64] [--dropout 0.0,0.1] [--reps 20]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def time_one(backend, q, k, v, p: float, reps: int) -> float:
    import contextlib

    g = torch.randn_like(q)

    def step():  # a fresh context each time: sdpa_kernel's context manager cannot be re-entered
        with (sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()):
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        out.backward(g)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        step()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t) / reps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8,12,1024,64", help="batch,heads,seq,head_dim")
    ap.add_argument("--dropout", default="0.0,0.1")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args(argv)
    b, h, t, d = (int(x) for x in a.shape.split(","))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_() for _ in range(3))
    flops = 4 * b * h * t * t * d * 0.5 * 3.5  # causal: half the scores; forward 1 + backward 2.5
    for p in (float(x) for x in a.dropout.split(",")):
        for name, be in BACKENDS.items():
            try:
                ms = time_one(be, q, k, v, p, a.reps)
                row = {"shape": a.shape, "dropout": p, "kernel": name, "fwd_bwd_ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}
            except Exception as e:  # a kernel that does not support this input
                row = {"shape": a.shape, "dropout": p, "kernel": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
