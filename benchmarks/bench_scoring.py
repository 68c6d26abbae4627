"""Benchmark: the bound's scoring loop alone, several variants back to back in one process.

    python benchmarks/bench_scoring.py --device cuda --docs owt --num-docs 10000 --dtype bf16 \\
        --variants left-model:16384,right-model:16384,right-auto:16384,right-auto:65536
    python benchmarks/bench_scoring.py --device cuda --docs pydocs --variants right-auto:65536
    python benchmarks/bench_scoring.py --device cpu --model tiny-gpt2 --num-docs 200 --variants right-model:4096,right-auto:4096

Times :func:`peftlab.bounds.scoring.score_rows` (no quantization or coding) on the same rows for
each variant ``LAYOUT-HEAD[-compile]:BATCH_TOKENS`` (layout ``left`` = the masked left-padded layout,
``right`` = right padding without a mask; head ``model`` = the model's own logits on the
``logits_to_keep`` columns, ``auto`` = the forward pass stops at the LM head's input and the
head runs on the counted positions only; ``-compile``: the logits reduced by a compiled
function; ``-body``: the model's body compiled too, ``bounds.compile_body=on``), after one warm-up call
each (which includes the compilation; its time is ``warmup_s``), and reports the largest
relative difference of the per-document sums from the first variant. The model is GPT-2
(124M, shipped config, random weights) or the built-in tiny GPT-2, adapted by ``--method``
(default SubLoRA, the method the seeds bound). Documents: ``owt`` = the OpenWebText-shaped
synthetic ones of ``bench_bounds.py`` (log-normal lengths, median ~600 tokens); ``pydocs`` =
447 documents with the length profile of the python-docs corpus (log-normal, mean ~7,300
tokens). Document-level sliding window, context 1024, stride 100. ``--profile VARIANT`` also
writes a torch.profiler table of that variant (on the first 300 documents) to ``--out``.
Prints one line of JSON per variant.
"""

from __future__ import annotations

import argparse
import json
import os
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

DOC_SHAPES = {"owt": dict(mu=6.4, sigma=0.9), "pydocs": dict(mu=8.72, sigma=0.6)}  # pydocs: mean e^(8.72 + 0.6²/2) ~ 7,400 tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--docs", default="owt", choices=sorted(DOC_SHAPES))
    ap.add_argument("--num-docs", type=int, default=None, help="default 10,000 (owt) or 447 (pydocs)")
    ap.add_argument("--model", default="gpt2", help="gpt2 (124M from the shipped config) or tiny-gpt2")
    ap.add_argument("--method", default="sublora")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--stride", type=int, default=100)
    ap.add_argument("--variants", default="right-model:16384,right-auto:16384,right-auto:65536")
    ap.add_argument("--profile", default=None, help="a variant to profile (torch.profiler, first 300 documents)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    num_docs = args.num_docs or (447 if args.docs == "pydocs" else 10_000)

    from peftlab.bounds.scoring import document_rows, document_spans, score_rows
    from peftlab.tracking import quiet_libraries

    quiet_libraries()
    cfg, built, device = build_bench_model(args.model, args.method, args.device, args.dtype)
    model, context = built.model, cfg.data.block_size
    vocab = model.config.vocab_size
    eot = vocab - 1 if args.model == "gpt2" else 256
    autocast = torch.bfloat16 if args.dtype == "bf16" else None
    first = None
    with tempfile.TemporaryDirectory() as tmp:
        info = write_bins(Path(tmp), num_docs, vocab, eot, **DOC_SHAPES[args.docs])
        tokens = np.fromfile(Path(tmp) / "train.bin", dtype=np.uint16)
        lengths = np.load(Path(tmp) / "doc_lengths.npy")
        starts = document_spans(np.load(Path(tmp) / "eot_indices.npy"), lengths, len(tokens))
        rows = document_rows(starts, lengths, np.arange(num_docs), context, args.stride)
        warm = document_rows(starts, lengths, np.arange(min(8, num_docs)), context, args.stride)
        window_tokens = int(rows.length.sum())
        for variant in args.variants.split(","):
            lay_head, bt = variant.split(":")
            layout, head, *opt = lay_head.split("-")
            kw = dict(alphas=(0.001, 0.01, 0.1), device=device, batch_tokens=int(bt), autocast_dtype=autocast,
                      progress=False, layout=layout, head=head, compile="compile" in opt, compile_body="body" in opt)
            rec = {"date": time.strftime("%Y-%m-%d"), "machine": platform.node(), "tag": args.tag,
                   "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
                   "torch": torch.__version__, "model": args.model, "method": args.method, "dtype": args.dtype, "docs": args.docs,
                   "variant": variant, "num_docs": num_docs, **info, "windows": len(rows), "window_tokens": window_tokens}
            try:
                t_warm = time.perf_counter()
                score_rows(model, tokens, warm, min(8, num_docs), eot, **kw)
                rec["warmup_s"] = round(time.perf_counter() - t_warm, 2)  # with -body: the body's compilation
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                sc = score_rows(model, tokens, rows, num_docs, eot, **kw)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                wall = time.perf_counter() - t0
                rec.update({"tokens_scored": int(sc.tokens.sum()), "scoring_s": round(wall, 3),
                            "docs_per_s": round(num_docs / wall, 1), "scored_tokens_per_s": round(float(sc.tokens.sum()) / wall, 1),
                            "window_tokens_per_s": round(window_tokens / wall, 1)})
                if device.type == "cuda":
                    rec["peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
                if first is None:
                    first = sc
                else:
                    a, b = first.loss_bits, sc.loss_bits
                    rec["max_rel_diff_vs_first"] = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-12)))
                    rec["topk_equal_fraction_vs_first"] = float((first.topk_correct == sc.topk_correct).mean())
            except Exception as e:  # one failing variant must not stop the others
                rec["error"] = f"{type(e).__name__}: {e}"[:2000]
            print(json.dumps(rec), flush=True)
            if args.profile == variant and "error" not in rec:
                sub = document_rows(starts, lengths, np.arange(min(300, num_docs)), context, args.stride)
                from torch.profiler import ProfilerActivity, profile
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
                with profile(activities=acts) as prof:
                    score_rows(model, tokens, sub, min(300, num_docs), eot, **kw)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
                path = Path(args.out) / f"profile_{args.docs}_{variant.replace(':', '_')}{args.tag}.txt"
                path.write_text(prof.key_averages().table(sort_by=sort, row_limit=30) + "\n\n"
                                + prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    return 0


if __name__ == "__main__":
    sys.exit(main())
