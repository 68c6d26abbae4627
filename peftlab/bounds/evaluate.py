"""From a trained run to ``bounds_metrics.json``: compress, verify, score, bound.

    metrics = run_bounds("runs/sublora", bounds_config(["--bounds.levels=11"]))

Steps, in order (cheap checks first, so bad input fails before any model is built):

1. check the bounds section, the run directory and the token bins (document level needs
   ``eot_indices.npy`` and ``doc_lengths.npy``);
2. rebuild the model with :func:`peftlab.runs.load_run`;
3. take ``method.compressible_state(model)`` (SubLoRA: the subspace vector and gates;
   other methods: their trainable adapter tensors), quantize it to ``L`` levels
   (optionally refined by quantization-aware training), arithmetic-code the symbols,
   decode them back and check the decoded vector is the quantized one;
4. score a sample of units with the full-precision weights (the quantization's own
   cost), load the *quantized* weights into the model and score the whole sample;
5. compute the bound for every α, keep the best, add top-k error bounds, write JSON.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..data.bins import INCOMPLETE, TokenBin
from ..errors import PeftlabError
from ..io import atomic_write_text, output_path_problem
from ..methods.base import Method
from ..models.quant import compute_dtype, describe
from ..rundir import RunDir
from ..runs import load_run
from ..runs.device import followup_device
from ..runs.load import damaged_fix, require_final
from . import coding
from . import formulas as F
from .config import BoundsConfig
from .quantize import Quantized, flatten_state, quantization_aware_training, quantize, unflatten_state
from . import parallel
from .parallel import World
from .scoring import TOPK, Rows, document_rows, document_spans, num_sequences, reduce_scores, sample_units, score_batches, sequence_rows, \
    token_rows

PREPARE_HINT = "peftlab data prepare DATASET --output-dir DIR --tokenizer TOKENIZER"

STATEMENTS = {
    "document_level": (
        "Upper bound, holding with probability >= 1-delta, on the expected smoothed per-token loss (bits per token, "
        "averaged within a document) of the quantized model on a new document drawn from the same distribution as the "
        "training documents (Lotfi et al. 2023, with subsampling)."
    ),
    "sequence_level": (
        "Upper bound, holding with probability >= 1-delta, on the expected smoothed per-token loss (bits per token) of the "
        "quantized model on a new context-length chunk drawn like the aligned training chunks (assumes the chunks are i.i.d.)."
    ),
    "token_level": (
        "Upper bound, holding with probability >= 1-delta, on (1/m) * sum_i E[smoothed loss of token i | the training "
        "tokens before it]: the average over the m training positions of the expected next-token loss (bits) under the data "
        "distribution given the actual preceding context (Lotfi et al. 2024, martingale bound). It is not a bound on the "
        "loss of a new document."
    ),
}


# ------------------------------------------------------------------ data


def resolve_data(bcfg: BoundsConfig, run_cfg: Any) -> Path:
    """The token-bin directory of the training data, checked (files, document files)."""

    dataset = getattr(getattr(run_cfg, "data", None), "dataset", None)
    tok = (getattr(run_cfg.data, "tokenizer", None) or getattr(run_cfg.model, "name", "TOKENIZER")) if run_cfg is not None else "TOKENIZER"
    if bcfg.data is not None:
        path = Path(bcfg.data).expanduser()
        where = "--bounds.data"
    else:
        path = Path(str(dataset)).expanduser() if dataset else None
        where = f"the run's data.dataset ({dataset!r})"
        if path is None or not (path / "train.bin").is_file():
            raise PeftlabError(
                f"The run was trained on {dataset!r}, which is not a token-bin directory, so the bound has no training tokens to "
                f"score. Write them with `peftlab data prepare {dataset} --output-dir DIR --tokenizer {tok}` and pass "
                "--bounds.data=DIR (use the tokenizer the run used)."
            )
    if not path.is_dir():
        raise PeftlabError(f"{where} names {str(path)!r}, which is not a directory; give a token-bin directory written by `{PREPARE_HINT}`.")
    if not (path / "train.bin").is_file():
        raise PeftlabError(f"{path} has no train.bin; write the token bins with `{PREPARE_HINT}` (DIR = {path}).")
    if (path / INCOMPLETE).exists():
        raise PeftlabError(f"{path} holds an interrupted preparation ({INCOMPLETE}); re-run `{PREPARE_HINT} --overwrite`.")
    if bcfg.bound_type == "document_level":
        for name in ("eot_indices.npy", "doc_lengths.npy"):
            if not (path / name).is_file():
                raise PeftlabError(
                    f"A document-level bound needs {path / name}, which does not exist: documents are the spans between EOT "
                    f"tokens of train.bin. Re-write the directory with `{PREPARE_HINT} --overwrite` (DIR = {path}), which "
                    "writes eot_indices.npy and doc_lengths.npy, or choose --bounds.bound_type=sequence_level or token_level."
                )
    return path


# ------------------------------------------------------------------ what is compressed


def compressible_state(method: Method, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors the bound encodes: :meth:`Method.compressible_state` (by default the trainable ones), detached."""
    return {k: v.detach() for k, v in method.compressible_state(model).items()}


def load_state(method: Method, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put (quantized) values of the compressible tensors back into the model."""
    fn = getattr(method, "load_compressible_state", None)
    if fn is not None:
        fn(model, state)
        return
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    missing = [k for k in state if k not in named]
    if missing:
        raise PeftlabError(
            f"cannot load the quantized tensors back: the model has no tensor named {missing[0]!r} ({len(missing)} missing). "
            "The method's compressible_state() must name model parameters or the method must define load_compressible_state()."
        )
    with torch.no_grad():
        for k, v in state.items():
            if named[k].shape != v.shape:
                raise PeftlabError(f"quantized tensor {k!r} has shape {tuple(v.shape)} but the model's is {tuple(named[k].shape)}.")
            named[k].copy_(v.to(named[k].device, named[k].dtype))


def compression_groups(method: Method, state: dict[str, torch.Tensor]) -> list[list[str]]:
    """Which tensors share a codebook: the method's choice (``method.compression_groups(state)``,
    e.g. SubLoRA codes its gates apart from w), else all of them in one group."""
    fn = getattr(method, "compression_groups", None)
    groups = [list(g) for g in fn(state)] if fn is not None else [list(state)]
    names = [k for g in groups for k in g]
    if sorted(names) != sorted(state) or len(set(names)) != len(names) or not all(groups):
        raise PeftlabError(f"the method's compression_groups {groups} must split the compressible tensors {list(state)} into "
                           "non-empty groups, each tensor in exactly one.")
    return groups


@dataclass
class GroupCode:
    """One codebook's share of the message: its tensors, quantization and code length."""

    tensors: list[str]
    quantized: Quantized
    coded_bits: int
    message_bits: float
    prefix_bits: float

    def to_dict(self) -> dict[str, Any]:
        return {"tensors": self.tensors, "numbers": len(self.quantized.symbols), "levels": self.quantized.levels,
                "coded_symbol_bits": self.coded_bits, "message_bits": self.message_bits, "prefix_bits": self.prefix_bits}


@dataclass
class Compression:
    quantized: Quantized  #: the first group's quantization (the only one unless the method splits its state)
    state: dict[str, torch.Tensor]  #: dequantized tensors, shaped like the originals
    d: int
    coded_bits: int
    message_bits: float
    prefix_bits: float
    extra_bits: int
    kl_nats: float
    mse: float
    max_abs: float
    groups: list[GroupCode]


Refiner = Callable[[list[Quantized]], "tuple[list[Quantized], dict[str, torch.Tensor]]"]


def group_levels(levels: int, numbers: int) -> int:
    """Levels of a group's codebook: ``levels``, but no more than the group has numbers (at least 2)."""
    return max(2, min(int(levels), int(numbers)))


def compress(state: dict[str, torch.Tensor], bcfg: BoundsConfig, refine: Optional[Refiner] = None,
             groups: Optional[list[list[str]]] = None) -> Compression:
    """Quantize, code, decode and check; the prior's code length and the KL term.

    Each group of tensors (``groups``, default all in one) gets its own codebook of
    :func:`group_levels` levels and its own arithmetic code; the message is the
    concatenation of the groups' prefix-free codes, so ``K = Σ_g (ℓ_g + 2·log₂ ℓ_g)``
    (one group: ``ℓ + 2·log₂ ℓ`` as before). ``refine`` (quantization-aware training) takes
    and returns the groups' quantizations, with the refined full-precision tensors.
    """
    groups = [list(state)] if groups is None else groups
    parts = [{k: state[k] for k in g} for g in groups]
    vecs = [flatten_state(p) for p in parts]
    d = int(sum(v.size for v in vecs))
    if d < 2:
        raise PeftlabError(f"the compressible state holds {d} number(s); there is nothing to compress for a bound.")
    if not all(np.all(np.isfinite(v)) for v in vecs):
        raise PeftlabError("the trained tensors hold NaN or infinite values; the run diverged and has no bound.")
    qs = [quantize(v, group_levels(bcfg.levels, v.size), use_kmeans=bcfg.use_kmeans) for v in vecs]
    if refine is not None:
        qs, refined = refine(qs)
        vecs = [flatten_state({k: refined[k] for k in g}) for g in groups]  # the error below is against the refined weights
    codes, values, out = [], [], {}
    for g, part, q in zip(groups, parts, qs):
        enc = coding.encode(q.symbols, q.levels)
        decoded = coding.decode(enc)
        if not np.array_equal(decoded, q.symbols):  # pragma: no cover - constriction guarantees this
            raise RuntimeError("arithmetic decoding did not reproduce the quantized symbols")
        v = q.codebook.astype(np.float32)[decoded]
        values.append(v)
        out.update(unflatten_state(v.astype(np.float64), part))
        message = F.message_length_bits(enc.num_bits, q.levels, len(q.symbols))
        codes.append(GroupCode(list(g), q, enc.num_bits, message, F.prefix_free_length(message)))
    message = float(sum(c.message_bits for c in codes))
    prefix = float(sum(c.prefix_bits for c in codes))
    extra = F.extra_bits(len(bcfg.alphas), bcfg.misc_extra_bits)
    allv, ref = np.concatenate(values), np.concatenate(vecs)
    return Compression(
        quantized=qs[0], state={k: out[k] for k in state}, d=d, coded_bits=int(sum(c.coded_bits for c in codes)),
        message_bits=message, prefix_bits=prefix, extra_bits=extra, kl_nats=F.kl_nats(prefix, extra),
        mse=float(np.mean((allv - ref) ** 2)), max_abs=float(np.max(np.abs(ref))), groups=codes,
    )


# ------------------------------------------------------------------ units


@dataclass
class Sample:
    rows: Rows
    units: np.ndarray  #: unique unit ids
    weights: np.ndarray  #: multiplicity of each unit in the sample
    m: int  #: units in the training data
    n: int  #: sampled units (with repetitions)
    sampled: bool


def build_sample(bound_type: str, data_dir: Path, tokens: np.ndarray, context: int, bcfg: BoundsConfig) -> Sample:
    N = len(tokens)
    if bound_type == "document_level":
        eot = np.load(data_dir / "eot_indices.npy", mmap_mode="r")
        lengths = np.load(data_dir / "doc_lengths.npy", mmap_mode="r")
        starts = document_spans(np.asarray(eot), np.asarray(lengths), N)
        m = len(starts)
        units, w, sampled = sample_units(m, bcfg.num_docs, bcfg.seed)
        rows = document_rows(starts, np.asarray(lengths), units, context, bcfg.stride)
    elif bound_type == "sequence_level":
        m = num_sequences(N, context)
        if m < 1:
            raise PeftlabError(f"train.bin holds {N} tokens, fewer than one sequence of {context + 1}; lower --bounds.context_length.")
        units, w, sampled = sample_units(m, bcfg.num_docs, bcfg.seed)
        rows = sequence_rows(units, context)
    else:
        m = N
        units, w, sampled = sample_units(m, bcfg.num_docs, bcfg.seed)
        rows = token_rows(units, context)
    return Sample(rows, units, w, m, int(w.sum()), sampled)


def _subset_rows(rows: Rows, keep_units: np.ndarray) -> Rows:
    """Rows of the units in ``keep_units`` (positions into the sample), renumbered 0..k-1."""
    remap = -np.ones(int(rows.unit.max()) + 1 if len(rows) else 0, dtype=np.int64)
    remap[keep_units] = np.arange(len(keep_units))
    sel = remap[rows.unit] >= 0
    return Rows(rows.start[sel], rows.length[sel], rows.n_new[sel], remap[rows.unit[sel]])


# ------------------------------------------------------------------ the bound


def delta_split(m: int, n: int, delta: float, union_bits: int) -> dict[str, Any]:
    """How δ is shared between the two terms, and the union each pays (written to the metrics)."""
    occam, sampling = F.confidence_split(m, n, delta)
    return {
        "occam": occam,
        "sampling": sampling,
        "choices": 2 ** int(union_bits),
        "union_bits": int(union_bits),
        "sampling_per_choice": sampling / 2 ** int(union_bits),
    }


def confidence_statement(m: int, n: int, delta: float, num_alphas: int, misc_bits: int, union_bits: int) -> str:
    """The sentence of ``statement`` that says how δ is split and what is union-bounded."""
    choices = f"up to 2^{union_bits} = {2 ** union_bits} choices made on this sample ({num_alphas} values of alpha, " \
              f"{F.hyperparameter_bits(num_alphas)} bits, and misc_extra_bits = {misc_bits} bits for every other configuration tried)"
    if n == m:
        return (f"Every one of the m = {m} units is scored, so there is no sampling term: all of delta = {delta:g} goes to the "
                f"Occam (PAC-Bayes) term, which pays the union over the hypotheses (prior 2^-K, K the prefix-free message "
                f"length) and over the {choices} through its extra bits. Each reported bound (smoothed loss, each top-k "
                "error) holds with probability >= 1-delta.")
    occam, sampling = F.confidence_split(m, n, delta)
    return (f"delta = {delta:g} is split with r = n/(n+m) = {n}/({n}+{m}): r*delta = {occam:.6g} to the Occam (PAC-Bayes) term "
            f"over all m units, a union over the hypotheses (prior 2^-K, K the prefix-free message length) and over the "
            f"{choices} through its extra bits; (1-r)*delta = {sampling:.6g} to the Hoeffding term of the n sampled units, "
            f"union-bounded over the same {2 ** union_bits} choices ({sampling / 2 ** union_bits:.6g} each). Each reported "
            "bound (smoothed loss, each top-k error) holds with probability >= 1-delta.")


def _weighted_mean(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (x * w).sum(-1) / w.sum()


def bound_table(unit_loss: np.ndarray, unit_err: np.ndarray, weights: np.ndarray, alphas, vocab: int, kl: float, m: int, n: int,
                delta: float, *, union_bits: float) -> dict[str, Any]:
    """Per-α bounds, the best α, top-k error bounds (Δ = 1).

    ``kl`` holds the ``union_bits`` already (the prior pays the union over the choices); the
    sampling term pays them again (:func:`peftlab.bounds.formulas.hoeffding_subsampled_bound`),
    because the best α (and every choice counted in ``misc_extra_bits``) is picked on this sample.
    """
    risks = _weighted_mean(unit_loss, weights)  # (A+1,)
    rows = []
    for i, a in enumerate(alphas):
        dlt = F.smoothing_delta(a, vocab)
        rows.append({"alpha": float(a), "empirical_bpd": float(risks[i]), "delta_range_bits": dlt,
                     "bound_value": F.hoeffding_subsampled_bound(float(risks[i]), kl, m, n, delta, dlt, union_bits)})
    best = min(rows, key=lambda r: r["bound_value"])
    errs = _weighted_mean(unit_err, weights)
    topk = {}
    for j, k in enumerate(TOPK):
        topk[f"top{k}_error"] = float(errs[j])
        topk[f"top{k}_error_bound"] = min(1.0, F.hoeffding_subsampled_bound(float(errs[j]), kl, m, n, delta, 1.0, union_bits))
    return {"per_alpha": rows, "best": best, "unsmoothed_bpd": float(risks[-1]), **topk}


def _on_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def compute_bounds(model: torch.nn.Module, method: Method, run_cfg: Any, bcfg: BoundsConfig, data_dir: Path,
                   device: torch.device, log: Callable[[str], None] = print, world: Optional[World] = None) -> dict[str, Any]:
    """Everything after loading: compress, score, bound. Returns the metrics dictionary.

    ``world``: the processes scoring together (:mod:`~peftlab.bounds.parallel`); each scores
    its share of the batches, and the result is the one of a single process."""
    world = world or World()

    t0 = time.perf_counter()
    tb = TokenBin(data_dir, "train")
    tokens = tb.tokens()
    eot_id = int(tb.meta["eot_token_id"])
    model.eval()
    model.to(device)

    max_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    block = getattr(getattr(run_cfg, "data", None), "block_size", None) if run_cfg is not None else None
    context = bcfg.context_length or block or max_pos or 1024
    if max_pos:
        context = min(context, int(max_pos))
    if bcfg.bound_type == "document_level" and bcfg.stride > context:
        raise PeftlabError(f"--bounds.stride={bcfg.stride} exceeds the context of {context} tokens; choose a stride of at most {context}.")

    state = compressible_state(method, model)
    if not state:
        raise PeftlabError("the run's method exposes no compressible tensors (nothing was trained), so there is no compression bound.")
    groups = compression_groups(method, state)
    state = {k: state[k] for g in groups for k in g}  # group by group: QAT sees each group's entries consecutively
    fp_state = {k: v.detach().clone() for k, v in state.items()}

    refine = None
    if bcfg.quant_iters > 0:
        refine = _qat_refiner(model, state, tokens, context, bcfg, device, log)
    comp = compress(state, bcfg, refine, groups)
    if refine is not None:  # QAT moved the full-precision weights; the fp baseline is the refined one
        fp_state = compressible_state(method, model)
        fp_state = {k: v.detach().clone() for k, v in fp_state.items()}
    if world.size > 1:  # every process scores rank 0's model (QAT on a GPU need not be bit-reproducible)
        comp.state = _on_cpu(comp.state)
        comp, fp_state = world.broadcast((comp, _on_cpu(fp_state)))
    log(f"bounds: compressed {comp.d:,} numbers to {comp.message_bits:,.0f} bits "
        f"({comp.coded_bits:,} coded + header), prefix-free {comp.prefix_bits:,.1f} bits, KL {comp.kl_nats:,.1f} nats")

    sample = build_sample(bcfg.bound_type, data_dir, tokens, context, bcfg)
    alphas = tuple(float(a) for a in bcfg.alphas)
    autocast = torch.bfloat16 if (bcfg.dtype == "bf16" and device.type == "cuda") else None
    kw = dict(device=device, batch_tokens=bcfg.batch_tokens, autocast_dtype=autocast, progress=bcfg.progress_bar and world.main,
              head=bcfg.head, batch_filter=world.batch_filter(),
              compile=bcfg.compile == "on" or (bcfg.compile == "auto" and device.type == "cuda"),
              compile_body=bcfg.compile_body == "on", log=log if world.main else None)
    unit_name = {"document_level": "documents", "sequence_level": "sequences", "token_level": "tokens"}[bcfg.bound_type]

    # the quantization's own cost: a seeded subset of the sample, full precision first
    k = min(bcfg.full_precision_units, len(sample.units))
    fp = None
    subset = np.sort(np.random.default_rng(bcfg.seed + 1).permutation(len(sample.units))[:k]) if k else np.zeros(0, dtype=np.int64)
    t_score = time.perf_counter()

    def score(rows: Rows, units: int, desc: str):
        part = score_batches(method.scoring_module(model), tokens, rows, eot_id, alphas, desc=desc, **kw)
        return reduce_scores(rows, units, alphas, world.gather(part))

    if k:
        load_state(method, model, fp_state)
        fp = score(_subset_rows(sample.rows, subset), k, f"full precision ({unit_name})")
    load_state(method, model, comp.state)  # the bound is about the quantized model
    sc = score(sample.rows, len(sample.units), f"quantized ({unit_name})")
    score_time = time.perf_counter() - t_score

    loss, err = sc.unit_means()
    vocab = sc.vocab_size
    table = bound_table(loss, err, sample.weights, alphas, vocab, comp.kl_nats, sample.m, sample.n, bcfg.delta,
                        union_bits=comp.extra_bits)
    best = table["best"]
    best_i = alphas.index(best["alpha"])
    quant_cost: dict[str, Any] = {"units": int(k), "mse": comp.mse, "max_abs_full_precision": comp.max_abs}
    if fp is not None:
        fl, _ = fp.unit_means()
        w = sample.weights[subset]
        quant_cost.update({
            "full_precision_bpd": float(_weighted_mean(fl[best_i], w)),
            "quantized_bpd": float(_weighted_mean(loss[best_i, subset], w)),
            "full_precision_unsmoothed_bpd": float(_weighted_mean(fl[-1], w)),
            "quantized_unsmoothed_bpd": float(_weighted_mean(loss[-1, subset], w)),
        })
    threshold = math.log2(vocab)
    wall = time.perf_counter() - t0
    metrics = {
        "bound_type": bcfg.bound_type,
        "statement": STATEMENTS[bcfg.bound_type] + " " + confidence_statement(sample.m, sample.n, bcfg.delta, len(alphas),
                                                                              bcfg.misc_extra_bits, comp.extra_bits),
        "delta_split": delta_split(sample.m, sample.n, bcfg.delta, comp.extra_bits),
        "bound_value": best["bound_value"],
        "bound_units": "bits per token",
        "empirical_bpd": best["empirical_bpd"],
        "best_alpha": best["alpha"],
        "delta_range_bits": best["delta_range_bits"],
        "kl_divergence": comp.kl_nats,
        "kl_divergence_units": "nats",
        "compressed_size_bits": comp.message_bits,
        "coded_symbol_bits": comp.coded_bits,
        "prefix_message_len": comp.prefix_bits,
        "extra_bits": comp.extra_bits,
        "decode_verified": True,
        "levels": comp.quantized.levels,
        "use_kmeans": bcfg.use_kmeans,
        "quant_iters": bcfg.quant_iters,
        "compressed_numbers": comp.d,
        "compressed_tensors": len(state),
        "compression_groups": [g.to_dict() for g in comp.groups],
        "n": sample.n,
        "n_unique": int(len(sample.units)),
        "m": sample.m,
        "subsampled": sample.sampled,
        "delta": bcfg.delta,
        "vocab_size": vocab,
        "vacuous_threshold_bits": threshold,
        "non_vacuous": bool(best["bound_value"] < threshold),
        "unsmoothed_bpd": table["unsmoothed_bpd"],
        **{key: table[key] for key in table if key.startswith("top")},
        "per_alpha": table["per_alpha"],
        "quantization_cost": quant_cost,
        "context_length": context,
        "stride": bcfg.stride if bcfg.bound_type == "document_level" else None,
        "seed": bcfg.seed,
        "tokens_scored": int(sc.tokens.sum()),
        "scoring_time_s": score_time,
        "scoring_path": sc.path,
        "scoring_processes": world.size,
        f"{unit_name}_per_second": len(sample.units) / max(score_time, 1e-9),
        "wall_time_s": wall,
        "device": str(device),
        "data": str(data_dir),
    }
    return metrics


def _qat_refiner(model, state, tokens, context, bcfg, device, log):
    params = dict(model.named_parameters())
    missing = [k for k in state if k not in params]
    if missing:
        raise PeftlabError(
            f"--bounds.quant_iters needs the compressible tensors to be model parameters; {missing[0]!r} is not. Use --bounds.quant_iters=0."
        )
    live = {k: params[k] for k in state}
    rng = np.random.default_rng(bcfg.seed + 2)
    N = len(tokens)
    L = min(context, N - 1)

    def loss_fn():
        starts = rng.integers(0, N - L, size=8)
        x = torch.from_numpy(np.stack([np.asarray(tokens[s:s + L + 1], dtype=np.int64) for s in starts])).to(device)
        out = model(input_ids=x[:, :-1])
        return torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), x[:, 1:].flatten())

    def refine(qs: list[Quantized]) -> tuple[list[Quantized], dict[str, torch.Tensor]]:
        log(f"bounds: quantization-aware training, {bcfg.quant_iters} steps")
        with torch.enable_grad():
            out = quantization_aware_training(live, list(qs), loss_fn, bcfg.quant_iters, bcfg.quant_lr)
        return out, {k: p.detach().clone() for k, p in live.items()}  # the refined full-precision weights

    return refine


# ------------------------------------------------------------------ the command


def pick_device(name: str, run_device: Optional[str] = None) -> torch.device:
    """``--bounds.device``: auto follows the run's ``system.device`` (its GPU under a sweep's --gpus), see followup_device."""
    return torch.device(followup_device(name, run_device, torch.cuda.is_available()))


def write_metrics(metrics: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, json.dumps(metrics, indent=2, allow_nan=False) + "\n")


def check_output(out: Path, where: str) -> None:
    """The metrics file can be written at ``out`` (checked before the work, not after it)."""
    if out.is_dir():
        raise PeftlabError(f"{where}: {out} is a directory; give the path of the JSON file to write, e.g. {out / 'bounds_metrics.json'}.")
    problem = output_path_problem(str(out.parent))
    if problem:
        raise PeftlabError(f"{where}: {out} cannot be written: {problem} Give a writable --bounds.output=FILE.json.")


def base_statement(run_cfg) -> dict[str, Any]:
    """What the bound is conditioned on: the frozen base the adapter was trained and scored on. With
    ``model.quantization`` that base is the quantized one, so the prior (and every scored
    likelihood) is the quantized base's, not the full-precision model's."""
    return {"name": run_cfg.model.name, "quantization": run_cfg.model.quantization, "double_quant": run_cfg.model.double_quant,
            "compute_dtype": str(compute_dtype(run_cfg)).replace("torch.", ""),
            "prior": f"the quantized base ({describe(run_cfg)}): the bound holds for the adapter on this quantized model, "
                     "not on the full-precision one"}


def run_bounds(run_dir: str | Path, bcfg: BoundsConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``peftlab bounds RUN_DIR``: check inputs, load the run, compute, write ``bounds_metrics.json``."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "config.json").is_file():
        raise PeftlabError(f"{run_dir} is not a peftlab run directory (no config.json); give the output.dir of a finished `peftlab train`.")

    rd = RunDir(run_dir)
    run_cfg = rd.config()
    task = (rd.meta() or {}).get("task") or getattr(getattr(run_cfg, "model", None), "task", "auto")
    if task == "classification":
        raise PeftlabError(f"{run_dir} is a classification run; compression bounds here are for causal language models (next-token loss).")
    require_final(rd, None, "bound")
    out = Path(bcfg.output).expanduser() if bcfg.output else rd.bounds_path
    check_output(out, "--bounds.output" if bcfg.output else f"the run directory ({run_dir})")
    data_dir = resolve_data(bcfg, run_cfg)
    world, rank_device = parallel.start(bcfg.device)
    device = torch.device(rank_device) if rank_device else pick_device(bcfg.device, getattr(getattr(run_cfg, "system", None), "device", None))
    if device.type == "cuda" and bcfg.dtype == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: fast, deterministic run to run
    loaded = load_run(run_dir, device=str(device), fix=damaged_fix(rd, None))
    if loaded.task != "causal_lm":
        raise PeftlabError(f"{run_dir} holds a {loaded.task} model; compression bounds need a causal language model.")

    if loaded.tokenizer is not None:
        TokenBin(data_dir, "train").check_tokenizer(loaded.tokenizer)
    try:
        metrics = compute_bounds(loaded.model, loaded.method, run_cfg, bcfg, data_dir, device, log if world.main else (lambda s: None),
                                 world)
    finally:
        parallel.stop(world)
    metrics = {"run_dir": str(run_dir), "method": getattr(run_cfg, "method", None), **metrics}
    if run_cfg.model.quantization != "none":
        metrics["base_model"] = base_statement(run_cfg)
    if world.main:
        write_metrics(metrics, out)
    return metrics


__all__ = ["run_bounds", "compute_bounds", "compress", "compression_groups", "group_levels", "resolve_data", "compressible_state",
           "load_state", "bound_table", "build_sample", "write_metrics", "STATEMENTS", "confidence_statement", "delta_split"]
