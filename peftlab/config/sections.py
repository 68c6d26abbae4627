"""The configuration sections every run understands (see DESIGN.md, "Keys every
configuration understands"). Method sections (``lora``, ``sora``, ...) are declared
next to their methods in ``peftlab/methods`` and registered with
:func:`peftlab.config.register_section`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..io import output_path_problem
from ..options import opt


@dataclass
class ModelConfig:
    name: str = opt("tiny-gpt2", "Hub name, local path, built-in tiny model (tiny-gpt2, tiny-bert) or offline real model (smollm2-135m, minilm-l6).")
    task: Literal["auto", "causal_lm", "classification"] = opt("auto", "Head to build; `auto` infers it from the model name and dataset.")
    from_scratch: bool = opt(False, "Build the architecture with random weights instead of loading weights (configs of gpt2, distilbert-base-uncased, bert-base-uncased, qwen2.5-0.5b, qwen2.5-3b and llama-3-8b ship with peftlab).")
    num_labels: Optional[int] = opt(None, "Number of classes for classification; defaults to what the dataset says.")
    target_modules: Optional[list[str]] = opt(None, "Module names to adapt; default depends on the architecture (GPT-2 c_attn, BERT query/value, Llama q_proj/v_proj).")
    dropout: Optional[float] = opt(None, "Override every dropout probability inside the base model (null keeps the architecture's own).")
    revision: Optional[str] = opt(None, "Hub revision (branch, tag or commit) to load.")
    trust_remote_code: bool = opt(False, "Allow model code from the hub to run. Off unless you trust the repository.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass instead of storing them (less memory, about a third more compute; same numbers).")
    gradient_checkpointing_fraction: float = opt(
        1.0, "With model.gradient_checkpointing: the share of the transformer blocks that recompute, spread evenly over the "
        "depth (0.5 = every other block); the rest keep their activations. Spends memory a checkpointed run has to spare "
        "on less recomputation (a faster step); same numbers. 1.0 = every block.")
    gradient_checkpointing_reentrant: bool = opt(
        False, "With model.gradient_checkpointing: torch's reentrant checkpoint (the form HF PEFT's prepare_model_for_kbit_training "
        "uses) instead of the non-reentrant one: the same numbers, less Python work per block (no hook per saved tensor), "
        "for host-bound steps such as a 4-bit base's. Makes the embeddings' output require a gradient, as reentrant "
        "checkpointing needs. docs/gpu-speed.md.")
    quantization: Literal["none", "nf4", "fp4", "int8"] = opt("none", "Load the frozen base quantized by bitsandbytes (QLoRA-style; through transformers' BitsAndBytesConfig): nf4 / fp4 = 4-bit, int8 = LLM.int8(); adapters and heads train in float32. For the LoRA-family methods. docs/quantization.md.")
    double_quant: bool = opt(True, "model.quantization=nf4/fp4: also quantize the 4-bit blocks' scales (QLoRA's double quantization, about 0.4 bit per weight less).")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = opt("auto", "With model.quantization: the dtype the 4-bit weights are dequantized to for each matmul, and of the unquantized base tensors (embeddings, norms, head); auto = system.dtype's.")
    base_dtype: Literal["auto", "float32", "bfloat16"] = opt(
        "auto", "Storage dtype of the frozen base model (trainable tensors stay float32): bfloat16 halves its memory and, for "
        "models built from a config (model.from_scratch), builds it on the GPU in seconds; auto = bfloat16 on CUDA with "
        "system.dtype=bf16, float32 otherwise (CPU runs keep their numbers). bfloat16 needs system.dtype=bf16 (docs/gpu-speed.md).")

    def validate(self) -> list[str]:
        p = []
        if not self.name.strip():
            p.append("`model.name` is empty; give a hub name, a local path or a built-in name such as tiny-gpt2.")
        if self.num_labels is not None and self.num_labels < 2:
            p.append(f"`model.num_labels` must be at least 2, got {self.num_labels}.")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            p.append(f"`model.dropout` must be in [0, 1), got {self.dropout}.")
        if self.target_modules is not None and not self.target_modules:
            p.append("`model.target_modules` is an empty list; remove it to use the architecture default.")
        if not 0.0 < self.gradient_checkpointing_fraction <= 1.0:
            p.append(f"`model.gradient_checkpointing_fraction` must be in (0, 1], got {self.gradient_checkpointing_fraction} "
                     "(the share of transformer blocks that recompute; turn checkpointing off with model.gradient_checkpointing=false).")
        elif self.gradient_checkpointing_fraction != 1.0 and not self.gradient_checkpointing:
            p.append(f"`model.gradient_checkpointing_fraction={self.gradient_checkpointing_fraction}` has no effect without "
                     "`model.gradient_checkpointing=true`: set both, or remove the fraction.")
        if self.gradient_checkpointing_reentrant and not self.gradient_checkpointing:
            p.append("`model.gradient_checkpointing_reentrant=true` has no effect without `model.gradient_checkpointing=true`: "
                     "set both, or remove it.")
        return p


#: the first bitsandbytes release with a CPU backend for nf4, fp4 and int8 (the multi-backend refactor)
BNB_CPU_BACKEND = (0, 48)


def bnb_version() -> Optional[tuple[int, ...]]:
    """The installed bitsandbytes version as a tuple (None: not installed); imports nothing."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    try:
        text = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return (0,)
    return tuple(int(x) for x in text.split(".")[:3] if x.isdigit())


def quantization_problems(method_cls, supported: list[str], model: "ModelConfig", system: "SystemConfig") -> list[str]:
    """Why ``model.quantization`` cannot run for this method on this machine (empty: it can), read
    with the configuration, before any work. ``method_cls.quantized_base`` says whether the
    method trains on a frozen quantized base (adapters) at all; ``supported`` names the methods that do."""
    q = model.quantization
    if q == "none":
        return []
    if not getattr(method_cls, "quantized_base", False):
        return [f"`model.quantization={q}` keeps the base frozen in {q}, but method {method_cls.name} trains the base weights "
                f"themselves, which bitsandbytes cannot update in place. Use an adapter method on the quantized base "
                f"({', '.join(supported)}), or train this method on the unquantized base with --model.quantization=none."]
    import torch

    version = bnb_version()
    fix = "or train the unquantized base with --model.quantization=none"
    if version is None:
        return [f"`model.quantization={q}` loads the frozen base through bitsandbytes, which is not installed. Install it "
                f"(pip install bitsandbytes; 0.48 and later also run {q} on the CPU, slowly), {fix}."]
    v = ".".join(map(str, version))
    if system.device == "cuda" and not torch.cuda.is_available():
        return [f"`model.quantization={q}` with system.device=cuda, but torch sees no CUDA device. Run on a GPU, or use "
                f"--system.device=auto{' (bitsandbytes ' + v + ' then runs on the CPU)' if version >= BNB_CPU_BACKEND else ''}, {fix}."]
    if (system.device == "cpu" or not torch.cuda.is_available()) and version < BNB_CPU_BACKEND:
        where = "system.device=cpu" if system.device == "cpu" else "this machine has no CUDA device"
        return [f"`model.quantization={q}`: {where}, and bitsandbytes {v} has no CPU backend for {q} (that came with 0.48). "
                f"Run on a GPU, upgrade bitsandbytes (pip install -U bitsandbytes), {fix}."]
    return []


@dataclass
class DataConfig:
    dataset: str = opt("lm-sample", "Task name (sst2, imdb, ag_news, tweet_eval, openwebtext, any hub name or name:config), a local file/folder or token-bin directory, a shipped sample (lm-sample, sst2-sample, imdb-sample, ag_news-sample, tweet_eval-sample, instruct-sample, chat-sample), or an offline real dataset (food-reviews, python-docs).")
    tokenizer: Optional[str] = opt(None, "Tokenizer name or path; defaults to the model's. `gpt2` is the genuine GPT-2 BPE.")
    data_dir: Optional[str] = opt(None, "Folder with local copies of a named task (<task>_dataset/<task>_train.csv ...).")
    text_column: Optional[str] = opt(None, "Text column of a CSV/JSON dataset; default `text` or the task's own.")
    text_pair_column: Optional[str] = opt(None, "Second text column for sentence-pair tasks.")
    label_column: Optional[str] = opt(None, "Label column of a CSV/JSON dataset; default `label`.")
    max_length: int = opt(128, "Truncate classification inputs, and instruction/chat examples (or packed sequences), to this many tokens.")
    block_size: int = opt(128, "Tokens per training block for causal LM.")
    val_fraction: float = opt(0.1, "Fraction of train held out for validation when the data has no validation split.")
    train_samples: Optional[int] = opt(None, "k-shot: keep k training examples per class (stratified, seeded).")
    max_train_examples: Optional[int] = opt(None, "Keep at most this many training examples (seeded subsample); for quick runs.")
    max_val_examples: Optional[int] = opt(None, "Keep at most this many validation examples.")
    max_test_examples: Optional[int] = opt(None, "Keep at most this many test examples (seeded subsample) for the end-of-run test evaluation; 0 skips it.")
    clean_text: bool = opt(False, "TweetEval-style cleaning: HTML entities, tags, URLs -> [URL], @mentions -> [USER], whitespace.")
    split_seed: int = opt(42, "Seed for carving validation splits and k-shot subsets (independent of training.seed).")
    # instruction tuning (peftlab/data/instruction.py, docs/instruction.md)
    format: Literal["auto", "instruction", "chat"] = opt("auto", "Record format: `instruction` (instruction/input/output), `chat` (messages of role/content), or `auto` (decided by the data).")
    instruction_column: str = opt("instruction", "Instruction field of instruction-format records.")
    input_column: str = opt("input", "Optional input (context) field of instruction-format records.")
    output_column: str = opt("output", "Response field of instruction-format records.")
    messages_column: str = opt("messages", "Messages field of chat-format records (a list of {role, content}).")
    system_prompt: Optional[str] = opt(None, "System message put before conversations that have none.")
    chat_template: Literal["auto", "tokenizer", "default"] = opt("auto", "Prompt rendering: the tokenizer's chat template (`tokenizer`), peftlab's documented template (`default`), or the tokenizer's when it has one (`auto`).")
    train_on_prompt: bool = opt(False, "Also learn prompt tokens; false masks them out of the loss (labels -100) so only responses are learned.")
    packing: bool = opt(False, "Pack several instruction examples into one sequence of up to max_length tokens, without attention across examples.")
    eval_generate: int = opt(0, "Write greedy generations for this many fixed validation prompts to generations/epoch-N.jsonl each epoch (0: off).")
    eval_generate_max_new_tokens: int = opt(64, "Longest generation written by data.eval_generate.")

    def validate(self) -> list[str]:
        p = []
        if self.max_length < 2:
            p.append(f"`data.max_length` must be at least 2, got {self.max_length}.")
        if self.block_size < 2:
            p.append(f"`data.block_size` must be at least 2, got {self.block_size}.")
        if not 0.0 < self.val_fraction < 1.0:
            p.append(f"`data.val_fraction` must be between 0 and 1 (exclusive), got {self.val_fraction}.")
        if self.eval_generate < 0 or self.eval_generate_max_new_tokens < 1:
            p.append("`data.eval_generate` must be >= 0 and `data.eval_generate_max_new_tokens` >= 1.")
        for k in ("train_samples", "max_train_examples", "max_val_examples"):
            v = getattr(self, k)
            if v is not None and v < 1:
                p.append(f"`data.{k}` must be a positive integer, got {v}.")
        if self.max_test_examples is not None and self.max_test_examples < 0:
            p.append(f"`data.max_test_examples` must be 0 (no test evaluation) or a positive integer, got {self.max_test_examples}.")
        return p


@dataclass
class TrainingConfig:
    seed: int = opt(42, "Seed for model init, dropout and data order.")
    epochs: int = opt(1, "Passes over the training data.")
    max_steps: Optional[int] = opt(None, "Stop after this many optimizer steps (overrides epochs when reached first).")
    batch_size: int = opt(8, "Micro-batch size per process.")
    eval_batch_size: Optional[int] = opt(None, "Evaluation batch size; defaults to batch_size.")
    group_by_length: bool = opt(False, "Batch training examples of similar length together (sorted within runs of 50 batches, the batches shuffled): less padding, so faster on variable-length data; the epoch still sees every example once. No effect on causal-LM blocks.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.")
    learning_rate: float = opt(2e-4, "Peak learning rate.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.")
    max_grad_norm: Optional[float] = opt(1.0, "Clip gradients to this global norm; null disables clipping.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = opt("linear", "Schedule after warmup.")
    warmup_steps: int = opt(0, "Linear warmup steps (takes precedence over warmup_ratio).")
    warmup_ratio: float = opt(0.0, "Warmup as a fraction of total steps.")
    log_steps: int = opt(10, "Write loss_log.csv every this many optimizer steps.")
    save_steps: int = opt(0, "Checkpoint every this many optimizer steps (0: only at epoch ends).")
    save_total_limit: Optional[int] = opt(3, "Keep at most this many step checkpoints (epoch checkpoints and best/ are kept).")
    eval_max_batches: Optional[int] = opt(None, "Evaluate on at most this many validation batches.")
    resume_from: Optional[str] = opt(None, "`latest` or a checkpoint directory to continue from.")
    best_metric: Literal["auto", "val_loss", "val_accuracy", "val_f1", "val_perplexity"] = opt("auto", "Metric that picks best/ (auto: accuracy for classification, loss for LM).")
    eval_steps: int = opt(0, "Also evaluate every this many optimizer steps (0: only at epoch ends); best/ and early stopping follow these evaluations too.")
    early_stopping_patience: Optional[int] = opt(None, "Stop after this many evaluations in a row without an improvement of best_metric (null: never stop early).")
    early_stopping_min_delta: float = opt(0.0, "Smallest change of best_metric that counts as an improvement for early stopping.")

    def validate(self) -> list[str]:
        p = []
        positive = ["epochs", "batch_size", "gradient_accumulation_steps", "log_steps"]
        for k in positive:
            if getattr(self, k) < 1:
                p.append(f"`training.{k}` must be at least 1, got {getattr(self, k)}.")
        if self.max_steps is not None and self.max_steps < 1:
            p.append(f"`training.max_steps` must be at least 1 (or null), got {self.max_steps}.")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            p.append(f"`training.eval_batch_size` must be at least 1, got {self.eval_batch_size}.")
        if not self.learning_rate > 0:
            p.append(f"`training.learning_rate` must be positive, got {self.learning_rate}.")
        if self.weight_decay < 0:
            p.append(f"`training.weight_decay` must be >= 0, got {self.weight_decay}.")
        for k in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, k) < 1:
                p.append(f"`training.{k}` must be in [0, 1) (Adam's moment decay; typical 0.9 and 0.999), got {getattr(self, k)}.")
        if not self.adam_epsilon > 0:
            p.append(f"`training.adam_epsilon` must be positive (it keeps Adam's division finite; typical 1e-8), got {self.adam_epsilon}.")
        if self.eval_max_batches is not None and self.eval_max_batches < 1:
            p.append(f"`training.eval_max_batches` must be at least 1, or null to evaluate on the whole validation set; got {self.eval_max_batches}.")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            p.append(f"`training.max_grad_norm` must be positive or null, got {self.max_grad_norm}.")
        if self.warmup_steps < 0 or not 0 <= self.warmup_ratio < 1:
            p.append("`training.warmup_steps` must be >= 0 and `training.warmup_ratio` in [0, 1).")
        if self.save_steps < 0:
            p.append(f"`training.save_steps` must be >= 0, got {self.save_steps}.")
        if self.eval_steps < 0:
            p.append(f"`training.eval_steps` must be >= 0 (0: evaluate only at epoch ends), got {self.eval_steps}.")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            p.append(f"`training.early_stopping_patience` must be at least 1 or null, got {self.early_stopping_patience}.")
        if self.early_stopping_min_delta < 0:
            p.append(f"`training.early_stopping_min_delta` must be >= 0, got {self.early_stopping_min_delta}.")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            p.append(f"`training.save_total_limit` must be at least 1 or null, got {self.save_total_limit}.")
        return p


@dataclass
class OutputConfig:
    dir: str = opt("runs/run", "The run directory.")
    overwrite: bool = opt(False, "Delete an existing run directory instead of refusing to start.")
    keep_checkpoints: Literal["all", "limit", "final_only"] = opt("all", "Which checkpoints stay on disk: `all` (step checkpoints limited by training.save_total_limit, every epoch checkpoint kept), `limit` (epoch checkpoints count toward the limit too), `final_only` (like limit while training; a finished run keeps only its final checkpoint and exported adapter, best/ keeps its metrics.json).")

    def validate(self) -> list[str]:
        if not self.dir.strip():
            return ["`output.dir` is empty; give the run directory."]
        problem = output_path_problem(self.dir)
        return [f"`output.dir`: {problem}"] if problem else []


@dataclass
class LoggingConfig:
    progress_bar: bool = opt(True, "Show a progress bar with loss, learning rate and memory.")
    report_to: list[str] = opt([], "Extra trackers through Accelerate: tensorboard, wandb (offline works with WANDB_MODE=offline).")
    project: str = opt("peftlab", "Tracker project name.")
    run_name: Optional[str] = opt(None, "Tracker run name; defaults to the run directory's name.")

    def validate(self) -> list[str]:
        import importlib.util

        bad = [t for t in self.report_to if t not in ("tensorboard", "wandb")]
        if bad:
            return [f"`logging.report_to` accepts tensorboard and wandb, got {bad}."]
        missing = [t for t in self.report_to if importlib.util.find_spec(t) is None]
        return [f"`logging.report_to={t}` needs the `{t}` package: pip install {t}" for t in missing]


@dataclass
class SystemConfig:
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "Where to train; auto uses a GPU when there is one.")
    dtype: Literal["fp32", "bf16", "fp16"] = opt("fp32", "Mixed precision for the forward/backward pass.")
    compile: bool = opt(False, "Wrap the model with torch.compile.")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = opt(
        "default", "torch.compile mode when system.compile is on: reduce-overhead adds CUDA graphs, max-autotune also searches matmul kernels (minutes of compile).")
    compile_scope: Literal["model", "blocks"] = opt(
        "model", "What system.compile compiles: model = the whole model (one graph; minutes to compile at 3B-8B); blocks = each "
        "transformer block in place (one compilation shared by every block of a class, seconds; gradient checkpointing stays "
        "outside the compiled code; the norms, rotary embedding, activations and residual adds of a block fused). docs/gpu-speed.md.")
    num_threads: Optional[int] = opt(None, "CPU threads for torch (default: torch's own choice).")
    fused_optimizer: Literal["auto", "on", "off"] = opt("auto", "torch's fused AdamW (one kernel for all tensors): auto = on CUDA only, on = wherever torch offers it, off.")
    prefetch: Literal["auto", "on", "off"] = opt("auto", "Load the next batch while the GPU works and copy it from pinned memory without blocking: auto = on CUDA only.")
    frozen_weights: Literal["auto", "compute", "fp32"] = opt("auto", "Frozen matmul weights (Linear/Conv1D, not tied to an embedding) stored in the mixed-precision dtype, the values autocast would cast them to every step: auto = on CUDA with bf16/fp16, compute = wherever autocast is on, fp32 = keep float32.")
    pad_vocab: Literal["auto", "on", "off"] = opt("auto", "Compute the LM head at a vocabulary padded to a multiple of 64 (zero rows, sliced off): fast GPU matmul kernels need aligned sizes (GPT-2's 50257 is not). auto = on CUDA.")
    attention_kernel: Literal["auto", "default", "flash", "cudnn", "efficient"] = opt("auto", "Scaled-dot-product-attention kernel for the training forward on CUDA: default = torch's own priority, flash / cudnn / efficient = prefer that kernel (others stay allowed as fallbacks), auto = torch's choice (cuDNN's on an H100, measured the fastest there: docs/gpu-speed.md).")
    gc_control: Literal["auto", "on", "off"] = opt("off", "Python garbage collection during training: on = freeze the objects that exist after the first step (model, compiled graphs) and collect only young objects every log_steps, so no full collection pauses the GPU's feed; auto = on CUDA; off (default) = Python's automatic collection.")
    fused_cross_entropy: Literal["auto", "liger", "chunked", "off"] = opt(
        "off", "Causal-LM training loss without materialising the logits (one process, peft/transformers models): liger = "
        "Liger-Kernel's fused linear + cross-entropy (CUDA), chunked = peftlab's own in torch ops (rows in chunks, any device), "
        "auto = on CUDA: liger when it imports, else chunked; off = model(**batch).loss (default: it saves memory but costs speed, docs/gpu-speed.md).")
    chunked_cross_entropy: Literal["auto", "compiled", "eager"] = opt(
        "eager", "How system.fused_cross_entropy=chunked computes each chunk's loss and logit gradient: compiled = one "
        "torch.compile'd function (inductor fuses it; on the CPU into one kernel), eager = torch ops one by one (about a dozen "
        "passes over the chunk's float32 logits); auto = compiled on CUDA. Same formula; the two differ by float32 rounding "
        "only. Default eager until its GPU test and benchmark have run (docs/gpu-speed.md).")
    quant_linear: Literal["auto", "on", "off"] = opt("auto", "With a 4-bit model.quantization: every 4-bit linear computed by peftlab's own autograd node (bitsandbytes' dequantization kernel and F.linear, the numbers bitsandbytes' training path gives, bit for bit) instead of bitsandbytes' Linear4bit/MatMul4Bit Python; under system.compile the NF4 dequantization compiles into the block. auto = on CUDA. docs/quantization.md.")
    sharding: Literal["none", "fsdp"] = opt("none", "How several processes hold the model: none = a whole replica on each (DDP through Accelerate); fsdp = torch's FSDP2 fully_shard per transformer block and the root, the frozen base sharded across processes, the method's trainable tensors replicated with all-reduced gradients (adapters) or sharded with their optimizer state (full fine-tuning). docs/training.md#sharding.")

    def validate(self) -> list[str]:
        p = []
        if self.num_threads is not None and self.num_threads < 1:
            p.append(f"`system.num_threads` must be at least 1, got {self.num_threads}.")
        if self.compile_scope == "blocks" and self.compile and self.compile_mode in ("reduce-overhead", "max-autotune"):
            p.append(f"`system.compile_scope=blocks` with `system.compile_mode={self.compile_mode}` is not supported: CUDA graphs "
                     "of single blocks (under the loop's step marks and gradient checkpointing) are not built or tested. Use compile_mode=default or "
                     "max-autotune-no-cudagraphs with blocks, or compile_scope=model for CUDA graphs.")
        if self.chunked_cross_entropy == "compiled" and self.fused_cross_entropy in ("off", "liger"):
            p.append(f"`system.chunked_cross_entropy=compiled` has no effect with `system.fused_cross_entropy={self.fused_cross_entropy}`: "
                     "it compiles the chunked loss only. Set system.fused_cross_entropy=chunked (or auto), or remove the setting.")
        return p
