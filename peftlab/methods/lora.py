"""LoRA, DoRA and LoRA+ through Hugging Face ``peft``.

LoRA (Hu et al., 2021): W' = W + (alpha / r) * B A with A (r x d_in), B (d_out x r), B = 0 at init.
DoRA (Liu et al., 2024): W' = m * (W + s B A) / ||W + s B A||_row, magnitude m trained.
LoRA+ (Hayou et al., 2024): B learns ``loraplus_lr_ratio`` times faster than A; as in peft's
``create_loraplus_optimizer``, every 1-D trainable parameter (biases, DoRA magnitudes) takes B's rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Optional

import torch

from ..errors import PeftlabError
from ..models import check_targets
from ..options import opt
from .base import Method
from .dora_norm import install_factored_dora, use_factored
from .lora_init import BASE_CHANGING, BASIC_INITS, INITS, Initialiser, init_problems, peft_kwargs
from .fused_lora import install_fused_lora, use_fused


@dataclass
class LoraSection:
    r: int = opt(8, "LoRA rank.")
    alpha: float = opt(16.0, "LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora).")
    dropout: float = opt(0.05, "Dropout on the LoRA input.")
    bias: Literal["none", "all", "lora_only"] = opt("none", "Which biases to train.")
    use_rslora: bool = opt(False, "Rank-stabilised scaling alpha / sqrt(r).")
    init: Literal["default", "gaussian", "pissa", "olora", "eva", "corda", "loftq"] = opt(
        "default", "Adapter initialisation through peft: default = A Kaiming-uniform, B = 0; gaussian = A ~ N(0, 1/r), B = 0; "
        "pissa / olora = A, B from the SVD / QR of W (the base becomes W - s B0 A0); eva = A from the SVD of the layer inputs "
        "(training data; ranks redistributed); corda = from the SVD of W times the input covariance (training data); loftq = "
        "from W - Q(W), the base becomes Q(W) (CUDA + bitsandbytes). pissa ... loftq: method lora only. docs/quantization.md.")
    init_samples: int = opt(64, "lora.init=eva / corda: how many training examples (the first of epoch 0) the data-dependent initialisation reads, once, before training.")
    loraplus_lr_ratio: float = opt(1.0, "LoRA+: learning rate of B divided by that of A (1 = plain LoRA; the paper suggests 16).")
    dora_norm: Literal["auto", "factored", "peft"] = opt(
        "auto", "DoRA's row norm ||W0 + s B A||: factored (from constant W0 row norms and a d_out x r cross term, no "
        "d_out x d_in product), peft (peft's dense layer), auto = factored on CUDA, peft on CPU. Same function either way.")
    fused: Literal["auto", "on", "off"] = opt(
        "auto", "LoRA/DoRA Linear forward as one fused autograd node (base GEMM + low-rank path, saves only x and the "
        "rank-r intermediate; peftlab/kernels/lora.py), falling back to peft's forward where it does not apply: "
        "auto = on CUDA, on, off = peft's forward. Same function (docs/gpu-speed.md).")

    def validate(self) -> list[str]:
        p = []
        if self.r < 1:
            p.append(f"`lora.r` must be at least 1, got {self.r}.")
        if not self.alpha > 0:
            p.append(f"`lora.alpha` must be positive, got {self.alpha}.")
        if not 0 <= self.dropout < 1:
            p.append(f"`lora.dropout` must be in [0, 1), got {self.dropout}.")
        if not self.loraplus_lr_ratio > 0:
            p.append(f"`lora.loraplus_lr_ratio` must be positive, got {self.loraplus_lr_ratio}.")
        return p


def peft_task_type(task: str) -> str:
    return "CAUSAL_LM" if task == "causal_lm" else "SEQ_CLS"


def lora_layers(model: torch.nn.Module):
    """Yield ``(module_name, peft LoraLayer)`` for every adapted module."""
    from peft.tuners.lora import LoraLayer

    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            yield name, mod


class LoRA(Method):
    """Low-rank adapters on the target modules; everything else frozen (heads trained)."""

    name = "lora"
    config_sections = {"lora": LoraSection}
    exports_adapter = True
    quantized_base = True  # (DoRA, SoRA, SDoRA and BA-LoRA inherit it)
    use_dora = False
    display_name = "LoRA"
    table_rank = 10
    size_axes = ("lora.r",)
    rank_axis = "lora.r"
    axis_keys = ("lora.r",)
    short_names = {"lora.r": "r"}
    sharding = "replicate"  # the adapter (and DoRA's magnitudes) whole on every process, the frozen base sharded
    #: the ``lora.init`` values this class supports (read from the class itself, not inherited:
    #: a subclass that declares none supports only default and gaussian)
    lora_inits: ClassVar[tuple[str, ...]] = INITS

    @classmethod
    def validate_config(cls, cfg) -> list[str]:
        return init_problems(cfg, cls.name, cls.__dict__.get("lora_inits", BASIC_INITS))

    def peft_config(self, rank_pattern: Optional[dict] = None, alpha_pattern: Optional[dict] = None,
                    init_record: Optional[dict] = None):
        from peft import LoraConfig

        lc = self.cfg.lora
        kw = dict(
            r=lc.r,
            lora_alpha=lc.alpha,
            lora_dropout=lc.dropout,
            bias=lc.bias,
            target_modules=list(self.ctx.target_modules),
            task_type=peft_task_type(self.ctx.task),
            use_dora=self.use_dora,
            use_rslora=lc.use_rslora,
            rank_pattern=rank_pattern or {},
            alpha_pattern=alpha_pattern or {},
        )
        kw.update(peft_kwargs(lc.init, init_record))  # init_lora_weights (+ eva/corda/loftq configs, EVA's recorded ranks)
        return LoraConfig(**kw)

    @classmethod
    def budget_overrides(cls, cfg, lora_params: int, r: int):
        if cls.use_dora:
            return {"lora.r": r}, f"r={r} + one magnitude per output feature"
        return {"lora.r": r}, f"r={r}: {lora_params:,} adapter parameters (+ head)"

    @classmethod
    def profile_info(cls, cfg):
        return {"rank": cfg.lora.r, "in_place": False, "refresh_interval": 1}

    def structure(self, model) -> dict:
        """The adapted modules and their ranks (all ``lora.r`` here; BA-LoRA records its own)."""
        out = {"method": self.name, "r": self.cfg.lora.r, "modules": sorted(n for n, _ in lora_layers(model))}
        if self.cfg.lora.init not in BASIC_INITS:
            out["init"] = self._inits.record
        return out

    def _check_modules(self, model, structure) -> None:
        if structure is not None and "modules" in structure:
            have = sorted(n for n, _ in lora_layers(model))
            if have != sorted(structure["modules"]):
                raise PeftlabError(f"method.json records adapters on {sorted(structure['modules'])[:3]}... but the config adapts "
                                   f"{have[:3]}...; the run's config.json and checkpoint do not belong together.")

    def apply(self, model, structure=None):
        self.check_structure(structure)
        if self.cfg.lora.init in BASIC_INITS:
            model = self._inject(model)
        else:
            self._inits = Initialiser(self, (structure or {}).get("init") if structure is not None else None)
            model = self._inits.apply(model)
        self._check_modules(model, structure)
        self.install_fused(model)
        return model

    def install_fused(self, model) -> int:
        """``lora.fused``: peftlab's fused LoRA forward on the peft layers (methods/fused_lora.py); how many."""
        if not use_fused(self.cfg.lora.fused, self.ctx.device):
            return 0
        n = install_fused_lora(model)
        self.ctx.log.info(f"lora.fused: fused LoRA forward in {n} layer(s) (lora.fused={self.cfg.lora.fused})")
        return n

    def _inject(self, model, config=None, **kwargs):

        import warnings

        from peft import get_peft_model

        check_targets(model, self.ctx.target_modules)
        with warnings.catch_warnings():
            # GPT-2's Conv1D needs fan_in_fan_out=True; peft sets it itself and warns.
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            try:
                return get_peft_model(model, config or self.peft_config(), **kwargs)
            except ValueError as e:  # e.g. a target that is not a layer type LoRA supports
                raise PeftlabError(
                    f"peft cannot adapt target_modules={self.ctx.target_modules}: {str(e).splitlines()[0]} "
                    "Point --model.target_modules at linear (or GPT-2 Conv1D) layers."
                ) from None

    def state_dict(self):
        return self._inits.state_dict() if self.cfg.lora.init not in BASIC_INITS else {}

    def load_state_dict(self, state) -> None:
        if self.cfg.lora.init not in BASIC_INITS:
            self._inits.load_state_dict(state)

    def param_groups(self, model):
        t, ratio = self.cfg.training, self.cfg.lora.loraplus_lr_ratio
        b_params = set()
        if ratio != 1.0:
            for _, layer in lora_layers(model):
                for sub in layer.lora_B.values():
                    b_params.update(id(p) for p in sub.parameters())
        groups: dict[str, dict] = {}
        for n, p in self.trainable_parameters(model):
            # as peft's create_loraplus_optimizer: B and every 1-D parameter (biases, DoRA magnitudes) at B's rate
            is_b = id(p) in b_params or (ratio != 1.0 and p.ndim == 1)
            wd = 0.0 if p.ndim < 2 else t.weight_decay
            key = ("B" if is_b else "A") + ("_no_decay" if wd == 0.0 and t.weight_decay else "")
            g = groups.setdefault(key, {"params": [], "weight_decay": wd, "name": key, "lr_scale": ratio if is_b else 1.0})
            g["params"].append(p)
        for g in groups.values():
            g["lr"] = t.learning_rate * g["lr_scale"]
        return list(groups.values())

    def export(self, model, out_dir: Path, tokenizer=None) -> Path:
        target = out_dir / "adapter"
        if self.cfg.lora.init in BASE_CHANGING:
            self._inits.export(model, target)  # an adapter for the original base (peft's weight conversion)
        else:
            model.save_pretrained(target, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(target)
        return target


class DoRA(LoRA):
    """Weight-decomposed LoRA via ``peft`` (``use_dora=True``); reads the ``lora`` section.

    On CUDA (``lora.dora_norm=auto``) peft's magnitude layers are swapped for
    :class:`~peftlab.methods.dora_norm.FactoredDoraLayer`, which computes the same output
    without forming ``W0 + s B A``.
    """

    name = "dora"
    use_dora = True
    display_name = "DoRA"
    table_rank = 20

    def apply(self, model, *args, **kwargs):
        model = super().apply(model, *args, **kwargs)
        if use_factored(self.cfg.lora.dora_norm, self.ctx.device):
            n = install_factored_dora(model)
            self.ctx.log.info(f"dora: factored row norm in {n} layer(s) (lora.dora_norm={self.cfg.lora.dora_norm})")
        return model
