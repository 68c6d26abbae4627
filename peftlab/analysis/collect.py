"""Collect every run of a study into one tidy table and aggregate over seeds.

One row per run: the configuration keys that vary across the study (dotted names such
as ``lora.r``), the final results, the method summary (``summary.<key>``) and the
compression bounds (``bounds.<key>``). Runs that differ only in seed keys (any key whose
last part ends in ``seed``) form a group; :func:`aggregate` gives mean, sample standard
deviation (ddof = 1) and n per group.

Every read of a run directory goes through the shared reader, :class:`peftlab.rundir.RunDir`
(:func:`open_run`); nothing here names a run-directory file. What is known per method (its
size axes, variant keys, short names, order) comes from the method classes' attributes
(docs/analysis.md); nothing here names a method.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from ..errors import PeftlabError
from ..methods import METHODS, table_key, table_order
from ..rundir import RunDir
from ..runs import identity_sections
from ..runs.identity import is_volatile

# Sections every run reads; method sections are relevant only to their own methods.
CORE_SECTIONS = ("method", "model", "data", "training", "system")
# Directory names inside a run directory that are never runs themselves.
NOT_RUNS = {"analysis", "checkpoints", "best", "adapter", "base_model", "model", "__pycache__"}
# Keys copied into the table even when constant, besides the methods' ``axis_keys``.
COMMON_AXIS_KEYS = ("data.train_samples",)
# Short names of keys no method declares (the methods' own are their ``short_names``).
COMMON_SHORT_NAMES = {"data.train_samples": "shots", "training.learning_rate": "lr"}
RESULT_METRICS = ("val_accuracy", "val_f1", "val_loss", "val_perplexity", "train_loss")
LAYER_RE = re.compile(r"(?:^|\.)(?:layers?|h|blocks?|block)\.(\d+)(?:\.|$)")


def open_run(path) -> RunDir:
    """The run-directory reader every read of analysis goes through."""
    return RunDir(Path(path))


# ----------------------------------------------------------------- what the methods declare
def _registered() -> list[type]:
    return [METHODS[m] for m in table_order(METHODS)]


def variant_keys() -> list[str]:
    """Every method's ``variant_keys`` (config keys that name an arm rather than a size)."""
    return list(dict.fromkeys(k for cls in _registered() for k in cls.variant_keys))


def axis_keys() -> tuple[str, ...]:
    """Keys copied into the table even when constant: the methods' ``axis_keys`` and the common ones."""
    return tuple(dict.fromkeys([*(k for cls in _registered() for k in cls.axis_keys), *COMMON_AXIS_KEYS]))


def size_axes(method) -> tuple[str, ...]:
    """The method's ``size_axes`` (empty for a method without a size or not registered here)."""
    cls = METHODS.get(method)
    return cls.size_axes if cls is not None else ()


def rank_axis(method) -> Optional[str]:
    """The method's ``rank_axis``: the config key that is its rank (None: it has none, or is not registered here)."""
    cls = METHODS.get(method)
    return cls.rank_axis if cls is not None else None


def foreign_size_axis(key: str, method) -> bool:
    """``key`` is the size of some method but not of ``method``, which has a size of its own
    (LoRA's ``lora.r`` in a SubLoRA run): not worth naming for ``method``'s runs."""
    own = size_axes(method)
    return bool(own) and key not in own and any(key in cls.size_axes for cls in _registered())


def allocation_of(method) -> Optional[dict[str, str]]:
    """The method's ``allocation_arms`` (None: it has no allocation experiment)."""
    cls = METHODS.get(method)
    return cls.allocation_arms if cls is not None else None


def allocation_method() -> Optional[type]:
    """The first method, in table order, with an allocation experiment (``allocation_arms``)."""
    return next((cls for cls in _registered() if cls.allocation_arms), None)


def _shared_sections() -> set[str]:
    """Config sections declared by more than one registered method (LoRA's, read by its variants)."""
    seen: dict[str, int] = {}
    for cls in METHODS.values():
        for s in cls.config_sections:
            seen[s] = seen.get(s, 0) + 1
    return {s for s, n in seen.items() if n > 1}


def is_seed_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1].endswith("seed")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def layer_of(module: str) -> Optional[int]:
    """Transformer layer index in a module name (``bert.encoder.layer.3.attention.self.query`` -> 3)."""
    m = LAYER_RE.search(module)
    return int(m.group(1)) if m else None


def module_kind(module: str) -> str:
    """Module name without the layer prefix (``...layer.3.attention.self.query`` -> ``attention.self.query``)."""
    m = LAYER_RE.search(module)
    return module[m.end():] if m and m.end() < len(module) else module.rsplit(".", 1)[-1]


def method_sections(method: str) -> set[str]:
    """Config sections a run of ``method`` reads: the core sections plus the method's ``config_sections``."""
    if method in METHODS:
        return set(identity_sections(method))
    # a method this checkout does not know (a newer run): its own section and the shared ones (LoRA's)
    return {*CORE_SECTIONS, method, *_shared_sections()}


@dataclass
class Run:
    name: str
    path: Path
    reader: Any
    config: dict[str, Any]  # flattened, only the sections relevant to the run's method
    meta: dict[str, Any]
    results: Optional[dict]
    history: Optional[dict]
    bounds: Optional[dict]
    allocation: Optional[dict]

    @property
    def method(self) -> str:
        return str(self.config.get("method", "?"))

    @property
    def finished(self) -> bool:
        return bool(self.results) and self.results.get("status") == "completed"

    def csv(self, name: str) -> Optional[pd.DataFrame]:
        try:
            return self.reader.read_csv(name)
        except (OSError, ValueError, pd.errors.ParserError):
            return None


@dataclass
class Study:
    root: Path
    runs: list[Run]
    table: pd.DataFrame  # one row per run
    varying: list[str]  # config keys that differ between runs (dotted)
    group_keys: list[str]  # varying keys that are not seeds
    task: Optional[str]
    notes: list[str] = field(default_factory=list)
    arms: list[str] = field(default_factory=list)  # every arm, in display order (fixes each arm's colour)

    def run(self, name: str) -> Run:
        return next(r for r in self.runs if r.name == name)

    @property
    def name(self) -> str:
        """The study's name as the sweep recorded it in every run ("budget_aware, scale gpu"), else the directory's
        (a study's run files copied elsewhere, e.g. into runs/, keep their study's name)."""
        recorded = {((r.meta.get("study") or {}).get("study"), (r.meta.get("study") or {}).get("scale")) for r in self.runs}
        if len(recorded) == 1:
            study, scale = next(iter(recorded))
            if study:
                return f"{study}, scale {scale}" if scale else str(study)
        return self.root.name

    @property
    def completed(self) -> pd.DataFrame:
        return self.table[self.table["status"] == "completed"]

    @property
    def main_metric(self) -> str:
        """The headline metric: accuracy for classification, validation loss otherwise."""
        t = self.completed
        for m in (("val_accuracy", "val_loss") if self.task != "causal_lm" else ("val_loss", "val_perplexity")):
            if m in t and t[m].notna().any():
                return m
        return "train_loss"


def find_run_dirs(root: Path) -> list[Path]:
    """Every directory under ``root`` holding a ``config.json`` (a run directory); not descended into."""
    root = Path(root)
    if (root / "config.json").is_file():
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if "config.json" in filenames and dirpath != str(root):
            found.append(Path(dirpath))
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if d not in NOT_RUNS and not d.startswith("."))
    return sorted(found)


def _read_run(root: Path, path: Path) -> Run:
    rd = open_run(path)
    cfg = rd.config_dict() or {}
    method = str(cfg.get("method", "?"))
    keep = set(CORE_SECTIONS) | method_sections(method)
    flat = flatten({k: v for k, v in cfg.items() if k in keep or not isinstance(v, dict)})
    name = str(path.relative_to(root)) if path != root else path.name
    files = {"results_final.json": rd.results(), "training_history.json": rd.history(), "bounds_metrics.json": rd.bounds(),
             "allocation.json": rd.allocation(), "config.json": rd.config_dict()}
    for fname, value in files.items():
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{fname} holds a JSON {type(value).__name__}, not an object")
    return Run(name=name, path=path, reader=rd, config=flat, meta=rd.meta() or {}, results=files["results_final.json"],
               history=files["training_history.json"], bounds=files["bounds_metrics.json"], allocation=files["allocation.json"])


def _number(v: Any) -> Any:
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)):
        return float(v) if isinstance(v, float) and not math.isfinite(v) else v
    return v


def _measured(v: Any, key: str, run: str, notes: list[str]) -> Any:
    """``v`` when it is a number or null (missing); anything else is noted and becomes missing for
    this run only, so one bad value does not turn the whole column into text (and out of the tables)."""
    if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
        return v
    notes.append(f"run {run}: {key} is {v!r}, not a number; treated as missing for this run only "
                 "(its results_final.json or training_history.json was edited or damaged).")
    return None


def _scalars(d: Optional[dict], prefix: str) -> dict[str, Any]:
    if not d:
        return {}
    out = {}
    for k, v in flatten(d).items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[prefix + k] = _number(v)
    return out


def _varying(runs: list[Run]) -> list[str]:
    keys: list[str] = []
    for r in runs:
        for k in r.config:
            if k not in keys:
                keys.append(k)
    out = []
    for k in keys:
        if is_volatile(k):
            continue
        # compared only among the runs whose method reads the key (a LoRA run has no rsvd.rank)
        values = {json.dumps(r.config[k], sort_keys=True, default=str) for r in runs if k in r.config}
        if len(values) > 1:
            out.append(k)
    return out


def arm_label(config: dict[str, Any], variant_keys: list[str]) -> str:
    """The run's arm: its method plus the method-variant keys that vary in the study."""
    method = str(config.get("method", "?"))
    alloc = allocation_of(method) or {}
    parts = [method]
    for k in variant_keys:
        if k.split(".", 1)[0] not in method_sections(method) or k not in config:
            continue
        v = config[k]
        short = k.split(".", 1)[1]
        if k == alloc.get("ratio") and config.get(alloc["mode"]) != alloc["fixed"]:
            continue  # the split ratio means something only for fixed splits
        if k == alloc.get("mode"):
            parts.append(str(v))
        elif isinstance(v, bool):
            parts.append(short if v else f"no {short}")
        elif v is None:
            continue
        elif k == alloc.get("ratio"):
            parts.append(f"{short_name(k)}={v:g}")
        else:
            parts.append(f"{short}={v}")
    return " ".join(parts)


def collect(root) -> Study:
    """Read every run under ``root`` (a study directory or one run directory)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise PeftlabError(f"{root} is not a directory; give a study directory (one run directory per run) or a run directory.")
    paths = find_run_dirs(root)
    if not paths:
        raise PeftlabError(f"No run directories under {root}: a run directory holds config.json (written by `peftlab train` "
                           "or `peftlab sweep`). Check the path, or train the runs first.")
    runs, notes = [], []
    for p in paths:
        try:
            runs.append(_read_run(root, p))
        except (OSError, ValueError, PeftlabError) as e:  # one damaged run does not stop the study's analysis
            notes.append(f"skipped {p}: unreadable ({e})")
    varying = _varying(runs)
    group_keys = [k for k in varying if not is_seed_key(k)]
    variants = [k for k in variant_keys() if k in varying]
    axes = axis_keys()
    rows = []
    for r in runs:
        res = r.results or {}
        hist = r.history or {}
        row: dict[str, Any] = {"run": r.name, "status": res.get("status", "incomplete" if hist else "not started"),
                               "method": r.method, "arm": arm_label(r.config, variants),
                               "seed": r.config.get("training.seed"), "task": res.get("task") or r.meta.get("task"),
                               "dataset": r.config.get("data.dataset"), "model": r.config.get("model.name")}
        for k in [*varying, *axes]:
            if k in r.config:
                row[k] = r.config[k]
        alloc = allocation_of(r.method)
        if alloc and r.config.get(alloc["mode"]) not in (None, alloc["fixed"]) and alloc["ratio"] in row:
            row[alloc["ratio"]] = None  # the ratio means nothing outside fixed mode
        final = res.get("final") or {k: v[-1] for k, v in hist.items() if isinstance(v, list) and v}
        for m in RESULT_METRICS:
            if m in final:
                row[m] = _measured(final[m], m, r.name, notes)
        for k, v in (res.get("test") or {}).items():  # the end-of-run test split, evaluated with best/'s weights
            if k.startswith("test_") and isinstance(v, (int, float)) and not isinstance(v, bool):
                row[k] = v
        best = res.get("best") or {}
        if best.get("value") is not None:
            row[f"best_{best.get('metric')}"] = _measured(best["value"], f"best.value ({best.get('metric')})", r.name, notes)
        for k in ("trainable_params", "effective_params", "total_params", "wall_time_s", "peak_memory_mb", "peak_memory_kind",
                  "global_step", "epochs"):
            if k in res:
                row[k] = res[k] if k == "peak_memory_kind" else _measured(res[k], k, r.name, notes)
        if "trainable_params" not in row and hist.get("trainable_params"):
            row["trainable_params"] = hist["trainable_params"][-1]
            row["effective_params"] = (hist.get("effective_params") or hist["trainable_params"])[-1]
        row.update(_scalars(res.get("method_summary"), "summary."))
        if "summary.optimizer_state_bytes" in row:
            row["optimizer_state_mb"] = row["summary.optimizer_state_bytes"] / 2**20
        row.update(_scalars(r.bounds, "bounds."))
        if r.bounds and r.bounds.get("compressed_size_bits") is not None:
            row["compressed_size_kb"] = r.bounds["compressed_size_bits"] / 8 / 1024
        rows.append(row)
    table = pd.DataFrame(rows)
    tasks = [t for t in table.get("task", pd.Series(dtype=object)).dropna().unique()]
    task = tasks[0] if len(tasks) == 1 else None
    unfinished = table[table["status"] != "completed"]
    if len(unfinished):
        notes.append(f"{len(unfinished)} of {len(table)} runs are not completed and are left out of means and plots: "
                     + ", ".join(f"{r.run} ({r.status})" for r in unfinished.itertuples()))
    order = {}
    for r, row in zip(runs, rows):
        order.setdefault(row["arm"], _arm_sort_key(r.config, row["arm"]))
    arms = sorted(order, key=order.get)
    return Study(root=root, runs=runs, table=table, varying=varying, group_keys=group_keys, task=task, notes=notes, arms=arms)


def _arm_sort_key(config: dict, arm: str) -> tuple:
    """Method (table order), then an allocation experiment's arms: equal split, fixed splits by
    decreasing ratio, learned gates."""
    method = str(config.get("method"))
    alloc = allocation_of(method)
    mo, ratio = 0, 0
    if alloc:
        modes = (alloc["uniform"], alloc["fixed"], alloc["learned"])
        mode = config.get(alloc["mode"])
        mo = modes.index(mode) if mode in modes else 0
        ratio = config.get(alloc["ratio"]) if mode == alloc["fixed"] else 0
    return (*table_key(method), mo, -(ratio or 0), arm)


def _natural(v) -> tuple:
    if isinstance(v, bool) or v is None or (isinstance(v, float) and math.isnan(v)):
        return (2, str(v))
    if isinstance(v, (int, float, np.integer, np.floating)):
        return (0, float(v))
    return (1, str(v))


def group_columns(study: Study) -> list[str]:
    """Columns that identify a group of runs differing only by seed."""
    cols = ["arm"] + [k for k in study.group_keys if k != "method"]
    return [c for c in cols if c in study.table]


def numeric_columns(df: pd.DataFrame, exclude: list[str]) -> list[str]:
    out = []
    for c in df.columns:
        if c in exclude or c in ("run", "status", "seed"):
            continue
        s = df[c]
        if s.dtype == bool or s.dtype == object and s.map(lambda v: isinstance(v, bool)).any():
            continue
        if pd.api.types.is_numeric_dtype(s) and s.notna().any():
            out.append(c)
    return out


def short_name(key: str) -> str:
    """A key's name in labels and table heads: a method's ``short_names``, else the key without its section."""
    for cls in _registered():
        if key in cls.short_names:
            return cls.short_names[key]
    return COMMON_SHORT_NAMES.get(key, key.split(".", 1)[-1] if "." in key else key)


def group_label(row, study: Study) -> str:
    """Readable name of a group: its arm plus the other non-seed keys that vary (``lora r=8``)."""
    get = row.get  # a dict or a pandas Series
    parts = [str(get("arm"))]
    arm_keys = {*variant_keys(), "method"}
    method = get("method")
    axes = size_axes(method)
    # the first size the group has a value for (BA-LoRA without a budget: its base rank), else the last
    size = next((k for k in axes if get(k) is not None), axes[-1]) if axes else None
    keys = list(study.group_keys)
    if size and size not in keys:
        keys.insert(0, size)  # a method's own size is always named, even when constant
    for k in keys:
        if k in arm_keys or foreign_size_axis(k, method):
            continue  # another method's size (LoRA's rank in a SubLoRA run) is not this group's
        v = get(k)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        parts.append(f"{short_name(k)}={v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{short_name(k)}={v}")
    return " ".join(parts)


def aggregate(study: Study) -> pd.DataFrame:
    """One row per group of completed runs: group keys, ``n``, the seeds, and ``<metric>_mean`` / ``<metric>_std``.

    The standard deviation is the sample standard deviation (ddof = 1), NaN for a single run.
    """
    df = study.completed
    keys = group_columns(study)
    if df.empty:
        return pd.DataFrame(columns=keys + ["method", "n", "seeds", "label", "runs"])
    axes = axis_keys()
    metrics = numeric_columns(df, keys + list(axes) + study.varying)
    out = []
    for gk, g in df.groupby(keys, dropna=False, sort=False):
        gk = gk if isinstance(gk, tuple) else (gk,)
        g = g.sort_values("seed", key=lambda s: pd.to_numeric(s, errors="coerce"))
        row: dict[str, Any] = dict(zip(keys, gk))
        row["method"] = g["method"].iloc[0]
        row["n"] = len(g)
        row["seeds"] = ",".join(str(s) for s in g["seed"].tolist())
        for k in axes:  # constant within the group (else they would be group keys)
            if k in g and k not in row:
                v = g[k].iloc[0]
                row[k] = None if isinstance(v, float) and math.isnan(v) else v
        row["label"] = group_label(row, study)
        row["runs"] = list(g["run"])
        for m in metrics:
            vals = pd.to_numeric(g[m], errors="coerce").dropna().to_numpy(dtype=float)
            row[f"{m}_mean"] = float(np.mean(vals)) if len(vals) else np.nan
            row[f"{m}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else np.nan
        out.append(row)
    arm_rank = {a: i for i, a in enumerate(study.arms)}
    out.sort(key=lambda r: (arm_rank.get(r["arm"], len(arm_rank)), *(_natural(r.get(k)) for k in keys[1:])))
    return pd.DataFrame(out)
