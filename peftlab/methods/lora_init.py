"""LoRA initialisations through peft (``lora.init``), and what a run records of them.

========  ==========================================================  ===========  ============
init      what peft does (``LoraConfig.init_lora_weights``)            base W       needs data
========  ==========================================================  ===========  ============
default   A Kaiming-uniform, B = 0 (``True``)                          unchanged    no
gaussian  A ~ N(0, 1/r), B = 0                                         unchanged    no
pissa     A, B from the top-r SVD of W (Meng et al., 2024)              W - s B0 A0  no
olora     A, B from the QR decomposition of W (Büyükakyüz, 2024)        W - s B0 A0  no
eva       A from the SVD of the layer inputs, B = 0; ranks
          redistributed by explained variance (Paischer et al., 2024)   unchanged    yes
corda     A, B from the SVD of W C, C the input covariance (Yang
          et al., 2024; instruction-previewed mode)                     W - s B0 A0  yes
loftq     A, B from the SVD of W - Q(W), W replaced by Q(W)
          dequantized (Li et al., 2023); bitsandbytes on CUDA           Q(W)         no
========  ==========================================================  ===========  ============

Data-dependent inits read ``lora.init_samples`` training examples (epoch 0's order, from
peftlab's own loaders) once, before training. What they computed is recorded so that
``load_run`` and resume rebuild the model without data: EVA's ranks, alphas and adapted
modules in ``method.json`` (structure ``init``), CorDA's initial adapter (B0, A0) in every
checkpoint's method state, from which the residual base W - s B0 A0 is formed again exactly as
peft formed it. PiSSA, OLoRA and LoftQ are deterministic functions of the base weights and are
recomputed on rebuild.

An adapter trained on a changed base (pissa, olora, corda) is exported with peft's conversion
(``save_pretrained(path_initial_model_for_weight_conversion=...)``): the delta s (B A - B0 A0)
as a rank-2r LoRA on the original base, so ``PeftModel.from_pretrained(original_base, adapter)``
works. LoftQ's base is Q(W), not W: its export writes that base beside the adapter.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Optional

import torch

from ..errors import PeftlabError

INITS = ("default", "gaussian", "pissa", "olora", "eva", "corda", "loftq")
#: inits every LoRA-family method supports (they leave the base unchanged and need no data)
BASIC_INITS = ("default", "gaussian")
#: inits that change the frozen base weights at initialisation
BASE_CHANGING = ("pissa", "olora", "corda", "loftq")
#: inits that read training data before training
DATA_DEPENDENT = ("eva", "corda")
#: what ``init_lora_weights`` is for each init
PEFT_VALUE: dict[str, Any] = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora",
                              "eva": "eva", "corda": "corda", "loftq": "loftq"}


def init_problems(cfg, method_name: str, supported: tuple[str, ...]) -> list[str]:
    """Problems of ``lora.init`` for a run of ``method_name`` that supports ``supported``, before any work."""
    init = cfg.lora.init
    if init not in supported:
        return [f"`lora.init={init}` is not available for method {method_name} (it supports {', '.join(supported)}): "
                f"the peft initialisations pissa, olora, eva, corda and loftq come with method lora. Use --method=lora or "
                f"--lora.init={supported[0]}."]
    p = []
    quant = getattr(cfg.model, "quantization", "none")
    if init in BASE_CHANGING and quant != "none":
        p.append(f"`lora.init={init}` rewrites the frozen base weights (W - s B0 A0{', Q(W)' if init == 'loftq' else ''}), which a "
                 f"bitsandbytes-quantized base (model.quantization={quant}) cannot hold exactly: peft initialises them in "
                 "fp32/bf16 and expects the residual to be quantized afterwards. Use --model.quantization=none, or an init "
                 "that leaves the base alone (default, gaussian, eva).")
    if init == "loftq":
        missing = [what for what, ok in (("CUDA", torch.cuda.is_available()),
                                         ("the bitsandbytes package", importlib.util.find_spec("bitsandbytes") is not None))
                   if not ok]
        if missing or cfg.system.device == "cpu":
            p.append(f"`lora.init=loftq` quantizes the base with bitsandbytes on a CUDA device (peft's loftq_init has no CPU "
                     f"path), and this machine lacks {' and '.join(missing) or 'a device: system.device=cpu'}. Run it on a GPU "
                     "with bitsandbytes installed (pip install bitsandbytes), or use --lora.init=pissa (SVD of W, no quantizer).")
    if init in DATA_DEPENDENT and cfg.lora.init_samples < 1:
        p.append(f"`lora.init_samples` must be at least 1 for lora.init={init}, got {cfg.lora.init_samples}.")
    return p


def peft_kwargs(init: str, record: Optional[dict]) -> dict[str, Any]:
    """``LoraConfig`` keyword arguments of ``init``; ``record`` is what a trained run recorded
    (then nothing data-dependent runs again: CorDA's A, B and residual come from the checkpoint)."""
    from peft import EvaConfig, LoftQConfig
    from peft.tuners.lora.config import CordaConfig

    if init == "corda" and record is not None:
        return {"init_lora_weights": True}  # rebuilt from the recorded initial adapter (see apply_residual)
    kw: dict[str, Any] = {"init_lora_weights": PEFT_VALUE[init]}
    if init == "eva":
        kw["eva_config"] = EvaConfig()
        if record is not None:
            kw.update(target_modules=list(record["target_modules"]), rank_pattern=dict(record["rank_pattern"]),
                      alpha_pattern=dict(record["alpha_pattern"]))
    elif init == "corda":
        kw["corda_config"] = CordaConfig(corda_method="ipm")
    elif init == "loftq":
        kw["loftq_config"] = LoftQConfig(loftq_bits=4, loftq_iter=1)
    return kw


def _examples(batches, limit: int):
    """Single-example slices of the first ``limit`` training examples."""
    n = 0
    for batch in batches:
        rows = next(iter(batch.values())).shape[0]
        for i in range(rows):
            yield {k: v[i:i + 1] for k, v in batch.items()}
            n += 1
            if n >= limit:
                return


def _data_phase(model, ctx, fn) -> None:
    """Run ``fn()`` with the model on the run's device in eval mode (no dropout), the RNG untouched."""
    acc = ctx.accelerator
    device = acc.device if acc is not None else next(model.parameters()).device
    model.to(device)
    was = model.training
    model.eval()
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            fn()
    finally:
        model.train(was)


def corda_preprocess(model, config, ctx, samples: int) -> int:
    """peft's ``preprocess_corda`` on the first ``samples`` training examples (one per forward, as
    its covariance hook expects); returns how many it read."""
    from peft.tuners.lora.corda import preprocess_corda

    seen = []

    def run_model():
        for ex in _examples(ctx.train_batches(), samples):
            model(**{k: v for k, v in ex.items() if k != "labels"})
            seen.append(1)

    _data_phase(model, ctx, lambda: preprocess_corda(model, config, run_model=run_model))
    return len(seen)


def eva_initialise(peft_model, ctx, samples: int, task: str) -> int:
    """peft's ``initialize_lora_eva_weights`` on batches holding the first ``samples`` training
    examples; returns how many examples it read."""
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    batches, n = [], 0
    for batch in ctx.train_batches():
        batches.append(batch if task == "causal_lm" else {k: v for k, v in batch.items() if k != "labels"})
        n += next(iter(batch.values())).shape[0]
        if n >= samples:
            break
    # a classification batch's labels are one class per row, not the token mask EVA reads labels as
    if task != "causal_lm":
        peft_model.peft_config["default"].eva_config.use_label_mask = False
    _data_phase(peft_model, ctx, lambda: initialize_lora_eva_weights(peft_model, batches, show_progress_bar=False))
    return n


def eva_record(peft_model) -> dict[str, Any]:
    """EVA's data-dependent structure: the adapted modules and their ranks and alphas."""
    pc = peft_model.peft_config["default"]
    return {"target_modules": sorted(pc.target_modules), "rank_pattern": dict(sorted(pc.rank_pattern.items())),
            "alpha_pattern": {k: float(v) for k, v in sorted(pc.alpha_pattern.items())}}


def initial_adapter(peft_model) -> dict[str, torch.Tensor]:
    """The adapter tensors as they are now (B0, A0 right after init), peft's state-dict names, on CPU."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}


@torch.no_grad()
def apply_residual(peft_model, initial: dict[str, torch.Tensor]) -> int:
    """Form CorDA's residual base W - s B0 A0 from the recorded initial adapter, with the operations
    of peft's ``corda_init`` (fp32 product, transposed for GPT-2's Conv1D), so the base is the one
    training used, bit for bit. Returns the number of layers changed."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import transpose

    n = 0
    for name, mod in peft_model.named_modules():
        if not isinstance(mod, LoraLayer) or "default" not in mod.lora_A:
            continue
        a, b = initial.get(f"{name}.lora_A.weight"), initial.get(f"{name}.lora_B.weight")
        if a is None or b is None:
            continue
        base = mod.get_base_layer()
        w = base.weight
        a, b = a.to(w.device, torch.float32), b.to(w.device, torch.float32)
        delta = transpose(mod.scaling["default"] * b @ a, fan_in_fan_out=mod.fan_in_fan_out)
        base.weight.data = (w.data.to(torch.float32) - delta).to(w.dtype)
        n += 1
    return n


def save_initial(initial: dict[str, torch.Tensor], folder) -> None:
    """Write ``initial`` as a peft adapter weight file (for peft's weight conversion)."""
    from pathlib import Path

    from safetensors.torch import save_file

    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file(initial, str(Path(folder) / "adapter_model.safetensors"), metadata={"format": "pt"})


class Initialiser:
    """The ``lora.init`` of one LoRA run (not default/gaussian): applies it, records it, restores it.

    Args:
        method: the :class:`~peftlab.methods.lora.LoRA` instance (its config, context and ``_inject``).
        record: what a trained run recorded (``method.json``'s ``init``); None on a fresh start.
    """

    def __init__(self, method, record: Optional[dict]):
        self.method, self.init = method, method.cfg.lora.init
        self.given = record
        self.record: dict[str, Any] = dict(record) if record is not None else {"name": self.init}
        self.initial: Optional[dict[str, torch.Tensor]] = None  # B0, A0 of a base-changing init
        self.model = None
        self.residual_pending = False  # CorDA rebuilt without data: W - s B0 A0 formed when the method state arrives

    def apply(self, model):
        import warnings

        m, lc, ctx = self.method, self.method.cfg.lora, self.method.ctx
        if self.given is not None and self.given.get("name", self.init) != self.init:
            raise PeftlabError(f"method.json records lora.init={self.given.get('name')!r} but the config says {self.init!r}; the run's "
                               "config.json and checkpoint do not belong together.")
        if self.init in ("olora", "loftq"):
            conv = [n for n, mod in model.named_modules() if type(mod).__name__ == "Conv1D" and n.split(".")[-1] in ctx.target_modules]
            if conv:
                raise PeftlabError(f"lora.init={self.init} needs nn.Linear targets, but {conv[0]} is a GPT-2 Conv1D (peft's "
                                   f"{self.init}_init decomposes the weight as stored, which is transposed there). Use "
                                   "--lora.init=pissa, which handles Conv1D, or a model with linear layers.")
        config = m.peft_config(init_record=self.given)
        fresh = self.given is None
        if self.init == "corda" and fresh:
            self.record["examples"] = corda_preprocess(model, config, ctx, lc.init_samples)
            ctx.log.info(f"lora.init=corda: input covariance of {self.record['examples']} training example(s)")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(eva_config|initialize_lora_eva_weights|init_lora_weights).*")
            model = m._inject(model, config)  # (not low_cpu_mem_usage: meta adapter tensors cannot move to the run's device)
        if self.init == "eva" and fresh:
            self.record["examples"] = eva_initialise(model, ctx, lc.init_samples, ctx.task)
            self.record.update(eva_record(model))
            ctx.log.info(f"lora.init=eva: SVD of layer inputs over {self.record['examples']} training example(s); ranks "
                         f"{self.record['rank_pattern']}")
        if self.init in ("pissa", "olora", "loftq") or (self.init == "corda" and fresh):
            self.initial = initial_adapter(model)
        self.residual_pending = self.init == "corda" and not fresh
        self.model = model
        return model

    def state_dict(self) -> dict[str, Any]:
        # CorDA's B0, A0 depend on data: every checkpoint carries them, so a rebuild needs none
        return {"corda_initial": self.initial} if self.init == "corda" and self.initial is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.init != "corda":
            return
        initial = state.get("corda_initial")
        if initial is None:
            raise PeftlabError("this lora.init=corda checkpoint holds no initial adapter (corda_initial in method_state.pt), "
                               "so the residual base W - s B0 A0 cannot be rebuilt without data; the checkpoint is damaged "
                               "or was written by another version. Train the run again.")
        if self.residual_pending:
            apply_residual(self.model, initial)
            self.residual_pending = False
        self.initial = {k: v.to("cpu") for k, v in initial.items()}

    def export(self, model, target) -> None:
        """Save the adapter as one for the original base W (pissa, olora, corda: peft's conversion to a
        rank-2r LoRA, s (B A - B0 A0)); loftq: the adapter and its base Q(W) in ``target/loftq_base``."""
        import tempfile
        from pathlib import Path

        if self.init == "loftq":
            model.save_pretrained(target, safe_serialization=True)
            _save_loftq_base(model, Path(target) / "loftq_base")
            return
        if self.initial is None:
            raise PeftlabError(f"lora.init={self.init}: the initial adapter is not known (a CorDA run rebuilt without its "
                               "method state), so the adapter cannot be converted for the original base.")
        with tempfile.TemporaryDirectory(prefix="peftlab-init-") as tmp, torch.random.fork_rng():
            init_dir = Path(tmp) / "initial"
            save_initial(self.initial, init_dir)
            model.save_pretrained(target, safe_serialization=True, path_initial_model_for_weight_conversion=str(init_dir))
        # peft 0.21's conversion keeps only the lora_A/lora_B tensors: put back what it drops (a classification
        # head in modules_to_save, trained biases), unchanged
        from safetensors.torch import load_file, save_file

        path = Path(target) / "adapter_model.safetensors"
        converted = load_file(str(path))
        rest = {k: v for k, v in initial_adapter(model).items() if k not in converted and "lora_" not in k}
        if rest:
            save_file({**converted, **rest}, str(path), metadata={"format": "pt"})


def _save_loftq_base(model, folder) -> None:
    """The base weights LoftQ trains on (Q(W) dequantized in the target layers), as a transformers
    model folder, written from a copy with the adapters removed."""
    import copy

    base = copy.deepcopy(model).unload()
    base.save_pretrained(folder, safe_serialization=True)
