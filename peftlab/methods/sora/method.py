"""SoRA and SDoRA: LoRA / DoRA with a sparse gate per rank, trained by proximal steps.

SoRA (Ding et al., 2023): ΔW = s · B diag(g) A, g ∈ R^r. After the ordinary AdamW step
of everything else, the gate takes its own Adam step on the gradient of the loss and is
then soft-thresholded (the proximal operator of λ‖g‖₁)::

    g ← Adam_η(g, ∂L/∂g)            η: the gate learning rate at this step
    g ← sign(g) · max(|g| − λ η, 0)  (λ η: ``sora.multiply_lr``; λ alone reproduces the public code)

so entries become exactly zero. A rank whose gate is zero is dead: after training it is
removed, the gate is folded into B (B' = B[:, kept] · diag(g[kept])), and the result is a
plain HF PEFT LoRA (or DoRA) adapter with per-module ``rank_pattern`` / ``alpha_pattern``.

SDoRA: the same gate inside DoRA (W' = m ⊙ (W + s B diag(g) A) / ‖W + s B diag(g) A‖_row);
the row norm is computed from Gram terms (:func:`~peftlab.methods.sora.layers.dora_row_norm`)
instead of the dense d_out × d_in matrix.

Loop hooks (see :mod:`peftlab.methods.base`): gates are excluded from AdamW; their gradient
(unscaled in ``before_clip`` under fp16, clipped together with all other gradients) drives
the gate Adam + threshold in ``after_optimizer_step``; ``after_zero_grad`` clears the gate gradients
(the loop's ``zero_grad`` only clears what AdamW holds), skipped fp16 steps included. The gate optimizer's moments, step
counts and the λ-schedule position are in :meth:`SoRA.state_dict` (plain tensors and ints).
With ``sora.fast_path`` (``auto``: on CUDA) the gate step runs as one flat update over all
gates on the device, without host synchronisation (:mod:`peftlab.methods.sora.fast`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from ...errors import PeftlabError
from ...io import write_json
from ...models.quant import float_weight
from ...options import opt
from ..lora import LoRA, LoraSection, lora_layers
from .fast import FlatGateStep, use_fast_path
from .layers import GatedDoraLayer, GatedLoraA, reference_threshold_, soft_threshold_

ADAPTER = "default"
_PEFT_PREFIX = "base_model.model."


@dataclass
class SoraSection:
    lambda_: float = opt(0.1, "Sparsity strength λ of the proximal gate step (seed values 0.1, 0.3, 0.5); also spelled `lambda` (--sora.lambda=0.3). Threshold per step is λ·η_gate (λ alone with multiply_lr=false).",
                         aliases=("lambda",))
    lambda_schedule: Literal["none", "linear", "log_linear", "exp_linear"] = opt("none", "Dense-to-sparse schedule: λ takes lambda_num values from lambda_ to max_lambda, moving on every lambda_interval optimizer steps (linear, log_linear = log(linspace(e^a, e^b)), exp_linear = geometric).")
    max_lambda: Optional[float] = opt(None, "Last λ of the schedule (required when lambda_schedule is not none).")
    lambda_num: int = opt(10, "Number of λ values in the schedule.")
    lambda_interval: int = opt(0, "Optimizer steps spent at each λ value of the schedule (required when lambda_schedule is not none).")
    gate_lr: Optional[float] = opt(None, "Peak learning rate of the gate optimizer (default: training.learning_rate); it follows the same warmup/decay schedule.")
    gate_init: Literal["normal", "ones"] = opt("normal", "Gate initialisation: normal = N(0, 1) as in the public SoRA code; ones = start exactly at LoRA.")
    multiply_lr: bool = opt(True, "Threshold λ·η_gate (a true proximal step); false thresholds by λ itself every step, like the public code's sparse_optimizer.py.")
    reference_threshold: bool = opt(False, "Reproduce the public code's in-place sequential thresholding, which also zeroes entries in (ξ, 2ξ). Off = true soft-thresholding.")
    l1_weight: float = opt(0.0, "Weight of an optional L1 term l1_weight · Σ|g| / (number of gate entries) added to the loss (the public code's sparse_lambda).")
    prune_threshold: float = opt(1e-6, "A gate entry counts as pruned when |g| < prune_threshold (sparsity, effective parameters, export).")
    fast_path: Literal["auto", "on", "off"] = opt(
        "auto", "GPU path: all gates in one flat Adam + threshold step on the device with no host synchronisation "
        "(non-finite gate gradients are counted there and reported at the next log step), one-tensor L1 term and fp16 "
        "unscale, and SDoRA's constant ||W0||² per row cached. auto = on CUDA, off on CPU (CPU numbers unchanged); on; off. "
        "Same function either way.")

    def validate(self) -> list[str]:
        p = []
        if not self.lambda_ >= 0:
            p.append(f"`sora.lambda` must be >= 0, got {self.lambda_}.")
        if self.max_lambda is not None and not self.max_lambda >= 0:
            p.append(f"`sora.max_lambda` must be >= 0, got {self.max_lambda}.")
        if self.lambda_num < 2:
            p.append(f"`sora.lambda_num` must be at least 2, got {self.lambda_num}.")
        if self.lambda_interval < 0:
            p.append(f"`sora.lambda_interval` must be >= 0, got {self.lambda_interval}.")
        if self.gate_lr is not None and not self.gate_lr >= 0:
            p.append(f"`sora.gate_lr` must be >= 0 (or null for training.learning_rate), got {self.gate_lr}.")
        if not self.l1_weight >= 0:
            p.append(f"`sora.l1_weight` must be >= 0, got {self.l1_weight}.")
        if not self.prune_threshold > 0:
            p.append(f"`sora.prune_threshold` must be positive, got {self.prune_threshold}.")
        return p


def lambda_values(sc: SoraSection) -> list[float]:
    """The λ sequence of the schedule (a single value without one)."""
    a, b, n = sc.lambda_, sc.max_lambda, sc.lambda_num
    if sc.lambda_schedule == "none" or b is None:
        return [a]
    if sc.lambda_schedule == "linear":
        return [a + (b - a) * i / (n - 1) for i in range(n)]
    if sc.lambda_schedule == "log_linear":
        ea, eb = math.exp(a), math.exp(b)
        return [math.log(ea + (eb - ea) * i / (n - 1)) for i in range(n)]
    return [math.exp(math.log(a) + (math.log(b) - math.log(a)) * i / (n - 1)) for i in range(n)]


def readable_labels(names: list[str]) -> dict[str, str]:
    """Short unique column names: drop the dotted prefix all names share, keeping its last part.

    ``transformer.h.0.attn.c_attn`` -> ``h.0.attn.c_attn``;
    ``bert.encoder.layer.1.attention.self.query`` -> ``layer.1.attention.self.query``.
    """
    parts = [n.split(".") for n in names]
    if len(names) < 2:
        return {n: n for n in names}
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    cut = max(common - 1, 0)
    labels = {n: ".".join(p[cut:]) for n, p in zip(names, parts)}
    return labels if len(set(labels.values())) == len(names) else {n: n for n in names}


@dataclass
class GatedModule:
    """One adapted module: where it is, its gate and the shapes that price a rank."""

    name: str  # module name inside the base model (what peft target keys match)
    label: str  # readable column name for sparsity_log.csv
    param_name: str  # the gate's name in model.named_parameters()
    layer: Any  # the peft LoraLayer
    gate: torch.nn.Parameter
    d_in: int
    d_out: int

    @property
    def r(self) -> int:
        return self.gate.numel()


class SoRA(LoRA):
    """LoRA with a proximally trained gate per rank; exports a pruned plain LoRA."""

    name = "sora"
    config_sections = {"lora": LoraSection, "sora": SoraSection}
    exports_adapter = True
    use_dora = False
    wide_module_log = ("sparsity_log.csv", "sparsity")  # the seed's wide per-module file, beside module_metrics.csv
    display_name = "SoRA"
    table_rank = 30
    axis_keys = ("lora.r", "sora.lambda_")
    short_names = {"sora.lambda_": "λ"}
    sparsity_strength = "sora.lambda_"  # the analysis checks that a larger λ prunes more and costs quality (seed 003)

    def __init__(self, ctx):
        super().__init__(ctx)
        self.sc: SoraSection = self.cfg.sora
        self.lambdas = lambda_values(self.sc)
        self.gated: list[GatedModule] = []
        self.steps = 0  # gate steps taken (drives the λ schedule)
        self.adam: dict[str, dict[str, Any]] = {}  # param_name -> {"step", "exp_avg", "exp_avg_sq"}
        self._lr_ref = self.cfg.training.learning_rate  # peak lr of AdamW's first group (set by build_optimizer)
        self.fast = False  # sora.fast_path, decided in apply() from the device
        self._flat: Optional[FlatGateStep] = None  # built at the first fast gate step

    # --- configuration -------------------------------------------------------------
    @classmethod
    def budget_overrides(cls, cfg, lora_params: int, r: int):
        return {"lora.r": r}, f"starts at r={r}; gates prune ranks, so effective <= trainable"

    @classmethod
    def validate_config(cls, cfg) -> list[str]:
        sc, p = cfg.sora, super().validate_config(cfg)
        if sc.lambda_schedule != "none":
            if sc.max_lambda is None:
                p.append(f"`sora.lambda_schedule={sc.lambda_schedule}` needs `sora.max_lambda` (the last λ), e.g. --sora.max_lambda=0.5.")
            if sc.lambda_interval < 1:
                p.append(f"`sora.lambda_schedule={sc.lambda_schedule}` needs `sora.lambda_interval` >= 1 (optimizer steps per λ value), e.g. --sora.lambda_interval=100.")
            if sc.lambda_schedule == "exp_linear" and (sc.lambda_ <= 0 or (sc.max_lambda is not None and sc.max_lambda <= 0)):
                p.append("`sora.lambda_schedule=exp_linear` is geometric and needs `sora.lambda` and `sora.max_lambda` > 0; use linear to start from 0.")
        return p

    # --- model ---------------------------------------------------------------------
    def apply(self, model, structure=None):
        model = super().apply(model, structure)
        self.fast = use_fast_path(self.sc.fast_path, self.ctx.device)
        ids = {id(p): n for n, p in model.named_parameters()}
        layers = list(lora_layers(model))
        if not layers:
            raise PeftlabError("SoRA found no LoRA layers after applying peft; check model.target_modules.")
        names = [n[len(_PEFT_PREFIX):] if n.startswith(_PEFT_PREFIX) else n for n, _ in layers]
        labels = readable_labels(names)
        for (full, layer), name in zip(layers, names):
            A = layer.lora_A[ADAPTER]
            r = A.out_features
            gate = torch.randn(r) if self.sc.gate_init == "normal" else torch.ones(r)
            gated_A = GatedLoraA(A, gate)
            layer.lora_A[ADAPTER] = gated_A
            if self.use_dora:
                base_weight = float_weight(layer.get_base_layer()) if self.fast else None  # fast: cache ||W0||² per row
                layer.lora_magnitude_vector[ADAPTER] = GatedDoraLayer.from_dora(layer.lora_magnitude_vector[ADAPTER], base_weight)
            param_name = ids.get(id(A.weight), f"{full}.lora_A.{ADAPTER}.weight").rsplit(".", 1)[0] + ".gate"
            self.gated.append(GatedModule(name, labels[name], param_name, layer, gated_A.gate, A.in_features,
                                          layer.lora_B[ADAPTER].out_features))
        for g in self.gated:
            self.adam[g.param_name] = {"step": 0, "exp_avg": torch.zeros_like(g.gate.data), "exp_avg_sq": torch.zeros_like(g.gate.data)}
        if self.fast and self.ctx.log is not None:
            self.ctx.log.info(f"{self.name}: flat gate step on the device{', cached ||W0||² per row' if self.use_dora else ''} "
                              f"(sora.fast_path={self.sc.fast_path})")
        if structure is not None and "ranks" in structure and set(structure["ranks"]) != {g.name for g in self.gated}:
            raise PeftlabError(f"method.json records gates on {sorted(structure['ranks'])[:3]}..., but the config adapts "
                               f"{[g.name for g in self.gated][:3]}...; the run's config.json and checkpoint do not belong together.")
        return model

    def structure(self, model) -> dict[str, Any]:
        """Gated LoRA at rank ``lora.r`` on the adapted modules; the surviving (unpruned) ranks are
        recorded for readers, the gates themselves are weights of the checkpoint."""
        return {"method": self.name, "max_rank": self.cfg.lora.r, "prune_threshold": self.sc.prune_threshold,
                "ranks": self.ranks(),
                "kept_indices": {g.name: (~self._pruned(g)).nonzero().flatten().tolist() for g in self.gated}}

    @torch.no_grad()
    def compressible_state(self, model) -> dict[str, torch.Tensor]:
        """What the pruned, folded adapter holds: per gated module ``A[K]`` and ``B[:, K] diag(g[K])``
        over the surviving ranks ``K`` (gates folded into B, pruned ranks gone), plus every other
        trainable tensor (e.g. a classification head, DoRA magnitudes)."""
        out: dict[str, torch.Tensor] = {}
        skip: set[int] = set()
        for g in self.gated:
            keep = (~self._pruned(g)).nonzero().flatten()
            A = g.layer.lora_A[ADAPTER].weight
            B = g.layer.lora_B[ADAPTER].weight
            skip.update({id(A), id(B), id(g.gate)})
            out[f"{g.name}.lora_A.weight"] = A.detach()[keep].clone()
            out[f"{g.name}.lora_B.weight"] = (B.detach()[:, keep] * g.gate.detach()[keep].to(B.dtype)).clone()
        for n, p in self.trainable_parameters(model):
            if id(p) not in skip:
                out[n] = p.detach().clone()
        return out

    @torch.no_grad()
    def load_compressible_state(self, model, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`compressible_state` (used by ``peftlab bounds`` to score the
        quantized adapter): ``A[K]`` and the folded ``B[:, K]`` go back into the layers and the
        surviving gates become 1, so ``B diag(g) A`` is the decoded product; pruned ranks keep
        their zero gates."""
        done: set[str] = set()
        for g in self.gated:
            keep = (~self._pruned(g)).nonzero().flatten()
            A = g.layer.lora_A[ADAPTER].weight
            B = g.layer.lora_B[ADAPTER].weight
            ka, kb = f"{g.name}.lora_A.weight", f"{g.name}.lora_B.weight"
            A[keep] = state[ka].to(A.device, A.dtype)
            B[:, keep] = state[kb].to(B.device, B.dtype)
            g.gate[keep] = 1.0
            done.update((ka, kb))
        params = dict(model.named_parameters())
        for n, t in state.items():
            if n not in done:
                params[n].copy_(t.to(params[n].device, params[n].dtype))

    def _gate_ids(self) -> set[int]:
        return {id(g.gate) for g in self.gated}

    def param_groups(self, model):
        gates = self._gate_ids()
        groups = []
        for grp in super().param_groups(model):
            grp = dict(grp, params=[p for p in grp["params"] if id(p) not in gates])
            if grp["params"]:
                groups.append(grp)
        return groups

    # --- the gate optimizer --------------------------------------------------------
    @property
    def gate_lr(self) -> float:
        return self.cfg.training.learning_rate if self.sc.gate_lr is None else self.sc.gate_lr

    def lambda_index(self) -> int:
        """Position in the λ schedule (0 without one), derived from the gate steps taken."""
        if len(self.lambdas) == 1:
            return 0
        return min(self.steps // self.sc.lambda_interval, len(self.lambdas) - 1)

    def current_lambda(self) -> float:
        return self.lambdas[self.lambda_index()]

    def threshold(self, lr: float) -> float:
        """ξ of this step: λ·η_gate (proximal) or λ (public code's sparse_optimizer.py)."""
        lam = self.current_lambda()
        return lam * self._gate_step_size(lr) if self.sc.multiply_lr else lam

    def _gate_step_size(self, lr: float) -> float:
        # ``lr`` is the scheduler's lr of AdamW's first group; rescale it from that group's
        # peak lr (training.learning_rate unless LoRA+ scaled the group) to the gate's peak lr
        return self.gate_lr * lr / self._lr_ref

    def build_optimizer(self, model):
        opt = super().build_optimizer(model)
        self._lr_ref = float(opt.param_groups[0]["lr"])
        return opt

    def after_zero_grad(self, model) -> None:
        # The gates are not AdamW's parameters, so optimizer.zero_grad() does not clear their
        # gradients; a step the fp16 grad scaler skips (inf/nan gradients) calls no other hook, and
        # its inf/nan gate gradients would then reach the next gate step.
        self.clear_gate_grads()

    def clear_gate_grads(self) -> None:
        for g in self.gated:
            g.gate.grad = None

    def loss_extra(self, model):
        if self.sc.l1_weight <= 0 or not self.gated:
            return None
        if self.fast:  # one concatenated tensor instead of two kernels per gate
            total = torch.cat([g.gate.reshape(-1) for g in self.gated]).abs().sum()
        else:
            total = sum(g.gate.abs().sum() for g in self.gated)
        return self.sc.l1_weight * total / sum(g.r for g in self.gated)

    def before_clip(self, model) -> None:
        # Under fp16 the loop unscales only the gradients AdamW holds; unscale the gates' here.
        acc = self.ctx.accelerator
        scaler = getattr(acc, "scaler", None) if acc is not None else None
        if scaler is not None and scaler.is_enabled():
            grads = [g.gate.grad for g in self.gated if g.gate.grad is not None]
            scale = getattr(scaler, "_get_scale_async", None)
            scale = scale() if self.fast and scale is not None else None
            if scale is not None and grads:  # the scale stays on the device: no host read per step
                torch._foreach_mul_(grads, scale.double().reciprocal().to(grads[0].dtype))
                return
            inv = 1.0 / scaler.get_scale()
            for g in self.gated:
                if g.gate.grad is not None:
                    g.gate.grad.mul_(inv)

    @torch.no_grad()
    def after_optimizer_step(self, model, lr: float) -> None:
        acc = self.ctx.accelerator
        skipped = bool(getattr(acc, "optimizer_step_was_skipped", False)) if acc is not None else False
        if not skipped:
            t = self.cfg.training
            b1, b2, eps = t.adam_beta1, t.adam_beta2, t.adam_epsilon
            eta = self._gate_step_size(lr)
            tau = self.threshold(lr)
            flat = self._flat_step()
            if flat is not None:
                flat.step(eta, tau, (b1, b2), eps, self.sc.reference_threshold)
                self.steps += 1
                self.clear_gate_grads()
                return
            shrink = reference_threshold_ if self.sc.reference_threshold else soft_threshold_
            for g in self.gated:
                p, grad = g.gate, g.gate.grad
                if grad is None:  # the module took no part in this step
                    continue
                if not bool(torch.isfinite(grad).all()):  # an overflow AdamW's grads escaped: never into the moments
                    if self.ctx.log is not None:
                        self.ctx.log.warning(f"step {self.steps + 1}: non-finite gate gradient in {g.name}; its gate step is skipped")
                    continue
                st = self.adam[g.param_name]
                if st["exp_avg"].device != p.device:  # created before the model moved to its device
                    st["exp_avg"], st["exp_avg_sq"] = st["exp_avg"].to(p.device), st["exp_avg_sq"].to(p.device)
                st["step"] += 1
                k = st["step"]
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = (v / (1 - b2 ** k)).sqrt_().add_(eps)
                p.addcdiv_(m, denom, value=-eta / (1 - b1 ** k))
                shrink(p.data, tau)
            self.steps += 1
        self.clear_gate_grads()

    def _flat_step(self) -> Optional[FlatGateStep]:
        """The flat gate step of the fast path (None: per-gate step), rebuilt if the gates moved."""
        if not self.fast:
            return None
        gates = [g.gate for g in self.gated]
        if self._flat is not None and self._flat.matches(gates):
            return self._flat
        if not FlatGateStep.supports(gates):
            return None
        if self._flat is not None:  # e.g. the model moved: carry the step counts over
            self._flat.sync_steps()
        self._flat = FlatGateStep(gates, [self.adam[g.param_name] for g in self.gated])
        return self._flat

    # --- metrics -------------------------------------------------------------------
    def _pruned(self, g: GatedModule) -> torch.Tensor:
        return g.gate.detach().abs() < self.sc.prune_threshold

    def step_metrics(self, model) -> dict[str, float]:
        if self._flat is not None:  # the fast path counts non-finite gate gradients on the device
            skipped = self._flat.read_skipped()
            if skipped and self.ctx.log is not None:
                for g, n in zip(self.gated, skipped):
                    if n:
                        self.ctx.log.warning(f"up to step {self.steps}: non-finite gate gradient in {g.name} on {n} step(s) "
                                             "since the last log; those gate steps were skipped")
        counts = torch.stack([self._pruned(g).sum() for g in self.gated]).sum().item() if self.gated else 0
        total = sum(g.r for g in self.gated)
        return {"sparsity": counts / max(total, 1), "lambda": float(self.current_lambda())}

    def progress_fields(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"sparsity": f"{metrics['sparsity']:.3f}"} if "sparsity" in metrics else {}

    def module_metrics(self, model) -> dict[str, dict[str, float]]:
        fr = torch.stack([self._pruned(g).float().mean() for g in self.gated]).tolist()
        return {g.label: {"sparsity": f} for g, f in zip(self.gated, fr)}

    def ranks(self) -> dict[str, int]:
        """Surviving rank of every adapted module (base-model module name -> r')."""
        return {g.name: int((~self._pruned(g)).sum().item()) for g in self.gated}

    def param_counts(self, model) -> tuple[int, int]:
        """(trainable, effective): effective is what the pruned, folded adapter holds.

        Every pruned rank frees one column of B and one row of A, i.e. d_in + d_out
        parameters of its own module (not 2·hidden as the public code assumes); the gate
        entries themselves disappear when folded into B. A module pruned to rank 0 that the
        export keeps with one inert rank (DoRA magnitude, trained bias) still holds that rank.
        """
        trainable = sum(p.numel() for _, p in self.trainable_parameters(model))
        freed = 0
        inert = self._inert_modules(model)
        for g in self.gated:
            pruned = int(self._pruned(g).sum().item())
            if pruned == g.r and g.name in inert:
                pruned -= 1
            freed += g.r + pruned * (g.d_in + g.d_out)
        return trainable, trainable - freed

    def _inert_modules(self, model) -> set[str]:
        """Modules pruned to rank 0 that the export keeps with one inert rank instead of dropping them:
        all of them when DoRA's trained magnitude still rescales W or a trained bias (lora.bias
        lora_only/all) still shifts it; else, when every module is pruned but the model has a trained
        head (modules_to_save, classification), the first one, so that the adapter still carries the head."""
        empty = [g.name for g in self.gated if bool(self._pruned(g).all())]
        if self.use_dora or self.cfg.lora.bias != "none":
            return set(empty)
        peft_cfg = getattr(model, "peft_config", {}).get(ADAPTER)
        if empty and len(empty) == len(self.gated) and getattr(peft_cfg, "modules_to_save", None):
            return {empty[0]}
        return set()

    # --- state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._flat is not None:
            self._flat.sync_steps()
        return {
            "steps": self.steps,
            "lambda_index": self.lambda_index(),
            "adam": {n: {"step": s["step"], "exp_avg": s["exp_avg"].detach().cpu().clone(),
                         "exp_avg_sq": s["exp_avg_sq"].detach().cpu().clone()} for n, s in self.adam.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.adam) - set(state.get("adam", {})))
        if missing:
            raise PeftlabError(f"The checkpoint has no gate-optimizer state for {missing[:3]}; it was not saved by a "
                               f"{self.name} run with the same target modules. Resume with the original configuration.")
        self.steps = int(state["steps"])
        for n, s in self.adam.items():
            saved = state["adam"][n]
            s["step"] = int(saved["step"])
            s["exp_avg"].copy_(saved["exp_avg"])
            s["exp_avg_sq"].copy_(saved["exp_avg_sq"])
        if self._flat is not None:  # rebuilt from the loaded states at the next gate step
            self._flat = None

    # --- results -------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        ranks = self.ranks()
        total = sum(g.r for g in self.gated)
        return {
            "lambda": float(self.current_lambda()),
            "lambda_schedule": self.sc.lambda_schedule,
            "gate_steps": self.steps,
            "sparsity": 1 - sum(ranks.values()) / max(total, 1),
            "total_rank": sum(ranks.values()),
            "max_total_rank": total,
        }

    def allocation(self) -> dict[str, Any]:
        ranks = self.ranks()
        lc = self.cfg.lora
        return {
            "method": self.name,
            "max_rank": lc.r,
            "prune_threshold": self.sc.prune_threshold,
            "lambda": float(self.current_lambda()),
            "total_rank": sum(ranks.values()),
            "max_total_rank": sum(g.r for g in self.gated),
            "ranks": ranks,
            "labels": {g.name: g.label for g in self.gated},
            "kept_indices": {g.name: (~self._pruned(g)).nonzero().flatten().tolist() for g in self.gated},
            # the schema every allocation.json shares: method + modules{name: {rank, ...}}
            "modules": {g.name: {"rank": ranks[g.name], "max_rank": g.r, "label": g.label,
                                 "kept_indices": (~self._pruned(g)).nonzero().flatten().tolist()} for g in self.gated},
        }

    def export(self, model, out_dir: Path, tokenizer=None) -> Path:
        """Prune zero ranks, fold the gate into B and write a plain HF PEFT adapter.

        Module ``i`` keeps the ranks ``K_i = {k : |g_k| >= prune_threshold}``; it is written
        with ``A' = A[K_i]``, ``B' = B[:, K_i] · diag(g[K_i])``, ``rank_pattern = |K_i|`` and
        an ``alpha_pattern`` that keeps its scale s = α/r (α' = s·r', or s·√r' with rsLoRA),
        so B'A'·s equals B diag(g) A·s exactly. LoRA modules left with no rank are dropped
        from the targets. A DoRA module with no rank, or one whose bias was trained
        (``lora.bias`` lora_only/all), is kept with one all-zero rank, because its trained
        magnitude or bias still changes W (dropping it would change the outputs).
        Also writes ``out_dir/allocation.json``.
        """
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file


        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "allocation.json", self.allocation())
        target = out_dir / "adapter"
        gate_names = {g.param_name for g in self.gated}
        weights = {k: v for k, v in model.state_dict().items() if k not in gate_names}
        saved = get_peft_model_state_dict(model, state_dict=weights, adapter_name=ADAPTER)
        config = copy.deepcopy(model.peft_config[ADAPTER])
        lc = self.cfg.lora
        rank_pattern: dict[str, int] = {}
        alpha_pattern: dict[str, float] = {}
        targets: list[str] = []
        inert = self._inert_modules(model)
        with torch.no_grad():
            for g in self.gated:
                pre = f"{_PEFT_PREFIX}{g.name}."
                keep = (~self._pruned(g)).nonzero().flatten()
                A = g.layer.lora_A[ADAPTER].weight.detach()
                B = g.layer.lora_B[ADAPTER].weight.detach()
                a_key, b_key = f"{pre}lora_A.weight", f"{pre}lora_B.weight"
                if a_key not in saved or b_key not in saved:
                    raise PeftlabError(f"peft's saved state has no {a_key} / {b_key}; this peft version names adapter tensors differently.")
                r_new = keep.numel()
                if r_new == 0 and g.name not in inert:
                    for k in [k for k in saved if k.startswith(pre)]:
                        del saved[k]
                    continue
                if r_new == 0:  # DoRA magnitude, a trained bias or the head's carrier: keep one inert rank
                    A_new, B_new, r_new = torch.zeros_like(A[:1]), torch.zeros_like(B[:, :1]), 1
                else:
                    A_new = A[keep].clone()
                    B_new = (B[:, keep] * g.gate.detach()[keep].to(B.dtype)).clone()
                saved[a_key], saved[b_key] = A_new.contiguous(), B_new.contiguous()
                scale = g.layer.scaling[ADAPTER]
                alpha = scale * (math.sqrt(r_new) if lc.use_rslora else r_new)
                rank_pattern[g.name] = int(r_new)
                alpha_pattern[g.name] = int(alpha) if float(alpha).is_integer() else float(alpha)
                targets.append(g.name)
        if not targets:
            self.ctx.log.warning("every gate of the run is zero: no adapter left to export (see allocation.json)")
            return out_dir / "allocation.json"
        config.target_modules = targets
        config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern
        config.inference_mode = True
        target.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(target))
        # clone: with lora.bias=all peft's state holds a modules_to_save head's bias under two names
        # sharing memory, which safetensors refuses (peft's own save_pretrained clones them too)
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in saved.items()}, str(target / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(target)
        (target / "README.md").write_text(
            f"# {self.name} adapter exported by peftlab\n\nPruned ranks removed and gates folded into lora_B; "
            f"surviving ranks per module in ../allocation.json. Load with peft.PeftModel.from_pretrained.\n")
        return target


class SDoRA(SoRA):
    """SoRA's gates inside DoRA (``use_dora=True``); reads the ``lora`` and ``sora`` sections."""

    name = "sdora"
    use_dora = True
    display_name = "SDoRA"
    table_rank = 40
