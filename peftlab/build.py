"""One builder: configuration -> model, method, optimizer, data and step count.

    built = build(cfg)                          # what `peftlab train` trains
    built = build(cfg, data=False, task="causal_lm", num_labels=None,
                  structure=json.load(open("RUN/method.json")), optimizer=False)   # no data at all
    n = count_optimizer_steps(cfg)              # optimizer steps of the run, without training

The trainer, ``load_run``, ``export``, ``profile`` and ``compare`` build through here, so the
seeding conventions live in one place: ``torch.manual_seed(training.seed)`` before the base
model (random weights, new heads), and ``torch.manual_seed(training.seed + 1)`` right before
the method is applied, so an adapter's init does not depend on how many random draws the base
model took. Built the same way, the same config gives the same numbers on CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from .data import build_datasets, load_raw
from .data.batches import EpochBatches, epoch_padding, example_lengths
from .data.tasks import TASKS
from .errors import PeftlabError
from .methods import METHODS, MethodContext
from .models import CONFIG_DIR, TINY_MODELS, _auto_cls, check_targets, init_from_config, load_model
from .models import load_tokenizer as _load
from .models.quant import describe as describe_quant
from .optim.schedule import build_scheduler


@dataclass
class StepPlan:
    """How many micro-batches and optimizer steps a run takes."""

    micro_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    num_epochs: int


@dataclass
class Built:
    """Everything :func:`build` made. Data fields are None when built with ``data=False``,
    ``optimizer``/``scheduler`` when built with ``optimizer=False``."""

    cfg: Any
    task: str
    num_labels: Optional[int]
    model: torch.nn.Module
    tokenizer: Any
    model_info: Any
    method: Any
    raw: Any = None
    train_ds: Any = None
    train_lengths: Optional[list[int]] = None  # example lengths for training.group_by_length, else None
    val_ds: Any = None
    collate: Optional[Callable] = None
    plan: Optional[StepPlan] = None
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Any = None


# ----------------------------------------------------------------------------- pieces
def grouping_lengths(train_ds, t, world: int, log) -> Optional[list[int]]:
    """The example lengths `training.group_by_length` batches by (None where every example has the
    same length), with a log line of the padding it saves in epoch 1."""
    lengths = example_lengths(train_ds)
    if lengths is None or len(set(lengths)) <= 1:
        log.info("training.group_by_length: every training example has the same length; batches stay as they are")
        return None
    pad, tot = epoch_padding(len(lengths), t.batch_size, t.seed, world, lengths, grouped=True)
    pad0, tot0 = epoch_padding(len(lengths), t.batch_size, t.seed, world, lengths, grouped=False)
    log.info(f"training.group_by_length: epoch 1 pads {pad:,} of {tot:,} token positions ({100 * pad / max(tot, 1):.1f}%), "
             f"against {pad0:,} of {tot0:,} ({100 * pad0 / max(tot0, 1):.1f}%) in random batches")
    return lengths


def resolve_task(cfg, raw) -> tuple[str, Optional[int]]:
    """(task, num_labels) of a run from its config and loaded dataset, or a clear error."""
    task = raw.task if cfg.model.task == "auto" else cfg.model.task
    if task != raw.task:
        raise PeftlabError(f"model.task={cfg.model.task} but dataset {cfg.data.dataset!r} is a {raw.task} dataset; leave model.task=auto or pick a matching dataset.")
    num_labels = cfg.model.num_labels or raw.num_labels
    if task == "classification" and raw.num_labels and num_labels < raw.num_labels:
        raise PeftlabError(f"model.num_labels={num_labels} but dataset {cfg.data.dataset!r} has {raw.num_labels} classes; "
                           "remove model.num_labels or raise it.")
    return task, num_labels


def best_metric(cfg, task: str) -> tuple[str, bool]:
    """(metric that picks best/, whether higher is better), or an error if the task cannot compute it."""
    name = cfg.training.best_metric
    if name == "auto":
        name = "val_accuracy" if task == "classification" else "val_loss"
    if task == "causal_lm" and name in ("val_accuracy", "val_f1"):
        raise PeftlabError(f"training.best_metric={name} needs a classification task; use val_loss or val_perplexity.")
    if task == "classification" and name == "val_perplexity":
        raise PeftlabError("training.best_metric=val_perplexity is for language modelling; use val_accuracy, val_f1 or val_loss.")
    return name, name in ("val_accuracy", "val_f1")


def step_plan(n_train: int, cfg, world: int = 1) -> StepPlan:
    """Optimizer steps of a run over ``n_train`` training examples (blocks) on ``world`` processes.

    Mirrors the loop: an epoch has ``n_train // (batch_size * world)`` micro-batches, cut to a
    whole number of accumulation windows; ``max_steps`` caps the total.
    """
    t = cfg.training
    micro = n_train // (t.batch_size * world)
    micro -= micro % t.gradient_accumulation_steps
    per_epoch = micro // t.gradient_accumulation_steps
    if per_epoch == 0:
        need = t.batch_size * world * t.gradient_accumulation_steps
        raise PeftlabError(
            f"One optimizer step needs {need} training examples (batch_size {t.batch_size} x {world} process(es) x "
            f"gradient_accumulation_steps {t.gradient_accumulation_steps}) but the training set has {n_train}. Lower the batch size."
        )
    total = t.epochs * per_epoch
    if t.max_steps is not None:
        total = min(total, t.max_steps)
    return StepPlan(micro, per_epoch, total, math.ceil(total / per_epoch))


def load_tokenizer(cfg, task: str):
    """The run's tokenizer without building its model (the same choice ``load_model`` makes)."""

    return _load(cfg, task)


def count_optimizer_steps(cfg, world_size: int = 1) -> int:
    """The number of optimizer steps ``cfg`` trains for, without training.

    Reads the dataset and tokenizes it (LM block counts depend on the tokenizer), builds no
    model. Equal to ``results_final.json["global_step"]`` of the finished run.
    """

    raw = load_raw(cfg)
    task, _ = resolve_task(cfg, raw)
    train_ds, _, _ = build_datasets(raw, load_tokenizer(cfg, task), cfg)
    return step_plan(len(train_ds), cfg, world_size).total_steps


def build_base(cfg, task: str, num_labels: Optional[int], device=None):
    """``(model, tokenizer, info)``: the base model as every run of ``cfg`` starts from it
    (weights loaded, or random from ``training.seed`` for tiny / ``from_scratch`` models).

    With ``device`` (the run's device) the base is stored in :func:`base_dtype`'s dtype and a
    from-scratch model built in bfloat16 is initialised on that device; without, float32 on the CPU."""

    dt = base_dtype(cfg, device) if device is not None else None
    if dt is None:
        return load_model(cfg, task, num_labels)
    return load_model(cfg, task, num_labels, dtype=dt, device=torch.device(device))


def base_dtype(cfg, device) -> Optional[torch.dtype]:
    """``model.base_dtype`` on ``device`` -> the frozen base's storage dtype, or None for float32 (today's build).

    ``auto`` is bfloat16 on CUDA when the run computes in bf16 mixed precision (autocast casts every
    matmul input to bf16 anyway), float32 elsewhere, so CPU runs keep their numbers bit for bit.
    """
    setting = cfg.model.base_dtype
    if cfg.model.quantization != "none":
        return None  # a quantized base keeps its unquantized tensors in model.compute_dtype (models/quant.py)
    if setting == "bfloat16" and cfg.system.dtype != "bf16":
        raise PeftlabError(f"model.base_dtype=bfloat16 needs system.dtype=bf16 (got {cfg.system.dtype}): without bf16 autocast "
                           "the float32 adapters and heads would meet bfloat16 activations. Set --system.dtype=bf16 or "
                           "--model.base_dtype=auto (or float32).")
    if setting == "float32" or (setting == "auto" and (torch.device(device).type != "cuda" or cfg.system.dtype != "bf16")):
        return None
    return torch.bfloat16


@torch.no_grad()
def trainable_to_float32(model: torch.nn.Module) -> int:
    """Store every trainable floating-point parameter in float32 (adapters, heads, DoRA magnitudes,
    every weight under full fine-tuning); the frozen ones keep the base's dtype. Returns how many
    parameters were cast. A tied parameter is one object, so it is cast once and stays tied."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


def weight_shapes(model: torch.nn.Module, targets: list[str]) -> list[tuple[int, int]]:
    """The weight shapes of the ``targets`` of ``model`` (checked to exist), the input of every
    parameter budget (``Method.budget_params``). nn.Linear stores (d_out, d_in), GPT-2's Conv1D
    (d_in, d_out); budgets depend only on d_in + d_out."""
    return [tuple(model.get_submodule(name).weight.shape) for name in check_targets(model, targets)]


def task_from_names(cfg) -> tuple[str, int]:
    """``(task, num_labels)`` without loading data where the names tell (``model.task``, named
    tasks, LM corpora); otherwise the dataset's own task (classification when it cannot be read).
    For commands that build no data (``profile``); a training run uses :func:`resolve_task`."""
    name = cfg.data.dataset
    base = name[: -len("-sample")] if name.endswith("-sample") else name
    if cfg.model.task != "auto":
        task = cfg.model.task
    elif base in TASKS:  # the dataset decides, as in training
        task = "classification"
    elif base in ("lm", "openwebtext", "python-docs") or name.endswith((".txt", ".bin")):
        task = "causal_lm"
    elif name == "food-reviews":
        task = "classification"
    else:
        try:
            task = load_raw(cfg).task
        except PeftlabError:
            task = "classification"
    labels = cfg.model.num_labels or (TASKS[base].num_labels if base in TASKS else 2)
    return task, labels


def build_bare_base(cfg, task: str, num_labels: Optional[int], device=None) -> torch.nn.Module:
    """The architecture of ``cfg.model`` alone, for commands that need no tokenizer (``profile``):
    built from its config (no tokenizer, no download) for the built-in tiny models and for
    ``model.from_scratch`` with a shipped config, random weights from ``training.seed``; any
    other model as :func:`build_base` loads it. With ``device``, as :func:`build` would train it there:
    a shipped config initialised on the device in ``model.base_dtype`` (a 3B model in seconds), and
    gradient checkpointing when the config asks for it."""
    from transformers import AutoConfig  # heavy optional library: lazily, as in models

    m = cfg.model
    torch.manual_seed(cfg.training.seed)
    kwargs = {"num_labels": num_labels} if task == "classification" else {}
    spec = None
    if m.name in TINY_MODELS:
        spec = dict(TINY_MODELS[m.name])
        spec.pop("task")
    elif m.from_scratch and (CONFIG_DIR / f"{m.name}.json").is_file():
        spec = json.loads((CONFIG_DIR / f"{m.name}.json").read_text())
        spec.pop("architectures", None)
    bdt = base_dtype(cfg, device) if device is not None else None
    if spec is None:
        model, _, _ = build_base(cfg, task, num_labels, device=device if bdt is not None else None)
    else:
        hf_cfg = AutoConfig.for_model(spec.pop("model_type"), **spec, **kwargs)
        model = init_from_config(hf_cfg, task, bdt, device if bdt is not None else None, cpu_init=m.name in TINY_MODELS)
    if device is not None and cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg.model.gradient_checkpointing_fraction, cfg.model.gradient_checkpointing_reentrant)
    return model


def enable_gradient_checkpointing(model: torch.nn.Module, fraction: float = 1.0, reentrant: bool = False) -> None:
    """``model.gradient_checkpointing=true``: activation checkpointing in the non-reentrant form,
    which needs no input that requires grad (so it works with frozen bases and adapters) and
    replays dropout's random state, so the numbers equal those without it.

    ``reentrant`` (``model.gradient_checkpointing_reentrant``) uses torch's reentrant form instead (the one HF PEFT's
    ``prepare_model_for_kbit_training`` sets up): the same numbers, with less Python work per block and step (no
    pack/unpack hook per saved tensor). It gives gradients only through block inputs that require one, so the
    embeddings' output is made to (transformers' ``enable_input_require_grads``, as peft does).

    ``fraction`` (``model.gradient_checkpointing_fraction``) < 1 leaves the other blocks without
    checkpointing: ``round(fraction·L)`` of the ``L`` transformer blocks (at least one), spread evenly over the depth,
    recompute; the rest keep their activations for the backward pass."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise PeftlabError(f"model.gradient_checkpointing=true but {type(model).__name__} does not support gradient checkpointing; "
                           "remove the setting or use a transformers model that does.")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": bool(reentrant)})
    if reentrant:
        model.enable_input_require_grads()
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # a KV cache is useless in training and incompatible with checkpointing
    if fraction < 1.0:
        from transformers.modeling_layers import GradientCheckpointingLayer

        blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if not blocks:
            raise PeftlabError(f"model.gradient_checkpointing_fraction={fraction} needs a model whose transformer blocks can be "
                               f"checkpointed one by one (transformers' GradientCheckpointingLayer); {type(model).__name__} has "
                               "none. Remove the fraction to checkpoint the whole model.")
        chosen = checkpointed_blocks(len(blocks), fraction)
        for i, block in enumerate(blocks):
            block.gradient_checkpointing = i in chosen


def checkpointed_blocks(n: int, fraction: float) -> set[int]:
    """The indices of the ``round(fraction·n)`` blocks (at least one) that recompute, evenly spaced from block 0."""
    k = min(n, max(1, round(fraction * n)))
    return {(i * n) // k for i in range(k)}


def make_method(cfg, task: str, target_modules: list[str], *, accelerator=None, device=None, train_batches=None, compute_loss=None,
                run_dir: Optional[Path] = None, log: Optional[logging.Logger] = None, model_info=None,
                total_steps: Optional[int] = None):
    """An instance of ``cfg.method`` with its context (nothing applied yet)."""

    ctx = MethodContext(cfg=cfg, task=task, target_modules=list(target_modules), accelerator=accelerator, device=device,
                        train_batches=train_batches, compute_loss=compute_loss, run_dir=run_dir,
                        log=log or logging.getLogger("peftlab"), model_info=model_info, total_steps=total_steps)
    return METHODS[cfg.method](ctx)


def apply_method(method, model: torch.nn.Module, structure: Optional[dict] = None) -> torch.nn.Module:
    """Apply ``method`` with the adapter-init seed ``training.seed + 1``; with ``structure``,
    rebuild that recorded structure and skip data-dependent phases."""
    torch.manual_seed(method.cfg.training.seed + 1)  # adapter init independent of how many draws the base model took
    if structure is None:
        return method.apply(model)
    return method.apply(model, structure=structure)


# ----------------------------------------------------------------------------- the builder
def build(cfg, *, task: Optional[str] = None, num_labels: Optional[int] = None, data: bool = True,
          structure: Optional[dict] = None, optimizer: bool = True, accelerator=None, device=None,
          run_dir: Optional[Path] = None, log: Optional[logging.Logger] = None,
          train_batches: Optional[Callable[[], Iterable[dict]]] = None) -> Built:
    """Build a run from its configuration.

    Args:
        cfg: the resolved RunConfig.
        task, num_labels: needed when ``data=False`` (a run directory records them); with
            data they come from the dataset.
        data: load and tokenize the dataset (train/val sets, step plan). Without data, a method
            with a data-dependent phase (BA-LoRA) needs ``structure``.
        structure: a method structure record (``method.json``); rebuilds exactly it.
        optimizer: also build the optimizer and LR scheduler (needs ``data`` for the step count).
        accelerator: the run's ``accelerate.Accelerator`` (device, processes, autocast).
        device: where the model goes when there is no accelerator (default CPU).
        run_dir: the run directory, for method files (allocation.json ...).
        log: logger for progress messages (default ``peftlab``, silent unless configured).
        train_batches: override of the importance-phase batches (default: epoch 0's order).
    """

    log = log or logging.getLogger("peftlab")
    t = cfg.training
    acc = accelerator
    rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
    dev = acc.device if acc is not None else torch.device(device or "cpu")
    torch.manual_seed(t.seed)
    raw = None
    if data:
        with acc.main_process_first() if acc is not None else contextlib.nullcontext():
            raw = load_raw(cfg)
        task, num_labels = resolve_task(cfg, raw)
        best_metric(cfg, task)  # rejects a best_metric the task cannot compute, before the model is built
        for k, v in raw.info.items():
            log.info(f"data {k}: {v}")
    elif task is None:
        raise ValueError("build(data=False) needs the task (causal_lm or classification)")
    bdt = base_dtype(cfg, dev)  # a contradictory model.base_dtype fails here, before the model is built
    model, tokenizer, info = build_base(cfg, task, num_labels, device=dev if bdt is not None else None)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg.model.gradient_checkpointing_fraction, cfg.model.gradient_checkpointing_reentrant)
    log.info(f"model {info.name} ({info.model_type}, {info.num_params:,} parameters, {info.source}); targets {info.target_modules}")
    built = Built(cfg=cfg, task=task, num_labels=num_labels, model=model, tokenizer=tokenizer, model_info=info, method=None, raw=raw)
    if data:
        built.train_ds, built.val_ds, built.collate = build_datasets(raw, tokenizer, cfg, model=model)
        log.info(f"data: {len(built.train_ds):,} training and {len(built.val_ds):,} validation {'blocks' if task == 'causal_lm' else 'examples'}")
        built.plan = step_plan(len(built.train_ds), cfg, world)
        if t.group_by_length:
            built.train_lengths = grouping_lengths(built.train_ds, t, world, log)

    def compute_loss(mdl, batch: dict) -> torch.Tensor:
        with acc.autocast() if acc is not None else contextlib.nullcontext():
            return mdl(**batch).loss

    if train_batches is None and data:

        def train_batches():
            """Training micro-batches in a fixed order (epoch 0's order), for pre-training phases."""
            for idx in EpochBatches(len(built.train_ds), t.batch_size, t.seed, rank, world, lengths=built.train_lengths).epoch(0):
                b = built.collate([built.train_ds[i] for i in idx])
                yield {k: v.to(dev) for k, v in b.items()}

    method = make_method(cfg, task, info.target_modules, accelerator=acc, device=dev, train_batches=train_batches,
                         compute_loss=compute_loss, run_dir=run_dir, log=log, model_info=info,
                         total_steps=built.plan.total_steps if built.plan is not None else None)
    model = apply_method(method, model, structure)
    if cfg.model.quantization != "none":
        n = trainable_to_float32(model)  # adapters/heads train in fp32 on a base loaded in compute_dtype; nothing frozen is upcast
        log.info(f"model.quantization={cfg.model.quantization}: frozen base {describe_quant(cfg)}; {n} trainable tensor(s) cast to float32")
    elif bdt is not None:
        n = trainable_to_float32(model)
        log.info(f"model.base_dtype: frozen base stored in {bdt} on {dev}" + (f", {n} trainable tensor(s) kept in float32" if n else ""))
    model.to(dev)
    built.model, built.method = model, method
    if optimizer:
        if built.plan is None:
            raise ValueError("build(optimizer=True) needs data=True (the schedule depends on the step count)")

        built.optimizer = method.build_optimizer(model)
        built.scheduler = build_scheduler(built.optimizer, built.plan.total_steps, t)
    return built


__all__ = ["Built", "StepPlan", "build", "build_base", "base_dtype", "trainable_to_float32", "build_bare_base", "task_from_names", "make_method", "apply_method", "resolve_task", "best_metric",
           "step_plan", "count_optimizer_steps", "load_tokenizer"]
