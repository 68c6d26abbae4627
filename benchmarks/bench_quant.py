"""Issue 27: QLoRA-style 4-bit bases, peftlab against HF PEFT + bitsandbytes written by hand, one process.

    python benchmarks/bench_quant.py --out $OUT/quant                     # both shapes, LoRA and DoRA (about 5 minutes on an H200)
    python benchmarks/bench_quant.py --out $OUT/quant --shapes qwen3b --kinds lora
    python benchmarks/bench_quant.py --out /tmp/q --tiny --device cpu      # toy size on the CPU (bitsandbytes' CPU backend)
    python benchmarks/bench_quant.py --out $OUT/q --shapes qwen3b --kinds lora --sync-debug   # each synchronising call's site

Shapes (random weights, no hub): **Qwen2.5-3B** (the config peftlab ships,
``peftlab/models/configs/qwen2.5-3b.json``) and **Llama-3-8B** (a ``LlamaConfig`` written below
with Meta's published sizes: hidden 4096, 32 layers, 32 query / 8 KV heads, intermediate 14336,
vocabulary 128,256, untied head, rope_theta 5e5). Each shape is built once in bf16 on the GPU,
saved to disk (safetensors) and every case loads that folder 4-bit: bitsandbytes quantizes on load
(``BitsAndBytesConfig(nf4, double quantization, bf16 compute)``), exactly as a researcher loads a
hub checkpoint.

Cases per shape: LoRA and DoRA, r=16, alpha=32, dropout 0, on q/k/v/o_proj, batch 4 x 1024 tokens,
gradient checkpointing, bf16 autocast, AdamW over the adapters, lr 1e-4.

* ``hf``: the path the issue measured (445 ms/step, 44.7 GB on the 3B shape):
  ``from_pretrained(folder, quantization_config=..., dtype=bf16, device_map={"": 0})``,
  ``peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)`` (which casts every
  unquantized tensor, the embedding and head included, to fp32), ``get_peft_model``, fused AdamW,
  ``model(input_ids=x, labels=x).loss`` under ``torch.autocast(bf16)``.
* ``peftlab``: ``peftlab train`` on the same folder with ``model.quantization=nf4`` (double quant,
  compute dtype = system.dtype = bf16), ``model.gradient_checkpointing=true``,
  ``system.fused_cross_entropy=auto`` (Liger's fused linear + cross-entropy when liger-kernel is
  installed: the logits are never materialised), otherwise peftlab's defaults.
* ``peftlab_few`` (``--sides hf,peftlab,peftlab_few``): the same, with DoRA's row norm and output in the few-kernel form
  (``peftlab.methods.sora.layers.FEW_KERNELS = True``; the default is term by term since 2026-12-07): what that buys.
* ``peftlab_cb``: ``peftlab`` with each transformer block compiled in place (``system.compile=true``,
  ``system.compile_scope=blocks``).
* ``peftlab_re``: ``peftlab`` with torch's reentrant checkpointing (``model.gradient_checkpointing_reentrant=true``, the
  form ``prepare_model_for_kbit_training`` gives the ``hf`` side): less host work per block.
* ``peftlab_bnb``: ``peftlab`` with bitsandbytes' own 4-bit forward (``system.quant_linear=off``; the default on CUDA is
  peftlab's, :mod:`peftlab.train.quant_linear`): what that lever buys. Suffixes combine: ``peftlab_cb_re``,
  ``peftlab_cb_re_bnb``.

Per case: peak GPU memory (``max_memory_allocated`` from after the model is built to the end of the
timed steps; ``mem_before_mb`` is what was still allocated when the case began, which that peak includes)
and tokens/s over ``--steps`` timed steps after ``--warmup``. One JSON line per case in
``$OUT/bench_quant.jsonl`` (a failing case writes its error and the others go on), a summary table
in ``$OUT/summary.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_shapes as gs  # noqa: E402  (the Qwen2.5-3B spec, peftlab's timed Trainer run)
from _common import hf_config, peak_mb, timed_loop, write_token_bins, write_word_tokenizer  # noqa: E402
from bench_lead import SyncWatch, make_profiler, profile_report  # noqa: E402
from peftlab.methods.sora import layers  # noqa: E402  (FEW_KERNELS: the peftlab_few side)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=8192,
                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
                 attention_bias=False, mlp_bias=False)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)


def shape(name: str, tiny: bool) -> dict:
    """Architecture config dict, vocabulary, end-of-text id, batch and sequence length of a shape."""
    if name == "qwen3b":
        cfg = json.loads((ROOT / "peftlab/models/configs/qwen2.5-3b.json").read_text())
        cfg.pop("architectures", None)
        tokens, eot = gs.QWEN_TOKENS, gs.QWEN_EOT
    elif name == "llama8b":
        cfg, tokens, eot = dict(LLAMA3_8B), LLAMA3_8B["vocab_size"], LLAMA3_8B["eos_token_id"]
    else:
        raise ValueError(f"unknown shape {name!r} (qwen3b, llama8b)")
    batch, seq = 4, 1024
    if tiny:
        cfg.update(TINY)
        batch, seq = 2, 32
    return {"name": name, "hf_config": cfg, "tokens": tokens, "eot": eot, "batch": batch, "seq": seq}


def write_data(root: Path, s: dict, n_steps: int) -> dict:
    """A word-level tokenizer of ``s['tokens']`` tokens and uint32 token bins for peftlab (random ids)."""
    tok_dir = write_word_tokenizer(root / "tokenizer", s["tokens"], s["eot"])
    B, T = s["batch"], s["seq"]
    bins = write_token_bins(root / "bins", T * B * (n_steps + 4), T * B, s["tokens"], s["eot"], tok_dir,
                            "random tokens (benchmarks/bench_quant.py)")
    return {"dataset": str(bins), "tokenizer": str(tok_dir)}


def save_bf16(s: dict, folder: Path, dev: torch.device) -> dict:
    """The shape with random weights in bf16, built on ``dev`` (fast init) and saved as safetensors."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    torch.manual_seed(0)
    with warnings.catch_warnings(), torch.device(dev):
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(hf_config(s), dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    built = time.perf_counter() - t0
    model.save_pretrained(str(folder), safe_serialization=True)
    del model
    cleanup()
    return {"params": n, "build_s": built, "save_s": time.perf_counter() - t0 - built,
            "bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors"))}


def cleanup() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bnb_4bit(dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)


def run_hf(s: dict, kind: str, folder: Path, dev: torch.device, warmup: int, steps: int, profiler=None) -> dict:
    """HF PEFT + bitsandbytes prepared the hand-written way (module docstring)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=bnb_4bit(dtype), dtype=dtype,
                                                     device_map={"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM",
                                                 use_dora=kind == "dora"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev.type == "cuda")
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, s["eot"], (s["batch"], s["seq"]), generator=g).to(dev) for _ in range(4)]
    model.train()

    def step(i):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = model(input_ids=batches[i % 4], labels=batches[i % 4]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t = timed_loop(step, warmup, steps, dev, at_start=profiler.__enter__ if profiler is not None else None)
    if profiler is not None:
        profiler.__exit__(None, None, None)
    fp32 = sum(p.numel() for p in model.parameters() if p.dtype == torch.float32 and not p.requires_grad)
    out = {"step_ms": 1e3 * t["seconds"] / steps, "peak_mb": peak_mb(dev), "last_loss": float(t["last"].detach()), "load_s": load_s,
           "trainable": sum(p.numel() for p in params), "frozen_fp32_params": fp32}
    del model, opt, batches, params
    cleanup()
    return out


def side_levers(side: str) -> list[str]:
    """``peftlab_cb_re`` -> ``["cb", "re"]``: the levers a peftlab side turns on."""
    return side.split("_")[1:]


def run_peftlab(s: dict, kind: str, folder: Path, data: dict, run_dir: Path, dev: torch.device, warmup: int, steps: int,
                profiler=None, compile_blocks: bool = False, reentrant: bool = False, bnb_forward: bool = False) -> dict:
    spec = {"method": kind, "compile": False, "extra": {
        "model.from_scratch": False, "model.quantization": "nf4", "model.double_quant": True, "model.target_modules": TARGETS,
        "system.fused_cross_entropy": "auto"}}
    if compile_blocks:  # the peftlab_cb side: system.compile_scope=blocks
        spec["extra"].update({"system.compile": True, "system.compile_scope": "blocks"})
    if reentrant:  # the _re suffix
        spec["extra"]["model.gradient_checkpointing_reentrant"] = True
    if bnb_forward:  # the _bnb suffix
        spec["extra"]["system.quant_linear"] = "off"
    if dev.type != "cuda":
        spec["extra"]["system.dtype"] = "fp32"
    gspec = {"task": "causal_lm", "batch": s["batch"], "seq": s["seq"], "r": 16, "alpha": 32, "targets": TARGETS,
             "gradient_checkpointing": True}
    t0 = time.perf_counter()
    out = gs.run_peftlab(gspec, spec, data, str(folder), run_dir, dev, warmup, steps, profiler=profiler)
    out["load_s"] = time.perf_counter() - t0 - out["step_ms"] * steps / 1e3  # build + the untimed steps, roughly
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="qwen3b,llama8b")
    p.add_argument("--kinds", default="lora,dora")
    p.add_argument("--sides", default="hf,peftlab",
                   help="hf, peftlab, and peftlab with suffixes that combine: _cb (each transformer block compiled in place: "
                        "system.compile_scope=blocks), _re (reentrant checkpointing), _bnb (bitsandbytes' own 4-bit forward: "
                        "system.quant_linear=off), _few (DoRA's row norm and output in the "
                        "few-kernel form: the same run shows what that form buys), e.g. peftlab_cb_re")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy-size shapes (CPU check of the code path)")
    p.add_argument("--profile", action="store_true",
                   help="run the timed steps under torch.profiler; the top kernels of each case go to OUT/profile_<shape>_<kind>_<side>.txt")
    p.add_argument("--sync-debug", action="store_true",
                   help="record every synchronising CUDA call in the timed steps with its call site (OUT/syncs_<shape>_<kind>_<side>.txt); "
                        "not with --profile")
    p.add_argument("--workdir", default=None, help="where the bf16 models, data and runs go (default: a temporary folder)")
    a = p.parse_args(argv)
    if a.sync_debug and a.profile:
        p.error("--sync-debug and --profile each watch the timed steps: give one of them")
    bad = [x for x in a.sides.split(",") if x != "hf" and (x.split("_")[0] != "peftlab" or set(side_levers(x)) - {"cb", "re", "few", "bnb"})]
    if bad:
        p.error(f"unknown side(s) {', '.join(bad)}: use hf, peftlab or peftlab with the suffixes _cb, _re, _bnb, _few (e.g. peftlab_cb_re)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(a.device)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench_quant_"))
    rows = []
    jsonl = out / "bench_quant.jsonl"

    def emit(row):
        rows.append(row)
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    shapes = {}
    for name in a.shapes.split(","):  # every shape saved first: then LoRA runs on all shapes before DoRA on any
        s = shape(name, a.tiny)
        folder = work / f"{name}_bf16"
        try:
            info = save_bf16(s, folder, dev)
            data = write_data(work / f"{name}_data", s, a.warmup + a.steps)
            emit({"shape": name, "event": "saved_bf16", **info})
            shapes[name] = (s, folder, data)
        except Exception as e:  # noqa: BLE001
            emit({"shape": name, "event": "saved_bf16", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
    for kind in a.kinds.split(","):
        for name, (s, folder, data) in shapes.items():
            for side in a.sides.split(","):
                row = {"shape": name, "kind": kind, "side": side, "batch": s["batch"], "seq": s["seq"], "warmup": a.warmup,
                       "steps": a.steps, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
                prof = make_profiler(dev) if a.profile else SyncWatch() if a.sync_debug and dev.type == "cuda" else None
                cleanup()
                if dev.type == "cuda":  # what an earlier case left allocated counts in this case's peak: say how much
                    row["mem_before_mb"] = torch.cuda.memory_allocated(dev) / 2**20
                try:
                    if side == "hf":
                        r = run_hf(s, kind, folder, dev, a.warmup, a.steps, profiler=prof)
                    else:  # _few: DoRA's norm and output in the few-kernel form
                        levers = side_levers(side)
                        layers.FEW_KERNELS = "few" in levers
                        try:
                            r = run_peftlab(s, kind, folder, data, work / "runs" / f"{name}_{kind}_{side}", dev, a.warmup,
                                            a.steps, profiler=prof, compile_blocks="cb" in levers, reentrant="re" in levers,
                                            bnb_forward="bnb" in levers)
                        finally:
                            layers.FEW_KERNELS = False
                    r["tok_s"] = s["batch"] * s["seq"] / (r["step_ms"] / 1e3)
                    if isinstance(prof, SyncWatch):  # watched steps run slower too: not a speed figure
                        r.update(prof.report(a.steps, out / f"syncs_{name}_{kind}_{side}.txt"), profiled=True)
                    elif prof is not None:  # profiled steps run slower: their step_ms is not a speed figure
                        r.update(profile_report(prof, a.steps, out / f"profile_{name}_{kind}_{side}.txt"))
                    row.update(r)
                except Exception as e:  # noqa: BLE001  one failing case must not stop the others
                    if isinstance(prof, SyncWatch):
                        prof.__exit__(None, None, None)  # the next case runs unwatched unless it asks
                    row.update(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-3000:])
                    cleanup()
                emit(row)
                summary(rows, out / "summary.md", show=False)  # kept current: a run cut short still leaves its table
    summary(rows, out / "summary.md")
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def summary(rows: list[dict], path: Path, show: bool = True) -> None:
    lines = ["| shape | method | side | peak GB | tokens/s | ms/step | speed-up vs hf |", "| --- | --- | --- | --- | --- | --- | --- |"]
    by = {(r.get("shape"), r.get("kind"), r.get("side")): r for r in rows if "side" in r}
    for (shp, kind, side), r in by.items():
        if "error" in r:
            lines.append(f"| {shp} | {kind} | {side} | error: {r['error'][:80]} | | | |")
            continue
        hf = by.get((shp, kind, "hf"), {})
        up = f"{r['tok_s'] / hf['tok_s']:.2f}x" if side != "hf" and hf.get("tok_s") else ""
        peak = f"{r['peak_mb'] / 1024:.1f}" if r.get("peak_mb") is not None else "-"
        lines.append(f"| {shp} | {kind} | {side} | {peak} | {r['tok_s']:,.0f} | {r['step_ms']:.0f} | {up} |")
    path.write_text("\n".join(lines) + "\n")
    if show:
        print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
