"""The method plug-in interface.

A method turns a base model into what is trained, says which parameters the optimizer
sees, and may hook into the loop. The loop calls, in order, for every optimizer step::

    for each micro-batch:  forward -> backward          (method.loss_extra adds to the loss)
    method.before_clip(model)                          grads are complete (and unscaled)
    clip_grad_norm_ -> optimizer.step()
    method.after_optimizer_step(model, lr)             e.g. SoRA's proximal gate step
    scheduler.step(); optimizer.zero_grad()
    method.after_zero_grad(model)                      e.g. SoRA clears its gate gradients

Adding a method: one module under ``peftlab/methods`` with a subclass of
:class:`Method` (and its config section dataclass), plus one line in
``peftlab/methods/__init__.py``. See docs/adding-a-method.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Optional

import torch

from ..errors import PeftlabError
from ..optim.adamw import adamw_options


@dataclass
class MethodContext:
    """What a method may use while it prepares the model.

    Attributes:
        cfg: the resolved run configuration.
        task: ``causal_lm`` or ``classification``.
        target_modules: module names to adapt (architecture default or ``model.target_modules``).
        accelerator: the ``accelerate.Accelerator`` of the run.
        device: where the model runs (the accelerator's device, else the ``device`` the model was built for; CPU by
            default). Device-dependent choices (``lora.fused``, ``lora.dora_norm``, ``sora.fast_path``: ``auto`` is on
            for CUDA) read it, so that ``load_run(..., device="cuda")`` and ``peftlab profile`` on a GPU rebuild the
            implementation a run on that GPU trains with.
        train_batches: returns an iterator of training micro-batches already on the device
            (for methods that look at data before training, e.g. BA-LoRA's importance phase).
        compute_loss: ``compute_loss(model, batch) -> scalar loss``.
        run_dir: the run directory (for method-specific files such as allocation.json).
        log: the run's logger.
        total_steps: the optimizer steps the run takes (None when built without data), for
            methods whose schedule spans the run (AdaLoRA's rank budget).
    """

    cfg: Any
    task: str
    target_modules: list[str]
    accelerator: Any = None
    device: Any = None
    train_batches: Optional[Callable[[], Iterable[dict]]] = None
    compute_loss: Optional[Callable[[torch.nn.Module, dict], torch.Tensor]] = None
    run_dir: Optional[Path] = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("peftlab"))
    model_info: Any = None
    total_steps: Optional[int] = None

    def __post_init__(self):
        if self.device is None:
            self.device = self.accelerator.device if self.accelerator is not None else torch.device("cpu")
        self.device = torch.device(self.device)


class Method:
    """Base class: full-parameter AdamW behaviour, overridden piece by piece."""

    name: ClassVar[str] = ""
    #: the learning-rate range a divergence message suggests for this method
    typical_learning_rate: ClassVar[str] = "1e-4 to 1e-3"
    #: ``peftlab profile``: the method measured as the full-AdamW reference (one method sets it)
    profile_reference: ClassVar[bool] = False
    #: ``peftlab profile --ranks``: the config key of the rank this method is profiled at, one
    #: variant per rank (None: the method is not swept)
    profile_rank_key: ClassVar[Optional[str]] = None
    #: the config sections this method reads, name -> section dataclass; declared here, with the
    #: method (a section shared by several methods, e.g. ``lora``, is declared by each of them).
    #: Only these and the core sections are validated for, and decide the identity of, its runs.
    config_sections: ClassVar[dict[str, type]] = {}
    #: the names of ``config_sections`` (derived; kept for code that only needs the names)
    sections: ClassVar[tuple[str, ...]] = ()
    #: True when the result is an adapter in HF PEFT format
    exports_adapter: ClassVar[bool] = False
    #: trains on a frozen base that ``model.quantization`` may load quantized (bitsandbytes); methods
    #: that update the base weights themselves leave it False and are refused a quantized base
    quantized_base: ClassVar[bool] = False
    #: part of `peftlab compare`'s default set (False: only when asked for with --methods)
    compare_by_default: ClassVar[bool] = True
    #: ``system.sharding=fsdp`` (docs/training.md#sharding): how the trainable tensors live when the frozen base
    #: is sharded. ``shard``: FSDP2 shards them too (parameters, gradients and optimizer state split across the
    #: processes; hooks then see DTensors, so a method with hooks that read its tensors should not use it);
    #: ``replicate``: each process holds them whole, as plain tensors, and their gradients are all-reduced
    #: before :meth:`before_clip` (what adapters want: they are small and every hook sees ordinary tensors);
    #: None: the method is refused under sharding, with :attr:`sharding_refusal` as the reason.
    sharding: ClassVar[Optional[str]] = "shard"
    #: why the method is refused under ``system.sharding=fsdp`` (when :attr:`sharding` is None), one sentence
    sharding_refusal: ClassVar[str] = ""
    #: a wide per-module CSV kept for the seed plans: ``(file name, metric)`` writes
    #: ``epoch, step, overall_<metric>, <one column per module>`` beside module_metrics.csv
    wide_module_log: ClassVar[Optional[tuple[str, str]]] = None

    # --- what tables, plots and hypothesis checks know of the method (docs/analysis.md) ----
    # Generic code (analysis, compare) reads these instead of testing the method's name.
    #: how tables, plots and hypothesis texts write the method ("BA-LoRA"); a class that does not
    #: set its own gets its ``name``
    display_name: ClassVar[str] = ""
    #: place in every table, plot legend and ``peftlab compare`` (smaller first, see
    #: :func:`peftlab.methods.table_order`); None: after the ranked methods, alphabetically.
    #: Not inherited: a class that does not set its own is unranked.
    table_rank: ClassVar[Optional[int]] = None
    #: the config key of the method's size along a budget axis (group labels, memory and
    #: loss-per-rank plots); with several, the first the run has a value for is the size
    #: (BA-LoRA: its parameter budget, else its base rank). Empty: no size axis.
    size_axes: ClassVar[tuple[str, ...]] = ()
    #: the config key that is a rank (the x of the optimizer-memory-vs-rank plot), when one of its sizes is;
    #: None: the method has no rank (a parameter budget or an intrinsic dimension is not one)
    rank_axis: ClassVar[Optional[str]] = None
    #: config keys copied into the study table even when constant: the axes its plots are drawn along
    axis_keys: ClassVar[tuple[str, ...]] = ()
    #: short names of its config keys in labels and table heads (``{"lora.r": "r"}``); a key not
    #: listed is written without its section
    short_names: ClassVar[dict[str, str]] = {}
    #: config keys that name a variant of the method (an arm: one colour in every plot) rather than
    #: a size, in the order they are written in the arm's name; used only when they vary in a study
    variant_keys: ClassVar[tuple[str, ...]] = ()
    #: the allocation experiment of the subspace-allocation plots and hypotheses H1-H3: the config
    #: keys ``dim`` (subspace dimension), ``mode`` (allocation mode) and ``ratio`` (the fixed split),
    #: and the mode values ``uniform`` (the equal split), ``fixed`` and ``learned`` (gates)
    allocation_arms: ClassVar[Optional[dict[str, str]]] = None
    #: a method this one is compared with at an equal parameter budget, paired over seeds (H4)
    equal_budget_rival: ClassVar[Optional[str]] = None

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "config_sections" in cls.__dict__:
            cls.sections = tuple(cls.config_sections)
        if "display_name" not in cls.__dict__:
            cls.display_name = cls.name
        if "table_rank" not in cls.__dict__:
            cls.table_rank = None

    def __init__(self, ctx: MethodContext):
        self.ctx = ctx
        self.cfg = ctx.cfg

    # --- configuration -------------------------------------------------------------
    @classmethod
    def validate_config(cls, cfg) -> list[str]:
        """Problems with the run config that this method can see before any model exists."""
        return []

    @classmethod
    def budget_overrides(cls, cfg, lora_params: int, r: int) -> tuple[dict[str, Any], str]:
        """How this method matches the budget of LoRA at rank ``r`` (``lora_params`` adapter
        parameters) in ``peftlab compare``: dotted-key overrides and a one-line note."""
        return {}, "section defaults"

    @classmethod
    def budget_rank(cls, cfg) -> Optional[int]:
        """The rank of this method's budget when a study matches every run to it (``budget.match:
        <this method>``) without ``budget.r``: the rank it is known by in ``cfg`` (None: none)."""
        return cls.profile_info(cfg).get("rank")

    @classmethod
    def budget_params(cls, shapes: list[tuple[int, int]], r: int) -> int:
        """This method's parameter budget at rank ``r`` on adapted weights of these shapes, the count
        every method's :meth:`budget_overrides` receives when a study matches to it: by default a
        pair of rank-``r`` factors per weight, r * (d_in + d_out)."""
        return sum(r * (a + b) for a, b in shapes)

    @classmethod
    def profile_info(cls, cfg) -> dict[str, Any]:
        """What ``peftlab profile`` labels and assumes: ``rank`` (the rank the method is known by,
        or None), ``in_place`` (apply only flips requires_grad, so the base can be shared) and
        ``refresh_interval`` (optimizer steps between expensive refreshes, for amortised FLOPs)."""
        return {"rank": None, "in_place": False, "refresh_interval": 1}

    # --- model and optimizer -------------------------------------------------------
    def apply(self, model: torch.nn.Module, structure: Optional[dict] = None) -> torch.nn.Module:
        """Return the model to train (wrapped or modified in place).

        With ``structure`` (what :meth:`structure` recorded for a trained run), rebuild exactly
        that structure and skip every data-dependent phase: the weights come from a checkpoint.
        """
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def structure(self, model: torch.nn.Module) -> dict[str, Any]:
        """A JSON-serialisable record of everything :meth:`apply` needs to rebuild the adapted
        model without data (ranks, pruned ranks, projector seeds ...); written as ``method.json``
        in the run directory and in every checkpoint. Methods whose structure follows from the
        config alone record only their name."""
        return {"method": self.name}

    @classmethod
    def legacy_structure(cls, run_dir: Path) -> Optional[dict]:
        """The structure of a run written before ``method.json`` existed, from its other files
        (None: rebuild from the config alone)."""
        return None

    def check_structure(self, structure: Optional[dict]) -> None:
        """Reject a structure recorded by another method."""
        if structure is not None and structure.get("method", self.name) != self.name:

            raise PeftlabError(f"method.json was written by method {structure.get('method')!r}, but this run's method is "
                               f"{self.name!r}; the run directory's config.json and checkpoint do not belong together.")

    def replicated_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """``system.sharding=fsdp`` with :attr:`sharding` ``replicate``: the parameters FSDP must leave alone
        (whole on every process, plain tensors). By default the trainable ones; a method that substitutes
        other tensors of the model at each forward (``torch.func.functional_call``) lists those too."""
        return [p for _, p in self.trainable_parameters(model)]

    def trainable_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        """AdamW parameter groups; by default no weight decay on biases and norms."""
        t = self.cfg.training
        decay, no_decay = [], []
        for n, p in self.trainable_parameters(model):
            (no_decay if p.ndim < 2 else decay).append(p)
        groups = [{"params": decay, "weight_decay": t.weight_decay, "name": "decay"}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
        return [g for g in groups if g["params"]]

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        t = self.cfg.training
        groups = self.param_groups(model)
        return torch.optim.AdamW(
            groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
            **adamw_options(self.cfg.system.fused_optimizer, groups),
        )

    # --- loop hooks ----------------------------------------------------------------
    def loss_extra(self, model: torch.nn.Module) -> Optional[torch.Tensor]:
        """A regularisation term added to each micro-batch's loss (None: nothing)."""
        return None

    def before_clip(self, model: torch.nn.Module) -> None:
        """Gradients of the whole optimizer step are accumulated and unscaled."""

    def after_optimizer_step(self, model: torch.nn.Module, lr: float) -> None:
        """Right after ``optimizer.step()``, before the scheduler moves the learning rate."""

    def after_zero_grad(self, model: torch.nn.Module) -> None:
        """Right after the loop's ``optimizer.zero_grad()``, on every step, including one the fp16
        grad scaler skipped (which calls no other hook): clear gradients the optimizer does not hold."""

    # --- metrics -------------------------------------------------------------------
    def step_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        """Cheap scalars for the progress bar and loss_log.csv (e.g. ``sparsity``)."""
        return {}

    def progress_fields(self, metrics: dict[str, float]) -> dict[str, str]:
        """Extra fields for the progress bar, from this step's :meth:`step_metrics`."""
        return {}

    def module_metrics(self, model: torch.nn.Module) -> Optional[dict[str, dict[str, float]]]:
        """Per-module values ``{module: {metric: value}}`` for the long-format log
        ``module_metrics.csv`` (step, module, metric, value), written every ``log_steps``.
        None: the method has no per-module values."""
        return None

    def param_counts(self, model: torch.nn.Module) -> tuple[int, int]:
        """(trainable, effective) parameter counts."""
        n = sum(p.numel() for _, p in self.trainable_parameters(model))
        return n, n

    # --- state ---------------------------------------------------------------------
    def model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Tensors of the model that a checkpoint must hold to resume (trainable ones)."""
        return {n: p.detach().clone() for n, p in self.trainable_parameters(model)}

    def load_model_state(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        missing = [n for n, _ in self.trainable_parameters(model) if n not in state]
        if missing:
            raise RuntimeError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[:3]}")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)

    def compressible_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The tensors a compression bound must encode: what was learned, with everything that
        follows from the config and seed left out. Default: the trainable tensors of
        :meth:`model_state`."""
        return self.model_state(model)

    def scoring_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module a bound scores: one computing the same function as ``model`` whose forward
        pass a plain Hugging Face model (with peft layers) runs. Default: ``model`` itself."""
        return model

    def state_dict(self) -> dict[str, Any]:
        """Method-owned state (schedules, extra optimizers); plain tensors and numbers only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # --- results -------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Extra facts for results_final.json."""
        return {}

    def export(self, model: torch.nn.Module, out_dir: Path, tokenizer=None) -> Path:
        """Write the trained result under ``out_dir`` and return the path written."""
        target = out_dir / "model"
        model.save_pretrained(target, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(target)
        return target
