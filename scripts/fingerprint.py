"""Fingerprint of the CPU numbers a refactor must not change.

    python scripts/fingerprint.py OUT.json [--work DIR]

Trains the conformance suite's cases through the real ``peftlab train`` command (one process
each), bounds the SubLoRA and LoRA runs with ``peftlab bounds`` on a small token-bin corpus, and
writes the SHA-256 of each run's ``loss_log.csv``, ``eval_log.csv``, ``results_final.json`` and
``bounds_metrics.json`` with the fields that measure time or memory removed (they vary run to run).
Run it before and after a change and ``diff`` the two files: every line must match.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMON = {"training.max_steps": 6, "training.save_steps": 2, "training.log_steps": 1, "training.batch_size": 4,
          "training.epochs": 1, "logging.progress_bar": False, "data.max_train_examples": 48,
          "data.max_val_examples": 16, "lora.dropout": 0.1, "system.num_threads": 1}
CASES = {
    "full": ("lm", {"method": "full", "training.learning_rate": 1e-3}),
    "lora": ("lm", {"method": "lora"}),
    "lora-cls": ("cls", {"method": "lora"}),
    "dora": ("lm", {"method": "dora"}),
    "ba_lora": ("lm", {"method": "ba_lora", "ba_lora.gradient_samples": 16, "ba_lora.use_warmstart": True}),
    "rsvd": ("lm", {"method": "rsvd", "rsvd.rank": 4, "rsvd.update_interval": 3, "rsvd.weight_reduction_rank": 4,
                    "training.learning_rate": 1e-3}),
    "sora": ("lm", {"method": "sora", "sora.lambda": 1.0, "sora.gate_lr": 0.05}),
    "sdora-cls": ("cls", {"method": "sdora", "sora.lambda": 1.0, "sora.gate_lr": 0.05}),
    "sublora": ("lm", {"method": "sublora", "sublora.intrinsic_dim": 64, "training.learning_rate": 0.05}),
    "sublora-fixed": ("lm", {"method": "sublora", "sublora.intrinsic_dim": 64, "sublora.allocation_mode": "fixed",
                             "sublora.allocation_ratio": 0.8, "sublora.projector": "hashed",
                             "training.learning_rate": 0.05}),
    "sublora-learned": ("lm", {"method": "sublora", "sublora.intrinsic_dim": 64, "sublora.allocation_mode": "learned",
                               "sublora.gating_lr": 0.5, "training.learning_rate": 0.05}),
    "sublora-learned-cls": ("cls", {"method": "sublora", "sublora.intrinsic_dim": 32,
                                    "sublora.allocation_mode": "learned", "training.learning_rate": 0.05}),
}
BOUNDED = ("lora", "sublora", "sublora-fixed", "sublora-learned")
VOLATILE_WORDS = ("time", "wall", "memory", "seconds", "_mb", "mib", "per_s", "throughput", "date", "path", "dir",
                  "host", "version", "started", "finished", "overhead")


def _scrub(obj):
    if isinstance(obj, dict):
        return {k: _scrub(v) for k, v in obj.items() if not any(w in k.lower() for w in VOLATILE_WORDS)}
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    return obj


def _digest(path: Path, work: Path) -> str | None:
    if not path.exists():
        return None
    text = path.read_text().replace(str(work), "<work>")
    if path.suffix == ".json":
        data = json.dumps(_scrub(json.loads(text)), sort_keys=True).encode()
    else:
        lines = text.splitlines()
        header = lines[0].split(",") if lines else []
        keep = [i for i, h in enumerate(header) if not any(w in h.lower() for w in VOLATILE_WORDS)]
        data = "\n".join(",".join(row.split(",")[i] for i in keep if i < len(row.split(","))) for row in lines).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def _peftlab(*args: str) -> None:
    env = dict(os.environ, PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "peftlab", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"peftlab {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--work", default=None)
    ap.add_argument("--only", default=None, help="comma-separated case names")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="fingerprint-"))
    sys.path.insert(0, str(ROOT))
    from peftlab.data.bins import prepare_token_bins
    from peftlab.models.tokenizers import byte_tokenizer

    bins = work / "bins"
    if not (bins / "meta.json").exists() and not any(bins.glob("*")):
        phrases = ["the cat sat on the mat. ", "a dog ran in the park. ", "we like green tea. "]
        docs = [phrases[i % 3] * (1 + i % 4) for i in range(600)]
        prepare_token_bins(docs, byte_tokenizer(), bins, 0.05, tokenizer_name="byte", progress=False)
    result = {}
    names = args.only.split(",") if args.only else list(CASES)
    for name in names:
        kind, over = CASES[name]
        run = work / name
        ov = {**COMMON, **over, "output.dir": str(run), "output.overwrite": True}
        if kind == "cls":
            ov.update({"data.max_length": 32})
        if name in BOUNDED:
            ov.update({"data.dataset": str(bins), "data.block_size": 64})
        cfg = ROOT / "configs/quickstart" / ("cls_lora.yaml" if kind == "cls" else "lm_lora.yaml")
        _peftlab("train", str(cfg), *(f"--{k}={'null' if v is None else v}" for k, v in ov.items()))
        if name in BOUNDED:
            _peftlab("bounds", str(run), "--bounds.bound_type=token_level", f"--bounds.data={bins}")
        for f in ("loss_log.csv", "eval_log.csv", "results_final.json", "bounds_metrics.json", "module_metrics.csv",
                  "sparsity_log.csv"):
            d = _digest(run / f, work)
            if d:
                result[f"{name}/{f}"] = d
        print(name, "done", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
