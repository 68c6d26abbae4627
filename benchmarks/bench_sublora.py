"""Step time of SubLoRA vs LoRA in the same process, and projector memory vs a dense P.

    python benchmarks/bench_sublora.py                                  # CPU, GPT-2 width, 2 layers
    python benchmarks/bench_sublora.py --device cuda --dtype bf16 \\
        --n-layer 12 --batch 8 --seq 1024                               # GPT-2-124M shape on a GPU

A step is forward + backward + AdamW step on one random batch of tokens (frozen, randomly
initialised GPT-2 as in the SubLoRA paper), timed with the device synchronised. The
methods are timed in alternating rounds (order rotated) so that all see the same machine load; the
median over rounds is reported. LoRA: peft on c_attn (rank r). SubLoRA: the same adapter
with all its parameters θ = θ₀ + P·w (d = --d, each projector in --projectors, q,v rows of
c_attn as peftlab's default), trained through w only. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(method: str, args, projector: str = "kron"):
    from transformers import GPT2Config, GPT2LMHeadModel

    from peftlab.config import load_config
    from peftlab.methods import METHODS, MethodContext

    torch.manual_seed(0)
    gcfg = GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_positions=max(1024, args.seq),
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(gcfg)
    cfg = load_config(None, {"method": method, "lora.r": args.r, "lora.alpha": 2 * args.r, "lora.dropout": 0.0,
                             "sublora.intrinsic_dim": args.d, "sublora.projector": projector,
                             "training.learning_rate": 1e-3, "logging.progress_bar": False})
    m = METHODS[method](MethodContext(cfg=cfg, task="causal_lm", target_modules=["c_attn"]))
    model = m.apply(model).to(args.device)
    opt = m.build_optimizer(model)
    return m, model, opt


def step(model, opt, batch, args):
    with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(args):
    if args.device == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--n-head", type=int, default=12)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--d", type=int, default=2000)
    ap.add_argument("--projectors", default="kron,hashed")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per method per round")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    from peftlab.tracking import quiet_libraries

    quiet_libraries()
    runs = {"lora": build("lora", args)}
    for p in args.projectors.split(","):
        runs[f"sublora-{p}"] = build("sublora", args, p)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (args.batch, args.seq), generator=g).to(args.device)
    batch = {"input_ids": ids, "labels": ids}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _, model, opt in runs.values():  # warm-up (allocator, kernels)
        model.train()
        step(model, opt, batch, args)
    sync(args)
    names = list(runs)
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:  # rotate the order: no method always runs first
            _, model, opt = runs[k]
            sync(args)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(model, opt, batch, args)
            sync(args)
            times[k].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times["lora"])
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {dev}, torch {torch.__version__}, GPT-2 n_layer={args.n_layer} n_embd={args.n_embd}, batch {args.batch}x{args.seq}, "
          f"{args.dtype}, r={args.r}, d={args.d}, {args.rounds} rounds x {args.steps} steps\n")
    print("| method | D | median step (s) | vs LoRA | projector memory | dense P (D·d·4) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for k, (m, model, _) in runs.items():
        med = statistics.median(times[k])
        if k == "lora":
            n = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"| lora | {n:,} | {med:.4f} | 1.00x | - | - |")
            continue
        rec = m.structure(model)
        D, pb = rec["D"], rec["projector_bytes"]
        print(f"| {k} | {D:,} | {med:.4f} | {med / base:.2f}x | {pb / 2**20:.2f} MiB | {D * args.d * 4 / 2**20:,.0f} MiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
