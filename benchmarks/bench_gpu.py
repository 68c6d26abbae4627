"""peftlab's training path against the loop a researcher would write with HF PEFT, on one GPU.

Every pair runs back to back in one process on the same GPU, same model (GPT-2-124M shape from
the shipped config, random weights), same batch (8 x 1024 random GPT-2 tokens), same precision
(fp32 weights, bf16 autocast), same dropout (the config's 0.1), no gradient clipping on either side:

* baseline: ``peft.get_peft_model`` + a minimal loop (autocast forward, backward, fused
  ``torch.optim.AdamW``, ``zero_grad``; no logging), eager and ``torch.compile``d; full fine-tuning
  with the same loop; ``galore-torch``'s GaLoreAdamW (rank 128, gap 500) for rSVD-Adam.
* peftlab: ``peftlab.train.loop.Trainer`` on token bins written here, the real ``train`` path
  (data loading, logging every 10 steps, method hooks), timed between optimizer steps.

Each case: ``--warmup`` steps, then ``--steps`` timed steps (host clock around a device
synchronisation at both ends). Peak memory is ``torch.cuda.max_memory_allocated`` from just
before the first step to the end of the timed window. MFU = tokens/s x FLOPs per token / peak,
with FLOPs per token = c * N + 12 * L * d * T (N: weights of every matmul, the tied LM head
included; c = 6 for full fine-tuning, 4 when base weights are frozen (no weight gradients);
12 L d T: attention scores and values, forward and backward) and the peak the bf16 matmul rate
measured here on an 8192^3 product.

    python benchmarks/bench_gpu.py --out DIR [--cases lora,lora_c,...] [--steps 30] [--warmup 10]
    torchrun --nproc_per_node=N benchmarks/bench_gpu.py --out DIR --cases lora_c   # scaling: peftlab rows, global tok/s
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))
from gpu_shapes import SHAPE_CASES, run_shape  # noqa: E402  (DistilBERT and Qwen2.5-3B shapes: benchmarks/gpu_shapes.py)

BATCH, SEQ = 8, 1024


# ---------------------------------------------------------------- helpers
def sync():
    torch.cuda.synchronize()


def bf16_peak_tflops(n=8192, reps=10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def matmul_params(model) -> int:
    """Weights that enter a matmul: Linear / Conv1D weights (the tied LM head counted once as a matmul)."""
    from transformers.pytorch_utils import Conv1D

    n = 0
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, Conv1D)) and not type(m).__module__.startswith("peft"):
            n += m.weight.numel()
    return n


def flops_per_token(n_matmul: int, layers: int, width: int, seq: int, full: bool) -> float:
    return (6 if full else 4) * n_matmul + 12 * layers * width * seq


def recompiles() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return -1


def cleanup():
    gc.collect()
    torch.cuda.empty_cache()
    try:
        torch._dynamo.reset()
    except Exception:
        pass


def write_bins(d: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        rng.integers(0, 50256, size=n, dtype=np.uint16).tofile(d / f"{split}.bin")
    (d / "meta.json").write_text(json.dumps({"format": "peftlab-token-bins", "dtype": "uint16", "vocab_size": 50257,
                                             "eot_token_id": 50256, "tokenizer": "gpt2", "train_tokens": n_train,
                                             "val_tokens": n_val}))
    return d


def gpt2_config():
    from transformers import AutoConfig

    spec = json.loads((ROOT / "peftlab/models/configs/gpt2.json").read_text())
    spec.pop("architectures", None)
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def import_galore():
    """galore-torch's package __init__ imports its 8-bit variant (bitsandbytes); load only GaLoreAdamW."""
    if "galore_torch.adamw" in sys.modules:
        return sys.modules["galore_torch.adamw"].AdamW, sys.modules["galore_torch.galore_projector"].GaLoreProjector
    spec = importlib.util.find_spec("galore_torch")
    if spec is None:
        return None
    pkg = types.ModuleType("galore_torch")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["galore_torch"] = pkg
    from galore_torch.adamw import AdamW as GaLoreAdamW
    from galore_torch.galore_projector import GaLoreProjector

    return GaLoreAdamW, GaLoreProjector


# ------------------------------------------------------------- baselines
def build_hf(kind: str, seed: int = 42):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(gpt2_config())
    if kind in ("lora", "dora"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["c_attn"],
                                                     task_type="CAUSAL_LM", use_dora=kind == "dora"))
    return model.cuda()


class GcTimer:
    """Time spent in Python's garbage collector (all generations) while ``active``."""

    def __init__(self):
        import gc

        self.active, self.ms, self.count, self._t = False, 0.0, 0, None
        gc.callbacks.append(self._cb)

    def _cb(self, phase, info):
        if not self.active:
            return
        if phase == "start":
            self._t = time.perf_counter()
        elif self._t is not None:
            self.ms += 1e3 * (time.perf_counter() - self._t)
            self.count += 1
            self._t = None

    def close(self):
        import gc

        if self._cb in gc.callbacks:
            gc.callbacks.remove(self._cb)


def run_minimal(model, opt, batches, warmup: int, steps: int, compile_: bool, mode: str | None = None, prof=None) -> dict:
    """The minimal loop: autocast forward, backward, optimizer step, zero_grad; no logging."""
    model.train()
    fwd = torch.compile(model, mode=mode) if compile_ else model
    torch.cuda.reset_peak_memory_stats()
    t0 = g0 = None
    gct = GcTimer()
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0, g0 = time.perf_counter(), recompiles()
            gct.active = True
            if prof is not None:
                prof.__enter__()
        x = batches[i % len(batches)]
        if compile_ and mode in ("reduce-overhead", "max-autotune"):
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    dt = time.perf_counter() - t0
    gct.close()
    if prof is not None:
        prof.__exit__(None, None, None)
    return {"gc_ms": gct.ms, "gc_collections": gct.count, "step_ms": 1e3 * dt / steps, "peak_mb": torch.cuda.max_memory_allocated() / 2**20,
            "new_graphs_after_warmup": recompiles() - g0 if compile_ else 0, "last_loss": float(loss)}


def baseline(case: dict, batches, a, prof=None) -> dict:
    kind = case["kind"]
    if kind == "galore":
        GaLoreAdamW, _ = import_galore()
        model = build_hf("full")
        proj, rest = [], []
        for n, p in model.named_parameters():
            (proj if p.ndim == 2 and (".attn." in n or ".mlp." in n) else rest).append(p)
        opt = GaLoreAdamW([{"params": rest}, {"params": proj, "rank": 128, "update_proj_gap": 500, "scale": 1.0,
                                              "proj_type": "std"}], lr=1e-4)
    else:
        model = build_hf(kind)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    n_mm = matmul_params(model)
    r = run_minimal(model, opt, batches, a.warmup, a.steps, case["compile"], case.get("mode"), prof=prof)
    r["n_matmul"] = n_mm
    del model, opt
    cleanup()
    return r


# --------------------------------------------------------------- peftlab
def peftlab_run(case: dict, bins: Path, a, extra: dict | None = None, prof=None) -> dict:
    from peftlab.config import config_from_dict
    from peftlab.train.loop import Trainer

    method = case["method"]
    raw = {
        "method": method,
        "model": {"name": "gpt2", "from_scratch": True, "target_modules": ["c_attn"]},
        "data": {"dataset": str(bins), "block_size": SEQ, "tokenizer": "gpt2", "max_val_examples": BATCH},
        "training": {"seed": 42, "epochs": 1, "max_steps": a.warmup + a.steps, "batch_size": BATCH, "learning_rate": 1e-4,
                     "log_steps": 10, "save_steps": 0, "max_grad_norm": None, "eval_max_batches": 1},
        "output": {"dir": f"/tmp/bench_gpu_runs/{case['name']}", "overwrite": True},
        "logging": {"progress_bar": False},
        "system": {"device": "cuda", "dtype": "bf16", "compile": case["compile"]},
    }
    if method in ("lora", "dora", "sora", "sdora"):
        raw["lora"] = {"r": 8, "alpha": 16, "dropout": 0.0}
    if method == "rsvd":
        raw["rsvd"] = {"rank": 128, "update_interval": 500}
    for k, v in (extra or {}).items():
        sec, key = k.split(".")
        raw.setdefault(sec, {})[key] = v
    cfg = config_from_dict(raw)
    trainer = Trainer(cfg, console=False)
    for k, v in case.get("optimizer_attrs", {}).items():  # e.g. ProjectedAdamW's private _matmul variant
        setattr(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer, k, v)
    n_mm = matmul_params(trainer.unwrapped())
    mark = {}
    gct = GcTimer()
    hook = trainer.method.after_optimizer_step

    def timed(model, lr):
        hook(model, lr)
        s = trainer.state.global_step + 1  # state.global_step is incremented after this hook
        if s == a.warmup:
            sync()
            mark["t0"], mark["g0"] = time.perf_counter(), recompiles()
            gct.active = True
            if prof is not None:
                prof.__enter__()
        elif s == a.warmup + a.steps:
            sync()
            mark["t1"], mark["peak"], mark["g1"] = time.perf_counter(), torch.cuda.max_memory_allocated(), recompiles()
            gct.active = False
            if prof is not None:
                prof.__exit__(None, None, None)

    trainer.method.after_optimizer_step = timed
    torch.cuda.reset_peak_memory_stats()
    res = trainer.run()
    inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    gct.close()
    out = {"gc_ms": gct.ms, "gc_collections": gct.count, "step_ms": 1e3 * (mark["t1"] - mark["t0"]) / a.steps, "peak_mb": mark["peak"] / 2**20,
           "new_graphs_after_warmup": mark["g1"] - mark["g0"] if case["compile"] else 0,
           "last_loss": res["final"].get("train_loss"), "n_matmul": n_mm,
           "fused_ce": trainer.train_loss is not None,
           "optimizer": type(inner).__name__}
    if hasattr(inner, "use_batched"):  # rSVD-Adam: which path ran
        out["rsvd_batched"] = inner.use_batched()
    del trainer
    cleanup()
    return out


def kernel_gaps(intervals: list[tuple[float, float]], start: float, end: float, top: int = 10) -> dict:
    """Idle time of the GPU between ``start`` and ``end`` given kernel ``(begin, end)`` intervals (any unit).

    Overlapping kernels (several streams) are merged first; the result has the busy and idle
    totals and the ``top`` longest idle gaps as ``(offset from start, length)``.
    """
    merged: list[list[float]] = []
    for b, e in sorted((max(b, start), min(e, end)) for b, e in intervals if e > start and b < end):
        if merged and b <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([b, e])
    busy = sum(e - b for b, e in merged)
    edges = [start] + [x for iv in merged for x in iv] + [end]
    gaps = [(edges[i] - start, edges[i + 1] - edges[i]) for i in range(0, len(edges), 2) if edges[i + 1] > edges[i]]
    gaps.sort(key=lambda g: -g[1])
    return {"busy": busy, "idle": (end - start) - busy, "gaps": gaps[:top], "n_gaps": len(gaps)}


# ------------------------------------------------------------ refresh
def refresh_bench(a, device: str = "cuda", layers: int = 12) -> list[dict]:
    """One projector refresh over GPT-2's 48 block matrices at rank 128: peftlab's randomized SVD as a
    per-matrix loop and batched (one stack per shape), each bare and inside ProjectedAdamW (first step
    minus a steady step, rsvd.batched off / on), next to GaLore's full SVD; plus where the batched
    refresh spends its time (test-matrix draws on the host, range finder, small SVD)."""
    from peftlab.optim import projected_adam as pa

    gal = import_galore()
    torch.manual_seed(0)
    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * layers  # Conv1D weights are d_in x d_out
    grads = [torch.randn(*s, device=device) @ torch.randn(s[1], s[1], device=device) / s[1] ** 0.5 for s in shapes]
    groups = {s: [g for g in grads if tuple(g.shape) == s] for s in dict.fromkeys(shapes)}
    rank, over, iters = 128, 8, 2
    rows = []

    def timeit(fn, reps=3):
        fn()
        sync()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t)
        return 1e3 * best

    def gens(k):
        return [torch.Generator().manual_seed(pa._generator_seed(0, 0, i)) for i in range(k)]

    def loop():  # seeded per matrix, as ProjectedAdamW does
        for i, x in enumerate(grads):
            pa.top_svd(x, rank, "randomized", over, iters, torch.Generator().manual_seed(pa._generator_seed(0, 0, i)))

    def batched():
        for s, xs in groups.items():
            pa.randomized_svd_batched(torch.stack(xs), rank, over, iters, gens(len(xs)))

    rows.append({"refresh": "peftlab randomized, per-matrix loop", "ms": timeit(loop)})
    rows.append({"refresh": "peftlab randomized, batched per shape", "ms": timeit(batched)})
    # the parts of the batched refresh
    stacks = {s: torch.stack(xs) for s, xs in groups.items()}
    ls = {s: min(rank + over, *s) for s in groups}
    rows.append({"refresh": "  batched part: test matrices drawn on the host + copied",
                 "ms": timeit(lambda: [pa.draw_test_matrices(s[1], ls[s], gens(len(x)), device) for s, x in stacks.items()])})
    omegas = {s: pa.draw_test_matrices(s[1], ls[s], gens(len(x)), device) for s, x in stacks.items()}
    rows.append({"refresh": "  batched part: range finder (bmm + batched QR)",
                 "ms": timeit(lambda: [pa.range_finder_batched(x, omegas[s], iters) for s, x in stacks.items()])})
    qs = {s: pa.range_finder_batched(x, omegas[s], iters) for s, x in stacks.items()}
    rows.append({"refresh": "  batched part: small SVD of Q^T G (batched)",
                 "ms": timeit(lambda: [pa.small_svd_batched(x, qs[s]) for s, x in stacks.items()])})
    # not used by the optimizer, timed to show what a next step could gain: the four shape groups'
    # range finders on four CUDA streams, and other ways to decompose the small l x n matrices
    if device == "cuda":
        try:
            streams = [torch.cuda.Stream() for _ in stacks]

            def concurrent():
                main = torch.cuda.current_stream()
                for st, (s, x) in zip(streams, stacks.items()):
                    st.wait_stream(main)
                    with torch.cuda.stream(st):
                        pa.range_finder_batched(x, omegas[s], iters)
                for st in streams:
                    main.wait_stream(st)
            rows.append({"refresh": "  (not used) range finders of the 4 shapes on 4 CUDA streams", "ms": timeit(concurrent)})
            smalls = {s: torch.bmm(qs[s].transpose(1, 2), x) for s, x in stacks.items()}
            for label, fn in (("torch.linalg.svd driver=gesvd", lambda b: torch.linalg.svd(b, full_matrices=False, driver="gesvd")),
                              ("QR of (Q^T G)^T, then SVD of the l x l factor", lambda b: torch.linalg.svd(torch.linalg.qr(b.transpose(1, 2)).R)),
                              ("eigh of the l x l Gram matrix (fp32)", lambda b: torch.linalg.eigh(torch.bmm(b, b.transpose(1, 2))))):
                rows.append({"refresh": f"  (not used) small SVD alternative: {label}", "ms": timeit(lambda: [fn(b) for b in smalls.values()])})
            del smalls
        except Exception as e:  # informational rows: never lose the others
            rows.append({"refresh": "  (not used) alternatives failed", "ms": float("nan"), "error": repr(e)[:200]})
    del stacks, omegas, qs

    # inside the optimizer: first step (refresh + update) minus a steady step, loop vs batched
    # (batched=on with _matmul="mm": a GEMM per matrix and a fused addmm_ update instead of stacked bmm)
    for mode, mm in (("off", "bmm"), ("on", "bmm"), ("on", "mm")):
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]

        def fresh():
            opt = pa.ProjectedAdamW([{"params": params, "rank": rank}], lr=1e-4, weight_decay=0.01, update_interval=500, batched=mode)
            opt._matmul = mm
            for p, g in zip(params, grads):
                p.grad = g
            return opt

        first = timeit(lambda: fresh().step())
        opt = fresh()
        opt.step()
        steady = timeit(opt.step, reps=5)
        tag = f"batched={mode}" + (", _matmul=mm" if mm == "mm" else "")
        rows.append({"refresh": f"ProjectedAdamW refresh (first step - steady step), {tag}", "ms": first - steady})
        rows.append({"refresh": f"ProjectedAdamW steady step ({len(grads)} matrices, no refresh), {tag}", "ms": steady})
        del params, opt
    if gal is not None:
        proj = gal[1](rank, update_proj_gap=500)

        def galore():
            for x in grads:
                proj.ortho_matrix = None
                proj.project(x, 0)
        rows.append({"refresh": "galore-torch full SVD", "ms": timeit(galore, reps=1)})
    base = next((r["ms"] for r in rows if r["refresh"].startswith("galore")), None)
    for r in rows:
        if base and not r["refresh"].startswith(("galore", "  ", "ProjectedAdamW steady")):
            r["galore_over_this"] = base / r["ms"]
    return rows


# ------------------------------------------------------------------ main
CASES = {
    # name: (baseline spec or None, peftlab spec or None, compare-with)
    "lora": ({"kind": "lora", "compile": False}, {"method": "lora", "compile": False}),
    "lora_c": ({"kind": "lora", "compile": True}, {"method": "lora", "compile": True}),
    "lora_c_liger": (None, {"method": "lora", "compile": True, "extra": {"system.fused_cross_entropy": "liger"}}),
    "dora": ({"kind": "dora", "compile": False}, {"method": "dora", "compile": False}),
    "dora_c": ({"kind": "dora", "compile": True}, {"method": "dora", "compile": True}),
    "dora_c_liger": (None, {"method": "dora", "compile": True, "extra": {"system.fused_cross_entropy": "liger"}}),
    "dora_c_peftnorm": (None, {"method": "dora", "compile": True, "extra": {"lora.dora_norm": "peft"}}),
    # attribution of peftlab's levers (defaults: frozen_weights=auto, pad_vocab=auto, compile_mode=default)
    "lora_nolev": (None, {"method": "lora", "compile": False, "extra": {"system.frozen_weights": "fp32", "system.pad_vocab": "off"}}),
    "lora_c_nolev": (None, {"method": "lora", "compile": True, "extra": {"system.frozen_weights": "fp32", "system.pad_vocab": "off"}}),
    "lora_c_nopad": (None, {"method": "lora", "compile": True, "extra": {"system.pad_vocab": "off"}}),
    "lora_c_ro": ({"kind": "lora", "compile": True, "mode": "reduce-overhead"},
                  {"method": "lora", "compile": True, "extra": {"system.compile_mode": "reduce-overhead"}}),
    "lora_c_ma": ({"kind": "lora", "compile": True, "mode": "max-autotune-no-cudagraphs"},
                  {"method": "lora", "compile": True, "extra": {"system.compile_mode": "max-autotune-no-cudagraphs"}}),
    "dora_c_pl": (None, {"method": "dora", "compile": True}),
    "lora_c_gcon": (None, {"method": "lora", "compile": True, "extra": {"system.gc_control": "on"}}),
    "lora_c_attn_flash": (None, {"method": "lora", "compile": True, "extra": {"system.attention_kernel": "flash"}}),
    "lora_c_attn_efficient": (None, {"method": "lora", "compile": True, "extra": {"system.attention_kernel": "efficient"}}),
    "lora_c_attn_cudnn": (None, {"method": "lora", "compile": True, "extra": {"system.attention_kernel": "cudnn"}}),
    "sora_c": (None, {"method": "sora", "compile": True}),
    "sdora_c": (None, {"method": "sdora", "compile": True}),
    "full": ({"kind": "full", "compile": False}, {"method": "full", "compile": False}),
    "full_c": ({"kind": "full", "compile": True}, {"method": "full", "compile": True}),
    "rsvd": ({"kind": "galore", "compile": False}, {"method": "rsvd", "compile": False}),  # rsvd.batched=auto: batched on CUDA
    "rsvd_loop": (None, {"method": "rsvd", "compile": False, "extra": {"rsvd.batched": "off"}}),
    "rsvd_mm": (None, {"method": "rsvd", "compile": False, "optimizer_attrs": {"_matmul": "mm"}}),  # batched, GEMM per matrix
    **SHAPE_CASES,  # distilbert_lora[_c], qwen3b_{lora,dora}[_c]: own model, batch, data and FLOPs (gpu_shapes.py); not in the default --cases
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default=",".join(c for c in CASES if c not in SHAPE_CASES))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--peftlab-only", action="store_true", help="skip the baselines (peftlab rows only)")
    ap.add_argument("--refresh", action="store_true", help="also time one projector refresh (peftlab vs GaLore)")
    ap.add_argument("--gaps", default="", help="comma-separated cases (hf:NAME for the baseline): the GPU's idle time and longest gaps in the timed window")
    ap.add_argument("--cprofile", default="", help="comma-separated cases (hf:NAME for the baseline) to run under Python's cProfile")
    ap.add_argument("--profile", default="", help="comma-separated cases to profile with torch.profiler (peftlab side)")
    ap.add_argument("--suite", choices=["cases", "lead"], default="cases",
                    help="lead: issue 23's suite (benchmarks/bench_lead.py: HF PEFT, HF+Liger, Unsloth, peftlab at GPT-2/3B/8B)")
    ap.add_argument("--quick", action="store_true", help="the lead suite on the CPU with toy shapes, in seconds (tests the plumbing)")
    ap.add_argument("--part", default="1", choices=["1", "2", "3", "4", "5", "6", "7", "8", "9", "all"], help="lead suite: which part of its plan (1, 2: about 7 minutes each on an H200; 3: each lever alone at GPT-2, eager and compiled; 4: each lever alone at 3B and 8B; 5: the saved memory spent on less recomputation at 3B and 8B; 6: each transformer block compiled in place, both sides, at 3B and 8B; 7: HF compiled as a whole model against peftlab's fastest form and Unsloth, at 3B and 8B; 8: 8B against Unsloth again, reentrant checkpointing, the 3B DoRA/SoRA/SDoRA step ratios; 9: every adapter at GPT-2, eager and compiled)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="lead suite: wall-clock budget; cases that do not fit are skipped")
    ap.add_argument("--only", default="", help="lead suite: comma-separated shape:side[:method] to run (default all)")
    ap.add_argument("--max-batch-s", type=float, default=12.0, help="lead suite: seconds per case for the largest-batch search")
    ap.add_argument("--lead-profile", default="", help="lead suite: comma-separated shape:side:method cases whose timed steps run under "
                    "torch.profiler (top kernels into profile_<case>.txt; the row's step time is then a profiled one)")
    a = ap.parse_args(argv)
    if a.suite == "lead" or a.quick:
        import bench_lead

        if "--steps" not in (argv or sys.argv):
            a.steps = 15
        if "--warmup" not in (argv or sys.argv):
            a.warmup = 5
        bench_lead.main_lead(a)
        return
    # Under torchrun (several GPUs): peftlab rows only, one GPU per rank, rank 0 reports global tokens/s.
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        a.peftlab_only, a.refresh, a.profile, a.gaps, a.cprofile = True, False, "", "", ""
    out = Path(a.out) if rank == 0 else Path(f"/tmp/bench_gpu_rank{rank}")
    out.mkdir(parents=True, exist_ok=True)
    import peft
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "gpu": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "batch": BATCH, "seq": SEQ, "steps": a.steps, "warmup": a.warmup}
    for mod in ("liger_kernel", "galore_torch"):
        try:
            from importlib.metadata import version

            info[mod] = version(mod.replace("_", "-"))
        except Exception:
            info[mod] = None
    info["bf16_peak_tflops"] = peak = bf16_peak_tflops()
    print(json.dumps(info), flush=True)
    bins = write_bins(Path(f"/tmp/bench_gpu_bins_rank{rank}"), n_train=SEQ * BATCH * (a.warmup + a.steps + 8) * 2, n_val=SEQ * BATCH * 2)
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, 50256, (BATCH, SEQ), device="cuda", generator=g) for _ in range(4)]
    cfg = gpt2_config()
    L, d = cfg.n_layer, cfg.n_embd
    rows = []
    jl = open(out / "bench_gpu.jsonl", "a")
    for name in a.cases.split(","):
        base_spec, pl_spec = CASES[name]
        full = name.startswith(("full", "rsvd"))
        for side, spec in (("hf", base_spec), ("peftlab", pl_spec)):
            if spec is None or (side == "hf" and a.peftlab_only):
                continue
            t = time.perf_counter()
            try:
                if "shape" in spec:
                    r = run_shape(side, {"name": name, **spec}, a.warmup, a.steps, peak)
                else:
                    r = baseline(spec, batches, a) if side == "hf" else peftlab_run({"name": name, **spec}, bins, a, spec.get("extra"))
            except Exception as e:  # record and go on: one failing lever must not lose the other rows
                import traceback

                traceback.print_exc()
                r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
                cleanup()
            r.update(case=name, side=side, wall_s=time.perf_counter() - t)
            if "step_ms" in r and "shape" not in spec:
                tok_s = world * BATCH * SEQ / (r["step_ms"] / 1e3)  # global: every rank runs BATCH x SEQ per step
                r["world_size"] = world
                fpt = flops_per_token(r["n_matmul"], L, d, SEQ, full)
                r.update(tok_s=tok_s, flops_per_token=fpt, mfu=tok_s * fpt / (world * peak * 1e12))
            rows.append(r)
            jl.write(json.dumps(r) + "\n")
            jl.flush()
            print(json.dumps(r), flush=True)
    for item in [c for c in a.gaps.split(",") if c]:
        # the GPU's idle gaps in the timed window: CUDA activity only (little profiler overhead on the host)
        from torch.profiler import ProfilerActivity, profile

        side, name = item.split(":") if ":" in item else ("peftlab", item)
        spec = CASES[name][0 if side == "hf" else 1]
        prof = profile(activities=[ProfilerActivity.CUDA])
        r = baseline(spec, batches, a, prof=prof) if side == "hf" else peftlab_run({"name": name + "_gaps", **spec}, bins, a, spec.get("extra"), prof=prof)
        ks = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        if ks:
            g = kernel_gaps(ks, min(b for b, _ in ks), max(e for _, e in ks))
            row = {"case": name, "side": side + "_gaps", "step_ms": r["step_ms"], "gpu_busy_ms": g["busy"] / 1e3 / a.steps,
                   "gpu_idle_ms": g["idle"] / 1e3 / a.steps, "gaps": g["n_gaps"],
                   "longest_gaps_us": [[round(o), round(length)] for o, length in g["gaps"]]}
            rows.append(row)
            jl.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        cleanup()
    for item in [c for c in a.cprofile.split(",") if c]:
        # Python's cProfile over the timed steps: where the host's time per step goes
        import cProfile
        import io
        import pstats

        side, name = item.split(":") if ":" in item else ("peftlab", item)
        spec = CASES[name][0 if side == "hf" else 1]
        prof = cProfile.Profile()
        r = baseline(spec, batches, a, prof=prof) if side == "hf" else peftlab_run({"name": name + "_cprof", **spec}, bins, a, spec.get("extra"), prof=prof)
        buf = io.StringIO()
        st = pstats.Stats(prof, stream=buf)
        buf.write(f"{side} {name}: {r['step_ms']:.1f} ms/step under cProfile, {a.steps} steps\n")
        st.sort_stats("tottime").print_stats(35)
        st.sort_stats("cumulative").print_stats(45)
        (out / f"cprofile_{side}_{name}.txt").write_text(buf.getvalue())
        print(buf.getvalue()[:6000], flush=True)
        cleanup()
    for item in [c for c in a.profile.split(",") if c]:
        # NAME profiles peftlab's side, hf:NAME the baseline's; only the timed steps are recorded
        side, name = item.split(":") if ":" in item else ("peftlab", item)
        spec = CASES[name][0 if side == "hf" else 1]
        from torch.profiler import ProfilerActivity, profile

        steps = 5
        small = argparse.Namespace(**{**vars(a), "steps": steps})
        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        t = time.perf_counter()
        r = baseline(spec, batches, small, prof=prof) if side == "hf" else peftlab_run({"name": name + "_prof", **spec}, bins, small, spec.get("extra"), prof=prof)
        ka = prof.key_averages()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time_total for e in kernels) / 1e3 / steps  # microseconds -> ms per step
        head = (f"{side} {name}: {r['step_ms']:.1f} ms/step under the profiler; GPU kernels busy {busy:.1f} ms/step "
                f"({len(kernels) / steps:.0f} kernels/step)")
        table = head + "\n" + ka.table(sort_by="cuda_time_total", row_limit=30) + "\n\n" + ka.table(sort_by="self_cpu_time_total", row_limit=15)
        (out / f"profile_{side}_{name}.txt").write_text(table)
        print(f"== profile {side} {name} ({steps} steps after {a.warmup} warm-up steps)\n{table}", flush=True)
        rows.append({"case": name, "side": side + "_profile", "step_ms_profiled": r["step_ms"], "gpu_busy_ms": busy,
                     "kernels_per_step": len(kernels) / steps, "wall_s": time.perf_counter() - t})
        jl.write(json.dumps(rows[-1]) + "\n")
        cleanup()
    if a.refresh:
        for r in refresh_bench(a):
            r["case"] = "refresh"
            rows.append(r)
            jl.write(json.dumps(r) + "\n")
            print(json.dumps(r), flush=True)
    summary(rows, out)


def summary(rows, out: Path):
    by = {(r["case"], r.get("side")): r for r in rows if "case" in r}
    lines = ["| case | HF PEFT / minimal loop | peftlab | peftlab / baseline tok/s | peak MB (base -> peftlab) | MFU (base, peftlab) | new graphs after warm-up |",
             "|---|---|---|---|---|---|---|"]
    for (case, side), r in by.items():
        if side != "peftlab":
            continue
        b = by.get((case, "hf"))

        def f(x):
            return f"{x['step_ms']:.1f} ms ({x['tok_s'] / 1e3:.0f}k tok/s)" if x and "step_ms" in x else (x.get("error", "-") if x else "-")
        ratio = f"{r['tok_s'] / b['tok_s']:.2f}x" if b and "tok_s" in b and "tok_s" in r else "-"
        mem = f"{b['peak_mb']:.0f} -> {r['peak_mb']:.0f}" if b and "peak_mb" in b and "peak_mb" in r else (f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-")
        mfu = f"{b['mfu'] * 100:.1f}%, {r['mfu'] * 100:.1f}%" if b and "mfu" in b and "mfu" in r else (f"-, {r['mfu'] * 100:.1f}%" if "mfu" in r else "-")
        graphs = f"{b.get('new_graphs_after_warmup', '-') if b else '-'}, {r.get('new_graphs_after_warmup', '-')}"
        lines.append(f"| {case} | {f(b)} | {f(r)} | {ratio} | {mem} | {mfu} | {graphs} |")
    for r in rows:
        if r.get("case") == "refresh":
            ratio = f"GaLore / this: {r['galore_over_this']:.1f}x" if "galore_over_this" in r else ""
            lines.append(f"| refresh: {r['refresh']} | | {r['ms']:.1f} ms | {ratio} | | | |")
    for r in rows:
        if str(r.get("side", "")).endswith("_gaps"):
            lines.append(f"| GPU gaps {r['side'][:-5]} {r['case']}: {r['step_ms']:.1f} ms/step, busy {r['gpu_busy_ms']:.1f} ms, "
                         f"idle {r['gpu_idle_ms']:.1f} ms in {r['gaps']} gaps | | | | | | |")
        if str(r.get("side", "")).endswith("_profile"):
            lines.append(f"| profile {r['side'][:-8]} {r['case']}: {r['step_ms_profiled']:.1f} ms/step, GPU busy {r['gpu_busy_ms']:.1f} ms, "
                         f"{r['kernels_per_step']:.0f} kernels | | | | | | |")
    text = "\n".join(lines)
    (out / "bench_gpu_summary.md").write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
