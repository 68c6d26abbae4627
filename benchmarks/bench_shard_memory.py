"""Issue 25: the memory per process that ``peftlab profile --system.sharding=fsdp --world-size 1,2,4,8`` computes,
against the peak a sharded world-of-one training run measures, at the Qwen2.5-3B and Llama-3-8B shapes.

    python benchmarks/bench_shard_memory.py --out DIR [--shapes qwen3b,llama8b] [--methods lora,dora] [--tiny]

Per shape and method, in a process of its own (a baseline that does not fit cannot spoil the next case): random
weights from the shipped config, built on the GPU in bf16 (``model.base_dtype=auto``), LoRA/DoRA r16 alpha 32 on
q/k/v/o, batch 4 x 1024, gradient checkpointing, bf16 autocast, ``system.sharding=fsdp``. First the profile (the
command's own code, ``run_profile``; AdamW over every weight is left out with a note where it does not fit), then
``peftlab train`` for 3 steps on random-token bins, whose ``results_final.json`` has the measured peak
(``torch.cuda.max_memory_allocated``). One JSON line per case in DIR/shard_memory.jsonl: the computed components
per world size, the measured peak and measured / computed at world 1. ``--tiny`` runs the plumbing on the CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MODEL = {"qwen3b": "qwen2.5-3b", "llama8b": "llama-3-8b"}
WORLDS = [1, 2, 4, 8]


def config(shape: str, method: str, data: dict, run_dir: Path, tiny: bool):
    from peftlab.config import config_from_dict

    cuda = not tiny
    raw = {
        "method": method,
        "model": {"name": "tiny-gpt2" if tiny else MODEL[shape], "from_scratch": True, "gradient_checkpointing": True,
                  "target_modules": ["c_attn"] if tiny else ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "data": {"dataset": data["dataset"], "tokenizer": data["tokenizer"], "block_size": 32 if tiny else 1024, "max_val_examples": 4},
        "training": {"seed": 42, "epochs": 1, "max_steps": 3, "batch_size": 2 if tiny else 4, "learning_rate": 1e-4, "log_steps": 1,
                     "save_steps": 0, "eval_max_batches": 1},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "output": {"dir": str(run_dir), "overwrite": True},
        "logging": {"progress_bar": False},
        "system": {"device": "cuda" if cuda else "cpu", "dtype": "bf16" if cuda else "fp32", "sharding": "fsdp"},
    }
    return config_from_dict(raw)


def one(shape: str, method: str, out: Path, tiny: bool) -> dict:
    import bench_quant as bq  # the shapes' token counts and the random-token data writer
    import torch

    from peftlab.profiling import run_profile
    from peftlab.train.loop import Trainer

    work = out / f"work_{shape}_{method}"
    s = bq.shape(shape, tiny)
    if tiny:
        s["tokens"], s["eot"] = 257, 256  # the built-in tiny-gpt2's vocabulary
    data = bq.write_data(work / "data", s, 8)
    cfg = config(shape, method, data, work / "run", tiny)
    row = {"shape": shape, "method": method, "batch": cfg.training.batch_size, "seq": cfg.data.block_size,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not tiny else "cpu"}
    t0 = time.perf_counter()
    prof = run_profile(cfg, work / "profile", ranks=[], world_size=WORLDS, echo=True)
    row["profile_s"] = round(time.perf_counter() - t0, 1)
    row["left_out"] = prof["summary"]["left_out"]
    conf = next(v for v in prof["summary"]["variants"] if v["label"] == "configured")
    row["computed"] = {str(w): v for w, v in conf["fsdp_per_rank"].items()}
    row["activation_source"] = conf["activation_source"]
    del prof, conf
    gc.collect()  # the profile's models are gone before the measured run starts
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    Trainer(cfg, console=False).run()
    row["train_s"] = round(time.perf_counter() - t0, 1)
    final = json.loads((work / "run" / "results_final.json").read_text())
    row["measured_peak_bytes"] = final["peak_memory_mb"] * 2**20
    row["ratio_measured_over_computed_w1"] = row["measured_peak_bytes"] / row["computed"]["1"]["total"]
    row["final_train_loss"] = (final.get("final") or {}).get("train_loss")
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="qwen3b,llama8b")
    p.add_argument("--methods", default="lora,dora")
    p.add_argument("--tiny", action="store_true", help="toy shapes on the CPU (the plumbing)")
    p.add_argument("--one", nargs=2, metavar=("SHAPE", "METHOD"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.one:
        try:
            row = one(*a.one, out, a.tiny)
        except Exception as e:  # noqa: BLE001  the case's exact error is the result
            row = {"shape": a.one[0], "method": a.one[1], "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        with open(out / "shard_memory.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}))
        return 0 if "error" not in row else 1
    rc = 0
    for shape in a.shapes.split(","):
        for method in a.methods.split(","):
            cmd = [sys.executable, __file__, "--out", str(out), "--one", shape, method] + (["--tiny"] if a.tiny else [])
            rc |= subprocess.run(cmd).returncode
    return rc


if __name__ == "__main__":
    sys.exit(main())
