"""Benchmark: padding saved by instruction packing, and training-step time packed vs padded.

    python benchmarks/bench_packing.py                       # tiny GPT-2 (byte tokenizer), both samples
    python benchmarks/bench_packing.py --model smollm2-135m --max-length 256 --steps 3

For each shipped instruction sample it builds the training set twice through the real data
path (``build_datasets``), padded one example per row and packed (``data.packing=true``), and
reports, for one epoch at ``--batch-size`` in a seeded shuffled order:

* rows, token positions the model processes and how many of them are padding (exact);
* supervised (response) tokens, the same in both (packing drops nothing);
* ``--steps`` timed forward+backward passes of the model on the first batches, best-of, and the
  real (non-padding) tokens per second that gives (noisy on a shared CPU).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-gpt2")
    ap.add_argument("--datasets", default="instruct-sample,chat-sample")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per layout (0: padding figures only)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from peftlab.tracking import quiet_libraries
    from peftlab.config import load_config
    from peftlab.data import build_datasets, load_raw
    from peftlab.data.packing import padding_per_epoch
    from peftlab.models import load_model

    quiet_libraries()
    root = Path(__file__).resolve().parent.parent
    print(f"# {time.strftime('%Y-%m-%d')} {platform.processor() or platform.machine()} torch {torch.__version__} threads {a.threads} "
          f"model {a.model} max_length {a.max_length} batch_size {a.batch_size}")
    print("| dataset | layout | rows | positions/epoch | padding | padding % | supervised tokens | step ms (best) | real tokens/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ds in a.datasets.split(","):
        for packing in (False, True):
            cfg = load_config(root / "configs/examples/instruct_tiny.yaml", {
                "model.name": a.model, "data.dataset": ds, "data.max_length": a.max_length, "data.packing": packing,
                "training.batch_size": a.batch_size, "data.eval_generate": 0})
            model, tok, _ = load_model(cfg, "causal_lm")
            tr, _, collate = build_datasets(load_raw(cfg), tok, cfg, model=model)
            lengths = [len(tr[i]["input_ids"]) for i in range(len(tr))]
            pad, total = padding_per_epoch(lengths, a.batch_size, cfg.training.seed)
            sup = sum(int((tr[i]["labels"] != -100).sum()) for i in range(len(tr)))
            model.train()
            best, real = float("inf"), 0
            for s in range(a.steps):
                batch = collate([tr[i] for i in range(s * a.batch_size, (s + 1) * a.batch_size)])
                t0 = time.perf_counter()
                model(**batch).loss.backward()
                dt = time.perf_counter() - t0
                model.zero_grad(set_to_none=True)
                if dt < best:
                    best, real = dt, sum(len(tr[i]["input_ids"]) for i in range(s * a.batch_size, (s + 1) * a.batch_size))
            timing = f"{1000 * best:.0f} | {real / best:,.0f}" if a.steps else "- | -"
            print(f"| {ds} | {'packed' if packing else 'padded'} | {len(tr)} | {total:,} | {pad:,} | {100 * pad / max(total, 1):.1f} | "
                  f"{sup:,} | {timing} |")


if __name__ == "__main__":
    main()
