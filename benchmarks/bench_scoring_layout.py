"""Benchmark: the bound's scoring loop, right-padded (default) vs the earlier masked left-padded layout.

    python benchmarks/bench_scoring_layout.py --device cuda --num-docs 10000 --dtype bf16
    python benchmarks/bench_scoring_layout.py --device cpu --num-docs 200 --model tiny-gpt2

Times :func:`peftlab.bounds.scoring.score_rows` alone (no quantization or coding) on the same
rows with ``layout="left"`` and ``layout="right"`` in one process, after one warm-up batch
each, and checks that the two give the same per-document sums. The model is GPT-2 (124M, from
the shipped config, random weights) or the built-in tiny GPT-2; the documents are the
OpenWebText-shaped synthetic ones of ``bench_bounds.py`` (log-normal lengths, median ~600
tokens), scored with the document-level sliding window (context 1024, stride 100).
Prints one line of JSON per layout and one with the ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_bounds import build_bench_model, write_bins  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-docs", type=int, default=10_000)
    ap.add_argument("--model", default="gpt2", help="gpt2 (124M from the shipped config) or tiny-gpt2")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--stride", type=int, default=100)
    ap.add_argument("--layouts", default="left,right")
    args = ap.parse_args()

    from peftlab.bounds.scoring import document_rows, document_spans, score_rows
    from peftlab.tracking import quiet_libraries

    quiet_libraries()
    cfg, built, device = build_bench_model(args.model, "lora", args.device, args.dtype)
    model, context = built.model, cfg.data.block_size
    vocab = model.config.vocab_size
    eot = vocab - 1 if args.model == "gpt2" else 256
    autocast = torch.bfloat16 if args.dtype == "bf16" else None
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        info = write_bins(Path(tmp), args.num_docs, vocab, eot)
        tokens = np.fromfile(Path(tmp) / "train.bin", dtype=np.uint16)
        lengths = np.load(Path(tmp) / "doc_lengths.npy")
        starts = document_spans(np.load(Path(tmp) / "eot_indices.npy"), lengths, len(tokens))
        rows = document_rows(starts, lengths, np.arange(args.num_docs), context, args.stride)
        warm = document_rows(starts, lengths, np.arange(min(8, args.num_docs)), context, args.stride)
        for layout in args.layouts.split(","):
            kw = dict(alphas=(0.001, 0.01, 0.1), device=device, batch_tokens=args.batch_tokens, autocast_dtype=autocast,
                      progress=False, layout=layout)
            score_rows(model, tokens, warm, min(8, args.num_docs), eot, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            sc = score_rows(model, tokens, rows, args.num_docs, eot, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            results[layout] = sc
            print(json.dumps({
                "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
                "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
                "model": args.model, "dtype": args.dtype, "layout": layout, "num_docs": args.num_docs, **info,
                "windows": len(rows), "tokens_scored": int(sc.tokens.sum()), "scoring_s": round(wall, 3),
                "docs_per_s": round(args.num_docs / wall, 1), "tokens_per_s": round(float(sc.tokens.sum()) / wall, 1),
            }), flush=True)
            results[layout + "_s"] = wall
    if "left" in results and "right" in results:
        a, b = results["left"].loss_bits, results["right"].loss_bits
        rel = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-12)))
        print(json.dumps({"speedup_right_over_left": round(results["left_s"] / results["right_s"], 2),
                          "max_rel_diff_loss_bits": rel,
                          "topk_equal_fraction": float((results["left"].topk_correct == results["right"].topk_correct).mean())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
