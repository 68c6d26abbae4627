"""Benchmark: document-level bound evaluation throughput (documents/s) at GPT-2-124M shape.

    python benchmarks/bench_bounds.py --device cuda --num-docs 10000                 # the issue's target (< 5 min on an H100)
    python benchmarks/bench_bounds.py --device cuda --num-docs 10000 --dtype bf16
    python benchmarks/bench_bounds.py --device cuda --docs pydocs --num-docs 48 --dtype bf16 --base-dtype auto \\
        --targets c_attn,lm_head                                       # as subspace_allocation's bf16 runs
    python benchmarks/bench_bounds.py --device cpu --num-docs 20                     # CPU throughput, GPT-2-124M
    python benchmarks/bench_bounds.py --device cpu --num-docs 500 --model tiny-gpt2  # CPU, the built-in tiny model

What is timed is :func:`peftlab.bounds.evaluate.compute_bounds`, the whole of ``peftlab bounds``
after the run is loaded: quantize + arithmetic-code the method's compressible state, score the
sample with the quantized model (sliding window, stride 100, context 1024), bound for the
whole α grid, top-k. The model is GPT-2 (124M) built from its shipped config with random
weights, adapted by ``--method`` (``sublora`` when that method is registered, else ``lora``);
its compressible tensors get small random values, as after training. The data are synthetic
documents of random GPT-2 token ids whose lengths follow a log-normal fitted to OpenWebText's
(median ~ 600 tokens, mean ~ 1,000, a long tail that exercises the sliding window), written as
token bins with ``eot_indices.npy`` / ``doc_lengths.npy``. The public evaluation takes about
45 minutes per model for 10,000 documents on one GPU (seed 001).

Prints one line of JSON with documents/s, tokens/s, windows and wall time.
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


def write_bins(d: Path, num_docs: int, vocab: int, eot: int, seed: int = 0, mu: float = 6.4, sigma: float = 0.9) -> dict:
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(mu, sigma, size=num_docs)), 2, 20_000).astype(np.int64)
    tokens = rng.integers(0, eot, size=int(lengths.sum()), dtype=np.int64).astype(np.uint16)
    ends = np.cumsum(lengths) - 1
    tokens[ends] = eot
    tokens.tofile(d / "train.bin")
    tokens[:4096].tofile(d / "val.bin")
    np.save(d / "eot_indices.npy", ends)
    np.save(d / "doc_lengths.npy", lengths)
    meta = {"format": "peftlab-token-bins", "format_version": 1, "dtype": "uint16", "vocab_size": vocab, "eot_token_id": eot,
            "tokenizer": "gpt2", "train_tokens": int(tokens.size), "val_tokens": 4096, "train_documents": num_docs}
    (d / "meta.json").write_text(json.dumps(meta))
    return {"tokens": int(tokens.size), "mean_doc_len": float(lengths.mean()), "median_doc_len": float(np.median(lengths)),
            "docs_over_1024": int((lengths > 1024).sum())}


def build_bench_model(model_name: str, method: str, device_name: str, dtype: str, base_dtype: str = "float32",
                      targets: str = ""):
    """(cfg, built run, device) of the benchmark model: GPT-2 (124M) from its shipped config with
    random weights (context 1024) or the built-in tiny GPT-2 (context 128), adapted by ``method``.
    ``base_dtype=auto`` with ``dtype=bf16`` builds it as `peftlab bounds` loads a bf16 run on a GPU
    (``system.dtype=bf16``: the frozen base stored in bf16); ``float32`` keeps a float32 base."""
    from peftlab.build import build
    from peftlab.config import load_config

    ov = {"method": method, "model.name": model_name, "data.block_size": 1024 if model_name == "gpt2" else 128,
          "system.device": device_name, "model.base_dtype": base_dtype}
    if targets:
        ov["model.target_modules"] = targets.split(",")
    if dtype == "bf16" and base_dtype == "auto":
        ov["system.dtype"] = "bf16"
    if model_name == "gpt2":
        ov["model.from_scratch"] = True
    cfg = load_config(None, ov)
    device = torch.device(device_name)
    if device.type == "cuda" and dtype == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True  # as `peftlab bounds` does
    return cfg, build(cfg, task="causal_lm", data=False, optimizer=False, device=str(device)), device


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-docs", type=int, default=10_000)
    ap.add_argument("--model", default="gpt2", help="gpt2 (124M from the shipped config) or tiny-gpt2")
    ap.add_argument("--method", default=None, help="default: sublora when registered, else lora")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--stride", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--head", default="auto", choices=["auto", "model"])
    ap.add_argument("--targets", default="", help="model.target_modules, comma-separated (subspace_allocation: c_attn,lm_head)")
    ap.add_argument("--base-dtype", default="float32", choices=["float32", "auto"],
                    help="auto: the run's own (with --dtype bf16 on a GPU a bf16 base, as a bf16 run is loaded); float32: a float32 base")
    ap.add_argument("--compile-body", default="off", choices=["off", "on"], help="bounds.compile_body (its compilation is in wall_s)")
    ap.add_argument("--docs", default="owt", choices=["owt", "pydocs"],
                    help="owt: OpenWebText-shaped lengths; pydocs: the python-docs corpus' long documents (use --num-docs 447)")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from peftlab.bounds.config import bounds_config
    from peftlab.bounds.evaluate import compressible_state, compute_bounds
    from peftlab.methods import METHODS
    from peftlab.tracking import quiet_libraries

    quiet_libraries()
    method = args.method or ("sublora" if "sublora" in METHODS else "lora")
    cfg, built, device = build_bench_model(args.model, method, args.device, args.dtype, args.base_dtype, args.targets)
    model, m = built.model, built.method
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # "trained" values for the compressible tensors
        for name, t in compressible_state(m, model).items():
            if name in params:
                params[name].add_(0.01 * torch.randn(params[name].shape, generator=g).to(params[name]))
    vocab = model.config.vocab_size
    eot = vocab - 1 if args.model == "gpt2" else 256
    with tempfile.TemporaryDirectory() as tmp:
        shape = {"owt": dict(mu=6.4, sigma=0.9), "pydocs": dict(mu=8.72, sigma=0.6)}[args.docs]
        info = write_bins(Path(tmp), args.num_docs, vocab, eot, **shape)
        bcfg = bounds_config({"bounds.num_docs": args.num_docs, "bounds.full_precision_units": 0, "bounds.stride": args.stride,
                              "bounds.batch_tokens": args.batch_tokens, "bounds.dtype": args.dtype, "bounds.head": args.head,
                              "bounds.compile_body": args.compile_body,
                              "bounds.progress_bar": args.progress})
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        metrics = compute_bounds(model, m, cfg, bcfg, Path(tmp), device, log=lambda s: None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    out = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.node(), "device": torch.cuda.get_device_name(0) if device.type == "cuda" else
        f"cpu ({torch.get_num_threads()} threads)", "model": args.model, "method": method, "dtype": args.dtype, "docs": args.docs, "head": args.head,
        "base_dtype": str(next(p.dtype for n, p in model.named_parameters() if not p.requires_grad)).replace("torch.", ""),
        "scoring_path": metrics["scoring_path"], "targets": args.targets or "default",
        "compile_body": args.compile_body, "batch_tokens": args.batch_tokens, "torch": torch.__version__,
        "compressed_numbers": metrics["compressed_numbers"], "num_docs": args.num_docs, **info,
        "tokens_scored": metrics["tokens_scored"], "wall_s": round(wall, 2), "scoring_s": round(metrics["scoring_time_s"], 2),
        "docs_per_s": round(args.num_docs / metrics["scoring_time_s"], 2),
        "tokens_per_s": round(metrics["tokens_scored"] / metrics["scoring_time_s"], 1),
        "bound_value": metrics["bound_value"],
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
