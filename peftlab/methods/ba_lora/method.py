"""BA-LoRA: budget-aware LoRA ranks from gradient importance, with an optional warm start.

``apply`` runs four phases before training (seed 002; closest published method: GoRA, He et
al. 2025, arXiv:2502.12171; math in :mod:`peftlab.methods.ba_lora.alloc`, docs/ba_lora.md):

1. importance: average the loss gradient of every target weight over ``gradient_samples``
   training examples (no optimizer step; all-reduced across processes) and score each module;
2. allocation: integer ranks in [min_rank, max_rank], proportional to importance, whose LoRA
   parameter count sum_m r_m (d_in_m + d_out_m) is the largest the budget allows;
3. warm start (``use_warmstart``): A, B from the averaged gradient so that the adapter's initial
   update is a descent step of chosen size along -G (otherwise standard LoRA init);
4. LoRA via peft with a per-module ``rank_pattern`` (and ``alpha_pattern``), trained as usual.

The result is an ordinary peft adapter; allocation.json in the run directory (and
``method_summary`` in results_final.json) records every module's importance and rank.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from ...checkpoints import resolve
from ...errors import PeftlabError
from ...io import write_json
from ...models import check_targets
from ...models.quant import float_weight
from ...options import opt
from ..lora import LoRA, LoraSection, lora_layers
from .alloc import allocate_ranks, check_budget, feasible_budget_range, importance_score, uniform_rank, warm_start_factors


@dataclass
class BaLoraSection:
    param_budget: Optional[int] = opt(None, "LoRA A/B parameter budget sum_m r_m*(d_in_m + d_out_m) (heads and biases not counted); default: base_rank * sum_m (d_in_m + d_out_m), what uniform LoRA at rank base_rank holds.")
    base_rank: int = opt(8, "Reference rank: sets the budget when param_budget is unset, and the default max_rank (4 * base_rank).")
    gradient_samples: int = opt(1000, "Training examples whose gradients are averaged in phase 1 (rounded up to whole batches; all of them if the training set is smaller).")
    min_rank: int = opt(1, "Smallest rank of any module.")
    max_rank: Optional[int] = opt(None, "Largest rank of any module (default 4 * base_rank, as in GoRA); never above min(d_in, d_out).")
    importance: Literal["weight_grad", "grad_norm"] = opt("weight_grad", "Module score: weight_grad = mean |W * G| (GoRA), grad_norm = ||G||_F.")
    uniform_ranks: bool = opt(False, "Ablation: the same budget spread as one uniform rank (floor(budget / sum(d_in + d_out))).")
    use_warmstart: bool = opt(False, "Initialise A, B from the averaged gradient (phase 3) instead of standard LoRA init.")
    warmstart_init: Literal["svd", "pinv"] = opt("svd", "svd: A = top-r right singular vectors of G (best rank-r step); pinv: peft's random A, B = -G A^+ (GoRA).")
    warmstart_step: Optional[float] = opt(None, "Size eta of the gradient step the initial update matches (default: training.learning_rate).")
    warmstart_match: Literal["norm", "projection"] = opt("norm", "norm: ||s B A||_F = eta ||G||_F (a full step's size); projection: s B A = -eta * (rank-r part of G).")
    warmstart_eps: float = opt(1e-6, "Relative ridge of the pseudo-inverse A^+ = A^T (A A^T + eps * tr(A A^T)/r * I)^-1.")
    alpha_mode: Literal["constant_scale", "constant_alpha"] = opt("constant_scale", "constant_scale: every module keeps lora.alpha / lora.r as its scale (alpha_pattern); constant_alpha: alpha = lora.alpha everywhere, scale alpha / r_m.")

    def validate(self) -> list[str]:
        p = []
        if self.param_budget is not None and self.param_budget < 1:
            p.append(f"`ba_lora.param_budget` must be a positive number of parameters, got {self.param_budget}.")
        if self.base_rank < 1:
            p.append(f"`ba_lora.base_rank` must be at least 1, got {self.base_rank}.")
        if self.gradient_samples < 1:
            p.append(f"`ba_lora.gradient_samples` must be at least 1, got {self.gradient_samples}.")
        if self.min_rank < 1:
            p.append(f"`ba_lora.min_rank` must be at least 1 (every target module gets an adapter), got {self.min_rank}.")
        max_rank = self.max_rank if self.max_rank is not None else 4 * self.base_rank
        if self.min_rank >= 1 and max_rank < self.min_rank:
            what = "`ba_lora.max_rank`" if self.max_rank is not None else "the default max_rank 4 * base_rank"
            p.append(f"{what} ({max_rank}) is below `ba_lora.min_rank` ({self.min_rank}); raise max_rank or lower min_rank.")
        if self.warmstart_step is not None and not self.warmstart_step > 0:
            p.append(f"`ba_lora.warmstart_step` must be positive, got {self.warmstart_step}.")
        if not self.warmstart_eps > 0:
            p.append(f"`ba_lora.warmstart_eps` must be positive, got {self.warmstart_eps}.")
        return p


@contextlib.contextmanager
def _hooked_weight_grads(targets: dict):
    """dL/dW of frozen linear layers whose weights cannot require grad (bitsandbytes): for each
    forward, grad_out^T @ x summed over tokens -- what autograd gives an ``nn.Linear`` weight,
    (d_out, d_in) -- accumulated per module over the backward passes while the context is open.
    A zero scalar leaf added to the output puts the layer on the autograd graph. Yields the
    accumulators (module name -> float32 sum)."""
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name):
        def forward_hook(module, args, out):
            if not torch.is_grad_enabled():  # e.g. the first pass of a checkpointed block: the recompute counts
                return out
            x = args[0].detach()
            out = out + torch.zeros((), device=out.device, dtype=out.dtype, requires_grad=True)

            def on_grad(g):
                gw = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                sums[name] = sums[name] + gw if name in sums else gw

            out.register_hook(on_grad)
            return out

        return forward_hook

    for name, t in targets.items():
        handles.append(t.module.register_forward_hook(hook_for(name)))
    try:
        yield sums
    finally:
        for h in handles:
            h.remove()


@dataclass
class _Target:
    module: torch.nn.Module
    d_in: int
    d_out: int
    conv1d: bool  # GPT-2's Conv1D stores its weight as (d_in, d_out)

    @property
    def cost(self) -> int:
        return self.d_in + self.d_out


class BALoRA(LoRA):
    """LoRA with per-module ranks allocated from gradient importance under a parameter budget."""

    name = "ba_lora"
    config_sections = {"lora": LoraSection, "ba_lora": BaLoraSection}
    use_dora = False
    display_name = "BA-LoRA"
    table_rank = 50
    size_axes = ("ba_lora.param_budget", "ba_lora.base_rank")  # no budget: base_rank x LoRA's per-rank size
    rank_axis = "ba_lora.base_rank"  # the rank it starts from (its budget is a parameter count)
    axis_keys = ("ba_lora.param_budget", "ba_lora.base_rank")
    short_names = {"ba_lora.param_budget": "budget"}
    variant_keys = ("ba_lora.uniform_ranks", "ba_lora.use_warmstart", "ba_lora.warmstart_init")
    equal_budget_rival = "lora"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.allocation: Optional[dict] = None
        self._ranks: dict[str, int] = {}

    #: examples whose gradients rank the layers in `peftlab compare` (a quarter epoch of its demo is enough)
    compare_gradient_samples = 256

    @classmethod
    def budget_overrides(cls, cfg, lora_params: int, r: int):
        return ({"ba_lora.param_budget": lora_params, "ba_lora.gradient_samples": cls.compare_gradient_samples},
                f"budget = LoRA's {lora_params:,} adapter parameters; ranks from {cls.compare_gradient_samples} examples' gradients")

    @classmethod
    def profile_info(cls, cfg):
        return {"rank": cfg.ba_lora.base_rank, "in_place": False, "refresh_interval": 1}

    def structure(self, model) -> dict:
        """The allocated rank and alpha of every adapted module: with them, :meth:`apply` rebuilds
        the adapter without the importance phase (phases 1-3 are data-dependent)."""
        return {"method": self.name, "ranks": dict(self._ranks), "alphas": {n: self._alpha(r) for n, r in self._ranks.items()},
                "use_warmstart": self.cfg.ba_lora.use_warmstart}

    @classmethod
    def legacy_structure(cls, run_dir):
        path = run_dir / "allocation.json"
        if not path.is_file():
            return None
        return {"method": cls.name, "ranks": {n: int(m["rank"]) for n, m in json.loads(path.read_text())["modules"].items()}}

    # ------------------------------------------------------------------ apply
    def apply(self, model, structure=None):
        self.check_structure(structure)
        ba, log = self.cfg.ba_lora, self.ctx.log
        check_targets(model, self.ctx.target_modules)
        targets = self._targets(model)
        names = list(targets)
        costs = [targets[n].cost for n in names]
        cap = ba.max_rank if ba.max_rank is not None else 4 * ba.base_rank
        his = [min(cap, targets[n].d_in, targets[n].d_out) for n in names]
        if any(h < ba.min_rank for h in his):
            small = next(n for n, h in zip(names, his) if h < ba.min_rank)
            raise PeftlabError(
                f"ba_lora.min_rank={ba.min_rank} exceeds the full rank of module {small} ({targets[small].d_in}x{targets[small].d_out}); "
                "lower --ba_lora.min_rank or leave this module out of --model.target_modules."
            )
        budget = ba.param_budget if ba.param_budget is not None else ba.base_rank * sum(costs)
        check_budget(budget, costs, ba.min_rank, his)  # before any gradient is computed
        lo_b, hi_b = feasible_budget_range(costs, ba.min_rank, his)
        seconds = {"importance": 0.0, "allocation": 0.0, "warmstart": 0.0, "apply": 0.0}

        resumed = self._recorded_allocation(structure)
        grads: dict[str, torch.Tensor] = {}
        if resumed is not None:
            if set(resumed.get("modules", {})) != set(names):
                raise PeftlabError(f"The recorded BA-LoRA ranks cover modules {sorted(resumed.get('modules', {}))[:3]}... but the config "
                                   f"targets {names[:3]}...; the run's config.json and its method.json/allocation.json do not belong together.")
            ranks = [int(resumed["modules"][n]["rank"]) for n in names]
            log.info(f"[BA-LoRA] reusing the ranks recorded in {'method.json' if structure is not None else 'allocation.json'} ("
                     "phases 1-3 skipped, the checkpoint holds the trained adapter)")
            record = dict(resumed, resumed=True)
        else:
            t0 = time.perf_counter()
            log.info(f"[Phase 1/4] Estimating module importance ({ba.importance}) over {ba.gradient_samples:,} training examples...")
            grads, stats = self._accumulate_gradients(model, targets)
            scores = [importance_score(float_weight(targets[n].module), grads[n], ba.importance) for n in names]
            seconds["importance"] = time.perf_counter() - t0
            log.info(f"  average loss {stats['mean_loss']:.4f} over {stats['examples']:,} examples ({stats['batches']} batches); "
                     f"gradients stored for {len(names)} modules ({seconds['importance']:.2f}s)")
            if stats["examples"] < ba.gradient_samples:
                log.info(f"  note: the training set gave only {stats['examples']:,} of the {ba.gradient_samples:,} requested examples")

            t0 = time.perf_counter()
            how = "one uniform rank" if ba.uniform_ranks else "ranks proportional to importance"
            log.info(f"[Phase 2/4] Allocating {how} under a budget of {budget:,} LoRA parameters "
                     f"(feasible {lo_b:,} to {hi_b:,}; ranks {ba.min_rank} to {cap})...")
            if ba.uniform_ranks:
                r_u = uniform_rank(costs, budget, ba.min_rank, his)
                ranks, exact, targets_cont = [r_u] * len(names), True, [float(r_u)] * len(names)
            else:
                if not any(s > 0 for s in scores):
                    log.warning("  every importance score is zero (no gradient reached the target modules): equal shares")
                alloc = allocate_ranks(scores, costs, budget, ba.min_rank, his)
                ranks, exact, targets_cont = alloc.ranks, alloc.exact, alloc.targets
                if not exact:
                    log.warning("  the exact allocation table is too large; used the greedy fallback (total may fall short of the best)")
            seconds["allocation"] = time.perf_counter() - t0
            total_imp = sum(scores) or 1.0
            record = {
                "method": self.name,
                "budget": budget,
                "budget_source": "param_budget" if ba.param_budget is not None else f"base_rank={ba.base_rank}",
                "min_feasible_budget": lo_b,
                "max_feasible_budget": hi_b,
                "importance_kind": ba.importance,
                "uniform_ranks": ba.uniform_ranks,
                "exact": exact,
                "gradient_examples": stats["examples"],
                "gradient_batches": stats["batches"],
                "importance_mean_loss": stats["mean_loss"],
                "modules": {
                    n: {"importance": s, "share": s / total_imp, "target_rank": t, "rank": r, "d_in": targets[n].d_in,
                        "d_out": targets[n].d_out, "params": r * targets[n].cost}
                    for n, s, t, r in zip(names, scores, targets_cont, ranks)
                },
            }
        self._ranks = dict(zip(names, ranks))
        total = sum(r * c for r, c in zip(ranks, costs))
        record.update(total=total, leftover=budget - total, within_budget=total <= budget)
        if resumed is None:
            self._log_ranks(record)

        # Phase 4's injection happens here so that phase 3 can write into the peft layers.
        t0 = time.perf_counter()
        rank_pattern = dict(self._ranks)
        alpha_pattern = {n: self._alpha(r) for n, r in self._ranks.items()}
        for n, a in alpha_pattern.items():
            record["modules"][n]["alpha"] = a
        from peft import get_peft_model

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            peft_model = get_peft_model(model, self.peft_config(rank_pattern=rank_pattern, alpha_pattern=alpha_pattern))
        layers = self._check_injection(peft_model, targets, total)
        self.install_fused(peft_model)
        seconds["apply"] = time.perf_counter() - t0

        if resumed is None:
            t0 = time.perf_counter()
            if ba.use_warmstart:
                step = ba.warmstart_step if ba.warmstart_step is not None else self.cfg.training.learning_rate
                log.info(f"[Phase 3/4] Warm start ({ba.warmstart_init}, match={ba.warmstart_match}): initial update "
                         f"= a gradient step of size {step:g} along -G...")
                zero = self._warm_start(layers, targets, grads, step, record)
                log.info(f"  initialised {len(layers) - zero} of {len(layers)} modules with warm start"
                         + (f" ({zero} had no gradient and keep standard init)" if zero else ""))
            else:
                log.info("[Phase 3/4] Warm start off (use_warmstart=false): standard LoRA init (B = 0)")
            seconds["warmstart"] = time.perf_counter() - t0
            record["use_warmstart"] = ba.use_warmstart
            record["phase_seconds"] = {k: round(v, 6) for k, v in seconds.items()}
            record["overhead_s"] = round(seconds["importance"] + seconds["allocation"] + seconds["warmstart"], 6)
        grads.clear()
        scale = "alpha/r = lora.alpha/lora.r on every module" if self.cfg.ba_lora.alpha_mode == "constant_scale" else "alpha = lora.alpha, scale alpha/r_m"
        log.info(f"[Phase 4/4] LoRA applied with per-module ranks (peft rank_pattern, {scale}): {len(layers)} modules, "
                 f"{total:,} LoRA parameters; training...")
        self.allocation = record
        acc = self.ctx.accelerator
        if self.ctx.run_dir is not None and (acc is None or acc.is_main_process) and resumed is None:

            write_json(self.ctx.run_dir / "allocation.json", record)

        return peft_model

    # ---------------------------------------------------------------- phases
    def _targets(self, model) -> dict[str, _Target]:
        """The modules peft will adapt (its list rule: name == t or name ends with '.t'), with their dims."""
        out: dict[str, _Target] = {}
        wanted = list(self.ctx.target_modules)
        # peft's sequence-classification wrapper trains the head in full (modules_to_save) and never adapts it
        heads = {"classifier", "score"} if self.ctx.task == "classification" else set()
        for name, mod in model.named_modules():
            if not any(name == t or name.endswith("." + t) for t in wanted) or heads & set(name.split(".")):
                continue
            if isinstance(mod, torch.nn.Linear):
                out[name] = _Target(mod, mod.in_features, mod.out_features, conv1d=False)
            elif type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None and mod.weight.ndim == 2:
                d_in, d_out = mod.weight.shape
                out[name] = _Target(mod, int(d_in), int(d_out), conv1d=True)
            else:
                raise PeftlabError(
                    f"ba_lora adapts linear layers only, but target module {name} is a {type(mod).__name__}; "
                    "set --model.target_modules to linear layers (e.g. query,value or q_proj,v_proj)."
                )
        return out

    def _accumulate_gradients(self, model, targets: dict[str, _Target]) -> tuple[dict[str, torch.Tensor], dict]:
        """Phase 1: G_m = mean over micro-batches of dL/dW_m (batch-mean losses; no optimizer step).

        Only the target weights require grad while this runs; the model runs in eval mode
        (no dropout: the expected gradient, not one dropout sample), and the RNG state is
        restored afterwards so adapter init is the same as without this phase.
        """
        ba, acc = self.cfg.ba_lora, self.ctx.accelerator
        if self.ctx.train_batches is None or self.ctx.compute_loss is None:
            raise RuntimeError("BA-LoRA needs MethodContext.train_batches and compute_loss for its importance phase")
        world = acc.num_processes if acc is not None else 1
        device = acc.device if acc is not None else next(model.parameters()).device
        model.to(device)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        was_training = model.training
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        # a bitsandbytes layer's packed weight cannot require grad: its dL/dW comes from hooks instead
        hooked = {n: t for n, t in targets.items() if not t.module.weight.is_floating_point()}
        for n, t in targets.items():
            if n not in hooked:
                t.module.weight.requires_grad_(True)
        model.eval()
        examples, batches = 0, 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        cuda = [device.index or 0] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=cuda), _hooked_weight_grads(hooked) as hooked_grads:
                for batch in self.ctx.train_batches():
                    loss = self.ctx.compute_loss(model, batch)
                    loss.backward()
                    first = batch["input_ids"] if "input_ids" in batch else next(iter(batch.values()))
                    examples += int(first.shape[0]) * world
                    batches += 1
                    loss_sum += loss.detach().double()
                    if examples >= ba.gradient_samples:
                        break
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
            model.train(was_training)
        if batches == 0:
            raise PeftlabError("ba_lora's importance phase got no training batch; the training set is smaller than one batch. Lower --training.batch_size.")
        grads = {}
        for name, t in targets.items():
            w = t.module.weight
            if name in hooked:
                g = hooked_grads.get(name)
                g = (g if g is not None else torch.zeros(t.d_out, t.d_in, device=device)) / batches
            else:
                g = (w.grad.detach().float() if w.grad is not None else torch.zeros_like(w, dtype=torch.float32)) / batches
            w.grad = None
            if world > 1:
                g = acc.reduce(g, "mean")  # every process ran the same number of equal-sized batches
            grads[name] = g
        mean = loss_sum / batches
        if world > 1:
            mean = acc.reduce(mean, "mean")
        return grads, {"examples": examples, "batches": batches, "mean_loss": float(mean)}

    def _alpha(self, r: int) -> float:
        """Per-module alpha: constant_scale keeps peft's scale equal to that of lora.r / lora.alpha."""
        lc = self.cfg.lora
        if self.cfg.ba_lora.alpha_mode == "constant_alpha":
            return float(lc.alpha)
        if lc.use_rslora:
            return float(lc.alpha) * math.sqrt(r / lc.r)
        return float(lc.alpha) * r / lc.r

    def _check_injection(self, peft_model, targets: dict[str, _Target], total: int) -> dict[str, object]:
        """Map each target to its peft layer and check that ranks and the LoRA count came out as allocated."""
        layers = {}
        for lname, layer in lora_layers(peft_model):
            match = [n for n in targets if lname == n or lname.endswith("." + n)]
            if len(match) != 1:
                raise RuntimeError(f"peft adapted {lname}, which is not one of BA-LoRA's targets")
            layers[match[0]] = layer
        missing = sorted(set(targets) - set(layers))
        if missing:
            raise RuntimeError(f"peft did not adapt {missing[:3]} although BA-LoRA allocated ranks to them")
        count = 0
        for n, layer in layers.items():
            if layer.r["default"] != self._ranks[n]:
                raise RuntimeError(f"peft gave {n} rank {layer.r['default']}, allocation said {self._ranks[n]}")
            count += sum(p.numel() for p in layer.lora_A["default"].parameters()) + layer.lora_B["default"].weight.numel()
        if count != total:
            raise RuntimeError(f"the model holds {count} LoRA parameters, the allocation counted {total}")
        return layers

    def _warm_start(self, layers: dict, targets: dict[str, _Target], grads: dict[str, torch.Tensor], step: float, record: dict) -> int:
        """Phase 3: write A, B with scale * B A = -k * (rank-r part of G) into each peft layer."""
        ba = self.cfg.ba_lora
        zero = 0
        with torch.no_grad():
            for n, layer in layers.items():
                G = grads[n]
                if targets[n].conv1d:
                    G = G.T  # Conv1D weight is (d_in, d_out); LoRA's B A is (d_out, d_in)
                A_w, B_w = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                ws = warm_start_factors(G.to(A_w.device), layer.r["default"], float(layer.scaling["default"]), step,
                                        init=ba.warmstart_init, match=ba.warmstart_match, eps=ba.warmstart_eps,
                                        lora_A=A_w if ba.warmstart_init == "pinv" else None)
                A_w.copy_(ws.A.to(A_w.dtype))
                B_w.copy_(ws.B.to(B_w.dtype))
                zero += ws.zero
                record["modules"][n]["warmstart"] = {"k": ws.k, "captured": ws.captured, "zero_gradient": ws.zero}
        return zero

    def _log_ranks(self, record: dict) -> None:
        log = self.ctx.log
        for n, m in record["modules"].items():
            log.info(f"  {n}: rank {m['rank']} (importance {m['importance']:.4g}, share {m['share']:.3f}, "
                     f"target {m['target_rank']:.2f}) = {m['params']:,} params")
        status = "within budget" if record["within_budget"] else "OVER BUDGET"
        log.info(f"  Total parameters: {record['total']:,} ({status}; budget {record['budget']:,}, leftover {record['leftover']:,})")

    def _recorded_allocation(self, structure: Optional[dict]) -> Optional[dict]:
        """The allocation to rebuild instead of running phases 1-3: from ``structure`` (method.json)
        or, for runs written before method.json existed, the run's allocation.json when resuming.
        The importance record of allocation.json is kept when it is there (for the summary)."""
        run_dir = self.ctx.run_dir
        path = run_dir / "allocation.json" if run_dir is not None else None
        stored = json.loads(path.read_text()) if path is not None and path.is_file() else None
        if structure is not None:
            if "ranks" not in structure:
                raise PeftlabError("method.json of this ba_lora run has no `ranks`; it was not written by ba_lora.")
            ranks = {n: int(r) for n, r in structure["ranks"].items()}
            if stored is not None and {n: int(m["rank"]) for n, m in stored.get("modules", {}).items()} == ranks:
                return stored
            ba = self.cfg.ba_lora
            return {"budget": ba.param_budget, "modules": {n: {"rank": r} for n, r in ranks.items()}}
        t = self.cfg.training
        if t.resume_from is None or run_dir is None:
            return None

        if resolve(t.resume_from, run_dir) is None:
            return None
        if stored is None:
            raise PeftlabError(f"Resuming a ba_lora run needs its allocation.json, which is missing from {run_dir}; "
                               "start a new run directory instead.")
        return stored

    # ----------------------------------------------------------------- state
    def state_dict(self):
        return {"ranks": dict(self._ranks)}

    def load_state_dict(self, state) -> None:
        saved = dict(state.get("ranks", {}))
        if saved and saved != self._ranks:
            diff = [n for n in saved if saved[n] != self._ranks.get(n)]
            raise PeftlabError(f"The checkpoint was trained with other BA-LoRA ranks (e.g. {diff[:2]}); resume with the run's own allocation.json.")

    def summary(self):
        if self.allocation is None:
            return {}
        # the loop adds overhead_fraction_of_training = overhead_s / training wall time
        return dict(self.allocation)
