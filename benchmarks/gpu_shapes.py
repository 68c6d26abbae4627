"""Two more model shapes for ``bench_gpu.py`` (issue 17), run as its cases ``distilbert_*`` and ``qwen3b_*``.

Each case builds the baseline and peftlab's real ``train`` path on the same model shape, random
weights, the same batch and the same random data, back to back in one process:

* **DistilBERT-base sequence classification** (``distilbert_lora``, ``distilbert_lora_c``): the
  shipped ``distilbert-base-uncased`` config (``model.from_scratch=true``), 2 classes, batch 32 x 128
  tokens (every example exactly 128 tokens, no padding), LoRA r=8 alpha=16 dropout 0 on ``q_lin`` and
  ``v_lin`` (peftlab's default targets for DistilBERT), classifier head trained (peft's ``SEQ_CLS``
  ``modules_to_save`` on both sides), fp32 weights with bf16 autocast, the config's own dropout.
  Baseline: ``AutoModelForSequenceClassification.from_config`` + ``get_peft_model`` on the GPU, fused
  AdamW, eager or ``torch.compile``d. Metric: examples/s (tokens/s / 128).
* **Qwen2.5-3B-shaped causal LM** (``qwen3b_lora``, ``qwen3b_dora``; ``_c`` variants compile both
  sides): the shipped ``qwen2.5-3b`` config (hidden 2048, 36 layers, 16 query / 2 KV heads,
  intermediate 11008, vocabulary 151,936, tied embeddings, rope_theta 1e6), random weights, batch
  4 x 1024 tokens, gradient checkpointing, LoRA (or DoRA) r=16 alpha=32 dropout 0 on
  q_proj/k_proj/v_proj/o_proj. Baseline, as a researcher writes it:
  ``with torch.device("cuda"): AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)`` (bf16
  weights, initialised on the GPU), ``model.gradient_checkpointing_enable()`` (transformers' default
  form), ``get_peft_model`` (adapters in fp32, peft's ``autocast_adapter_dtype``), fused AdamW over the
  adapters, forward under ``torch.autocast("cuda", torch.bfloat16)``, ``labels=input_ids``.
  peftlab: its defaults plus ``model.gradient_checkpointing=true`` (``system.dtype=bf16``; frozen-weight
  storage is whatever peftlab's default is). peftlab builds the base on the CPU in fp32 and moves it
  (about a minute for 3B parameters, outside the timed window; reported as ``init_s``). 3 warm-up and
  5 timed steps at most (``min`` with ``--warmup``/``--steps``).

Offline data, written here into a temporary folder: a word-level tokenizer built from a vocabulary
that the script writes (tokens ``t<id>``; DistilBERT: BERT's special ids [PAD]=0 [UNK]=100 [CLS]=101
[SEP]=102 [MASK]=103; Qwen: 151,665 tokens with ``<|endoftext|>`` = 151,643 as in Qwen2.5's tokenizer),
saved with ``save_pretrained`` and named by path in ``data.tokenizer``; a classification dataset as
train/validation JSON Lines whose texts are 126 random word tokens (``[CLS] ... [SEP]`` = 128 tokens);
causal-LM token bins in ``uint32`` (the vocabulary exceeds 65,536) with their ``meta.json``.

FLOPs per token (:func:`shape_flops`), counted from the architecture, the same for both sides:
``4 N_frozen + 6 N_trained + 12 L (h * d_head) T``, where N are the weights of every matmul a
token goes through (each weight multiply-add = 2 FLOPs forward; frozen weights need only the
input gradient backward, trained ones both gradients), ``h * d_head`` the query width (with GQA the
K/V projections are smaller and counted in N, while the score and value products still run per
query head), and the attention products are counted over the full T x T square as in the GPT-2 rows
(no causal halving). The tied LM head counts once as a V x d matmul; embedding lookups, norms,
activations, softmax and biases are not counted; a classification head (pre_classifier + classifier,
trained) runs once per example, so it counts 6 x its weights / T per token. DoRA's magnitude and norm
work is method overhead and not counted (same model FLOPs as LoRA). ``mfu`` excludes the gradient
checkpointing recompute (model FLOPs); ``hfu`` adds it: one more forward of the decoder layers
(``2 N_layers + 2 N_adapters + 4 L (h * d_head) T``; the LM head is not recomputed).

CPU check: ``tiny=True`` builds both shapes at toy size through the same code (tests/test_bench_shapes.py).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from _common import cleanup, hf_config, peak_mb, time_trainer_steps, timed_loop, write_token_bins

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "peftlab/models/configs"

# shape -> what both sides build
SHAPES = {
    "distilbert": dict(task="classification", config="distilbert-base-uncased", batch=32, seq=128, num_labels=2,
                       targets=["q_lin", "v_lin"], r=8, alpha=16, gradient_checkpointing=False, base_dtype=None,
                       max_warmup=None, max_steps=None,
                       tiny=dict(batch=4, seq=16, config=dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64))),
    "qwen3b": dict(task="causal_lm", config="qwen2.5-3b", batch=4, seq=1024, num_labels=None,
                   targets=["q_proj", "k_proj", "v_proj", "o_proj"], r=16, alpha=32, gradient_checkpointing=True,
                   base_dtype=torch.bfloat16, max_warmup=3, max_steps=5,
                   tiny=dict(batch=2, seq=32, config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                          num_key_value_heads=2, intermediate_size=64))),
}

# Token layout of the offline tokenizers written here.
BERT_SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
BERT_FIRST_WORD = 1000  # random text draws word ids from here to the end of the vocabulary
QWEN_TOKENS, QWEN_EOT = 151665, 151643  # len(Qwen2.5 tokenizer) and its <|endoftext|>

# bench_gpu.py CASES rows: name -> (baseline spec, peftlab spec)
SHAPE_CASES = {
    "distilbert_lora": ({"shape": "distilbert", "kind": "lora", "compile": False}, {"shape": "distilbert", "method": "lora", "compile": False}),
    "distilbert_lora_c": ({"shape": "distilbert", "kind": "lora", "compile": True}, {"shape": "distilbert", "method": "lora", "compile": True}),
    "qwen3b_lora": ({"shape": "qwen3b", "kind": "lora", "compile": False}, {"shape": "qwen3b", "method": "lora", "compile": False}),
    "qwen3b_dora": ({"shape": "qwen3b", "kind": "dora", "compile": False}, {"shape": "qwen3b", "method": "dora", "compile": False}),
    "qwen3b_lora_c": ({"shape": "qwen3b", "kind": "lora", "compile": True}, {"shape": "qwen3b", "method": "lora", "compile": True}),
    "qwen3b_dora_c": ({"shape": "qwen3b", "kind": "dora", "compile": True}, {"shape": "qwen3b", "method": "dora", "compile": True}),
}


# ------------------------------------------------------------------ small helpers
def shape_spec(shape: str, tiny: bool = False) -> dict:
    """The shape's settings with its architecture config dict (``model_type`` included); ``tiny`` shrinks both."""
    s = dict(SHAPES[shape])
    cfg = json.loads((CONFIG_DIR / f"{s['config']}.json").read_text())
    cfg.pop("architectures", None)
    if tiny:
        cfg.update(s["tiny"]["config"])
        s.update(batch=s["tiny"]["batch"], seq=s["tiny"]["seq"])
    s["hf_config"] = cfg
    s["tiny_run"] = tiny
    return s


# ------------------------------------------------------------------------ FLOPs
def shape_flops(s: dict, adapted: Optional[list[str]] = None) -> dict:
    """FLOPs per token of one training step of shape ``s`` with LoRA/DoRA on ``s['targets']`` (module docstring).

    Returns ``model`` (no recompute), ``hardware`` (with the gradient-checkpointing recompute when the
    shape uses it) and the weight counts: ``n_frozen`` (base matmul weights a token passes, LM head
    included), ``n_layers`` (the decoder/encoder layers' part of it), ``n_adapter``, ``n_head_cls``.
    """
    c = hf_config(s)
    T, r = s["seq"], s["r"]
    targets = set(adapted if adapted is not None else s["targets"])
    if s["task"] == "causal_lm":
        d, L, ff, V = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
        hd = getattr(c, "head_dim", None) or d // c.num_attention_heads
        dq, dkv = c.num_attention_heads * hd, c.num_key_value_heads * hd
        shapes = {"q_proj": (d, dq), "k_proj": (d, dkv), "v_proj": (d, dkv), "o_proj": (dq, d),
                  "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}
        head, head_cls = V * d, 0
    else:  # DistilBERT
        d, L, ff = c.dim, c.n_layers, c.hidden_dim
        dq = d
        shapes = {"q_lin": (d, d), "k_lin": (d, d), "v_lin": (d, d), "out_lin": (d, d), "lin1": (d, ff), "lin2": (ff, d)}
        head, head_cls = 0, d * d + d * c.num_labels  # pre_classifier + classifier, once per example
    per_layer = sum(i * o for i, o in shapes.values())
    n_layers = L * per_layer
    n_adapter = L * sum(r * (i + o) for name, (i, o) in shapes.items() if name in targets)
    attn = 12 * L * dq * T
    model = 4 * (n_layers + head) + 6 * n_adapter + 6 * head_cls / T + attn
    recompute = (2 * n_layers + 2 * n_adapter + 4 * L * dq * T) if s["gradient_checkpointing"] else 0
    return {"model": float(model), "hardware": float(model + recompute), "n_frozen": n_layers + head, "n_layers": n_layers,
            "n_adapter": n_adapter, "n_head_cls": head_cls, "attention": attn, "recompute": recompute}


# ------------------------------------------------------------------------- data
def write_tokenizer(folder: Path, s: dict) -> Path:
    """A word-level tokenizer over tokens ``t<id>`` (built from a vocabulary written here, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    if s["task"] == "classification":
        n, specials = s["hf_config"]["vocab_size"], dict(BERT_SPECIALS)
    else:
        n, specials = QWEN_TOKENS, {"<|endoftext|>": QWEN_EOT}
    by_id = {i: t for t, i in specials.items()}
    vocab_lines = [by_id.get(i, f"t{i}") for i in range(n)]
    (folder / "vocab.txt").write_text("\n".join(vocab_lines) + "\n")  # the vocabulary, one token per line
    vocab = {tok: i for i, tok in enumerate((folder / "vocab.txt").read_text().splitlines())}
    if s["task"] == "classification":
        tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
        tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 101), ("[SEP]", 102)])
        kw = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    else:
        tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
        kw = dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(list(specials))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **kw)
    tok.model_max_length = 1 << 20
    tok.save_pretrained(str(folder))
    return folder


def cls_batch(s: dict, n: int, gen: torch.Generator) -> dict:
    """``n`` examples of exactly ``seq`` tokens: [CLS], seq-2 random words, [SEP]; labels 0..num_labels-1."""
    V, T = s["hf_config"]["vocab_size"], s["seq"]
    words = torch.randint(BERT_FIRST_WORD, V, (n, T - 2), generator=gen)
    ids = torch.cat([torch.full((n, 1), BERT_SPECIALS["[CLS]"]), words, torch.full((n, 1), BERT_SPECIALS["[SEP]"])], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, s["num_labels"], (n,), generator=gen)}


def write_data(root: Path, s: dict, n_steps: int, seed: int = 0) -> dict:
    """Tokenizer + dataset for peftlab (paths), enough for ``n_steps`` training batches and one validation batch."""
    root.mkdir(parents=True, exist_ok=True)
    tok_dir = write_tokenizer(root / "tokenizer", s)
    g = torch.Generator().manual_seed(seed)
    B, T = s["batch"], s["seq"]
    if s["task"] == "classification":
        data = root / "cls"
        data.mkdir(exist_ok=True)
        for split, n in (("train", B * (n_steps + 2)), ("validation", B)):
            b = cls_batch(s, n, g)
            with open(data / f"{split}.jsonl", "w") as f:
                for ids, y in zip(b["input_ids"][:, 1:-1].tolist(), b["labels"].tolist()):
                    f.write(json.dumps({"text": " ".join(f"t{i}" for i in ids), "label": y}) + "\n")
    else:
        data = write_token_bins(root / "bins", T * B * (n_steps + 4), T * B, QWEN_TOKENS, QWEN_EOT, tok_dir,
                                "random tokens (benchmarks/gpu_shapes.py)", seed)
    return {"dataset": str(data), "tokenizer": str(tok_dir)}


# -------------------------------------------------------------------- baseline
def build_baseline(s: dict, kind: str, dev: torch.device, seed: int = 42):
    """The model a researcher builds with HF PEFT (module docstring), on ``dev``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cfg = hf_config(s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if s["task"] == "causal_lm":
            with torch.device(dev):
                model = AutoModelForCausalLM.from_config(cfg, dtype=s["base_dtype"])
        else:
            model = AutoModelForSequenceClassification.from_config(cfg)
        if s["gradient_checkpointing"]:
            model.gradient_checkpointing_enable()
        task_type = "CAUSAL_LM" if s["task"] == "causal_lm" else "SEQ_CLS"
        model = get_peft_model(model, LoraConfig(r=s["r"], lora_alpha=s["alpha"], lora_dropout=0.0, target_modules=list(s["targets"]),
                                                 task_type=task_type, use_dora=kind == "dora"))
    return model.to(dev)


def _checkpoint_reentrant(model) -> Optional[bool]:
    for m in model.modules():
        fn = getattr(m, "_gradient_checkpointing_func", None)
        if fn is not None:
            return getattr(fn, "keywords", {}).get("use_reentrant")
    return None


def run_baseline(s: dict, spec: dict, dev: torch.device, warmup: int, steps: int) -> dict:
    """The minimal loop: autocast forward, backward, fused AdamW step, zero_grad; no logging."""
    t_init = time.perf_counter()
    model = build_baseline(s, spec["kind"], dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev.type == "cuda")
    init_s = time.perf_counter() - t_init
    g = torch.Generator().manual_seed(0)
    B, T = s["batch"], s["seq"]
    if s["task"] == "causal_lm":
        batches = []
        for _ in range(4):
            x = torch.randint(0, QWEN_EOT, (B, T), generator=g).to(dev)
            batches.append({"input_ids": x, "labels": x})
    else:
        batches = [{k: v.to(dev) for k, v in cls_batch(s, B, g).items()} for _ in range(4)]
    reentrant = _checkpoint_reentrant(model)
    model.train()
    fwd = torch.compile(model) if spec["compile"] else model

    def step(i):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = fwd(**batches[i % len(batches)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t = timed_loop(step, warmup, steps, dev)
    out = {"step_ms": 1e3 * t["seconds"] / steps, "peak_mb": peak_mb(dev), "new_graphs_after_warmup": t["new_graphs"] if spec["compile"] else 0,
           "last_loss": float(t["last"].detach()), "init_s": init_s, "trainable": sum(p.numel() for p in params),
           "base_dtype": str(next(p for p in model.parameters() if not p.requires_grad).dtype)}
    if s["gradient_checkpointing"]:
        out["checkpoint_use_reentrant"] = reentrant
    del model, opt, fwd, batches
    cleanup(dev)
    return out


# ---------------------------------------------------------------------- peftlab
def peftlab_config(s: dict, spec: dict, data: dict, model_name: str, run_dir: Path, dev: torch.device, warmup: int, steps: int):
    from peftlab.config import config_from_dict

    raw = {
        "method": spec["method"],
        "model": {"name": model_name, "from_scratch": True},
        "data": {"dataset": data["dataset"], "tokenizer": data["tokenizer"], "max_val_examples": s["batch"]},
        "training": {"seed": 42, "epochs": 1, "max_steps": warmup + steps, "batch_size": s["batch"], "learning_rate": 1e-4,
                     "log_steps": 10, "save_steps": 0, "max_grad_norm": None, "eval_max_batches": 1},
        "output": {"dir": str(run_dir), "overwrite": True},
        "logging": {"progress_bar": False},
        "system": {"device": dev.type, "dtype": "bf16", "compile": spec["compile"]},
        "lora": {"r": s["r"], "alpha": s["alpha"], "dropout": 0.0},
    }
    if s["task"] == "causal_lm":
        raw["model"]["target_modules"] = list(s["targets"])  # peftlab's qwen2 default is q_proj, v_proj
        raw["data"]["block_size"] = s["seq"]
    else:
        raw["data"]["max_length"] = s["seq"]  # DistilBERT: peftlab's default targets (q_lin, v_lin) = s["targets"]
    if s["gradient_checkpointing"]:
        raw["model"]["gradient_checkpointing"] = True
    for k, v in spec.get("extra", {}).items():
        sec, key = k.split(".")
        raw.setdefault(sec, {})[key] = v
    return config_from_dict(raw)


def run_peftlab(s: dict, spec: dict, data: dict, model_name: str, run_dir: Path, dev: torch.device, warmup: int, steps: int,
                profiler=None) -> dict:
    """peftlab's ``Trainer`` (the ``train`` path), timed between optimizer steps ``warmup`` and ``warmup + steps``
    (under ``profiler``, a ``torch.profiler.profile``, when one is given)."""
    from peftlab.train.loop import Trainer

    cfg = peftlab_config(s, spec, data, model_name, run_dir, dev, warmup, steps)
    t_init = time.perf_counter()
    trainer = Trainer(cfg, console=False)
    init_s = time.perf_counter() - t_init
    model = trainer.unwrapped()
    targets = sorted({n.split(".lora_A.")[0].split(".")[-1] for n, _ in model.named_parameters() if ".lora_A." in n})
    frozen = next((p for p in model.parameters() if not p.requires_grad), None)
    mark = time_trainer_steps(trainer, dev, warmup, steps, at_start=profiler.__enter__ if profiler is not None else None,
                              at_end=(lambda: profiler.__exit__(None, None, None)) if profiler is not None else None)
    res = trainer.run()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    out = {"step_ms": 1e3 * (mark["t1"] - mark["t0"]) / steps, "peak_mb": mark["peak"],
           "new_graphs_after_warmup": mark["g1"] - mark["g0"] if spec["compile"] else 0,
           "last_loss": res["final"].get("train_loss"), "init_s": init_s, "trainable": res.get("trainable_params"),
           "adapted": targets, "base_dtype": str(frozen.dtype) if frozen is not None else None,
           "optimizer": type(opt).__name__, "fused_optimizer": bool(opt.defaults.get("fused"))}
    del trainer, model, frozen, opt
    cleanup(dev)
    return out


# ------------------------------------------------------------------------ a case
_DATA: dict = {}


def run_shape(side: str, spec: dict, warmup: int, steps: int, peak_tflops: Optional[float] = None, device: str = "cuda",
              tiny: bool = False, workdir: Optional[Path] = None) -> dict:
    """One side (``hf`` or ``peftlab``) of a shape case; a bench_gpu.py row (tok/s, ex/s, MFU...).

    ``spec`` is a :data:`SHAPE_CASES` entry plus ``name``. ``warmup``/``steps`` are capped by the shape's own
    maximum (3 and 5 for the 3B model). ``tiny`` builds the toy-size model of the same shape (CPU tests).
    """
    dev = torch.device(device)
    s = shape_spec(spec["shape"], tiny)
    if s["max_warmup"]:
        warmup = min(warmup, s["max_warmup"])
    if s["max_steps"]:
        steps = min(steps, s["max_steps"])
    if warmup < 1 or steps < 1:
        raise ValueError(f"warmup and steps must be at least 1, got {warmup} and {steps}")
    root = Path(workdir) if workdir else Path(tempfile.gettempdir()) / f"bench_shapes_{os.getpid()}"
    key = (spec["shape"], tiny, warmup + steps, str(root))
    if key not in _DATA:
        sub = root / f"{spec['shape']}{'_tiny' if tiny else ''}_{warmup + steps}"
        data = write_data(sub, s, warmup + steps)
        name = s["config"]
        if tiny:  # a local folder with config.json: the from_scratch path for a config peftlab does not ship
            (sub / "model").mkdir(exist_ok=True)
            (sub / "model" / "config.json").write_text(json.dumps(s["hf_config"]))
            name = str(sub / "model")
        _DATA[key] = (data, name)
    data, model_name = _DATA[key]
    if side == "hf":
        r = run_baseline(s, spec, dev, warmup, steps)
    else:
        r = run_peftlab(s, spec, data, model_name, root / "runs" / spec["name"], dev, warmup, steps)
    if r.get("peak_mb") is None:  # CPU: no allocator statistics (bench_gpu's summary formats the field when present)
        r.pop("peak_mb", None)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    B, T = s["batch"], s["seq"]
    fl = shape_flops(s)
    tok_s = world * B * T / (r["step_ms"] / 1e3)
    r.update(shape=spec["shape"], tiny=tiny, batch=B, seq=T, warmup=warmup, steps=steps, world_size=world, tok_s=tok_s,
             flops_per_token=fl["model"], flops_per_token_with_recompute=fl["hardware"])
    if s["task"] == "classification":
        r["ex_s"] = tok_s / T
    if peak_tflops:
        r["mfu"] = tok_s * fl["model"] / (world * peak_tflops * 1e12)
        r["hfu"] = tok_s * fl["hardware"] / (world * peak_tflops * 1e12)
    return r
