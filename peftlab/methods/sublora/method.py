"""SubLoRA: LoRA whose parameters live in a random d-dimensional subspace.

Lotfi et al., "Non-Vacuous Generalization Bounds for Large Language Models" (2023). All
LoRA parameters θ ∈ R^D (every A and B of the adapted modules, plus a classification
head if the task adds one) are written θ = θ₀ + P·w, θ₀ the LoRA initialisation and P a
random D×d projection (:mod:`peftlab.methods.projectors`) regenerated from a seed and
never stored. Only w ∈ R^d trains (and, in ``learned`` mode, one gate per layer).

Allocation modes (``sublora.allocation_mode``):

``uniform``  one projection over all of θ (the original SubLoRA): θ = θ₀ + P·w.
``fixed``    separate projections for the A and the B matrices: d_B = round(ρ·d),
             d_A = d − d_B, θ_A = θ₀_A + P_A·w[:d_A], θ_B = θ₀_B + P_B·w[d_A:].
``learned``  per layer ℓ a gate γ_ℓ = sigmoid(φ_ℓ) and a soft mask over the coordinates,
             m_i = sigmoid(s·(γ_ℓ·d − i)), i = 0..d−1; then θ_B,ℓ = θ₀_B,ℓ + P_B,ℓ·(w ⊙ m)
             and θ_A,ℓ = θ₀_A,ℓ + P_A,ℓ·(w ⊙ (1 − m)). γ → 1 gives all of w to B. Every
             layer and each of A/B has its own projector seed. Adapted modules outside the
             numbered layers (an LM head, a classifier) form one more group, ``other``; a
             group with only one side (a classification head alone) has no gate and reads
             all of w through its own projection.

Head parameters of a classification model (peft's ``modules_to_save``) are neither A nor B;
they join the B side (they act on outputs, as B does).

How it runs: the peft LoRA model stays a registered submodule of :class:`SubspaceModel`
(so ``.to()``, ``.eval()``, ``state_dict()`` and DDP behave as usual, and LoRA dropout is
off in eval mode); every forward computes θ from (w, φ) once and calls the peft model
with ``torch.func.functional_call``, substituting the LoRA tensors.

GPT-2's fused ``c_attn`` (q, k, v in one Conv1D of width 3·h): with
``sublora.fused_attn=qv`` (default) only the q and v thirds of lora_B belong to θ; the k
rows stay exactly zero, so the key projection is never adapted (q and v share one A of
rank r). With ``qkv`` the whole c_attn is adapted. The export is a plain peft LoRA on
c_attn either way (with zero k rows in ``qv``).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from ...errors import PeftlabError
from ...io import CsvLog, write_json
from ...models import check_targets
from ...options import opt
from ...rundir import RunDir
from ..base import Method
from ..fused_lora import install_fused_lora, use_fused
from ..lora import LoraSection, peft_task_type
from ..lora_init import BASIC_INITS, init_problems
from .projectors import FINGERPRINT_RTOL, derive_seed, fingerprint, fingerprint_difference, make_projector

ADAPTER = "default"
_LAYER_RE = re.compile(r"\.(?:h|layer|layers|block|blocks)\.(\d+)\.")
OTHER = "other"


class UnverifiedProjectorWarning(UserWarning):
    """A run rebuilt from a structure record without projector fingerprints (written before they existed)."""


@dataclass
class SubloraSection:
    intrinsic_dim: int = opt(1000, "d: dimension of the trained vector w (seed grid: 1000, 2000); must not exceed D, the number of LoRA parameters.")
    projector: Literal["kron", "hashed", "dense"] = opt("kron", "Random projection P: kron (the reference's Kronecker product of QR factors, default), hashed (seeded signed index map, cheapest), dense (QR Gaussian, small D·d only). All have orthonormal columns and O(D + d) memory except dense.")
    projector_seed: int = opt(137, "Seed of P (137 as in the reference code). Per-block seeds (fixed, learned) are derived from it.")
    init_seed: Optional[int] = opt(None, "Seed of θ₀, the LoRA initialisation (null: training.seed).")
    allocation_mode: Literal["uniform", "fixed", "learned"] = opt("uniform", "uniform: one projection for all LoRA parameters; fixed: separate A and B projections split by allocation_ratio; learned: per-layer sigmoid gates split the subspace.")
    allocation_ratio: float = opt(0.5, "ρ = d_B / d in fixed mode (d_B = round(ρ·d)); in learned mode the initial γ when gating_init_bias is null. Ignored in uniform mode.")
    gating_scale: float = opt(5.0, "Slope s of the soft mask m_i = sigmoid(s·(γ·d − i)) (learned mode).")
    gating_scale_final: Optional[float] = opt(None, "Anneal the slope linearly from gating_scale to this value over gating_anneal_steps optimizer steps (null: no annealing).")
    gating_anneal_steps: int = opt(0, "Optimizer steps of the slope annealing.")
    gating_init_bias: Optional[float] = opt(None, "Initial φ_ℓ of every gate (γ = sigmoid(φ)); null: logit(allocation_ratio), i.e. 0 for ρ = 0.5.")
    gating_lr: Optional[float] = opt(None, "Peak learning rate of the gates φ (null: training.learning_rate); follows the same schedule.")
    fused_attn: Literal["qv", "qkv"] = opt("qv", "GPT-2's fused c_attn: qv adapts only the query and value thirds (k rows of lora_B stay zero), qkv the whole projection.")

    def validate(self) -> list[str]:
        p = []
        if self.intrinsic_dim < 1:
            p.append(f"`sublora.intrinsic_dim` must be at least 1, got {self.intrinsic_dim}.")
        if not 0.0 <= self.allocation_ratio <= 1.0:
            p.append(f"`sublora.allocation_ratio` must be in [0, 1] (the share d_B / d of the B matrices), got {self.allocation_ratio}.")
        elif self.allocation_mode == "fixed" and self.intrinsic_dim >= 1:
            d_a, d_b = split_dims(self.intrinsic_dim, self.allocation_ratio)
            if d_a == 0 or d_b == 0:
                p.append(f"`sublora.allocation_mode=fixed` with intrinsic_dim={self.intrinsic_dim} and allocation_ratio={self.allocation_ratio} "
                         f"gives d_A={d_a}, d_B={d_b}; both must be at least 1. Move the ratio inside (0, 1) or use allocation_mode=uniform.")
        if not self.gating_scale > 0:
            p.append(f"`sublora.gating_scale` must be positive, got {self.gating_scale}.")
        if self.gating_scale_final is not None and not self.gating_scale_final > 0:
            p.append(f"`sublora.gating_scale_final` must be positive or null, got {self.gating_scale_final}.")
        if self.gating_scale_final is not None and self.gating_anneal_steps < 1:
            p.append("`sublora.gating_scale_final` needs `sublora.gating_anneal_steps` >= 1 (optimizer steps of the annealing), e.g. --sublora.gating_anneal_steps=1000.")
        if self.gating_anneal_steps < 0:
            p.append(f"`sublora.gating_anneal_steps` must be >= 0, got {self.gating_anneal_steps}.")
        if self.gating_lr is not None and not self.gating_lr > 0:
            p.append(f"`sublora.gating_lr` must be positive or null, got {self.gating_lr}.")
        return p

    def validate_unused(self, method: str) -> list[str]:
        """Allocation flags only make sense for SubLoRA: refuse them with another method."""
        set_ = [f"allocation_mode={self.allocation_mode}"] if self.allocation_mode != "uniform" else []
        if self.allocation_ratio != 0.5:
            set_.append(f"allocation_ratio={self.allocation_ratio}")
        if set_:
            return [f"`sublora.{set_[0]}` is set but method={method}; subspace allocation applies to SubLoRA only. "
                    f"Add --method=sublora, or drop the sublora allocation flags."]
        return []


def split_dims(d: int, ratio: float) -> tuple[int, int]:
    """(d_A, d_B) of fixed mode: d_B = round(ρ·d) (halves round up), d_A = d − d_B."""
    d_b = int(math.floor(ratio * d + 0.5))
    return d - d_b, d_b


# --------------------------------------------------------------------------- the plan
@dataclass
class Segment:
    """One trainable tensor of the peft model (or the selected rows of it) inside θ."""

    name: str  # parameter name inside the peft model
    kind: str  # A, B or head
    group: str  # layer index as a string, or "other"
    shape: list[int]
    rows: Optional[list[list[int]]] = None  # [lo, hi) row ranges that belong to θ (None: all)

    @property
    def row_index(self) -> Optional[list[int]]:
        return None if self.rows is None else [i for lo, hi in self.rows for i in range(lo, hi)]

    @property
    def numel(self) -> int:
        n = math.prod(self.shape)
        if self.rows is None:
            return n
        return len(self.row_index) * (n // self.shape[0])

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "group": self.group, "shape": self.shape, "rows": self.rows, "numel": self.numel}


@dataclass
class Block:
    """One projection: the segments it writes, its seed and which part of w it reads."""

    side: str  # all, A or B
    group: Optional[str]  # learned mode: the layer group; else None
    segments: list[int]  # indices into the segment list, in global order
    D: int
    d: int
    seed: int
    w_slice: Optional[list[int]] = None  # [lo, hi) of w (uniform, fixed); None in learned mode
    gate: Optional[int] = None  # learned mode: index of the gate
    offsets: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"side": self.side, "group": self.group, "segments": self.segments, "D": self.D, "d": self.d, "seed": self.seed,
                "w_slice": self.w_slice, "gate": self.gate}


def layer_group(name: str) -> str:
    m = _LAYER_RE.search("." + name)
    return m.group(1) if m else OTHER


def _fused_rows(model: torch.nn.Module, seg_name: str, mode: str) -> Optional[list[list[int]]]:
    """Rows of lora_B in θ for GPT-2's fused c_attn in qv mode (None: every row)."""
    if mode != "qv":
        return None
    mod_name = seg_name.split(".lora_B.")[0]
    if mod_name.split(".")[-1] != "c_attn":
        return None
    mod = model.get_submodule(mod_name)
    base = getattr(mod, "base_layer", None)
    nf, nx = getattr(base, "nf", None), getattr(getattr(base, "weight", None), "shape", [None])[0]
    if nf is None or nx is None or nf != 3 * nx:
        return None
    h = nx
    return [[0, h], [2 * h, 3 * h]]


def build_segments(peft_model: torch.nn.Module, fused_attn: str) -> list[Segment]:
    segs = []
    for n, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_A." in n:
            kind, rows = "A", None
        elif ".lora_B." in n:
            kind, rows = "B", _fused_rows(peft_model, n, fused_attn)
        elif ".lora_" in n or "lora_magnitude" in n:
            raise PeftlabError(f"SubLoRA does not know what to do with the adapter tensor {n}; only plain LoRA A/B are supported.")
        else:
            kind, rows = "head", None
        segs.append(Segment(n, kind, layer_group(n), list(p.shape), rows))
    if not segs:
        raise PeftlabError("SubLoRA found no trainable LoRA tensors after applying peft; check model.target_modules.")
    return segs


def plan_blocks(segs: list[Segment], sc: dict) -> tuple[list[Block], list[str]]:
    """Blocks (projections) and gate groups for the mode in ``sc`` (a structure-like dict)."""
    d, mode, seed = sc["d"], sc["mode"], sc["projector_seed"]
    idx = list(range(len(segs)))
    size = lambda ids: sum(segs[i].numel for i in ids)  # noqa: E731
    a_side = [i for i in idx if segs[i].kind == "A"]
    b_side = [i for i in idx if segs[i].kind != "A"]
    blocks: list[Block] = []
    groups: list[str] = []
    if mode == "uniform":
        blocks.append(Block("all", None, idx, size(idx), d, seed, [0, d]))
    elif mode == "fixed":
        d_a, d_b = sc["d_A"], sc["d_B"]
        if not a_side or not b_side:
            raise PeftlabError("fixed allocation needs both A and B matrices among the adapted parameters.")
        blocks.append(Block("A", None, a_side, size(a_side), d_a, derive_seed(seed, 0), [0, d_a]))
        blocks.append(Block("B", None, b_side, size(b_side), d_b, derive_seed(seed, 1), [d_a, d]))
    else:
        order: list[str] = []
        for i in idx:
            if segs[i].group not in order:
                order.append(segs[i].group)
        for gi, g in enumerate(order):
            a_ids = [i for i in a_side if segs[i].group == g]
            b_ids = [i for i in b_side if segs[i].group == g]
            if a_ids and b_ids:  # a gate splits w between this group's A and B
                for si, (side, ids) in enumerate((("A", a_ids), ("B", b_ids))):
                    blocks.append(Block(side, g, ids, size(ids), d, derive_seed(seed, 2 + gi, si), None, len(groups)))
                groups.append(g)
            else:  # only one side (e.g. a classification head alone): nothing to split, it reads all of w
                ids = a_ids or b_ids
                blocks.append(Block("A" if a_ids else "B", g, ids, size(ids), d, derive_seed(seed, 2 + gi, 0), [0, d]))
    for b in blocks:
        off, offs = 0, []
        for i in b.segments:
            offs.append(off)
            off += segs[i].numel
        b.offsets = offs
    return blocks, groups


def _check_dims(blocks: list[Block], mode: str, D: int) -> None:
    """d ≤ D for every projection. Learned mode gives all d coordinates to every layer, so only
    d ≤ D overall is required there; a layer block smaller than d gets a wide projection
    (orthonormal rows, see :class:`~peftlab.methods.projectors.WideProjector`)."""
    if mode == "learned":
        d = blocks[0].d
        if d > D:
            raise PeftlabError(f"sublora.intrinsic_dim={d:,} exceeds D={D:,}, the number of LoRA parameters it projects onto; "
                               f"use at most {D:,}, or adapt more modules / a larger lora.r.")
        return
    for b in blocks:
        if b.d > b.D:
            where = {"uniform": "all LoRA parameters", "fixed": f"the {b.side} matrices",
                     "learned": f"the {b.side} matrices of layer group {b.group}"}[mode]
            fix = {"uniform": f"at most {D:,}", "fixed": "a smaller intrinsic_dim or a ratio that gives this side fewer coordinates",
                   "learned": "at most the smallest per-layer block (learned mode projects all d coordinates into every layer's A and B)"}[mode]
            raise PeftlabError(
                f"sublora.intrinsic_dim asks for {b.d:,} coordinates on {where}, which hold only D={b.D:,} parameters "
                f"(D = {D:,} in all). Use {fix}, or adapt more modules / a larger lora.r.")


def check_projectors(structure: dict, blocks: list[Block], prints: list[list[float]], kind: str) -> None:
    """The projectors rebuilt from the recorded seeds are the ones the run was trained with.

    Seeds and θ₀ are checked elsewhere; this checks P itself, through the fingerprints
    (:func:`~peftlab.methods.sublora.projectors.fingerprint`) recorded at training. A record
    without them (a run trained before they were recorded) is accepted with a warning.
    """
    recorded = structure.get("projector_fingerprints")
    if recorded is None:
        warnings.warn(
            f"the structure record (method.json) of this SubLoRA run holds no projector fingerprints (it was written by an "
            f"older peftlab), so the {len(blocks)} projector(s) regenerated from its seeds cannot be verified: a change in the "
            "projector code or in torch's random functions since training would go unnoticed and the model (and any bound) "
            "would not be the trained one.", UnverifiedProjectorWarning, stacklevel=3)
        return
    if len(recorded) != len(prints):
        raise PeftlabError(f"the structure record holds {len(recorded)} projector fingerprints but the rebuilt model has "
                           f"{len(prints)} projectors; the record is damaged or from another peftlab version.")
    for k, (b, old, new) in enumerate(zip(blocks, recorded, prints)):
        diff = fingerprint_difference(old, new)
        if not diff <= FINGERPRINT_RTOL:
            where = f"side {b.side}" + (f", layer group {b.group}" if b.group is not None else "")
            raise PeftlabError(
                f"projector {k} ({kind}, {where}, D={b.D:,}, d={b.d:,}, seed {b.seed}) rebuilt from the recorded seed is not the "
                f"one the run was trained with: its fingerprint differs by {diff:.3g} (relative; at most {FINGERPRINT_RTOL:g} "
                f"is rounding). The projector code or torch's random functions (torch {torch.__version__} here) changed "
                "since training, so this would be a different model. Rebuild with the peftlab and torch versions that trained the run.")


def theta0_values(segs: list[Segment], peft_model: torch.nn.Module, init: str, seed: int) -> list[torch.Tensor]:
    """θ₀ of every segment (full tensors), from a generator seeded with ``init_seed``.

    A: peft's default Kaiming-uniform (bound 1/√fan_in) or N(0, 1/r) (``lora.init=gaussian``);
    B: zeros; head tensors keep the values the model was built with.
    """
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    params = dict(peft_model.named_parameters())
    out = []
    for s in segs:
        shape = tuple(s.shape)
        if s.kind == "A":
            r, fan_in = shape
            if init == "gaussian":
                t = torch.randn(shape, generator=g, dtype=torch.float64) / r
            else:
                t = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(fan_in)
            out.append(t.float())
        elif s.kind == "B":
            out.append(torch.zeros(shape))
        else:
            out.append(params[s.name].detach().float().cpu().clone())
    return out


class SubspaceModel(torch.nn.Module):
    """The peft LoRA model with its LoRA tensors computed as θ₀ + P·w at every forward."""

    def __init__(self, peft_model: torch.nn.Module, segs: list[Segment], blocks: list[Block], groups: list[str],
                 theta0: list[torch.Tensor], sc: dict):
        super().__init__()
        self.model = peft_model
        self.segs, self.blocks, self.groups = segs, blocks, groups
        self.mode, self.d = sc["mode"], sc["d"]
        self.w = torch.nn.Parameter(torch.zeros(self.d))
        if self.mode == "learned":
            self.phi = torch.nn.Parameter(torch.full((len(groups),), float(sc["gating_init_bias"])))
            self.register_buffer("coord", torch.arange(self.d, dtype=torch.float32), persistent=False)
        self.register_buffer("gating_scale", torch.tensor(float(sc.get("gating_scale", 5.0))))
        wide = self.mode == "learned"  # a layer's block may have fewer parameters than d (see _check_dims)
        self.projectors = torch.nn.ModuleList(make_projector(sc["projector"], b.D, b.d, b.seed, allow_wide=wide) for b in blocks)
        for k, b in enumerate(blocks):
            parts = []
            for i in b.segments:
                t = theta0[i]
                ri = segs[i].row_index
                parts.append((t if ri is None else t[ri]).reshape(-1))
            self.register_buffer(f"theta0_{k}", torch.cat(parts), persistent=False)
        for k, s in enumerate(segs):
            if s.rows is not None:
                self.register_buffer(f"rows_{k}", torch.tensor(s.row_index), persistent=False)
        # seeded constants (θ₀, projector factors, row indices) are identical on every process:
        # DDP need not broadcast them before each forward
        self._ddp_params_and_buffers_to_ignore = [n for n, _ in self.named_buffers()
                                                  if n.startswith(("projectors.", "theta0_", "rows_", "coord"))]
        # the peft tensors start at θ₀ (they are substituted at every forward anyway)
        params = dict(peft_model.named_parameters())
        with torch.no_grad():
            for s, t in zip(segs, theta0):
                params[s.name].copy_(t)
                params[s.name].requires_grad_(False)

    # the base model for Trainer._save_base_model and export
    def get_base_model(self):
        return self.model.get_base_model()

    @property
    def config(self):
        return self.model.config

    def gates(self) -> Optional[torch.Tensor]:
        return torch.sigmoid(self.phi) if self.mode == "learned" else None

    def masks(self) -> torch.Tensor:
        """m_{ℓ,i} = sigmoid(s·(γ_ℓ·d − i)), one row per gate group."""
        g = self.gates()
        return torch.sigmoid(self.gating_scale * (g[:, None] * self.d - self.coord[None, :]))

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        """name -> the LoRA tensor θ₀ + P·w of every segment (differentiable in w and φ)."""
        out: dict[str, torch.Tensor] = {}
        m = self.masks() if self.mode == "learned" else None
        for k, (b, proj) in enumerate(zip(self.blocks, self.projectors)):
            if b.w_slice is not None:
                inp = self.w[b.w_slice[0]:b.w_slice[1]]
            else:
                mask = m[b.gate]
                inp = self.w * (mask if b.side == "B" else 1 - mask)
            flat = getattr(self, f"theta0_{k}") + proj(inp)
            for i, off in zip(b.segments, b.offsets):
                s = self.segs[i]
                vals = flat[off:off + s.numel]
                if s.rows is None:
                    out[s.name] = vals.view(s.shape)
                else:
                    idx = getattr(self, f"rows_{i}")
                    full = torch.zeros(s.shape, dtype=vals.dtype, device=vals.device)
                    out[s.name] = full.index_copy(0, idx, vals.view(idx.numel(), -1))
        return out

    def forward(self, *args, **kwargs):
        # θ in float32 even under mixed precision (the base layers still autocast as usual)
        with torch.autocast(self.w.device.type, enabled=False):
            tensors = self.lora_tensors()
        return torch.func.functional_call(self.model, tensors, args, kwargs, strict=False)

    @torch.no_grad()
    def materialise(self) -> None:
        """Write θ₀ + P·w into the peft model's LoRA tensors (for export)."""
        params = dict(self.model.named_parameters())
        for n, t in self.lora_tensors().items():
            params[n].copy_(t)

    def projector_bytes(self) -> int:
        return sum(p.nbytes() for p in self.projectors)


# --------------------------------------------------------------------------- the method
class SubLoRA(Method):
    """LoRA restricted to a random subspace: only w (and the learned gates) train."""

    name = "sublora"
    config_sections = {"lora": LoraSection, "sublora": SubloraSection}
    exports_adapter = True
    display_name = "SubLoRA"
    quantized_base = True
    table_rank = 80
    size_axes = ("sublora.intrinsic_dim",)
    rank_axis = None  # an intrinsic dimension, not a rank
    axis_keys = ("sublora.intrinsic_dim", "sublora.allocation_mode", "sublora.allocation_ratio")
    short_names = {"sublora.intrinsic_dim": "d", "sublora.allocation_ratio": "ρ"}
    variant_keys = ("sublora.allocation_mode", "sublora.allocation_ratio")
    sharding = "replicate"  # w, φ and the LoRA tensors θ₀ + P·w whole on every process; the frozen base sharded
    allocation_arms = {"dim": "sublora.intrinsic_dim", "mode": "sublora.allocation_mode", "ratio": "sublora.allocation_ratio",
                       "uniform": "uniform", "fixed": "fixed", "learned": "learned"}

    def __init__(self, ctx):
        super().__init__(ctx)
        self.sc: SubloraSection = self.cfg.sublora
        self.record: Optional[dict] = None
        self.steps = 0
        self._trace = None
        self._resumed_at: Optional[int] = None

    @classmethod
    def validate_config(cls, cfg) -> list[str]:
        lc, p = cfg.lora, init_problems(cfg, cls.name, BASIC_INITS)
        if lc.bias != "none":
            p.append(f"SubLoRA projects only the LoRA matrices; `lora.bias={lc.bias}` would train biases outside the subspace. Use lora.bias=none.")
        if lc.loraplus_lr_ratio != 1.0:
            p.append("`lora.loraplus_lr_ratio` has no meaning for SubLoRA (A and B are not trained directly); use sublora.allocation_mode=fixed to weigh A against B.")
        if cfg.model.gradient_checkpointing:
            # the recompute runs in the backward pass, after functional_call has put the peft tensors (theta_0) back
            p.append("`model.gradient_checkpointing=true` cannot run with method=sublora: SubLoRA substitutes the LoRA tensors "
                     "theta_0 + P w for one forward call (torch.func.functional_call), and a checkpointed block recomputes in "
                     "the backward pass, after that substitution has ended, so it would see theta_0 instead (a CheckpointError "
                     "in the non-reentrant form, wrong gradients for w in the reentrant one). Train SubLoRA without "
                     "checkpointing (--model.gradient_checkpointing=false); its own state is only d numbers.")
        return p

    # --- the structure record ---------------------------------------------------------
    def settings(self) -> dict:
        """Everything that decides the adapted model, from the config (before the model exists)."""
        sc, lc = self.sc, self.cfg.lora
        d = sc.intrinsic_dim
        d_a, d_b = split_dims(d, sc.allocation_ratio) if sc.allocation_mode == "fixed" else (None, None)
        bias = sc.gating_init_bias
        if bias is None:
            rho = min(max(sc.allocation_ratio, 1e-4), 1 - 1e-4)
            bias = math.log(rho / (1 - rho))
        return {
            "method": self.name, "format": 1,
            "mode": sc.allocation_mode, "d": d, "d_A": d_a, "d_B": d_b, "ratio": sc.allocation_ratio,
            "projector": sc.projector, "projector_seed": sc.projector_seed,
            "init_seed": self.cfg.training.seed if sc.init_seed is None else sc.init_seed,
            "gating_scale": sc.gating_scale, "gating_init_bias": bias, "fused_attn": sc.fused_attn,
            "lora": {"r": lc.r, "alpha": lc.alpha, "dropout": lc.dropout, "use_rslora": lc.use_rslora, "init": lc.init,
                     "target_modules": list(self.ctx.target_modules)},
            "task": self.ctx.task,
        }

    def structure(self, model=None) -> dict:
        if self.record is None:
            raise PeftlabError("SubLoRA.structure() is known only after apply().")
        return self.record

    # --- model -------------------------------------------------------------------------
    def apply(self, model, structure: Optional[dict] = None):
        import warnings

        from peft import LoraConfig, get_peft_model


        sc = dict(structure) if structure is not None else self.settings()
        if sc.get("method", self.name) != self.name:
            raise PeftlabError(f"this structure record is for method {sc.get('method')!r}, not sublora.")
        lc = sc["lora"]
        check_targets(model, lc["target_modules"])
        config = LoraConfig(r=lc["r"], lora_alpha=lc["alpha"], lora_dropout=lc["dropout"], bias="none",
                            target_modules=list(lc["target_modules"]), task_type=peft_task_type(sc["task"]),
                            use_rslora=lc["use_rslora"])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            try:
                peft_model = get_peft_model(model, config)
            except ValueError as e:
                raise PeftlabError(f"peft cannot adapt target_modules={lc['target_modules']}: {str(e).splitlines()[0]} "
                                   "Point --model.target_modules at linear (or GPT-2 Conv1D) layers.") from None
        if use_fused(self.cfg.lora.fused, self.ctx.device):  # lora.fused, as for LoRA
            self.ctx.log.info(f"lora.fused: fused LoRA forward in {install_fused_lora(peft_model)} layer(s)")
        segs = build_segments(peft_model, sc["fused_attn"])
        blocks, groups = plan_blocks(segs, sc)
        D = sum(s.numel for s in segs)
        _check_dims(blocks, sc["mode"], D)
        if structure is not None:
            want = [s["name"] for s in structure.get("segments", [])]
            have = [s.name for s in segs]
            if want and (want != have or structure.get("D") != D):
                raise PeftlabError(f"the structure record does not match the rebuilt model (D {structure.get('D')} vs {D}, "
                                   f"{len(want)} vs {len(have)} tensors); was the run trained with another model or peft version?")
            recorded = [(b["D"], b["d"], b["seed"]) for b in structure.get("blocks", [])]
            if recorded and recorded != [(b.D, b.d, b.seed) for b in blocks]:
                raise PeftlabError("the projections rebuilt from the structure record (sizes, derived seeds) differ from the "
                                   "recorded ones; this peftlab version derives projector seeds differently from the one that trained the run.")
        theta0 = theta0_values(segs, peft_model, lc["init"], sc["init_seed"])
        wrapped = SubspaceModel(peft_model, segs, blocks, groups, theta0, sc)
        prints = [fingerprint(p) for p in wrapped.projectors]
        if structure is not None:
            check_projectors(structure, blocks, prints, sc["projector"])
        D_A = sum(s.numel for s in segs if s.kind == "A")
        record = {**sc, "D": D, "D_A": D_A, "D_B": D - D_A,
                  "groups": groups,
                  "segments": [s.to_dict() for s in segs],
                  "blocks": [b.to_dict() for b in blocks],
                  "projector_bytes": wrapped.projector_bytes(),
                  "theta0_sum": float(sum(t.double().sum() for t in theta0)),
                  "projector_fingerprints": prints}
        if structure is not None and "theta0_sum" in structure and not math.isclose(structure["theta0_sum"], record["theta0_sum"], rel_tol=1e-9, abs_tol=1e-9):
            raise PeftlabError("θ₀ regenerated from init_seed differs from the one the run was trained with; "
                               "the base model or torch version changed. Rebuild with the original environment.")
        self.record = record
        fused = sum(1 for s in segs if s.rows is not None)
        msg = (f"SubLoRA: D = {D:,} LoRA parameters (A {D_A:,}, B/head {D - D_A:,}) in {len(segs)} tensors"
               f"{f', {fused} fused c_attn B matrices restricted to q,v rows' if fused else ''}; d = {sc['d']:,}, "
               f"mode {sc['mode']}, projector {sc['projector']} ({record['projector_bytes'] / 2**20:.2f} MiB vs "
               f"{D * sc['d'] * 4 / 2**20:,.0f} MiB for a dense P)")
        self.ctx.log.info(msg)  # the run's logger prints to the console and train.log
        return wrapped

    def trainable_parameters(self, model):
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def replicated_parameters(self, model):
        """w (and φ), plus the peft LoRA tensors that every forward replaces by θ₀ + P·w: FSDP must not
        gather its own copy of them over the substituted ones. P is regenerated from its seed on each process."""
        params = dict(model.model.named_parameters())
        return [p for _, p in self.trainable_parameters(model)] + [params[s.name] for s in model.segs]

    def param_groups(self, model):
        t = self.cfg.training
        groups = [{"params": [model.w], "weight_decay": t.weight_decay, "name": "subspace"}]
        if getattr(model, "mode", None) == "learned":
            lr = self.sc.gating_lr if self.sc.gating_lr is not None else t.learning_rate
            groups.append({"params": [model.phi], "weight_decay": 0.0, "name": "gates", "lr": lr})
        return groups

    # --- hooks and metrics -------------------------------------------------------------
    def current_scale(self) -> float:
        sc = self.sc
        if sc.gating_scale_final is None or sc.gating_anneal_steps < 1:
            return sc.gating_scale
        frac = min(self.steps / sc.gating_anneal_steps, 1.0)
        return sc.gating_scale + (sc.gating_scale_final - sc.gating_scale) * frac

    @torch.no_grad()
    def after_optimizer_step(self, model, lr: float) -> None:
        self.steps += 1
        if model.mode != "learned":
            return
        model.gating_scale.fill_(self.current_scale())
        acc = self.ctx.accelerator
        if self.ctx.run_dir is not None and (acc is None or acc.is_main_process):
            self._trace_log().write({"step": self.steps, "gating_scale": float(model.gating_scale),
                                     **{f"gamma_{g}": float(v) for g, v in zip(model.groups, model.gates().tolist())}})

    def _trace_log(self):
        if self._trace is None:
            path = RunDir(self.ctx.run_dir).gating_trace_path
            self._trace = CsvLog(path)
            if self._resumed_at is None:
                path.unlink(missing_ok=True)
            else:
                self._trace.truncate_after(self._resumed_at)
        return self._trace

    @torch.no_grad()
    def step_metrics(self, model) -> dict[str, float]:
        if model.mode != "learned":
            return {}
        return {"gamma_mean": float(model.gates().mean())}

    def progress_fields(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"γ": f"{metrics['gamma_mean']:.3f}"} if "gamma_mean" in metrics else {}

    @torch.no_grad()
    def module_metrics(self, model):
        """Learned mode: γ_ℓ and the soft share of B, Σ_i m_i / d, per layer group."""
        if model.mode != "learned":
            return None
        g, share = model.gates().tolist(), (model.masks().sum(1) / model.d).tolist()
        return {f"layer.{k}": {"gamma": a, "b_share": b} for k, a, b in zip(model.groups, g, share)}

    @classmethod
    def profile_info(cls, cfg) -> dict[str, Any]:
        return {"rank": cfg.lora.r, "in_place": False, "refresh_interval": 1}

    def param_counts(self, model) -> tuple[int, int]:
        n = sum(p.numel() for _, p in self.trainable_parameters(model))
        return n, n

    # --- state -------------------------------------------------------------------------
    def model_state(self, model) -> dict[str, torch.Tensor]:
        out = {n: p.detach().clone() for n, p in self.trainable_parameters(model)}
        out["gating_scale"] = model.gating_scale.detach().clone()
        return out

    def load_model_state(self, model, state: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        missing = [n for n in params if params[n].requires_grad and n not in state]
        if missing:
            raise PeftlabError(f"the checkpoint lacks the SubLoRA tensors {missing}; it was written by another method or mode.")
        with torch.no_grad():
            for n, t in state.items():
                if n == "gating_scale":
                    model.gating_scale.copy_(t)
                elif n in params:
                    if params[n].shape != t.shape:
                        raise PeftlabError(f"checkpoint tensor {n} has shape {tuple(t.shape)}, the model {tuple(params[n].shape)}; "
                                           "was it trained with another intrinsic_dim?")
                    params[n].copy_(t)

    def scoring_module(self, model):
        """The inner peft model with θ₀ + P·w written into its LoRA tensors: the same function
        as the subspace model, without recomputing P·w at every forward pass."""
        if isinstance(model, SubspaceModel):
            model.materialise()
            return model.model
        return model

    def compressible_state(self, model) -> dict[str, torch.Tensor]:
        """What a compression bound encodes: w, and the gates φ in learned mode."""
        out = {"w": model.w.detach().clone()}
        if model.mode == "learned":
            out["phi"] = model.phi.detach().clone()
        return out

    def compression_groups(self, state: dict[str, torch.Tensor]) -> list[list[str]]:
        """w and the gates φ get separate codebooks in a compression bound: the gate logits can
        be far larger than w's entries, and in one codebook on ±max|·| they would take w's levels."""
        return [[k] for k in state]

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self._resumed_at = self.steps

    # --- results -------------------------------------------------------------------------
    def allocation(self, model) -> dict[str, Any]:
        r = self.record or {}
        out = {"method": self.name, "mode": r.get("mode"), "d": r.get("d"), "D": r.get("D"), "D_A": r.get("D_A"), "D_B": r.get("D_B"),
               "projector": r.get("projector")}
        out["modules"] = self._modules(model)
        if model.mode == "uniform":
            out.update(d_A=None, d_B=None)
        elif model.mode == "fixed":
            out.update(d_A=r["d_A"], d_B=r["d_B"], ratio=r["ratio"])
        else:
            with torch.no_grad():
                g = model.gates().tolist()
                mB = model.masks().sum(1).tolist()
            out.update(gating_scale=float(model.gating_scale), layers=model.groups,
                       gamma={k: v for k, v in zip(model.groups, g)},
                       d_B={k: v for k, v in zip(model.groups, mB)},
                       d_A={k: model.d - v for k, v in zip(model.groups, mB)})
        return out

    @torch.no_grad()
    def _modules(self, model) -> dict[str, dict[str, Any]]:
        """allocation.json's common schema: per adapted module its rank, layer group, the LoRA
        parameters it holds on each side and, in learned mode, its group's γ."""
        gam = dict(zip(model.groups, model.gates().tolist())) if model.mode == "learned" else {}
        mods: dict[str, dict[str, Any]] = {}
        for s in model.segs:
            key = s.name.split(".lora_")[0].split(".modules_to_save")[0]
            if key.startswith("base_model.model."):
                key = key[len("base_model.model."):]
            m = mods.setdefault(key, {"rank": None, "group": s.group, "D_A": 0, "D_B": 0})
            if s.kind == "A":
                m["rank"], m["D_A"] = s.shape[0], m["D_A"] + s.numel
            else:
                m["D_B"] += s.numel
            if s.group in gam:
                m["gamma"] = gam[s.group]
        return mods

    def summary(self) -> dict[str, Any]:
        r = self.record or {}
        return {k: r.get(k) for k in ("mode", "d", "d_A", "d_B", "D", "D_A", "D_B", "projector", "projector_seed", "init_seed", "projector_bytes")} | {
            "dense_projector_bytes": (r.get("D") or 0) * (r.get("d") or 0) * 4}

    def export(self, model, out_dir: Path, tokenizer=None) -> Path:
        """``adapter/``: plain peft LoRA with θ₀ + P·w materialised; ``subspace/``: (w, φ, structure)."""
        from safetensors.torch import save_file


        out_dir = Path(out_dir)
        model.materialise()
        target = out_dir / "adapter"
        # the base embeddings are frozen: a tied LM head needs no copy of them in the adapter
        model.model.save_pretrained(target, safe_serialization=True, save_embedding_layers=False)
        if tokenizer is not None:
            tokenizer.save_pretrained(target)
        compact = out_dir / "subspace"
        compact.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.compressible_state(model).items()}
        tensors["gating_scale"] = model.gating_scale.detach().cpu().reshape(1)
        save_file(tensors, str(compact / "subspace.safetensors"), metadata={"format": "pt"})
        write_json(compact / "structure.json", self.structure(model))
        write_json(RunDir(out_dir).allocation_path, self.allocation(model))
        return target
