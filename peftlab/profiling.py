"""``peftlab profile CONFIG.yaml``: optimizer-state memory, a peak-memory breakdown and FLOPs of
one training step, for the configured method beside an AdamW (full fine-tuning) baseline and
rSVD-Adam at a sweep of ranks.

Each variant takes one real step on a synthetic batch (random token ids, random labels; no
tokenizer or data download): forward, backward, ``optimizer.step()`` with the learning rate set
to 0 (the optimizer allocates and fills its state as usual, the weights stay put). Then:

* optimizer-state memory is summed from the tensors actually in ``optimizer.state`` and split by
  parameter group (moments, projectors, other such as step counters);
* the memory breakdown is parameters + gradients + optimizer state + activations, where
  activations are the bytes of the distinct tensors autograd saved for backward (parameters
  excluded), counted with ``torch.autograd.graph.saved_tensors_hooks``; on CUDA the measured
  ``torch.cuda.max_memory_allocated`` of the step is added as ``peak_allocated``;
* FLOPs of the forward, the backward and the optimizer step are counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions and attention;
  elementwise ops, QR and SVD are not counted).

Files (in ``--output-dir``, default ``<output.dir>/profile``): optimizer_memory_comparison.csv,
memory_breakdown_r{rank}.csv, flops_profiler_stats.csv, profile_summary.json. Columns are
documented in docs/rsvd.md.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from .build import apply_method, build_bare_base, make_method, task_from_names, trainable_to_float32
from .errors import PeftlabError
from .evaluation import mixed_precision_autocast
from .io import atomic_write_text, strict_json_dumps, write_csv
from .methods import METHODS
from .models import DEFAULT_TARGETS, check_positions
from .train.sharding import transformer_blocks
from .runs.device import followup_device

MB = 2**20
OPTIMIZER_COLUMNS = ["method", "rank", "group", "params", "moment_bytes", "projector_bytes", "other_bytes", "state_bytes",
                     "state_mb", "adamw_state_bytes", "savings_mb", "savings_pct"]
BREAKDOWN_COLUMNS = ["method", "rank", "component", "bytes", "mb", "source"]
FLOPS_COLUMNS = ["method", "rank", "phase", "flops", "gflops", "batch_size", "seq_len"]
PER_RANK_COLUMNS = ["method", "rank", "world_size", "component", "bytes", "mb", "source"]
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
PROJECTOR_KEYS = ("proj",)


# ----------------------------------------------------------------------------- FLOPs
def _heads_expanded(formula):
    """torch's attention FLOP formula for grouped-query attention (fewer key/value heads than query heads,
    Qwen2.5 and Llama-3): torch asserts equal heads; the kernel computes as if the key/value heads were repeated,
    so the 4-d shapes are counted with the query's heads."""

    def f(*args, out_shape=None, **kwargs):
        heads = max((a[1] for a in args if isinstance(a, tuple) and len(a) == 4), default=None)
        args = tuple(torch.Size((a[0], heads, *a[2:])) if isinstance(a, tuple) and len(a) == 4 else a for a in args)
        return formula(*args, out_val=out_shape, **kwargs)

    return f


def flop_counter() -> FlopCounterMode:
    """``FlopCounterMode`` that also counts grouped-query attention."""
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    # the (batch, heads, seq, dim) scaled-dot-product entries only: the others take raw tensors in another layout
    ops = [getattr(aten, f"_scaled_dot_product_{k}_attention{b}") for k in ("flash", "efficient", "cudnn") for b in ("", "_backward")]
    gqa = {op: _heads_expanded(flop_registry[op]) for op in ops if op in flop_registry}
    return FlopCounterMode(display=False, custom_mapping=gqa)


# ----------------------------------------------------------------------------- batch
def synthetic_batch(model, task: str, num_labels: int, batch_size: int, seq_len: int, seed: int, device) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = ids.clone() if task == "causal_lm" else torch.randint(0, num_labels, (batch_size,), generator=g)
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------- measurements
def state_bytes_by_group(optimizer: torch.optim.Optimizer, names: Optional[dict[int, str]] = None) -> list[dict]:
    """One record per param group: name, params, moment/projector/other/total bytes of its state
    (and ``names``, the parameter names, when a map ``id(param) -> name`` is given)."""
    out = []
    for i, g in enumerate(optimizer.param_groups):
        rec = {"group": g.get("name", f"group{i}"), "params": sum(p.numel() for p in g["params"]),
               "moment_bytes": 0, "projector_bytes": 0, "other_bytes": 0}
        if names is not None:
            rec["names"] = [names.get(id(p), "") for p in g["params"]]
        for p in g["params"]:
            for key, v in optimizer.state.get(p, {}).items():
                if not torch.is_tensor(v):
                    continue
                n = v.numel() * v.element_size()
                col = "moment_bytes" if key in MOMENT_KEYS else "projector_bytes" if key in PROJECTOR_KEYS else "other_bytes"
                rec[col] += n
        rec["state_bytes"] = rec["moment_bytes"] + rec["projector_bytes"] + rec["other_bytes"]
        out.append(rec)
    return out


def _param_state_bytes(optimizer, names: dict[int, str]) -> dict[str, int]:
    out = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            out[names.get(id(p), str(id(p)))] = sum(v.numel() * v.element_size() for v in optimizer.state.get(p, {}).values()
                                                     if torch.is_tensor(v))
    return out


class SavedTensorBytes:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""

    def __init__(self, model: torch.nn.Module):
        self.exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor):
        try:
            st = t.untyped_storage()
            key = st.data_ptr()
            if key and key not in self.exclude and key not in self.seen:
                self.seen.add(key)
                self.bytes += st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _shard_bytes(p: torch.Tensor, world: int) -> int:
    """Bytes of one process's FSDP2 shard of ``p``: dim 0 split in ``world`` parts, padded to equal size."""
    rows = p.shape[0] if p.ndim else 1
    return -(-rows // world) * (p.numel() // max(rows, 1)) * p.element_size()


def fsdp_per_rank(model: torch.nn.Module, method, optimizer, world: int, activation_bytes: int) -> dict[str, int]:
    """Memory of one process of ``system.sharding=fsdp`` over ``world`` processes, from the unsharded model
    after one step (train/sharding.py shards it so): the frozen base (and, for a method that shards, its
    trainable tensors with their gradients and optimizer state) in 1/world padded row shards; the
    replicated tensors of an adapter method whole, with their gradients and state; ``gathered``: the
    transient whole copies FSDP all-gathers, the root group (everything outside the blocks, gathered
    for the whole forward and backward) plus two blocks (the running one and the prefetched next), and
    for a method that shards one block's whole gradients before they are reduce-scattered;
    activations as measured (they follow the per-process batch, which sharding does not change)."""
    repl = {id(p) for p in method.replicated_parameters(model)} if method.sharding == "replicate" else set()
    params = list({id(p): p for p in model.parameters()}.values())
    in_block: set[int] = set()
    block_bytes = [0]
    for b in transformer_blocks(model):
        ps = [p for p in b.parameters() if id(p) not in repl]
        in_block.update(id(p) for p in ps)
        block_bytes.append(sum(p.numel() * p.element_size() for p in ps))
    root = sum(p.numel() * p.element_size() for p in params if id(p) not in repl and id(p) not in in_block)
    full = lambda p: p.numel() * p.element_size()  # noqa: E731
    per = lambda p: full(p) if id(p) in repl else _shard_bytes(p, world)  # noqa: E731
    out = {"parameters": sum(per(p) for p in params)}
    out["gradients"] = sum(per(p.grad) if id(p) not in repl else full(p.grad) for p in params if p.grad is not None)
    state = 0
    for p, st in optimizer.state.items():
        for v in st.values():
            if torch.is_tensor(v) and v.ndim:  # moments have the parameter's shape: sharded with it
                state += full(v) if id(p) in repl else _shard_bytes(v, world)
            elif torch.is_tensor(v):
                state += full(v)
    out["optimizer_state"] = state
    out["activations"] = activation_bytes
    out["gathered"] = root + 2 * max(block_bytes)
    if method.sharding != "replicate":  # a block's whole gradients exist until they are reduce-scattered
        out["gathered"] += max(block_bytes)
    out["total"] = sum(out.values())
    return out


def profile_variant(base: torch.nn.Module, vcfg, task: str, num_labels: int, batch: dict, device, log=None,
                    world_size: Optional[list[int]] = None) -> dict[str, Any]:
    """One real training step of ``vcfg.method`` on a copy of ``base``; returns every measurement
    (for each of ``world_size``, also the memory of one process of ``system.sharding=fsdp``: :func:`fsdp_per_rank`)."""
    info = METHODS[vcfg.method].profile_info(vcfg)
    # methods that only flip requires_grad (full, plain rsvd) leave the weights as they were with lr = 0:
    # the base model is reused; methods that wrap or replace modules work on a copy.
    # A base stored in bf16 (model.base_dtype) gets its trainable tensors in float32 as the run has them: a copy then.
    low = any(p.is_floating_point() and p.dtype != torch.float32 for p in base.parameters())
    model = base if info["in_place"] and not low else copy.deepcopy(base)
    targets = list(vcfg.model.target_modules or DEFAULT_TARGETS.get(model.config.model_type, ["q_proj", "v_proj"]))
    autocast = mixed_precision_autocast(vcfg.system.dtype, device)  # the run's mixed precision

    def compute_loss(mdl, b):
        with autocast():
            return mdl(**b).loss

    with tempfile.TemporaryDirectory() as scratch:
        method = make_method(vcfg, task, targets, device=device, train_batches=lambda: iter([batch] * 4), compute_loss=compute_loss,
                             run_dir=Path(scratch), log=log or logging.getLogger("peftlab.profile"))
        model = apply_method(method, model)
        if low:
            trainable_to_float32(model)
        model.to(device)
        model.train()
        optimizer = method.build_optimizer(model)
        for g in optimizer.param_groups:
            g["lr"] = 0.0
        names = {id(p): n for n, p in model.named_parameters()}
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_alloc = torch.cuda.memory_allocated()
        counter = flop_counter()
        with counter:
            with SavedTensorBytes(model) as saved:
                loss = compute_loss(model, batch)
        fwd = counter.get_total_flops()
        if cuda:
            torch.cuda.synchronize()
            after_fwd = torch.cuda.memory_allocated()
        counter = flop_counter()
        with counter:
            loss.backward()
        bwd = counter.get_total_flops()
        del loss
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        if cuda:  # forward + backward at their worst moment, less the weights and gradients: what activations cost
            torch.cuda.synchronize()
            activation_peak = max(torch.cuda.max_memory_allocated() - base_alloc - grads, saved.bytes)
        method.before_clip(model)
        counter = flop_counter()
        with counter:
            optimizer.step()
        refresh_flops = counter.get_total_flops()
        method.after_optimizer_step(model, 0.0)
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base_alloc
        # A second step on the same gradients: the steady-state cost (no projector refresh).
        counter = flop_counter()
        with counter:
            optimizer.step()
        steady_flops = counter.get_total_flops()
        interval = info["refresh_interval"]
        groups = state_bytes_by_group(optimizer, names)
        params = {id(p): p for p in model.parameters()}
        out = {
            "method": vcfg.method,
            "groups": groups,
            "per_param_state": _param_state_bytes(optimizer, names),
            "state_bytes": sum(g["state_bytes"] for g in groups),
            "trainable_params": sum(p.numel() for p in params.values() if p.requires_grad),
            "total_params": sum(p.numel() for p in params.values()),
            "param_bytes": sum(p.numel() * p.element_size() for p in params.values()),
            "grad_bytes": grads,
            "activation_bytes": saved.bytes,
            "flops": {"forward": fwd, "backward": bwd, "train_step": fwd + bwd, "optimizer_step_first": refresh_flops,
                      "optimizer_step": steady_flops,
                      "optimizer_step_amortized": steady_flops + (refresh_flops - steady_flops) / interval},
        }
        if cuda:
            out["cuda_peak_bytes"] = peak + base_alloc
            out["cuda_forward_delta_bytes"] = after_fwd - base_alloc
            out["cuda_activation_peak_bytes"] = activation_peak
        # activations per process: on CUDA as measured (saved tensors, backward temporaries such as the loss's
        # gradient, the recomputed block under gradient checkpointing); elsewhere the saved tensors alone (low)
        out["activation_source"] = "cuda" if cuda else "saved tensors"
        act = activation_peak if cuda else saved.bytes
        out["fsdp_per_rank"] = {w: fsdp_per_rank(model, method, optimizer, w, act) for w in world_size or []}
        for p in model.parameters():
            p.grad = None
        del optimizer, model
    return out


def _rank_label(cfg) -> Optional[int]:
    return METHODS[cfg.method].profile_info(cfg)["rank"]


# ----------------------------------------------------------------------------- the command
def run_profile(cfg, output_dir: Optional[Path] = None, ranks: Optional[list[int]] = None, batch_size: Optional[int] = None,
                seq_len: Optional[int] = None, device: Optional[str] = None, echo: bool = True,
                world_size: Optional[int | list[int]] = None) -> dict[str, Any]:
    """Profile ``cfg``'s method, AdamW and rSVD at ``ranks``; write the CSV files; return the measurements.
    With ``system.sharding=fsdp``, also the memory of one process for each of ``world_size`` processes (default 1)
    (``memory_per_rank_fsdp_w{N}.csv``). A baseline variant that does not fit on the GPU is left out with a note."""
    worlds = [world_size] if isinstance(world_size, int) else list(world_size or [])
    if worlds and cfg.system.sharding == "none":
        raise PeftlabError(f"--world-size {','.join(map(str, worlds))} gives the memory per process of a sharded run; add "
                           "--system.sharding=fsdp (without sharding every process holds the whole breakdown above).")
    if any(w < 1 for w in worlds):
        raise PeftlabError(f"--world-size takes positive integers separated by commas (e.g. 1,2,8), got {worlds}.")
    worlds = (sorted(set(worlds)) or [1]) if cfg.system.sharding != "none" else []
    ranks = [4, 8, 16, 64, 128] if ranks is None else ranks
    # default: a folder of its own under ./profiles, never inside a run directory (output.dir may name one)
    out_dir = Path(output_dir) if output_dir is not None else Path("profiles") / f"{Path(cfg.output.dir).name}-{cfg.method}"
    if (out_dir / "config.json").is_file() or (out_dir / "results_final.json").is_file():
        raise PeftlabError(f"{out_dir} is a run directory; profile files go elsewhere. Pass another --output-dir "
                           f"(default: profiles/<run name>-<method>).")
    # an explicit device wins; else the run's own system.device (auto: its GPU when one is visible)
    device = torch.device(followup_device(device or "auto", cfg.system.device, torch.cuda.is_available(), "--system.device"))
    if cfg.system.num_threads:
        torch.set_num_threads(cfg.system.num_threads)
    task, num_labels = task_from_names(cfg)
    bs = batch_size or cfg.training.batch_size
    sl = seq_len or (cfg.data.max_length if task == "classification" else cfg.data.block_size)
    base = build_bare_base(cfg, task, num_labels, device)
    base_params = sum(p.numel() for p in base.parameters())  # the model's own count (training reports it), no adapters
    check_positions(base, sl, "--seq-len" if seq_len else ("data.max_length" if task == "classification" else "data.block_size"), cfg.model.name)
    batch = synthetic_batch(base, task, num_labels, bs, sl, cfg.training.seed, device)

    reference = next(m for m in METHODS.values() if m.profile_reference)
    variants: list[tuple[str, Any]] = [("adamw", cfg.replace({"method": reference.name})), ("configured", cfg)]
    for swept in (m for m in METHODS.values() if m.profile_rank_key):
        for r in ranks:
            v = cfg.replace({"method": swept.name, swept.profile_rank_key: r})
            if v.to_dict() != cfg.to_dict():  # the configured method is already this variant
                variants.append((f"{swept.name}_r{r}", v))
    results, left_out = [], []
    for label, vcfg in variants:
        try:
            res = profile_variant(base, vcfg, task, num_labels, batch, device, world_size=worlds if label == "configured" else None)
        except torch.cuda.OutOfMemoryError:
            if label == "configured":
                raise
            # a baseline (AdamW over every weight of an 8B model) need not fit where the method does
            for prm in base.parameters():
                prm.grad = None
            left_out.append(label)
        else:
            res["label"] = label
            res["rank"] = _rank_label(vcfg)
            res["display"] = "adamw" if label == "adamw" else vcfg.method
            results.append(res)
            continue
        torch.cuda.empty_cache()  # out of the handler: its traceback no longer holds the failed variant
        print(f"note: the {left_out[-1]} baseline does not fit in the GPU's memory at this shape; left out (its columns are empty)")
    out_dir.mkdir(parents=True, exist_ok=True)
    conf = next(r for r in results if r["label"] == "configured")
    adam = next((r for r in results if r["label"] == "adamw"), None)
    rows = []
    for res in results:
        for g in res["groups"]:
            row = {"method": res["display"], "rank": res["rank"], **{k: g[k] for k in ("group", "params", "moment_bytes",
                   "projector_bytes", "other_bytes", "state_bytes")}, "state_mb": round(g["state_bytes"] / MB, 2)}
            # AdamW's state for the same parameters (matched by name), when the method kept the names.
            if adam and all(n in adam["per_param_state"] for n in g.get("names", [""])):
                ref = sum(adam["per_param_state"][n] for n in g["names"])
                row.update(adamw_state_bytes=ref, savings_mb=round((ref - g["state_bytes"]) / MB, 2),
                           savings_pct=round(100 * (1 - g["state_bytes"] / ref), 2) if ref else None)
            rows.append(row)
        total = {"method": res["display"], "rank": res["rank"], "group": "total", "params": res["trainable_params"],
                 "moment_bytes": sum(g["moment_bytes"] for g in res["groups"]),
                 "projector_bytes": sum(g["projector_bytes"] for g in res["groups"]),
                 "other_bytes": sum(g["other_bytes"] for g in res["groups"]), "state_bytes": res["state_bytes"],
                 "state_mb": round(res["state_bytes"] / MB, 2)}
        if adam:
            total.update(adamw_state_bytes=adam["state_bytes"], savings_mb=round((adam["state_bytes"] - res["state_bytes"]) / MB, 2),
                         savings_pct=round(100 * (1 - res["state_bytes"] / adam["state_bytes"]), 2) if adam["state_bytes"] else None)
        rows.append(total)
    write_csv(out_dir / "optimizer_memory_comparison.csv", OPTIMIZER_COLUMNS, rows)

    rank = conf["rank"]
    breakdown = []
    for res in (r for r in (conf, adam) if r):
        comps = {"parameters": res["param_bytes"], "gradients": res["grad_bytes"], "optimizer_state": res["state_bytes"],
                 "activations": res["activation_bytes"]}
        comps["total"] = sum(comps.values())
        for c, b in comps.items():
            breakdown.append({"method": res["display"], "rank": res["rank"], "component": c, "bytes": b, "mb": round(b / MB, 2),
                              "source": "computed"})
        if "cuda_peak_bytes" in res:
            breakdown.append({"method": res["display"], "rank": res["rank"], "component": "peak_allocated",
                              "bytes": res["cuda_peak_bytes"], "mb": round(res["cuda_peak_bytes"] / MB, 2), "source": "cuda"})
    breakdown_name = f"memory_breakdown_r{rank}.csv" if rank is not None else f"memory_breakdown_{cfg.method}.csv"
    write_csv(out_dir / breakdown_name, BREAKDOWN_COLUMNS, breakdown)

    per_rank, per_rank_names = [], []
    for w in worlds:
        rows_w = [{"method": conf["display"], "rank": rank, "world_size": w, "component": c, "bytes": b, "mb": round(b / MB, 2),
                   "source": conf["activation_source"] if c in ("activations", "total") else "computed"}
                  for c, b in conf["fsdp_per_rank"][w].items()]
        per_rank_names.append(f"memory_per_rank_fsdp_w{w}.csv")
        write_csv(out_dir / per_rank_names[-1], PER_RANK_COLUMNS, rows_w)
        per_rank.extend(rows_w)

    flops_rows = []
    for res in results:
        for phase, f in res["flops"].items():
            flops_rows.append({"method": res["display"], "rank": res["rank"], "phase": phase,
                               "gflops": round(f / 1e9, 4), "flops": round(f), "batch_size": bs, "seq_len": sl})
    write_csv(out_dir / "flops_profiler_stats.csv", FLOPS_COLUMNS, flops_rows)

    summary = {"model": cfg.model.name, "task": task, "num_labels": num_labels, "device": str(device), "batch_size": bs,
               "seq_len": sl, "total_params": base_params, "method": cfg.method, "left_out": left_out,
               "files": ["optimizer_memory_comparison.csv", breakdown_name, "flops_profiler_stats.csv", *per_rank_names],
               "variants": [{**{k: v for k, v in r.items() if k not in ("per_param_state", "groups")},
                             "groups": [{k: v for k, v in g.items() if k != "names"} for g in r["groups"]]} for r in results]}
    atomic_write_text(out_dir / "profile_summary.json", strict_json_dumps(summary, indent=2))  # no bare NaN
    if echo:
        print(format_table(rows, base_params, cfg.model.name))
        print(format_breakdown(breakdown))
        print(format_flops(flops_rows))
        if per_rank:
            print(format_per_rank(per_rank, conf["total_params"]))
        print(f"\nfiles in {out_dir}: {', '.join(summary['files'])}")
    return {"rows": rows, "breakdown": breakdown, "flops": flops_rows, "summary": summary, "output_dir": out_dir}


def format_table(rows: list[dict], total_params: int, model: str) -> str:
    lines = [f"optimizer state after one step ({model}, {total_params:,} parameters)",
             f"{'method':<10} {'rank':>5} {'state MB':>10} {'savings MB':>11} {'savings %':>10}"]
    for r in rows:
        if r["group"] == "total":
            rk = "-" if r["rank"] is None else str(r["rank"])
            sav = (f"{r['savings_mb']:>11.2f} {r['savings_pct']:>10.2f}" if r.get("savings_pct") is not None
                   else f"{'-':>11} {'-':>10}")  # no AdamW baseline (it did not fit)
            lines.append(f"{r['method']:<10} {rk:>5} {r['state_mb']:>10.2f} {sav}")
    return "\n".join(lines)


def format_breakdown(breakdown: list[dict]) -> str:
    """The memory breakdown (memory_breakdown_*.csv) as a table: one row per method, MB per component."""
    comps = list(dict.fromkeys(r["component"] for r in breakdown))
    methods = list(dict.fromkeys((r["method"], r["rank"]) for r in breakdown))
    lines = ["\nmemory breakdown of one training step (MB)", f"{'method':<10} {'rank':>5} " + " ".join(f"{c:>16}" for c in comps)]
    for m, rk in methods:
        vals = {r["component"]: r["mb"] for r in breakdown if (r["method"], r["rank"]) == (m, rk)}
        lines.append(f"{m:<10} {'-' if rk is None else rk:>5} " + " ".join(f"{vals[c]:>16.2f}" if c in vals else f"{'-':>16}" for c in comps))
    return "\n".join(lines)


def format_per_rank(per_rank: list[dict], total_params: int) -> str:
    """``system.sharding=fsdp``: the memory of one process (memory_per_rank_fsdp_w{N}.csv) as a table, one column
    per world size."""
    r0 = per_rank[0]
    rk = "" if r0["rank"] is None else f" r={r0['rank']}"
    worlds = list(dict.fromkeys(r["world_size"] for r in per_rank))
    comps = list(dict.fromkeys(r["component"] for r in per_rank))
    mb = {(r["world_size"], r["component"]): r["mb"] for r in per_rank}
    lines = [f"\nmemory per process, system.sharding=fsdp over {' / '.join(map(str, worlds))} process(es) ({r0['method']}{rk}, "
             f"{total_params:,} parameters; MB)", f"  {'component':<16}" + "".join(f"{'world ' + str(w):>14}" for w in worlds)]
    for c in comps:
        lines.append(f"  {c:<16}" + "".join(f"{mb[w, c]:>14.2f}" for w in worlds))
    src = next(r["source"] for r in per_rank if r["component"] == "activations")
    lines.append("  (gathered: whole copies FSDP all-gathers while a block runs, the root group plus two blocks; activations: "
                 + ("the forward + backward peak measured on this GPU)" if src == "cuda"
                    else "the tensors autograd saves, measured here on the CPU; backward temporaries and recomputed blocks "
                         "come on top, so the total runs low: profile on the GPU for the measured peak)"))
    return "\n".join(lines)


def format_flops(flops_rows: list[dict]) -> str:
    """FLOPs per phase of one step (flops_profiler_stats.csv) as a table, in GFLOPs."""
    phases = list(dict.fromkeys(r["phase"] for r in flops_rows))
    methods = list(dict.fromkeys((r["method"], r["rank"]) for r in flops_rows))
    lines = ["\nFLOPs of one training step (GFLOPs)", f"{'method':<10} {'rank':>5} " + " ".join(f"{p:>{max(14, len(p))}}" for p in phases)]
    for m, rk in methods:
        vals = {r["phase"]: r["gflops"] for r in flops_rows if (r["method"], r["rank"]) == (m, rk)}
        lines.append(f"{m:<10} {'-' if rk is None else rk:>5} " + " ".join(f"{vals[p]:>{max(14, len(p))}.4f}" if p in vals else f"{'-':>{max(14, len(p))}}" for p in phases))
    return "\n".join(lines)


