"""rSVD-Adam: full-parameter training with optimizer state in a low-rank gradient subspace.

Every weight of an attention/MLP linear layer keeps its Adam moments in the rank-r subspace of
its gradient found by randomized (or exact) SVD every ``update_interval`` steps (GaLore, Zhao et
al. 2024, with randomized range finding). Embeddings, norms, biases, the task head and anything
matched by ``rsvd.exclude`` use plain AdamW in the same optimizer. Options:

* SVT (``rsvd.svt``): the rank of each matrix is chosen at every refresh by a singular-value
  threshold (``fixed_rank``) or by the fraction of gradient energy kept (``rank_fraction``),
  capped at ``rsvd.rank``; chosen ranks are written to ``svt_ranks.csv``.
* Weight reduction (``rsvd.weight_reduction_rank=k``): before training, the weights of the
  feed-forward (MLP) linear layers are replaced by frozen rank-k SVD factors; their biases stay
  trainable. The rest is trained with rSVD-Adam. See docs/rsvd.md for memory and accuracy costs.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from ..errors import PeftlabError
from ..io import CsvLog, strict_json_dumps
from ..optim.projected_adam import ProjectedAdamW, top_svd
from ..options import opt
from .base import Method

DEFAULT_EXCLUDE = ["*classifier*", "*pooler*", "*lm_head*", "*score*"]

# The feed-forward (MLP) linear layers of each block, by architecture (fnmatch patterns on module names).
FFN_PATTERNS = {
    "distilbert": ["*.ffn.lin1", "*.ffn.lin2"],
    "bert": ["*.intermediate.dense", "*.layer.*[0-9].output.dense"],
    "roberta": ["*.intermediate.dense", "*.layer.*[0-9].output.dense"],
    "gpt2": ["*.mlp.c_fc", "*.mlp.c_proj"],
    "llama": ["*.mlp.gate_proj", "*.mlp.up_proj", "*.mlp.down_proj"],
    "qwen2": ["*.mlp.gate_proj", "*.mlp.up_proj", "*.mlp.down_proj"],
    "qwen3": ["*.mlp.gate_proj", "*.mlp.up_proj", "*.mlp.down_proj"],
    "mistral": ["*.mlp.gate_proj", "*.mlp.up_proj", "*.mlp.down_proj"],
    "opt": ["*.fc1", "*.fc2"],
}


@dataclass
class RsvdSection:
    rank: int = opt(16, "Rank cap r of each projected gradient (clipped to min(rows, cols)).")
    update_interval: int = opt(500, "Recompute each projector every this many optimizer steps (GaLore's update_proj_gap).")
    scale: float = opt(1.0, "Multiply the back-projected update by this (GaLore uses 0.25 for pretraining, 2-4 for GLUE).")
    oversampling: int = opt(8, "Randomized SVD: extra random directions beyond the rank.")
    power_iters: int = opt(2, "Randomized SVD: power iterations (more = more exact singular vectors).")
    svd: Literal["randomized", "full"] = opt("randomized", "How projectors are found: randomized SVD, or exact torch.linalg.svd (the GaLore variant).")
    svt: Literal["none", "fixed_rank", "rank_fraction"] = opt("none", "Adaptive rank: none (always rank), fixed_rank (keep sigma_i >= svt_threshold * sigma_1) or rank_fraction (smallest rank keeping rank_fraction of ||G||_F^2); both capped at rank.")
    svt_threshold: float = opt(0.1, "fixed_rank: keep singular directions with sigma_i >= svt_threshold * sigma_1 (0 < tau <= 1).")
    rank_fraction: float = opt(0.9, "rank_fraction: fraction of the gradient's spectral energy sum(sigma^2) to keep (0 < f <= 1).")
    exclude: list[str] = opt(list(DEFAULT_EXCLUDE), "fnmatch patterns of linear-module names whose weights use plain AdamW (default: task heads).")
    weight_reduction_rank: Optional[int] = opt(None, "Replace the weight_reduction_targets weights by frozen rank-k SVD factors before training (null: off).")
    weight_reduction_targets: Optional[list[str]] = opt(None, "fnmatch patterns of modules to reduce; default: the feed-forward (MLP) linear layers of the architecture.")
    batched: Literal["auto", "on", "off"] = opt("auto", "Multi-tensor optimizer step and projector refresh (matrices of one shape stacked: batched matmuls, QR and SVD; fused AdamW for the rest): auto = on CUDA only, on, off (a loop per matrix). Same math, equal up to rounding.")

    def validate(self) -> list[str]:
        p = []
        for k in ("rank", "update_interval"):
            if getattr(self, k) < 1:
                p.append(f"`rsvd.{k}` must be at least 1, got {getattr(self, k)}.")
        if not self.scale > 0:
            p.append(f"`rsvd.scale` must be positive, got {self.scale}.")
        for k in ("oversampling", "power_iters"):
            if getattr(self, k) < 0:
                p.append(f"`rsvd.{k}` must be >= 0, got {getattr(self, k)}.")
        if not 0 < self.svt_threshold <= 1:
            p.append(f"`rsvd.svt_threshold` must be in (0, 1] (a fraction of the largest singular value), got {self.svt_threshold}.")
        if not 0 < self.rank_fraction <= 1:
            p.append(f"`rsvd.rank_fraction` must be in (0, 1], got {self.rank_fraction}.")
        if self.weight_reduction_rank is not None and self.weight_reduction_rank < 1:
            p.append(f"`rsvd.weight_reduction_rank` must be at least 1 or null, got {self.weight_reduction_rank}.")
        if self.weight_reduction_targets is not None and not self.weight_reduction_targets:
            p.append("`rsvd.weight_reduction_targets` is an empty list; remove it to use the feed-forward layers.")
        elif self.weight_reduction_targets and self.weight_reduction_rank is None:
            p.append("`rsvd.weight_reduction_targets` is set but `rsvd.weight_reduction_rank` is null; set the rank "
                     "(e.g. --rsvd.weight_reduction_rank=64) or remove the targets.")
        return p


# ----------------------------------------------------------------------------- weight reduction
def _is_conv1d(mod: torch.nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def _is_dense(mod: torch.nn.Module) -> bool:
    return isinstance(mod, torch.nn.Linear) or _is_conv1d(mod)


def dense_weight(mod: torch.nn.Module) -> torch.Tensor:
    """The weight as ``(out, in)`` (GPT-2's Conv1D stores ``(in, out)``)."""
    return mod.weight.T if _is_conv1d(mod) else mod.weight


class LowRankLinear(torch.nn.Module):
    """``y = x V^T U^T + b`` with frozen factors ``U`` (out x k), ``V`` (k x in) and a trainable bias.

    Built from a dense weight ``W ~= U V`` where ``U = U_k sqrt(S_k)`` and ``V = sqrt(S_k) V_k^T``
    (the split balances the factors' scales; the product is the rank-k SVD truncation).
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], k: int, svd: str = "randomized",
                 oversampling: int = 8, power_iters: int = 2, generator: Optional[torch.Generator] = None,
                 conv1d: bool = False):
        super().__init__()
        w = weight.detach().float()
        out_f, in_f = w.shape
        k = min(k, out_f, in_f)
        u, s, vh = top_svd(w, k, svd, oversampling, power_iters, generator)
        root = s[:k].sqrt()
        dtype = weight.dtype
        self.weight_u = torch.nn.Parameter((u[:, :k] * root).to(dtype), requires_grad=False)
        self.weight_v = torch.nn.Parameter((root[:, None] * vh[:k]).to(dtype), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone())
        self.in_features, self.out_features, self.rank, self.conv1d = in_f, out_f, k, conv1d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(torch.nn.functional.linear(x, self.weight_v), self.weight_u)
        return y if self.bias is None else y + self.bias

    def dense(self) -> torch.nn.Module:
        """The equivalent dense module (nn.Linear, or Conv1D for GPT-2) holding ``U V``."""
        w = (self.weight_u.float() @ self.weight_v.float()).to(self.weight_u.dtype)
        if self.conv1d:
            from transformers.pytorch_utils import Conv1D

            mod = Conv1D(self.out_features, self.in_features)
            with torch.no_grad():
                mod.weight.copy_(w.T)
                mod.bias.copy_(self.bias if self.bias is not None else torch.zeros(self.out_features))
            return mod.to(w.device)
        mod = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            mod.weight.copy_(w)
            if self.bias is not None:
                mod.bias.copy_(self.bias)
        return mod.to(w.device)


def _set_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def reduce_weights(model: torch.nn.Module, patterns: list[str], k: int, svd: str = "randomized", oversampling: int = 8,
                   power_iters: int = 2, seed: int = 0) -> list[dict]:
    """Replace every dense module whose name matches ``patterns`` by a :class:`LowRankLinear` of rank ``k``.

    Returns one record per replaced module: name, shape, rank, parameters before/after and the
    relative reconstruction error ``||W - W_k||_F / ||W||_F``.
    """
    targets = [(n, m) for n, m in model.named_modules() if _is_dense(m) and matches(n, patterns)]
    if not targets:
        dense = sorted(n for n, m in model.named_modules() if _is_dense(m))
        raise PeftlabError(
            f"rsvd.weight_reduction_targets={patterns} matches no linear layer. Linear layers of this model include: "
            f"{', '.join(dense[:12])}{' ...' if len(dense) > 12 else ''}. Give fnmatch patterns such as '*.ffn.lin1'."
        )
    records = []
    for i, (name, mod) in enumerate(targets):
        w = dense_weight(mod)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * i + 17)
        new = LowRankLinear(w, mod.bias, k, svd, oversampling, power_iters, gen, conv1d=_is_conv1d(mod)).to(w.device)
        with torch.no_grad():
            approx = new.weight_u.float() @ new.weight_v.float()
            err = (w.float() - approx).norm() / w.float().norm().clamp(min=1e-30)
        _set_module(model, name, new)
        out_f, in_f = w.shape
        records.append({"module": name, "shape": [out_f, in_f], "rank": new.rank, "params_before": out_f * in_f,
                        "params_after": new.rank * (out_f + in_f), "relative_error": float(err)})
    return records


def densify(model: torch.nn.Module) -> list[tuple[str, LowRankLinear]]:
    """Swap every LowRankLinear back to a dense module; returns what to swap back with :func:`undensify`."""
    swapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    for n, m in swapped:
        _set_module(model, n, m.dense())
    return swapped


def undensify(model: torch.nn.Module, swapped: list[tuple[str, LowRankLinear]]) -> None:
    for n, m in swapped:
        _set_module(model, n, m)


# ----------------------------------------------------------------------------- the method
class RSVD(Method):
    """Full-parameter training with rSVD-Adam (+ SVT, + weight reduction); exports the full model."""

    name = "rsvd"
    profile_rank_key = "rsvd.rank"  # `peftlab profile --ranks` sweeps rSVD-Adam's rank
    config_sections = {"rsvd": RsvdSection}
    display_name = "rSVD"
    table_rank = 60
    size_axes = ("rsvd.rank",)
    rank_axis = "rsvd.rank"
    axis_keys = ("rsvd.rank", "rsvd.svt")
    short_names = {"rsvd.rank": "rank"}
    variant_keys = ("rsvd.svt", "rsvd.weight_reduction_rank")
    sharding = None
    sharding_refusal = ("rSVD-Adam projects each weight's whole gradient matrix with a randomized SVD, and under FSDP "
                        "every process holds only a slice of it (row shards of W and of its gradient).")
    compare_learning_rate = 1e-3  # measured: 1e-4 still predicts the majority class after 60 steps of the compare demo

    def __init__(self, ctx):
        super().__init__(ctx)
        self.optimizer: Optional[ProjectedAdamW] = None
        self.projected_names: dict[int, str] = {}  # parameter index in the optimizer -> name
        self.reduced: list[dict] = []
        self.steps = 0
        self.rank_log = None
        self.restored = False

    @classmethod
    def validate_config(cls, cfg) -> list[str]:
        return []

    # --- model ---------------------------------------------------------------------
    def weight_reduction_patterns(self, model: torch.nn.Module) -> list[str]:
        rc = self.cfg.rsvd
        if rc.weight_reduction_targets:
            return list(rc.weight_reduction_targets)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in FFN_PATTERNS:
            raise PeftlabError(
                f"rsvd.weight_reduction_rank is set but peftlab has no default feed-forward layers for model type "
                f"{model_type!r}. Name the modules to reduce with --rsvd.weight_reduction_targets='*.mlp.fc1,*.mlp.fc2'."
            )
        return FFN_PATTERNS[model_type]

    @classmethod
    def budget_overrides(cls, cfg, lora_params: int, r: int):
        return ({"rsvd.rank": r, "training.learning_rate": cls.compare_learning_rate},
                f"full-parameter: all weights train, gradients projected to rank {r}; lr {cls.compare_learning_rate:g}")

    @classmethod
    def profile_info(cls, cfg):
        rc = cfg.rsvd
        return {"rank": rc.rank, "in_place": rc.weight_reduction_rank is None, "refresh_interval": rc.update_interval}

    def structure(self, model) -> dict:
        """The settings that shape the model: the weight-reduced modules and their ranks (the
        frozen factors are recomputed from the base weights and seed; the trained tensors are
        in the checkpoint). Projectors are optimizer state and need no rebuilding."""
        return {"method": self.name, "weight_reduction_rank": self.cfg.rsvd.weight_reduction_rank,
                "weight_reduction": [{"module": r["module"], "rank": r["rank"], "shape": r["shape"]} for r in self.reduced]}

    def apply(self, model, structure=None):
        self.check_structure(structure)
        model = self._apply(model)
        if structure is not None and "weight_reduction" in structure:
            want = [(r["module"], r["rank"]) for r in structure["weight_reduction"]]
            have = [(r["module"], r["rank"]) for r in self.reduced]
            if want != have:
                raise PeftlabError(f"method.json records weight reduction of {want[:2]}... but the config reduces {have[:2]}...; "
                                   "the run's config.json and checkpoint do not belong together.")
        return model

    def _apply(self, model):
        rc = self.cfg.rsvd
        for p in model.parameters():
            p.requires_grad_(True)
        if rc.weight_reduction_rank is not None:
            self.reduced = reduce_weights(model, self.weight_reduction_patterns(model), rc.weight_reduction_rank, rc.svd,
                                          rc.oversampling, rc.power_iters, self.cfg.training.seed)
            before = sum(r["params_before"] for r in self.reduced)
            after = sum(r["params_after"] for r in self.reduced)
            self.ctx.log.info(f"weight reduction: {len(self.reduced)} modules to rank {rc.weight_reduction_rank}, "
                              f"{before:,} -> {after:,} frozen parameters; mean relative error "
                              f"{sum(r['relative_error'] for r in self.reduced) / len(self.reduced):.4f}")
        return model

    def projected_parameters(self, model) -> list[tuple[str, torch.nn.Parameter]]:
        """Weights of dense layers that are trainable and not excluded (attention / MLP linears)."""
        exclude = list(self.cfg.rsvd.exclude)
        out, seen = [], set()
        for mname, mod in model.named_modules():
            if _is_dense(mod) and not matches(mname, exclude) and mod.weight.requires_grad and mod.weight.ndim == 2:
                if id(mod.weight) not in seen:
                    seen.add(id(mod.weight))
                    out.append((f"{mname}.weight" if mname else "weight", mod.weight))
        return out

    def param_groups(self, model):
        t, rc = self.cfg.training, self.cfg.rsvd
        projected = self.projected_parameters(model)
        proj_ids = {id(p) for _, p in projected}
        decay, no_decay = [], []
        for n, p in self.trainable_parameters(model):
            if id(p) in proj_ids:
                continue
            (no_decay if p.ndim < 2 else decay).append(p)
        groups = [{"params": [p for _, p in projected], "weight_decay": t.weight_decay, "name": "projected", "rank": rc.rank},
                  {"params": decay, "weight_decay": t.weight_decay, "name": "adamw_decay", "rank": None},
                  {"params": no_decay, "weight_decay": 0.0, "name": "adamw_no_decay", "rank": None}]
        groups = [g for g in groups if g["params"]]
        self.projected_names = {}
        index = 0
        names = {id(p): n for n, p in projected}
        for g in groups:
            for p in g["params"]:
                if g["rank"] is not None:
                    self.projected_names[index] = names[id(p)]
                index += 1
        return groups

    def build_optimizer(self, model):
        t, rc = self.cfg.training, self.cfg.rsvd
        self.optimizer = ProjectedAdamW(
            self.param_groups(model), lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
            update_interval=rc.update_interval, scale=rc.scale, svd=rc.svd, oversampling=rc.oversampling,
            power_iters=rc.power_iters, svt=rc.svt, svt_threshold=rc.svt_threshold, rank_fraction=rc.rank_fraction,
            seed=t.seed, batched=rc.batched,
        )
        if not self.projected_names:
            self.ctx.log.warning("rsvd: no weight is projected (every dense layer is excluded or reduced); this is plain AdamW.")
        else:
            self.ctx.log.info(f"rsvd: {len(self.projected_names)} weight matrices projected to rank <= {rc.rank} "
                              f"({rc.svd} SVD every {rc.update_interval} steps, svt={rc.svt}, batched={rc.batched}); the rest use AdamW")
        return self.optimizer

    # --- loop hooks ----------------------------------------------------------------
    def _rank_log(self):
        if self.rank_log is None and self.ctx.run_dir is not None:
            cols = ["step", "mean_rank", "state_mb", *self.projected_names.values()]
            path = Path(self.ctx.run_dir) / "svt_ranks.csv"
            if not self.restored:
                path.unlink(missing_ok=True)  # a fresh start: rows of an earlier attempt do not belong to this run
            self.rank_log = CsvLog(path, cols)
        return self.rank_log

    def _is_main(self) -> bool:
        acc = self.ctx.accelerator
        return acc is None or acc.is_main_process

    def after_optimizer_step(self, model, lr):
        self.steps += 1
        opt = self.optimizer
        if opt is None or not opt.last_refresh or not self._is_main():
            return
        log = self._rank_log()
        if log is None:
            return
        ranks = opt.ranks()
        row = {"step": self.steps, "mean_rank": sum(ranks.values()) / max(len(ranks), 1),
               "state_mb": opt.state_bytes() / 2**20}
        row.update({self.projected_names[i]: r for i, r in ranks.items() if i in self.projected_names})
        log.write(row)

    def step_metrics(self, model):
        if self.optimizer is None:
            return {}
        ranks = self.optimizer.ranks()
        out = {"optimizer_state_mb": self.optimizer.state_bytes() / 2**20}
        if ranks:
            out["mean_proj_rank"] = sum(ranks.values()) / len(ranks)
        return out

    # --- state ---------------------------------------------------------------------
    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = int(state.get("steps", 0))
        self.restored = True
        if self._is_main():
            log = self._rank_log()
            if log is not None:
                log.truncate_after(self.steps)

    # --- results -------------------------------------------------------------------
    def summary(self):
        out = {"projected_matrices": len(self.projected_names), "rank_cap": self.cfg.rsvd.rank, "svd": self.cfg.rsvd.svd,
               "svt": self.cfg.rsvd.svt}
        if self.optimizer is not None:
            out["optimizer_state_bytes"] = self.optimizer.state_bytes()
            ranks = self.optimizer.ranks()
            if ranks:
                out["final_mean_rank"] = sum(ranks.values()) / len(ranks)
        if self.reduced:
            out["weight_reduction"] = {
                "rank": self.cfg.rsvd.weight_reduction_rank, "modules": len(self.reduced),
                "params_before": sum(r["params_before"] for r in self.reduced),
                "params_after": sum(r["params_after"] for r in self.reduced),
                "mean_relative_error": sum(r["relative_error"] for r in self.reduced) / len(self.reduced),
            }
        return out

    def export(self, model, out_dir: Path, tokenizer=None) -> Path:
        """The full model in Hugging Face format; reduced layers are saved densified (``U V``) so the
        standard architecture loads it; ``weight_reduction.json`` records which ones."""
        swapped = densify(model)
        try:
            target = super().export(model, out_dir, tokenizer)
        finally:
            undensify(model, swapped)
        if self.reduced:
            (target / "weight_reduction.json").write_text(strict_json_dumps(self.reduced, indent=2))
        return target
