"""Synthetic study directories with known numbers, written file by file as peftlab writes them.

Each run directory gets what ``peftlab train`` writes (config.json with ``_meta``,
results_final.json, training_history.json, loss_log.csv, sparsity_log.csv for sparse
methods, allocation.json), the long-format module_metrics.csv (step,module,metric,value),
SubLoRA's gating_trace.csv and ``peftlab bounds``' bounds_metrics.json. The numbers are
chosen so that means and standard deviations are known in closed form (see each builder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from peftlab.config import config_from_dict
from peftlab.tracking import LOSS_COLUMNS
from peftlab.io import CsvLog, write_json

N_LAYERS = 6
SEEDS = (42, 123, 999)


def _config(method: str, overrides: dict[str, Any], extra_sections: Optional[dict] = None) -> dict:
    raw: dict[str, Any] = {"method": method if method != "sublora" else "lora"}
    for key, value in overrides.items():
        sec, k = key.split(".", 1)
        raw.setdefault(sec, {})[k] = value
    cfg = config_from_dict(raw).to_dict()
    cfg["method"] = method
    for sec, vals in (extra_sections or {}).items():
        cfg[sec] = vals
    return cfg


def write_run(run_dir: Path, method: str, overrides: dict[str, Any], *, task: str, final: dict[str, float],
              trainable: int, effective: Optional[int] = None, wall: float = 10.0, peak: float = 500.0,
              epochs: int = 3, steps_per_epoch: int = 20, summary: Optional[dict] = None,
              extra_sections: Optional[dict] = None, bounds: Optional[dict] = None, allocation: Optional[dict] = None,
              module_values: Optional[dict[str, float]] = None, finished: bool = True,
              test: Optional[dict[str, float]] = None, eval_steps: Optional[int] = None) -> Path:
    """One run directory. ``final`` is the last epoch's metrics; earlier epochs are made worse by a known amount.
    eval_log.csv has a row per epoch end and, with ``eval_steps``, one every eval_steps inside an epoch
    (validation metrics worse by 0.1 x the share of training still to come)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = _config(method, {**overrides, "output.dir": str(run_dir)}, extra_sections)
    cfg["_meta"] = {"versions": {"peftlab": "0.1.0"}, "git_commit": "synthetic", "command": ["peftlab", "train"],
                    "created": "2026-11-23T20:00:00+0000", "host": "test", "world_size": 1, "task": task,
                    "num_labels": 2 if task == "classification" else None}
    write_json(run_dir / "config.json", cfg)
    effective = trainable if effective is None else effective
    history: dict[str, list] = {}
    loss = CsvLog(run_dir / "loss_log.csv", LOSS_COLUMNS)
    sparse = module_values is not None
    sp_log = CsvLog(run_dir / "sparsity_log.csv") if sparse else None
    long_rows = []
    evals = CsvLog(run_dir / "eval_log.csv")
    step = 0
    for e in range(1, epochs + 1):
        worse = (epochs - e) * 0.1  # epoch e is worse than the last by 0.1 per remaining epoch
        for s in range(steps_per_epoch // 5):
            step += 5
            frac = step / (epochs * steps_per_epoch)
            sp = None
            if sparse:
                sp = frac * sum(module_values.values()) / len(module_values)
                detail = {m: v * frac for m, v in module_values.items()}
                sp_log.write({"epoch": e, "step": step, "overall_sparsity": sp, **detail})
                long_rows += [{"step": step, "module": m, "metric": "sparsity", "value": v} for m, v in detail.items()]
            loss.write({"epoch": e, "step": step, "train_loss": final.get("train_loss", 1.0) + worse + 0.5 * (1 - frac),
                        "learning_rate": 1e-3 * (1 - frac), "gpu_memory_mb": 0.0, "sparsity": sp})
            epoch_end = s == steps_per_epoch // 5 - 1
            if epoch_end or (eval_steps and step % eval_steps == 0):
                late = 0.1 * (1 - frac)
                evals.write({"epoch": e, "step": step, "kind": "epoch" if epoch_end else "step",
                             **{k: v + late if k.endswith("loss") or k.endswith("perplexity") else v - late
                                for k, v in final.items() if k.startswith("val_")}})
        row = {"epoch": e, "step": step}
        for k, v in final.items():
            row[k] = v - worse if k == "val_accuracy" or k == "val_f1" else v + worse
        row.update(epoch_time=wall / epochs, gpu_memory_mb=0.0, trainable_params=trainable, effective_params=effective)
        if sparse:
            row["sparsity"] = sum(module_values.values()) / len(module_values) * e / epochs
        for k, v in row.items():
            history.setdefault(k, []).append(v)
        if not finished:
            break
    write_json(run_dir / "training_history.json", history)
    if long_rows:
        ml = CsvLog(run_dir / "module_metrics.csv", ["step", "module", "metric", "value"])
        for r in long_rows:
            ml.write(r)
    if allocation is not None:
        write_json(run_dir / "allocation.json", allocation)
    if bounds is not None:
        write_json(run_dir / "bounds_metrics.json", bounds)
    if finished:
        write_json(run_dir / "results_final.json", {
            "status": "completed", "method": method, "model": cfg["model"]["name"], "dataset": cfg["data"]["dataset"],
            "task": task, "seed": cfg["training"]["seed"], "global_step": step, "epochs": epochs, "final": dict(final),
            "best": {"metric": "val_accuracy" if task == "classification" else "val_loss",
                     "value": final.get("val_accuracy", final.get("val_loss")), "step": step},
            "trainable_params": trainable, "effective_params": effective, "total_params": 10 * trainable,
            "wall_time_s": wall, "peak_memory_mb": peak, "peak_memory_kind": "cpu_max_rss", "world_size": 1,
            "method_summary": summary or {}, **({"test": {**test, "checkpoint": "best", "step": step}} if test else {})})
    return run_dir


# ----------------------------------------------------------------------------- subspace allocation
# BPD per arm = base + offset(seed); offsets (-0.1, 0, +0.1) give mean = base, std = 0.1 exactly.
SEED_OFFSETS = {42: -0.1, 123: 0.0, 999: 0.1}
SUBSPACE_ARMS = [("uniform", None), ("fixed", 0.8), ("fixed", 0.5), ("fixed", 0.2), ("learned", None)]
SUBSPACE_BPD = {("uniform", None): 4.2, ("fixed", 0.8): 4.0, ("fixed", 0.5): 4.25, ("fixed", 0.2): 4.5, ("learned", None): 4.1}
SUBSPACE_KL = {("uniform", None): 3000.0, ("fixed", 0.8): 2900.0, ("fixed", 0.5): 3000.0, ("fixed", 0.2): 3100.0,
               ("learned", None): 3050.0}


def learned_gamma(d: int, seed: int, layer: int) -> float:
    """Learned gates that rise with depth (0.55 + 0.05·layer) plus a seed offset of ±0.01."""
    return 0.55 + 0.05 * layer + {42: -0.01, 123: 0.0, 999: 0.01}[seed] + (0.02 if d == 2000 else 0.0)


def make_subspace_study(root: Path, dims=(1000, 2000), seeds=SEEDS, with_bounds: bool = True) -> Path:
    for d in dims:
        for mode, ratio in SUBSPACE_ARMS:
            for seed in seeds:
                off = SEED_OFFSETS[seed]
                bpd = SUBSPACE_BPD[(mode, ratio)] + off - (0.2 if d == 2000 else 0.0)
                kl = SUBSPACE_KL[(mode, ratio)] * (d / 1000) + 100 * off / 0.1
                name = f"d{d}_{mode}" + (f"_r{ratio}" if ratio is not None else "") + f"_seed{seed}"
                sub = {"intrinsic_dim": d, "allocation_mode": mode, "allocation_ratio": ratio if ratio is not None else 0.5,
                       "projector": "kronecker", "projector_seed": 137}
                alloc = None
                run_dir = root / name
                if mode == "learned":
                    gam = {f"transformer.h.{i}": learned_gamma(d, seed, i) for i in range(N_LAYERS)}
                    alloc = {"mode": "learned", "intrinsic_dim": d, "gammas": gam}
                    run_dir.mkdir(parents=True, exist_ok=True)
                    trace = CsvLog(run_dir / "gating_trace.csv", ["step"] + [f"gamma_{i}" for i in range(N_LAYERS)])
                    for step in (10, 20, 30):
                        trace.write({"step": step, **{f"gamma_{i}": 0.5 + (gam[f"transformer.h.{i}"] - 0.5) * step / 30
                                                      for i in range(N_LAYERS)}})
                elif mode == "fixed":
                    alloc = {"mode": "fixed", "intrinsic_dim": d, "d_B": round(ratio * d), "d_A": d - round(ratio * d)}
                bounds = {"kl_divergence": kl, "empirical_bpd": bpd, "bound_value": bpd + kl / 1000,
                          "compressed_size_bits": kl / 0.6931471805599453, "best_alpha": 0.01} if with_bounds else None
                write_run(run_dir, "sublora", {"training.seed": seed, "model.name": "tiny-gpt2", "data.dataset": "lm-sample"},
                          task="causal_lm", final={"train_loss": bpd * 0.69, "val_loss": bpd * 0.7},
                          trainable=d + (N_LAYERS + 1 if mode == "learned" else 0), extra_sections={"sublora": sub},
                          bounds=bounds, allocation=alloc, summary={"intrinsic_dim": d, "D": 50000})
    return root


# ----------------------------------------------------------------------------- budget-aware (BA-LoRA)
# val_accuracy: LoRA r=4: 0.80, 0.82, 0.84 ; BA-LoRA at r=4's budget: 0.83, 0.84, 0.85 (+0.03, +0.02, +0.01)
BUDGET_ACC = {("lora", 4): (0.80, 0.82, 0.84), ("lora", 8): (0.84, 0.85, 0.86),
              ("ba_lora", 4): (0.83, 0.84, 0.85), ("ba_lora", 8): (0.86, 0.87, 0.88)}
MODULES = [f"bert.encoder.layer.{i}.attention.self.{k}" for i in range(N_LAYERS) for k in ("query", "value")]


def make_budget_study(root: Path, seeds=SEEDS, dataset: str = "sst2-sample", acc_shift: float = 0.0) -> Path:
    for (method, r), accs in BUDGET_ACC.items():
        for seed, acc in zip(seeds, accs):
            budget = r * 2 * 64 * len(MODULES)
            ov = {"training.seed": seed, "model.name": "tiny-bert", "data.dataset": dataset, "lora.r": 8}
            acc = acc + acc_shift
            alloc = None
            if method == "lora":
                ov["lora.r"] = r
            else:
                ov["ba_lora.param_budget"] = budget
                ranks = {m: max(1, r + (i // 2) - 1) for i, m in enumerate(MODULES)}
                alloc = {"budget": budget, "modules": {m: {"rank": k, "d_in": 64, "d_out": 64, "params": k * 128}
                                                       for m, k in ranks.items()}}
            write_run(root / f"{method}_r{r}_seed{seed}", method, ov, task="classification",
                      final={"train_loss": 0.4, "val_loss": 0.5, "val_accuracy": acc, "val_f1": acc - 0.01},
                      trainable=budget + 130, allocation=alloc)
    return root


def make_budget_few_shot_study(root: Path, seeds=SEEDS) -> Path:
    """The budget study plus the budget_aware study's shapes: 16-shot LoRA and BA-LoRA at r=8 (data.train_samples set,
    the full-data runs leave it unset), so groups get labels as long as the real study's.
    16-shot val_accuracy: LoRA 0.60, 0.62, 0.64; BA-LoRA 0.55, 0.56, 0.57 (worse by 0.06 on average)."""
    make_budget_study(root, seeds)
    budget = 8 * 2 * 64 * len(MODULES)
    ranks = {m: max(1, 8 + (i // 2) - 1) for i, m in enumerate(MODULES)}
    alloc = {"budget": budget, "modules": {m: {"rank": k, "d_in": 64, "d_out": 64, "params": k * 128} for m, k in ranks.items()}}
    for seed, (lo, ba) in zip(seeds, [(0.60, 0.55), (0.62, 0.56), (0.64, 0.57)]):
        common = {"training.seed": seed, "model.name": "tiny-bert", "data.dataset": "sst2-sample", "lora.r": 8,
                  "data.train_samples": 16, "training.epochs": 10, "training.batch_size": 16}
        write_run(root / f"lora_r8_16shot_seed{seed}", "lora", common, task="classification",
                  final={"train_loss": 0.4, "val_loss": 0.6, "val_accuracy": lo, "val_f1": lo}, trainable=budget + 130)
        write_run(root / f"ba_lora_r8_16shot_seed{seed}", "ba_lora", {**common, "ba_lora.param_budget": budget},
                  task="classification", final={"train_loss": 0.4, "val_loss": 0.6, "val_accuracy": ba, "val_f1": ba},
                  trainable=budget + 130, allocation=alloc)
    return root


# ----------------------------------------------------------------------------- sparse adapters
SPARSE_LAMBDAS = (0.1, 0.3, 0.5)


QWEN_05B_MODULES = [f"model.layers.{i}.self_attn.{k}" for i in range(24) for k in ("q_proj", "k_proj", "v_proj", "o_proj")]


def make_sparse_study(root: Path, seeds=(42,), modules=None, prune_scale: float = 1.0) -> Path:
    """SoRA at three λ beside LoRA and DoRA; ``modules``: the adapted modules (default: 2 BERT layers x
    query/value; QWEN_05B_MODULES for the 96 of the gpu scale). Module sparsity is λ (1 + i/n) x ``prune_scale``
    (capped at 1), so overall sparsity rises with λ; the validation loss is 2.2 + λ."""
    mods = {m.replace("bert.encoder.", ""): None for m in (modules or MODULES)}
    for seed in seeds:
        write_run(root / f"lora_seed{seed}", "lora", {"training.seed": seed, "lora.r": 16}, task="causal_lm",
                  final={"train_loss": 2.0, "val_loss": 2.2, "val_perplexity": 9.03}, trainable=4096)
        write_run(root / f"dora_seed{seed}", "dora", {"training.seed": seed, "lora.r": 16}, task="causal_lm",
                  final={"train_loss": 2.0, "val_loss": 2.18, "val_perplexity": 8.85}, trainable=4224)
        for lam in SPARSE_LAMBDAS:
            vals = {m: min(1.0, prune_scale * lam * (1 + i / len(mods))) for i, m in enumerate(mods)}
            eff = int(4096 * (1 - sum(vals.values()) / len(vals)))
            write_run(root / f"sora_l{lam}_seed{seed}", "sora", {"training.seed": seed, "lora.r": 16, "sora.lambda_": lam},
                      task="causal_lm", final={"train_loss": 2.0 + lam, "val_loss": 2.2 + lam, "val_perplexity": 9.0 + lam},
                      trainable=4096 + 128, effective=eff, module_values=vals,
                      summary={"lambda": lam, "sparsity": sum(vals.values()) / len(vals)},
                      allocation={"method": "sora", "max_rank": 16,
                                  "ranks": {m: round(16 * (1 - v)) for m, v in vals.items()}})
    return root


# ----------------------------------------------------------------------------- compare (one epoch, every method)
COMPARE = {"lora": (0.86, 147_456, None), "dora": (0.865, 152_064, None), "sora": (0.85, 147_520, 60_000),
           "ba_lora": (0.862, 147_456, None), "rsvd": (0.87, 22_713_216, None)}


def make_compare_study(root: Path, seeds=(42,)) -> Path:
    """What compare.yaml's cpu scale writes: one epoch, evaluations every 20 steps, rSVD training every
    weight (2.3e7) beside adapters of 1.5e5, SoRA's effective parameters below its trainable ones."""
    for seed in seeds:
        for method, (acc, trainable, effective) in COMPARE.items():
            sp = {m.replace("bert.encoder.", ""): 0.6 for m in MODULES} if method == "sora" else None
            write_run(root / f"{method}_seed{seed}", method, {"training.seed": seed, "model.name": "tiny-bert",
                                                             "data.dataset": "food-reviews"},
                      task="classification", epochs=1, steps_per_epoch=60, eval_steps=20, trainable=trainable,
                      effective=effective, module_values=sp, peak=900.0 + trainable / 1e5,
                      final={"train_loss": 0.35, "val_loss": 0.4, "val_accuracy": acc, "val_f1": acc - 0.02},
                      summary={"optimizer_state_bytes": 3_000_000} if method == "rsvd" else None)
    return root


# ----------------------------------------------------------------------------- gradient projection
PROJ_RANKS = (4, 8, 16, 64, 128)
MODEL_PARAMS = 66_955_010  # DistilBERT-size: Adam's two fp32 moments = 8 bytes each


def make_projection_study(root: Path, seeds=(42,)) -> Path:
    for seed in seeds:
        for r in PROJ_RANKS:
            write_run(root / f"lora_r{r}_seed{seed}", "lora", {"training.seed": seed, "lora.r": r}, task="classification",
                      final={"train_loss": 0.2 - r / 2000, "val_loss": 0.4, "val_accuracy": 0.85, "val_f1": 0.85},
                      trainable=r * 2 * 768 * 12 + 1538, peak=1400.0 + r, epochs=4)
            write_run(root / f"rsvd_r{r}_seed{seed}", "rsvd", {"training.seed": seed, "rsvd.rank": r}, task="classification",
                      final={"train_loss": 0.1 - r / 4000, "val_loss": 0.33, "val_accuracy": 0.87, "val_f1": 0.87},
                      trainable=MODEL_PARAMS, peak=1850.0 + r, epochs=4,
                      summary={"projected_matrices": 36, "rank_cap": r, "optimizer_state_bytes": int(r * 640_000)})
    return root
