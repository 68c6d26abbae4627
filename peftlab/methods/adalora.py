"""AdaLoRA (Zhang et al., 2023) through Hugging Face ``peft``, with its budget schedule driven by the loop.

Each adapted weight gets an SVD-shaped update W + (alpha / r_t) P diag(E) Q, with P (d_out x r0),
E (r0 singular values), Q (r0 x d_in) and r_t the layer's current rank. Every optimizer step peft's
``RankAllocator`` smooths the sensitivity |theta * grad| of every adapter entry (EMAs with
``beta1``/``beta2``) and, on the cubic schedule from ``init_r`` per layer down to ``target_r`` per
layer on average (steps ``tinit`` .. ``total - tfinal``, every ``delta_t`` steps), zeroes the least
important singular values across all layers. An orthogonality penalty on P and Q
(``orth_reg_weight``) is added to the loss by peft's forward.

Users of plain peft have to call ``model.base_model.update_and_allocate(global_step)`` themselves
after ``optimizer.step()`` and before ``zero_grad()``; here :meth:`AdaLoRA.after_optimizer_step`
does it at exactly that point, with the method's own optimizer-step count (checkpointed with
the allocator's EMAs, so a resumed run allocates exactly as an uninterrupted one). The schedule
spans the run's own optimizer steps (``MethodContext.total_steps``).

Structure: the mask of kept singular values (peft's ``rank_pattern``) and the schedule length,
in ``method.json``; the exported adapter is resized to the kept ranks by peft's ``save_pretrained``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import PeftlabError
from ..models import check_targets
from ..options import opt
from .base import Method
from .lora import peft_task_type


@dataclass
class AdaloraSection:
    init_r: int = opt(12, "Rank every adapted weight starts with (r0).")
    target_r: int = opt(8, "Average rank per adapted weight at the end: the total budget is target_r x the number of adapted weights.")
    alpha: float = opt(16.0, "Scale of the update: alpha / (current rank of the layer).")
    dropout: float = opt(0.05, "Dropout on the adapter input.")
    tinit: int = opt(0, "Optimizer steps of initial warmup at the full budget before any pruning.")
    tfinal: int = opt(0, "Optimizer steps at the end with the final mask fixed (the budget reaches target_r at total - tfinal).")
    delta_t: int = opt(1, "Optimizer steps between two rank reallocations while the budget shrinks.")
    beta1: float = opt(0.85, "EMA coefficient of the sensitivity |theta * grad|.")
    beta2: float = opt(0.85, "EMA coefficient of the sensitivity's uncertainty.")
    orth_reg_weight: float = opt(0.5, "Weight of the orthogonality penalty ||P^T P - I||^2 + ||Q Q^T - I||^2 added to the loss.")

    def validate(self) -> list[str]:
        p = []
        if self.init_r < 1 or self.target_r < 1:
            p.append(f"`adalora.init_r` and `adalora.target_r` must be at least 1, got {self.init_r} and {self.target_r}.")
        elif self.target_r > self.init_r:
            p.append(f"`adalora.target_r={self.target_r}` is above `adalora.init_r={self.init_r}`: AdaLoRA only prunes ranks. "
                     f"Raise --adalora.init_r to at least {self.target_r} (the paper starts at 1.5x the target).")
        if not self.alpha > 0:
            p.append(f"`adalora.alpha` must be positive, got {self.alpha}.")
        if not 0 <= self.dropout < 1:
            p.append(f"`adalora.dropout` must be in [0, 1), got {self.dropout}.")
        if self.tinit < 0 or self.tfinal < 0 or self.delta_t < 1:
            p.append("`adalora.tinit` and `adalora.tfinal` must be >= 0 and `adalora.delta_t` >= 1.")
        for k in ("beta1", "beta2"):
            if not 0 < getattr(self, k) < 1:
                p.append(f"`adalora.{k}` must be in (0, 1), got {getattr(self, k)}.")
        if self.orth_reg_weight < 0:
            p.append(f"`adalora.orth_reg_weight` must be >= 0, got {self.orth_reg_weight}.")
        return p


def _svd_layers(model):
    from peft.tuners.adalora import AdaLoraLayer

    for name, mod in model.named_modules():
        if isinstance(mod, AdaLoraLayer) and "default" in mod.lora_E:
            yield name, mod


class AdaLoRA(Method):
    """peft's AdaLoRA: SVD-shaped adapters whose ranks shrink to a budget by importance."""

    name = "adalora"
    config_sections = {"adalora": AdaloraSection}
    exports_adapter = True
    display_name = "AdaLoRA"
    sharding = None
    sharding_refusal = ("peft's AdaLoRA allocator (update_and_allocate) reads and masks whole adapter tensors in place, which "
                        "it cannot do on FSDP's sharded tensors; train AdaLoRA with system.sharding=none")
    table_rank = 45  # the adaptive-rank baseline, beside SoRA/SDoRA and BA-LoRA
    size_axes = ("adalora.target_r",)
    rank_axis = "adalora.target_r"
    axis_keys = ("adalora.target_r",)
    short_names = {"adalora.target_r": "r", "adalora.init_r": "r0"}

    def __init__(self, ctx):
        super().__init__(ctx)
        self.steps = 0  # optimizer steps taken: the global_step of peft's budget schedule
        self.total: Optional[int] = None
        self.model = None

    # --- configuration -------------------------------------------------------------
    @classmethod
    def budget_overrides(cls, cfg, lora_params: int, r: int):
        r0 = max(r, math.ceil(1.5 * r))
        return ({"adalora.target_r": r, "adalora.init_r": r0},
                f"final average rank r={r} (+ one singular value per rank), starting from r0={r0}")

    @classmethod
    def profile_info(cls, cfg):
        return {"rank": cfg.adalora.target_r, "in_place": False, "refresh_interval": 1}

    @classmethod
    def budget_rank(cls, cfg) -> Optional[int]:
        return cfg.adalora.target_r

    # --- model ---------------------------------------------------------------------
    def _schedule_length(self, structure: Optional[dict]) -> int:
        ac = self.cfg.adalora
        total = (structure or {}).get("total_step") or self.ctx.total_steps
        if total is None:  # built without data and without a record (e.g. profile): any valid length
            total = ac.tinit + ac.tfinal + 1
        if ac.tinit >= total - ac.tfinal:
            raise PeftlabError(
                f"AdaLoRA's budget schedule needs adalora.tinit ({ac.tinit}) + adalora.tfinal ({ac.tfinal}) below the run's "
                f"{total} optimizer steps, or no rank is ever pruned. Lower --adalora.tinit / --adalora.tfinal, or train longer.")
        return int(total)

    def apply(self, model, structure=None):
        import warnings

        from peft import AdaLoraConfig, get_peft_model

        self.check_structure(structure)
        ac = self.cfg.adalora
        check_targets(model, self.ctx.target_modules)
        self.total = self._schedule_length(structure)
        config = AdaLoraConfig(
            init_r=ac.init_r, target_r=ac.target_r, lora_alpha=ac.alpha, lora_dropout=ac.dropout,
            tinit=ac.tinit, tfinal=ac.tfinal, deltaT=ac.delta_t, beta1=ac.beta1, beta2=ac.beta2,
            orth_reg_weight=ac.orth_reg_weight, total_step=self.total,
            target_modules=list(self.ctx.target_modules), task_type=peft_task_type(self.ctx.task),
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            try:
                model = get_peft_model(model, config)
            except ValueError as e:
                raise PeftlabError(f"peft cannot adapt target_modules={self.ctx.target_modules} with AdaLoRA: "
                                   f"{str(e).splitlines()[0]} Point --model.target_modules at linear (or GPT-2 Conv1D) layers.") from None
        pattern = (structure or {}).get("rank_pattern")
        if pattern:
            model.peft_config["default"].rank_pattern = {k: list(v) for k, v in pattern.items()}
        self.model = model
        return model

    def structure(self, model) -> dict:
        pattern = model.peft_config["default"].rank_pattern if hasattr(model, "peft_config") else None
        return {"method": self.name, "total_step": self.total,
                "rank_pattern": {k: [bool(x) for x in v] for k, v in sorted(pattern.items())} if pattern else None}

    # --- loop hooks ----------------------------------------------------------------
    def after_optimizer_step(self, model, lr: float) -> None:
        # peft: after optimizer.step(), before zero_grad() (the sensitivities read this step's gradients)
        self.steps += 1
        model.base_model.update_and_allocate(self.steps)

    def ranks(self, model) -> dict[str, int]:
        """The current rank (kept singular values) of every adapted module."""
        return {n: int((m.lora_E["default"] != 0).sum()) for n, m in _svd_layers(model)}

    def step_metrics(self, model) -> dict[str, float]:
        r = self.ranks(model)
        return {"mean_rank": sum(r.values()) / max(len(r), 1)}

    def progress_fields(self, metrics):
        return {"r": f"{metrics['mean_rank']:.1f}"} if "mean_rank" in metrics else {}

    def module_metrics(self, model):
        return {n: {"rank": float(r)} for n, r in self.ranks(model).items()}

    def param_counts(self, model) -> tuple[int, int]:
        trainable = sum(p.numel() for _, p in self.trainable_parameters(model))
        frozen_extra = trainable - sum(m.lora_A["default"].numel() + m.lora_B["default"].numel() + m.lora_E["default"].numel()
                                       for _, m in _svd_layers(model))
        kept = sum(int((m.lora_E["default"] != 0).sum()) * (m.lora_A["default"].shape[1] + m.lora_B["default"].shape[0] + 1)
                   for _, m in _svd_layers(model))
        return trainable, kept + frozen_extra  # effective: the kept triplets (P column, E, Q row) + heads/biases

    # --- state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        alloc = getattr(getattr(self.model, "base_model", None), "rankallocator", None)
        out: dict[str, Any] = {"steps": self.steps}
        if alloc is not None:
            for k in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
                out[k] = {n: t.detach().clone() for n, t in getattr(alloc, k).items()}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        alloc = getattr(getattr(self.model, "base_model", None), "rankallocator", None)
        if alloc is not None:
            for k in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
                if k in state:
                    dev = {n: p.device for n, p in self.model.base_model.model.named_parameters()}
                    setattr(alloc, k, {n: t.to(dev.get(n, t.device)) for n, t in state[k].items()})

    def summary(self) -> dict[str, Any]:
        return {"adalora_ranks": self.ranks(self.model)} if self.model is not None else {}

    def export(self, model, out_dir: Path, tokenizer=None) -> Path:
        target = out_dir / "adapter"
        model.save_pretrained(target, safe_serialization=True)  # resized to the kept ranks (rank_pattern)
        if tokenizer is not None:
            tokenizer.save_pretrained(target)
        return target
